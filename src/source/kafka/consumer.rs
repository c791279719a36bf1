//! The librdkafka consumer, on a thread of its own (its calls block, and
//! rebalance callbacks run inside `poll`).
//!
//! Records go to the pipeline as [`ConsumerEvent`]s over a bounded channel, decoded
//! and checked against the mappings here so that decoding runs beside
//! planning. Offsets come back as [`Command::Store`] only once the pipeline
//! has applied them; auto-commit and auto offset store are off, and the
//! stored offsets of every partition are committed every
//! `commit_interval_ms`, synchronously before partitions are released and at
//! shutdown.
//!
//! **Rebalances.** When partitions are revoked, the callback asks the
//! pipeline to drain ([`ConsumerEvent::Drain`]): apply everything already taken and
//! answer with the offsets that covers, within `drain_timeout_ms`. Those are
//! committed before the partitions go. When partitions are assigned, each
//! starts at its committed offset; one without (a new group) starts at the
//! beginning of the partition; one whose committed offset the broker no
//! longer holds (retention deleted records evictd had not read) starts at
//! the beginning too, and is reported as [`ConsumerEvent::Lost`]: the pipeline
//! invalidates coarsely before anything from it is applied.

use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use super::debezium::{Decoded, Decoder};
use crate::config::KafkaConfig;
use crate::continuity::{self, Continuity};
use crate::error::{Error, ErrorKind};
use crate::mapping::Mappings;
use crate::operator::Report;
use crate::telemetry;

/// How long one metadata or offset request to the broker may take.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `poll` blocks; commands are served between polls.
const POLL: Duration = Duration::from_millis(20);
/// Records handed to the pipeline in one event at most.
const RECORD_CHUNK: usize = 256;

pub use crate::change::Partition;

/// The offset to commit for a partition: the next record to read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    pub partition: Partition,
    pub next_offset: i64,
}

/// One record, decoded.
#[derive(Debug)]
pub struct Record {
    pub partition: Partition,
    pub offset: i64,
    /// The record's timestamp (the producer's create time or the broker's
    /// append time), when it has one.
    pub timestamp: Option<SystemTime>,
    pub decoded: Result<Decoded, String>,
    /// The raw record when it is bad, for the dead-letter topic.
    pub raw: Option<RawRecord>,
}

/// A record's key and value as the broker holds them.
#[derive(Debug, Default)]
pub struct RawRecord {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

/// What the consumer tells the pipeline, in order.
#[derive(Debug)]
pub enum ConsumerEvent {
    /// Records in the order they were read (a chunk, to spare a wake-up
    /// per record).
    Records(Vec<Record>),
    /// Partitions now held (after a rebalance), each with where it starts.
    Assigned(Vec<Position>),
    /// Partitions whose committed offset the broker no longer holds: the
    /// records in between were lost to retention.
    Lost(Vec<(Partition, String)>),
    /// Partitions are being revoked: apply everything taken so far and
    /// answer with the positions that covers.
    Drain(std_mpsc::Sender<Vec<Position>>),
    /// The consumer failed for good.
    Failed(String),
}

/// What the pipeline tells the consumer.
#[derive(Debug)]
pub enum Command {
    /// These records are applied: store their offsets for the next commit.
    Store(Vec<Position>),
    /// Stop fetching every assigned partition (a bad record halted the
    /// pipeline under `on_bad_record = "stop"`).
    PauseAll,
    /// Commit what is stored and end.
    Stop,
}

/// The handle the pipeline keeps.
pub struct ConsumerHandle {
    pub events: mpsc::Receiver<ConsumerEvent>,
    pub commands: std_mpsc::Sender<Command>,
    /// Answers once the thread has committed and is about to close.
    pub done: std_mpsc::Receiver<()>,
}

/// librdkafka settings shared by the consumer and the dead-letter producer.
pub fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.brokers);
    for (key, value) in &config.properties.0 {
        client.set(key, value);
    }
    client.set_log_level(RDKafkaLogLevel::Warning);
    client
}

/// The consumer's settings: the client's, the group, and offsets stored
/// and committed by evictd alone.
pub fn consumer_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = client_config(config);
    client
        .set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Never skip silently: a missing offset is handled at assignment.
        .set("auto.offset.reset", "error")
        .set("enable.partition.eof", "false")
        // A topic created after start (by name, or matching a pattern) is
        // found at the next refresh.
        .set(
            "topic.metadata.refresh.interval.ms",
            config.metadata_refresh_ms.to_string(),
        );
    client
}

