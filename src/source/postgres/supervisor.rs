//! The Postgres source's supervisor: runs replication sessions one after
//! another, reconnecting with backoff after transient errors and standing
//! by while another process holds the slot (apply runs on across
//! sessions); before each session, the continuity check against the record
//! in Redis ([`crate::continuity`]); beside them, the retained-WAL watch
//! and the live schema checks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::changes::{ChangeDecoder, RelationMemory};
use super::conn::ReplicationConnection;
use super::control::Control;
use super::replication::{self, Finished, Replication};
use super::schema::LiveChecks;
use super::slot;
use crate::apply::{Backoff, Progress};
use crate::change::{Checkpoint, Event, Lsn};
use crate::config::{Config, SecretUrl};
use crate::continuity::{self, Continuity, SlotState};
use crate::error::{Error, ErrorKind};
use crate::mapping::message::Secrets;
use crate::mapping::Mappings;
use crate::pipeline::batcher::{BatchLimits, Batcher};
use crate::pipeline::schema::SchemaHealth;
use crate::pipeline::{finish_apply, Ended, Options, Running, SourceState, Stages};
use crate::plan::Plan;
use crate::telemetry;

/// How often a standby tries to take the slot over.
const STANDBY_POLL: Duration = Duration::from_secs(1);

/// Starts the Postgres source's supervisor and the apply task.
pub fn start(config: &Config, mappings: Arc<Mappings>, options: Options) -> Result<Running, Error> {
    let Some(url) = config.postgres.url.clone() else {
        return Err(Error::new(ErrorKind::Config, "postgres.url is not set"));
    };
    let (stages, handles) = Stages::start(config, mappings)?;
    let (acked, acked_rx) = watch::channel(Lsn(0));
    let live_checks = LiveChecks::new(
        stages.schema.clone(),
        url,
        config.postgres.publication.clone(),
        stages.mappings.clone(),
    );
    let supervisor = Supervisor {
        schema: stages.schema,
        live_checks: live_checks.clone(),
        memory: RelationMemory::default(),
        config: config.clone(),
        mappings: stages.mappings,
        options,
        plans: stages.plans,
        sent_plans: Arc::new(AtomicU64::new(0)),
        continuity: stages
            .continuity
            .ok_or_else(|| Error::new(ErrorKind::Config, "no continuity record"))?,
        progress: stages.progress,
        acked: Arc::new(acked),
        stop: stages.stop,
        source: stages.source,
        secrets: stages.secrets,
        reset_pending: AtomicBool::new(options.reset),
    };
    tokio::spawn(watch_retained_wal(config.clone(), supervisor.stop.clone()));
    tokio::spawn(live_checks.watch(SCHEMA_CHECK_INTERVAL, supervisor.stop.clone()));
    let task = tokio::spawn(supervisor.run(stages.apply_task));
    Ok(handles.running(task, acked_rx))
}

