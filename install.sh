#!/bin/sh
# Installs the pgtrickle-relay executable from a GitHub release.
#
#   curl -fsSL https://github.com/OWNER/pgtrickle-relay/releases/latest/download/install.sh | sh
#   sh install.sh --help
#
# The archive's SHA-256 must match the release's SHA256SUMS, and the executable must run on this
# machine, before anything is written outside a temporary directory; the executable then replaces
# any previous one in a single rename.
set -eu

# The release workflow writes the repository into this line of the copy it publishes.
REPO_DEFAULT="__PGTRICKLE_RELAY_REPO__"
NAME="pgtrickle-relay"

say() { printf '%s\n' "install.sh: $*" >&2; }
die() { say "error: $*"; exit 1; }

usage() {
  cat <<'EOF'
Installs pgtrickle-relay from a GitHub release.

usage: install.sh [--version X.Y.Z] [--prefix DIR | --bin-dir DIR] [--systemd]
       curl -fsSL https://github.com/OWNER/pgtrickle-relay/releases/latest/download/install.sh | sh -s -- [options]

  --version X.Y.Z   version to install (env PGTRICKLE_RELAY_VERSION); default: the latest release
  --prefix DIR      install into DIR/bin; the default prefix is ~/.local
  --bin-dir DIR     install into DIR itself (env PGTRICKLE_RELAY_INSTALL_DIR)
  --systemd         Linux: also install the systemd unit pgtrickle-relay.service (hardened,
                    DynamicUser) with ExecStart pointing at the installed executable, into
                    $PGTRICKLE_RELAY_SYSTEMD_DIR (default /etc/systemd/system; root needed);
                    the default prefix is then /usr/local, as the unit cannot see home directories

Environment:
  PGTRICKLE_RELAY_DOWNLOAD_URL  URL of a directory holding the release files (archives and
                                SHA256SUMS), used instead of GitHub
  PGTRICKLE_RELAY_REPO          GitHub repository OWNER/NAME to download from
  PGTRICKLE_RELAY_TARGET        archive to install instead of the detected one: linux-x64,
                                linux-x64-baseline, linux-arm64, linux-x64-musl,
                                linux-arm64-musl, darwin-x64, darwin-arm64
EOF
}

version="${PGTRICKLE_RELAY_VERSION:-latest}"
bin_dir="${PGTRICKLE_RELAY_INSTALL_DIR:-}"
prefix=""
systemd=0
while [ $# -gt 0 ]; do
  case "$1" in
    --version) [ $# -ge 2 ] || die "--version needs a value"; version="$2"; shift ;;
    --version=*) version="${1#--version=}" ;;
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix="$2"; shift ;;
    --prefix=*) prefix="${1#--prefix=}" ;;
    --bin-dir) [ $# -ge 2 ] || die "--bin-dir needs a directory"; bin_dir="$2"; shift ;;
    --bin-dir=*) bin_dir="${1#--bin-dir=}" ;;
    --systemd) systemd=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument: $1 (try --help)" ;;
  esac
  shift
done
version="${version#v}"

if [ -n "$prefix" ]; then
  bin_dir="$prefix/bin"
elif [ -z "$bin_dir" ] && [ "$systemd" = 1 ]; then
  bin_dir="/usr/local/bin"
elif [ -z "$bin_dir" ]; then
  [ -n "${HOME:-}" ] || die "HOME is not set; pass --prefix DIR or --bin-dir DIR"
  bin_dir="$HOME/.local/bin"
fi

# --- platform -------------------------------------------------------------------------------

detect_target() {
  os="$(uname -s)"
  arch="$(uname -m)"
  case "$os" in
    Linux) os=linux ;;
    Darwin) os=darwin ;;
    *) die "unsupported operating system '$os': releases exist for Linux and macOS (Darwin)" ;;
  esac
  case "$arch" in
    x86_64 | amd64) arch=x64 ;;
    aarch64 | arm64) arch=arm64 ;;
    *) die "unsupported CPU architecture '$arch': releases exist for x86_64 (amd64) and aarch64 (arm64)" ;;
  esac
  # A shell under Rosetta reports x86_64 on an Apple silicon Mac: the native build is better.
  if [ "$os" = darwin ] && [ "$arch" = x64 ] &&
    [ "$(sysctl -n sysctl.proc_translated 2>/dev/null || echo 0)" = 1 ]; then
    arch=arm64
  fi
  target="$os-$arch"
  if [ "$os" = linux ]; then
    if is_musl; then
      target="$target-musl"
    elif [ "$arch" = x64 ] && [ -r /proc/cpuinfo ] && ! grep -q '^flags.* avx2' /proc/cpuinfo; then
      target="$target-baseline"
    fi
  fi
  echo "$target"
}

