//! The apply stage: plans to Redis (and the L1 broadcast), in order, each
//! retried with backoff until it succeeds. Only then does the progress the
//! replication task acknowledges move; with CDN targets (`[[purge]]`),
//! only once they also accepted the plan's purges. Those go out from a
//! purge stage beside apply, in plan order, so Redis applies the next plan
//! while the CDN purges this one.
//!
//! The stages of a plan, in order, and what each does when it fails:
//!
//! | stage | when | on failure |
//! |---|---|---|
//! | visibility gate ([`visibility`]) | `postgres.visibility_gate` | waits (WARN past `visibility_warn_ms`, shown in `/readyz`); stopped: not applied |
//! | stamps ([`Stamped`]: the checker's apply stamp, the tag stamp) | `[audit]`; tag invalidations | retried with the plan |
//! | Redis: commands, L1 broadcast, continuity record, one round trip where the server allows | always | transient errors retried with backoff (`/readyz` names them); others stop evictd |
//! | the checker's sample ([`Sampler::offer`]) | `[audit]` | never fails: samples beyond its queue are dropped |
//! | read replicas ([`replica`]): held, then invalidated again | `[[postgres.replica]]` | as Redis |
//! | purges (`purge`): each CDN target in plan order | `[[purge]]` | retried; a refusal (4xx) waits for the operator (`/readyz` with a hint); `best_effort` targets never hold progress |
//! | progress published: the source may acknowledge | always | — |
//!
//! A plan is not changed once planned: the stamps it is applied with are a
//! [`Stamped`] beside it, and what goes on past Redis is an `Applied`.
//!
//! **Architecture Invariant:** progress moves after, and only after, a
//! plan's Redis commands and broadcast were acknowledged by Redis (and its
//! purges accepted by every target that is not `best_effort`).

pub mod broadcast;
pub mod cluster;
pub mod redis;
pub mod replica;
pub mod sink;
pub mod visibility;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng as _;
use tokio::sync::{mpsc, watch};

use self::broadcast::Broadcast;
use self::cluster::ClusterSink;
use self::redis::StandaloneSink;
use self::replica::{Release, Replicas};
use self::sink::{ApplyStats, Stamped};
use self::visibility::{Visibility, Waited};
use crate::audit::Sampler;
use crate::change::{Checkpoint, Lsn, Offsets};
use crate::config::RedisConfig;
use crate::continuity::Recorder;
use crate::error::Error;
use crate::error::ErrorKind;
use crate::lag::Lag;
use crate::plan::{Command, Plan};
use crate::telemetry;

/// Where plans go: one Redis, or a Redis Cluster.
pub enum RedisSink {
    Standalone(Box<StandaloneSink>),
    Cluster(Box<ClusterSink>),
}

impl RedisSink {
    /// A sink for `url`: `redis://` or `rediss://` for one server,
    /// `redis+cluster://host:port` for a cluster (any node as the seed).
    /// With `record`, each applied WAL position is written to the
    /// continuity record with its plan.
    pub fn new(
        config: &RedisConfig,
        broadcast: Broadcast,
        record: Option<Recorder>,
    ) -> Result<RedisSink, Error> {
        let (url, prefix) = (config.url.expose(), config.prefix.as_str());
        if url.starts_with("rediss+cluster://") {
            return Err(Error::new(
                ErrorKind::Config,
                "TLS to a Redis Cluster is not supported yet",
            ));
        }
        if url.starts_with("redis+cluster://") {
            let wait = sink::Wait {
                replicas: config.wait_replicas,
                timeout_ms: config.wait_timeout_ms,
            };
            return ClusterSink::new(url, prefix, broadcast, wait, record)
                .map(|sink| RedisSink::Cluster(Box::new(sink)));
        }
        StandaloneSink::new(config, broadcast, record)
            .map(|sink| RedisSink::Standalone(Box::new(sink)))
    }