impl Supervisor {
    /// Compares the slot with what evictd remembers applying (see
    /// [`crate::continuity`]), creates the slot when needed, and when changes
    /// were lost invalidates every mapped table before streaming. Returns
    /// whether the slot is to be switched to a failover slot.
    async fn check_continuity(&self, url: &SecretUrl, system_id: &str) -> Result<bool, Error> {
        let postgres = &self.config.postgres;
        let control = Control::connect_to(url, &postgres.slot, &postgres.publication).await?;
        let topology = control.topology().await?;
        if let Some(error) = topology.blocking_error(&postgres.slot, postgres.failover_slot) {
            return Err(error);
        }
        let findings = topology.findings(&postgres.slot, postgres.failover_slot);
        publish_setup_problems(findings.len());
        for finding in findings {
            tracing::warn!(slot = %postgres.slot, problem = %finding.message, help = %finding.help, "the slot may not outlive a failover");
        }
        let failover = topology.creates_failover_slot(postgres.failover_slot);
        // The slot first, then the record: every position acknowledged was
        // recorded before it was acknowledged, and the record only moves
        // on, so a record read after the slot is at or past the slot's
        // position unless changes were lost. (Read the other way round, a
        // process streaming from the slot meanwhile, as an active one
        // does while this one stands by, moves the slot past the record
        // read before it: no loss, but it would look like one.)
        let state = control.inspect().await?;
        let remembered = self.continuity.read(&mut self.stop.clone()).await?;
        let verdict = if self.reset_pending.load(Ordering::SeqCst) {
            Continuity::lost(
                "slot_reset",
                "the slot was re-created by `evictd init --reset-slot`".into(),
            )
        } else {
            continuity::judge(remembered.as_ref(), &state, system_id)
        };
        if let Some(cause) = state.invalidated() {
            if !postgres.create_slot {
                // Kept for the administrator to see: evictd may not make
                // another.
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "replication slot `{}` was invalidated by Postgres ({cause}), and postgres.create_slot = false: an administrator runs `evictd init --reset-slot` to create it again (every mapped table is then invalidated once)",
                        postgres.slot
                    ),
                ));
            }
            tracing::error!(slot = %postgres.slot, %cause, "the replication slot was invalidated: dropping it to create it again");
            control.drop_slot().await?;
        }
        let mappings = self.mappings.borrow().clone();
        if control
            .ensure(&mappings, postgres.create_slot, failover)
            .await?
        {
            tracing::info!(slot = %postgres.slot, failover, "created the replication slot: streaming starts from now");
        }
        self.name_database(system_id).await?;
        let switch = topology.needs_failover_switch(postgres.failover_slot);
        let Continuity::Lost { cause, reason } = verdict else {
            return Ok(switch);
        };
        metrics::counter!(telemetry::CONTINUITY_LOST, "cause" => cause).increment(1);
        tracing::error!(slot = %postgres.slot, cause, %reason, "continuity lost: invalidating every mapped table before streaming");
        // Until the coarse invalidation is applied, `/readyz` says why.
        self.source.send_replace(SourceState::Interrupted(format!(
            "continuity lost ({reason}): invalidating every mapped table before streaming"
        )));
        let start = match control.inspect().await? {
            SlotState::Present {
                confirmed_flush, ..
            } => confirmed_flush,
            SlotState::Missing => Lsn(0),
        };
        let mut batcher = Batcher::new(mappings.clone(), self.limits());
        let mut ready = Vec::new();
        batcher.invalidate_everything(&mut ready);
        let commit = Event::Commit {
            checkpoint: Checkpoint::Lsn(start),
            commit_time: None,
        };
        batcher.push(commit, &mut ready);
        ready.extend(batcher.take());
        for plan in ready {
            self.sent_plans.fetch_add(1, Ordering::SeqCst);
            self.send(plan).await?;
        }
        self.sent_plans_applied().await?;
        batcher.record_metrics();
        self.reset_pending.store(false, Ordering::SeqCst);
        tracing::warn!(slot = %postgres.slot, tables = mappings.tables().count(), "coarse invalidation applied; streaming resumes");
        Ok(switch)
    }

    async fn send(&self, plan: Plan) -> Result<(), Error> {
        self.plans
            .send(plan)
            .await
            .map_err(|_| Error::new(ErrorKind::Shutdown, "the apply task ended"))
    }

    /// Records the positions applied from now on as the database
    /// `system_id`'s. When that is another database than before (restored,
    /// failed over), the plans still in flight from the one before are
    /// applied first, so that none of its positions is recorded as this
    /// one's.
    async fn name_database(&self, system_id: &str) -> Result<(), Error> {
        if self.continuity.database().as_deref() != Some(system_id) {
            self.sent_plans_applied().await?;
        }
        self.continuity.name_database(system_id);
        Ok(())
    }

    /// Waits until apply has applied every plan sent so far (or evictd is
    /// stopped meanwhile).
    async fn sent_plans_applied(&self) -> Result<(), Error> {
        let target = self.sent_plans.load(Ordering::SeqCst);
        let mut progress = self.progress.clone();
        let mut stop = self.stop.clone();
        tokio::select! {
            applied = progress.wait_for(|progress| progress.applied_plans >= target) => {
                applied
                    .map(|_| ())
                    .map_err(|_| Error::new(ErrorKind::Shutdown, "the apply task ended"))
            }
            _ = stop.wait_for(|stop| *stop) => Err(Error::new(ErrorKind::Shutdown, "stopped")),
        }
    }
}

