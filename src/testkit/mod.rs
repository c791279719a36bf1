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

pub use evictd::{current_wal_lsn, walsender_pid, Evictd};
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

/// CPU time (utime + stime, in clock ticks) of each thread of this process,
/// for benches that want to say which thread bounds a number.
#[derive(Clone, Debug, Default)]
pub struct ThreadCpu(std::collections::HashMap<u32, (String, u64)>);

impl ThreadCpu {
    /// Reads `/proc/self/task/*/stat` (empty where there is no procfs).
    pub fn sample() -> ThreadCpu {
        let mut threads = std::collections::HashMap::new();
        let tasks = std::fs::read_dir("/proc/self/task").into_iter().flatten();
        for entry in tasks.flatten() {
            let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Some(named) = stat_ticks(&entry.path().join("stat")) {
                threads.insert(tid, named);
            }
        }
        ThreadCpu(threads)
    }

    /// Ticks spent since `earlier`, summed by thread name.
    pub fn since(&self, earlier: &ThreadCpu) -> std::collections::BTreeMap<String, u64> {
        let mut by_name = std::collections::BTreeMap::new();
        for (tid, (name, ticks)) in &self.0 {
            let before = earlier.0.get(tid).map_or(0, |(_, t)| *t);
            *by_name.entry(name.clone()).or_default() += ticks.saturating_sub(before);
        }
        by_name
    }
}

/// CPU time (utime + stime, in clock ticks) of process `pid` so far; 0 when
/// it cannot be read.
pub fn process_cpu_ticks(pid: u32) -> u64 {
    stat_ticks(std::path::Path::new(&format!("/proc/{pid}/stat"))).map_or(0, |(_, ticks)| ticks)
}

/// CPU time (clock ticks) of every process on the machine, summed by
/// process name (`postgres`, `pgbench`, `redis-server`, ...): with two
/// samples, who used the CPU while a bench ran.
pub fn cpu_by_process_name() -> std::collections::BTreeMap<String, u64> {
    let mut by_name = std::collections::BTreeMap::new();
    let processes = std::fs::read_dir("/proc").into_iter().flatten().flatten();
    for entry in processes {
        if entry.file_name().to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        if let Some((name, ticks)) = stat_ticks(&entry.path().join("stat")) {
            *by_name.entry(name).or_default() += ticks;
        }
    }
    by_name
}

/// The name and utime + stime of a `/proc/.../stat` file.
fn stat_ticks(path: &std::path::Path) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(path).ok()?;
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let fields: Vec<&str> = stat.get(close + 2..)?.split(' ').collect();
    let field = |i: usize| fields.get(i).and_then(|t| t.parse::<u64>().ok());
    Some((stat[open + 1..close].to_owned(), field(11)? + field(12)?))
}
