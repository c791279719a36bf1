//! Throwaway Postgres, Redis and Kafka-compatible broker for integration tests: ours, and those of
//! applications that want to replay the WAL against their own mappings.
//!
//! Servers run from the machine's binaries on random free ports, in
//! temporary directories. Whatever happens to the test process, a reaper
//! process stops them and removes their directories (see [`reaper`]).
//!
//! Public with the `testkit` cargo feature (off by default; the crate's
//! own tests and benches turn it on). Without it, only the throwaway
//! Postgres and Redis of `evictd demo` are compiled.

#[cfg(feature = "testkit")]
mod evictd;
#[cfg(all(feature = "testkit", feature = "kafka"))]
mod kafka;
mod postgres;
#[cfg(feature = "testkit")]
mod profile;
pub mod reaper;
mod redis;
mod varnish;

#[cfg(feature = "testkit")]
pub use evictd::{current_wal_lsn, walsender_pid, Evictd};
#[cfg(all(feature = "testkit", feature = "kafka"))]
pub use kafka::{tansu_binary, Kafka, ReadRecord};
pub use postgres::{Postgres, Standby};
#[cfg(feature = "testkit")]
pub use profile::{cpu_by_process_name, peak_rss_kib, process_cpu_ticks, ThreadCpu};
pub use redis::{ping as redis_ping, Redis, RedisCluster};
pub use varnish::Varnish;

/// The crates the testkit's API speaks, at the versions it was built
/// with: a test that uses them from here never has to guess which
/// versions match (`#[evictd::testkit::deps::tokio::test(crate =
/// "evictd::testkit::deps::tokio")]`).
#[cfg(feature = "testkit")]
pub mod deps {
    pub use ::redis;
    pub use ::tokio;
    pub use ::tokio_postgres;
}

/// Why a throwaway server could not be started or used. Its `Debug` is
/// its message, so that `.unwrap()` in a test prints it as the CLI would
/// (a mapping error with its lines, not an escaped string).
#[derive(thiserror::Error)]
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

impl std::fmt::Debug for TestkitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")?;
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

impl TestkitError {
    fn io(what: &str, source: std::io::Error) -> TestkitError {
        TestkitError::Io {
            what: what.to_owned(),
            source,
        }
    }
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