    /// Applies `plan` with what apply stamped it with.
    pub async fn apply(&mut self, plan: &Plan, stamped: Stamped) -> Result<ApplyStats, Error> {
        match self {
            RedisSink::Standalone(sink) => sink.apply(plan, stamped).await,
            RedisSink::Cluster(sink) => sink.apply(plan, stamped).await,
        }
    }

    pub async fn ping(&mut self) -> Result<(), Error> {
        match self {
            RedisSink::Standalone(sink) => sink.ping().await,
            RedisSink::Cluster(sink) => sink.ping().await,
        }
    }

    /// GET `key` (a full key).
    pub async fn get(&mut self, key: &str) -> Result<Option<String>, Error> {
        self.on_key(::redis::cmd("GET").arg(key), key).await
    }

    /// SET `key` (a full key) to `value`.
    pub async fn set(&mut self, key: &str, value: &str) -> Result<(), Error> {
        self.on_key(::redis::cmd("SET").arg(key).arg(value), key)
            .await
    }

    async fn on_key<T: ::redis::FromRedisValue>(
        &mut self,
        command: &::redis::Cmd,
        key: &str,
    ) -> Result<T, Error> {
        match self {
            RedisSink::Standalone(sink) => sink.on_key(command, key).await,
            RedisSink::Cluster(sink) => sink.on_key(command, key).await,
        }
    }

    /// The key prefix (`redis.prefix`).
    pub fn prefix(&self) -> &str {
        match self {
            RedisSink::Standalone(sink) => &sink.prefix,
            RedisSink::Cluster(sink) => &sink.prefix,
        }
    }
}

/// How far apply has come: the checkpoints the source may acknowledge.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Plans applied so far (with or without a checkpoint).
    pub applied_plans: u64,
    /// Postgres: end LSN of the last transaction whose every command was
    /// applied.
    pub flush_lsn: Lsn,
    /// Kafka: the next offset of each partition after the last record whose
    /// every command was applied.
    pub offsets: Offsets,
    /// Row changes, Redis-level commands and keys applied so far.
    pub changes: u64,
    pub commands: u64,
    pub keys: u64,
}

impl Progress {
    /// Takes in the checkpoint of an applied plan.
    fn absorb(&mut self, checkpoint: Option<&Checkpoint>) {
        match checkpoint {
            Some(Checkpoint::Lsn(lsn)) => self.flush_lsn = self.flush_lsn.max(*lsn),
            Some(Checkpoint::Offsets(offsets)) => self.offsets.absorb(offsets),
            None => {}
        }
    }
}

/// Exponential backoff with jitter, 50 ms doubling to 5 s.
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: Duration::from_millis(50),
        }
    }
}

impl Backoff {
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        let jitter = rand::rng().random_range(0.5..1.5);
        base.mul_f64(jitter)
    }
}

/// What apply does beside Redis, when configured.
#[derive(Default)]
pub struct ApplyStages {
    /// The consistency checker's side: stamps and samples (`[audit]`).
    pub audit: Option<Sampler>,
    /// The CDN targets, purged after Redis (`[[purge]]`).
    pub purger: Option<crate::purge::Purger>,
    /// The visibility gate (`postgres.visibility_gate`).
    pub gate: Option<Visibility>,
    /// The read replicas each batch is invalidated again for
    /// (`[[postgres.replica]]`).
    pub replicas: Option<replica::Setup>,
    /// The console's live stream (`admin.console`).
    pub console: Option<crate::console::Tap>,
}

/// What apply does around each plan besides Redis: the visibility gate
/// before it, the checker's stamp and sample with it.
struct Around {
    audit: Option<Sampler>,
    gate: Option<Visibility>,
    replicas: Option<replica::Setup>,
    console: Option<crate::console::Tap>,
}

/// How often an idle apply task checks that Redis answers (for readiness).
const IDLE_PING: Duration = Duration::from_secs(5);

/// Plans applied to Redis that may wait for their purges at once: Redis
/// runs that far ahead of a slow CDN, no further.
const PURGE_QUEUE: usize = 8;

