//! The pipeline behind the Kafka source: records -> map -> plan -> apply,
//! and applied offsets back to the consumer.
//!
//! One task takes the consumer's [`Event`]s in order, evaluates each change
//! and plans batches; the apply task (shared with the Postgres path) sends
//! them to Redis. Each plan sent remembers the next offset of every
//! partition it covers; once apply reports the plan done, those offsets go
//! back to the consumer to be stored and committed. Records of one partition
//! stay in order (Debezium partitions by primary key), so a key's changes are
//! applied in commit order.
//!
//! **Architecture Invariant:** an offset is stored only after every record
//! before it in its partition was applied (or, for a bad record, skipped or
//! dead-lettered as configured).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rustc_hash::FxHashMap;
use tokio::sync::{mpsc, watch};

use super::batcher::{eval_counting, Fallbacks};
use super::schema::FallbackLog;
use super::{finish_apply, Options, Running, SourceState, Stages};
use crate::apply::{Backoff, Progress, Request};
use crate::change::{Op, TableName};
use crate::config::{BadRecordPolicy, Config, KafkaConfig};
use crate::error::{Error, ErrorKind};
use crate::mapping::{Mappings, Output};
use crate::pipeline::replication::Ended;
use crate::plan::Planner;
use crate::source::kafka::consumer::{
    self, Command, Event, Partition, Position, RawRecord, Record,
};
use crate::source::kafka::debezium::Decoded;
use crate::telemetry;

/// Events (chunks of up to 256 records) decoded ahead of planning.
const EVENT_CHANNEL_CAPACITY: usize = 64;
/// How long shutdown waits for the last batch and commit.
const STOP_BOUND: Duration = Duration::from_secs(10);

/// Starts the consumer thread, the planning task and the apply task.
pub fn start(config: &Config, mappings: Arc<Mappings>, options: Options) -> Result<Running, Error> {
    let kafka = config
        .kafka
        .clone()
        .ok_or_else(|| Error::new(ErrorKind::Config, "[kafka] is not set"))?;
    if options.until.is_some() {
        return Err(Error::new(
            ErrorKind::Config,
            "replay --until-lsn needs the Postgres source",
        ));
    }
    let dead_letters = match kafka.on_bad_record {
        BadRecordPolicy::DeadLetter => Some(
            consumer::client_config(&kafka)
                .set("enable.idempotence", "true")
                .create::<FutureProducer>()
                .map_err(|e| {
                    Error::with_source(ErrorKind::Config, "cannot create the Kafka producer", e)
                })?,
        ),
        _ => None,
    };
    let (stages, handles) = Stages::start(config)?;
    let handle = consumer::spawn(&kafka, mappings.clone(), EVENT_CHANNEL_CAPACITY)?;
    let session = Session {
        mappings,
        max_keys: config.batch.max_keys,
        max_wait: Duration::from_millis(config.batch.max_wait_ms),
        planner: Planner::new(),
        out: Output::default(),
        batch: FxHashMap::default(),
        batch_started: None,
        in_flight: VecDeque::new(),
        applied: FxHashMap::default(),
        sent_plans: 0,
        plans: stages.plans,
        progress: stages.progress,
        commands: handle.commands.clone(),
        source: stages.source,
        dead_letters,
        kafka,
        halted: None,
        received: FxHashMap::default(),
        outcomes: FxHashMap::default(),
        fallbacks: Fallbacks::default(),
        fallback_log: FallbackLog::default(),
    };
    // Kafka progress is committed offsets, not an LSN: `acked` stays at 0,
    // and its sender lives as long as the pipeline.
    let acked = stages.acked;
    let task = tokio::spawn(async move {
        let ended = session.run(handle, stages.stop, stages.apply_task).await;
        drop(acked);
        ended
    });
    Ok(handles.running(task))
}

