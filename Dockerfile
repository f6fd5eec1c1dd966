# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, run in a slim Debian image as
# a non-root user with the data directory on a volume.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Build dependencies first so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && echo '' > src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin kpay \
    && mkdir -p /app /data \
    && chown kpay:kpay /data
WORKDIR /app
COPY --from=build /src/target/release/kpay /usr/local/bin/kpay
COPY static ./static
COPY config ./config
USER kpay
# Listening beyond loopback needs tokens: run with e.g.
#   -e KPAY_TOKENS='<long-secret>:operator,<another>:teller'
# Without any, kpay is in protected mode and refuses to start on 0.0.0.0.
# On a Kafka cluster instead of the embedded log: -e KPAY_KAFKA_BROKERS=broker:9092
ENV KPAY_SERVER__LISTEN=0.0.0.0:8080 \
    KPAY_DATA__DIR=/data
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
# SIGTERM starts a graceful drain; give it time before the engine kills.
STOPSIGNAL SIGTERM
ENTRYPOINT ["kpay"]
CMD ["serve"]
