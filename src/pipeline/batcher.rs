//! The map and plan stages over a stream of source events, for every source:
//! evaluates each change, buffers streamed transactions until they commit,
//! and cuts the planner's output into bounded batches.
//!
//! Pure: [`Event`]s in, [`Plan`]s out; the source's task owns the clock and
//! the IO (it publishes what the batcher counted, [`Batcher::record_metrics`]).
//!
//! **Progress tracking.** A plan carries a checkpoint only when a commit was
//! pushed into it, and a commit is pushed only after every action of its
//! transaction. A regular (non-streamed) transaction arrives whole after it
//! committed, so a big one may be cut into several plans mid-transaction;
//! those chunks carry no checkpoint and the commit's end LSN rides on the
//! plan that holds its last action. Streamed transactions are buffered (as
//! evaluated actions, not rows) until Stream Commit and dropped on Stream
//! Abort; past `max_pending_keys` a buffer degrades to a coarse invalidation
//! of the tables the transaction touched.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use rustc_hash::FxHashMap;

use super::schema::FallbackLog;
use crate::change::{Event, Op, OpSet, RowChange, TableName};
use crate::mapping::message::{AllowList, Refusal, Scope, Secrets};
use crate::mapping::{message, Action, Mappings, Output};
use crate::plan::{Plan, Planner};
use crate::telemetry;

/// Bounds and switches of one batcher.
#[derive(Clone, Debug)]
pub struct BatchLimits {
    /// Distinct keys per plan before it is cut.
    pub max_keys: usize,
    /// Buffered actions per streamed transaction before it goes coarse.
    pub max_pending_keys: usize,
    /// Whether invalidations from SQL messages are applied
    /// (`mappings.sql_messages`).
    pub sql_messages: bool,
    /// The secrets messages must be signed with (read when the pipeline
    /// started); none: messages are not authenticated.
    pub secrets: Secrets,
    /// What messages may name (`mappings.sql_messages_allow`); `None`: what
    /// the mappings in effect render.
    pub allow: Option<Arc<AllowList>>,
}

impl BatchLimits {
    /// The limits `[batch]` sets, `mappings.sql_messages` and its allow
    /// list, and the message secrets as read.
    pub fn of(config: &crate::config::Config, secrets: Secrets) -> BatchLimits {
        BatchLimits {
            max_keys: config.batch.max_keys,
            max_pending_keys: config.batch.max_pending_keys,
            sql_messages: config.mappings.sql_messages,
            secrets,
            allow: config.mappings.sql_messages_allow.clone().map(Arc::new),
        }
    }
}

/// What became of SQL messages, the `outcome` of
/// `evictd_sql_messages_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageOutcome {
    Applied,
    /// Skipped: its content is not a valid invalidation.
    Malformed,
    /// Skipped: `mappings.sql_messages` is off.
    Disabled,
    /// Skipped: unsigned, or signed with no configured secret.
    Unauthenticated,
    /// Skipped: it names what `mappings.sql_messages_allow` does not allow.
    NotAllowed,
}

impl MessageOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageOutcome::Applied => "applied",
            MessageOutcome::Malformed => "malformed",
            MessageOutcome::Disabled => "disabled",
            MessageOutcome::Unauthenticated => "unauthenticated",
            MessageOutcome::NotAllowed => "not_allowed",
        }
    }

    /// Every outcome, so that each is exported from the start.
    pub const ALL: [MessageOutcome; 5] = [
        MessageOutcome::Applied,
        MessageOutcome::Malformed,
        MessageOutcome::Disabled,
        MessageOutcome::Unauthenticated,
        MessageOutcome::NotAllowed,
    ];
}

/// Counters for metrics and the demo.
#[derive(Clone, Copy, Debug, Default)]
pub struct BatchStats {
    pub changes: u64,
    pub transactions: u64,
    pub coarse_transactions: u64,
    pub aborted_streams: u64,
}

/// A streamed transaction until it commits: its actions, and per
/// subtransaction what it changed, so that a subtransaction that aborts
/// takes its changes, its actions and its overflow with it.
#[derive(Default)]
struct StreamBuffer {
    /// (subxid, action) in WAL order.
    actions: Vec<(u32, Action)>,
    /// Per subtransaction (the top-level xid included).
    subs: FxHashMap<u32, Sub>,
}

