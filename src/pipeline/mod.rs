//! The running pipeline, the same for every source:
//!
//! ```text
//! source --Event--> batcher (map + plan) --Plan--> apply (Redis + L1) --Progress--> source acks
//! ```
//!
//! - the source's task reads, decodes into [`crate::change::Event`]s and
//!   feeds the `batcher`, the one place changes are mapped and planned
//!   (`crate::source::postgres::replication` and its supervisor, or
//!   `crate::source::kafka::session`);
//! - the apply task (`crate::apply`) sends each plan to Redis with its L1
//!   broadcast, retrying until it succeeds, and publishes [`Progress`]: the
//!   checkpoints (WAL position, Kafka offsets) the source may acknowledge.
//!
//! Acknowledgement is a value flowing back (a `watch` of [`Progress`]),
//! never a side effect of reading. This module holds what the sources share:
//! `start`, `Running`, the apply stage's channels (`Stages`) and the
//! schema health behind `/readyz` (`schema`).

pub(crate) mod batcher;
pub(crate) mod reload;
pub(crate) mod schema;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use self::schema::{Problems, SchemaHealth};
use crate::apply::broadcast::Broadcast;
pub use crate::apply::Progress;
use crate::apply::{self, RedisSink};
use crate::change::Lsn;
use crate::config::{Config, MappingsConfig, SourceKind};
use crate::continuity;
use crate::error::{Error, ErrorKind};
use crate::lag::Lag;
use crate::mapping::message::{self, Secrets};
use crate::mapping::Mappings;
use crate::plan::Plan;
#[cfg(feature = "kafka")]
use crate::source::kafka;
use crate::source::postgres;

/// Plans queued between the replication and apply tasks.
const PLAN_CHANNEL_CAPACITY: usize = 4;

/// Knobs that are not in the config file.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// How often a standby status update is sent (and a keepalive asked for).
    pub status_interval: Duration,
    /// Stop once everything up to this position is applied.
    pub until: Option<Lsn>,
    /// The Postgres slot was re-created on purpose (`evictd init
    /// --reset-slot`): invalidate every mapped table coarsely before
    /// streaming, whatever the continuity record says.
    pub reset: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            status_interval: Duration::from_secs(1),
            until: None,
            reset: false,
        }
    }
}

/// Whether the source is streaming, and if not, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceState {
    Connecting,
    Streaming,
    /// Waiting to reconnect after this error.
    Interrupted(String),
    Ended,
}

/// Why a pipeline ended without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    Stopped,
    /// `evictd replay --until-lsn` reached its position.
    ReachedUntil,
}

/// A running pipeline.
pub struct Running {
    /// The source's state, for readiness and for waiting until streaming.
    pub source: watch::Receiver<SourceState>,
    /// Whether Redis answers (`None`) or why not.
    pub redis: watch::Receiver<Option<String>>,
    /// Why a batch waits long for its transactions to become visible on
    /// the primary (`None`: none does).
    pub visibility: watch::Receiver<Option<String>>,
    /// Why the read replicas hold batches too long, or cannot be asked
    /// (`None`: they keep up, or there are none).
    pub replicas: watch::Receiver<Option<String>>,
    /// The purge targets that refuse purges until someone acts, by name,
    /// with the reason and a hint.
    pub purge_refusals: watch::Receiver<std::collections::BTreeMap<String, String>>,
    /// What is wrong between the mappings and the live schema.
    pub schema: watch::Receiver<Problems>,
    /// What apply has finished.
    pub progress: watch::Receiver<Progress>,
    /// Postgres: the flush position last reported to the server. (Kafka
    /// acknowledges by committing the group's offsets, which the broker
    /// holds; what apply finished is `progress.offsets`.)
    pub acked: watch::Receiver<Lsn>,
    pub lag: Arc<Mutex<Lag>>,
    pub epoch: String,
    /// The mappings in effect (a reload replaces them at a transaction
    /// boundary).
    pub mappings: watch::Receiver<Arc<Mappings>>,
    /// Where apply offers each applied plan to the console's live stream
    /// (`admin.console`).
    pub console: Option<crate::console::Tap>,
    stop: watch::Sender<bool>,
    reload: ReloadHandle,
    task: JoinHandle<Result<Ended, Error>>,
}

impl Running {
    /// Waits until the source streams. If it ends first or `timeout`
    /// passes, stops the pipeline and says why (the state it was in, and the
    /// error it ended with).
    pub async fn streaming_within(self, timeout: Duration) -> Result<Running, String> {
        let mut source = self.source.clone();
        let streaming = async {
            let state = source
                .wait_for(|state| matches!(state, SourceState::Streaming | SourceState::Ended))
                .await;
            state.is_ok_and(|state| *state == SourceState::Streaming)
        };
        if tokio::time::timeout(timeout, streaming)
            .await
            .unwrap_or(false)
        {
            return Ok(self);
        }
        let state = self.source.borrow().clone();
        self.stop();
        let error = self
            .wait()
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        Err(
            format!("evictd did not start streaming ({state:?}) {error}")
                .trim_end()
                .to_owned(),
        )
    }