/// A plan Redis applied, as far as its progress and its purges go.
struct Applied {
    changes: u64,
    commands: u64,
    keys: u64,
    checkpoint: Option<Checkpoint>,
    purges: crate::plan::Purges,
}

/// Where an applied plan goes next.
enum Handoff {
    /// Its progress is published at once.
    Publish(watch::Sender<Progress>),
    /// To the purge stage, which publishes it once its purges went out.
    Purge(mpsc::Sender<Applied>),
}

/// Where the plan being applied goes once Redis applied it.
enum Reserved<'n> {
    Publish(&'n watch::Sender<Progress>),
    /// Its room in the purge stage's queue, reserved before Redis.
    Queue(mpsc::Permit<'n, Applied>, &'n mpsc::Sender<Applied>),
}

impl Handoff {
    /// Where the next plan goes; with a purge stage, room in its queue is
    /// reserved first, so that Redis runs at most [`PURGE_QUEUE`] plans
    /// ahead of the purges. `None` once the purge stage stopped.
    async fn reserve(&self) -> Option<Reserved<'_>> {
        match self {
            Handoff::Publish(progress) => Some(Reserved::Publish(progress)),
            Handoff::Purge(queue) => Some(Reserved::Queue(queue.reserve().await.ok()?, queue)),
        }
    }
}

impl Reserved<'_> {
    fn deliver(self, applied: Applied) {
        match self {
            Reserved::Publish(progress) => applied.publish(progress),
            // The CDN tier after Redis: a page refilled once the purge went
            // out reads the new L2.
            Reserved::Queue(room, queue) => {
                room.send(applied);
                #[allow(clippy::cast_precision_loss)]
                metrics::gauge!(telemetry::PURGE_QUEUE_BATCHES)
                    .set((queue.max_capacity() - queue.capacity()) as f64);
            }
        }
    }
}

impl Applied {
    /// What is left of `plan` once Redis applied it (`keys` keys).
    fn of(plan: Plan, keys: u64) -> Applied {
        Applied {
            changes: plan.changes,
            commands: plan.commands.len() as u64,
            keys,
            checkpoint: plan.checkpoint,
            purges: plan.purges,
        }
    }

    fn publish(&self, progress: &watch::Sender<Progress>) {
        progress.send_modify(|progress| {
            progress.applied_plans += 1;
            progress.changes += self.changes;
            progress.commands += self.commands;
            progress.keys += self.keys;
            progress.absorb(self.checkpoint.as_ref());
        });
    }
}

/// Applies plans until the channel closes (the replication task ended) or
/// `stop` turns true while a plan cannot be applied. `redis` says whether
/// Redis answers (`None`) or why not.
pub async fn run(
    sink: RedisSink,
    plans: mpsc::Receiver<Plan>,
    progress: watch::Sender<Progress>,
    redis: watch::Sender<Option<String>>,
    lag: Arc<Mutex<Lag>>,
    stop: watch::Receiver<bool>,
    extras: ApplyStages,
) -> Result<(), Error> {
    let ApplyStages {
        audit,
        purger,
        gate,
        replicas,
        console,
    } = extras;
    let around = Around {
        audit,
        gate,
        replicas,
        console,
    };
    let Some(purger) = purger else {
        let next = Handoff::Publish(progress);
        return apply(sink, plans, next, redis, lag, stop, around).await;
    };
    let (queue, queued) = mpsc::channel(PURGE_QUEUE);
    let applying = apply(
        sink,
        plans,
        Handoff::Purge(queue),
        redis,
        lag,
        stop.clone(),
        around,
    );
    let purging = purge(purger, queued, progress, stop);
    tokio::pin!(applying, purging);
    tokio::select! {
        // Apply ended (its input did, or it was stopped): the purges of
        // what it applied still go out, and are published.
        result = &mut applying => {
            result?;
            purging.await
        }
        // Stopped while a target refused: nothing after is acknowledged.
        result = &mut purging => result,
    }
}