/// How often the live mapping checks run besides a session's start and a
/// changed Relation message.
const SCHEMA_CHECK_INTERVAL: Duration = Duration::from_secs(60);

/// How often the slot's retained WAL is checked.
const RETAINED_WAL_CHECK: Duration = Duration::from_secs(60);

#[allow(clippy::cast_precision_loss)]
fn publish_setup_problems(count: usize) {
    metrics::gauge!(telemetry::SLOT_SETUP_PROBLEMS).set(count as f64);
}

/// Publishes the WAL the slot retains and warns past
/// `postgres.max_retained_wal_mb`, and the slot's setup problems (a
/// standby stopped or its feedback turned off after the session started),
/// until stopped.
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
        let postgres = &config.postgres;
        let Ok(control) = Control::connect_to(&url, &postgres.slot, &postgres.publication).await
        else {
            continue;
        };
        if let Ok(topology) = control.topology().await {
            publish_setup_problems(
                topology
                    .findings(&postgres.slot, postgres.failover_slot)
                    .len(),
            );
        }
        let Ok(Some(retained)) = control.retained_wal().await else {
            continue;
        };
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
    live_checks: LiveChecks,
    /// Mapped relations by OID, across sessions.
    memory: RelationMemory,
    /// The mappings in effect; each session starts with the newest.
    mappings: watch::Receiver<Arc<Mappings>>,
    options: Options,
    plans: mpsc::Sender<Plan>,
    sent_plans: Arc<AtomicU64>,
    /// The continuity record, which the sink writes.
    continuity: continuity::Store,
    progress: watch::Receiver<Progress>,
    acked: Arc<watch::Sender<Lsn>>,
    stop: watch::Receiver<bool>,
    source: watch::Sender<SourceState>,
    /// The secrets SQL messages must be signed with.
    secrets: Secrets,
    /// The slot was re-created on purpose (`Options::reset`): invalidate
    /// every mapped table before the first session streams.
    reset_pending: AtomicBool,
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
            match error.help() {
                Some(help) => {
                    tracing::error!(%error, %cause, help, "the pipeline stops: this error is not worth retrying")
                }
                None => {
                    tracing::error!(%error, %cause, "the pipeline stops: this error is not worth retrying")
                }
            }
            return Some(Err(error));
        }
        let reason = error.reason();
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

    fn limits(&self) -> BatchLimits {
        BatchLimits::of(&self.config, self.secrets.clone())
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
        if self.check_continuity(url, system_id).await? {
            let slot = &self.config.postgres.slot;
            conn.simple_query(&format!(
                "ALTER_REPLICATION_SLOT {} ( FAILOVER true )",
                crate::sql::quote_ident(slot)
            ))
            .await?;
            tracing::info!(%slot, "switched the replication slot to a failover slot");
        }
        // The checks `evictd check` makes, reported table by table; the
        // OIDs they find let a rename be recognised from the first change.
        self.memory.seed(self.live_checks.run().await);
        let messages = self.config.mappings.sql_messages;
        if messages && conn.server_version() < 140_000 {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "mappings.sql_messages needs PostgreSQL 14 or later (pgoutput's `messages` option); the server is version {}",
                    conn.server_version()
                ),
            ));
        }
        let command = slot::start_command(
            &self.config.postgres.slot,
            &self.config.postgres.publication,
            conn.server_version(),
            messages,
        );
        conn.start_replication(&command).await?;
        tracing::info!(slot = %self.config.postgres.slot, server_version = conn.server_version(), "streaming started");
        let mut live = self.mappings.clone();
        let mappings = live.borrow_and_update().clone();
        Ok(Replication {
            conn,
            decoder: ChangeDecoder::with_memory(mappings.clone(), self.memory.clone()),
            schema: self.schema.clone(),
            batcher: Batcher::new(mappings, self.limits()),
            mappings: live,
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
