//! The planner: coalesces the actions of one or more transactions into one
//! batch of Redis commands.
//!
//! Within a batch each key gets one command, decided by the last action on it
//! in commit order (a refresh then a delete is a delete; a delete then a
//! refresh is a refresh). Commands go out in a fixed order: exact deletes,
//! namespace bumps, pattern deletes, namespace bumps by pattern, tag
//! invalidations, tag patterns, then refreshes last, so
//! that no delete of the batch can remove a value the batch just wrote. A
//! refresh that an *later* pattern delete of the batch would have removed
//! (TRUNCATE after an update) becomes a delete, because pattern deletes run
//! before refreshes.
//!
//! **Architecture Invariant:** the planner does no IO and cannot fail.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use indexmap::IndexMap;
use rustc_hash::FxBuildHasher;

use crate::change::{Checkpoint, Op, OpSet, TableName};
use crate::mapping::template::glob_matches;
use crate::mapping::{Action, ActionKind, Mappings, OriginId, Output, Ttl};

/// One Redis-level command of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `UNLINK key`.
    Unlink { key: String, origin: OriginId },
    /// SCAN for `pattern`, UNLINK what matches. `coarse` when it stands
    /// for a transaction too large to track key by key (or lost
    /// continuity), not for one change.
    UnlinkMatching {
        pattern: String,
        origin: OriginId,
        coarse: bool,
        /// A mapping's `prefixes` entry, not a fallback.
        prefix: bool,
    },
    /// Delete the members of tag set `tag`, then the set.
    InvalidateTag { tag: String, origin: OriginId },
    /// Invalidate every tag set whose name matches `pattern`.
    InvalidateTagsMatching {
        pattern: String,
        origin: OriginId,
        coarse: bool,
    },
    /// Bump the namespace version counter `key` if it exists (see
    /// [`evictd_client::protocol::BUMP_SCRIPT`]).
    Bump { key: String, origin: OriginId },
    /// SCAN for counters matching `pattern`, bump each.
    BumpMatching {
        pattern: String,
        origin: OriginId,
        coarse: bool,
    },
    /// `SET key value [EX ttl]`.
    Set {
        key: String,
        value: String,
        ttl: Option<Ttl>,
        origin: OriginId,
    },
}

impl Command {
    pub fn origin(&self) -> OriginId {
        match self {
            Command::Unlink { origin, .. }
            | Command::UnlinkMatching { origin, .. }
            | Command::InvalidateTag { origin, .. }
            | Command::InvalidateTagsMatching { origin, .. }
            | Command::Bump { origin, .. }
            | Command::BumpMatching { origin, .. }
            | Command::Set { origin, .. } => *origin,
        }
    }

    /// How the command invalidates, for `evictd_keys_invalidated_total`.
    pub fn mode(&self) -> Mode {
        match self {
            Command::Unlink { .. }
            | Command::InvalidateTag { .. }
            | Command::Bump { .. }
            | Command::Set { .. } => Mode::Exact,
            Command::UnlinkMatching { coarse: true, .. }
            | Command::InvalidateTagsMatching { coarse: true, .. }
            | Command::BumpMatching { coarse: true, .. } => Mode::Coarse,
            Command::UnlinkMatching { prefix: true, .. } => Mode::Prefix,
            Command::UnlinkMatching { .. }
            | Command::InvalidateTagsMatching { .. }
            | Command::BumpMatching { .. } => Mode::Pattern,
        }
    }
}

