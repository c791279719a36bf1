//! B5: draining a pre-filled topic of Debezium envelopes, against the
//! broker's own consume rate with the same client settings, in one run.
//!
//! A throwaway broker (tansu, in memory) gets a 4-partition topic filled
//! with 200k update envelopes (an order moving between customers: two keys
//! per side). Then:
//! - baseline: a plain librdkafka consumer with evictd's client settings
//!   reads every record and does nothing with it;
//! - evictd: the Kafka pipeline in-process (decode, map, plan, apply to a
//!   throwaway Redis, broadcast, store and commit offsets).
//!
//! Both rates are measured from the first record (evictd: the first applied
//! batch) to the last, so the consumer group's join time counts for
//! neither. Run: `cargo bench --bench kafka`; `EVICTD_BENCH_RECORDS=50000`
//! for a shorter run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use evictd::config::{Config, KafkaConfig, SecretUrl};
use evictd::mapping;
use evictd::pipeline::{self, Options};
use evictd::testkit::{Kafka, Redis};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const TOPIC: &str = "bench.public.orders";
const PARTITIONS: i32 = 4;

const MAPPING: &str = r#"
[[table]]
name = "orders"
keys = ["order:{id}", "customer:{customer_id}:orders"]
"#;

fn envelope(id: u64) -> String {
    let (old, new) = (id % 1000, (id + 1) % 1000);
    format!(
        r#"{{"before":{{"id":{id},"customer_id":{old},"status":"new","total":"12.50"}},"after":{{"id":{id},"customer_id":{new},"status":"paid","total":"12.50"}},"source":{{"version":"2.7.3.Final","connector":"postgresql","name":"bench","ts_ms":1706704500000,"snapshot":"false","db":"shop","schema":"public","table":"orders","txId":{id},"lsn":{id}}},"op":"u","ts_ms":1706704500100,"transaction":null}}"#
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let records: u64 = std::env::var("EVICTD_BENCH_RECORDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200_000);
    let kafka = Kafka::start().expect("start the broker");
    let redis = Redis::start().expect("start redis");
    kafka
        .create_topic(TOPIC, PARTITIONS)
        .await
        .expect("create the topic");

    eprintln!("B5: producing {records} envelopes ...");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    let started = Instant::now();
    let producer_ref = &producer;
    let mut pending = Vec::with_capacity(10_000);
    for id in 0..records {
        let key = id.to_string();
        let value = envelope(id);
        pending.push(async move {
            let record = FutureRecord::to(TOPIC).key(&key).payload(&value);
            producer_ref
                .send(record, Duration::from_secs(60))
                .await
                .map(drop)
                .map_err(|(e, _)| e)
        });
        if pending.len() == 10_000 {
            for result in futures_util::future::join_all(pending.drain(..)).await {
                result.expect("produced");
            }
        }
    }
    for result in futures_util::future::join_all(pending).await {
        result.expect("produced");
    }
    eprintln!("B5: produced in {:.1?}", started.elapsed());
    // Its polling thread would compete for the CPU with what is measured.
    drop(producer);
    let topic_bytes: u64 = (0..records).map(|id| envelope(id).len() as u64).sum();

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("orders.toml"), MAPPING).expect("mapping");
    let kafka_config = KafkaConfig {
        group_id: "bench-evictd".into(),
        ..KafkaConfig::with_defaults(&kafka.brokers(), vec![TOPIC.into()])
    };
    let config = Config::kafka_with_defaults(
        kafka_config.clone(),
        SecretUrl::parse(&redis.url()).expect("redis url"),
        dir.path().to_path_buf(),
    );

    eprintln!("B5: baseline consumer reading {records} records ...");
    let baseline_config = kafka_config.clone();
    let baseline = tokio::task::spawn_blocking(move || baseline_rate(&baseline_config, records))
        .await
        .expect("baseline");

    eprintln!("B5: evictd draining {records} records ...");
    let metrics = evictd::internal::telemetry::recorder();
    let cpu_before = evictd::testkit::ThreadCpu::sample();
    let mappings =
        Arc::new(mapping::load_dir(dir.path(), config.mappings.limits).expect("mapping"));
    let running = pipeline::start(&config, mappings, Options::default()).expect("start evictd");
    let mut progress = running.progress.clone();
    let first = progress
        .wait_for(|p| p.changes > 0)
        .await
        .map(|p| (Instant::now(), p.changes))
        .expect("first batch");
    progress
        .wait_for(|p| p.changes >= records)
        .await
        .expect("all applied");
    let done = Instant::now();
    let cpu_after = evictd::testkit::ThreadCpu::sample();
    let commands = progress.borrow().commands;
    #[allow(clippy::cast_precision_loss)]
    let evictd_rate = (records - first.1) as f64 / (done - first.0).as_secs_f64();
    running.stop();
    running.wait().await.expect("evictd stops");
    let committed: i64 = kafka
        .committed("bench-evictd", TOPIC)
        .expect("committed")
        .iter()
        .sum();
    assert_eq!(
        u64::try_from(committed).unwrap_or(0),
        records,
        "every offset committed"
    );
    let rss_kib = evictd::testkit::peak_rss_kib(std::process::id()).unwrap_or(0);

    let ratio = evictd_rate / baseline;
    if std::env::var_os("EVICTD_BENCH_METRICS").is_some() {
        eprintln!(
            "CPU during the evictd drain, by thread (clock ticks): {:?}",
            cpu_after.since(&cpu_before)
        );
        for line in metrics.render().lines() {
            if line.contains("_sum") || line.contains("_count") {
                eprintln!("{line}");
            }
        }
    }
    println!();
    println!("| B5: {records} Debezium envelopes, {PARTITIONS} partitions | records/s | ratio |");
    println!("| --- | --- | --- |");
    println!("| librdkafka consumer, same settings, no processing | {baseline:.0} | 1.00x |");
    println!(
        "| evictd (decode, map, plan, Redis, broadcast, commit) | {evictd_rate:.0} | {ratio:.2}x |"
    );
    println!();
    println!(
        "Redis commands: {commands}; topic payload: {} MiB; process peak RSS (bench harness, producer and baseline included): {} MiB",
        topic_bytes >> 20,
        rss_kib / 1024
    );
    println!(
        "{}",
        serde_json::json!([{
            "scenario": "B5 kafka drain",
            "records": records,
            "partitions": PARTITIONS,
            "baseline_records_per_s": baseline.round(),
            "evictd_records_per_s": evictd_rate.round(),
            "ratio": (ratio * 100.0).round() / 100.0,
            "redis_commands": commands,
            "process_peak_rss_kib": rss_kib,
        }])
    );
}

/// Records/s a plain consumer with evictd's client settings reads, from its
/// first record to its last.
fn baseline_rate(config: &KafkaConfig, records: u64) -> f64 {
    let consumer: BaseConsumer = evictd::internal::consumer_config(config)
        .set("group.id", "bench-baseline")
        .create()
        .expect("baseline consumer");
    let mut list = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        list.add_partition_offset(TOPIC, partition, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&list).expect("assign");
    let mut seen = 0u64;
    let mut first = None;
    let mut bytes = 0usize;
    while seen < records {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                first.get_or_insert_with(Instant::now);
                bytes += rdkafka::Message::payload(&message).map_or(0, <[u8]>::len);
                seen += 1;
            }
            Some(Err(error)) => panic!("baseline consume failed: {error}"),
            None => {}
        }
    }
    let took = first.expect("records").elapsed();
    std::hint::black_box(bytes);
    #[allow(clippy::cast_precision_loss)]
    let rate = (records - 1) as f64 / took.as_secs_f64();
    rate
}
