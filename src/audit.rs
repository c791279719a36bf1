//! How exact the caches are, measured: the continuous checker `evictd run`
//! starts with `[audit] enabled = true`, and the rows' side of the one-off
//! sweep `evictd audit` (see `src/lifecycle.rs`).
//!
//! The apply task samples the keys each applied batch deleted or refreshed
//! ([`Sampler`]); after `[audit] delay_ms` the checker looks at each:
//!
//! - a deleted key is *consistent* when it is absent, holds a fill's lease,
//!   or holds a value whose fill recorded an apply stamp at or past the
//!   batch's (the fill read the database after the invalidation began); a
//!   recorded stamp before the batch's is *stale*; a value without one is
//!   *unverifiable* (see [`evictd_client::protocol::AUDIT_STAMP_KEY`]);
//! - a refreshed key is *consistent* when it is absent or equals the value
//!   its refresh renders from the row as the database holds it now, once
//!   evictd has applied everything committed before that read; *stale*
//!   when it differs from a row that did not change meanwhile.
//!
//! Stamps are evictd's clock in microseconds, written to Redis before each
//! sampled batch's commands and kept above the stamp found there, so they
//! grow across restarts and fail-overs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use evictd_client::protocol::{Stored, AUDIT_STAMP_KEY};
use evictd_client::Connection;
use rand::Rng as _;
use tokio::sync::{mpsc, watch};

use crate::apply::{Progress, RedisSink};
use crate::change::{Checkpoint, Datum, Lsn, Row, TableName};
use crate::config::{AuditConfig, Config, SecretUrl, SourceKind};
use crate::error::{Error, ErrorKind};
use crate::mapping::eval::render_refresh;
use crate::mapping::{Mappings, OriginId, Refresh, TableMapping};
use crate::plan::{Command, Plan};
use crate::source::postgres::changes::datum_of;
use crate::telemetry;

/// The hash (with the prefix in front) of check outcomes per minute, for
/// `evictd status`: fields `<minute since 1970>:<outcome>`.
pub const CHECKS_KEY: &str = "evictd:audit:checks";

/// How long outcomes stay in [`CHECKS_KEY`].
const KEEP_MINUTES: u64 = 120;

/// Longest wait for evictd to apply what a refresh check read.
const APPLIED_WAIT: Duration = Duration::from_secs(30);

/// Most samples checked at once.
const CHECKS_AT_ONCE: usize = 64;

/// What a check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    Consistent,
    Stale,
    Unverifiable,
}

impl Outcome {
    pub const ALL: [Outcome; 3] = [Outcome::Consistent, Outcome::Stale, Outcome::Unverifiable];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Consistent => "consistent",
            Outcome::Stale => "stale",
            Outcome::Unverifiable => "unverifiable",
        }
    }
}

/// One key an applied batch deleted or refreshed, to be checked later.
#[derive(Debug)]
pub struct Sample {
    /// As the mappings render it, without the prefix.
    key: String,
    /// For a refresh, the value evictd wrote.
    refreshed: Option<String>,
    origin: OriginId,
    table: Arc<str>,
    /// The origin tables of the mappings the plan was made with: `origin`
    /// means something only under those (a reload makes new ones).
    made_with: Option<Arc<[Arc<str>]>>,
    /// The apply stamp written before the batch's commands.
    stamp: u64,
    checkpoint: Option<Checkpoint>,
    applied: Instant,
}

/// The apply task's side: stamps each batch and offers its keys to the
/// checker, never waiting for it.
pub struct Sampler {
    share: f64,
    stamp_key: String,
    /// The stamps written, above the one found in Redis.
    clock: crate::apply::StampClock,
    samples: mpsc::Sender<Sample>,
}

impl Sampler {
    /// Writes the next apply stamp, before a batch's commands.
    pub async fn write_stamp(&mut self, sink: &mut RedisSink) -> Result<u64, Error> {
        let stamp = self.clock.next(sink, &self.stamp_key).await?;
        sink.set(&self.stamp_key, &stamp.to_string()).await?;
        Ok(stamp)
    }

    /// Offers a share of the keys `plan` deleted or refreshed under
    /// `stamp`; a full queue drops them (counted).
    pub fn offer(&self, plan: &Plan, stamp: u64) {
        let mut rng = rand::rng();
        let applied = Instant::now();
        for command in &plan.commands {
            let (key, refreshed, origin) = match command {
                Command::Unlink { key, origin } => (key, None, *origin),
                Command::Set {
                    key, value, origin, ..
                } => (key, Some(value), *origin),
                _ => continue,
            };
            if !rng.random_bool(self.share) {
                continue;
            }
            let table = plan
                .tables
                .as_ref()
                .and_then(|tables| tables.get(origin.0 as usize).cloned())
                .unwrap_or_else(|| Arc::from("?"));
            let sample = Sample {
                key: key.clone(),
                refreshed: refreshed.cloned(),
                origin,
                table,
                made_with: plan.tables.clone(),
                stamp,
                checkpoint: plan.checkpoint.clone(),
                applied,
            };
            if self.samples.try_send(sample).is_err() {
                metrics::counter!(telemetry::CONSISTENCY_DROPPED).increment(1);
            }
        }
        metrics::gauge!(telemetry::CONSISTENCY_QUEUE)
            .set((self.samples.max_capacity() - self.samples.capacity()) as f64);
    }
}

