//! How evictd reaches its servers, one constructor each: Redis (standalone
//! or Cluster, TLS, the password) here, Postgres catalog connections in
//! [`crate::catalog::connect`].

use evictd_client::Connection;

use crate::config::RedisConfig;
use crate::error::{Error, ErrorKind};

/// A client for one Redis server, with the TLS files of `config` for
/// `rediss://`.
pub fn redis_client(config: &RedisConfig) -> Result<redis::Client, Error> {
    let url = config.url.expose();
    let invalid = |e| Error::with_source(ErrorKind::Config, "invalid redis.url", e);
    if config.ca_file.is_none() && config.cert_file.is_none() {
        return redis::Client::open(url).map_err(invalid);
    }
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            Error::with_source(
                ErrorKind::Config,
                format!("cannot read {}", path.display()),
                e,
            )
        })
    };
    let client_tls = match (&config.cert_file, &config.key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read(cert)?,
            client_key: read(key)?,
        }),
        _ => None,
    };
    let root_cert = config.ca_file.as_deref().map(read).transpose()?;
    redis::Client::build_with_tls(
        url,
        redis::TlsCertificates {
            client_tls,
            root_cert,
        },
    )
    .map_err(invalid)
}

/// The seed nodes of a `redis+cluster://host:port[,host:port...]` URL as
/// `redis://` URLs, or `None` for a URL that is not a cluster's.
pub fn cluster_seeds(url: &str) -> Option<Vec<String>> {
    let seed = url.strip_prefix("redis+cluster://")?;
    Some(
        seed.trim_end_matches('/')
            .split(',')
            .map(|node| format!("redis://{node}"))
            .collect(),
    )
}

/// A connection for readers of any key (the checker, `status`, `audit`).
pub async fn connect_redis(config: &RedisConfig) -> Result<Connection, Error> {
    let url = config.url.expose();
    if let Some(nodes) = cluster_seeds(url) {
        let client = redis::cluster::ClusterClient::new(nodes)
            .map_err(|e| Error::redis("invalid redis.url", e))?;
        let connection = client
            .get_async_connection()
            .await
            .map_err(|e| Error::redis("cannot connect to the Redis Cluster", e))?;
        return Ok(Connection::Cluster(connection));
    }
    let client = redis_client(config)?;
    let connection = redis::aio::ConnectionManager::new(client)
        .await
        .map_err(|e| Error::redis("cannot connect to Redis", e))?;
    Ok(Connection::Single(connection))
}
