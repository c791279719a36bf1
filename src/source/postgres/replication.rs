//! The replication task: reads the slot, decodes, maps and plans, hands
//! plans to apply, and reports the applied position back to the server.
//!
//! **Progress tracking.** The flush position sent in standby status updates
//! is the larger of
//! - the end LSN of the last transaction whose plan apply finished (the
//!   [`Progress`] apply publishes), and
//! - a keepalive's `wal_end` seen while nothing was in flight: no open
//!   transaction, nothing pending in the batcher, no plan queued or being
//!   applied. Every transaction that ended before that point was received
//!   and applied, so acknowledging it loses nothing; it lets the slot
//!   advance past WAL that holds no published change. Such a position goes
//!   through apply as an empty plan, so that the continuity record in Redis
//!   is written before the slot moves.
//!
//! It never moves backwards and never passes a transaction whose Redis
//! commands and broadcast were not acknowledged. Applied progress is
//! reported at most every `ACK_INTERVAL` (10 ms), since each report wakes
//! the walsender.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::changes::ChangeDecoder;
use super::conn::{ReplicationConnection, ReplicationMessage};
use super::pgoutput;
use crate::apply::Progress;
use crate::change::{Checkpoint, Event, Lsn};
use crate::error::{Error, ErrorKind};
use crate::mapping::Mappings;
use crate::pipeline::batcher::Batcher;
use crate::pipeline::schema::{Origin, SchemaHealth};
use crate::pipeline::Ended;
use crate::plan::Plan;
use crate::telemetry;

pub struct Replication {
    pub conn: ReplicationConnection,
    pub decoder: ChangeDecoder,
    pub batcher: Batcher,
    pub plans: mpsc::Sender<Plan>,
    /// Plans handed to apply, over every session: compared with
    /// `Progress::applied_plans` to know that nothing is in flight.
    pub sent_plans: Arc<AtomicU64>,
    pub progress: watch::Receiver<Progress>,
    /// What was last reported as flushed, for observers (tests, status).
    pub acked: Arc<watch::Sender<Lsn>>,
    pub max_wait: Duration,
    pub status_interval: Duration,
    /// Stop reading past this position (`evictd replay --until-lsn`).
    pub until: Option<Lsn>,
    pub scratch: Scratch,
    /// Where drift of mapped tables seen in Relation messages goes.
    pub schema: SchemaHealth,
    /// The mappings in effect: a reload is taken between transactions.
    pub mappings: watch::Receiver<Arc<Mappings>>,
}

/// Buffers reused from message to message.
#[derive(Default)]
pub struct Scratch {
    events: Vec<Event>,
    cut: Vec<Plan>,
}

/// A session that ended cleanly: what is needed for the final status
/// update once apply has drained.
pub struct Finished {
    pub ended: Ended,
    conn: ReplicationConnection,
    received: Lsn,
    confirmed: Lsn,
    acked: Arc<watch::Sender<Lsn>>,
}

impl Finished {
    /// Sends the final standby status update (with everything apply
    /// finished, `flush`) and ends the stream with CopyDone.
    pub async fn close(mut self, flush: Lsn) -> Result<Ended, Error> {
        let confirmed = self.confirmed.max(flush);
        self.conn
            .send_status(self.received.0.max(confirmed.0), confirmed.0, false)
            .await?;
        self.acked.send_replace(confirmed);
        tracing::info!(flush_lsn = %confirmed, "sent final standby status update");
        self.conn.finish().await?;
        Ok(self.ended)
    }
}

