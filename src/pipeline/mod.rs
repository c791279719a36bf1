//! The running pipeline: source -> map -> plan -> apply -> broadcast -> ack.
//!
//! Two tasks joined by a bounded channel of plans:
//! - the replication task ([`replication`]) reads the slot, decodes, maps
//!   and plans ([`batcher`]), and sends standby status updates;
//! - the apply task ([`crate::apply`]) sends each plan to Redis with its L1
//!   broadcast, retrying until it succeeds, and publishes [`Progress`].
//!
//! Acknowledgement is a value flowing back (a `watch` of [`Progress`]),
//! never a side effect of reading.

pub mod batcher;
pub mod kafka;
pub mod replication;
pub mod schema;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use self::batcher::{BatchLimits, Batcher};
use self::replication::{Ended, Finished, Replication};
use self::schema::{Problems, SchemaHealth};
use crate::apply::broadcast::Broadcast;
use crate::apply::redis::Record;
use crate::apply::{self, Backoff, Progress, RedisSink, Request};
use crate::change::Checkpoint;
use crate::change::Lsn;
use crate::config::SecretUrl;
use crate::config::{Config, SourceKind};
use crate::continuity::{self, Remembered, SlotState, Verdict};
use crate::error::{Error, ErrorKind};
use crate::lag::Lag;
use crate::mapping::Mappings;
use crate::mapping::Output;
use crate::plan::Planner;
use crate::source::postgres::changes::{ChangeDecoder, RelationMemory};
use crate::source::postgres::conn::ReplicationConnection;
use crate::source::postgres::slot;
use crate::telemetry;

/// How often a standby tries to take the slot over.
const STANDBY_POLL: Duration = Duration::from_secs(1);

/// Plans queued between the replication and apply tasks.
const PLAN_CHANNEL_CAPACITY: usize = 4;

/// Knobs that are not in the config file.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// How often a standby status update is sent (and a keepalive asked for).
    pub status_interval: Duration,
    /// Stop once everything up to this position is applied.
    pub until: Option<Lsn>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            status_interval: Duration::from_secs(1),
            until: None,
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