/// Subscribes and starts the consumer thread.
pub fn spawn(
    config: &KafkaConfig,
    mappings: tokio::sync::watch::Receiver<Arc<Mappings>>,
    capacity: usize,
) -> Result<ConsumerHandle, Error> {
    let (events_tx, events) = mpsc::channel(capacity);
    let (commands, commands_rx) = std_mpsc::channel();
    let (done_tx, done) = std_mpsc::channel();
    let context = Context {
        events: events_tx,
        pending: Mutex::new(Vec::new()),
        commands: Mutex::new(commands_rx),
        drain_timeout: Duration::from_millis(config.drain_timeout_ms),
        closing: std::sync::atomic::AtomicBool::new(false),
        consumed: Mutex::new(std::collections::BTreeSet::new()),
    };
    let consumer: BaseConsumer<Context> = consumer_config(config)
        .create_with_context(context)
        .map_err(|e| Error::kafka("cannot create the Kafka consumer", e))?;
    let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(|e| {
        Error::with_source(
            ErrorKind::Config,
            format!("cannot subscribe to {topics:?}"),
            e,
        )
    })?;
    let worker = Worker {
        consumer,
        mappings,
        decoder: Decoder::new(&config.unavailable_value_placeholder),
        commit_interval: Duration::from_millis(config.commit_interval_ms),
        done: done_tx,
        topics: Topics::new(config),
    };
    std::thread::Builder::new()
        .name("evictd-kafka".into())
        .spawn(move || worker.run())
        .map_err(|e| Error::with_source(ErrorKind::Shutdown, "cannot start the Kafka thread", e))?;
    Ok(ConsumerHandle {
        events,
        commands,
        done,
    })
}

struct Context {
    events: mpsc::Sender<ConsumerEvent>,
    /// Records read and not yet handed over; always sent before any other
    /// event, so that order holds across rebalances.
    pending: Mutex<Vec<Record>>,
    commands: Mutex<std_mpsc::Receiver<Command>>,
    drain_timeout: Duration,
    /// Set once the worker stops: the final revoke needs no drain.
    closing: std::sync::atomic::AtomicBool,
    /// The topics partitions were assigned from so far.
    consumed: Mutex<std::collections::BTreeSet<String>>,
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::error!(facility, "librdkafka: {message}"),
            RDKafkaLogLevel::Warning => tracing::warn!(facility, "librdkafka: {message}"),
            _ => tracing::debug!(facility, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka client error");
    }
}

impl ConsumerContext for Context {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        partitions: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let lost = start_positions(consumer, partitions);
                if !lost.is_empty() {
                    self.send(ConsumerEvent::Lost(lost));
                }
                let assigned = match consumer.rebalance_protocol() {
                    RebalanceProtocol::Cooperative => consumer.incremental_assign(partitions),
                    _ => consumer.assign(partitions),
                };
                if let Err(error) = assigned {
                    tracing::error!(%error, "cannot take the assigned partitions");
                }
                let assigned = positions(partitions);
                self.log_new_topics(&assigned);
                #[allow(clippy::cast_precision_loss)]
                metrics::gauge!(telemetry::KAFKA_ASSIGNED_PARTITIONS).set(assigned.len() as f64);
                self.send(ConsumerEvent::Assigned(assigned));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                if !self.closing.load(std::sync::atomic::Ordering::SeqCst) {
                    self.drain(consumer);
                }
                let released = match consumer.rebalance_protocol() {
                    RebalanceProtocol::Cooperative => consumer.incremental_unassign(partitions),
                    _ => consumer.unassign(),
                };
                if let Err(error) = released {
                    tracing::warn!(%error, "cannot release the revoked partitions");
                }
                metrics::gauge!(telemetry::KAFKA_ASSIGNED_PARTITIONS).set(0.0);
            }
            other => {
                tracing::warn!(error = ?other, "rebalance failed; releasing all partitions");
                let _ = consumer.unassign();
            }
        }
    }
}