impl Replication {
    /// Runs until `stop` turns true, `until` is reached, or an error.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<Finished, Error> {
        let mut ready: VecDeque<Plan> = VecDeque::new();
        let mut deadline: Option<Instant> = None;
        let mut acks = Acks::new();
        let mut received = Lsn(0);
        // What an earlier session acknowledged stays acknowledged.
        let mut confirmed = self.progress.borrow().flush_lsn.max(*self.acked.borrow());
        let mut status = tokio::time::interval(self.status_interval);
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ended = loop {
            if self.until.is_some_and(|until| confirmed >= until) {
                break Ended::ReachedUntil;
            }
            let step = tokio::select! {
                biased;
                // Shutdown first: stop taking input at once.
                _ = stop.wait_for(|stop| *stop) => Step::Stop,
                // Then applied batches, and acknowledging them once due:
                // promptly, so that the server can recycle WAL.
                changed = self.progress.changed() => Step::Applied(changed.is_ok()),
                () = sleep_until(acks.due), if acks.due.is_some() => Step::Ack,
                // Then hand finished plans to apply; while one waits for
                // room, nothing new is read (bounded memory).
                permit = self.plans.reserve(), if !ready.is_empty() => {
                    let permit = permit.map_err(|_| Error::new(ErrorKind::Shutdown, "the apply task ended"))?;
                    if let Some(plan) = ready.pop_front() {
                        self.sent_plans.fetch_add(1, Ordering::SeqCst);
                        permit.send(plan);
                    }
                    continue;
                }
                // Then the batch timer: a partial batch waits at most
                // `max_wait` for more changes.
                () = sleep_until(deadline), if deadline.is_some() && ready.is_empty() => {
                    deadline = None;
                    ready.extend(self.batcher.take());
                    continue;
                }
                // Then new input.
                message = self.conn.recv(), if ready.is_empty() => Step::Message(message?),
                // Last, the periodic status update, which also asks the
                // server for a keepalive so that idle progress is learned.
                _ = status.tick() => Step::Status,
            };
            match step {
                Step::Stop => break Ended::Stopped,
                Step::Applied(false) => {
                    return Err(Error::new(ErrorKind::Shutdown, "the apply task ended"))
                }
                Step::Applied(true) => {
                    let flush = self.progress.borrow_and_update().flush_lsn;
                    if flush > confirmed {
                        confirmed = flush;
                        acks.pending();
                    }
                }
                Step::Ack => {
                    acks.reported();
                    self.report(received, confirmed, false).await?;
                }
                Step::Status => {
                    acks.reported();
                    self.report(received, confirmed, true).await?;
                    self.record_metrics(received, confirmed);
                }
                Step::Message(first) => {
                    let mut next = Some(first);
                    let mut burst = 0;
                    while let Some(message) = next.take() {
                        match message {
                            ReplicationMessage::XLogData {
                                wal_start,
                                wal_end,
                                send_time,
                                data,
                            } => {
                                tracing::trace!(wal_start = %Lsn(wal_start), wal_end = %Lsn(wal_end), tag = %char::from(data.first().copied().unwrap_or(b'?')), "xlogdata");
                                received = received.max(Lsn(wal_end));
                                self.xlogdata(&data, send_time, &mut ready)?;
                                if self.batcher.has_commit() && !self.conn.has_buffered_message() {
                                    // Caught up with what the server sent: waiting for
                                    // more would only add latency. Under a backlog the
                                    // buffer is rarely empty and batches grow by
                                    // themselves up to max_keys.
                                    deadline = None;
                                    ready.extend(self.batcher.take());
                                } else if deadline.is_none() && self.batcher.has_pending() {
                                    deadline = Some(Instant::now() + self.max_wait);
                                }
                            }
                            ReplicationMessage::Keepalive { wal_end, reply } => {
                                tracing::trace!(wal_end = %Lsn(wal_end), reply, "keepalive");
                                received = received.max(Lsn(wal_end));
                                let idle = ready.is_empty()
                                    && self.batcher.is_idle()
                                    && !self.decoder.in_transaction()
                                    && self.sent_plans.load(Ordering::SeqCst)
                                        == self.progress.borrow().applied_plans;
                                if idle && Lsn(wal_end) > confirmed {
                                    // Acknowledged through apply like any batch, so
                                    // that the continuity record never lags the slot.
                                    ready.push_back(Plan {
                                        checkpoint: Some(Checkpoint::Lsn(Lsn(wal_end))),
                                        ..Plan::default()
                                    });
                                } else if reply {
                                    acks.reported();
                                    self.report(received, confirmed, false).await?;
                                }
                            }
                        }
                        // Messages already buffered are handled here, not
                        // through the select: cheaper per message, and
                        // shutdown, progress and hand-over wait for at most
                        // BURST of them.
                        burst += 1;
                        if ready.is_empty() && burst < BURST {
                            next = self.conn.try_recv()?;
                        }
                    }
                }
            }
        };
        self.hand_over(ready).await;
        Ok(Finished {
            ended,
            conn: self.conn,
            received,
            confirmed,
            acked: self.acked,
        })
    }

    /// Decodes one pgoutput message and hands its events to the batcher;
    /// plans that fill up go to `ready`.
    fn xlogdata(
        &mut self,
        data: &[u8],
        send_time: SystemTime,
        ready: &mut VecDeque<Plan>,
    ) -> Result<(), Error> {
        let in_stream = self.decoder.in_stream_block();
        let Scratch { events, cut } = &mut self.scratch;
        // A reload is taken between transactions, with no streamed one
        // open, so that no transaction is mapped by two sets.
        if !in_stream
            && !self.decoder.in_transaction()
            && !self.batcher.has_open_streams()
            && self.mappings.has_changed().unwrap_or(false)
        {
            let mappings = self.mappings.borrow_and_update().clone();
            self.batcher.set_mappings(mappings.clone(), cut);
            self.decoder.set_mappings(mappings);
            tracing::info!("the reloaded mappings are in effect");
        }
        let message = pgoutput::decode(data, in_stream).map_err(|e| {
            Error::with_source(
                ErrorKind::Protocol,
                "cannot decode the replication stream",
                e,
            )
        })?;
        self.decoder.handle(message, events)?;
        for change in self.decoder.take_schema_changes() {
            self.schema
                .report(&change.table.to_string(), Origin::Stream, change.problem);
            if change.changed {
                self.schema.recheck();
            }
        }
        for event in events.drain(..) {
            if matches!(event, Event::Commit { .. } | Event::StreamCommit { .. }) {
                self.batcher.note_sent(send_time);
            }
            self.batcher.push(event, cut);
        }
        ready.extend(cut.drain(..));
        Ok(())
    }

    async fn report(&mut self, received: Lsn, flush: Lsn, ask_reply: bool) -> Result<(), Error> {
        debug_assert!(
            flush >= *self.acked.borrow(),
            "the flush position never moves back"
        );
        self.conn
            .send_status(received.0.max(flush.0), flush.0, ask_reply)
            .await?;
        self.acked.send_if_modified(|acked| {
            let moved = *acked != flush;
            *acked = flush;
            moved
        });
        Ok(())
    }

    /// Publishes what this session counted since the last call.
    fn record_metrics(&mut self, received: Lsn, confirmed: Lsn) {
        self.batcher.record_metrics();
        #[allow(clippy::cast_precision_loss)]
        {
            metrics::gauge!(telemetry::REPLICATION_LAG_BYTES)
                .set(received.0.saturating_sub(confirmed.0) as f64);
            metrics::gauge!(telemetry::ACK_LSN).set(confirmed.0 as f64);
        }
    }

    /// Hands what is pending to apply (bounded wait), so that stopping
    /// applies what was already read.
    async fn hand_over(&mut self, mut ready: VecDeque<Plan>) {
        ready.extend(self.batcher.take());
        let handover = async {
            for plan in ready {
                self.sent_plans.fetch_add(1, Ordering::SeqCst);
                if self.plans.send(plan).await.is_err() {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), handover).await;
    }
}

/// The shortest time between two acknowledgements of applied progress.
const ACK_INTERVAL: Duration = Duration::from_millis(10);

/// When applied progress was last reported to the server, and when the next
/// report is due while one is pending. Reports are at most ACK_INTERVAL
/// apart: the walsender wakes up for each, and under a stream of small
/// transactions that costs the CPU it needs to decode.
struct Acks {
    last: Instant,
    due: Option<Instant>,
}

impl Acks {
    fn new() -> Acks {
        Acks {
            last: Instant::now(),
            due: None,
        }
    }

    /// Applied progress moved: report it once the interval allows.
    fn pending(&mut self) {
        self.due.get_or_insert(self.last + ACK_INTERVAL);
    }

    /// A status update went out with everything applied so far.
    fn reported(&mut self) {
        self.last = Instant::now();
        self.due = None;
    }
}

/// Buffered messages handled in a row before the loop looks at its other
/// inputs again.
const BURST: usize = 256;

/// What one turn of the loop has to handle.
enum Step {
    Stop,
    /// A pending acknowledgement is due.
    Ack,
    /// Apply published progress (`false`: apply is gone).
    Applied(bool),
    Message(ReplicationMessage),
    Status,
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