/// The purge stage: each applied plan's purges, in order, then its
/// progress.
async fn purge(
    mut purger: crate::purge::Purger,
    mut queued: mpsc::Receiver<Applied>,
    progress: watch::Sender<Progress>,
    stop: watch::Receiver<bool>,
) -> Result<(), Error> {
    let waiting = metrics::gauge!(telemetry::PURGE_QUEUE_BATCHES);
    while let Some(applied) = queued.recv().await {
        #[allow(clippy::cast_precision_loss)]
        waiting.set(queued.len() as f64);
        if !purger.purge(&applied.purges, &stop).await {
            // Stopped while a target refused: not acknowledged, so the
            // plan is read again on the next start.
            return Ok(());
        }
        applied.publish(&progress);
    }
    waiting.set(0.0);
    Ok(())
}

/// Applies plans to Redis until the channel closes or `stop` turns true
/// while a plan cannot be applied, handing each applied plan to `next`.
async fn apply(
    mut sink: RedisSink,
    mut plans: mpsc::Receiver<Plan>,
    next: Handoff,
    redis: watch::Sender<Option<String>>,
    lag: Arc<Mutex<Lag>>,
    mut stop: watch::Receiver<bool>,
    around: Around,
) -> Result<(), Error> {
    let Around {
        audit,
        mut gate,
        replicas,
        console,
    } = around;
    let mut replicas: Option<Replicas<Applied>> = replicas.map(Replicas::start);
    let mut clocks = Clocks {
        audit,
        tags: StampClock::default(),
    };
    let mut ping = tokio::time::interval(IDLE_PING);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let holding = replicas.as_ref().is_some_and(Replicas::is_holding);
        let full = replicas.as_ref().is_some_and(Replicas::is_full);
        let plan = tokio::select! {
            biased;
            why = due(&mut replicas), if holding => {
                let Some(replicas) = replicas.as_mut() else { continue };
                if !release(replicas, why, &mut sink, &mut clocks, &next, &redis, &mut stop).await? {
                    return Ok(());
                }
                continue;
            }
            request = plans.recv(), if !full => match request {
                Some(plan) => plan,
                // Batches still held were not acknowledged: they are read
                // again on the next start.
                None => return Ok(()),
            },
            _ = ping.tick() => {
                let state = sink.ping().await.err().map(|error| error.to_string());
                redis.send_if_modified(|current| replace_if_changed(current, state));
                continue;
            }
        };
        ping.reset();
        let mut position = None;
        if let Some(gate) = gate.as_mut() {
            match gate
                .wait(&plan.xids, !plan.commands.is_empty(), &mut stop)
                .await
            {
                Waited::Visible(at) => position = at,
                // Stopped while a transaction was not yet visible: not
                // applied, not acknowledged, read again on the next start.
                Waited::Stopped => return Ok(()),
            }
        }
        // With replicas, a batch is handed on when it is released.
        let then = match replicas {
            Some(_) => None,
            None => match next.reserve().await {
                Some(then) => Some(then),
                // The purge stage stopped.
                None => return Ok(()),
            },
        };
        let started = Instant::now();
        let Some((stats, stamped)) =
            apply_retrying(&mut sink, &plan, &mut clocks, &redis, &mut stop).await?
        else {
            // Stopped while Redis is away: abandoned; it was never
            // acknowledged, so it is replayed.
            return Ok(());
        };
        clocks.offer(&plan, stamped);
        record(&plan, &stats, started.elapsed(), &lag);
        if let Some(console) = &console {
            console.offer(&plan);
        }
        tracing::debug!(commands = plan.commands.len(), keys = stats.keys, round_trips = stats.round_trips, checkpoint = ?plan.checkpoint, "applied batch");
        match (then, replicas.as_mut()) {
            (Some(then), _) => then.deliver(Applied::of(plan, stats.keys)),
            (None, Some(replicas)) => {
                let again = replica::second_pass(&plan);
                replicas.hold(again, position, Applied::of(plan, stats.keys));
            }
            (None, None) => {}
        }
    }
}