/// A running pipeline.
pub struct Running {
    /// The source's state, for readiness and for waiting until streaming.
    pub source: watch::Receiver<SourceState>,
    /// Whether Redis answers (`None`) or why not.
    pub redis: watch::Receiver<Option<String>>,
    /// What is wrong between the mappings and the live schema.
    pub schema: watch::Receiver<Problems>,
    /// What apply has finished.
    pub progress: watch::Receiver<Progress>,
    /// The flush position last reported to the server.
    pub acked: watch::Receiver<Lsn>,
    pub lag: Arc<Mutex<Lag>>,
    pub epoch: String,
    stop: watch::Sender<bool>,
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

/// Starts the tasks on the current tokio runtime (call it from inside
/// one). Connecting happens in the background, with retries: `wait` reports
/// what retrying could not fix, `streaming_within` when streaming began.
pub fn start(config: &Config, mappings: Arc<Mappings>, options: Options) -> Result<Running, Error> {
    if config.source == SourceKind::Kafka {
        return kafka::start(config, mappings, options);
    }
    if config.postgres.url.is_none() {
        return Err(Error::new(ErrorKind::Config, "postgres.url is not set"));
    }
    let (stages, handles) = Stages::start(config)?;
    let url = config.postgres.url.clone().expect("checked above");
    let schema = stages.schema.clone().with_live_checks(
        url,
        config.postgres.publication.clone(),
        mappings.clone(),
    );
    let supervisor = Supervisor {
        schema,
        memory: RelationMemory::default(),
        config: config.clone(),
        mappings,
        options,
        plans: stages.plans,
        sent_plans: Arc::new(AtomicU64::new(0)),
        progress: stages.progress,
        acked: Arc::new(stages.acked),
        stop: stages.stop,
        source: stages.source,
    };
    tokio::spawn(watch_retained_wal(config.clone(), supervisor.stop.clone()));
    tokio::spawn(
        supervisor
            .schema
            .clone()
            .watch(SCHEMA_CHECK_INTERVAL, supervisor.stop.clone()),
    );
    Ok(handles.running(tokio::spawn(supervisor.run(stages.apply_task))))
}

/// What both sources share: the apply task (with its Redis sink and L1
/// broadcast) and the ends of the channels around it that the source's
/// task keeps.
struct Stages {
    plans: mpsc::Sender<Request>,
    progress: watch::Receiver<Progress>,
    acked: watch::Sender<Lsn>,
    stop: watch::Receiver<bool>,
    source: watch::Sender<SourceState>,
    schema: SchemaHealth,
    apply_task: JoinHandle<Result<(), Error>>,
}

/// The other ends, which [`Running`] hands out.
struct Handles {
    source: watch::Receiver<SourceState>,
    redis: watch::Receiver<Option<String>>,
    schema: watch::Receiver<Problems>,
    progress: watch::Receiver<Progress>,
    acked: watch::Receiver<Lsn>,
    lag: Arc<Mutex<Lag>>,
    epoch: String,
    stop: watch::Sender<bool>,
}

impl Stages {
    /// Creates the channels and starts the apply task.
    fn start(config: &Config) -> Result<(Stages, Handles), Error> {
        let broadcast = Broadcast::new(&config.redis.l1_channel);
        let epoch = broadcast.epoch().to_owned();
        let sink = RedisSink::new(&config.redis, broadcast)?;
        let (plans_tx, plans_rx) = mpsc::channel(PLAN_CHANNEL_CAPACITY);
        let (progress_tx, progress_rx) = watch::channel(Progress::default());
        let (acked_tx, acked_rx) = watch::channel(Lsn(0));
        let (stop_tx, stop_rx) = watch::channel(false);
        let (source_tx, source_rx) = watch::channel(SourceState::Connecting);
        let (redis_tx, redis_rx) = watch::channel(None);
        let lag = Arc::new(Mutex::new(Lag::default()));
        let (schema, schema_rx) = SchemaHealth::new();
        let apply_task = tokio::spawn(apply::run(
            sink,
            plans_rx,
            progress_tx,
            redis_tx,
            lag.clone(),
            stop_rx.clone(),
        ));
        let stages = Stages {
            plans: plans_tx,
            progress: progress_rx.clone(),
            acked: acked_tx,
            stop: stop_rx,
            source: source_tx,
            schema,
            apply_task,
        };
        let handles = Handles {
            source: source_rx,
            redis: redis_rx,
            schema: schema_rx,
            progress: progress_rx,
            acked: acked_rx,
            lag,
            epoch,
            stop: stop_tx,
        };
        Ok((stages, handles))
    }
}

impl Handles {
    fn running(self, task: JoinHandle<Result<Ended, Error>>) -> Running {
        Running {
            source: self.source,
            redis: self.redis,
            schema: self.schema,
            progress: self.progress,
            acked: self.acked,
            lag: self.lag,
            epoch: self.epoch,
            stop: self.stop,
            task,
        }
    }
}

/// How long the end of a pipeline waits for apply to finish what it holds.
const APPLY_DRAIN_BOUND: Duration = Duration::from_secs(10);

/// Waits (bounded) for the apply task once the plan channel is closed; its
/// error, if it failed. Past the bound, what it held is read again on the
/// next start, since it was never acknowledged.
async fn finish_apply(apply_task: JoinHandle<Result<(), Error>>) -> Result<(), Error> {
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

impl Supervisor {
    /// Compares the slot with what evictd remembers applying (see
    /// [`crate::continuity`]), creates the slot when needed, and when changes
    /// were lost invalidates every mapped table before streaming.
    async fn check_continuity(&self, url: &SecretUrl, system_id: &str) -> Result<(), Error> {
        let postgres = &self.config.postgres;
        let key = format!(
            "{}{}",
            self.config.redis.prefix,
            continuity::record_key(&postgres.slot)
        );
        let (answer, read) = oneshot::channel();
        self.request(Request::Read(key.clone(), answer)).await?;
        let remembered = read
            .await
            .map_err(|_| Error::new(ErrorKind::Shutdown, "the apply task ended"))??
            .and_then(|text| Remembered::decode(&text));
        let state = slot::inspect(postgres, url).await?;
        let verdict = continuity::judge(remembered.as_ref(), &state, system_id);
        if matches!(&state, SlotState::Present { wal_status, .. } if wal_status == "lost") {
            slot::drop_slot(postgres, url).await?;
        }
        if slot::ensure(postgres, url, &self.mappings).await? {
            tracing::info!(slot = %postgres.slot, "created the replication slot: streaming starts from now");
        }
        self.request(Request::Remember(Record {
            key,
            system_id: system_id.to_owned(),
        }))
        .await?;
        let Verdict::Lost(reason) = verdict else {
            return Ok(());
        };
        tracing::error!(slot = %postgres.slot, %reason, "continuity lost: invalidating every mapped table before streaming");
        let start = match slot::inspect(postgres, url).await? {
            SlotState::Present {
                confirmed_flush, ..
            } => confirmed_flush,
            SlotState::Missing => Lsn(0),
        };
        let mut planner = Planner::new();
        let mut out = Output::default();
        for mapping in self.mappings.tables() {
            out.clear();
            self.mappings.eval_coarse(&mapping.table, &mut out);
            for action in out.actions.drain(..) {
                planner.push(action);
            }
        }
        planner.commit(Checkpoint::Lsn(start), None);
        let target = self.sent_plans.fetch_add(1, Ordering::SeqCst) + 1;
        self.request(Request::Plan(planner.finish())).await?;
        let mut progress = self.progress.clone();
        progress
            .wait_for(|progress| progress.applied_plans >= target)
            .await
            .map_err(|_| Error::new(ErrorKind::Shutdown, "the apply task ended"))?;
        metrics::counter!(telemetry::COARSE_INVALIDATIONS).increment(1);
        tracing::warn!(slot = %postgres.slot, tables = self.mappings.tables().count(), "coarse invalidation applied; streaming resumes");
        Ok(())
    }

    async fn request(&self, request: Request) -> Result<(), Error> {
        self.plans
            .send(request)
            .await
            .map_err(|_| Error::new(ErrorKind::Shutdown, "the apply task ended"))
    }
}

/// How often the live mapping checks run besides a session's start and a
/// changed Relation message.
const SCHEMA_CHECK_INTERVAL: Duration = Duration::from_secs(60);

/// How often the slot's retained WAL is checked.
const RETAINED_WAL_CHECK: Duration = Duration::from_secs(60);

/// Publishes the WAL the slot retains and warns past
/// `postgres.max_retained_wal_mb`, until stopped.
async fn watch_retained_wal(config: Config, mut stop: watch::Receiver<bool>) {
    let Some(url) = config.postgres.url.clone() else {
        return;
    };
    let bound = config.postgres.max_retained_wal_mb.saturating_mul(1 << 20);
    let mut tick = tokio::time::interval(RETAINED_WAL_CHECK);
    loop {
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return,
            _ = tick.tick() => {}
        }
        let Ok(client) = crate::catalog::connect(&url).await else {
            continue;
        };
        let row = client
            .query_opt(
                "select pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint from pg_replication_slots where slot_name = $1",
                &[&config.postgres.slot],
            )
            .await;
        let Ok(Some(row)) = row else {
            continue;
        };
        let retained = u64::try_from(row.get::<_, Option<i64>>(0).unwrap_or(0)).unwrap_or(0);
        #[allow(clippy::cast_precision_loss)]
        metrics::gauge!(telemetry::SLOT_RETAINED_WAL_BYTES).set(retained as f64);
        if retained > bound {
            tracing::warn!(slot = %config.postgres.slot, retained_mb = retained >> 20, max_retained_wal_mb = config.postgres.max_retained_wal_mb, "the slot retains much WAL: evictd is behind or stopped; the database's disk fills");
        }
    }
}

/// Runs replication sessions one after another: a transient failure
/// (Postgres restarted, the walsender killed, the slot held by another
/// process) ends a session, and after a backoff a new one resumes from the
/// slot's confirmed position. Apply runs on across sessions.
struct Supervisor {
    config: Config,
    schema: SchemaHealth,
    /// Mapped relations by OID, across sessions.
    memory: RelationMemory,
    mappings: Arc<Mappings>,
    options: Options,
    plans: mpsc::Sender<Request>,
    sent_plans: Arc<AtomicU64>,
    progress: watch::Receiver<Progress>,
    acked: Arc<watch::Sender<Lsn>>,
    stop: watch::Receiver<bool>,
    source: watch::Sender<SourceState>,
}

impl Supervisor {
    async fn run(mut self, apply_task: JoinHandle<Result<(), Error>>) -> Result<Ended, Error> {
        let mut backoff = Backoff::default();
        let outcome = loop {
            let session = match self.connect().await {
                Ok(session) => session,
                Err(error) => match self.retry_after(error, &mut backoff).await {
                    Some(fatal) => break fatal,
                    None => continue,
                },
            };
            backoff = Backoff::default();
            self.source.send_replace(SourceState::Streaming);
            metrics::gauge!(telemetry::STREAMING).set(1.0);
            match session.run(self.stop.clone()).await {
                Ok(finished) => break Ok(Some(finished)),
                Err(error) => {
                    if let Some(fatal) = self.retry_after(error, &mut backoff).await {
                        break fatal;
                    }
                }
            }
        };
        self.source.send_replace(SourceState::Ended);
        metrics::gauge!(telemetry::STREAMING).set(0.0);
        // Closing the plan channel lets apply finish what it holds and end.
        drop(self.plans);
        let apply_result = finish_apply(apply_task).await;
        // When apply failed, its error is the cause of whatever the
        // replication side saw ("the apply task ended").
        apply_result?;
        let finished = outcome?;
        let flush = self.progress.borrow().flush_lsn;
        match finished {
            Some(finished) => finished.close(flush).await,
            // Stopped while disconnected: there is no stream to close.
            None => Ok(Ended::Stopped),
        }
    }