struct Session {
    mappings: Arc<Mappings>,
    max_keys: usize,
    max_wait: Duration,
    planner: Planner,
    out: Output,
    /// Next offset per partition of the records in `planner`.
    batch: FxHashMap<Partition, i64>,
    batch_started: Option<Instant>,
    /// Plans sent and not yet applied: their number and what they cover.
    in_flight: VecDeque<(u64, FxHashMap<Partition, i64>)>,
    /// Next offset per partition of everything applied.
    applied: FxHashMap<Partition, i64>,
    sent_plans: u64,
    plans: mpsc::Sender<Request>,
    progress: watch::Receiver<Progress>,
    commands: std::sync::mpsc::Sender<Command>,
    source: watch::Sender<SourceState>,
    dead_letters: Option<FutureProducer>,
    kafka: KafkaConfig,
    /// Why the pipeline stopped taking records (`on_bad_record = "stop"`).
    halted: Option<String>,
    /// Metrics of the pending batch.
    received: FxHashMap<(Arc<TableName>, Op), u64>,
    outcomes: FxHashMap<&'static str, u64>,
    /// Pattern deletes that stood in for keys in the pending batch, by table.
    fallbacks: Fallbacks,
    fallback_log: FallbackLog,
}

impl Session {
    async fn run(
        mut self,
        mut handle: consumer::ConsumerHandle,
        mut stop: watch::Receiver<bool>,
        apply_task: tokio::task::JoinHandle<Result<(), Error>>,
    ) -> Result<Ended, Error> {
        let mut progress = self.progress.clone();
        let mut stop_while_handling = stop.clone();
        let result = loop {
            let deadline = self.batch_started.map(|started| started + self.max_wait);
            tokio::select! {
                biased;
                () = stopped(&mut stop) => break Ok(Ended::Stopped),
                changed = progress.changed() => {
                    if changed.is_err() {
                        break Err(Error::new(ErrorKind::Shutdown, "the apply task ended"));
                    }
                    self.store_applied();
                }
                event = handle.events.recv() => {
                    let Some(event) = event else {
                        break Err(Error::new(ErrorKind::Shutdown, "the Kafka consumer thread ended"));
                    };
                    if let Err(error) = self.handle(event, &mut stop_while_handling).await {
                        break Err(error);
                    }
                    // Hand a batch over once nothing more is waiting and
                    // apply is idle, or once it is full.
                    let idle = self.in_flight.is_empty();
                    if self.planner.len() >= self.max_keys
                        || (handle.events.is_empty() && idle)
                    {
                        if let Err(error) = self.flush().await {
                            break Err(error);
                        }
                    }
                }
                () = sleep_until(deadline) => {
                    if let Err(error) = self.flush().await {
                        break Err(error);
                    }
                }
            }
        };
        if let Err(error) = &result {
            let cause = error.cause();
            tracing::error!(%error, %cause, "the pipeline stops: this error is not worth retrying");
        }
        self.source.send_replace(SourceState::Ended);
        metrics::gauge!(telemetry::STREAMING).set(0.0);
        // Apply what was taken, store it, and let the consumer commit.
        if result.is_ok() {
            let finished = async {
                self.flush().await?;
                self.wait_applied().await
            };
            if tokio::time::timeout(STOP_BOUND, finished).await.is_err() {
                tracing::warn!("stopping with batches not applied; they are read again on restart");
            }
        }
        let _ = self.commands.send(Command::Stop);
        drop(self.plans);
        let done = handle.done;
        let _ = tokio::task::spawn_blocking(move || done.recv_timeout(STOP_BOUND)).await;
        // When apply failed, its error is the cause of "the apply task ended".
        finish_apply(apply_task).await?;
        result
    }