impl Context {
    /// Logs each topic partitions are assigned from for the first time: a
    /// topic of the start, or one created since (by name or matching a
    /// pattern).
    fn log_new_topics(&self, assigned: &[Position]) {
        let mut consumed = self
            .consumed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let first = consumed.is_empty();
        for position in assigned {
            let topic = &position.partition.topic;
            if consumed.contains(&**topic) {
                continue;
            }
            let partitions = assigned
                .iter()
                .filter(|p| p.partition.topic == *topic)
                .count();
            if first {
                tracing::info!(%topic, partitions, "consuming topic");
            } else {
                tracing::info!(%topic, partitions, "a subscribed topic appeared; consuming it");
            }
            consumed.insert(topic.to_string());
        }
    }

    /// Hands the pending records over, then `event`; false once the
    /// pipeline is gone.
    fn send(&self, event: ConsumerEvent) -> bool {
        self.flush_pending() && self.events.blocking_send(event).is_ok()
    }

    /// Hands the pending records over; false once the pipeline is gone.
    fn flush_pending(&self) -> bool {
        let records = std::mem::take(
            &mut *self
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        records.is_empty()
            || self
                .events
                .blocking_send(ConsumerEvent::Records(records))
                .is_ok()
    }

    /// Keeps a record for the next hand-over; hands over a full chunk.
    fn push(&self, record: Record) -> bool {
        let full = {
            let mut pending = self
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            pending.push(record);
            pending.len() >= RECORD_CHUNK
        };
        !full || self.flush_pending()
    }

    fn has_pending(&self) -> bool {
        !self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_empty()
    }

    /// Before revoked partitions go: the pipeline applies what it took and
    /// answers; that is committed. Past the bound, the partitions go
    /// without: their next owner re-reads what was not committed.
    fn drain(&self, consumer: &BaseConsumer<Self>) {
        let started = Instant::now();
        let (answer, answered) = std_mpsc::channel();
        if !self.send(ConsumerEvent::Drain(answer)) {
            return;
        }
        let applied = answered.recv_timeout(self.drain_timeout);
        // Offsets the pipeline sent before its answer are older: store them
        // first so that the answer wins.
        self.serve_commands(consumer);
        match applied {
            Ok(applied) => {
                store(consumer, &applied);
                commit(consumer, CommitMode::Sync);
                tracing::info!(took = ?started.elapsed(), partitions = applied.len(), "rebalance: drained and committed before releasing partitions");
            }
            Err(_) => {
                commit(consumer, CommitMode::Sync);
                tracing::warn!(bound = ?self.drain_timeout, "rebalance: records in flight were not applied in time; releasing partitions without them (their next owner reads them again)");
            }
        }
    }

    /// Serves queued commands; returns false once asked to stop.
    fn serve_commands(&self, consumer: &BaseConsumer<Self>) -> bool {
        let commands = self
            .commands
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            match commands.try_recv() {
                Ok(Command::Store(positions)) => store(consumer, &positions),
                Ok(Command::PauseAll) => {
                    if let Ok(assignment) = consumer.assignment() {
                        let _ = consumer.pause(&assignment);
                    }
                }
                Ok(Command::Stop) | Err(std_mpsc::TryRecvError::Disconnected) => return false,
                Err(std_mpsc::TryRecvError::Empty) => return true,
            }
        }
    }
}

/// Sets where each assigned partition starts; returns the partitions whose
/// committed offset is out of the broker's range.
fn start_positions(
    consumer: &BaseConsumer<Context>,
    partitions: &mut TopicPartitionList,
) -> Vec<(Partition, String)> {
    let committed = match consumer.committed_offsets(partitions.clone(), BROKER_TIMEOUT) {
        Ok(committed) => committed,
        Err(error) => {
            tracing::warn!(%error, "cannot read the group's committed offsets; starting from them when the broker answers");
            return Vec::new();
        }
    };
    let mut lost = Vec::new();
    for element in committed.elements() {
        let (topic, partition) = (element.topic(), element.partition());
        let start = match element.offset() {
            Offset::Offset(offset) => {
                let verdict = consumer
                    .fetch_watermarks(topic, partition, BROKER_TIMEOUT)
                    .map(|(low, high)| continuity::judge_offset(offset, low, high));
                match verdict {
                    Ok(Continuity::Lost { reason, .. }) => {
                        lost.push((
                            Partition {
                                topic: topic.into(),
                                partition,
                            },
                            reason,
                        ));
                        Offset::Beginning
                    }
                    _ => Offset::Offset(offset),
                }
            }
            // A partition the group never committed: read it all.
            _ => Offset::Beginning,
        };
        let _ = partitions.set_partition_offset(topic, partition, start);
    }
    lost
}