/// How a command invalidates: key by key (`exact`: a rendered key, a tag's
/// members, a refresh), by a pattern standing for one change (`pattern`:
/// an unknown placeholder value, a key too long, TRUNCATE), or by the
/// table-wide patterns of a coarse invalidation (`coarse`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    Exact,
    Pattern,
    Coarse,
    /// A mapping's `prefixes`: every key under a rendered prefix.
    Prefix,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Exact, Mode::Pattern, Mode::Coarse, Mode::Prefix];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Exact => "exact",
            Mode::Pattern => "pattern",
            Mode::Coarse => "coarse",
            Mode::Prefix => "prefix",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Unlink { key, .. } => write!(f, "UNLINK {key}"),
            Command::UnlinkMatching { pattern, .. } => write!(f, "UNLINK MATCH {pattern}"),
            Command::InvalidateTag { tag, .. } => write!(f, "TAG {tag}"),
            Command::InvalidateTagsMatching { pattern, .. } => write!(f, "TAG MATCH {pattern}"),
            Command::Bump { key, .. } => write!(f, "BUMP {key}"),
            Command::BumpMatching { pattern, .. } => write!(f, "BUMP MATCH {pattern}"),
            Command::Set {
                key, value, ttl, ..
            } => {
                write!(f, "SET {key} {value}")?;
                match ttl {
                    Some(ttl) => write!(f, " {ttl}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// The commands of one batch, in the order they must be sent, and the
/// checkpoint to acknowledge once all of them (and the broadcast) succeeded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub commands: Vec<Command>,
    pub checkpoint: Option<Checkpoint>,
    /// Commit time of the oldest transaction in the batch: the batch's
    /// lag is that of its stalest change.
    pub commit_time: Option<SystemTime>,
    /// When the source sent evictd that oldest transaction (the walsender's
    /// send time of its commit, the Kafka record's timestamp): from here on
    /// the lag is evictd's own.
    pub sent_time: Option<SystemTime>,
    /// Row changes the batch covers.
    pub changes: u64,
    /// The table of each origin of the mappings the plan was made with
    /// (see [`Mappings::origin_tables`]), to count invalidations by table.
    pub tables: Option<Arc<[Arc<str>]>>,
    /// The pattern of each origin's template (see
    /// [`Mappings::origin_patterns`]): what an exact key turns into when
    /// it cannot be held key by key.
    pub families: Option<Arc<[Option<Arc<str>>]>>,
    /// What the CDN targets purge once Redis applied the commands.
    pub purges: Purges,
    /// The Postgres transactions (top-level xids) whose changes the plan
    /// holds: its invalidations wait until each is visible to a new
    /// snapshot on the primary (`postgres.visibility_gate`).
    pub xids: Vec<u32>,
    /// The operations of its row changes, by table (for people watching:
    /// the broadcast's `ops`).
    pub ops: Vec<(Arc<TableName>, OpSet)>,
}

/// The surrogate keys a plan purges at every CDN target.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Purges {
    /// Each key with the origin that rendered it, in plan order.
    pub keys: Vec<(String, OriginId)>,
    /// Purge everything instead (a surrogate key's value was not known,
    /// or TRUNCATE), with the origin that asked.
    pub all: Option<OriginId>,
}

impl Plan {
    /// Whether the plan invalidates a tag, by name or by pattern.
    pub fn invalidates_tags(&self) -> bool {
        self.commands.iter().any(|command| {
            matches!(
                command,
                Command::InvalidateTag { .. } | Command::InvalidateTagsMatching { .. }
            )
        })
    }

    /// The keys (without the prefix) the tag stamp is written to, ahead of
    /// the plan's invalidations: the stamp itself, each tag's, and the
    /// pattern one when tags go by pattern.
    pub fn tag_stamp_keys(&self) -> Vec<String> {
        use evictd_client::protocol::{TAG_AT, TAG_PATTERN_AT};
        let mut keys = Vec::new();
        let mut by_pattern = false;
        for command in &self.commands {
            match command {
                Command::InvalidateTag { tag, .. } => keys.push(format!("{TAG_AT}{tag}")),
                Command::InvalidateTagsMatching { .. } => by_pattern = true,
                _ => {}
            }
        }
        if by_pattern {
            keys.push(TAG_PATTERN_AT.to_owned());
        }
        keys
    }
}

impl Purges {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.all.is_none()
    }
}

#[derive(Debug)]
enum KeyAction {
    Delete(OriginId),
    /// A namespace counter to bump (its key is a counter's).
    Bump(OriginId),
    Refresh {
        value: String,
        ttl: Option<Ttl>,
        origin: OriginId,
    },
}

/// An insertion-ordered map with a fast, non-cryptographic hash: keys are
/// rendered from our own database rows, and every key of a batch passes
/// through here.
type OrderedMap<V> = IndexMap<String, V, FxBuildHasher>;

