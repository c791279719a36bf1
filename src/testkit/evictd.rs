//! evictd running in-process against throwaway (or any) servers, with
//! `sync()`: wait until everything committed so far is applied.

use std::sync::Arc;
use std::time::Duration;

use super::TestkitError;
use crate::change::Lsn;
use crate::config::Config;
use crate::lag::Lag;
use crate::mapping::{self, Mappings};
use crate::pipeline::{self, Options, Running};

/// A running evictd pipeline.
pub struct Evictd {
    running: Running,
    postgres_url: String,
    mappings: Arc<Mappings>,
    sync_timeout: Duration,
}

impl Evictd {
    /// Loads the mappings of `config.mappings.dir` and starts streaming
    /// (creating the slot and publication when absent).
    pub async fn start(config: &Config) -> Result<Evictd, TestkitError> {
        let mappings = mapping::load_dir(&config.mappings.dir, config.mappings.limits).map_err(
            |diagnostics| {
                let lines: Vec<String> = diagnostics.iter().map(ToString::to_string).collect();
                TestkitError::Start(format!("the mappings do not load:\n{}", lines.join("\n")))
            },
        )?;
        Evictd::start_with(config, Arc::new(mappings), Options::default()).await
    }

    /// Starts with already loaded mappings and explicit options.
    pub async fn start_with(
        config: &Config,
        mappings: Arc<Mappings>,
        options: Options,
    ) -> Result<Evictd, TestkitError> {
        let options = Options {
            // Learn idle progress quickly, so that sync() returns quickly.
            status_interval: options.status_interval.min(Duration::from_millis(20)),
            ..options
        };
        let postgres_url = config
            .postgres
            .url
            .as_ref()
            .ok_or_else(|| TestkitError::Start("postgres.url is not set".into()))?
            .expose()
            .to_owned();
        let running = pipeline::start(config, mappings.clone(), options)
            .map_err(|e| TestkitError::Start(format!("evictd did not start: {e}")))?;
        // Changes committed after start() returns must be seen: wait until
        // the slot exists and streams.
        let running = running
            .streaming_within(Duration::from_secs(30))
            .await
            .map_err(TestkitError::Start)?;
        Ok(Evictd {
            running,
            postgres_url,
            mappings,
            sync_timeout: Duration::from_secs(30),
        })
    }

    pub fn mappings(&self) -> &Mappings {
        &self.mappings
    }

    /// The L1 broadcast epoch of this run.
    pub fn epoch(&self) -> &str {
        &self.running.epoch
    }

    /// Waits until evictd has applied and acknowledged everything up to the
    /// database's current WAL position.
    pub async fn sync(&self) -> Result<Lsn, TestkitError> {
        self.sync_within(self.sync_timeout).await
    }

    /// [`Evictd::sync`] with its own timeout.
    pub async fn sync_within(&self, timeout: Duration) -> Result<Lsn, TestkitError> {
        let target = current_wal_lsn(&self.postgres_url).await?;
        let mut acked = self.running.acked.clone();
        let reached = async { acked.wait_for(|acked| *acked >= target).await.map(|_| ()) };
        let outcome = tokio::time::timeout(timeout, reached).await;
        match outcome {
            Ok(Ok(())) => Ok(target),
            Ok(Err(_)) => Err(TestkitError::Start(
                "evictd stopped before reaching the WAL position".into(),
            )),
            Err(_) => Err(TestkitError::Start(format!(
                "sync timed out after {timeout:?}: evictd acknowledged {} of {target}",
                *self.running.acked.borrow()
            ))),
        }
    }

    /// The lag of the batches applied so far.
    pub fn lag(&self) -> Lag {
        self.running
            .lag
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Row changes applied so far.
    pub fn changes_applied(&self) -> u64 {
        self.running.progress.borrow().changes
    }

    /// Stops gracefully (final status update) and waits.
    pub async fn stop(self) -> Result<(), TestkitError> {
        self.running.stop();
        self.running
            .wait()
            .await
            .map(drop)
            .map_err(|e| TestkitError::Start(format!("evictd failed: {e}")))
    }
}

/// The pid of the walsender serving `slot`, while one does.
pub async fn walsender_pid(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Option<u32>, TestkitError> {
    let row = client
        .query_one(
            "select active_pid from pg_replication_slots where slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(TestkitError::Postgres)?;
    Ok(row
        .get::<_, Option<i32>>(0)
        .and_then(|pid| u32::try_from(pid).ok()))
}

/// `pg_current_wal_insert_lsn()` (everything written so far, durable or not) of the database at `url`.
pub async fn current_wal_lsn(url: &str) -> Result<Lsn, TestkitError> {
    let url = crate::config::SecretUrl::parse(url).map_err(TestkitError::Start)?;
    let client = crate::catalog::connect(&url)
        .await
        .map_err(|e| TestkitError::Start(format!("connect for the WAL position: {e}")))?;
    let row = client
        .query_one("select pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(TestkitError::Postgres)?;
    let text: String = row.get(0);
    Lsn::parse(&text).ok_or_else(|| TestkitError::Start(format!("unexpected LSN `{text}`")))
}
