# syntax=docker/dockerfile:1
#
# pgtrickle-relay in a `FROM scratch` image: the executable, the glibc libraries it loads, CA
# certificates and a non-root user, nothing else (no shell).
#
#   docker build --build-arg PGTRICKLE_RELAY_COMMIT=$(git rev-parse --short HEAD) -t pgtrickle-relay .
#   docker buildx build --platform linux/amd64,linux/arm64 ...   (what the release workflow does)
#
# The executable is cross-compiled on the build machine's own platform (Bun fetches nothing: the
# target's runtime comes from the npm registry through scripts/build); only the small rootfs step
# runs on the target platform. scripts/rootfs lays out the final tree, the same one the tests run
# with chroot.

ARG NODE_IMAGE=node:22-bookworm-slim
ARG DEBIAN_IMAGE=debian:bookworm-slim

FROM --platform=$BUILDPLATFORM ${NODE_IMAGE} AS build
WORKDIR /src
COPY package.json package-lock.json .npmrc ./
RUN npm ci --no-audit --no-fund
COPY . .
ARG TARGETARCH
ARG PGTRICKLE_RELAY_COMMIT=unknown
RUN case "$TARGETARCH" in \
      amd64) target=linux-x64 ;; \
      arm64) target=linux-arm64 ;; \
      *) echo "no pgtrickle-relay build for architecture $TARGETARCH" >&2; exit 1 ;; \
    esac \
 && PGTRICKLE_RELAY_COMMIT="$PGTRICKLE_RELAY_COMMIT" scripts/build --target "$target" --outfile /out/pgtrickle-relay

FROM ${DEBIAN_IMAGE} AS rootfs
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY scripts/rootfs /usr/local/bin/pgtrickle-relay-rootfs
COPY --from=build /out/pgtrickle-relay /out/pgtrickle-relay
# The executable needs /proc, which a build step's chroot lacks: it is tried here in the stage itself.
RUN /out/pgtrickle-relay --version \
 && pgtrickle-relay-rootfs /rootfs /out/pgtrickle-relay

FROM scratch
COPY --from=rootfs /rootfs/ /
COPY --from=rootfs --chown=65532:65532 /rootfs/home/relay /home/relay
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    HOME=/home/relay
USER 65532:65532
ENTRYPOINT ["/pgtrickle-relay"]
CMD ["--help"]
LABEL org.opencontainers.image.title="pgtrickle-relay" \
      org.opencontainers.image.description="Relay between pg_trickle outbox/inbox tables and message brokers" \
      org.opencontainers.image.licenses="Apache-2.0"
