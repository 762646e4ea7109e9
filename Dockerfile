# botgate in a container: a multi-stage build, a non-root user, the data folder as a volume and
# a health check on /readyz. Build: `docker build -t botgate .`; run:
#   docker run -p 8080:8080 -p 9464:9464 -v botgate-data:/var/lib/botgate \
#     -v $PWD/botgate.toml:/etc/botgate/botgate.toml:ro botgate --config /etc/botgate/botgate.toml
# Without --config the embedded demo configuration is served.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin botgate

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/botgate --shell /usr/sbin/nologin botgate \
    && mkdir -p /var/lib/botgate /etc/botgate \
    && chown botgate:botgate /var/lib/botgate \
    && chmod 0700 /var/lib/botgate
COPY --from=build /src/target/release/botgate /usr/local/bin/botgate
USER botgate
VOLUME ["/var/lib/botgate"]
ENV BOTGATE_DATA_DIR=/var/lib/botgate \
    BOTGATE_LISTEN=0.0.0.0:8080 \
    BOTGATE_ADMIN_LISTEN=0.0.0.0:9464 \
    BOTGATE_LOG_FORMAT=json
EXPOSE 8080 9464
# /readyz: the store is open and the node is not draining (503 otherwise).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD curl --fail --silent --show-error http://127.0.0.1:9464/readyz || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/botgate"]
