//! A throwaway Kafka-compatible broker (`tansu`, in memory) on a random free
//! port, and the client calls tests need: create a topic, produce, read a
//! group's committed offsets, read a topic back.
//!
//! The broker binary is `$EVICTD_TANSU`, else `.tools/bin/tansu` in this
//! package (`scripts/bootstrap` puts it there), else `tansu` on `PATH`.

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tempfile::TempDir;

use super::{free_port, reaper, TestkitError};

const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A running broker; stopped on drop, and by the reaper if this process
/// dies first.
pub struct Kafka {
    _dir: TempDir,
    port: u16,
    child: Child,
    producer: FutureProducer,
}

/// One record read back from a topic.
#[derive(Debug, Clone)]
pub struct ReadRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
}

/// Where the broker binary is.
pub fn tansu_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("EVICTD_TANSU") {
        return PathBuf::from(path);
    }
    let bundled = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/tansu");
    if bundled.exists() {
        return bundled;
    }
    PathBuf::from("tansu")
}

impl Kafka {
    pub(crate) fn client(&self) -> Client {
        Client {
            brokers: self.brokers(),
        }
    }

    pub fn start() -> Result<Kafka, TestkitError> {
        let dir = tempfile::Builder::new()
            .prefix("evictd-kafka-")
            .tempdir()
            .map_err(|e| TestkitError::io("create a temporary directory", e))?;
        reaper::reap_dir(dir.path());
        let port = free_port()?;
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("tansu.log"))
            .map_err(|e| TestkitError::io("create the broker log", e))?;
        let binary = tansu_binary();
        let mut child = Command::new(&binary)
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| {
                TestkitError::io(
                    &format!(
                        "start the Kafka-compatible broker {} (install it with scripts/bootstrap)",
                        binary.display()
                    ),
                    e,
                )
            })?;
        reaper::reap_pid(child.id());
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.path().join("tansu.log")).unwrap_or_default();
                return Err(TestkitError::Start(format!(
                    "tansu exited with {status}:\n{log}"
                )));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(TestkitError::Start("tansu did not listen in 20 s".into()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let producer = ClientConfig::new()
            .set("bootstrap.servers", format!("127.0.0.1:{port}"))
            .set("linger.ms", "5")
            .create()
            .map_err(|e| TestkitError::Start(format!("cannot create a producer: {e}")))?;
        Ok(Kafka {
            _dir: dir,
            port,
            child,
            producer,
        })
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Creates `topic` with `partitions` partitions.
    pub async fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), TestkitError> {
        let admin: AdminClient<DefaultClientContext> = self
            .client()
            .config()
            .create()
            .map_err(|e| TestkitError::Start(format!("cannot create an admin client: {e}")))?;
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        let results = admin
            .create_topics(
                [&new],
                &AdminOptions::new().operation_timeout(Some(CLIENT_TIMEOUT)),
            )
            .await
            .map_err(|e| TestkitError::Start(format!("cannot create topic {topic}: {e}")))?;
        for result in results {
            result.map_err(|(topic, code)| {
                TestkitError::Start(format!("cannot create topic {topic}: {code}"))
            })?;
        }
        Ok(())
    }

    /// Produces one record (a `None` value is a tombstone) and waits for
    /// the broker to acknowledge it; returns its partition and offset.
    pub async fn produce(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Result<(i32, i64), TestkitError> {
        self.produce_to(topic, None, key, value).await
    }

    /// Produces one record to a chosen partition.
    pub async fn produce_to(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Result<(i32, i64), TestkitError> {
        let mut record = FutureRecord::<[u8], [u8]>::to(topic);
        if let Some(partition) = partition {
            record = record.partition(partition);
        }
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(value) = value {
            record = record.payload(value);
        }
        let delivery = self
            .producer
            .send(record, CLIENT_TIMEOUT)
            .await
            .map_err(|(e, _)| TestkitError::Start(format!("cannot produce to {topic}: {e}")))?;
        Ok((delivery.partition, delivery.offset))
    }

    /// The offsets `group` committed on each partition of `topic` (-1 where
    /// none), in partition order.
    pub fn committed(&self, group: &str, topic: &str) -> Result<Vec<i64>, TestkitError> {
        self.client().committed(group, topic)
    }

    /// The end (high watermark) of each partition of `topic`.
    pub fn end_offsets(&self, topic: &str) -> Result<Vec<i64>, TestkitError> {
        self.client().end_offsets(topic)
    }

    /// Commits `offsets` (one per partition, in order) for `group`, as if
    /// it had read that far.
    pub fn commit(&self, group: &str, topic: &str, offsets: &[i64]) -> Result<(), TestkitError> {
        let consumer = self.client().consumer(group)?;
        let mut list = TopicPartitionList::new();
        for (partition, offset) in (0..).zip(offsets) {
            list.add_partition_offset(topic, partition, Offset::Offset(*offset))
                .map_err(|e| TestkitError::Start(e.to_string()))?;
        }
        consumer
            .commit(&list, rdkafka::consumer::CommitMode::Sync)
            .map_err(|e| TestkitError::Start(format!("cannot commit offsets: {e}")))
    }

    /// Waits until `group` has committed the end of every partition of
    /// `topic`: everything produced so far is applied.
    pub async fn wait_committed(
        &self,
        group: &str,
        topic: &str,
        timeout: Duration,
    ) -> Result<(), TestkitError> {
        let deadline = Instant::now() + timeout;
        let end = self.end_offsets(topic)?;
        loop {
            let committed = self.committed(group, topic)?;
            if committed == end {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(TestkitError::Start(format!(
                    "group {group} committed {committed:?} on {topic}, not the end {end:?}, within {timeout:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Reads every record of `topic` from the beginning.
    pub fn read_all(&self, topic: &str) -> Result<Vec<ReadRecord>, TestkitError> {
        let consumer = self.client().consumer("evictd-testkit-reader")?;
        let end = self.end_offsets(topic)?;
        let mut list = TopicPartitionList::new();
        for partition in 0..i32::try_from(end.len()).unwrap_or(0) {
            let _ = list.add_partition_offset(topic, partition, Offset::Beginning);
        }
        consumer
            .assign(&list)
            .map_err(|e| TestkitError::Start(e.to_string()))?;
        let wanted: i64 = end.iter().sum();
        let mut records = Vec::new();
        let deadline = Instant::now() + CLIENT_TIMEOUT;
        while (records.len() as i64) < wanted && Instant::now() < deadline {
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
                let headers = message
                    .headers()
                    .map(|headers| {
                        headers
                            .iter()
                            .map(|h| {
                                let value =
                                    h.value.map(String::from_utf8_lossy).unwrap_or_default();
                                (h.key.to_owned(), value.into_owned())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                records.push(ReadRecord {
                    partition: message.partition(),
                    offset: message.offset(),
                    key: message.key().map(<[u8]>::to_vec),
                    value: message.payload().map(<[u8]>::to_vec),
                    headers,
                });
            }
        }
        Ok(records)
    }
}

/// Client calls against any broker list (the testkit's broker, or the one
/// an [`super::Evictd`] on the Kafka source reads).
pub(crate) struct Client {
    pub brokers: String,
}

impl Client {
    pub(crate) fn config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        config
    }

    /// The offsets `group` committed on each partition of `topic` (-1 where
    /// none), in partition order.
    pub fn committed(&self, group: &str, topic: &str) -> Result<Vec<i64>, TestkitError> {
        let consumer = self.consumer(group)?;
        let partitions = self.partition_count(&consumer, topic)?;
        let mut list = TopicPartitionList::new();
        list.add_partition_range(topic, 0, partitions - 1);
        let committed = consumer
            .committed_offsets(list, CLIENT_TIMEOUT)
            .map_err(|e| TestkitError::Start(format!("cannot read committed offsets: {e}")))?;
        let mut offsets: Vec<(i32, i64)> = committed
            .elements()
            .iter()
            .map(|e| (e.partition(), e.offset().to_raw().unwrap_or(-1).max(-1)))
            .collect();
        offsets.sort_unstable();
        Ok(offsets.into_iter().map(|(_, offset)| offset).collect())
    }

    /// The end (high watermark) of each partition of `topic`.
    pub fn end_offsets(&self, topic: &str) -> Result<Vec<i64>, TestkitError> {
        let consumer = self.consumer("evictd-testkit-watermarks")?;
        let partitions = self.partition_count(&consumer, topic)?;
        (0..partitions)
            .map(|partition| {
                consumer
                    .fetch_watermarks(topic, partition, CLIENT_TIMEOUT)
                    .map(|(_, high)| high)
                    .map_err(|e| TestkitError::Start(format!("cannot read watermarks: {e}")))
            })
            .collect()
    }

    pub(crate) fn consumer(&self, group: &str) -> Result<BaseConsumer, TestkitError> {
        self.config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| TestkitError::Start(format!("cannot create a consumer: {e}")))
    }

    fn partition_count(&self, consumer: &BaseConsumer, topic: &str) -> Result<i32, TestkitError> {
        let metadata = consumer
            .fetch_metadata(Some(topic), CLIENT_TIMEOUT)
            .map_err(|e| TestkitError::Start(format!("cannot read metadata of {topic}: {e}")))?;
        let count = metadata
            .topics()
            .first()
            .map_or(0, |topic| topic.partitions().len());
        i32::try_from(count)
            .ok()
            .filter(|count| *count > 0)
            .ok_or_else(|| TestkitError::Start(format!("topic {topic} has no partitions")))
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
