# syntax=docker/dockerfile:1
#
# redis-streamd container image.
#
#   docker build -t redis-streamd:0.1.0 .
#   docker run -d --name streamd --stop-timeout 45 \
#     -v "$PWD/config.toml:/etc/redis-streamd/config.toml:ro" \
#     -e REDIS_STREAMD_REDIS_URL=redis://redis:6379 \
#     redis-streamd:0.1.0
#
# The daemon runs as PID 1 without an init (no tini): it installs real handlers for
# SIGTERM/SIGINT (the kernel drops default-action signals to PID 1), and as PID 1 it is
# the reaper of every orphaned process in the container, so it reaps orphaned
# grandchildren of handlers itself (see src/reaper.rs) and the container never fills
# with zombies.

# ---- build stage ---------------------------------------------------------------------
# Same Debian release as the runtime stage, so the binary links against the same glibc.
FROM rust:1-bookworm AS builder
WORKDIR /src

# Dependency layer: build every dependency against placeholder sources, so this layer is
# rebuilt only when Cargo.toml or Cargo.lock change, not on every source edit.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

# The real sources. COPY keeps the files' own modification times, which can be older
# than the placeholder build; touch them so cargo rebuilds the crate itself.
COPY src ./src
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && cp target/release/redis-streamd /usr/local/bin/redis-streamd

# ---- runtime stage -------------------------------------------------------------------
FROM debian:bookworm-slim

# ca-certificates: rediss:// (TLS) connections. curl: the HEALTHCHECK below. Handlers
# that need more (python3, jq, ...) belong in an image layered on this one (see
# config/Dockerfile.handlers-example).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*

# A fixed, unprivileged account: the daemon and every handler it starts run as this user.
# Numeric ids in USER below let Kubernetes' runAsNonRoot check them without /etc/passwd.
RUN groupadd --system --gid 10001 redis-streamd \
    && useradd --system --uid 10001 --gid redis-streamd \
        --home-dir /var/lib/redis-streamd --create-home \
        --shell /usr/sbin/nologin redis-streamd \
    && mkdir -p /etc/redis-streamd

COPY --from=builder /usr/local/bin/redis-streamd /usr/local/bin/redis-streamd

USER 10001:10001
WORKDIR /var/lib/redis-streamd

# The metrics and health listener. It is off unless the config enables it:
#   [daemon]
#   metrics_listen = "0.0.0.0:9187"
EXPOSE 9187

# `docker stop` sends this, waits --stop-timeout (default 10s), then SIGKILLs. The daemon
# waits up to [daemon] shutdown_timeout (default 30s) for running handlers, plus 5s of
# SIGTERM grace for them and a few seconds for the last acks: run containers with
# --stop-timeout 45 (compose: stop_grace_period: 45s) or lower shutdown_timeout.
STOPSIGNAL SIGTERM

# /healthz answers 200 while the process is alive and serving. Needs metrics_listen (see
# above); without it, disable this check (`--no-healthcheck`, compose `healthcheck:
# disable: true`).
# (curl -f exits non-zero on a connection error or an HTTP error status: unhealthy.)
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:9187/healthz"]

ENTRYPOINT ["redis-streamd"]
CMD ["--config", "/etc/redis-streamd/config.toml"]