#[derive(Default)]
struct Sub {
    changes: u64,
    /// Tables it touched (for the coarse fallback), with the operations.
    tables: BTreeMap<Arc<TableName>, OpSet>,
    /// Its actions overflowed `max_pending_keys`: they were dropped, and
    /// if it commits, its tables are invalidated coarsely.
    coarse: bool,
}

pub struct Batcher {
    mappings: Arc<Mappings>,
    limits: BatchLimits,
    planner: Planner,
    out: Output,
    streams: HashMap<u32, StreamBuffer>,
    stats: BatchStats,
    /// Since [`Batcher::record_metrics`]: changes received by table and
    /// operation, and pattern deletes that stood in for keys, by table.
    received: FxHashMap<(Arc<TableName>, Op), u64>,
    fallbacks: FxHashMap<Arc<TableName>, u64>,
    fallback_log: FallbackLog,
    coarse_reported: u64,
    /// SQL messages by outcome since [`Batcher::record_metrics`].
    messages: FxHashMap<MessageOutcome, u64>,
    /// Whether a message was skipped because they are off (warned once).
    warned_disabled: bool,
    /// What messages may name under the mappings in effect.
    scope: Scope,
}

impl Batcher {
    pub fn new(mappings: Arc<Mappings>, limits: BatchLimits) -> Batcher {
        let scope = message_scope(&limits, &mappings);
        telemetry::zero_table_counters(mappings.tables().map(|m| m.table.to_string()));
        Batcher {
            scope,
            planner: Planner::for_mappings(&mappings),
            mappings,
            limits,
            out: Output::default(),
            streams: HashMap::new(),
            stats: BatchStats::default(),
            received: FxHashMap::default(),
            fallbacks: FxHashMap::default(),
            fallback_log: FallbackLog::default(),
            coarse_reported: 0,
            messages: FxHashMap::default(),
            warned_disabled: false,
        }
    }

    #[cfg(test)]
    pub fn stats(&self) -> BatchStats {
        self.stats
    }

    /// Whether a streamed transaction is open (begun, neither committed nor
    /// aborted): mappings may change only when none is.
    pub fn has_open_streams(&self) -> bool {
        !self.streams.is_empty()
    }

    /// Maps every event from now on with `mappings` (a reload). What is
    /// pending is cut into a plan first, since its origins belong to the
    /// old set. Call it between transactions with no streamed one open.
    pub fn set_mappings(&mut self, mappings: Arc<Mappings>, ready: &mut Vec<Plan>) {
        debug_assert!(self.streams.is_empty(), "no streamed transaction is open");
        ready.extend(self.take());
        self.planner = Planner::for_mappings(&mappings);
        self.scope = message_scope(&self.limits, &mappings);
        telemetry::zero_table_counters(mappings.tables().map(|m| m.table.to_string()));
        self.mappings = mappings;
    }

    /// Nothing pending and no streamed transaction open: every event seen
    /// so far is in a plan already handed out.
    pub fn is_idle(&self) -> bool {
        self.planner.is_empty() && !self.planner.has_checkpoint() && self.streams.is_empty()
    }

    /// Whether a committed transaction waits to be handed out.
    pub fn has_commit(&self) -> bool {
        self.planner.has_checkpoint()
    }

    /// Whether a plan is waiting to be taken (actions or a checkpoint).
    pub fn has_pending(&self) -> bool {
        !self.planner.is_empty() || self.planner.has_checkpoint()
    }

    /// Records when the source sent the commit pushed next.
    pub fn note_sent(&mut self, sent_time: SystemTime) {
        self.planner.note_sent(sent_time);
    }

