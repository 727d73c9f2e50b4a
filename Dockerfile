# syntax=docker/dockerfile:1
#
# eventsyncd container image.
#
#   docker build -t eventsyncd:dev .
#
# Stage 1 builds exactly what CI builds (`cargo build --release --locked --bin eventsyncd`);
# stage 2 is distroless (glibc + libgcc, no shell, no package manager), running as the
# image's non-root user 65532. Health checking is left to Kubernetes probes on the ops
# port (/healthz, /readyz), so there is no HEALTHCHECK.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS builder
WORKDIR /build

# Dependency layer: compile every dependency against stub sources, so that changing
# src/ does not rebuild the crates.io graph. Only Cargo.toml and Cargo.lock feed it.
# (If the crate gains a build.rs or explicitly declared [[test]]/[[bench]]/[[example]]
# targets, copy or stub them here too.)
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src/bin/eventsync-bench \
    && printf '//! stub\n' > src/lib.rs \
    && printf 'fn main() {}\n' > src/bin/eventsyncd.rs \
    && printf 'fn main() {}\n' > src/bin/eventsync-bench/main.rs \
    && cargo build --release --locked --bin eventsyncd \
    && rm -rf src

# The real build. touch: COPY keeps the context's mtimes, which may be older than the
# stub build above; cargo must see the real sources as newer. The debug info that
# [profile.release] keeps (debug = 1) is stripped from the shipped copy only; symbols
# stay, so backtraces still name functions.
COPY src ./src
RUN find src -name '*.rs' -exec touch {} + \
    && cargo build --release --locked --bin eventsyncd \
    && objcopy --strip-debug target/release/eventsyncd /eventsyncd

FROM gcr.io/distroless/cc-debian12:nonroot

LABEL org.opencontainers.image.title="eventsyncd" \
      org.opencontainers.image.description="MongoDB change streams to gap-free, versioned diff event logs, with a sync HTTP API" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=builder /eventsyncd /usr/local/bin/eventsyncd
# Default configuration; Kubernetes mounts the ConfigMap over /etc/eventsync, and every
# key can be overridden with EVENTSYNC__SECTION__KEY (e.g. EVENTSYNC__MONGODB__URI).
COPY config.toml /etc/eventsync/config.toml

# The repository's config.toml listens on 127.0.0.1 (for local runs); in a container
# both ports must listen on all interfaces. Environment overrides win over the file,
# so these also apply when Kubernetes mounts its own config.toml.
ENV EVENTSYNC__SYNC__LISTEN=0.0.0.0:8080 \
    EVENTSYNC__OPS__LISTEN=0.0.0.0:9090

# distroless "nonroot" user, numeric so that runAsNonRoot can verify it.
USER 65532:65532

# 8080: sync API (bearer tokens); 9090: /metrics, /healthz, /readyz.
EXPOSE 8080 9090

ENTRYPOINT ["/usr/local/bin/eventsyncd"]
CMD ["--config", "/etc/eventsync/config.toml"]