/// When the oldest batch held for the replicas may be released (never
/// without replicas).
async fn due(replicas: &mut Option<Replicas<Applied>>) -> Release {
    match replicas {
        Some(replicas) => replicas.due().await,
        None => std::future::pending().await,
    }
}

/// Releases the oldest held batch: applies its invalidations again, then
/// hands it on. `false` when stopped first.
async fn release(
    replicas: &mut Replicas<Applied>,
    why: Release,
    sink: &mut RedisSink,
    clocks: &mut Clocks,
    next: &Handoff,
    redis: &watch::Sender<Option<String>>,
    stop: &mut watch::Receiver<bool>,
) -> Result<bool, Error> {
    let Some((again, applied)) = replicas.release(why) else {
        return Ok(true);
    };
    if let Some(again) = again {
        let Some((stats, stamped)) = apply_retrying(sink, &again, clocks, redis, stop).await?
        else {
            return Ok(false);
        };
        // Checked after the second invalidation too: a fill from a replica
        // that had replayed the batch is as new as its stamp says.
        clocks.offer(&again, stamped);
        tracing::debug!(
            commands = again.commands.len(),
            keys = stats.keys,
            ?why,
            "applied a batch's second invalidation for the read replicas"
        );
    }
    let Some(then) = next.reserve().await else {
        return Ok(false);
    };
    then.deliver(applied);
    Ok(true)
}

/// Applies `plan`, retrying transient errors, with the stamps it chose
/// before the first attempt; `None` when stopped while Redis is away.
async fn apply_retrying(
    sink: &mut RedisSink,
    plan: &Plan,
    clocks: &mut Clocks,
    redis: &watch::Sender<Option<String>>,
    stop: &mut watch::Receiver<bool>,
) -> Result<Option<(ApplyStats, Stamped)>, Error> {
    let mut backoff = Backoff::default();
    // A retry keeps the first attempt's stamps: fills that read them may
    // already have loaded.
    let mut stamped = Stamped::default();
    loop {
        match attempt(sink, plan, &mut stamped, clocks).await {
            Ok(stats) => {
                redis.send_if_modified(|current| replace_if_changed(current, None));
                return Ok(Some((stats, stamped)));
            }
            Err(error) if error.is_transient() => {
                let delay = backoff.next_delay();
                let cause = error.cause();
                tracing::warn!(%error, %cause, retry_in = ?delay, "redis apply failed; retrying the batch");
                metrics::counter!(telemetry::REDIS_COMMANDS, "outcome" => "error")
                    .increment(plan.commands.len() as u64);
                // An attempt, whatever the batch holds: an empty
                // (progress-only) batch at the head fails too.
                metrics::counter!(telemetry::REDIS_FAILURES).increment(1);
                redis.send_replace(Some(error.reason()));
                tokio::select! {
                    biased;
                    _ = stop.wait_for(|stop| *stop) => return Ok(None),
                    () = tokio::time::sleep(delay) => {}
                }
            }
            Err(error) => {
                let cause = error.cause();
                tracing::error!(%error, %cause, "apply stops: this error is not worth retrying");
                return Err(error);
            }
        }
    }
}

/// One attempt at `plan`: the stamps it still lacks first, then its
/// commands.
async fn attempt(
    sink: &mut RedisSink,
    plan: &Plan,
    stamped: &mut Stamped,
    clocks: &mut Clocks,
) -> Result<ApplyStats, Error> {
    if let Some(audit) = clocks.audit.as_mut() {
        if stamped.apply.is_none() && !plan.commands.is_empty() {
            stamped.apply = Some(audit.write_stamp(sink).await?);
        }
    }
    if stamped.tag.is_none() && plan.invalidates_tags() {
        let key = format!(
            "{}{}",
            sink.prefix(),
            evictd_client::protocol::TAG_STAMP_KEY
        );
        stamped.tag = Some(clocks.tags.next(sink, &key).await?);
    }
    sink.apply(plan, *stamped).await
}