/// Accumulates actions in commit order; [`Planner::finish`] yields the plan.
#[derive(Debug, Default)]
pub struct Planner {
    keys: OrderedMap<KeyAction>,
    /// Pattern deletes and whether a coarse invalidation asked for them.
    /// Each pattern's origin, whether it stands for a coarse invalidation
    /// and whether for a prefix.
    patterns: OrderedMap<(OriginId, bool, bool)>,
    tags: OrderedMap<OriginId>,
    tag_patterns: OrderedMap<(OriginId, bool)>,
    bump_patterns: OrderedMap<(OriginId, bool)>,
    /// Surrogate keys to purge at the CDN targets, and whether to purge
    /// everything there instead (with the origin that asked).
    purges: OrderedMap<OriginId>,
    purge_all: Option<OriginId>,
    checkpoint: Option<Checkpoint>,
    commit_time: Option<SystemTime>,
    sent_time: Option<SystemTime>,
    changes: u64,
    tables: Option<Arc<[Arc<str>]>>,
    families: Option<Arc<[Option<Arc<str>>]>>,
    /// Transactions whose changes are in the pending plan.
    xids: Vec<u32>,
    ops: Vec<(Arc<TableName>, OpSet)>,
    /// The transaction being pushed (Begin seen, its commit not yet): a
    /// plan cut in its middle holds it, and so does the next.
    open_xid: Option<u32>,
}

impl Planner {
    pub fn new() -> Planner {
        Planner::default()
    }

    /// A planner whose plans name the tables of `mappings`' rules.
    pub fn for_mappings(mappings: &Mappings) -> Planner {
        Planner {
            tables: Some(mappings.origin_tables()),
            families: Some(mappings.origin_patterns()),
            ..Planner::default()
        }
    }

    /// Adds the actions of one change, in the order the evaluator gave them.
    pub fn push_change(&mut self, actions: impl IntoIterator<Item = Action>) {
        self.changes += 1;
        for action in actions {
            self.push(action);
        }
    }

    /// Notes that the pending plan holds a change of `op` to `table`.
    pub fn note_op(&mut self, table: &Arc<TableName>, op: Op) {
        match self.ops.iter_mut().find(|(known, _)| known == table) {
            Some((_, ops)) => ops.insert(op),
            None => {
                let mut ops = OpSet::default();
                ops.insert(op);
                self.ops.push((table.clone(), ops));
            }
        }
    }

    /// Counts row changes whose actions are pushed one by one.
    pub fn count_changes(&mut self, changes: u64) {
        self.changes += changes;
    }

    /// Adds one action, in commit order.
    pub fn push(&mut self, action: Action) {
        self.push_as(action, false);
    }

    /// Adds an action of a coarse invalidation (its patterns count as
    /// `coarse`, see [`Mode`]).
    pub fn push_coarse(&mut self, action: Action) {
        self.push_as(action, true);
    }

    fn push_pattern(&mut self, pattern: String, origin: OriginId, coarse: bool, prefix: bool) {
        // Pattern deletes run before refreshes: a refresh this pattern
        // follows in commit order must not survive it.
        for (key, action) in &mut self.keys {
            if let KeyAction::Refresh { origin, .. } = action {
                if glob_matches(&pattern, key) {
                    *action = KeyAction::Delete(*origin);
                }
            }
        }
        let entry = self
            .patterns
            .entry(pattern)
            .or_insert((origin, coarse, prefix));
        entry.1 |= coarse;
        entry.2 &= prefix && !entry.1;
    }

    fn push_as(&mut self, action: Action, coarse: bool) {
        let origin = action.origin;
        match action.kind {
            ActionKind::Delete(key) => {
                self.keys.insert(key, KeyAction::Delete(origin));
            }
            ActionKind::Refresh { key, value, ttl } => {
                self.keys
                    .insert(key, KeyAction::Refresh { value, ttl, origin });
            }
            ActionKind::DeleteMatching(pattern) => {
                self.push_pattern(pattern, origin, coarse, false)
            }
            ActionKind::DeletePrefix(pattern) => {
                self.push_pattern(pattern, origin, coarse, !coarse)
            }
            ActionKind::Tag(tag) => {
                self.tags.entry(tag).or_insert(origin);
            }
            ActionKind::TagMatching(pattern) => {
                self.tag_patterns
                    .entry(pattern)
                    .or_insert((origin, coarse))
                    .1 |= coarse;
            }
            ActionKind::Bump(key) => {
                // A bump is idempotent within a batch: once is enough.
                self.keys.insert(key, KeyAction::Bump(origin));
            }
            ActionKind::BumpMatching(pattern) => {
                self.bump_patterns
                    .entry(pattern)
                    .or_insert((origin, coarse))
                    .1 |= coarse;
            }
            ActionKind::Purge(key) => {
                self.purges.entry(key).or_insert(origin);
            }
            ActionKind::PurgeAll => {
                self.purge_all.get_or_insert(origin);
            }
        }
    }

