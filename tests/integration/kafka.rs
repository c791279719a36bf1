//! The Kafka source against a real Kafka-compatible broker (tansu, started
//! by the testkit): Debezium envelopes in, the same invalidations out,
//! offsets committed only after apply.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::support::{init_logging, mapping_dir, stack, Cache};
use evictd::config::{BadRecordPolicy, Config, KafkaConfig, SecretUrl};
use evictd::pipeline::SourceState;
use evictd::testkit::{Evictd, Kafka};

const ORDERS: &str = r#"
[[table]]
name = "orders"
keys = ["order:{id}", "customer:{customer_id}:orders"]
"#;

const CUSTOMERS: &str = r#"
[[table]]
name = "customers"
keys = ["customer:{id}", "customer:bio:{bio}"]
"#;

pub(crate) fn kafka() -> &'static Kafka {
    static KAFKA: OnceLock<Kafka> = OnceLock::new();
    KAFKA.get_or_init(|| Kafka::start().expect("start the Kafka-compatible broker"))
}

fn sample(name: &str) -> Vec<u8> {
    std::fs::read(crate::support::repo_path(&format!(
        "tests/data/debezium/{name}"
    )))
    .unwrap_or_else(|e| panic!("read sample {name}: {e}"))
}

/// A topic, group and key prefix of this test's own.
pub(crate) struct Names {
    pub(crate) topic: String,
    group: String,
    prefix: String,
}

pub(crate) fn names() -> Names {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    Names {
        topic: format!("dbserver1.public.t{pid}_{n}"),
        group: format!("evictd-{pid}-{n}"),
        prefix: format!("k{pid}_{n}:"),
    }
}

pub(crate) fn kafka_config(names: &Names, mappings: &Path) -> Config {
    let kafka = KafkaConfig {
        group_id: names.group.clone(),
        commit_interval_ms: 50,
        ..KafkaConfig::with_defaults(&kafka().brokers(), vec![names.topic.clone()])
    };
    let redis = SecretUrl::parse(&stack().redis.url()).expect("redis url");
    let mut config = Config::kafka_with_defaults(kafka, redis, mappings.to_path_buf());
    config.redis.prefix = names.prefix.clone();
    config.redis.l1_channel = format!("{}l1", names.prefix);
    config
}

pub(crate) async fn start(config: &Config) -> Evictd {
    init_logging();
    Evictd::start(config).await.expect("evictd consumes")
}

pub(crate) async fn stop(evictd: Evictd) {
    evictd.stop().await.expect("evictd stops cleanly");
}

pub(crate) async fn produce(topic: &str, key: &str, value: Option<&[u8]>) {
    kafka()
        .produce(topic, Some(key.as_bytes()), value)
        .await
        .expect("produce");
}

/// Waits until the group committed the end of the topic (for an evictd
/// run as a process; in-process ones have `Evictd::sync`).
async fn applied(names: &Names) {
    kafka()
        .wait_committed(&names.group, &names.topic, Duration::from_secs(30))
        .await
        .expect("every record applied and committed");
}

/// Produces a create of order `id` (customer 1) for each id, keyed by id.
async fn create_orders(topic: &str, ids: std::ops::RangeInclusive<i64>) {
    for id in ids {
        produce(
            topic,
            &id.to_string(),
            Some(&order("c", None, Some((id, 1)))),
        )
        .await;
    }
}