/// Where the stamps written ahead of a plan's commands come from: the
/// consistency checker's apply stamp (`[audit]`, which then samples what
/// the plan invalidated) and, when it invalidates tags, the tag stamp.
struct Clocks {
    audit: Option<Sampler>,
    tags: StampClock,
}

impl Clocks {
    /// Offers what `plan`, applied with `stamped`, invalidated to the
    /// checker.
    fn offer(&self, plan: &Plan, stamped: Stamped) {
        if let (Some(audit), Some(stamp)) = (&self.audit, stamped.apply) {
            audit.offer(plan, stamp);
        }
    }
}

/// A stamp that only grows: microseconds of evictd's clock, kept above the
/// last one given, which is read from `key` in Redis the first time (so it
/// grows across restarts too). The apply stamp (`[audit]`) and the tag
/// stamp ([`evictd_client::protocol::TAG_STAMP_KEY`]) each keep one.
#[derive(Default)]
pub(crate) struct StampClock {
    last: Option<u64>,
}

impl StampClock {
    /// The next stamp; `key` is the full key the stamps are written to.
    pub(crate) async fn next(&mut self, sink: &mut RedisSink, key: &str) -> Result<u64, Error> {
        let last = match self.last {
            Some(last) => last,
            None => sink
                .get(key)
                .await?
                .and_then(|found| found.parse().ok())
                .unwrap_or(0),
        };
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let stamp = u64::try_from(since.as_micros())
            .unwrap_or(u64::MAX)
            .max(last + 1);
        self.last = Some(stamp);
        Ok(stamp)
    }
}

fn replace_if_changed(current: &mut Option<String>, state: Option<String>) -> bool {
    let changed = *current != state;
    *current = state;
    changed
}

/// Metrics and the lag histogram for one applied plan.
fn record(plan: &Plan, stats: &ApplyStats, took: Duration, lag: &Mutex<Lag>) {
    metrics::counter!(telemetry::CHANGES_APPLIED).increment(plan.changes);
    for (table, mode, keys) in &stats.invalidated {
        metrics::counter!(telemetry::KEYS_INVALIDATED, "table" => table.to_string(), "mode" => mode.as_str()).increment(*keys);
    }
    metrics::counter!(telemetry::REDIS_COMMANDS, "outcome" => "ok").increment(stats.commands);
    metrics::counter!(telemetry::SCAN_PAGES).increment(stats.scan_pages);
    for command in &plan.commands {
        if let Command::UnlinkMatching {
            prefix: true,
            origin,
            ..
        } = command
        {
            let table = plan
                .tables
                .as_ref()
                .and_then(|tables| tables.get(origin.0 as usize))
                .map_or_else(|| "?".to_owned(), ToString::to_string);
            metrics::counter!(telemetry::PREFIX_DELETES, "table" => table).increment(1);
        }
    }
    #[allow(clippy::cast_precision_loss)]
    metrics::histogram!(telemetry::BATCH_COMMANDS).record(plan.commands.len() as f64);
    metrics::histogram!(telemetry::APPLY_DURATION).record(took.as_secs_f64());
    if plan.commit_time.is_none() && plan.sent_time.is_none() {
        return;
    }
    let now = std::time::SystemTime::now();
    let since = |time: std::time::SystemTime| now.duration_since(time).unwrap_or_default();
    let mut lag = lag
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(commit_time) = plan.commit_time {
        let behind = since(commit_time);
        metrics::histogram!(telemetry::COMMIT_TO_APPLY_LAG).record(behind.as_secs_f64());
        lag.commit_to_apply.record(behind);
    }
    if let Some(sent_time) = plan.sent_time {
        let behind = since(sent_time);
        metrics::histogram!(telemetry::SENT_TO_APPLY_LAG).record(behind.as_secs_f64());
        lag.sent_to_apply.record(behind);
    }
}
