# syntax=docker/dockerfile:1
#
# One image for every Tally function: each binary of the workspace at
# /usr/local/bin/<name> (open-account, deposit, withdraw, close-account, forget-holder, get-account,
# get-balance, list-transactions, transfer, get-transfer, projector, transfer-saga,
# relay, migrate, gateway, admin), on a distroless, non-root runtime. A Deployment
# (charts/tally) or a compose service picks its binary with `command`; the default is
# the gateway (every public route in one process, embedded backends unless TALLY_*
# points at real ones).
#
#   docker build -t tally:dev .
#   docker run --rm -p 8080:8080 tally:dev                         # all-in-one gateway
#   docker run --rm tally:dev /usr/local/bin/admin --help          # any other binary
#
# Needs BuildKit (the default builder of Docker 23+): the cargo registry and the target
# directory live in cache mounts, so a rebuild after a code change compiles only what
# changed.

ARG RUST_VERSION=1.95.0
ARG DEBIAN_RELEASE=bookworm

# ---------------------------------------------------------------------------- builder
# Debian bookworm for the builder and the runtime alike: the binaries link against
# bookworm's glibc (2.36), which is what gcr.io/distroless/cc-debian12 ships.
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder

# Native build dependencies. The rust image (buildpack-deps) has most of them already;
# naming them keeps the build working if the base changes.
#  - rdkafka-sys builds librdkafka from its bundled source with librdkafka's own
#    configure script (mklove, bash) and GNU make: gcc, g++ (configure requires a C++
#    compiler), make, perl, pkg-config; python3 only for an optional linker script.
#    No cmake: the crate's `cmake-build` feature is off.
#  - ring (rustls' crypto for the S3 client and kube): a C compiler (its cc builder).
#  - zlib: built from source and linked statically by libz-sys (LIBZ_SYS_STATIC=1
#    below), because the distroless runtime has no libz.so.1.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential perl pkg-config python3 \
 && rm -rf /var/lib/apt/lists/*

# Link zlib statically (libz-sys builds it with cc): the binaries then need only glibc
# and libgcc_s at run time, both in distroless/cc. No sqlx query macros need a database
# at build time; SQLX_OFFLINE is set anyway so a future one fails fast instead of
# trying to connect.
ENV LIBZ_SYS_STATIC=1 \
    SQLX_OFFLINE=true \
    CARGO_TERM_COLOR=never \
    CARGO_TARGET_DIR=/build/target

WORKDIR /build
# Only what the build reads, so editing README.md, charts/ or k8s/ does not rebuild.
COPY Cargo.toml Cargo.lock ./
COPY shared ./shared
COPY functions ./functions

# The binaries every deployment expects; the build fails if one is missing.
ARG BINARIES="open-account deposit withdraw close-account forget-holder get-account get-balance list-transactions transfer get-transfer projector transfer-saga relay migrate gateway admin"

# Build every binary of the workspace (release profile: stripped, full LTO), then copy
# each executable cargo reports out of the cache-mounted target directory. The list
# comes from cargo's own artifact messages, so a new function is picked up without
# editing this file and stale binaries in the cache are never copied.
RUN --mount=type=cache,id=tally-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=tally-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=tally-target,target=/build/target,sharing=locked \
    set -eux; \
    cargo build --release --locked --workspace --bins \
      --message-format=json-render-diagnostics > /tmp/cargo-messages.json; \
    grep -o '"executable":"[^"]*"' /tmp/cargo-messages.json | cut -d'"' -f4 | sort -u > /tmp/binaries; \
    mkdir -p /out/bin; \
    while read -r binary; do install -m 0755 "$binary" /out/bin/; done < /tmp/binaries; \
    for name in ${BINARIES}; do \
      test -x "/out/bin/$name" || { echo "missing binary: $name (built: $(ls /out/bin | tr '\n' ' '))" >&2; exit 1; }; \
    done; \
    ls -l /out/bin

# ---------------------------------------------------------------------------- runtime
# distroless/cc: glibc, libgcc_s, libstdc++, libssl3, CA certificates, tzdata and a
# nonroot user (65532) — no shell, no package manager. The binaries need glibc and
# libgcc_s only (TLS is rustls on ring; zlib and librdkafka are static).
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="tally" \
      org.opencontainers.image.description="Tally, an event-sourced bank-account service: one binary per function at /usr/local/bin/<function>" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Tally" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"

COPY --from=builder /out/bin/ /usr/local/bin/

# The embedded backends (gateway without TALLY_* backends) keep their data under
# ./.data: the nonroot user's home is writable.
WORKDIR /home/nonroot
USER 65532:65532
ENV RUST_LOG=info \
    HOST=0.0.0.0 \
    PORT=8080
EXPOSE 8080
STOPSIGNAL SIGTERM
# Every binary checks itself: `<binary> probe` asks 127.0.0.1:$PORT/readyz (no shell or
# curl in the image). A Deployment uses its own probes instead.
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/gateway", "probe"]
CMD ["/usr/local/bin/gateway"]