/// A bare-payload envelope for `orders`.
fn order(op: &str, before: Option<(i64, i64)>, after: Option<(i64, i64)>) -> Vec<u8> {
    let row = |row: Option<(i64, i64)>| {
        row.map_or("null".to_owned(), |(id, customer)| {
            format!(r#"{{"id":{id},"customer_id":{customer},"status":"new"}}"#)
        })
    };
    format!(
        r#"{{"before":{},"after":{},"source":{{"schema":"public","table":"orders","ts_ms":1706704500000}},"op":"{op}"}}"#,
        row(before),
        row(after)
    )
    .into_bytes()
}

#[tokio::test]
async fn debezium_events_invalidate_what_the_mappings_name() {
    let names = names();
    kafka().create_topic(&names.topic, 1).await.expect("topic");
    let dir = mapping_dir(&[("orders.toml", ORDERS), ("customers.toml", CUSTOMERS)]);
    let config = kafka_config(&names, dir.path());
    let running = start(&config).await;
    let mut cache = Cache::new(&names.prefix).await;
    let topic = &names.topic;

    // An update with the schema wrapper that moves the order to another
    // customer: old and new keys go.
    let keys = [
        "order:10",
        "customer:1:orders",
        "customer:2:orders",
        "customer:9:orders",
    ];
    cache.seed(&keys).await;
    produce(topic, "10", Some(&sample("update_with_schema.json"))).await;
    running
        .sync()
        .await
        .expect("every record applied and committed");
    assert_eq!(cache.cached(&keys).await, ["customer:9:orders"]);

    // Create, then delete and its tombstone (bare payloads).
    let keys = ["order:11", "customer:3:orders"];
    cache.seed(&keys).await;
    produce(topic, "11", Some(&sample("create.json"))).await;
    running
        .sync()
        .await
        .expect("every record applied and committed");
    assert!(cache.cached(&keys).await.is_empty());
    cache.seed(&keys).await;
    produce(topic, "11", Some(&sample("delete.json"))).await;
    produce(topic, "11", None).await;
    running
        .sync()
        .await
        .expect("every record applied and committed");
    assert!(cache.cached(&keys).await.is_empty());

    // A snapshot read invalidates like an insert.
    let keys = ["order:12", "customer:4:orders"];
    cache.seed(&keys).await;
    produce(topic, "12", Some(&sample("snapshot_read.json"))).await;
    running
        .sync()
        .await
        .expect("every record applied and committed");
    assert!(cache.cached(&keys).await.is_empty());

    // An unavailable (TOASTed) value: every key over that column goes.
    let keys = [
        "customer:3",
        "customer:bio:hello",
        "customer:bio:other",
        "order:99",
    ];
    cache.seed(&keys).await;
    produce(topic, "3", Some(&sample("toast_update.json"))).await;
    running
        .sync()
        .await
        .expect("every record applied and committed");
    assert_eq!(cache.cached(&keys).await, ["order:99"]);

    // A truncate takes the whole table's keys.
    let keys = ["customer:1", "customer:7", "customer:bio:x", "order:99"];
    cache.seed(&keys).await;
    produce(topic, "t", Some(&sample("truncate.json"))).await;
    running
        .sync()
        .await
        .expect("every record applied and committed");
    assert_eq!(cache.cached(&keys).await, ["order:99"]);

    stop(running).await;
}

#[tokio::test]
async fn bad_records_are_skipped_by_default_and_nothing_stalls() {
    let names = names();
    kafka().create_topic(&names.topic, 1).await.expect("topic");
    let dir = mapping_dir(&[("orders.toml", ORDERS)]);
    let running = start(&kafka_config(&names, dir.path())).await;
    let mut cache = Cache::new(&names.prefix).await;
    let keys = ["order:1", "order:2", "order:3"];
    cache.seed(&keys).await;
    let topic = &names.topic;
    produce(topic, "1", Some(&order("c", None, Some((1, 1))))).await;
    produce(topic, "x", Some(b"{not json")).await;
    produce(topic, "x", Some(br#"{"hello":"world"}"#)).await;
    let unmapped = br#"{"after":{"id":1},"source":{"schema":"public","table":"nope"},"op":"c"}"#;
    produce(topic, "x", Some(unmapped)).await;
    produce(topic, "2", Some(&order("c", None, Some((2, 1))))).await;
    running
        .sync()
        .await
        .expect("every record applied and committed");
    assert_eq!(cache.cached(&keys).await, ["order:3"]);
    stop(running).await;
}

#[tokio::test]
async fn bad_records_go_to_the_dead_letter_topic_with_the_error() {
    let names = names();
    let dead = format!("{}.dead", names.topic);
    kafka().create_topic(&names.topic, 1).await.expect("topic");
    kafka()
        .create_topic(&dead, 1)
        .await
        .expect("dead-letter topic");
    let dir = mapping_dir(&[("orders.toml", ORDERS)]);
    let mut config = kafka_config(&names, dir.path());
    let kafka_config = config.kafka.as_mut().expect("kafka");
    kafka_config.on_bad_record = BadRecordPolicy::DeadLetter;
    kafka_config.dead_letter_topic = Some(dead.clone());
    let running = start(&config).await;
    let mut cache = Cache::new(&names.prefix).await;
    cache.seed(&["order:1", "order:2"]).await;
    let topic = &names.topic;
    produce(topic, "1", Some(&order("c", None, Some((1, 1))))).await;
    produce(topic, "bad", Some(b"{not json")).await;
    produce(topic, "2", Some(&order("c", None, Some((2, 1))))).await;
    running
        .sync()
        .await
        .expect("every record applied and committed");
    assert!(cache.cached(&["order:1", "order:2"]).await.is_empty());
    let dead_letters = kafka().read_all(&dead).expect("read the dead-letter topic");
    assert_eq!(dead_letters.len(), 1, "{dead_letters:?}");
    let record = &dead_letters[0];
    assert_eq!(record.key.as_deref(), Some(&b"bad"[..]));
    assert_eq!(record.value.as_deref(), Some(&b"{not json"[..]));
    let header = |name: &str| {
        record
            .headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
            .unwrap_or_else(|| panic!("header {name} in {:?}", record.headers))
    };
    assert!(header("evictd.error").starts_with("not valid JSON"));
    assert_eq!(header("evictd.topic"), *topic);
    assert_eq!(header("evictd.offset"), "1");
    stop(running).await;
}

#[tokio::test]
async fn stop_policy_halts_at_the_bad_record_after_applying_what_came_before() {
    let names = names();
    kafka().create_topic(&names.topic, 1).await.expect("topic");
    let dir = mapping_dir(&[("orders.toml", ORDERS)]);
    let mut config = kafka_config(&names, dir.path());
    config.kafka.as_mut().expect("kafka").on_bad_record = BadRecordPolicy::Stop;
    let running = start(&config).await;
    let mut cache = Cache::new(&names.prefix).await;
    cache.seed(&["order:1", "order:2"]).await;
    let topic = &names.topic;
    produce(topic, "1", Some(&order("c", None, Some((1, 1))))).await;
    produce(topic, "bad", Some(br#"{"op":"c"}"#)).await;
    produce(topic, "2", Some(&order("c", None, Some((2, 1))))).await;
    let mut source = running.running().source.clone();
    let reason = tokio::time::timeout(
        Duration::from_secs(30),
        source.wait_for(|state| matches!(state, SourceState::Interrupted(_))),
    )
    .await
    .expect("halts")
    .expect("state")
    .clone();
    let SourceState::Interrupted(reason) = reason else {
        unreachable!()
    };
    assert!(
        reason.contains(&format!("{topic}/0 offset 1")) && reason.contains("no `source` object"),
        "{reason}"
    );
    // The record before it is applied and committed; the one after is not.
    let committed = async {
        loop {
            if kafka().committed(&names.group, topic).expect("committed") == [1] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), committed)
        .await
        .expect("offset 1 committed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(cache.cached(&["order:1", "order:2"]).await, ["order:2"]);
    assert_eq!(
        kafka().committed(&names.group, topic).expect("committed"),
        [1]
    );
    stop(running).await;
}

#[tokio::test]
async fn committed_offsets_the_broker_no_longer_has_mean_coarse_invalidation() {
    let names = names();
    kafka().create_topic(&names.topic, 1).await.expect("topic");
    let topic = &names.topic;
    produce(topic, "1", Some(&order("c", None, Some((1, 1))))).await;
    produce(topic, "2", Some(&order("c", None, Some((2, 1))))).await;
    // The group read far beyond what the partition holds now, as after
    // retention deleted records it had not read.
    kafka()
        .commit(&names.group, topic, &[1000])
        .expect("commit an offset out of range");
    let mut cache = Cache::new(&names.prefix).await;
    let keys = ["order:1", "order:77", "customer:5:orders", "other:1"];
    cache.seed(&keys).await;
    let dir = mapping_dir(&[("orders.toml", ORDERS)]);
    let running = start(&kafka_config(&names, dir.path())).await;
    running
        .sync()
        .await
        .expect("every record applied and committed");
    // Every orders key went, not only those of the records read.
    assert_eq!(cache.cached(&keys).await, ["other:1"]);
    stop(running).await;
}

#[tokio::test]
async fn two_instances_in_one_group_split_the_partitions() {
    let names = names();
    kafka().create_topic(&names.topic, 4).await.expect("topic");
    let dir = mapping_dir(&[("orders.toml", ORDERS)]);
    let config = kafka_config(&names, dir.path());
    let mut cache = Cache::new(&names.prefix).await;
    let keys: Vec<String> = (1..=200).map(|id| format!("order:{id}")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    cache.seed(&keys).await;
    let first = start(&config).await;
    // Half the records arrive while the second instance joins: the first
    // drains and commits what it took before its partitions move.
    let topic = names.topic.clone();
    let producing = tokio::spawn(async move {
        create_orders(&topic, 1..=100).await;
    });
    let second = start(&config).await;
    producing.await.expect("produced");
    // Wait until the rebalance gave the first one its share again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut source = first.running().source.clone();
    tokio::time::timeout(
        Duration::from_secs(60),
        source.wait_for(|state| *state == SourceState::Streaming),
    )
    .await
    .expect("the first instance streams after the rebalance")
    .expect("state");
    let second_before = second.changes_applied();
    create_orders(&names.topic, 101..=200).await;
    kafka()
        .wait_committed(&names.group, &names.topic, Duration::from_secs(60))
        .await
        .expect("every partition committed to its end");
    assert!(cache.cached(&keys).await.is_empty());
    let (a, b) = (first.changes_applied(), second.changes_applied());
    assert!(
        a > 0 && b > second_before,
        "both instances applied records: {a} and {b}"
    );
    assert!(a + b >= 200, "{a} + {b}");
    stop(first).await;
    stop(second).await;
}

const PRICES: &str = r#"
[[table]]
name = "prices"
keys = ["price:{id}:{price}:{day}:{at}:{at_tz}:{token}:{ok}:{amount}"]
"#;

/// Subscribes to an L1 channel: the keys of each broadcast that follows.
pub(crate) async fn l1_messages(
    channel: &str,
) -> tokio::sync::mpsc::UnboundedReceiver<Vec<String>> {
    use futures_util::StreamExt as _;
    let client = redis::Client::open(stack().redis.url()).expect("redis url");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub.subscribe(channel).await.expect("subscribe");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = pubsub.on_message();
        while let Some(message) = messages.next().await {
            let payload: String = message.get_payload().expect("text");
            let json: serde_json::Value = serde_json::from_str(&payload).expect("json");
            let keys = json["keys"]
                .as_array()
                .expect("keys")
                .iter()
                .map(|key| key.as_str().expect("a key").to_owned())
                .collect();
            if tx.send(keys).is_err() {
                break;
            }
        }
    });
    rx
}

async fn next_keys(
    messages: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<String>>,
) -> Vec<String> {
    tokio::time::timeout(Duration::from_secs(30), messages.recv())
        .await
        .expect("a broadcast")
        .expect("the subscription is open")
}

#[tokio::test]
async fn debezium_values_render_the_same_keys_as_the_postgres_source() {
    // The row through logical replication.
    let schema = "
        create table prices (id bigint primary key, price numeric(10,2), day date,
            at timestamp, at_tz timestamptz, token uuid, ok boolean, amount numeric);
        alter table prices replica identity full;
        create publication evictd for table prices;
        set timezone = 'Europe/Berlin';
    ";
    let postgres = crate::support::Streaming::start(schema, &[("prices.toml", PRICES)]).await;
    let mut from_postgres = l1_messages(&postgres.config.redis.l1_channel).await;
    postgres
        .db
        .execute(
            "set timezone = 'America/New_York';
             insert into prices values (1, 12.50, '2024-01-31', '2024-01-31 12:34:56.789',
                '2024-01-31 14:34:56.5+02', '5f0b6f5c-8c1e-4c53-9d42-7f3b0f0c1a2b', true, -0.070)",
        )
        .await;
    postgres.sync().await;
    let postgres_keys = next_keys(&mut from_postgres).await;

    // The same row as Debezium 2.x encodes it (with the schema wrapper).
    let names = names();
    kafka().create_topic(&names.topic, 1).await.expect("topic");
    let dir = mapping_dir(&[("prices.toml", PRICES)]);
    let config = kafka_config(&names, dir.path());
    let mut from_kafka = l1_messages(&config.redis.l1_channel).await;
    let running = start(&config).await;
    produce(&names.topic, "1", Some(&sample("types_with_schema.json"))).await;
    running
        .sync()
        .await
        .expect("every record applied and committed");
    let kafka_keys = next_keys(&mut from_kafka).await;

    assert_eq!(kafka_keys, postgres_keys);
    assert_eq!(
        postgres_keys,
        ["price:1:12.50:2024-01-31:2024-01-31%2012%3A34%3A56.789:2024-01-31%2012%3A34%3A56.5+00:5f0b6f5c-8c1e-4c53-9d42-7f3b0f0c1a2b:t:-0.070"]
    );
    stop(running).await;
    postgres.evictd.stop().await.expect("stop");
}

/// `evictd.toml` for the Kafka source in `dir`, with its mappings.
fn run_config(
    dir: &Path,
    names: &Names,
    commit_interval_ms: u64,
    admin: u16,
) -> std::path::PathBuf {
    let topics = format!("[\"{}\"]", names.topic);
    let settings = format!("commit_interval_ms = {commit_interval_ms}\n");
    write_run_config(dir, names, &topics, &settings, admin)
}

/// A config for `evictd run` in `dir`, with the orders mapping: `topics`
/// as TOML, `settings` more lines of `[kafka]`.
fn write_run_config(
    dir: &Path,
    names: &Names,
    topics: &str,
    settings: &str,
    admin: u16,
) -> std::path::PathBuf {
    std::fs::create_dir_all(dir.join("mappings")).expect("mappings dir");
    std::fs::write(dir.join("mappings/orders.toml"), ORDERS).expect("mapping");
    let path = dir.join("evictd.toml");
    std::fs::write(
        &path,
        format!(
            "[source]\nkind = \"kafka\"\n\
             [kafka]\nbrokers = \"{}\"\ntopics = {topics}\ngroup_id = \"{}\"\n{settings}\
             [kafka.properties]\n\"session.timeout.ms\" = 6000\n\
             [redis]\nurl = \"{}\"\nprefix = \"{}\"\n\
             [mappings]\ndir = \"mappings\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n",
            kafka().brokers(),
            names.group,
            stack().redis.url(),
            names.prefix
        ),
    )
    .expect("config");
    path
}

async fn ready(admin: u16) {
    for _ in 0..600 {
        if crate::support::http_get(admin, "/readyz").is_some_and(|(status, _)| status == 200) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("evictd did not become ready in 60 s");
}

#[tokio::test]
async fn kill_9_after_apply_before_commit_re_applies_and_misses_nothing() {
    let names = names();
    kafka().create_topic(&names.topic, 1).await.expect("topic");
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = crate::support::free_port();
    // Commits are a minute apart: the kill lands after apply, before commit.
    let config = run_config(dir.path(), &names, 60_000, admin);
    let mut evictd = crate::support::spawn_run(&config);
    ready(admin).await;
    let mut cache = Cache::new(&names.prefix).await;
    let first: Vec<String> = (1..=50).map(|id| format!("order:{id}")).collect();
    let first: Vec<&str> = first.iter().map(String::as_str).collect();
    cache.seed(&first).await;
    create_orders(&names.topic, 1..=50).await;
    for _ in 0..300 {
        if cache.cached(&first).await.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        cache.cached(&first).await.is_empty(),
        "applied before the kill"
    );
    evictd.kill().expect("kill -9");
    evictd.wait().expect("reaped");
    assert_eq!(
        kafka()
            .committed(&names.group, &names.topic)
            .expect("committed"),
        [-1],
        "nothing was committed before the kill"
    );

    // While it is down: the cache refills, and more changes arrive.
    let second: Vec<String> = (51..=80).map(|id| format!("order:{id}")).collect();
    let second: Vec<&str> = second.iter().map(String::as_str).collect();
    cache.seed(&first).await;
    cache.seed(&second).await;
    create_orders(&names.topic, 51..=80).await;
    let config = run_config(dir.path(), &names, 50, admin);
    let evictd = crate::support::spawn_run(&config);
    applied(&names).await;
    assert!(
        cache.cached(&first).await.is_empty(),
        "re-applied after restart"
    );
    assert!(cache.cached(&second).await.is_empty(), "none missed");
    crate::support::terminate(evictd);
    let status = crate::support::evictd(&["status", "--config", config.to_str().expect("utf-8")]);
    let text = crate::support::stdout(&status);
    assert!(
        status.status.success(),
        "{text}{}",
        crate::support::stderr(&status)
    );
    assert!(
        text.contains(&format!(
            "{}/0: committed 80 of 0..=80, 0 behind",
            names.topic
        )),
        "{text}"
    );
    let json = crate::support::evictd(&[
        "status",
        "--config",
        config.to_str().expect("utf-8"),
        "--json",
    ]);
    let json: serde_json::Value =
        serde_json::from_str(&crate::support::stdout(&json)).expect("JSON");
    assert_eq!(json["source"], "kafka");
    let topic = &json["group"]["topics"][0];
    assert_eq!(topic["topic"], names.topic.as_str());
    assert_eq!(topic["behind"], 0);
    assert_eq!(
        topic["partitions"][0],
        serde_json::json!({"partition": 0, "committed": 80, "low": 0, "high": 80})
    );
    assert_eq!(json["redis"]["reachable"], true);
}

/// A Debezium message event (`op` "m") as the Postgres connector writes
/// it for `pg_logical_emit_message`, content in base64.
fn message_event(prefix: &str, base64_content: &str) -> Vec<u8> {
    format!(
        r#"{{"op":"m","ts_ms":1706704500000,"source":{{"connector":"postgresql","name":"dbserver1","txId":771,"lsn":24023128,"ts_ms":1706704500000}},"message":{{"prefix":"{prefix}","content":"{base64_content}"}}}}"#
    )
    .into_bytes()
}

/// Bytes as Debezium writes them under `binary.handling.mode=hex`.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn debezium_message_events_are_invalidations_from_sql() {
    let names = names();
    kafka().create_topic(&names.topic, 1).await.expect("topic");
    let dir = mapping_dir(&[("orders.toml", ORDERS)]);
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, "kafka-secret\n").expect("write the secret");
    let mut config = kafka_config(&names, dir.path());
    config.mappings.sql_messages = true;
    config.mappings.sql_messages_secrets = vec![evictd::config::Secret::File(secret)];
    let running = start(&config).await;
    let mut cache = Cache::new(&names.prefix).await;
    let keys = [
        "customer:2:orders",
        "order:5:items:a",
        "order:50:a",
        "order:2",
        "team:7",
        "order:1",
    ];
    cache.seed(&keys).await;
    let topic = &names.topic;
    let signed = |body: &str| evictd::mapping::sign(b"kafka-secret", body);
    // Signed (hex content, as binary.handling.mode=hex writes it).
    let content = signed(r#"{"keys":["customer:2:orders"],"prefixes":["order:5:"]}"#);
    produce(
        topic,
        "m1",
        Some(&message_event("evictd", &hex(content.as_bytes()))),
    )
    .await;
    // {"keys":["order:50:a"]} under another prefix: not evictd's.
    produce(
        topic,
        "m2",
        Some(&message_event("other", "eyJrZXlzIjpbIm9yZGVyOjUwOmEiXX0=")),
    )
    .await;
    // {"keys":["order:2"]} unsigned: any role could have emitted it.
    produce(
        topic,
        "m3",
        Some(&message_event("evictd", "eyJrZXlzIjpbIm9yZGVyOjIiXX0=")),
    )
    .await;
    // Signed, but `team:7` is nothing the mappings render.
    let content = signed(r#"{"keys":["team:7"]}"#);
    produce(
        topic,
        "m4",
        Some(&message_event("evictd", &hex(content.as_bytes()))),
    )
    .await;
    // Malformed content: skipped, and the stream goes on.
    produce(topic, "m5", Some(&message_event("evictd", "bm9wZQ=="))).await;
    produce(topic, "1", Some(&order("c", None, Some((1, 1))))).await;
    running
        .sync()
        .await
        .expect("every record applied and committed");
    assert_eq!(
        cache.cached(&keys).await,
        ["order:50:a", "order:2", "team:7"]
    );
    stop(running).await;
}

/// With a Postgres connection configured, a Debezium change waits until
/// its transaction (`source.txId`) is visible on the primary: a running
/// transaction stands in for one committed in the WAL but held in COMMIT.
#[tokio::test]
async fn with_a_postgres_connection_a_change_waits_for_its_transaction_to_be_visible() {
    let names = names();
    kafka().create_topic(&names.topic, 1).await.expect("topic");
    let db = crate::support::TestDb::new().await;
    let open = db.client().await;
    open.batch_execute("begin").await.unwrap();
    let xid: i64 = open
        .query_one("select pg_current_xact_id()::text::bigint", &[])
        .await
        .unwrap()
        .get(0);
    let dir = mapping_dir(&[("orders.toml", ORDERS)]);
    let mut config = kafka_config(&names, dir.path());
    config.postgres.url = Some(SecretUrl::parse(&db.url).unwrap());
    config.postgres.visibility_warn_ms = 200;
    let running = start(&config).await;
    let mut cache = Cache::new(&names.prefix).await;
    cache.seed(&["order:1"]).await;
    let event = format!(
        r#"{{"before":null,"after":{{"id":1,"customer_id":1,"status":"new"}},"source":{{"schema":"public","table":"orders","ts_ms":1706704500000,"txId":{xid}}},"op":"c"}}"#
    );
    produce(&names.topic, "1", Some(event.as_bytes())).await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(
        cache.cached(&["order:1"]).await,
        ["order:1"],
        "applied before transaction {xid} was visible"
    );
    let reason = running.running().visibility.borrow().clone();
    assert!(
        reason
            .as_deref()
            .is_some_and(|r| r.contains(&xid.to_string())),
        "{reason:?}"
    );
    open.batch_execute("commit").await.unwrap();
    running
        .sync()
        .await
        .expect("applied and committed once visible");
    assert!(cache.cached(&["order:1"]).await.is_empty());
    stop(running).await;
}

/// Debezium creates a table's topic with the table's first change, while
/// evictd already runs. A named topic that does not exist yet is reported
/// (`evictd_kafka_topics_missing`, `evictd status`) and consumed within
/// about `metadata_refresh_ms` of its creation, and so is a new topic a
/// pattern (`^...`) matches; each is logged at INFO when consumed.
#[tokio::test]
async fn topics_created_after_start_are_consumed_within_seconds() {
    let names = names();
    kafka().create_topic(&names.topic, 1).await.expect("topic");
    let late = format!("{}_late", names.topic);
    let pattern = format!("^{}_p[0-9]+$", names.topic.replace('.', "\\."));
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = crate::support::free_port();
    let topics = format!("[\"{}\", \"{late}\", '{pattern}']", names.topic);
    let settings = "commit_interval_ms = 50\nmetadata_refresh_ms = 1000\n";
    let config = write_run_config(dir.path(), &names, &topics, settings, admin);
    let log_path = dir.path().join("evictd.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_evictd"))
        .args(["run", "--config", config.to_str().expect("utf-8")])
        .env("EVICTD_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start evictd run");
    evictd::testkit::reaper::reap_pid(child.id());
    ready(admin).await;
    let metrics = || {
        crate::support::http_get(admin, "/metrics")
            .expect("/metrics")
            .1
    };
    let missing = |value: u8| format!("evictd_kafka_topics_missing{{topic=\"{late}\"}} {value}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !metrics().contains(&missing(1)) {
        assert!(Instant::now() < deadline, "{}", metrics());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = crate::support::evictd(&["status", "--config", config.to_str().expect("utf-8")]);
    let text = crate::support::stdout(&status);
    assert!(text.contains(&format!("topic {late}: missing")), "{text}");

    // The named topic appears, with a change in it; then one the pattern
    // matches.
    let mut cache = Cache::new(&names.prefix).await;
    let appeared = format!("{}_p1", names.topic);
    for (id, topic) in [(1, late.as_str()), (2, appeared.as_str())] {
        let key = format!("order:{id}");
        cache.seed(&[key.as_str()]).await;
        let created = Instant::now();
        kafka().create_topic(topic, 1).await.expect("topic");
        create_orders(topic, id..=id).await;
        while !cache.cached(&[key.as_str()]).await.is_empty() {
            assert!(
                created.elapsed() < Duration::from_secs(20),
                "{topic}: {key} still cached"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "{topic}: invalidated {:?} after the topic was created",
            created.elapsed()
        );
        let log = std::fs::read_to_string(&log_path).expect("the log");
        assert!(
            log.lines().any(|line| line.contains("INFO")
                && line.contains("a subscribed topic appeared; consuming it")
                && line.contains(topic)),
            "{log}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !metrics().contains(&missing(0)) {
        assert!(Instant::now() < deadline, "{}", metrics());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    crate::support::terminate(child);
}

/// `evictd check` against the broker: a mapped table no subscribed topic
/// carries, and a topic a pattern matches that no mapping covers.
#[tokio::test]
async fn check_names_tables_no_topic_carries_and_topics_no_mapping_covers() {
    let names = names();
    let server = names.topic.replace("dbserver1.public.", "cov");
    for table in ["orders", "unmapped"] {
        kafka()
            .create_topic(&format!("{server}.public.{table}"), 1)
            .await
            .expect("topic");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("mappings")).expect("mappings dir");
    std::fs::write(dir.path().join("mappings/orders.toml"), ORDERS).expect("mapping");
    std::fs::write(dir.path().join("mappings/customers.toml"), CUSTOMERS).expect("mapping");
    let config = dir.path().join("evictd.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nkind = \"kafka\"\n\
             [kafka]\nbrokers = \"{}\"\ntopics = ['^{server}\\.public\\..*']\n\
             [redis]\nurl = \"{}\"\n[mappings]\ndir = \"mappings\"\n",
            kafka().brokers(),
            stack().redis.url(),
        ),
    )
    .expect("config");
    let check = crate::support::evictd(&["check", "--config", config.to_str().expect("utf-8")]);
    let err = crate::support::stderr(&check);
    assert!(check.status.success(), "{err}");
    assert!(
        err.contains("kafka: no subscribed topic carries public.customers"),
        "{err}"
    );
    assert!(!err.contains("carries public.orders"), "{err}");
    assert!(
        err.contains(&format!(
            "kafka: topic {server}.public.unmapped matches ^{server}\\.public\\..*, but no mapping names its table"
        )),
        "{err}"
    );
}
