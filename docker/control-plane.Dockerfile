# syntax=docker/dockerfile:1
# tollgate-control-plane. From the repository root:
#   docker build -f docker/control-plane.Dockerfile -t tollgate/control-plane:dev .
# The migrations are compiled into the binary (control-plane/build.rs), so the image holds one
# file. Subcommands: serve (the default), migrate, seed, admin create.

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
# The cache mounts keep the registry and compiled dependencies between builds; the binary is
# copied out in the same step, because a cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p tollgate-control-plane \
    && install -D -m 0755 target/release/tollgate-control-plane /out/tollgate-control-plane

# glibc and libgcc, CA certificates, no shell, uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/tollgate-control-plane /usr/local/bin/tollgate-control-plane
# The program's default (127.0.0.1) would be unreachable from outside the container.
ENV TOLLGATE_LISTEN=0.0.0.0:9001
EXPOSE 9001
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/tollgate-control-plane"]
CMD ["serve"]
