# syntax=docker/dockerfile:1
# Spool: one image for every executor (`spool serve`) and for one-off commands
# (`docker run ... spool migrate`, `spool runs list`, ...).

# ---- build ------------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# The cache mounts keep the registry and the target directory between builds; the binary is
# copied out of the cached target directory because a cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin spool \
    && install -m 0755 target/release/spool /usr/local/bin/spool

# ---- runtime ----------------------------------------------------------------------------------
FROM debian:bookworm-slim
# ca-certificates: TLS to PostgreSQL (sslmode=require/verify-*) and to NATS uses the system roots.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 spool \
    && useradd --system --uid 10001 --gid spool --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin spool
COPY --from=builder /usr/local/bin/spool /usr/local/bin/spool
# numeric, so that runAsNonRoot policies can verify it
USER 10001:10001
# Inside a container the API must listen on all interfaces. Spool refuses a non-loopback address
# without SPOOL_API_TOKEN (or --allow-unauthenticated), so set a token when you run the image.
ENV SPOOL_LISTEN=0.0.0.0:8080
EXPOSE 8080
# spool runs as PID 1 and handles SIGTERM itself: it stops claiming, lets in-flight runs finish
# within SPOOL_GRACE_PERIOD_MS (default 10 s), releases the rest to the queue (another executor
# continues them from their last memoized step) and exits. Give the container a longer stop
# timeout than the grace period.
ENTRYPOINT ["spool"]
CMD ["serve"]