    /// Handles one event; full plans are appended to `ready`.
    pub fn push(&mut self, event: Event, ready: &mut Vec<Plan>) {
        if let Event::Change { change, .. } = &event {
            *self
                .received
                .entry((change.table.clone(), change.op))
                .or_default() += 1;
        }
        match event {
            Event::Begin { xid } => self.planner.begin(xid),
            Event::Change {
                stream: None,
                change,
            } => {
                self.stats.changes += 1;
                self.eval(&change);
                self.planner.note_op(&change.table, change.op);
                self.planner.push_change(self.out.actions.drain(..));
                self.cut_if_full(ready);
            }
            Event::Change {
                stream: Some((xid, subxid)),
                change,
            } => self.buffer(xid, subxid, &change),
            Event::Message {
                stream: None,
                position,
                content,
            } => {
                if self.message(&content, &position) {
                    for action in self.out.actions.drain(..) {
                        self.planner.push(action);
                    }
                    self.cut_if_full(ready);
                }
            }
            Event::Message {
                stream: Some((xid, subxid)),
                position,
                content,
            } => {
                if self.message(&content, &position) {
                    let buffer = self.streams.entry(xid).or_default();
                    buffer.subs.entry(subxid).or_default();
                    buffer
                        .actions
                        .extend(self.out.actions.drain(..).map(|action| (subxid, action)));
                }
            }
            Event::Commit {
                checkpoint,
                commit_time,
            } => {
                self.stats.transactions += 1;
                self.planner.commit(checkpoint, commit_time);
                self.cut_if_full(ready);
            }
            Event::StreamCommit {
                xid,
                checkpoint,
                commit_time,
            } => {
                self.stats.transactions += 1;
                // Open while its buffer is released: a plan cut in the
                // middle holds it too.
                self.planner.begin(xid);
                if let Some(buffer) = self.streams.remove(&xid) {
                    self.release(xid, buffer, ready);
                }
                self.planner.commit(checkpoint, commit_time);
                self.cut_if_full(ready);
            }
            Event::StreamAbort { xid, subxid } if xid == subxid => {
                self.stats.aborted_streams += 1;
                self.streams.remove(&xid);
            }
            Event::StreamAbort { xid, subxid } => {
                if let Some(buffer) = self.streams.get_mut(&xid) {
                    buffer.actions.retain(|(owner, _)| *owner != subxid);
                    buffer.subs.remove(&subxid);
                }
            }
        }
    }

    /// Invalidates every mapped table at once (continuity was lost: changes
    /// were deleted before evictd read them), ahead of anything pushed
    /// later; counted as a coarse invalidation.
    pub fn invalidate_everything(&mut self, ready: &mut Vec<Plan>) {
        let mappings = self.mappings.clone();
        self.stats.coarse_transactions += 1;
        self.invalidate_tables(mappings.tables().map(|mapping| &*mapping.table), ready);
    }