is_musl() {
  for f in /lib/ld-musl-*.so.1; do
    [ -e "$f" ] && return 0
  done
  if command -v ldd >/dev/null 2>&1 && ldd --version 2>&1 | grep -qi musl; then
    return 0
  fi
  return 1
}

# --- tools ----------------------------------------------------------------------------------

# fetch URL FILE: fails without leaving FILE behind.
if command -v curl >/dev/null 2>&1; then
  fetch() { curl -fsSL --retry 2 -o "$2" "$1" || { rm -f "$2"; return 1; }; }
elif command -v wget >/dev/null 2>&1; then
  fetch() { wget -q -O "$2" "$1" || { rm -f "$2"; return 1; }; }
else
  die "neither curl nor wget is installed; install one of them and run this again"
fi

if command -v sha256sum >/dev/null 2>&1; then
  sha256_of() { sha256sum "$1" | cut -d' ' -f1; }
elif command -v shasum >/dev/null 2>&1; then
  sha256_of() { shasum -a 256 "$1" | cut -d' ' -f1; }
elif command -v openssl >/dev/null 2>&1; then
  sha256_of() { openssl dgst -sha256 -r "$1" | cut -d' ' -f1; }
else
  die "no SHA-256 tool found (sha256sum, shasum or openssl); it is needed to verify the download"
fi

command -v tar >/dev/null 2>&1 || die "tar is not installed"
command -v gzip >/dev/null 2>&1 || die "gzip is not installed"

# --- download and verify --------------------------------------------------------------------

if [ -n "${PGTRICKLE_RELAY_TARGET:-}" ]; then
  target="$PGTRICKLE_RELAY_TARGET"
  case "$target" in
    linux-x64 | linux-x64-baseline | linux-arm64 | linux-x64-musl | linux-arm64-musl | darwin-x64 | darwin-arm64) ;;
    *) die "PGTRICKLE_RELAY_TARGET=$target is not a release target (see --help)" ;;
  esac
else
  target="$(detect_target)"
fi

unit_dir="${PGTRICKLE_RELAY_SYSTEMD_DIR:-/etc/systemd/system}"
if [ "$systemd" = 1 ]; then
  case "$target" in linux-*) ;; *) die "--systemd is for Linux; on macOS use brew services" ;; esac
  # The path goes into ExecStart= as is, and the unit's ProtectHome=yes hides home directories.
  case "$bin_dir" in
    /home/* | /root/* | /run/user/*) die "--systemd: the service cannot see $bin_dir (ProtectHome=yes); install with --prefix /usr/local" ;;
    /*) ;;
    *) die "--systemd needs an absolute --prefix or --bin-dir, got $bin_dir" ;;
  esac
  case "$bin_dir" in *[!A-Za-z0-9/._-]*) die "--systemd: $bin_dir holds characters ExecStart= would misread" ;; esac
fi

if [ -n "${PGTRICKLE_RELAY_DOWNLOAD_URL:-}" ]; then
  base="${PGTRICKLE_RELAY_DOWNLOAD_URL%/}"
else
  repo="${PGTRICKLE_RELAY_REPO:-$REPO_DEFAULT}"
  case "$repo" in
    __*) die "no repository known: set PGTRICKLE_RELAY_REPO=OWNER/NAME or PGTRICKLE_RELAY_DOWNLOAD_URL" ;;
  esac
  if [ "$version" = latest ]; then
    base="https://github.com/$repo/releases/latest/download"
  else
    base="https://github.com/$repo/releases/download/v$version"
  fi
fi

tmp="$(mktemp -d 2>/dev/null || mktemp -d -t pgtrickle-relay)" || die "cannot create a temporary directory"
staged=""
cleanup() {
  rm -rf "$tmp"
  if [ -n "$staged" ]; then rm -f "$staged"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "downloading $base/SHA256SUMS"
fetch "$base/SHA256SUMS" "$tmp/SHA256SUMS" || die "download failed: $base/SHA256SUMS"

# The archive for this target: pgtrickle-relay-<version>-<target>.tar.gz, as SHA256SUMS lists it.
line="$(grep -E "^[0-9a-fA-F]{64}[ *]+$NAME-[^ /]+-$target\\.tar\\.gz\$" "$tmp/SHA256SUMS" || true)"
[ -n "$line" ] || die "the release at $base has no archive for $target (this platform is not supported by it)"
[ "$(printf '%s\n' "$line" | wc -l | tr -d ' ')" = 1 ] || die "SHA256SUMS at $base lists several archives for $target"
expected="$(printf '%s\n' "$line" | cut -d' ' -f1 | tr 'A-F' 'a-f')"
archive="$(printf '%s\n' "$line" | sed 's/^[0-9a-fA-F]*[ *]*//')"
found_version="${archive#"$NAME"-}"
found_version="${found_version%-"$target".tar.gz}"
if [ "$version" != latest ] && [ "$found_version" != "$version" ]; then
  die "asked for version $version, but SHA256SUMS at $base lists $archive"