/// Starts the checker of a running pipeline: the sampler for its apply
/// task, and the checker's task, which ends with the pipeline.
pub fn start(
    config: &Config,
    mappings: watch::Receiver<Arc<Mappings>>,
    progress: watch::Receiver<Progress>,
    stop: watch::Receiver<bool>,
) -> Option<Sampler> {
    let AuditConfig {
        enabled,
        sample,
        delay_ms,
        queue,
    } = config.audit;
    if !enabled {
        return None;
    }
    let (samples, receiver) = mpsc::channel(queue);
    let prefix = config.redis.prefix.clone();
    let checker = Checker {
        delay: Duration::from_millis(delay_ms),
        redis_config: config.redis.clone(),
        redis: None,
        database: (config.source == SourceKind::Postgres)
            .then(|| config.postgres.url.clone().map(Database::new))
            .flatten(),
        mappings,
        progress,
        tally: Tally::new(format!("{prefix}{CHECKS_KEY}")),
        prefix: prefix.clone(),
    };
    tokio::spawn(checker.run(receiver, stop));
    Some(Sampler {
        share: sample,
        stamp_key: format!("{prefix}{AUDIT_STAMP_KEY}"),
        clock: crate::apply::StampClock::default(),
        samples,
    })
}

/// Microseconds since 1970 by this machine's clock.
fn now_micros() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
}

struct Checker {
    prefix: String,
    delay: Duration,
    redis_config: crate::config::RedisConfig,
    redis: Option<Connection>,
    /// The database refreshes are checked against (Postgres source only).
    database: Option<Database>,
    /// The mappings in effect (a reload replaces them).
    mappings: watch::Receiver<Arc<Mappings>>,
    progress: watch::Receiver<Progress>,
    tally: Tally,
}

/// What a check found, and why.
pub struct Verdict {
    pub outcome: Outcome,
    pub why: String,
    /// The row's identity, when the check read it.
    pub row: Option<String>,
}

impl Verdict {
    fn new(outcome: Outcome, why: impl Into<String>) -> Verdict {
        Verdict {
            outcome,
            why: why.into(),
            row: None,
        }
    }
}

impl Checker {
    async fn run(mut self, mut samples: mpsc::Receiver<Sample>, mut stop: watch::Receiver<bool>) {
        let mut next: Option<Sample> = None;
        loop {
            let first = match next.take() {
                Some(sample) => sample,
                None => tokio::select! {
                    sample = samples.recv() => match sample {
                        Some(sample) => sample,
                        None => break,
                    },
                    _ = stop.wait_for(|stop| *stop) => break,
                },
            };
            tokio::select! {
                () = tokio::time::sleep_until((first.applied + self.delay).into()) => {}
                _ = stop.wait_for(|stop| *stop) => break,
            }
            // Every sample due by now, up to a bound, is checked together.
            let mut due = vec![first];
            while due.len() < CHECKS_AT_ONCE {
                match samples.try_recv() {
                    Ok(sample) if sample.applied + self.delay <= Instant::now() => due.push(sample),
                    Ok(sample) => {
                        next = Some(sample);
                        break;
                    }
                    Err(_) => break,
                }
            }
            self.check_all(&due).await;
        }
    }

    async fn check_all(&mut self, due: &[Sample]) {
        if self.redis.is_none() {
            match connect_redis(&self.redis_config).await {
                Ok(connection) => self.redis = Some(connection),
                Err(error) => tracing::debug!(%error, "the consistency checker cannot reach Redis"),
            }
        }
        if let Some(database) = &mut self.database {
            let tables = due.iter().filter(|s| s.refreshed.is_some());
            for sample in tables {
                if let Ok(table) = TableName::parse(&sample.table) {
                    database.learn(&table).await;
                }
            }
        }
        let verdicts =
            futures_util::future::join_all(due.iter().map(|sample| self.check(sample))).await;
        for (sample, verdict) in due.iter().zip(verdicts) {
            metrics::counter!(telemetry::CONSISTENCY_CHECKS, "outcome" => verdict.outcome.as_str())
                .increment(1);
            self.tally.count(verdict.outcome);
            if verdict.outcome == Outcome::Stale {
                tracing::warn!(
                    key = %sample.key,
                    table = %sample.table,
                    row = verdict.row.as_deref().unwrap_or("?"),
                    checkpoint = %checkpoint_text(sample.checkpoint.as_ref()),
                    stamp = sample.stamp,
                    invalidated_ago_ms = sample.applied.elapsed().as_millis() as u64,
                    why = %verdict.why,
                    "stale cache entry"
                );
            } else {
                tracing::debug!(key = %sample.key, outcome = verdict.outcome.as_str(), why = %verdict.why, "consistency check");
            }
        }
        if let Some(redis) = &mut self.redis {
            if let Err(error) = self.tally.flush(redis).await {
                tracing::debug!(%error, "cannot record consistency checks in Redis");
                self.redis = None;
            }
        }
    }

    async fn check(&self, sample: &Sample) -> Verdict {
        let Some(redis) = self.redis.clone() else {
            return Verdict::new(Outcome::Unverifiable, "Redis is unreachable");
        };
        let full = format!("{}{}", self.prefix, sample.key);
        match &sample.refreshed {
            None => check_deleted(redis, &full, sample.stamp).await,
            Some(value) => self.check_refreshed(redis, &full, sample, value).await,
        }
    }