    /// Marks the end of a transaction: the batch now acknowledges up to
    /// `checkpoint` (taken in with the checkpoints before it, see
    /// [`Checkpoint::absorb`]). The batch's lag is measured from its oldest
    /// commit (Kafka's partitions are not in commit order among themselves).
    /// A transaction begins: its changes follow until its commit.
    pub fn begin(&mut self, xid: u32) {
        self.open_xid = Some(xid);
        // Transactions come one after another: only the last can repeat
        // (a streamed one, open while its buffer is released).
        if self.xids.last() != Some(&xid) {
            self.xids.push(xid);
        }
    }

    pub fn commit(&mut self, checkpoint: Checkpoint, commit_time: Option<SystemTime>) {
        self.open_xid = None;
        match &mut self.checkpoint {
            Some(pending) => pending.absorb(checkpoint),
            None => self.checkpoint = Some(checkpoint),
        }
        if let Some(commit_time) = commit_time {
            self.commit_time = Some(self.commit_time.map_or(commit_time, |t| t.min(commit_time)));
        }
    }

    /// Records when the source sent the next commit (or, for Kafka, a
    /// change); the batch keeps the oldest.
    pub fn note_sent(&mut self, sent_time: SystemTime) {
        self.sent_time = Some(self.sent_time.map_or(sent_time, |t| t.min(sent_time)));
    }

    /// Whether a commit is waiting to be acknowledged.
    pub fn has_checkpoint(&self) -> bool {
        self.checkpoint.is_some()
    }

