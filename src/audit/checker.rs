//! The checker task: each sample, after `audit.delay_ms`, judged consistent,
//! stale or unverifiable (the module documentation of `audit` says how).

use std::sync::Arc;
use std::time::{Duration, Instant};

use evictd_client::protocol::Stored;
use evictd_client::Connection;
use tokio::sync::{mpsc, watch};

use super::*;
use crate::apply::Progress;
use crate::change::{Checkpoint, Lsn, Row, TableName};
use crate::error::Error;
use crate::mapping::{Mappings, Refresh};
use crate::rows::Database;
use crate::servers::connect_redis;
use crate::sql::equalities;
use crate::telemetry;

pub(crate) struct Checker {
    pub(crate) prefix: String,
    pub(crate) delay: Duration,
    pub(crate) redis_config: crate::config::RedisConfig,
    pub(crate) redis: Option<Connection>,
    /// The database refreshes are checked against (Postgres source only).
    pub(crate) database: Option<Database>,
    /// The mappings in effect (a reload replaces them).
    pub(crate) mappings: watch::Receiver<Arc<Mappings>>,
    pub(crate) progress: watch::Receiver<Progress>,
    pub(crate) tally: CheckCounts,
}

impl Checker {
    pub(crate) async fn run(
        mut self,
        mut samples: mpsc::Receiver<Sample>,
        mut stop: watch::Receiver<bool>,
    ) {
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

/// What a check found, and why.
pub struct Verdict {
    pub outcome: Outcome,
    pub why: String,
    /// The row's identity, when the check read it.
    pub row: Option<String>,
}

impl Verdict {
    /// Unverifiable, because reading what to compare failed.
    fn failed(error: &Error) -> Verdict {
        Verdict::new(Outcome::Unverifiable, crate::rows::error_chain(error))
    }

    fn new(outcome: Outcome, why: impl Into<String>) -> Verdict {
        Verdict {
            outcome,
            why: why.into(),
            row: None,
        }
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
            Err(error) => return Verdict::failed(&error),
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
            Err(error) => return Verdict::failed(&error),
        };
        if Some(&held) == expected.as_ref() {
            verdict.outcome = Outcome::Consistent;
            verdict.why = "equals the row".into();
            return verdict;
        }
        let again = match read().await {
            Ok((again, _)) => again,
            Err(error) => return Verdict::failed(&error),
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

/// Waits until the continuity record `record` is at or past `lsn`.
pub(crate) async fn record_passes(
    redis: &mut Connection,
    record: &str,
    lsn: Lsn,
) -> Result<(), String> {
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
pub(crate) fn row_filter(refresh: &Refresh, row: &Row) -> Option<String> {
    let values = refresh
        .key
        .columns()
        .map(|column| Some((column, row.get(column).canonical_text()?)))
        .collect::<Option<Vec<_>>>()?;
    Some(equalities(values))
}

/// The check of a deleted key: see the module's documentation.
pub(crate) async fn check_deleted(mut redis: Connection, full: &str, stamp: u64) -> Verdict {
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
pub(crate) async fn get_value(redis: &mut Connection, full: &str) -> Result<Option<String>, Error> {
    let raw: Option<String> = redis::cmd("GET")
        .arg(full)
        .query_async(redis)
        .await
        .map_err(|error| Error::redis("GET failed", error))?;
    Ok(raw.and_then(|raw| match Stored::parse(&raw) {
        Stored::Value(value) | Stored::Reloading(value) => Some(value.to_owned()),
        Stored::Loading => None,
    }))
}

/// The SQL condition that selects the row a refresh value was rendered
/// from: the key's columns equal to the value's.
pub(crate) fn key_filter(refresh: &Refresh, written: &str) -> Result<String, String> {
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

pub(crate) fn checkpoint_text(checkpoint: Option<&Checkpoint>) -> String {
    match checkpoint {
        Some(Checkpoint::Lsn(lsn)) => lsn.to_string(),
        Some(Checkpoint::Offsets(offsets)) => format!("{offsets:?}"),
        None => "-".into(),
    }
}
