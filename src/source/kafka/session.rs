//! The pipeline behind the Kafka source: records -> map -> plan -> apply,
//! and applied offsets back to the consumer.
//!
//! One task takes the consumer's [`ConsumerEvent`]s in order and feeds the shared
//! [`Batcher`] one change and one commit per record, the commit carrying
//! the record's next offset as its checkpoint; the apply task (shared with
//! the Postgres source) sends the plans to Redis and publishes the offsets
//! it applied in [`Progress`], which go back to the consumer to be stored
//! and committed. Records of one partition stay in order (Debezium
//! partitions by primary key), so a key's changes are applied in commit
//! order.
//!
//! **Architecture Invariant:** an offset is stored only after every record
//! before it in its partition was applied (or, for a bad record, skipped or
//! dead-lettered as configured).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rustc_hash::FxHashMap;
use tokio::sync::{mpsc, watch};

use super::consumer::{self, Command, ConsumerEvent, Position, RawRecord, Record};
use super::debezium::Decoded;
use crate::apply::{Backoff, Progress};
use crate::change::{Checkpoint, Event as Change, Offsets, Partition};
use crate::config::{BadRecordPolicy, Config, KafkaConfig};
use crate::error::{Error, ErrorKind};
use crate::mapping::Mappings;
use crate::pipeline::batcher::{BatchLimits, Batcher};
use crate::pipeline::{finish_apply, Ended, Options, Running, SourceState, Stages};
use crate::plan::Plan;
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
                .map_err(|e| Error::kafka("cannot create the Kafka producer", e))?,
        ),
        _ => None,
    };
    let (stages, handles) = Stages::start(config, mappings.clone())?;
    for outcome in [
        "change",
        "message",
        "tombstone",
        "ignored",
        "skipped",
        "dead_letter",
        "stopped",
    ] {
        metrics::counter!(telemetry::KAFKA_RECORDS, "outcome" => outcome).increment(0);
    }
    metrics::counter!(telemetry::KAFKA_COMMITS).increment(0);
    let handle = consumer::spawn(&kafka, stages.mappings.clone(), EVENT_CHANNEL_CAPACITY)?;
    let mut live = stages.mappings;
    live.mark_unchanged();
    let session = Session {
        batcher: Batcher::new(mappings, BatchLimits::of(config, stages.secrets)),
        mappings: live,
        ready: Vec::new(),
        max_wait: Duration::from_millis(config.batch.max_wait_ms),
        batch_started: None,
        sent_plans: 0,
        stored: FxHashMap::default(),
        plans: stages.plans,
        progress: stages.progress,
        commands: handle.commands.clone(),
        source: stages.source,
        dead_letters,
        kafka,
        halted: None,
        outcomes: FxHashMap::default(),
    };
    // Kafka progress is committed offsets, not an LSN: `acked` stays at 0,
    // and its sender lives as long as the pipeline.
    let (acked, acked_rx) = watch::channel(crate::change::Lsn(0));
    let task = tokio::spawn(async move {
        let ended = session.run(handle, stages.stop, stages.apply_task).await;
        drop(acked);
        ended
    });
    Ok(handles.running(task, acked_rx))
}