    /// Asks for the mapping files to be read, checked and, if they pass,
    /// put in effect now (SIGHUP under `evictd run`), whether or not they
    /// changed; the outcome is logged and counted in
    /// `evictd_mapping_reloads_total`.
    pub fn reload(&self) {
        self.reload.reload();
    }

    /// What asks for a reload, for a task of its own (a signal handler).
    pub fn reload_handle(&self) -> ReloadHandle {
        self.reload.clone()
    }

    /// Asks the pipeline to stop: it finishes or abandons the batch in
    /// flight and sends a final status update.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Waits for the pipeline to end.
    pub async fn wait(self) -> Result<Ended, Error> {
        match self.task.await {
            Ok(result) => result,
            Err(join) => Err(Error::with_source(
                ErrorKind::Shutdown,
                "the pipeline task failed",
                join,
            )),
        }
    }
}

/// Asks a running pipeline to reload its mappings (see [`Running::reload`]).
#[derive(Clone)]
pub struct ReloadHandle(Arc<Notify>);

impl ReloadHandle {
    pub fn reload(&self) {
        self.0.notify_one();
    }
}

/// Starts the tasks on the current tokio runtime (call it from inside
/// one). Connecting happens in the background, with retries: `wait` reports
/// what retrying could not fix, `streaming_within` when streaming began.
pub fn start(config: &Config, mappings: Arc<Mappings>, options: Options) -> Result<Running, Error> {
    match config.source {
        SourceKind::Postgres => postgres::start(config, mappings, options),
        #[cfg(feature = "kafka")]
        SourceKind::Kafka => kafka::start(config, mappings, options),
        #[cfg(not(feature = "kafka"))]
        SourceKind::Kafka => {
            drop((mappings, options));
            Err(Error::new(
                ErrorKind::Config,
                "source.kind = \"kafka\", but this evictd was built without the `kafka` feature",
            ))
        }
    }
}

/// What both sources share: the apply task (with its Redis sink and L1
/// broadcast) and the ends of the channels around it that the source's
/// task keeps.
pub(crate) struct Stages {
    pub plans: mpsc::Sender<Plan>,
    /// With the Postgres source, the continuity record the sink writes.
    pub continuity: Option<continuity::Store>,
    pub progress: watch::Receiver<Progress>,
    pub stop: watch::Receiver<bool>,
    pub source: watch::Sender<SourceState>,
    /// What is wrong between the mappings and the live schema (the
    /// Postgres source runs the live catalog checks).
    pub schema: SchemaHealth,
    /// The mappings in effect; the reloader sends new ones.
    pub mappings: watch::Receiver<Arc<Mappings>>,
    /// The secrets SQL messages must be signed with, as read at start.
    pub secrets: Secrets,
    pub apply_task: JoinHandle<Result<(), Error>>,
}

/// The other ends, which [`Running`] hands out.
pub(crate) struct Handles {
    source: watch::Receiver<SourceState>,
    redis: watch::Receiver<Option<String>>,
    visibility: watch::Receiver<Option<String>>,
    replicas: watch::Receiver<Option<String>>,
    purge_refusals: watch::Receiver<std::collections::BTreeMap<String, String>>,
    schema: watch::Receiver<Problems>,
    progress: watch::Receiver<Progress>,
    lag: Arc<Mutex<Lag>>,
    epoch: String,
    mappings: watch::Receiver<Arc<Mappings>>,
    console: Option<crate::console::Tap>,
    stop: watch::Sender<bool>,
    reload: Arc<Notify>,
}

