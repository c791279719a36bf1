//! What the standalone and the Cluster sinks share: per-plan stats, the
//! stamps a plan is applied with, the apply mark, WAIT settings, TTL
//! jitter, and the prefix rules for pattern deletes.

use std::collections::BTreeMap;
use std::sync::Arc;

use rand::Rng as _;
use rustc_hash::FxHashMap;

use crate::error::{Error, ErrorKind};
use crate::mapping::template::escape_glob;
use crate::mapping::OriginId;
use crate::plan::{Mode, Plan};

/// SCAN COUNT hint for pattern deletes.
pub const SCAN_COUNT: usize = 1000;

/// The apply mark (with the prefix in front): on a standalone Redis, each
/// batch with commands writes it (`SET`, the count of such batches the
/// process sent) ahead of them, in the same pipeline. The write is what
/// counts, not the value; `SET` is in the least-privilege ACL already.
/// A writer that `WATCH`es it before reading the database, and stores
/// what it read in a transaction that Redis carries out only while it is
/// unchanged, knows that no invalidation was applied in between (warming's
/// one-pass fill, `src/warm.rs`). The key's name is older than the
/// broadcast's epoch and unrelated to it: the code calls it the mark.
pub const APPLY_MARK_KEY: &str = "evictd:epoch";

/// What one plan did in Redis.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub commands: u64,
    pub keys: u64,
    pub round_trips: u64,
    /// SCAN calls of pattern, prefix and coarse invalidations (each looks
    /// at about SCAN_COUNT keys).
    pub scan_pages: u64,
    /// The keys each pattern command of the plan deleted (the members of
    /// the matching tag sets, for a tag pattern), in plan order.
    pub matched: Vec<u64>,
    /// Keys invalidated by table and mode (see
    /// [`ApplyStats::count_invalidated`]).
    pub invalidated: Vec<(Arc<str>, Mode, u64)>,
}

impl ApplyStats {
    /// Counts what `plan` invalidated into `invalidated`, by table and
    /// [`Mode`]: an exact command counts one key (a tag invalidation one,
    /// whatever its members), a pattern command the keys it matched. Call
    /// once every command ran.
    pub fn count_invalidated(&mut self, plan: &Plan) {
        let mut by_origin: FxHashMap<(OriginId, Mode), u64> = FxHashMap::default();
        let mut matched = self.matched.iter();
        for command in &plan.commands {
            let mode = command.mode();
            let keys = match mode {
                Mode::Exact => 1,
                Mode::Pattern | Mode::Coarse | Mode::Prefix => matched.next().copied().unwrap_or(0),
            };
            *by_origin.entry((command.origin(), mode)).or_insert(0) += keys;
        }
        let unknown: Arc<str> = Arc::from("?");
        let mut by_table: BTreeMap<(Arc<str>, Mode), u64> = BTreeMap::new();
        for ((origin, mode), keys) in by_origin {
            let table = plan
                .tables
                .as_ref()
                .and_then(|tables| tables.get(origin.0 as usize))
                .unwrap_or(&unknown);
            *by_table.entry((table.clone(), mode)).or_insert(0) += keys;
        }
        self.invalidated = by_table
            .into_iter()
            .map(|((table, mode), keys)| (table, mode, keys))
            .collect();
    }

    /// Adds [`ApplyStats::invalidated`] to the running totals `evictd
    /// status` reads (the hash [`INVALIDATED_KEY`] under `prefix`). A
    /// script with `pcall`, so that a Redis user not allowed `HINCRBY`
    /// loses the totals, not the batch.
    pub fn append_invalidated(&self, prefix: &str, pipe: &mut redis::Pipeline) {
        let counted: Vec<&(Arc<str>, Mode, u64)> = self
            .invalidated
            .iter()
            .filter(|(_, _, keys)| *keys > 0)
            .collect();
        if counted.is_empty() {
            return;
        }
        let eval = pipe
            .cmd("EVAL")
            .arg(TOTALS_SCRIPT)
            .arg(1)
            .arg(format!("{prefix}{INVALIDATED_KEY}"));
        for (table, mode, keys) in counted {
            eval.arg(format!("{table} {}", mode.as_str())).arg(*keys);
        }
        eval.ignore();
    }
}