struct Session {
    batcher: Batcher,
    /// The mappings in effect: a reload is taken between records (each is
    /// a transaction of its own).
    mappings: watch::Receiver<Arc<Mappings>>,
    /// Plans the batcher cut, not yet sent.
    ready: Vec<Plan>,
    max_wait: Duration,
    batch_started: Option<Instant>,
    /// Plans handed to apply: once `Progress::applied_plans` reaches it,
    /// nothing is in flight.
    sent_plans: u64,
    /// Per partition, the next offset last handed to the consumer to store
    /// (or where it started when assigned): applied offsets are stored
    /// only once they pass it.
    stored: FxHashMap<Partition, i64>,
    plans: mpsc::Sender<Plan>,
    progress: watch::Receiver<Progress>,
    commands: std::sync::mpsc::Sender<Command>,
    source: watch::Sender<SourceState>,
    dead_letters: Option<FutureProducer>,
    kafka: KafkaConfig,
    /// Why the pipeline stopped taking records (`on_bad_record = "stop"`).
    halted: Option<String>,
    /// Records by outcome in the pending batch (for metrics).
    outcomes: FxHashMap<&'static str, u64>,
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
                    // Hand full plans over at once, and the rest once
                    // nothing more is waiting and apply is idle.
                    let idle = self.progress.borrow().applied_plans >= self.sent_plans;
                    let sent = if handle.events.is_empty() && idle {
                        self.flush().await
                    } else {
                        self.send_ready().await
                    };
                    if let Err(error) = sent {
                        break Err(error);
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
        event: ConsumerEvent,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Error> {
        match event {
            ConsumerEvent::Records(records) => {
                for record in records {
                    self.record(record, stop).await?;
                }
                Ok(())
            }
            ConsumerEvent::Assigned(positions) => {
                let partitions: Vec<String> = positions
                    .iter()
                    .map(|position| position.partition.to_string())
                    .collect();
                tracing::info!(?partitions, "partitions assigned");
                for position in positions {
                    self.stored.insert(position.partition, position.next_offset);
                }
                if self.halted.is_some() {
                    let _ = self.commands.send(Command::PauseAll);
                } else {
                    self.source.send_replace(SourceState::Streaming);
                    metrics::gauge!(telemetry::STREAMING).set(1.0);
                }
                Ok(())
            }
            ConsumerEvent::Lost(partitions) => self.lost(&partitions).await,
            ConsumerEvent::Drain(answer) => {
                self.flush().await?;
                let applied = tokio::time::timeout(
                    Duration::from_millis(self.kafka.drain_timeout_ms),
                    self.wait_applied(),
                )
                .await;
                if let Ok(result) = applied {
                    result?;
                }
                // Everything applied of the partitions held: the consumer
                // stores it (again) and commits before they go.
                let progress = self.progress.borrow();
                let positions = progress
                    .offsets
                    .0
                    .iter()
                    .filter(|(partition, _)| self.stored.contains_key(*partition))
                    .map(|(partition, next)| position((partition.clone(), *next)))
                    .collect();
                drop(progress);
                let _ = answer.send(positions);
                Ok(())
            }
            ConsumerEvent::Failed(reason) => {
                Err(Error::new(ErrorKind::Kafka { transient: false }, reason))
            }
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
        if self.mappings.has_changed().unwrap_or(false) {
            let mappings = self.mappings.borrow_and_update().clone();
            self.batcher.set_mappings(mappings, &mut self.ready);
            tracing::info!("the reloaded mappings are in effect");
        }
        let Record {
            partition,
            offset,
            timestamp,
            decoded,
            raw,
        } = record;
        let mut commit_time = None;
        let outcome = match decoded {
            Ok(Decoded::Change {
                change,
                commit_time: committed,
                xid,
            }) => {
                // Its transaction, for the visibility gate (with a
                // Postgres connection configured).
                if let Some(xid) = xid {
                    self.batcher.push(Change::Begin { xid }, &mut self.ready);
                }
                if let Some(timestamp) = timestamp {
                    self.batcher.note_sent(timestamp);
                }
                commit_time = committed;
                let change = Change::Change {
                    stream: None,
                    change,
                };
                self.batcher.push(change, &mut self.ready);
                "change"
            }
            Ok(Decoded::Message(content)) => {
                let message = Change::Message {
                    stream: None,
                    position: format!("{partition} offset {offset}").into(),
                    content: content.into(),
                };
                self.batcher.push(message, &mut self.ready);
                "message"
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
        // Each record is a transaction of its own: its offset is covered
        // once it is applied (or, for a bad record, skipped).
        let commit = Change::Commit {
            checkpoint: Checkpoint::Offsets(Offsets::after(partition, offset)),
            commit_time,
        };
        self.batcher.push(commit, &mut self.ready);
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
        metrics::counter!(telemetry::CONTINUITY_LOST, "cause" => "offsets_removed").increment(1);
        self.flush().await?;
        self.batcher.invalidate_everything(&mut self.ready);
        self.flush().await
    }

    /// Sends the pending batch to apply.
    async fn flush(&mut self) -> Result<(), Error> {
        self.batch_started = None;
        // Counted per batch: a labelled counter per record costs more than
        // decoding it.
        self.batcher.record_metrics();
        for (outcome, count) in self.outcomes.drain() {
            metrics::counter!(telemetry::KAFKA_RECORDS, "outcome" => outcome).increment(count);
        }
        self.ready.extend(self.batcher.take());
        self.send_ready().await
    }

    /// Sends the plans the batcher cut.
    async fn send_ready(&mut self) -> Result<(), Error> {
        for plan in self.ready.drain(..) {
            self.sent_plans += 1;
            self.plans
                .send(plan)
                .await
                .map_err(|_| Error::new(ErrorKind::Shutdown, "the apply task ended"))?;
        }
        Ok(())
    }

    /// Hands the offsets apply reached since the last call to the consumer.
    fn store_applied(&mut self) {
        let progress = self.progress.borrow();
        let mut newly = Vec::new();
        for (partition, next) in &progress.offsets.0 {
            let stored = self.stored.entry(partition.clone()).or_insert(i64::MIN);
            if *next > *stored {
                *stored = *next;
                newly.push(position((partition.clone(), *next)));
            }
        }
        drop(progress);
        if !newly.is_empty() {
            let _ = self.commands.send(Command::Store(newly));
        }
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
