//! The map and plan stages over a stream of source events: evaluates each
//! change, buffers streamed transactions until they commit, and cuts the
//! planner's output into bounded batches.
//!
//! Pure: events in, [`Plan`]s out; the replication task owns the clock and
//! the IO.
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

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use rustc_hash::FxHashMap;

use crate::change::{RowChange, TableName};
use crate::mapping::{Action, Mappings, Output};
use crate::plan::{Plan, Planner};
use crate::source::postgres::changes::Event;

/// Bounds of one batcher.
#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    /// Distinct keys per plan before it is cut.
    pub max_keys: usize,
    /// Buffered actions per streamed transaction before it goes coarse.
    pub max_pending_keys: usize,
}

/// Counters for metrics and the demo.
#[derive(Clone, Copy, Debug, Default)]
pub struct BatchStats {
    pub changes: u64,
    pub transactions: u64,
    pub coarse_transactions: u64,
    pub aborted_streams: u64,
}

#[derive(Default)]
struct StreamBuffer {
    /// (subxid, action) in WAL order.
    actions: Vec<(u32, Action)>,
    changes: u64,
    /// Tables the transaction touched, for the coarse fallback.
    tables: BTreeSet<Arc<TableName>>,
    coarse: bool,
}

pub struct Batcher {
    mappings: Arc<Mappings>,
    limits: BatchLimits,
    planner: Planner,
    out: Output,
    streams: HashMap<u32, StreamBuffer>,
    stats: BatchStats,
    /// Pattern deletes that stood in for keys, by table, since
    /// [`Batcher::take_fallbacks`].
    fallbacks: Fallbacks,
}

/// Pattern deletes that stood in for keys, by table.
pub(super) type Fallbacks = FxHashMap<Arc<TableName>, u64>;

/// Evaluates one change into `out` (cleared first), adding its pattern
/// fallbacks to `fallbacks`: the one place both sources map a change.
pub(super) fn eval_counting(
    mappings: &Mappings,
    change: &RowChange,
    out: &mut Output,
    fallbacks: &mut Fallbacks,
) {
    out.clear();
    let before = out.counts.coarse;
    mappings.eval(change, out);
    let added = out.counts.coarse - before;
    if added > 0 {
        *fallbacks.entry(change.table.clone()).or_default() += added;
    }
}

impl Batcher {
    pub fn new(mappings: Arc<Mappings>, limits: BatchLimits) -> Batcher {
        Batcher {
            mappings,
            limits,
            planner: Planner::new(),
            out: Output::default(),
            streams: HashMap::new(),
            stats: BatchStats::default(),
            fallbacks: Fallbacks::default(),
        }
    }

    pub fn stats(&self) -> BatchStats {
        self.stats
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
        match event {
            Event::Change {
                stream: None,
                change,
            } => {
                self.stats.changes += 1;
                self.eval(&change);
                self.planner.push_change(self.out.actions.drain(..));
                self.cut_if_full(ready);
            }
            Event::Change {
                stream: Some((xid, subxid)),
                change,
            } => self.buffer(xid, subxid, &change),
            Event::Commit {
                checkpoint,
                commit_time,
            } => {
                self.stats.transactions += 1;
                self.planner.commit(checkpoint, Some(commit_time));
                self.cut_if_full(ready);
            }
            Event::StreamCommit {
                xid,
                checkpoint,
                commit_time,
            } => {
                self.stats.transactions += 1;
                if let Some(buffer) = self.streams.remove(&xid) {
                    self.release(xid, buffer, ready);
                }
                self.planner.commit(checkpoint, Some(commit_time));
                self.cut_if_full(ready);
            }
            Event::StreamAbort { xid, subxid } if xid == subxid => {
                self.stats.aborted_streams += 1;
                self.streams.remove(&xid);
            }
            Event::StreamAbort { xid, subxid } => {
                if let Some(buffer) = self.streams.get_mut(&xid) {
                    buffer.actions.retain(|(owner, _)| *owner != subxid);
                }
            }
        }
    }

    /// Pattern deletes that stood in for keys since the last call, by
    /// table (a placeholder's value unknown, or a key too long).
    pub fn take_fallbacks(&mut self) -> impl Iterator<Item = (Arc<TableName>, u64)> + '_ {
        self.fallbacks.drain()
    }

    fn eval(&mut self, change: &RowChange) {
        eval_counting(&self.mappings, change, &mut self.out, &mut self.fallbacks);
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
        let buffer = self.streams.entry(xid).or_default();
        buffer.changes += 1;
        if !buffer.tables.contains(&change.table) {
            buffer.tables.insert(change.table.clone());
        }
        if buffer.coarse {
            return;
        }
        self.eval(change);
        let buffer = self.streams.entry(xid).or_default();
        buffer
            .actions
            .extend(self.out.actions.drain(..).map(|action| (subxid, action)));
        if buffer.actions.len() > self.limits.max_pending_keys {
            tracing::warn!(
                xid,
                pending = buffer.actions.len(),
                max_pending_keys = self.limits.max_pending_keys,
                tables = buffer.tables.len(),
                "streamed transaction too large to track key by key: it will invalidate its tables coarsely"
            );
            buffer.actions = Vec::new();
            buffer.coarse = true;
        }
    }

    /// Moves a committed streamed transaction's actions into the planner,
    /// cutting plans as they fill.
    fn release(&mut self, xid: u32, buffer: StreamBuffer, ready: &mut Vec<Plan>) {
        self.stats.changes += buffer.changes;
        if buffer.coarse {
            self.stats.coarse_transactions += 1;
            tracing::warn!(xid, tables = ?buffer.tables, "coarse invalidation of the tables a large transaction touched");
            self.planner.count_changes(buffer.changes);
            for table in buffer.tables {
                self.out.clear();
                self.mappings.eval_coarse(&table, &mut self.out);
                for action in self.out.actions.drain(..) {
                    self.planner.push(action);
                }
                self.cut_if_full(ready);
            }
            return;
        }
        self.planner.count_changes(buffer.changes);
        for (_, action) in buffer.actions {
            self.planner.push(action);
            self.cut_if_full(ready);
        }
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
            commit_time: SystemTime::now(),
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
            ready.iter().map(|plan| plan.checkpoint).collect();
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
                commit_time: SystemTime::now(),
            },
            &mut ready,
        );
        let plan = batcher.take().expect("the committed stream");
        assert_eq!(lines(&plan), ["UNLINK t:1", "UNLINK t:3"]);
        assert_eq!(plan.checkpoint, Some(Checkpoint::Lsn(Lsn(200))));
        assert_eq!(plan.changes, 3);
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
                commit_time: SystemTime::now(),
            },
            &mut ready,
        );
        let plan = batcher.take().expect("the coarse plan");
        assert_eq!(lines(&plan), ["UNLINK MATCH t:*"]);
        assert_eq!(batcher.stats().coarse_transactions, 1);
        assert_eq!(plan.changes, 10);
    }
}