fn positions(partitions: &TopicPartitionList) -> Vec<Position> {
    partitions
        .elements()
        .iter()
        .map(|element| Position {
            partition: Partition {
                topic: element.topic().into(),
                partition: element.partition(),
            },
            next_offset: element.offset().to_raw().unwrap_or(-1),
        })
        .collect()
}

fn store(consumer: &BaseConsumer<Context>, positions: &[Position]) {
    if positions.is_empty() {
        return;
    }
    let mut list = TopicPartitionList::with_capacity(positions.len());
    for position in positions {
        let _ = list.add_partition_offset(
            &position.partition.topic,
            position.partition.partition,
            Offset::Offset(position.next_offset),
        );
    }
    if let Err(error) = consumer.store_offsets(&list) {
        // Partitions revoked meanwhile: their new owner reads from the last
        // commit, which is safe.
        tracing::debug!(%error, "offsets not stored");
    }
}

fn commit(consumer: &BaseConsumer<Context>, mode: CommitMode) {
    match consumer.commit_consumer_state(mode) {
        Ok(()) => metrics::counter!(telemetry::KAFKA_COMMITS).increment(1),
        // Nothing stored since the last commit.
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(error) => tracing::warn!(%error, "offset commit failed; retried with the next one"),
    }
}

struct Worker {
    consumer: BaseConsumer<Context>,
    /// The mappings in effect (a reload replaces them).
    mappings: tokio::sync::watch::Receiver<Arc<Mappings>>,
    decoder: Decoder,
    commit_interval: Duration,
    done: std_mpsc::Sender<()>,
    /// The topics subscribed by name, and which of them the broker lacks.
    topics: Topics,
}

/// The topics subscribed by name (not by pattern): which exist, checked
/// every `metadata_refresh_ms`.
struct Topics {
    named: Vec<String>,
    missing: std::collections::BTreeSet<String>,
    every: Duration,
    last: Option<Instant>,
}

/// How long one look at the broker's topic list may block consuming.
const TOPICS_TIMEOUT: Duration = Duration::from_secs(2);

impl Topics {
    fn new(config: &KafkaConfig) -> Topics {
        Topics {
            named: config
                .topics
                .iter()
                .filter(|topic| !topic.starts_with('^'))
                .cloned()
                .collect(),
            missing: std::collections::BTreeSet::new(),
            every: Duration::from_millis(config.metadata_refresh_ms),
            last: None,
        }
    }

    /// Every `every`, reads which named topics exist: a missing one is
    /// logged once at WARN and shows 1 in `evictd_kafka_topics_missing`,
    /// one that appears is logged at INFO and shows 0.
    fn check(&mut self, consumer: &BaseConsumer<Context>) {
        if self.named.is_empty() || self.last.is_some_and(|last| last.elapsed() < self.every) {
            return;
        }
        self.last = Some(Instant::now());
        let metadata = match consumer.fetch_metadata(None, TOPICS_TIMEOUT) {
            Ok(metadata) => metadata,
            Err(error) => {
                tracing::debug!(%error, "cannot list the broker's topics");
                return;
            }
        };
        let existing: std::collections::BTreeSet<&str> = metadata
            .topics()
            .iter()
            .filter(|topic| topic.error().is_none() && !topic.partitions().is_empty())
            .map(rdkafka::metadata::MetadataTopic::name)
            .collect();
        for topic in &self.named {
            let exists = existing.contains(topic.as_str());
            if exists && self.missing.remove(topic) {
                tracing::info!(%topic, "a subscribed topic now exists; it is consumed from the next rebalance");
            } else if !exists && self.missing.insert(topic.clone()) {
                tracing::warn!(%topic, "a subscribed topic does not exist (yet); the other topics are consumed, and this one from when it is created (Debezium creates a table's topic with its first change)");
            }
            let missing = if exists { 0.0 } else { 1.0 };
            metrics::gauge!(telemetry::KAFKA_TOPICS_MISSING, "topic" => topic.clone()).set(missing);
        }
    }
}