    async fn check_refreshed(
        &self,
        mut redis: Connection,
        full: &str,
        sample: &Sample,
        written: &str,
    ) -> Verdict {
        let Some(database) = &self.database else {
            return Verdict::new(
                Outcome::Unverifiable,
                "refreshes are checked against Postgres, which a Kafka source does not read",
            );
        };
        let table = match TableName::parse(&sample.table) {
            Ok(table) => table,
            Err(why) => return Verdict::new(Outcome::Unverifiable, why),
        };
        let mappings = self.mappings.borrow().clone();
        let same_set = sample
            .made_with
            .as_ref()
            .is_some_and(|tables| Arc::ptr_eq(tables, &mappings.origin_tables()));
        if !same_set {
            return Verdict::new(
                Outcome::Unverifiable,
                "the mappings were reloaded since the refresh was written",
            );
        }
        let refresh = mappings
            .table(&table)
            .and_then(|mapping| mapping.refresh.iter().find(|r| r.origin == sample.origin));
        let Some(refresh) = refresh else {
            return Verdict::new(Outcome::Unverifiable, "the refresh is no longer mapped");
        };
        let filter = match key_filter(refresh, written) {
            Ok(filter) => filter,
            Err(why) => return Verdict::new(Outcome::Unverifiable, why),
        };
        let progress = self.progress.clone();
        let applied = |lsn: Lsn| {
            let mut progress = progress.clone();
            async move {
                let caught_up = tokio::time::timeout(APPLIED_WAIT, async {
                    progress
                        .wait_for(|progress| progress.flush_lsn >= lsn)
                        .await
                        .is_ok()
                })
                .await;
                match caught_up {
                    Ok(true) => Ok(()),
                    _ => Err(format!(
                        "evictd had not applied through {lsn} within {APPLIED_WAIT:?}"
                    )),
                }
            }
        };
        let target = Target {
            table: &table,
            refresh,
            filter: &filter,
            full,
        };
        verify_refresh(database, &mut redis, &target, applied).await
    }
}

/// A refresh key to verify and the row it stands for.
pub struct Target<'a> {
    pub table: &'a TableName,
    pub refresh: &'a Refresh,
    /// Selects the row (see [`key_filter`]).
    pub filter: &'a str,
    /// The key with the prefix.
    pub full: &'a str,
}

/// Whether a refresh key holds what its row renders: read the row, wait
/// until evictd `applied` everything committed before that read, read the
/// key; a difference is stale only if the row did not change meanwhile
/// (else again, three times at most).
pub async fn verify_refresh<F>(
    database: &Database,
    redis: &mut Connection,
    target: &Target<'_>,
    applied: impl Fn(Lsn) -> F,
) -> Verdict
where
    F: std::future::Future<Output = Result<(), String>>,
{
    let read = || database.render(target.table, target.refresh, target.filter);
    let mut verdict = Verdict::new(Outcome::Unverifiable, "the row kept changing");
    verdict.row = Some(target.filter.to_owned());
    for _ in 0..3 {
        let (expected, lsn) = match read().await {
            Ok(read) => read,
            Err(why) => return Verdict::new(Outcome::Unverifiable, why),
        };
        if let Err(why) = applied(lsn).await {
            verdict.why = why;
            return verdict;
        }
        let held = match get_value(redis, target.full).await {
            Ok(None) => {
                verdict.outcome = Outcome::Consistent;
                verdict.why = "absent".into();
                return verdict;
            }
            Ok(Some(held)) => held,
            Err(why) => return Verdict::new(Outcome::Unverifiable, why),
        };
        if Some(&held) == expected.as_ref() {
            verdict.outcome = Outcome::Consistent;
            verdict.why = "equals the row".into();
            return verdict;
        }
        let again = match read().await {
            Ok((again, _)) => again,
            Err(why) => return Verdict::new(Outcome::Unverifiable, why),
        };
        if Some(&held) == again.as_ref() {
            verdict.outcome = Outcome::Consistent;
            verdict.why = "equals the row after a later change".into();
            return verdict;
        }
        if again == expected {
            verdict.outcome = Outcome::Stale;
            verdict.why = match expected {
                Some(expected) => format!("holds {held}, but the row renders {expected}"),
                None => format!("holds {held}, but the row is gone"),
            };
            return verdict;
        }
    }
    verdict
}

/// Rows `evictd audit` reads per round trip.
const SWEEP_PAGE: u64 = 500;

/// What `evictd audit` found for one refresh of one table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepLine {
    pub table: String,
    /// The refresh's key template.
    pub key: String,
    pub rows: u64,
    pub consistent: u64,
    /// Keys Redis does not hold (expired, evicted, never written): not
    /// stale, nothing to serve.
    pub absent: u64,
    pub stale: u64,
    pub unverifiable: u64,
}

/// A stale entry `evictd audit` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub key: String,
    pub table: String,
    /// The row, as the SQL condition that selects it.
    pub row: String,
    pub why: String,
}

/// What `evictd audit` found of the values clients filled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FillSweep {
    /// Cache values read (not evictd's own keys or tag sets).
    pub values: u64,
    /// Of those, values whose fill recorded an apply stamp.
    pub recorded: u64,
    /// Logged invalidations carrying an apply stamp, compared against.
    pub invalidations: u64,
    pub stale: u64,
}

/// What `evictd audit` found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    pub lines: Vec<SweepLine>,
    /// The client fills, when the whole keyspace was swept (no `--table`).
    pub fills: Option<FillSweep>,
    pub stale: Vec<Finding>,
    /// Why some entries could not be decided (one example per reason).
    pub unverifiable: Vec<Finding>,
}

