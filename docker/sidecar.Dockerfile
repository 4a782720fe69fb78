# syntax=docker/dockerfile:1
# tollgate-sidecar. From the repository root:
#   docker build -f docker/sidecar.Dockerfile -t tollgate/sidecar:dev .
# The Lua scripts are compiled into the binary. Configuration comes from the environment
# (docs/configuration.md) and the routes file (TOLLGATE_SIDECAR_ROUTES), mounted at run time.

ARG RUST_VERSION=1.95.0

# Bookworm, like the distroless cc-debian12 runtime: the plain rust:1.95 tag is trixie, whose
# newer glibc the binary could come to depend on and the runtime image does not have.
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
ARG RUST_VERSION
# rust-toolchain.toml also lists rustfmt and clippy; naming the image's toolchain here keeps
# rustup from downloading components that a release build does not use.
ENV RUSTUP_TOOLCHAIN=${RUST_VERSION} CARGO_TERM_COLOR=never
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p tollgate-sidecar \
    && install -D -m 0755 target/release/tollgate-sidecar /out/tollgate-sidecar

# glibc and libgcc, CA certificates, no shell, uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/tollgate-sidecar /usr/local/bin/tollgate-sidecar
# 8080: the proxy. The admin listener (/healthz, /readyz, /metrics) stays on 127.0.0.1:9090
# unless TOLLGATE_SIDECAR_ADMIN_LISTEN says otherwise (Kubernetes sets 0.0.0.0:9090).
EXPOSE 8080
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/tollgate-sidecar"]
