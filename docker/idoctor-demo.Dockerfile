# syntax=docker/dockerfile:1
# idoctor-demo, the stand-in app that Tollgate's examples sell. From the repository root:
#   docker build -f docker/idoctor-demo.Dockerfile -t tollgate/idoctor-demo:dev .
# It listens on IDOCTOR_LISTEN (default 127.0.0.1:4200): reachable only from its own pod, where
# the sidecar forwards to it.

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
    cargo build --release --locked -p tollgate-demo-idoctor \
    && install -D -m 0755 target/release/idoctor-demo /out/idoctor-demo

# glibc and libgcc, no shell, uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/idoctor-demo /usr/local/bin/idoctor-demo
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/idoctor-demo"]