/// `evictd audit`: every row of each mapped table with refreshes (or of
/// `only`, at most `limit` rows a table) rendered as its refreshes would
/// write it and compared with Redis. A difference is confirmed as
/// [`verify_refresh`] does, waiting for evictd's continuity record (up to
/// [`APPLIED_WAIT`]) to pass what the row's read saw; `progress` hears
/// about each page.
pub async fn sweep(
    config: &Config,
    mappings: &Mappings,
    only: Option<&TableName>,
    limit: Option<u64>,
    mut progress: impl FnMut(&SweepLine),
) -> Result<Sweep, Error> {
    let (url, tables) = refreshed_tables(config, mappings, only, "audit", "compare")?;
    let mut database = Database::new(url);
    let mut redis = connect_redis(&config.redis).await?;
    let record = format!(
        "{}{}",
        config.redis.prefix,
        crate::continuity::record_key(&config.postgres.slot)
    );
    let reader = redis.clone();
    let applied = |lsn: Lsn| {
        let mut redis = reader.clone();
        let record = record.clone();
        async move { record_passes(&mut redis, &record, lsn).await }
    };
    let mut sweep = Sweep::default();
    for mapping in tables {
        let table = &*mapping.table;
        database.learn(table).await;
        let columns: Vec<&str> = {
            let mut columns: Vec<&str> = Vec::new();
            for refresh in &mapping.refresh {
                for column in refresh_columns(refresh) {
                    if !columns.contains(&column) {
                        columns.push(column);
                    }
                }
            }
            columns
        };
        let mut lines: Vec<SweepLine> = mapping
            .refresh
            .iter()
            .map(|refresh| SweepLine {
                table: table.to_string(),
                key: refresh.key.source().to_owned(),
                ..SweepLine::default()
            })
            .collect();
        let select = format!(
            "{}{}",
            select_columns(table, &columns),
            limit.map_or_else(String::new, |limit| format!(" limit {limit}"))
        );
        database
            .query(&format!(
                "begin isolation level repeatable read read only; declare evictd_audit no scroll cursor for {select}"
            ))
            .await
            .map_err(|why| sweep_error(table, &why))?;
        loop {
            let texts = database
                .query(&format!("fetch {SWEEP_PAGE} from evictd_audit"))
                .await
                .map_err(|why| sweep_error(table, &why))?;
            if texts.is_empty() {
                break;
            }
            let rows = database
                .rows(table, &columns, texts)
                .map_err(|why| sweep_error(table, &why))?;
            for (refresh, line) in mapping.refresh.iter().zip(&mut lines) {
                let rendered: Vec<Option<(String, String)>> = rows
                    .iter()
                    .map(|row| render_refresh(refresh, row))
                    .collect();
                let held = futures_util::future::join_all(rendered.iter().map(|rendered| {
                    let mut redis = redis.clone();
                    let prefix = &config.redis.prefix;
                    async move {
                        match rendered {
                            Some((key, _)) => {
                                get_value(&mut redis, &format!("{prefix}{key}")).await
                            }
                            None => Ok(None),
                        }
                    }
                }))
                .await;
                for (row, (rendered, held)) in rows.iter().zip(rendered.iter().zip(held)) {
                    line.rows += 1;
                    let Some((key, expected)) = rendered else {
                        line.unverifiable += 1;
                        note_once(
                            &mut sweep.unverifiable,
                            table,
                            "-",
                            "a row whose refresh cannot be rendered (NULL in its key)",
                        );
                        continue;
                    };
                    match held {
                        Ok(None) => line.absent += 1,
                        Ok(Some(held)) if held == *expected => line.consistent += 1,
                        Ok(Some(_)) => {
                            // Perhaps a change in flight: confirm as the
                            // checker does.
                            let Some(filter) = row_filter(refresh, row) else {
                                line.unverifiable += 1;
                                continue;
                            };
                            let full = format!("{}{key}", config.redis.prefix);
                            let target = Target {
                                table,
                                refresh,
                                filter: &filter,
                                full: &full,
                            };
                            let verdict =
                                verify_refresh(&database, &mut redis, &target, applied).await;
                            match verdict.outcome {
                                Outcome::Consistent => line.consistent += 1,
                                Outcome::Stale => {
                                    line.stale += 1;
                                    sweep.stale.push(Finding {
                                        key: key.clone(),
                                        table: table.to_string(),
                                        row: filter,
                                        why: verdict.why,
                                    });
                                }
                                Outcome::Unverifiable => {
                                    line.unverifiable += 1;
                                    note_once(&mut sweep.unverifiable, table, key, &verdict.why);
                                }
                            }
                        }
                        Err(why) => {
                            line.unverifiable += 1;
                            note_once(&mut sweep.unverifiable, table, key, &why);
                        }
                    }
                }
                progress(line);
            }
        }
        database
            .query("close evictd_audit; commit")
            .await
            .map_err(|why| sweep_error(table, &why))?;
        sweep.lines.extend(lines);
    }
    // On a Cluster the fills are left to the continuous checker.
    if only.is_none() && matches!(redis, Connection::Single(_)) {
        sweep.fills = Some(sweep_fills(config, &mut redis, &mut sweep.stale).await?);
    }
    Ok(sweep)
}

