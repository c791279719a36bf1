//! How exact the caches are, measured: the continuous checker `evictd run`
//! starts with `[audit] enabled = true`, and the rows' side of the one-off
//! sweep `evictd audit` (see `src/operator.rs`).
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

mod checker;
mod sampler;
mod sweep;

pub(crate) use checker::{record_passes, verify_refresh, Target};
pub use sampler::{Sample, Sampler};
pub use sweep::{refreshed_tables, sweep, table_text, FillSweep, Finding, Sweep, SweepLine};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use evictd_client::protocol::AUDIT_STAMP_KEY;
use evictd_client::Connection;
use tokio::sync::{mpsc, watch};

use crate::apply::Progress;
use crate::config::{AuditConfig, Config, SourceKind};
use crate::mapping::Mappings;
use crate::rows::Database;
use checker::Checker;

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
        tally: CheckCounts::new(format!("{prefix}{CHECKS_KEY}")),
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

/// Outcomes counted per minute, written to [`CHECKS_KEY`] after each round.
struct CheckCounts {
    key: String,
    counts: HashMap<(u64, Outcome), u64>,
    pruned: u64,
}

impl CheckCounts {
    fn new(key: String) -> CheckCounts {
        CheckCounts {
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
    use super::checker::key_filter;
    use super::*;
    use crate::change::TableName;
    use crate::rows::refresh_columns;

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