impl Worker {
    fn run(mut self) {
        let context = self.consumer.context().clone();
        let mut last_commit = Instant::now();
        loop {
            if !context.serve_commands(&self.consumer) {
                break;
            }
            self.topics.check(&self.consumer);
            if last_commit.elapsed() >= self.commit_interval {
                commit(&self.consumer, CommitMode::Async);
                last_commit = Instant::now();
            }
            // While records wait to be handed over, only take what is
            // already there; hand them over once nothing more is.
            let wait = if context.has_pending() {
                Duration::ZERO
            } else {
                POLL
            };
            let event = match self.consumer.poll(wait) {
                None => {
                    if !context.flush_pending() {
                        break;
                    }
                    continue;
                }
                Some(Ok(message)) => {
                    let mappings = self.mappings.borrow().clone();
                    let record = record(&mut self.decoder, &mappings, &message);
                    drop(message);
                    if !context.push(record) {
                        break;
                    }
                    continue;
                }
                Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset))) => {
                    // The fetch position fell out of range after assignment:
                    // place every partition again (reporting what was lost).
                    match self.consumer.assignment() {
                        Ok(mut assignment) => {
                            let lost = start_positions(&self.consumer, &mut assignment);
                            if !lost.is_empty() && !context.send(ConsumerEvent::Lost(lost)) {
                                break;
                            }
                            if let Err(error) = self.consumer.assign(&assignment) {
                                tracing::error!(%error, "cannot place the partitions again");
                            }
                        }
                        Err(error) => tracing::error!(%error, "cannot read the assignment"),
                    }
                    continue;
                }
                Some(Err(error @ KafkaError::MessageConsumptionFatal(_))) => {
                    ConsumerEvent::Failed(format!("the Kafka consumer failed: {error}"))
                }
                Some(Err(error)) => {
                    // librdkafka retries broker and network errors itself.
                    tracing::warn!(%error, "kafka consume error");
                    continue;
                }
            };
            let failed = matches!(event, ConsumerEvent::Failed(_));
            if !context.send(event) || failed {
                break;
            }
        }
        context
            .closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        context.serve_commands(&self.consumer);
        commit(&self.consumer, CommitMode::Sync);
        let _ = self.done.send(());
        // Dropping the consumer leaves the group; it may take a while and
        // happens here, off the async runtime.
    }
}

/// Decodes one message and checks its table against the mappings.
fn record(
    decoder: &mut Decoder,
    mappings: &Mappings,
    message: &rdkafka::message::BorrowedMessage<'_>,
) -> Record {
    let decoded = decoder
        .decode(message.payload())
        .and_then(|decoded| match &decoded {
            Decoded::Change { change, .. } if mappings.table(&change.table).is_none() => {
                Err(format!("table {} is not in any mapping", change.table))
            }
            _ => Ok(decoded),
        });
    let raw = decoded.is_err().then(|| RawRecord {
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().map(<[u8]>::to_vec),
    });
    Record {
        partition: Partition {
            topic: message.topic().into(),
            partition: message.partition(),
        },
        offset: message.offset(),
        timestamp: message
            .timestamp()
            .to_millis()
            .and_then(|millis| u64::try_from(millis).ok())
            .map(|millis| UNIX_EPOCH + Duration::from_millis(millis)),
        decoded,
        raw,
    }
}

/// What `evictd check` says about the subscription against the broker's
/// topics, as warnings: each mapped table that no subscribed topic carries
/// (by Debezium's naming, `<topic.prefix>.<schema>.<table>`: a topic named
/// in `kafka.topics`, or an existing topic a pattern matches), and each
/// existing topic a pattern matches whose table no mapping names (its
/// records are counted as unmapped). Blocking.
pub fn topic_coverage(config: &KafkaConfig, mappings: &Mappings) -> Result<Vec<String>, Error> {
    let consumer: BaseConsumer = client_config(config)
        .create()
        .map_err(|e| Error::kafka("cannot create a Kafka client", e))?;
    let metadata = consumer
        .fetch_metadata(None, BROKER_TIMEOUT)
        .map_err(|e| Error::kafka("the Kafka broker did not answer", e))?;
    let mut patterns = Vec::new();
    for topic in config.topics.iter().filter(|topic| topic.starts_with('^')) {
        let regex = regex_lite::Regex::new(topic).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("kafka.topics: `{topic}` is not a regular expression: {e}"),
            )
        })?;
        patterns.push((topic.as_str(), regex));
    }
    let matched: Vec<(&str, &str)> = metadata
        .topics()
        .iter()
        .map(rdkafka::metadata::MetadataTopic::name)
        .filter(|name| !name.starts_with("__"))
        .filter_map(|name| {
            let (pattern, _) = patterns.iter().find(|(_, regex)| regex.is_match(name))?;
            Some((name, *pattern))
        })
        .collect();
    let carries =
        |topic: &str, table: &str| topic == table || topic.ends_with(&format!(".{table}"));
    let mut warnings = Vec::new();
    let tables: Vec<String> = mappings.tables().map(|m| m.table.to_string()).collect();
    for table in &tables {
        let named = config.topics.iter().any(|topic| carries(topic, table));
        let by_pattern = matched.iter().any(|(topic, _)| carries(topic, table));
        if !named && !by_pattern {
            warnings.push(format!(
                "kafka: no subscribed topic carries {table}: Debezium writes it to <topic.prefix>.{table}; name that topic in kafka.topics or match it with a pattern (a topic created later is matched when it appears)"
            ));
        }
    }
    for (topic, pattern) in &matched {
        if !tables.iter().any(|table| carries(topic, table)) {
            warnings.push(format!(
                "kafka: topic {topic} matches {pattern}, but no mapping names its table: its records are counted as unmapped"
            ));
        }
    }
    Ok(warnings)
}