    async fn handle(
        &mut self,
        event: Event,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Error> {
        match event {
            Event::Records(records) => {
                for record in records {
                    self.record(record, stop).await?;
                }
                Ok(())
            }
            Event::Assigned(positions) => {
                let partitions: Vec<String> = positions
                    .iter()
                    .map(|position| position.partition.to_string())
                    .collect();
                tracing::info!(?partitions, "partitions assigned");
                if self.halted.is_some() {
                    let _ = self.commands.send(Command::PauseAll);
                } else {
                    self.source.send_replace(SourceState::Streaming);
                    metrics::gauge!(telemetry::STREAMING).set(1.0);
                }
                Ok(())
            }
            Event::Lost(partitions) => self.lost(&partitions).await,
            Event::Drain(answer) => {
                self.flush().await?;
                let applied = tokio::time::timeout(
                    Duration::from_millis(self.kafka.drain_timeout_ms),
                    self.wait_applied(),
                )
                .await;
                if let Ok(result) = applied {
                    result?;
                }
                let positions = self.applied.drain().map(position).collect();
                let _ = answer.send(positions);
                Ok(())
            }
            Event::Failed(reason) => Err(Error::new(ErrorKind::Shutdown, reason)),
        }
    }

    async fn record(
        &mut self,
        record: Record,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Error> {
        if self.halted.is_some() {
            return Ok(());
        }
        let Record {
            partition,
            offset,
            timestamp,
            decoded,
            raw,
        } = record;
        let outcome = match decoded {
            Ok(Decoded::Change {
                change,
                commit_time,
            }) => {
                eval_counting(&self.mappings, &change, &mut self.out, &mut self.fallbacks);
                self.planner.push_change(self.out.actions.drain(..));
                if let Some(commit_time) = commit_time {
                    self.planner.note_commit_time(commit_time);
                }
                if let Some(timestamp) = timestamp {
                    self.planner.note_sent(timestamp);
                }
                *self
                    .received
                    .entry((change.table.clone(), change.op))
                    .or_default() += 1;
                "change"
            }
            Ok(Decoded::Tombstone) => "tombstone",
            Ok(Decoded::NotARowChange) => "ignored",
            Err(reason) => {
                match self
                    .bad_record(&partition, offset, &reason, raw, stop)
                    .await?
                {
                    Some(outcome) => outcome,
                    None => return Ok(()),
                }
            }
        };
        *self.outcomes.entry(outcome).or_default() += 1;
        self.batch.insert(partition, offset + 1);
        self.batch_started.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// Handles a record that cannot be applied; `None` when the pipeline
    /// halts at it.
    async fn bad_record(
        &mut self,
        partition: &Partition,
        offset: i64,
        reason: &str,
        raw: Option<RawRecord>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Option<&'static str>, Error> {
        match self.kafka.on_bad_record {
            BadRecordPolicy::Skip => {
                tracing::warn!(%partition, offset, %reason, "bad record skipped");
                Ok(Some("skipped"))
            }
            BadRecordPolicy::DeadLetter => {
                let raw = raw.unwrap_or_default();
                self.dead_letter(partition, offset, reason, raw, stop)
                    .await?;
                tracing::warn!(%partition, offset, %reason, topic = ?self.kafka.dead_letter_topic, "bad record sent to the dead-letter topic");
                Ok(Some("dead_letter"))
            }
            BadRecordPolicy::Stop => {
                metrics::counter!(telemetry::KAFKA_RECORDS, "outcome" => "stopped").increment(1);
                let why = format!(
                    "stopped at a bad record, {partition} offset {offset}: {reason} (on_bad_record = \"stop\"; fix it and restart, or choose \"skip\" or \"dead_letter\")"
                );
                tracing::error!("{why}");
                // Everything before it is applied and committed as usual.
                self.flush().await?;
                let _ = self.commands.send(Command::PauseAll);
                self.source
                    .send_replace(SourceState::Interrupted(why.clone()));
                metrics::gauge!(telemetry::STREAMING).set(0.0);
                self.halted = Some(why);
                Ok(None)
            }
        }
    }

    /// Produces the raw record to the dead-letter topic with the error as a
    /// header, retrying until it is delivered (or shutdown).
    async fn dead_letter(
        &self,
        partition: &Partition,
        offset: i64,
        reason: &str,
        raw: RawRecord,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Error> {
        let (Some(producer), Some(topic)) = (&self.dead_letters, &self.kafka.dead_letter_topic)
        else {
            return Err(Error::new(ErrorKind::Config, "no dead-letter topic"));
        };
        let offset_text = offset.to_string();
        let partition_text = partition.partition.to_string();
        let mut backoff = Backoff::default();
        loop {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "evictd.error",
                    value: Some(reason),
                })
                .insert(Header {
                    key: "evictd.topic",
                    value: Some(&*partition.topic),
                })
                .insert(Header {
                    key: "evictd.partition",
                    value: Some(&partition_text),
                })
                .insert(Header {
                    key: "evictd.offset",
                    value: Some(&offset_text),
                });
            let mut record = FutureRecord::<[u8], [u8]>::to(topic).headers(headers);
            if let Some(key) = &raw.key {
                record = record.key(key);
            }
            if let Some(value) = &raw.value {
                record = record.payload(value);
            }
            match producer.send(record, Duration::from_secs(30)).await {
                Ok(_) => return Ok(()),
                Err((error, _)) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, retry_in = ?delay, %topic, "cannot produce to the dead-letter topic; retrying");
                    tokio::select! {
                        () = stopped(stop) => {
                            return Err(Error::new(ErrorKind::Shutdown, "stopped while dead-lettering"));
                        }
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Continuity was lost on `partitions`: invalidate every mapped table
    /// before anything further is applied.
    async fn lost(&mut self, partitions: &[(Partition, String)]) -> Result<(), Error> {
        for (partition, reason) in partitions {
            tracing::error!(%partition, %reason, "continuity lost: records were deleted before evictd read them; invalidating every mapped table");
        }
        self.flush().await?;
        for mapping in self.mappings.tables() {
            self.out.clear();
            self.mappings.eval_coarse(&mapping.table, &mut self.out);
            for action in self.out.actions.drain(..) {
                self.planner.push(action);
            }
        }
        self.flush().await?;
        metrics::counter!(telemetry::COARSE_INVALIDATIONS).increment(1);
        Ok(())
    }

    /// Sends the pending batch to apply.
    async fn flush(&mut self) -> Result<(), Error> {
        self.batch_started = None;
        // Counted per batch: a labelled counter per record costs more than
        // decoding it.
        for ((table, op), count) in self.received.drain() {
            metrics::counter!(telemetry::CHANGES_RECEIVED, "table" => table.to_string(), "op" => op.as_str()).increment(count);
        }
        for (outcome, count) in self.outcomes.drain() {
            metrics::counter!(telemetry::KAFKA_RECORDS, "outcome" => outcome).increment(count);
        }
        self.fallback_log.record(self.fallbacks.drain());
        // Every record taken is in `batch`; a coarse invalidation is in the
        // planner without one.
        if self.planner.is_empty() && self.batch.is_empty() {
            return Ok(());
        }
        let plan = self.planner.finish();
        self.sent_plans += 1;
        self.in_flight
            .push_back((self.sent_plans, std::mem::take(&mut self.batch)));
        self.plans
            .send(Request::Plan(plan))
            .await
            .map_err(|_| Error::new(ErrorKind::Shutdown, "the apply task ended"))
    }

    /// Hands the offsets of applied plans to the consumer.
    fn store_applied(&mut self) {
        let applied_plans = self.progress.borrow().applied_plans;
        let mut newly = FxHashMap::default();
        while let Some((number, _)) = self.in_flight.front() {
            if *number > applied_plans {
                break;
            }
            let (_, covered) = self.in_flight.pop_front().expect("checked above");
            newly.extend(covered);
        }
        if newly.is_empty() {
            return;
        }
        self.applied
            .extend(newly.iter().map(|(p, o)| (p.clone(), *o)));
        let _ = self
            .commands
            .send(Command::Store(newly.into_iter().map(position).collect()));
    }

    /// Waits until every plan sent is applied, storing as they are.
    async fn wait_applied(&mut self) -> Result<(), Error> {
        let target = self.sent_plans;
        let mut progress = self.progress.clone();
        progress
            .wait_for(|progress| progress.applied_plans >= target)
            .await
            .map_err(|_| Error::new(ErrorKind::Shutdown, "the apply task ended"))?;
        self.store_applied();
        Ok(())
    }
}

fn position((partition, next_offset): (Partition, i64)) -> Position {
    Position {
        partition,
        next_offset,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// Resolves once asked to stop (or the stop sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}