fi

say "downloading $archive ($target)"
fetch "$base/$archive" "$tmp/$archive" || die "download failed: $base/$archive"

actual="$(sha256_of "$tmp/$archive")"
if [ "$actual" != "$expected" ]; then
  die "checksum mismatch for $archive: expected $expected, got $actual; nothing was installed"
fi

mkdir "$tmp/unpacked"
gzip -dc "$tmp/$archive" | (cd "$tmp/unpacked" && tar -xf -) || die "cannot unpack $archive"
[ -f "$tmp/unpacked/$NAME" ] || die "$archive holds no $NAME executable"
if [ "$systemd" = 1 ] && [ ! -f "$tmp/unpacked/$NAME.service" ]; then
  die "$archive holds no systemd unit $NAME.service (a release older than --systemd?)"
fi
chmod 0755 "$tmp/unpacked/$NAME"

if ! reported="$("$tmp/unpacked/$NAME" --version 2>&1)"; then
  if [ -z "${PGTRICKLE_RELAY_TARGET:-}" ]; then
    die "the $target executable does not run on this machine: $reported"
  fi
  say "warning: the chosen $target executable does not run on this machine: $reported"
  reported="$target, not run here"
fi

# --- install --------------------------------------------------------------------------------

mkdir -p "$bin_dir" || die "cannot create $bin_dir"
# Copied beside its destination first, so that the final step is one rename on one file system.
staged="$bin_dir/.$NAME.$$.tmp"
cp "$tmp/unpacked/$NAME" "$staged" || die "cannot write to $bin_dir"
chmod 0755 "$staged"
mv -f "$staged" "$bin_dir/$NAME" || die "cannot move $NAME into $bin_dir"
staged=""

say "installed $bin_dir/$NAME: $reported"

if [ "$systemd" = 1 ]; then
  mkdir -p "$unit_dir" || die "cannot create $unit_dir"
  staged="$unit_dir/.$NAME.service.$$.tmp"
  sed "s#^ExecStart=/usr/local/bin/$NAME #ExecStart=$bin_dir/$NAME #" "$tmp/unpacked/$NAME.service" >"$staged" ||
    die "cannot write to $unit_dir"
  chmod 0644 "$staged"
  mv -f "$staged" "$unit_dir/$NAME.service" || die "cannot move $NAME.service into $unit_dir"
  staged=""
  say "installed $unit_dir/$NAME.service. Next, as its comments say:"
  say "  put the PostgreSQL URL into /etc/pgtrickle-relay/postgres-url (mode 0600), settings into /etc/pgtrickle-relay/env"
  say "  systemctl daemon-reload && systemctl enable --now $NAME"
fi

case ":${PATH:-}:" in
  *":$bin_dir:"*) ;;
  *)
    case "${SHELL:-}" in
      */zsh) rc="$HOME/.zshrc" ;;
      */bash) rc="$HOME/.bashrc" ;;
      */fish) rc="" ;;
      *) rc="$HOME/.profile" ;;
    esac
    say "$bin_dir is not on your PATH. To add it:"
    if [ -z "$rc" ]; then
      say "  fish_add_path $bin_dir"
    else
      say "  echo 'export PATH=\"$bin_dir:\$PATH\"' >> $rc && . $rc"
    fi
    ;;
esac
