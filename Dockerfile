# syntax=docker/dockerfile:1
#
# One image, three binaries:
#   kvstore-api    the storage node; pods run `kvstore-api from-hostname /etc/cavi/config.yaml`
#   cavi-operator  the CaviCluster controller; its Deployment runs `cavi-operator run`
#   cavi           the command-line client (`kubectl exec <pod> -- cavi ...`, or
#                  `docker run --rm --entrypoint cavi cavi:dev --help`)
#
# Build:  docker build -t cavi:dev .
# Needs BuildKit (the default builder of current Docker releases) for the cache mounts.

# The builder and the runtime base share one Debian release (bookworm = Debian 12),
# so the glibc the binaries link against is the one they run with.
ARG RUST_VERSION=1.95
ARG DEBIAN_CODENAME=bookworm

FROM docker.io/library/rust:${RUST_VERSION}-slim-${DEBIAN_CODENAME} AS build
WORKDIR /src
# The whole workspace (see .dockerignore for what stays out): Cargo resolves every
# member, so copying only some crates would break the build when one is added.
COPY . .
# --locked: build exactly the committed Cargo.lock, fail instead of resolving anew.
# The registry and target directory are BuildKit cache mounts, so rebuilds after a
# source change only recompile what changed; the binaries are copied out of the
# cache mount in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin kvstore-api --bin cavi-operator --bin cavi \
 && install -D -m 0755 -t /out target/release/kvstore-api target/release/cavi-operator target/release/cavi

# distroless/cc: glibc, libgcc, CA certificates and tzdata, no shell, no package
# manager. The :nonroot variant's default user is 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ /usr/local/bin/
# Numeric, so the kubelet can verify runAsNonRoot without reading /etc/passwd.
USER 65532:65532
# 3100: the node's client/peer HTTP port; 8080: the operator's admin port
# (/healthz, /readyz, /metrics).
EXPOSE 3100 8080
# The node is the entrypoint, for `docker run cavi:dev <shard> <config>`. Pods do
# not rely on it: the operator's StatefulSet sets `command: ["kvstore-api"]` and
# its Deployment `command: ["cavi-operator", "run"]`.
ENTRYPOINT ["kvstore-api"]
CMD ["--help"]