    /// The one coarse invalidation: every key, tag and pattern `tables` can
    /// render, as patterns.
    fn invalidate_tables<'t>(
        &mut self,
        tables: impl IntoIterator<Item = &'t TableName>,
        ready: &mut Vec<Plan>,
    ) {
        for table in tables {
            self.out.clear();
            self.mappings.eval_coarse(table, &mut self.out);
            for action in self.out.actions.drain(..) {
                self.planner.push_coarse(action);
            }
            self.cut_if_full(ready);
        }
    }

    /// Publishes what was counted since the last call: changes received by
    /// table and operation, pattern fallbacks (with a rate-limited WARN),
    /// and coarse invalidations.
    pub fn record_metrics(&mut self) {
        for ((table, op), count) in self.received.drain() {
            metrics::counter!(telemetry::CHANGES_RECEIVED, "table" => table.to_string(), "op" => op.as_str()).increment(count);
        }
        self.fallback_log.record(self.fallbacks.drain());
        let coarse = self.stats.coarse_transactions;
        metrics::counter!(telemetry::COARSE_INVALIDATIONS).increment(coarse - self.coarse_reported);
        self.coarse_reported = coarse;
        for (outcome, count) in self.messages.drain() {
            metrics::counter!(telemetry::SQL_MESSAGES, "outcome" => outcome.as_str())
                .increment(count);
        }
    }

    /// Parses an invalidation from SQL into `out`; whether it is to be
    /// applied. One that is malformed, unauthenticated, names what it may
    /// not, or arrives while they are off, is skipped with a logged reason
    /// (and `position`, where the source read it) and counted: it never
    /// stops the stream.
    fn message(&mut self, content: &[u8], position: &str) -> bool {
        self.out.clear();
        let outcome = if !self.limits.sql_messages {
            if !self.warned_disabled {
                self.warned_disabled = true;
                tracing::warn!(
                    position,
                    "an invalidation from SQL (a message with prefix `evictd`) was skipped: mappings.sql_messages is off; set it to true to apply them"
                );
            }
            MessageOutcome::Disabled
        } else {
            let origin = self.mappings.message_origin();
            let limits = self.mappings.limits();
            let policy = message::Policy {
                secrets: &self.limits.secrets,
                scope: &self.scope,
            };
            match message::parse(content, policy, limits, origin, &mut self.out.actions) {
                Ok(()) => MessageOutcome::Applied,
                Err(refusal) => {
                    let (outcome, what) = match refusal {
                        Refusal::Malformed(_) => (MessageOutcome::Malformed, "malformed"),
                        Refusal::Unauthenticated(_) => {
                            (MessageOutcome::Unauthenticated, "unauthenticated")
                        }
                        Refusal::NotAllowed(_) => (MessageOutcome::NotAllowed, "not allowed"),
                    };
                    tracing::warn!(
                        position,
                        reason = refusal.reason(),
                        content = %String::from_utf8_lossy(&content[..content.len().min(200)]),
                        "skipped an invalidation from SQL ({what}): nothing of it was invalidated"
                    );
                    outcome
                }
            }
        };
        *self.messages.entry(outcome).or_default() += 1;
        outcome == MessageOutcome::Applied
    }

    /// Evaluates one change into `out`, counting its pattern fallbacks.
    fn eval(&mut self, change: &RowChange) {
        self.out.clear();
        let before = self.out.counts.coarse;
        self.mappings.eval(change, &mut self.out);
        let added = self.out.counts.coarse - before;
        if added > 0 {
            *self.fallbacks.entry(change.table.clone()).or_default() += added;
        }
    }

    /// The plan of everything pending, if anything is.
    pub fn take(&mut self) -> Option<Plan> {
        self.has_pending().then(|| self.planner.finish())
    }

    fn cut_if_full(&mut self, ready: &mut Vec<Plan>) {
        if self.planner.len() >= self.limits.max_keys {
            ready.push(self.planner.finish());
        }
    }

    fn buffer(&mut self, xid: u32, subxid: u32, change: &RowChange) {
        let sub = self
            .streams
            .entry(xid)
            .or_default()
            .subs
            .entry(subxid)
            .or_default();
        sub.changes += 1;
        match sub.tables.get_mut(&change.table) {
            Some(ops) => ops.insert(change.op),
            None => {
                let mut ops = OpSet::default();
                ops.insert(change.op);
                sub.tables.insert(change.table.clone(), ops);
            }
        }
        if sub.coarse {
            return;
        }
        self.eval(change);
        let buffer = self.streams.entry(xid).or_default();
        buffer
            .actions
            .extend(self.out.actions.drain(..).map(|action| (subxid, action)));
        if buffer.actions.len() > self.limits.max_pending_keys {
            // The subtransaction that grew past the bound goes coarse: its
            // actions are dropped (the others' stay key by key), and if it
            // aborts, its overflow goes with it. What SQL messages asked
            // for stays: no table's coarse invalidation covers it.
            let from_sql = self.mappings.message_origin();
            buffer
                .actions
                .retain(|(owner, action)| *owner != subxid || action.origin == from_sql);
            let sub = buffer.subs.entry(subxid).or_default();
            sub.coarse = true;
            tracing::warn!(
                xid,
                subxid,
                max_pending_keys = self.limits.max_pending_keys,
                tables = sub.tables.len(),
                "streamed transaction too large to track key by key: if this part of it commits, its tables are invalidated coarsely"
            );
        }
    }

    /// Moves a committed streamed transaction's actions into the planner,
    /// cutting plans as they fill; the tables of any part that overflowed
    /// are invalidated coarsely after them (a pattern turns any refresh it
    /// covers into a delete, so nothing stale is written).
    fn release(&mut self, xid: u32, buffer: StreamBuffer, ready: &mut Vec<Plan>) {
        let changes: u64 = buffer.subs.values().map(|sub| sub.changes).sum();
        let coarse: BTreeSet<Arc<TableName>> = buffer
            .subs
            .values()
            .filter(|sub| sub.coarse)
            .flat_map(|sub| sub.tables.keys().cloned())
            .collect();
        self.stats.changes += changes;
        self.planner.count_changes(changes);
        for (table, ops) in buffer.subs.values().flat_map(|sub| &sub.tables) {
            for op in ops.iter() {
                self.planner.note_op(table, op);
            }
        }
        for (_, action) in buffer.actions {
            self.planner.push(action);
            self.cut_if_full(ready);
        }
        if !coarse.is_empty() {
            self.stats.coarse_transactions += 1;
            tracing::warn!(xid, tables = ?coarse, "coarse invalidation of the tables a large transaction touched");
            self.invalidate_tables(coarse.iter().map(|table| &**table), ready);
        }
    }
}

