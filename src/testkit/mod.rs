//! Throwaway Postgres, Redis and Kafka-compatible broker for integration tests: ours, and those of
//! applications that want to replay the WAL against their own mappings.
//!
//! Servers run from the machine's binaries on random free ports, in
//! temporary directories. Whatever happens to the test process, a reaper
//! process stops them and removes their directories (see [`reaper`]).
//!
//! Enabled by the `testkit` cargo feature.

mod evictd;
mod kafka;
mod postgres;
pub mod reaper;
mod redis;

pub use evictd::{current_wal_lsn, Evictd};
pub use kafka::{tansu_binary, Kafka, ReadRecord};
pub use postgres::Postgres;
pub use redis::{ping as redis_ping, Redis, RedisCluster};

/// Why a throwaway server could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    #[error("cannot {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Start(String),
    #[error("postgres")]
    Postgres(#[source] tokio_postgres::Error),
}

impl TestkitError {
    fn io(what: &str, source: std::io::Error) -> TestkitError {
        TestkitError::Io {
            what: what.to_owned(),
            source,
        }
    }
}

/// Peak resident memory (VmHWM) of process `pid`, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A TCP port that was free a moment ago.
fn free_port() -> Result<u16, TestkitError> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| TestkitError::io("find a free port", e))?;
    let port = listener
        .local_addr()
        .map_err(|e| TestkitError::io("find a free port", e))?
        .port();
    Ok(port)
}