    /// Waits out a transient error; returns the error when it is not
    /// transient, or the clean end when asked to stop meanwhile.
    async fn retry_after(
        &mut self,
        error: Error,
        backoff: &mut Backoff,
    ) -> Option<Result<Option<Finished>, Error>> {
        if *self.stop.borrow() {
            return Some(Ok(None));
        }
        let cause = error.cause();
        if !error.is_transient() {
            tracing::error!(%error, %cause, "the pipeline stops: this error is not worth retrying");
            return Some(Err(error));
        }
        let reason = format!("{error} {cause}").trim_end().to_owned();
        let repeated = matches!(&*self.source.borrow(), SourceState::Interrupted(previous) if *previous == reason);
        self.source.send_replace(SourceState::Interrupted(reason));
        let delay = if error.kind() == ErrorKind::SlotInUse {
            // A standby: poll often, so that it takes over within a second
            // or two of the active process going away.
            if !repeated {
                tracing::info!(slot = %self.config.postgres.slot, %error, "the slot streams to another process; standing by");
            }
            STANDBY_POLL
        } else {
            let delay = backoff.next_delay();
            metrics::counter!(telemetry::RECONNECTS).increment(1);
            tracing::warn!(%error, %cause, retry_in = ?delay, "replication interrupted; reconnecting");
            delay
        };
        tokio::select! {
            _ = self.stop.wait_for(|stop| *stop) => Some(Ok(None)),
            () = tokio::time::sleep(delay) => None,
        }
    }