    /// Distinct keys, tags and patterns pending: the batch size bound.
    pub fn len(&self) -> usize {
        self.keys.len()
            + self.patterns.len()
            + self.tags.len()
            + self.tag_patterns.len()
            + self.bump_patterns.len()
            + self.purges.len()
            + usize::from(self.purge_all.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the plan of everything pushed so far and starts afresh.
    pub fn finish(&mut self) -> Plan {
        let mut commands = Vec::with_capacity(self.len());
        let mut refreshes = Vec::new();
        let mut bumps = Vec::new();
        for (key, action) in self.keys.drain(..) {
            match action {
                KeyAction::Delete(origin) => commands.push(Command::Unlink { key, origin }),
                KeyAction::Bump(origin) => bumps.push(Command::Bump { key, origin }),
                KeyAction::Refresh { value, ttl, origin } => refreshes.push(Command::Set {
                    key,
                    value,
                    ttl,
                    origin,
                }),
            }
        }
        commands.append(&mut bumps);
        let patterns = self.patterns.drain(..);
        commands.extend(patterns.map(|(pattern, (origin, coarse, prefix))| {
            Command::UnlinkMatching {
                pattern,
                origin,
                coarse,
                prefix,
            }
        }));
        let bump_patterns = self.bump_patterns.drain(..);
        commands.extend(
            bump_patterns.map(|(pattern, (origin, coarse))| Command::BumpMatching {
                pattern,
                origin,
                coarse,
            }),
        );
        commands.extend(
            self.tags
                .drain(..)
                .map(|(tag, origin)| Command::InvalidateTag { tag, origin }),
        );
        let tag_patterns = self.tag_patterns.drain(..);
        commands.extend(tag_patterns.map(|(pattern, (origin, coarse))| {
            Command::InvalidateTagsMatching {
                pattern,
                origin,
                coarse,
            }
        }));
        commands.append(&mut refreshes);
        let purge_all = self.purge_all.take();
        let purges = self.purges.drain(..);
        let purges = Purges {
            // Purging everything covers every key.
            keys: if purge_all.is_some() {
                Vec::new()
            } else {
                purges.collect()
            },
            all: purge_all,
        };
        Plan {
            commands,
            purges,
            checkpoint: self.checkpoint.take(),
            commit_time: self.commit_time.take(),
            sent_time: self.sent_time.take(),
            changes: std::mem::take(&mut self.changes),
            tables: self.tables.clone(),
            families: self.families.clone(),
            xids: std::mem::replace(&mut self.xids, self.open_xid.into_iter().collect()),
            ops: std::mem::take(&mut self.ops),
        }
    }
}

/// Evaluates and plans a whole batch of changes at once: what `explain` and
/// the data-driven tests use.
pub fn plan_changes<'c>(
    mappings: &Mappings,
    changes: impl IntoIterator<Item = &'c crate::change::RowChange>,
    out: &mut Output,
) -> Plan {
    let mut planner = Planner::for_mappings(mappings);
    for change in changes {
        let start = out.actions.len();
        mappings.eval(change, out);
        planner.note_op(&change.table, change.op);
        planner.push_change(out.actions.drain(start..));
    }
    planner.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delete(key: &str) -> Action {
        Action {
            kind: ActionKind::Delete(key.into()),
            origin: OriginId(0),
        }
    }

    fn refresh(key: &str, value: &str) -> Action {
        Action {
            kind: ActionKind::Refresh {
                key: key.into(),
                value: value.into(),
                ttl: None,
            },
            origin: OriginId(0),
        }
    }

    fn lines(plan: &Plan) -> Vec<String> {
        plan.commands.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_pattern_a_coarse_invalidation_asked_for_is_coarse() {
        let pattern = |pattern: &str, origin: u32| Action {
            kind: ActionKind::DeleteMatching(pattern.into()),
            origin: OriginId(origin),
        };
        let mut planner = Planner::new();
        planner.push(delete("a"));
        planner.push(pattern("order:*", 1));
        planner.push_coarse(pattern("user:*", 2));
        // The same pattern from one change, then a coarse invalidation.
        planner.push(pattern("tag:*", 3));
        planner.push_coarse(pattern("tag:*", 3));
        let modes: Vec<(String, Mode)> = planner
            .finish()
            .commands
            .iter()
            .map(|command| (command.to_string(), command.mode()))
            .collect();
        assert_eq!(
            modes,
            [
                ("UNLINK a".to_owned(), Mode::Exact),
                ("UNLINK MATCH order:*".to_owned(), Mode::Pattern),
                ("UNLINK MATCH user:*".to_owned(), Mode::Coarse),
                ("UNLINK MATCH tag:*".to_owned(), Mode::Coarse),
            ]
        );
    }

    #[test]
    fn last_action_on_a_key_wins() {
        let mut planner = Planner::new();
        planner.push_change([refresh("a", "1"), delete("b")]);
        planner.push_change([delete("a"), refresh("b", "2")]);
        assert_eq!(lines(&planner.finish()), ["UNLINK a", "SET b 2"]);
        assert!(planner.is_empty());
    }

    #[test]
    fn a_later_pattern_turns_an_earlier_refresh_into_a_delete() {
        let mut planner = Planner::new();
        planner.push_change([refresh("order:1", "{}"), refresh("other:1", "{}")]);
        let pattern = Action {
            kind: ActionKind::DeleteMatching("order:*".into()),
            origin: OriginId(0),
        };
        planner.push_change([pattern]);
        planner.push_change([refresh("order:2", "{}")]);
        let plan = planner.finish();
        assert_eq!(
            lines(&plan),
            [
                "UNLINK order:1",
                "UNLINK MATCH order:*",
                "SET other:1 {}",
                "SET order:2 {}"
            ]
        );
        assert_eq!(plan.changes, 3);
    }

    #[test]
    fn a_batch_is_timed_by_its_oldest_transaction() {
        use crate::change::Lsn;
        let at = |millis| SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(millis);
        let mut planner = Planner::new();
        planner.note_sent(at(15));
        planner.commit(Checkpoint::Lsn(Lsn(1)), Some(at(10)));
        planner.note_sent(at(25));
        planner.commit(Checkpoint::Lsn(Lsn(2)), Some(at(20)));
        let plan = planner.finish();
        assert_eq!(plan.checkpoint, Some(Checkpoint::Lsn(Lsn(2))));
        assert_eq!(
            (plan.commit_time, plan.sent_time),
            (Some(at(10)), Some(at(15)))
        );
        // The next batch starts afresh.
        planner.commit(Checkpoint::Lsn(Lsn(3)), Some(at(30)));
        let plan = planner.finish();
        assert_eq!((plan.commit_time, plan.sent_time), (Some(at(30)), None));
        // Kafka's commits (one per record) come in any order of time, and
        // their offsets add up.
        let partition = |n| crate::change::Partition {
            topic: "t".into(),
            partition: n,
        };
        let offsets =
            |n, offset| Checkpoint::Offsets(crate::change::Offsets::after(partition(n), offset));
        planner.commit(offsets(0, 7), Some(at(50)));
        planner.commit(offsets(1, 3), Some(at(40)));
        let plan = planner.finish();
        assert_eq!(plan.commit_time, Some(at(40)));
        let mut both = offsets(0, 7);
        both.absorb(offsets(1, 3));
        assert_eq!(plan.checkpoint, Some(both));
    }
}
