/**
 * Shell completion scripts for bash, zsh and fish, written from the command tree itself so they
 * never fall behind a new command or flag.
 */
import { PROGRAM, type AnyCommand } from "./cli.ts";

interface Entry {
  /** Command path after the program name ("" for the top level). */
  path: string;
  subcommands: string[];
  flags: string[];
}

function entries(cmd: AnyCommand, path: string[] = []): Entry[] {
  const subs = (cmd.subCommands ?? {}) as Record<string, AnyCommand>;
  const flags = Object.entries((cmd.args ?? {}) as Record<string, { type?: string }>)
    .filter(([, d]) => d.type !== "positional")
    .map(([n]) => `--${n}`);
  const here: Entry = { path: path.join(" "), subcommands: Object.keys(subs), flags: [...flags, "--help"] };
  return [here, ...Object.entries(subs).flatMap(([n, c]) => entries(c, [...path, n]))];
}

function bash(list: Entry[]): string {
  const cases = list.map((e) => `    "${e.path}") words="${[...e.subcommands, ...e.flags].join(" ")}" ;;`).join("\n");
  return `# bash completion for ${PROGRAM}
_pgtrickle_relay() {
  local cur path="" w words
  cur="\${COMP_WORDS[COMP_CWORD]}"
  for w in "\${COMP_WORDS[@]:1:COMP_CWORD-1}"; do
    case "$w" in -*) ;; *) case " $(_pgtrickle_relay_subs "$path") " in *" $w "*) path="\${path:+$path }$w" ;; esac ;; esac
  done
  case "$path" in
${cases}
    *) words="" ;;
  esac
  COMPREPLY=($(compgen -W "$words" -- "$cur"))
}
_pgtrickle_relay_subs() {
  case "$1" in
${list.map((e) => `    "${e.path}") echo "${e.subcommands.join(" ")}" ;;`).join("\n")}
  esac
}
complete -o default -F _pgtrickle_relay ${PROGRAM}
`;
}

function zsh(list: Entry[]): string {
  const key = (e: Entry) => JSON.stringify(e.path || "-");
  // `words` is zsh's own array of the command line and `path` is tied to PATH: the tables and
  // the command path get other names.
  return `#compdef ${PROGRAM}
# zsh completion for ${PROGRAM}
_pgtrickle_relay() {
  local cmdpath="" w k
  local -A subs offers
  # Filled as key/value lists: in \`subs["k"]=v\` zsh would keep the quotes in the key.
  subs=(
${list.map((e) => `    ${key(e)} ${JSON.stringify(e.subcommands.join(" "))}`).join("\n")}
  )
  offers=(
${list.map((e) => `    ${key(e)} ${JSON.stringify([...e.subcommands, ...e.flags].join(" "))}`).join("\n")}
  )
  for w in \${words[2,CURRENT-1]}; do
    [[ $w == -* ]] && continue
    k=\${cmdpath:--}
    [[ " \${subs[$k]} " == *" $w "* ]] && cmdpath="\${cmdpath:+$cmdpath }$w"
  done
  k=\${cmdpath:--}
  compadd -- \${=offers[$k]}
}
_pgtrickle_relay "$@"
`;
}

function fish(list: Entry[]): string {
  const lines = [`# fish completion for ${PROGRAM}`, `complete -c ${PROGRAM} -f`];
  for (const e of list) {
    const parts = e.path ? e.path.split(" ") : [];
    // Offered once the words of the path are on the line and no subcommand of this level is yet.
    const cond = [
      ...parts.map((p) => `__fish_seen_subcommand_from ${p}`),
      ...(e.subcommands.length ? [`not __fish_seen_subcommand_from ${e.subcommands.join(" ")}`] : []),
    ];
    const when = cond.length ? ` -n '${cond.join("; and ")}'` : "";
    for (const s of e.subcommands) lines.push(`complete -c ${PROGRAM}${when} -a ${s}`);
    for (const f of e.flags) lines.push(`complete -c ${PROGRAM}${when} -l ${f.slice(2)}`);
  }
  return lines.join("\n") + "\n";
}

export const SHELLS = ["bash", "zsh", "fish"] as const;

export function completionScript(shell: (typeof SHELLS)[number], root: AnyCommand): string {
  const list = entries(root);
  return shell === "bash" ? bash(list) : shell === "zsh" ? zsh(list) : fish(list);
}