impl Stages {
    /// Creates the channels and starts the apply task and the mappings'
    /// reloader.
    pub fn start(config: &Config, mappings: Arc<Mappings>) -> Result<(Stages, Handles), Error> {
        let secrets = read_message_secrets(&config.mappings)?;
        let broadcast = Broadcast::new(&config.redis.l1_channel, config.redis.l1_log_len);
        let epoch = broadcast.epoch().to_owned();
        let continuity = (config.source == SourceKind::Postgres)
            .then(|| continuity::Store::new(&config.redis, &config.postgres.slot));
        let sink = RedisSink::new(
            &config.redis,
            broadcast,
            continuity.as_ref().map(continuity::Store::recorder),
        )?;
        let (plans_tx, plans_rx) = mpsc::channel(PLAN_CHANNEL_CAPACITY);
        let (progress_tx, progress_rx) = watch::channel(Progress::default());
        let (stop_tx, stop_rx) = watch::channel(false);
        let (source_tx, source_rx) = watch::channel(SourceState::Connecting);
        let (redis_tx, redis_rx) = watch::channel(None);
        let lag = Arc::new(Mutex::new(Lag::default()));
        let (live_tx, live_rx) = watch::channel(mappings);
        let (schema, schema_rx) = SchemaHealth::new();
        let reload = Arc::new(Notify::new());
        reload::spawn(
            config,
            live_tx,
            schema.clone(),
            reload.clone(),
            stop_rx.clone(),
        );
        let audit = crate::audit::start(
            config,
            live_rx.clone(),
            progress_rx.clone(),
            stop_rx.clone(),
        );
        let (refusals_tx, refusals_rx) = watch::channel(std::collections::BTreeMap::new());
        let purger = crate::purge::Purger::new(&config.purge, &refusals_tx)?;
        let (visibility_tx, visibility_rx) = watch::channel(None);
        // With the Kafka source too, when a Postgres connection is
        // configured: Debezium's events name their transaction (txId).
        let gate = match &config.postgres.url {
            Some(url) if config.postgres.visibility_gate => {
                Some(apply::visibility::Visibility::new(
                    url.clone(),
                    Duration::from_millis(config.postgres.visibility_warn_ms),
                    visibility_tx,
                    !config.postgres.replicas.is_empty(),
                ))
            }
            _ => None,
        };
        let (replicas_tx, replicas_rx) = watch::channel(None);
        let replicas = apply::replica::Setup::new(&config.postgres, replicas_tx);
        let console = config.admin.console.then(crate::console::Tap::default);
        let apply_task = tokio::spawn(apply::run(
            sink,
            plans_rx,
            progress_tx,
            redis_tx,
            lag.clone(),
            stop_rx.clone(),
            apply::ApplyStages {
                audit,
                purger,
                gate,
                replicas,
                console: console.clone(),
            },
        ));
        let stages = Stages {
            plans: plans_tx,
            continuity,
            progress: progress_rx.clone(),
            stop: stop_rx,
            source: source_tx,
            schema,
            mappings: live_rx.clone(),
            secrets,
            apply_task,
        };
        let handles = Handles {
            source: source_rx,
            redis: redis_rx,
            visibility: visibility_rx,
            replicas: replicas_rx,
            purge_refusals: refusals_rx,
            schema: schema_rx,
            progress: progress_rx,
            lag,
            epoch,
            mappings: live_rx,
            console,
            stop: stop_tx,
            reload,
        };
        Ok((stages, handles))
    }
}

impl Handles {
    /// The running pipeline of `task`; `acked` is the flush position the
    /// source reports (the Postgres source's).
    pub fn running(
        self,
        task: JoinHandle<Result<Ended, Error>>,
        acked: watch::Receiver<Lsn>,
    ) -> Running {
        Running {
            source: self.source,
            redis: self.redis,
            visibility: self.visibility,
            replicas: self.replicas,
            purge_refusals: self.purge_refusals,
            schema: self.schema,
            progress: self.progress,
            acked,
            lag: self.lag,
            epoch: self.epoch,
            mappings: self.mappings,
            console: self.console,
            stop: self.stop,
            reload: ReloadHandle(self.reload),
            task,
        }
    }
}

/// Reads the secrets SQL messages are signed with
/// (`mappings.sql_messages_secret_*`); one that cannot be read is a config
/// error, and with messages on but no secret, a WARN says they are not
/// authenticated.
pub fn read_message_secrets(config: &MappingsConfig) -> Result<Secrets, Error> {
    let secrets = config
        .sql_messages_secrets
        .iter()
        .map(|secret| {
            secret.read().map_err(|reason| {
                Error::new(
                    ErrorKind::Config,
                    format!("mappings.sql_messages_secret: {reason}"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if config.sql_messages && secrets.is_empty() {
        tracing::warn!("{}", message::UNSIGNED_WARNING);
    }
    Ok(Secrets::new(&secrets))
}

/// How long the end of a pipeline waits for apply to finish what it holds.
const APPLY_DRAIN_BOUND: Duration = Duration::from_secs(10);

/// Waits (bounded) for the apply task once the plan channel is closed; its
/// error, if it failed. Past the bound, what it held is read again on the
/// next start, since it was never acknowledged.
pub(crate) async fn finish_apply(apply_task: JoinHandle<Result<(), Error>>) -> Result<(), Error> {
    match tokio::time::timeout(APPLY_DRAIN_BOUND, apply_task).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(Error::with_source(
            ErrorKind::Shutdown,
            "the apply task failed",
            join,
        )),
        Err(_) => Ok(()),
    }
}