/// The database to read and the mapped tables with refreshes (or `only`,
/// which must be one), for a command (`audit`, `warm`) that reads them;
/// `doing` says what there would be nothing of.
pub fn refreshed_tables<'m>(
    config: &Config,
    mappings: &'m Mappings,
    only: Option<&TableName>,
    command: &str,
    doing: &str,
) -> Result<(SecretUrl, Vec<&'m TableMapping>), Error> {
    let Some(url) = config.postgres.url.clone() else {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "evictd {command} reads the mapped tables from Postgres: postgres.url is not set"
            ),
        ));
    };
    let tables: Vec<&TableMapping> = mappings
        .tables()
        .filter(|mapping| !mapping.refresh.is_empty())
        .filter(|mapping| only.is_none_or(|only| *mapping.table == *only))
        .collect();
    if let Some(only) = only {
        if tables.is_empty() {
            let why = match mappings.table(only) {
                Some(_) => format!("{only} has no [[table.refresh]] entries: nothing to {doing}"),
                None => format!("{only} is not mapped"),
            };
            return Err(Error::new(ErrorKind::Config, why));
        }
    }
    Ok((url, tables))
}

/// Client fills against the broadcast log: a value whose fill recorded an
/// apply stamp below that of a logged invalidation of its key (by key or
/// by pattern) was loaded before that invalidation and stored after it.
/// Reaches as far back as the log (`redis.l1_log_len`) and the stamps in
/// it (batches applied while the checker ran); tag invalidations are not
/// compared (a filled key's tags are not known once its tag set is gone).
async fn sweep_fills(
    config: &Config,
    redis: &mut Connection,
    stale: &mut Vec<Finding>,
) -> Result<FillSweep, Error> {
    let prefix = &config.redis.prefix;
    let mut log = evictd_client::Log::new(redis.clone(), prefix);
    let count = usize::try_from(config.redis.l1_log_len.min(1_000_000)).unwrap_or(1_000_000);
    let messages = log
        .recent(count)
        .await
        .map_err(|e| Error::redis("cannot read the broadcast log", e))?;
    let mut by_key: HashMap<String, u64> = HashMap::new();
    let mut by_pattern: Vec<(String, u64)> = Vec::new();
    let mut found = FillSweep::default();
    for message in &messages {
        let Some(stamp) = message.stamp else {
            continue;
        };
        found.invalidations += 1;
        for key in &message.keys {
            let at = by_key.entry(key.clone()).or_default();
            *at = (*at).max(stamp);
        }
        by_pattern.extend(message.patterns.iter().map(|p| (p.clone(), stamp)));
    }
    let mut glob = String::new();
    crate::mapping::template::escape_glob(prefix, &mut glob);
    glob.push('*');
    let own = format!("{prefix}evictd:");
    let tags = format!("{prefix}{}", evictd_client::protocol::TAG_NAMESPACE);
    let keys = scan_all(redis, &glob).await?;
    for full in keys {
        if full.starts_with(&own) || full.starts_with(&tags) {
            continue;
        }
        let raw: Option<String> = redis::cmd("GET")
            .arg(&full)
            .query_async(redis)
            .await
            .unwrap_or(None);
        let Some(raw) = raw else { continue };
        found.values += 1;
        let Some(recorded) = Stored::stamp(&raw) else {
            continue;
        };
        found.recorded += 1;
        let key = &full[prefix.len()..];
        let invalidated = by_pattern
            .iter()
            .filter(|(pattern, _)| evictd_client::protocol::glob_matches(pattern, key))
            .map(|(_, stamp)| *stamp)
            .chain(by_key.get(key).copied())
            .max();
        if let Some(invalidated) = invalidated.filter(|at| *at > recorded) {
            found.stale += 1;
            stale.push(Finding {
                key: key.to_owned(),
                table: "-".into(),
                row: "-".into(),
                why: format!("holds a fill that read apply stamp {recorded}, before the invalidation at stamp {invalidated} in the broadcast log: it was loaded before the change and stored after its invalidation"),
            });
        }
    }
    Ok(found)
}

/// Every key matching `glob` on a standalone Redis.
async fn scan_all(redis: &mut Connection, glob: &str) -> Result<Vec<String>, Error> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, page): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(glob)
            .arg("COUNT")
            .arg(1000)
            .query_async(redis)
            .await
            .map_err(|e| Error::redis("cannot SCAN the keyspace", e))?;
        keys.extend(page);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

/// The summary table `evictd audit` prints, one line per refresh.
pub fn table_text(sweep: &Sweep) -> String {
    let header = [
        "table",
        "key",
        "rows",
        "consistent",
        "absent",
        "stale",
        "unverifiable",
    ];
    let mut rows: Vec<[String; 7]> = vec![header.map(str::to_owned)];
    for line in &sweep.lines {
        rows.push([
            line.table.clone(),
            line.key.clone(),
            line.rows.to_string(),
            line.consistent.to_string(),
            line.absent.to_string(),
            line.stale.to_string(),
            line.unverifiable.to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|column| rows.iter().map(|row| row[column].len()).max().unwrap_or(0))
        .collect();
    let mut text = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(column, (cell, width))| {
                if column < 2 {
                    format!("{cell:<width$}")
                } else {
                    format!("{cell:>width$}")
                }
            })
            .collect();
        text.push_str(cells.join("  ").trim_end());
        text.push('\n');
    }
    text
}

fn sweep_error(table: &TableName, why: &str) -> Error {
    Error::new(
        ErrorKind::PostgresServer { transient: false },
        format!("cannot read {table}: {why}"),
    )
}