/// Adds ARGV's (field, count) pairs to the hash `KEYS[1]`, ignoring errors.
const TOTALS_SCRIPT: &str =
    "for i = 1, #ARGV, 2 do redis.pcall('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end return 0";

/// The hash (under the key prefix) where applied batches add up the keys
/// they invalidated, in fields `<table> <mode>`: what `evictd status`
/// reports.
pub const INVALIDATED_KEY: &str = "evictd:invalidated";

/// What the apply task stamps a plan with, chosen before its first attempt
/// and kept across retries (fills that read a stamp may already have
/// loaded): the plan itself stays as it was planned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stamped {
    /// The apply stamp written before the plan's commands, while the
    /// consistency checker runs (in the broadcast too).
    pub apply: Option<u64>,
    /// The tag stamp set with the plan's tag invalidations (see
    /// [`evictd_client::protocol::TAG_STAMP_KEY`]).
    pub tag: Option<u64>,
}

/// WAIT after each batch (each node's pipeline, in a Cluster): how many
/// replicas must have it, and how long that may take.
#[derive(Clone, Copy, Debug)]
pub struct Wait {
    pub replicas: u32,
    pub timeout_ms: u64,
}

/// `pattern` under the literal (glob-escaped) key prefix and `namespace`
/// (`tag:` for tag sets). A pattern that
/// starts with a wildcard is refused whatever the prefix: the mappings
/// refuse templates that could produce one, and this is the last guard
/// against deleting every key of a Redis.
pub fn under_prefix(prefix: &str, namespace: &str, pattern: &str) -> Result<String, Error> {
    if pattern.is_empty() || pattern.starts_with(['*', '?', '[']) {
        return Err(Error::new(
            ErrorKind::Config,
            format!("refusing to delete by the pattern `{pattern}`: it has no literal prefix and could match every key"),
        ));
    }
    let mut full = String::with_capacity(prefix.len() + namespace.len() + pattern.len());
    escape_glob(prefix, &mut full);
    escape_glob(namespace, &mut full);
    full.push_str(pattern);
    Ok(full)
}

/// `seconds` varied at random by up to `jitter_bp` basis points either way.
pub fn jittered(seconds: u64, jitter_bp: u32) -> u64 {
    if jitter_bp == 0 {
        return seconds;
    }
    let spread = seconds.saturating_mul(u64::from(jitter_bp)) / 10_000;
    let low = seconds.saturating_sub(spread).max(1);
    let high = seconds.saturating_add(spread);
    rand::rng().random_range(low..=high)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalidated_keys_are_counted_by_table_and_mode() {
        use crate::plan::Command;
        let tables: Arc<[Arc<str>]> =
            vec![Arc::from("public.orders"), Arc::from("public.users")].into();
        let unlink = |key: &str, origin: u32| Command::Unlink {
            key: key.into(),
            origin: OriginId(origin),
        };
        let matching = |pattern: &str, origin: u32, coarse: bool| Command::UnlinkMatching {
            pattern: pattern.into(),
            origin: OriginId(origin),
            coarse,
            prefix: false,
        };
        let plan = Plan {
            commands: vec![
                unlink("order:1", 0),
                unlink("order:2", 0),
                unlink("user:1", 1),
                matching("order:*:lines", 0, false),
                matching("user:*", 1, true),
                matching("order:*", 0, true),
                unlink("stray", 7),
            ],
            tables: Some(tables),
            ..Plan::default()
        };
        let mut stats = ApplyStats {
            matched: vec![4, 10, 20],
            ..ApplyStats::default()
        };
        stats.count_invalidated(&plan);
        let counts: Vec<(&str, &str, u64)> = stats
            .invalidated
            .iter()
            .map(|(table, mode, keys)| (&**table, mode.as_str(), *keys))
            .collect();
        assert_eq!(
            counts,
            [
                ("?", "exact", 1),
                ("public.orders", "exact", 2),
                ("public.orders", "pattern", 4),
                ("public.orders", "coarse", 20),
                ("public.users", "exact", 1),
                ("public.users", "coarse", 10),
            ]
        );
    }

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..1000 {
            let ttl = jittered(3600, 1000);
            assert!((3240..=3960).contains(&ttl), "{ttl}");
        }
        assert_eq!(jittered(60, 0), 60);
        assert!(jittered(1, 9999) >= 1);
    }
}