/// `evictd status` for the Kafka source: per partition of each named topic,
/// the group's committed offset, the partition's range, and the records not
/// yet applied. Blocking (call it off the async runtime).
pub fn group_status(config: &KafkaConfig) -> Result<Report, Error> {
    use std::fmt::Write as _;
    let consumer: BaseConsumer = consumer_config(config)
        .create()
        .map_err(|e| Error::kafka("cannot create a Kafka client", e))?;
    let broker = |e| Error::kafka("the Kafka broker did not answer", e);
    let mut out = String::new();
    let mut warnings = Vec::new();
    let mut topics = Vec::new();
    let _ = writeln!(out, "group {} on {}", config.group_id, config.brokers);
    for topic in &config.topics {
        if topic.starts_with('^') {
            let _ = writeln!(out, "topics matching {topic}: listed by name only");
            topics.push(serde_json::json!({"pattern": topic}));
            continue;
        }
        let metadata = consumer
            .fetch_metadata(Some(topic), BROKER_TIMEOUT)
            .map_err(broker)?;
        let partitions = metadata
            .topics()
            .first()
            .map_or(0, |t| t.partitions().len());
        if partitions == 0 {
            let _ = writeln!(out, "topic {topic}: missing");
            warnings.push(format!("topic {topic} does not exist"));
            topics.push(serde_json::json!({"topic": topic, "exists": false}));
            continue;
        }
        let mut list = TopicPartitionList::new();
        list.add_partition_range(topic, 0, i32::try_from(partitions).unwrap_or(i32::MAX) - 1);
        let committed = consumer
            .committed_offsets(list, BROKER_TIMEOUT)
            .map_err(broker)?;
        let mut total_behind = 0;
        let mut partitions = Vec::new();
        for element in committed.elements() {
            let partition = element.partition();
            let (low, high) = consumer
                .fetch_watermarks(topic, partition, BROKER_TIMEOUT)
                .map_err(broker)?;
            let committed = match element.offset() {
                Offset::Offset(offset) => Some(offset),
                _ => None,
            };
            partitions.push(serde_json::json!({
                "partition": partition, "committed": committed, "low": low, "high": high,
            }));
            let line = match element.offset() {
                Offset::Offset(offset) if offset < low || offset > high => {
                    warnings.push(format!(
                        "{topic}/{partition}: committed offset {offset} is outside {low}..={high}: records were lost; evictd invalidates every mapped table when it takes the partition"
                    ));
                    format!("committed {offset}, outside {low}..={high}")
                }
                Offset::Offset(offset) => {
                    total_behind += high - offset;
                    format!(
                        "committed {offset} of {low}..={high}, {} behind",
                        high - offset
                    )
                }
                _ => {
                    total_behind += high - low;
                    format!("nothing committed ({low}..={high}: read from the start)")
                }
            };
            let _ = writeln!(out, "  {topic}/{partition}: {line}");
        }
        let _ = writeln!(out, "topic {topic}: {total_behind} records not yet applied");
        topics.push(serde_json::json!({
            "topic": topic, "exists": true, "behind": total_behind, "partitions": partitions,
        }));
    }
    let mut json = serde_json::Map::new();
    json.insert("source".into(), "kafka".into());
    json.insert(
        "group".into(),
        serde_json::json!({"id": config.group_id, "brokers": config.brokers, "topics": topics}),
    );
    Ok(Report {
        text: out,
        json,
        warnings,
    })
}