/// Keeps the first entry of each reason.
fn note_once(notes: &mut Vec<Finding>, table: &TableName, key: &str, why: &str) {
    if notes.iter().any(|note| note.why == why) {
        return;
    }
    notes.push(Finding {
        key: key.to_owned(),
        table: table.to_string(),
        row: String::new(),
        why: why.to_owned(),
    });
}

/// Waits until the continuity record `record` is at or past `lsn`.
async fn record_passes(redis: &mut Connection, record: &str, lsn: Lsn) -> Result<(), String> {
    let deadline = Instant::now() + APPLIED_WAIT;
    loop {
        let text: Option<String> = redis::cmd("GET")
            .arg(record)
            .query_async(redis)
            .await
            .map_err(|error| format!("GET failed: {error}"))?;
        let applied = text
            .as_deref()
            .and_then(crate::continuity::Remembered::decode)
            .map(|remembered| remembered.applied);
        if applied >= Some(lsn) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "evictd had not applied through {lsn} within {APPLIED_WAIT:?} (is evictd run streaming?)"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The SQL condition that selects `row` by the refresh key's columns.
fn row_filter(refresh: &Refresh, row: &Row) -> Option<String> {
    let values = refresh
        .key
        .columns()
        .map(|column| Some((column, row.get(column).canonical_text()?)))
        .collect::<Option<Vec<_>>>()?;
    Some(equalities(values))
}

/// The check of a deleted key: see the module's documentation.
async fn check_deleted(mut redis: Connection, full: &str, stamp: u64) -> Verdict {
    let raw: Option<String> = match redis::cmd("GET").arg(full).query_async(&mut redis).await {
        Ok(raw) => raw,
        Err(error) => return Verdict::new(Outcome::Unverifiable, format!("GET failed: {error}")),
    };
    let Some(raw) = raw else {
        return Verdict::new(Outcome::Consistent, "absent");
    };
    if Stored::parse(&raw) == Stored::Loading {
        return Verdict::new(Outcome::Consistent, "a fill is loading it");
    }
    match Stored::stamp(&raw) {
        Some(recorded) if recorded >= stamp => Verdict::new(
            Outcome::Consistent,
            format!("refilled after the invalidation (stamp {recorded} >= {stamp})"),
        ),
        Some(recorded) => Verdict::new(
            Outcome::Stale,
            format!("holds a value whose fill read stamp {recorded}, before the invalidation's {stamp}: it was loaded before the change and stored after its invalidation"),
        ),
        None => Verdict::new(
            Outcome::Unverifiable,
            "holds a value whose fill recorded no apply stamp",
        ),
    }
}

/// The value `full` holds for a reader: `None` when absent or loading.
async fn get_value(redis: &mut Connection, full: &str) -> Result<Option<String>, String> {
    let raw: Option<String> = redis::cmd("GET")
        .arg(full)
        .query_async(redis)
        .await
        .map_err(|error| format!("GET failed: {error}"))?;
    Ok(raw.and_then(|raw| match Stored::parse(&raw) {
        Stored::Value(value) | Stored::Reloading(value) => Some(value.to_owned()),
        Stored::Loading => None,
    }))
}

/// A connection for readers of any key (the checker, `status`, `audit`).
pub async fn connect_redis(config: &crate::config::RedisConfig) -> Result<Connection, Error> {
    let url = config.url.expose();
    if let Some(nodes) = crate::apply::cluster::seed_nodes(url) {
        let client = redis::cluster::ClusterClient::new(nodes)
            .map_err(|e| Error::redis("invalid redis.url", e))?;
        let connection = client
            .get_async_connection()
            .await
            .map_err(|e| Error::redis("cannot connect to the Redis Cluster", e))?;
        return Ok(Connection::Cluster(connection));
    }
    let client = crate::apply::redis::client(config)?;
    let connection = redis::aio::ConnectionManager::new(client)
        .await
        .map_err(|e| Error::redis("cannot connect to Redis", e))?;
    Ok(Connection::Single(connection))
}

/// The SQL condition that selects the row a refresh value was rendered
/// from: the key's columns equal to the value's.
fn key_filter(refresh: &Refresh, written: &str) -> Result<String, String> {
    let value: serde_json::Map<String, serde_json::Value> = serde_json::from_str(written)
        .map_err(|e| format!("the refresh value is not a JSON object: {e}"))?;
    let values = refresh.key.columns().map(|column| {
        let text = match value.get(column) {
            None => {
                return Err(format!(
                    "the refresh value does not hold `{column}`, a column of its key"
                ))
            }
            Some(serde_json::Value::String(text)) => text.clone(),
            Some(serde_json::Value::Bool(value)) => value.to_string(),
            Some(serde_json::Value::Number(number)) => number.to_string(),
            Some(_) => return Err(format!("`{column}` is not a scalar in the refresh value")),
        };
        Ok((column, text))
    });
    Ok(equalities(values.collect::<Result<Vec<_>, String>>()?))
}

/// `"a" = '1' and "b" = 'x'` (or `true` for no column): the SQL condition
/// that each column equals its text.
fn equalities<T: AsRef<str>>(values: impl IntoIterator<Item = (impl AsRef<str>, T)>) -> String {
    let conditions: Vec<String> = values
        .into_iter()
        .map(|(column, text)| {
            format!(
                "{} = {}",
                quote_ident(column.as_ref()),
                quote_literal(text.as_ref())
            )
        })
        .collect();
    if conditions.is_empty() {
        "true".into()
    } else {
        conditions.join(" and ")
    }
}

pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `select "a", "b" from "schema"."table"`.
pub fn select_columns(table: &TableName, columns: &[&str]) -> String {
    format!(
        "select {} from {}",
        columns
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", "),
        quote_table(table)
    )
}

pub fn quote_table(table: &TableName) -> String {
    format!(
        "{}.{}",
        quote_ident(&table.schema),
        quote_ident(&table.name)
    )
}

fn checkpoint_text(checkpoint: Option<&Checkpoint>) -> String {
    match checkpoint {
        Some(Checkpoint::Lsn(lsn)) => lsn.to_string(),
        Some(Checkpoint::Offsets(offsets)) => format!("{offsets:?}"),
        None => "-".into(),
    }
}

/// The database as the checks read it: rows in the stream's own terms.
pub struct Database {
    url: SecretUrl,
    client: std::sync::Mutex<Option<Arc<tokio_postgres::Client>>>,
    /// Each table's column types, learned once.
    types: HashMap<TableName, Arc<HashMap<String, u32>>>,
}

impl Database {
    pub fn new(url: SecretUrl) -> Database {
        Database {
            url,
            client: std::sync::Mutex::new(None),
            types: HashMap::new(),
        }
    }

    /// The connection, made again after it closed.
    async fn client(&self) -> Result<Arc<tokio_postgres::Client>, String> {
        let lock = || {
            self.client
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if let Some(client) = lock().as_ref().filter(|client| !client.is_closed()) {
            return Ok(Arc::clone(client));
        }
        let client = crate::catalog::connect(&self.url)
            .await
            .map(Arc::new)
            .map_err(|e| error_chain(&e))?;
        *lock() = Some(Arc::clone(&client));
        Ok(client)
    }

    /// Learns `table`'s column types, once.
    pub async fn learn(&mut self, table: &TableName) {
        if self.types.contains_key(table) {
            return;
        }
        let sql = format!(
            "select attname, atttypid::int8::text from pg_attribute where attrelid = {}::regclass and attnum > 0 and not attisdropped",
            quote_literal(&quote_table(table))
        );
        let Ok(rows) = self.query(&sql).await else {
            return;
        };
        let types = rows
            .into_iter()
            .filter_map(|row| {
                let name = row.first()?.clone()?;
                let oid = row.get(1)?.as_deref()?.parse().ok()?;
                Some((name, oid))
            })
            .collect();
        self.types.insert(table.clone(), Arc::new(types));
    }

    /// Runs `sql` (one statement, or several: the rows of them all), every
    /// value as text.
    pub async fn query(&self, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
        let client = self.client().await?;
        let messages = client
            .simple_query(sql)
            .await
            .map_err(|e| error_chain(&e))?;
        Ok(messages
            .into_iter()
            .filter_map(|message| match message {
                tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                    (0..row.len())
                        .map(|index| row.get(index).map(str::to_owned))
                        .collect(),
                ),
                _ => None,
            })
            .collect())
    }

    /// The rows of `table` matching `filter` (at most `limit`) as the
    /// stream would show them, `columns` of each.
    pub fn rows(
        &self,
        table: &TableName,
        columns: &[&str],
        texts: Vec<Vec<Option<String>>>,
    ) -> Result<Vec<Row>, String> {
        let types = self
            .types
            .get(table)
            .ok_or_else(|| format!("cannot read the columns of {table}"))?;
        let names: Arc<[Arc<str>]> = columns.iter().map(|c| Arc::from(*c)).collect();
        let oids = columns
            .iter()
            .map(|column| {
                types
                    .get(*column)
                    .copied()
                    .ok_or_else(|| format!("{table} has no column `{column}`"))
            })
            .collect::<Result<Vec<u32>, String>>()?;
        Ok(texts
            .into_iter()
            .map(|texts| {
                let values = oids
                    .iter()
                    .zip(texts)
                    .map(|(&oid, text)| match text {
                        Some(text) => datum_of(oid, &text),
                        None => Datum::Null,
                    })
                    .collect();
                Row::new(names.clone(), values)
            })
            .collect())
    }

    /// The value `refresh` renders from the row of `table` matching
    /// `filter` (`None`: no such row), and a WAL position after the read.
    async fn render(
        &self,
        table: &TableName,
        refresh: &Refresh,
        filter: &str,
    ) -> Result<(Option<String>, Lsn), String> {
        let columns = refresh_columns(refresh);
        let select = format!("{} where {filter} limit 2", select_columns(table, &columns));
        let texts = self.query(&select).await?;
        let lsn = self
            .query("select pg_current_wal_insert_lsn()::text")
            .await?
            .first()
            .and_then(|row| row.first().cloned().flatten())
            .and_then(|text| Lsn::parse(&text))
            .ok_or("cannot read the WAL position")?;
        if texts.len() > 1 {
            return Err(format!("several rows of {table} match {filter}"));
        }
        let rows = self.rows(table, &columns, texts)?;
        let rendered = match rows.first() {
            None => None,
            Some(row) => Some(
                render_refresh(refresh, row)
                    .ok_or("the row's refresh cannot be rendered")?
                    .1,
            ),
        };
        Ok((rendered, lsn))
    }
}

/// An error with its causes, `: `-separated.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The columns a refresh reads: its value's and its key's.
pub fn refresh_columns(refresh: &Refresh) -> Vec<&str> {
    let mut columns: Vec<&str> = refresh.columns.iter().map(|c| &**c).collect();
    for column in refresh.key.columns() {
        if !columns.contains(&column) {
            columns.push(column);
        }
    }
    columns
}

/// Outcomes counted per minute, written to [`CHECKS_KEY`] after each round.
struct Tally {
    key: String,
    counts: HashMap<(u64, Outcome), u64>,
    pruned: u64,
}

impl Tally {
    fn new(key: String) -> Tally {
        Tally {
            key,
            counts: HashMap::new(),
            pruned: 0,
        }
    }

    fn count(&mut self, outcome: Outcome) {
        *self.counts.entry((minute_now(), outcome)).or_default() += 1;
    }

    async fn flush(&mut self, redis: &mut Connection) -> Result<(), redis::RedisError> {
        let now = minute_now();
        let mut pipe = redis::pipe();
        for ((minute, outcome), count) in &self.counts {
            pipe.cmd("HINCRBY")
                .arg(&self.key)
                .arg(format!("{minute}:{}", outcome.as_str()))
                .arg(*count)
                .ignore();
        }
        pipe.query_async::<()>(redis).await?;
        self.counts.clear();
        if self.pruned != now {
            let fields: Vec<String> = redis::cmd("HKEYS")
                .arg(&self.key)
                .query_async(redis)
                .await?;
            let old: Vec<&String> = fields
                .iter()
                .filter(|field| field_minute(field).is_none_or(|m| m + KEEP_MINUTES < now))
                .collect();
            if !old.is_empty() {
                redis::cmd("HDEL")
                    .arg(&self.key)
                    .arg(old)
                    .query_async::<()>(redis)
                    .await?;
            }
            self.pruned = now;
        }
        Ok(())
    }
}

fn minute_now() -> u64 {
    now_micros() / 60_000_000
}

fn field_minute(field: &str) -> Option<u64> {
    field.split_once(':')?.0.parse().ok()
}

/// The checks of the last hour in `fields` (the [`CHECKS_KEY`] hash), by
/// outcome.
pub fn last_hour(fields: &[(String, u64)]) -> HashMap<Outcome, u64> {
    let now = minute_now();
    let mut sums = HashMap::new();
    for (field, count) in fields {
        let Some((minute, outcome)) = field.split_once(':') else {
            continue;
        };
        let Ok(minute) = minute.parse::<u64>() else {
            continue;
        };
        if minute + 60 <= now {
            continue;
        }
        if let Some(outcome) = Outcome::ALL.into_iter().find(|o| o.as_str() == outcome) {
            *sums.entry(outcome).or_default() += count;
        }
    }
    sums
}

/// Consistency in nines: `-log10(stale / verified)`; with no stale check,
/// the lower bound `log10(verified)`, marked with `>=`.
pub fn nines(consistent: u64, stale: u64) -> Option<String> {
    let verified = consistent + stale;
    if verified == 0 {
        return None;
    }
    #[allow(clippy::cast_precision_loss)]
    let (verified, stale) = (verified as f64, stale as f64);
    Some(if stale == 0.0 {
        format!(">= {:.1}", verified.log10())
    } else {
        // `+ 0.0` turns the -0.0 of "all stale" into 0.0.
        format!("{:.1}", -(stale / verified).log10() + 0.0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nines_of_a_run() {
        assert_eq!(nines(0, 0), None);
        assert_eq!(nines(999, 1).as_deref(), Some("3.0"));
        assert_eq!(nines(1000, 0).as_deref(), Some(">= 3.0"));
        assert_eq!(nines(0, 5).as_deref(), Some("0.0"));
    }

    #[test]
    fn the_last_hour_leaves_older_minutes_out() {
        let now = minute_now();
        let fields = vec![
            (format!("{now}:consistent"), 5),
            (format!("{}:consistent", now - 59), 2),
            (format!("{}:stale", now - 1), 1),
            (format!("{}:consistent", now - 60), 100),
            ("junk".to_owned(), 7),
            (format!("{now}:unknown"), 7),
        ];
        let sums = last_hour(&fields);
        assert_eq!(sums.get(&Outcome::Consistent), Some(&7));
        assert_eq!(sums.get(&Outcome::Stale), Some(&1));
        assert_eq!(sums.get(&Outcome::Unverifiable), None);
    }

    #[test]
    fn a_refresh_value_selects_its_row_by_the_key_columns() {
        let mappings = crate::mapping::load_str(
            "m.toml",
            r#"
[[table]]
name = "public.users"
keys = ["user:{id}"]
[[table.refresh]]
key = "user:{id}:{kind}"
columns = ["id", "name", "kind"]
"#,
            crate::mapping::Limits::default(),
        )
        .unwrap();
        let table = TableName::new("public", "users");
        let refresh = &mappings.table(&table).unwrap().refresh[0];
        assert_eq!(
            key_filter(refresh, r#"{"id":7,"name":"x","kind":"it's"}"#).unwrap(),
            r#""id" = '7' and "kind" = 'it''s'"#
        );
        assert_eq!(
            key_filter(refresh, r#"{"id":7,"name":"x"}"#).unwrap_err(),
            "the refresh value does not hold `kind`, a column of its key"
        );
        assert_eq!(refresh_columns(refresh), ["id", "name", "kind"]);
    }
}
