# One image, three binaries: fanout-processor (the default), fanout-pipeline
# and the client fanout. Pick one by naming it:
#
#   docker build -t fanout:0.1.0 .
#   docker run --rm -p 50052:50052 fanout:0.1.0                  # a processor
#   docker run --rm -p 50051:50051 fanout:0.1.0 fanout-pipeline \
#       --listen 0.0.0.0:50051 --processors http://PROCESSOR:50052
#
# The servers bind 127.0.0.1 unless told otherwise, which nothing outside the
# container can reach: give them --listen 0.0.0.0:PORT (or FANOUT_LISTEN), as
# the default command and deploy/kubernetes do.
#
# Both bases are pinned by version and digest (the multi-platform index), so a
# rebuild uses the same compiler and C library until someone moves the pin on
# purpose; `docker buildx imagetools inspect IMAGE:TAG` prints a newer digest.

# The builder's compiler is the one CI tests with (rustc 1.95.0; Cargo.toml's
# rust-version, 1.88, is only the floor). Bookworm, so that the binaries link
# against the glibc of the Debian 12 runtime below.
FROM rust:1.95.0-slim-bookworm@sha256:d7482085ff5b415f84dba5647ae71606650bdef00db7aeb69f4b3d170c3e4082 AS builder

WORKDIR /src

# Cargo.toml keeps line tables in release builds (debug = 1) for profiling;
# the image drops them (45 MB to 6 MB a binary) but keeps the symbols, so a
# backtrace still names its functions. Set for both builds below, so the
# cached dependencies match.
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo

# Dependencies first, in a layer of their own: the manifests, the lock file,
# build.rs and the proto, with empty crate roots. This layer is rebuilt only
# when one of those changes, not on every source edit. (The C compiler that
# mimalloc needs is in the slim image already; protox compiles the proto in
# Rust, so no protoc.)
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
RUN mkdir -p services/bin client \
    && touch services/lib.rs \
    && echo 'fn main() {}' > services/bin/pipeline.rs \
    && echo 'fn main() {}' > services/bin/processor.rs \
    && echo 'fn main() {}' > client/main.rs \
    && cargo build --release --locked \
        --bin fanout --bin fanout-pipeline --bin fanout-processor

# Then the sources. COPY keeps their modification times, which may be older
# than the placeholders just built, so the crate roots are touched: cargo
# then rebuilds the crate itself (and only it). README.md is there for the
# library's doctest include.
COPY services ./services
COPY client ./client
COPY README.md ./
RUN touch services/lib.rs services/bin/pipeline.rs services/bin/processor.rs client/main.rs \
    && cargo build --release --locked \
        --bin fanout --bin fanout-pipeline --bin fanout-processor \
    && mkdir -p /out \
    && cp target/release/fanout target/release/fanout-pipeline target/release/fanout-processor /out/

# Runtime: distroless cc (glibc, libgcc, CA roots, tzdata; no shell, no
# package manager), its nonroot variant. Nothing else is needed: the binaries
# write nothing but stdout/stderr, so a read-only root filesystem is fine.
FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f

LABEL org.opencontainers.image.title="fanout" \
      org.opencontainers.image.description="Dynamic fan-out / fan-in over gRPC: fanout-pipeline, fanout-processor and the fanout client" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"

# Root-owned and not writable by the user the servers run as.
COPY --from=builder /out/ /usr/local/bin/

# Numeric, so that Kubernetes' runAsNonRoot can check it (65532 is
# distroless' "nonroot").
USER 65532:65532

# 50051: fanout-pipeline; 50052: fanout-processor.
EXPOSE 50051 50052

# No ENTRYPOINT, so the first word picks the binary (an exec-form command,
# looked up on PATH, which includes /usr/local/bin: no shell involved).
# Kubernetes sets `command` instead (deploy/kubernetes).
CMD ["fanout-processor", "--listen", "0.0.0.0:50052"]