    async fn connect(&self) -> Result<Replication, Error> {
        let url = self
            .config
            .postgres
            .url
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::Config, "postgres.url is not set"))?;
        let mut conn = ReplicationConnection::connect(url.expose()).await?;
        let system = conn.simple_query("IDENTIFY_SYSTEM").await?;
        let Some([Some(system_id), Some(timeline), Some(wal_position), ..]) =
            system.first().map(Vec::as_slice)
        else {
            return Err(Error::new(
                ErrorKind::Protocol,
                "IDENTIFY_SYSTEM returned no row",
            ));
        };
        tracing::info!(%system_id, %timeline, %wal_position, "connected for replication");
        self.check_continuity(url, system_id).await?;
        // The checks `evictd check` makes, reported table by table; the
        // OIDs they find let a rename be recognised from the first change.
        self.memory.seed(self.schema.live_check().await);
        let command = slot::start_command(
            &self.config.postgres.slot,
            &self.config.postgres.publication,
            conn.server_version(),
        );
        conn.start_replication(&command).await?;
        tracing::info!(slot = %self.config.postgres.slot, server_version = conn.server_version(), "streaming started");
        Ok(Replication {
            conn,
            decoder: ChangeDecoder::with_memory(self.mappings.clone(), self.memory.clone()),
            schema: self.schema.clone(),
            fallbacks: schema::FallbackLog::default(),
            batcher: Batcher::new(
                self.mappings.clone(),
                BatchLimits {
                    max_keys: self.config.batch.max_keys,
                    max_pending_keys: self.config.batch.max_pending_keys,
                },
            ),
            plans: self.plans.clone(),
            sent_plans: self.sent_plans.clone(),
            progress: self.progress.clone(),
            acked: self.acked.clone(),
            max_wait: Duration::from_millis(self.config.batch.max_wait_ms),
            status_interval: self.options.status_interval,
            until: self.options.until,
            scratch: replication::Scratch::default(),
        })
    }
}
