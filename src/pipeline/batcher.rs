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

    /// Handles one event; full plans are appended to `ready`.
    pub fn push(&mut self, event: Event, ready: &mut Vec<Plan>) {
        match event {
            Event::Change {
                stream: None,
                change,
            } => {
                self.stats.changes += 1;
                self.out.clear();
                self.mappings.eval(&change, &mut self.out);
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
        self.out.clear();
        self.mappings.eval(change, &mut self.out);
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