/// What messages may name: the allow list, or what `mappings` render.
fn message_scope(limits: &BatchLimits, mappings: &Mappings) -> Scope {
    match &limits.allow {
        Some(list) => Scope::listed(list),
        None => Scope::rendered_by(mappings),
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::change::{Checkpoint, Datum, Lsn, Op, Row};
    use crate::mapping::{load_str, Limits};

    fn batcher(max_keys: usize, max_pending_keys: usize) -> Batcher {
        let mappings = load_str(
            "m.toml",
            "[[table]]\nname = \"t\"\nkeys = [\"t:{id}\"]\n",
            Limits::default(),
        )
        .unwrap();
        Batcher::new(
            Arc::new(mappings),
            BatchLimits {
                max_keys,
                max_pending_keys,
                sql_messages: true,
                secrets: Secrets::default(),
                allow: None,
            },
        )
    }

    fn insert(id: u32, stream: Option<(u32, u32)>) -> Event {
        Event::Change {
            stream,
            change: RowChange {
                table: Arc::new(TableName::new("public", "t")),
                op: Op::Insert,
                old: None,
                new: Some(Row::from_pairs([(
                    "id",
                    Datum::Number(id.to_string().into()),
                )])),
            },
        }
    }

    fn commit(lsn: u64) -> Event {
        Event::Commit {
            checkpoint: Checkpoint::Lsn(Lsn(lsn)),
            commit_time: Some(SystemTime::now()),
        }
    }

    fn lines(plan: &Plan) -> Vec<String> {
        plan.commands.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_big_transaction_is_cut_in_chunks_and_only_the_last_carries_the_checkpoint() {
        let mut batcher = batcher(2, 100);
        let mut ready = Vec::new();
        for id in 1..=5 {
            batcher.push(insert(id, None), &mut ready);
        }
        batcher.push(commit(100), &mut ready);
        ready.extend(batcher.take());
        let checkpoints: Vec<Option<Checkpoint>> =
            ready.iter().map(|plan| plan.checkpoint.clone()).collect();
        assert_eq!(checkpoints, [None, None, Some(Checkpoint::Lsn(Lsn(100)))]);
        let keys: Vec<String> = ready.iter().flat_map(lines).collect();
        assert_eq!(
            keys,
            [
                "UNLINK t:1",
                "UNLINK t:2",
                "UNLINK t:3",
                "UNLINK t:4",
                "UNLINK t:5"
            ]
        );
        assert!(batcher.is_idle());
    }

    #[test]
    fn a_plan_names_the_transactions_whose_changes_it_holds() {
        let mut b = batcher(2, 100);
        let mut ready = Vec::new();
        // Transaction 7 is cut in its middle: both plans hold it.
        b.push(Event::Begin { xid: 7 }, &mut ready);
        for id in 0..3 {
            b.push(insert(id, None), &mut ready);
        }
        b.push(commit(10), &mut ready);
        b.push(Event::Begin { xid: 8 }, &mut ready);
        b.push(insert(9, None), &mut ready);
        b.push(commit(20), &mut ready);
        ready.extend(b.take());
        let xids: Vec<Vec<u32>> = ready.iter().map(|plan| plan.xids.clone()).collect();
        assert_eq!(xids, [vec![7], vec![7, 8], vec![8]]);
        // A streamed one is named by its commit.
        b.push(insert(1, Some((9, 9))), &mut ready);
        b.push(
            Event::StreamCommit {
                xid: 9,
                checkpoint: Checkpoint::Lsn(Lsn(30)),
                commit_time: None,
            },
            &mut ready,
        );
        assert_eq!(b.take().unwrap().xids, [9]);
    }

    #[test]
    fn streamed_changes_wait_for_their_commit_and_aborted_subtransactions_vanish() {
        let mut batcher = batcher(100, 100);
        let mut ready = Vec::new();
        batcher.push(insert(1, Some((7, 7))), &mut ready);
        batcher.push(insert(2, Some((7, 8))), &mut ready);
        batcher.push(insert(3, Some((7, 9))), &mut ready);
        assert!(batcher.take().is_none(), "nothing before the commit");
        assert!(!batcher.is_idle(), "an open stream is not idle");
        batcher.push(Event::StreamAbort { xid: 7, subxid: 8 }, &mut ready);
        batcher.push(
            Event::StreamCommit {
                xid: 7,
                checkpoint: Checkpoint::Lsn(Lsn(200)),
                commit_time: Some(SystemTime::now()),
            },
            &mut ready,
        );
        let plan = batcher.take().expect("the committed stream");
        assert_eq!(lines(&plan), ["UNLINK t:1", "UNLINK t:3"]);
        assert_eq!(plan.checkpoint, Some(Checkpoint::Lsn(Lsn(200))));
        // Only what committed is counted (the aborted subtransaction's
        // change is not applied).
        assert_eq!(plan.changes, 2);
    }

    #[test]
    fn an_aborted_stream_leaves_nothing() {
        let mut batcher = batcher(100, 100);
        let mut ready = Vec::new();
        batcher.push(insert(1, Some((7, 7))), &mut ready);
        batcher.push(Event::StreamAbort { xid: 7, subxid: 7 }, &mut ready);
        assert!(batcher.take().is_none());
        assert!(batcher.is_idle());
        assert_eq!(batcher.stats().aborted_streams, 1);
    }

    #[test]
    fn a_stream_past_the_pending_bound_invalidates_its_tables_coarsely() {
        let mut batcher = batcher(100, 3);
        let mut ready = Vec::new();
        for id in 1..=10 {
            batcher.push(insert(id, Some((7, 7))), &mut ready);
        }
        batcher.push(
            Event::StreamCommit {
                xid: 7,
                checkpoint: Checkpoint::Lsn(Lsn(300)),
                commit_time: Some(SystemTime::now()),
            },
            &mut ready,
        );
        let plan = batcher.take().expect("the coarse plan");
        assert_eq!(lines(&plan), ["UNLINK MATCH t:*"]);
        assert_eq!(batcher.stats().coarse_transactions, 1);
        assert_eq!(plan.changes, 10);
    }

    fn stream_commit(xid: u32, lsn: u64) -> Event {
        Event::StreamCommit {
            xid,
            checkpoint: Checkpoint::Lsn(Lsn(lsn)),
            commit_time: Some(SystemTime::now()),
        }
    }

    /// Transaction 7 with two changes of its own and eleven in
    /// subtransaction 8, which pass a bound of 3 pending actions.
    fn overflowing_stream(ready: &mut Vec<Plan>) -> Batcher {
        let mut batcher = batcher(100, 3);
        batcher.push(insert(1, Some((7, 7))), ready);
        batcher.push(insert(2, Some((7, 7))), ready);
        for id in 10..=20 {
            batcher.push(insert(id, Some((7, 8))), ready);
        }
        batcher
    }

    #[test]
    fn an_overflow_inside_an_aborted_subtransaction_goes_with_it() {
        let mut ready = Vec::new();
        let mut batcher = overflowing_stream(&mut ready);
        batcher.push(Event::StreamAbort { xid: 7, subxid: 8 }, &mut ready);
        batcher.push(stream_commit(7, 400), &mut ready);
        let plan = batcher.take().expect("the committed part");
        assert_eq!(lines(&plan), ["UNLINK t:1", "UNLINK t:2"]);
        assert_eq!(plan.changes, 2);
        assert_eq!(batcher.stats().coarse_transactions, 0);
    }

    #[test]
    fn only_the_part_that_overflowed_goes_coarse() {
        let mut ready = Vec::new();
        let mut batcher = overflowing_stream(&mut ready);
        batcher.push(stream_commit(7, 500), &mut ready);
        let plan = batcher.take().expect("the plan");
        assert_eq!(
            lines(&plan),
            ["UNLINK t:1", "UNLINK t:2", "UNLINK MATCH t:*"]
        );
        assert_eq!(plan.changes, 13);
        assert_eq!(batcher.stats().coarse_transactions, 1);
    }
}
