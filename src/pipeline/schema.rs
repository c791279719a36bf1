//! Schema drift under a running pipeline: what `run` knows is wrong between
//! the mappings and the live schema, reported loudly (ERROR log, `/readyz`
//! reason, `evictd_schema_problems{table}`) and cleared when fixed.
//!
//! Two origins feed it:
//! - the live catalog checks of `evictd check`, run by the Postgres source
//!   ([`crate::source::postgres::schema`]) when a session starts, every
//!   minute, and again whenever a Relation message changes a mapped table
//!   or a reload;
//! - the replication stream itself: a mapped relation that changed name or
//!   lost a column the mappings read (see
//!   [`crate::source::postgres::changes`]), noticed the moment its Relation
//!   message arrives.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::{watch, Notify};

use crate::change::TableName;
use crate::telemetry;

/// Where a problem was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    Stream,
    LiveCheck,
}

/// Problems by (subject, origin); a subject is a mapped table or
/// `publication <name>`.
pub type Problems = BTreeMap<(String, Origin), String>;

/// The pipeline's end of the schema problems; the admin endpoint reads the
/// other. What runs the live catalog checks is the Postgres source's
/// ([`crate::source::postgres::schema::LiveChecks`]); anyone may ask for
/// them to run again ([`SchemaHealth::recheck`]).
#[derive(Clone)]
pub struct SchemaHealth {
    problems: Arc<watch::Sender<Problems>>,
    rechecks: Arc<Notify>,
}

impl SchemaHealth {
    pub fn new() -> (SchemaHealth, watch::Receiver<Problems>) {
        let (sender, receiver) = watch::channel(Problems::new());
        let health = SchemaHealth {
            problems: Arc::new(sender),
            rechecks: Arc::new(Notify::new()),
        };
        (health, receiver)
    }

    /// Sets or clears the problem `subject` has from `origin`. A new or
    /// changed problem is logged at ERROR, a cleared one at INFO.
    pub fn report(&self, subject: &str, origin: Origin, problem: Option<String>) {
        let key = (subject.to_owned(), origin);
        let mut count = 0;
        self.problems.send_if_modified(|problems| {
            let changed = match &problem {
                Some(problem) if problems.get(&key) != Some(problem) => {
                    tracing::error!(%subject, ?origin, %problem, "the mappings do not fit the database");
                    problems.insert(key.clone(), problem.clone());
                    true
                }
                None if problems.remove(&key).is_some() => {
                    tracing::info!(%subject, ?origin, "schema problem resolved");
                    true
                }
                _ => false,
            };
            count = problems.keys().filter(|(s, _)| s == subject).count();
            changed
        });
        #[allow(clippy::cast_precision_loss)]
        metrics::gauge!(telemetry::SCHEMA_PROBLEMS, "table" => subject.to_owned())
            .set(count as f64);
    }

    /// The subjects with a problem from `origin`.
    pub fn subjects(&self, origin: Origin) -> Vec<String> {
        self.problems
            .borrow()
            .keys()
            .filter(|(_, from)| *from == origin)
            .map(|(subject, _)| subject.clone())
            .collect()
    }

    /// Asks for the live catalog checks to run again soon (after a reload,
    /// or a changed Relation message); nothing happens without them (the
    /// Kafka source).
    pub fn recheck(&self) {
        self.rechecks.notify_one();
    }

    /// Resolves when a recheck was asked for.
    pub async fn recheck_asked(&self) {
        self.rechecks.notified().await;
    }
}

/// The one-line reason for `/readyz`, when there are problems: every
/// problem of the first table, and how many other tables have some.
pub fn readiness(problems: &Problems) -> Option<String> {
    let ((subject, _), _) = problems.iter().next()?;
    let first: Vec<&str> = problems
        .iter()
        .filter(|((s, _), _)| s == subject)
        .map(|(_, problem)| problem.as_str())
        .collect();
    let mut others: Vec<&str> = problems
        .keys()
        .map(|(s, _)| s.as_str())
        .filter(|s| s != subject)
        .collect();
    others.dedup();
    let mut reason = format!("mappings: {subject}: {}", first.join("; "));
    if !others.is_empty() {
        reason.push_str(&format!(
            " (and {} more: {}; see the log)",
            others.len(),
            others.join(", ")
        ));
    }
    Some(reason)
}

/// How often the pattern fallbacks of one table are logged at most.
const FALLBACK_WARN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Counts pattern fallbacks per table (`evictd_pattern_fallbacks_total`)
/// and logs them at WARN, at most once a minute per table.
#[derive(Default)]
pub struct FallbackLog {
    /// Per table: when it was last logged, and what was counted since.
    tables: std::collections::HashMap<Arc<TableName>, (std::time::Instant, u64)>,
}

impl FallbackLog {
    pub fn record(&mut self, fallbacks: impl Iterator<Item = (Arc<TableName>, u64)>) {
        let now = std::time::Instant::now();
        for (table, count) in fallbacks {
            metrics::counter!(telemetry::PATTERN_FALLBACKS, "table" => table.to_string())
                .increment(count);
            let (logged, since) = self
                .tables
                .entry(table.clone())
                .or_insert((now - FALLBACK_WARN_INTERVAL, 0));
            *since += count;
            if now.duration_since(*logged) >= FALLBACK_WARN_INTERVAL {
                tracing::warn!(%table, pattern_deletes = *since, "keys of this table were deleted by pattern (SCAN): a placeholder's value was unknown or a key too long; see evictd_pattern_fallbacks_total and `evictd explain`");
                *logged = now;
                *since = 0;
            }
        }
    }
}
