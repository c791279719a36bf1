//! evictd running in-process against throwaway (or any) servers, on either
//! source, with `sync()`: wait until everything written so far is applied.

use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "kafka")]
use super::kafka::Client;
use super::TestkitError;
use crate::change::{Checkpoint, Lsn};
#[cfg(feature = "kafka")]
use crate::change::{Offsets, Partition};
use crate::config::{Config, SourceKind};
use crate::lag::Lag;
use crate::mapping::{self, Mappings};
use crate::pipeline::{Options, Running};
use crate::source::postgres::control::Control;

/// A running evictd pipeline, on either source.
pub struct Evictd {
    running: Running,
    source: Source,
    sync_timeout: Duration,
}

/// What [`Evictd::sync`] waits for.
enum Source {
    /// The acknowledged position reaches the database's current WAL
    /// position.
    Postgres { url: String },
    /// The group's committed offsets reach the end of every topic.
    #[cfg(feature = "kafka")]
    Kafka {
        client: Client,
        group: String,
        topics: Vec<String>,
    },
}

impl Evictd {
    /// Loads the mappings of `config.mappings.dir` and starts the source
    /// `config.source` names: streaming from Postgres (creating the slot and
    /// publication when absent), or consuming the Kafka topics once the
    /// group has assigned this member its partitions.
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
        let source = match (config.source, &config.kafka) {
            (SourceKind::Postgres, _) => Source::Postgres {
                url: config
                    .postgres
                    .url
                    .as_ref()
                    .ok_or_else(|| TestkitError::Start("postgres.url is not set".into()))?
                    .expose()
                    .to_owned(),
            },
            #[cfg(feature = "kafka")]
            (SourceKind::Kafka, Some(kafka)) => Source::Kafka {
                client: Client {
                    brokers: kafka.brokers.clone(),
                },
                group: kafka.group_id.clone(),
                topics: kafka.topics.clone(),
            },
            #[cfg(feature = "kafka")]
            (SourceKind::Kafka, None) => {
                return Err(TestkitError::Start("[kafka] is not set".into()))
            }
            #[cfg(not(feature = "kafka"))]
            (SourceKind::Kafka, _) => {
                return Err(TestkitError::Start(
                    "the Kafka source needs evictd's `kafka` feature".into(),
                ))
            }
        };
        let running = crate::service::Service::start(config, mappings, options, None)
            .map_err(|e| TestkitError::Start(format!("evictd did not start: {e}")))?
            .running;
        // Changes committed after start() returns must be seen: wait until
        // the slot exists and streams (or the partitions are assigned).
        let running = running
            .streaming_within(Duration::from_secs(60))
            .await
            .map_err(TestkitError::Start)?;
        Ok(Evictd {
            running,
            source,
            sync_timeout: Duration::from_secs(30),
        })
    }

    /// The pipeline itself: its progress, source state, lag.
    pub fn running(&self) -> &Running {
        &self.running
    }

    /// The mappings in effect (a reload replaces them).
    pub fn mappings(&self) -> Arc<Mappings> {
        self.running.mappings.borrow().clone()
    }

    /// The L1 broadcast epoch of this run.
    pub fn epoch(&self) -> &str {
        &self.running.epoch
    }

    /// Waits until evictd has applied and acknowledged everything written
    /// so far: on Postgres, up to the database's current WAL position; on
    /// Kafka, every record of the topics (the group committed their ends).
    /// Returns that position.
    /// Reads, checks and applies the mapping files now (what SIGHUP does
    /// under `evictd run`); the files are also watched, see
    /// `mappings.watch`.
    pub fn reload_mappings(&self) {
        self.running.reload();
    }

    pub async fn sync(&self) -> Result<Checkpoint, TestkitError> {
        self.sync_within(self.sync_timeout).await
    }

    /// [`Evictd::sync`] with its own timeout.
    pub async fn sync_within(&self, timeout: Duration) -> Result<Checkpoint, TestkitError> {
        match &self.source {
            Source::Postgres { url } => self.sync_postgres(url, timeout).await,
            #[cfg(feature = "kafka")]
            Source::Kafka {
                client,
                group,
                topics,
            } => sync_kafka(client, group, topics, timeout).await,
        }
    }

    async fn sync_postgres(
        &self,
        url: &str,
        timeout: Duration,
    ) -> Result<Checkpoint, TestkitError> {
        let target = current_wal_lsn(url).await?;
        let mut acked = self.running.acked.clone();
        let reached = async { acked.wait_for(|acked| *acked >= target).await.map(|_| ()) };
        let outcome = tokio::time::timeout(timeout, reached).await;
        match outcome {
            Ok(Ok(())) => Ok(Checkpoint::Lsn(target)),
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

/// Waits until `group` committed the end of every partition of `topics`.
#[cfg(feature = "kafka")]
async fn sync_kafka(
    client: &Client,
    group: &str,
    topics: &[String],
    timeout: Duration,
) -> Result<Checkpoint, TestkitError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut target = Offsets::default();
    for topic in topics {
        if topic.starts_with('^') {
            return Err(TestkitError::Start(format!(
                "sync cannot list the topics of the pattern `{topic}`: name the topics"
            )));
        }
        let end = client.end_offsets(topic)?;
        loop {
            // Equal, not at least: a group that committed past the end (its
            // records deleted) has not read what is there now.
            if client.committed(group, topic)? == end {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                let committed = client.committed(group, topic)?;
                return Err(TestkitError::Start(format!(
                    "sync timed out after {timeout:?}: group {group} committed {committed:?} of {topic}, not its end {end:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for (partition, end) in (0..).zip(end) {
            let partition = Partition {
                topic: topic.as_str().into(),
                partition,
            };
            target.0.insert(partition, end);
        }
    }
    Ok(Checkpoint::Offsets(target))
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
    let control = Control::database(&url)
        .await
        .map_err(|e| TestkitError::Start(format!("connect for the WAL position: {e}")))?;
    control
        .current_wal_insert_lsn()
        .await
        .map_err(|e| TestkitError::Start(format!("read the WAL position: {e}")))
}
