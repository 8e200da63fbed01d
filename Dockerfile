# syntax=docker/dockerfile:1
# spliced in a container: built in a Rust image, run in a slim Debian one
# as a non-root user. Build: docker build -t spliced .
# Run:   docker run --rm -p 6432:6432 -p 9090:9090 -v $PWD/spliced.toml:/etc/spliced/spliced.toml:ro spliced
# See deploy/README.md.

FROM rust:1.88-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY examples ./examples
RUN cargo build --release --locked --bin spliced \
 && strip target/release/spliced

FROM debian:bookworm-slim
# bash (for the healthcheck's /dev/tcp) is in the base image; nothing else
# is installed.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin spliced \
 && install -d -o spliced -g spliced -m 0750 /run/spliced \
 && install -d -m 0755 /etc/spliced
COPY --from=build /src/target/release/spliced /usr/local/bin/spliced
COPY examples/mysql.toml /etc/spliced/spliced.toml
ENV SPLICED_CONFIG=/etc/spliced/spliced.toml \
    RUNTIME_DIRECTORY=/run/spliced \
    SPLICED_ADMIN_PORT=9090 \
    RUST_LOG=info
USER 10001:10001
# A liveness check: the admin endpoint's /livez answers 200 while the
# process serves, draining or not (/healthz turns 503 at SIGTERM, so a
# restart policy acting on it would kill a draining proxy). The default
# config (examples/mysql.toml) enables the admin endpoint on 0.0.0.0:9090;
# a config of your own must too. scripts/artifacts.sh runs this command
# against that config.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${SPLICED_ADMIN_PORT} && printf 'GET /livez HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
# SIGTERM drains (live relays finish within drain-timeout); give
# `docker stop -t 40` or more for long relays.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/spliced"]
CMD ["run"]
