# syntax=docker/dockerfile:1
# Build evictd in a full Rust image, run it from a small Debian image.

FROM rust:1-bookworm AS build
# librdkafka (the Kafka source, the default `kafka` feature) is built from
# source: it needs make, perl, pkg-config and the OpenSSL and zlib headers,
# which this image carries.
WORKDIR /src
# Dependencies first, so that source edits do not rebuild them. The bench
# sources are declared in Cargo.toml, so they must exist (they are not built).
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
# The client crate is a workspace member and a dependency (the protocol it
# shares with evictd, its Lua scripts): copied whole, it changes rarely.
COPY client ./client
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
# Read at compile time (`include_str!`): the testkit's Varnish config.
COPY deploy/varnish/evictd.vcl ./deploy/varnish/evictd.vcl
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin evictd
COPY --from=build /src/target/release/evictd /usr/local/bin/evictd
COPY mappings /etc/evictd/mappings
COPY evictd.example.toml /etc/evictd/evictd.toml
USER evictd
# /metrics, /healthz, /readyz (admin.listen must bind 0.0.0.0 in a container)
EXPOSE 9187
ENTRYPOINT ["/usr/local/bin/evictd"]
CMD ["run", "--config", "/etc/evictd/evictd.toml"]
