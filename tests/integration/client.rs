//! The client crate against real Postgres, evictd and Redis: a reader that
//! read the database before a commit, and is held until evictd applied
//! the commit's invalidation, must not store what it read, whichever way
//! evictd invalidates (key, tag, pattern, write-through refresh).

use std::convert::Infallible;
use std::time::{Duration, Instant};

use evictd_client::{protocol, Cache, Fill};
use tokio::sync::oneshot;

use crate::support::{stack, Streaming};

const SCHEMA: &str = "
    create table orders (id bigint primary key, user_id bigint not null, status text not null);
    alter table orders replica identity full;
    create publication evictd for table orders;
    insert into orders values (1, 1, 'new');
";

const MAPPING: &str = r#"
[[table]]
name = "orders"
keys = ["order:{id}"]
tags = ["user:{user_id}"]

[[table.refresh]]
key = "order:{id}:status"
columns = ["status"]
"#;

/// One held fill per kind of invalidation, in an order that leaves each
/// write's row as the next expects: (key, tags, the write in between) for a
/// key delete, a tag, a write-through refresh and a pattern (TRUNCATE).
const INTERLEAVINGS: &[(&str, &[&str], &str)] = &[
    (
        "order:1",
        &[],
        "update orders set status = 'paid' where id = 1",
    ),
    (
        "user:1:page",
        &["user:1"],
        "insert into orders values (2, 1, 'new')",
    ),
    (
        "order:1:status",
        &[],
        "update orders set status = 'shipped' where id = 1",
    ),
    ("order:1", &[], "truncate orders"),
];

/// Waits until `cache`'s L1 subscriber is live, up to `timeout`.
async fn live(cache: &Cache, timeout: Duration, failure: &str) {
    let deadline = Instant::now() + timeout;
    while !cache.l1_live() {
        assert!(Instant::now() < deadline, "{failure}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The row's status, read from the database.
async fn status(s: &Streaming) -> String {
    row_status(&s.db.client().await).await
}

/// How the tests read the row.
const LOAD_ORDER: &str = "select status from orders where id = 1";

/// The row's status, read over `db`.
async fn row_status(db: &tokio_postgres::Client) -> String {
    db.query_one(LOAD_ORDER, &[])
        .await
        .expect("the order")
        .get(0)
}

/// Reads order 1 through `cache`, loading it over `db` on a miss.
async fn read_order(cache: &Cache, db: &tokio_postgres::Client) -> Option<Status> {
    cache
        .get_or_load("order:1", &[], || async {
            Ok::<_, Infallible>(Some(Status {
                status: row_status(db).await,
            }))
        })
        .await
        .expect("get_or_load")
}

/// The row as the refresh writes it: `{"status": ...}`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Status {
    status: String,
}

async fn cache(s: &Streaming) -> Cache {
    Cache::builder(stack().redis.url())
        .prefix(s.config.redis.prefix.clone())
        .build()
        .await
        .expect("a cache")
}

/// A cache with an L1 tier on the test's broadcast channel, subscribed.
async fn l1_cache(s: &Streaming) -> Cache {
    let cache = Cache::builder(stack().redis.url())
        .prefix(s.config.redis.prefix.clone())
        .l1_entries(1_000)
        .l1_channel(s.config.redis.l1_channel.clone())
        .build()
        .await
        .expect("a cache");
    live(
        &cache,
        Duration::from_secs(10),
        "the L1 subscriber never went live",
    )
    .await;
    cache
}

/// Waits until `cache`'s L1 applied the last broadcast evictd sent.
async fn l1_caught_up(s: &Streaming, cache: &Cache) {
    let mut redis = crate::support::redis_connection().await;
    let last_key = format!("{}{}", s.config.redis.prefix, protocol::L1_LAST_KEY);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let last: Option<String> = redis::cmd("GET")
            .arg(&last_key)
            .query_async(&mut redis)
            .await
            .expect("GET");
        if last.is_none() || cache.l1_last() == last {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "L1 at {:?}, evictd at {last:?}",
            cache.l1_last()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads `key` through `cache`, reading the database first and then
/// waiting, so that `write` commits (and evictd applies it) between the
/// read and the fill. Returns how the fill ended and the value loaded.
async fn held_fill(
    s: &Streaming,
    cache: &Cache,
    key: &str,
    tags: &[&str],
    write: Option<&str>,
) -> (Fill, Status) {
    held_fill_with(s, cache, key, tags, None, write).await
}

/// [`held_fill`], with tags taken from the row (`late`, registered after
/// the read through [`Cache::get_or_load_tagged`]) when given.
async fn held_fill_with(
    s: &Streaming,
    cache: &Cache,
    key: &str,
    tags: &[&str],
    late: Option<&[&str]>,
    write: Option<&str>,
) -> (Fill, Status) {
    let (read_tx, read_rx) = oneshot::channel();
    let (resume_tx, resume_rx) = oneshot::channel::<()>();
    let loaded = Box::pin(status(s));
    let reader = {
        let cache = cache.clone();
        let key = key.to_owned();
        let tags: Vec<String> = tags.iter().map(|t| (*t).to_owned()).collect();
        let late: Option<Vec<String>> =
            late.map(|late| late.iter().map(|t| (*t).to_owned()).collect());
        async move {
            let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
            let load = || async move {
                let status = loaded.await;
                read_tx.send(()).expect("the test waits");
                resume_rx.await.expect("resumed");
                Ok::<_, Infallible>(Some(Status { status }))
            };
            match late {
                None => cache.get_or_load_traced(&key, &tags, load).await,
                Some(late) => {
                    cache
                        .get_or_load_tagged(&key, &tags, || async move {
                            let loaded = load().await?;
                            Ok(loaded.map(|status| (status, late)))
                        })
                        .await
                }
            }
        }
    };
    let (result, read) = tokio::join!(reader, async {
        if read_rx.await.is_err() {
            return false;
        }
        if let Some(write) = write {
            s.db.execute(write).await;
            s.sync().await;
        }
        resume_tx.send(()).expect("the reader waits");
        true
    });
    assert!(read, "{key}: the loader was not called: {result:?}");
    let (value, fill) = result.expect("get_or_load");
    (fill.expect("a miss, so a fill"), value.expect("a row"))
}

/// The shared scenarios (`client/scenarios/fills.json`), which the Python
/// package runs too: each kind of invalidation across a held fill, a
/// reload past the TTL and an L1 entry, as data.
#[derive(serde::Deserialize)]
struct Scenarios {
    schema: Vec<String>,
    mapping: String,
    reset: Vec<String>,
    load: String,
    caches: std::collections::HashMap<String, CacheSettings>,
    scenarios: Vec<Scenario>,
}

#[derive(serde::Deserialize)]
struct CacheSettings {
    l1_entries: Option<u64>,
    ttl_ms: Option<u64>,
    stale_while_revalidate_ms: Option<u64>,
}

#[derive(serde::Deserialize)]
struct Scenario {
    name: String,
    kind: String,
    cache: String,
    key: String,
    tags: Vec<String>,
    #[serde(default)]
    row_tags: Option<Vec<String>>,
    #[serde(default)]
    reload: bool,
    write: Option<String>,
    expect: Expected,
}

#[derive(serde::Deserialize)]
struct Expected {
    fill: Option<String>,
    loaded: Option<Status>,
    #[serde(default, deserialize_with = "present")]
    redis: Option<Option<Status>>,
    l1: Option<bool>,
}

/// `"redis": null` (expected absent) apart from no `redis` at all.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<Status>>, D::Error> {
    serde::Deserialize::deserialize(d).map(Some)
}

#[tokio::test]
async fn the_shared_scenarios_hold() {
    let text = std::fs::read_to_string(crate::support::repo_path("client/scenarios/fills.json"))
        .expect("client/scenarios/fills.json");
    let file: Scenarios = serde_json::from_str(&text).expect("the scenarios parse");
    assert_eq!(
        file.load, LOAD_ORDER,
        "this runner loads the row with `{LOAD_ORDER}`"
    );
    let s = Streaming::start(&file.schema.join(";\n"), &[("orders.toml", &file.mapping)]).await;
    let mut caches = std::collections::HashMap::new();
    for (name, settings) in &file.caches {
        let mut builder = Cache::builder(stack().redis.url()).prefix(s.config.redis.prefix.clone());
        if let Some(entries) = settings.l1_entries {
            builder = builder
                .l1_entries(entries)
                .l1_channel(s.config.redis.l1_channel.clone());
        }
        if let Some(ttl) = settings.ttl_ms {
            builder = builder.ttl(Duration::from_millis(ttl));
        }
        if let Some(window) = settings.stale_while_revalidate_ms {
            builder = builder.stale_while_revalidate(Duration::from_millis(window));
        }
        let cache = builder.build().await.expect("a cache");
        if settings.l1_entries.is_some() {
            live(&cache, Duration::from_secs(10), "L1 never went live").await;
        }
        caches.insert(name.clone(), (cache, settings.ttl_ms));
    }
    let plain = cache(&s).await;
    for scenario in &file.scenarios {
        let name = &scenario.name;
        let (cache, ttl) = &caches[&scenario.cache];
        for statement in &file.reset {
            s.db.execute(statement).await;
        }
        s.sync().await;
        if cache.l1_live() {
            l1_caught_up(&s, cache).await;
        }
        plain.invalidate(&scenario.key).await.unwrap();
        let key = scenario.key.as_str();
        let tags: Vec<&str> = scenario.tags.iter().map(String::as_str).collect();
        let late: Option<Vec<&str>> = scenario
            .row_tags
            .as_ref()
            .map(|tags| tags.iter().map(String::as_str).collect());
        match scenario.kind.as_str() {
            "held_fill" => {
                if scenario.reload {
                    let (fill, _) = held_fill(&s, cache, key, &tags, None).await;
                    assert_eq!(fill, Fill::Stored, "{name}: the first fill");
                    let ttl = ttl.expect("a reload scenario's cache has a TTL");
                    tokio::time::sleep(Duration::from_millis(ttl + 100)).await;
                }
                let (fill, loaded) = held_fill_with(
                    &s,
                    cache,
                    key,
                    &tags,
                    late.as_deref(),
                    scenario.write.as_deref(),
                )
                .await;
                let expected = scenario.expect.fill.as_deref().expect("expect.fill");
                let outcome = match fill {
                    Fill::Stored => "stored",
                    Fill::Fenced => "fenced",
                    Fill::Skipped => "skipped",
                };
                assert_eq!(outcome, expected, "{name}: the fill");
                if let Some(expected) = &scenario.expect.loaded {
                    assert_eq!(&loaded, expected, "{name}: what the loader read");
                }
            }
            "warm_l1" => {
                load(&s, cache, key, &tags).await;
                assert!(cache.l1_peek::<Status>(key).is_some(), "{name}: in L1");
                s.db.execute(scenario.write.as_deref().expect("a write"))
                    .await;
                s.sync().await;
            }
            other => panic!("{name}: unknown kind `{other}`"),
        }
        if let Some(expected) = &scenario.expect.redis {
            let cached: Option<Status> = plain.get(key).await.unwrap();
            assert_eq!(&cached, expected, "{name}: what Redis holds after");
        }
        if let Some(expected) = scenario.expect.l1 {
            l1_caught_up(&s, cache).await;
            assert_eq!(
                cache.l1_peek::<Status>(key).is_some(),
                expected,
                "{name}: whether L1 holds {key}"
            );
        }
    }
}

/// Loads `key` into `cache` (L1 and Redis) with the row's status.
async fn load(s: &Streaming, cache: &Cache, key: &str, tags: &[&str]) -> Option<Status> {
    cache
        .get_or_load(key, tags, || async {
            Ok::<_, Infallible>(Some(Status {
                status: status(s).await,
            }))
        })
        .await
        .expect("get_or_load")
}

#[tokio::test]
async fn l1_is_flushed_on_a_gap_a_new_epoch_or_a_bad_message() {
    let s = Streaming::start(SCHEMA, &[("orders.toml", MAPPING)]).await;
    let cache = l1_cache(&s).await;
    let redis = crate::support::redis_connection().await;
    let channel = s.config.redis.l1_channel.clone();
    let publish = |message: String| {
        let channel = channel.clone();
        let mut redis = redis.clone();
        async move {
            let _: i64 = redis::cmd("PUBLISH")
                .arg(channel)
                .arg(message)
                .query_async(&mut redis)
                .await
                .expect("PUBLISH");
        }
    };
    let flushes = || {
        cache
            .stats()
            .l1_flushes
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let message = |epoch: &str, seq: u64| {
        format!(r#"{{"v":1,"epoch":"{epoch}","seq":{seq},"keys":["unrelated"],"tags":[]}}"#)
    };
    publish(message("e1", 1)).await;
    let wait_for = |last: &'static str| {
        let cache = &cache;
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while cache.l1_last().as_deref() != Some(last) {
                assert!(Instant::now() < deadline, "L1 at {:?}", cache.l1_last());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    wait_for("e1:1").await;
    for (next, last) in [
        (message("e1", 2), "e1:2"),   // in order: kept
        (message("e1", 2), "e1:2"),   // again after a retry: kept
        (message("e1", 5), "e1:5"),   // a gap: flushed
        (message("e2", 1), "e2:1"),   // a new epoch: flushed
        ("{not json".to_owned(), ""), // malformed: flushed
    ] {
        load(&s, &cache, "order:1", &[]).await;
        assert!(cache.l1_peek::<Status>("order:1").is_some());
        let before = flushes();
        publish(next).await;
        if last.is_empty() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while flushes() == before {
                assert!(Instant::now() < deadline, "a bad message did not flush");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        } else {
            wait_for(last).await;
        }
        let flushed = flushes() > before;
        assert_eq!(
            flushed,
            cache.l1_peek::<Status>("order:1").is_none(),
            "after {last:?}: flushed {flushed}"
        );
        let expect_flush = matches!(last, "e1:5" | "e2:1" | "");
        assert_eq!(flushed, expect_flush, "after {last:?}");
    }
}

#[tokio::test]
async fn l1_serves_nothing_while_its_subscription_is_down() {
    // A Redis of its own, so that it can be stopped.
    let mut redis = evictd::testkit::Redis::start().expect("redis");
    let cache = Cache::builder(redis.url())
        .l1_entries(100)
        .build()
        .await
        .expect("a cache");
    live(&cache, Duration::from_secs(10), "never live").await;
    let value: Option<String> = cache
        .get_or_load("k", &[], || async {
            Ok::<_, Infallible>(Some("v".to_owned()))
        })
        .await
        .unwrap();
    assert_eq!(value.as_deref(), Some("v"));
    assert!(cache.l1_peek::<String>("k").is_some());
    redis.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    while cache.l1_live() {
        assert!(Instant::now() < deadline, "still live with Redis gone");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        cache.l1_peek::<String>("k").is_none(),
        "L1 served while deaf"
    );
    // Degraded: the loader answers.
    let value: Option<String> = cache
        .get_or_load("k", &[], || async {
            Ok::<_, Infallible>(Some("db".to_owned()))
        })
        .await
        .unwrap();
    assert_eq!(value.as_deref(), Some("db"));
    redis.restart().expect("restart");
    live(
        &cache,
        Duration::from_secs(20),
        "not live again after Redis came back",
    )
    .await;
    // The cache's own connection came back too.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, fill) = cache
            .get_or_load_traced("k2", &[], || async {
                Ok::<_, Infallible>(Some("v2".to_owned()))
            })
            .await
            .unwrap();
        if fill == Some(Fill::Stored) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fills not stored again: {fill:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn with_serve_disconnected_l1_serves_for_at_most_the_bound_after_the_drop() {
    let bound = Duration::from_millis(400);
    let mut redis = evictd::testkit::Redis::start().expect("redis");
    let cache = Cache::builder(redis.url())
        .l1_entries(100)
        .l1_serve_disconnected(bound)
        .build()
        .await
        .expect("a cache");
    live(&cache, Duration::from_secs(10), "never live").await;
    let read = |answer: &'static str| {
        let cache = cache.clone();
        async move {
            cache
                .get_or_load("k", &[], || async move {
                    Ok::<_, Infallible>(Some(answer.to_owned()))
                })
                .await
                .unwrap()
        }
    };
    assert_eq!(read("v").await.as_deref(), Some("v"));
    redis.stop();
    let dropped = Instant::now();
    // Every 5 ms for three times the bound: what L1 holds ("v") until the
    // bound has passed, the loader ("db") from then on.
    let mut last_from_l1 = None;
    while dropped.elapsed() < 3 * bound {
        if read("db").await.as_deref() == Some("v") {
            last_from_l1 = Some(dropped.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let last_from_l1 = last_from_l1.expect("L1 served within the bound");
    // The bound runs from when the subscriber saw the drop, a moment
    // after Redis went.
    assert!(
        last_from_l1 <= bound + Duration::from_millis(150),
        "L1 served {last_from_l1:?} after the drop, bound {bound:?}"
    );
    assert!(
        last_from_l1 >= bound / 2,
        "L1 stopped serving after {last_from_l1:?}, well within the bound"
    );
    assert!(
        cache
            .stats()
            .l1_hits
            .load(std::sync::atomic::Ordering::Relaxed)
            > 1
    );
}

#[tokio::test]
async fn a_cold_key_is_loaded_at_most_once_per_instance() {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    let s = Streaming::start(SCHEMA, &[("orders.toml", MAPPING)]).await;
    let mut caches = Vec::new();
    for _ in 0..3 {
        caches.push(cache(&s).await);
    }
    let loads: Vec<Arc<AtomicU32>> = (0..3).map(|_| Arc::new(AtomicU32::new(0))).collect();
    let mut readers = Vec::new();
    for (cache, loads) in caches.iter().zip(&loads) {
        for _ in 0..20 {
            let cache = cache.clone();
            let loads = loads.clone();
            readers.push(tokio::spawn(async move {
                cache
                    .get_or_load("order:1", &[], || async move {
                        loads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        Ok::<_, Infallible>(Some(Status {
                            status: "new".into(),
                        }))
                    })
                    .await
                    .expect("get_or_load")
            }));
        }
    }
    for reader in readers {
        let value = reader.await.expect("a reader");
        assert_eq!(value.map(|v| v.status).as_deref(), Some("new"));
    }
    let per_instance: Vec<u32> = loads.iter().map(|l| l.load(Ordering::SeqCst)).collect();
    assert!(
        per_instance.iter().all(|&n| n <= 1) && per_instance.iter().sum::<u32>() >= 1,
        "loads per instance: {per_instance:?}"
    );
}

/// Writers and readers for a while, then quiet: every cached entry, in
/// Redis and in each reader's L1, must equal the database. Plain GET/SET
/// readers of a second key family, racing the same way, leave stale
/// entries: the proof that the test can fail (rounds repeat until they
/// do, at most five).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_concurrent_writes_no_fenced_entry_is_stale() {
    let schema = "
        create table orders (id bigint primary key, user_id bigint not null, status text not null);
        alter table orders replica identity full;
        create publication evictd for table orders;
        insert into orders select g, 1, '0' from generate_series(1, 40) g;
    ";
    let mapping = "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\", \"plain:{id}\"]\n";
    let s = std::sync::Arc::new(Streaming::start(schema, &[("orders.toml", mapping)]).await);
    let caches = [l1_cache(&s).await, l1_cache(&s).await];
    for round in 1..=5 {
        let (fenced_stale, plain_stale) = Box::pin(oracle_round(&s, &caches, round)).await;
        assert!(
            fenced_stale.is_empty(),
            "round {round}: stale fenced entries: {fenced_stale:?}"
        );
        if !plain_stale.is_empty() {
            let l1_hits: u64 = caches
                .iter()
                .map(|c| c.stats().l1_hits.load(std::sync::atomic::Ordering::Relaxed))
                .sum();
            let stored: u64 = caches
                .iter()
                .map(|c| c.stats().fills.load(std::sync::atomic::Ordering::Relaxed))
                .sum();
            let stats: Vec<String> = caches.iter().map(|c| format!("{:?}", c.stats())).collect();
            eprintln!(
                "round {round}: {} plain stale; {stats:?}",
                plain_stale.len()
            );
            assert!(
                l1_hits > 0 && stored > 0,
                "the readers stored nothing or never read from L1: {stats:?}"
            );
            return;
        }
    }
    panic!("plain cache-aside left nothing stale in five rounds: the race was not exercised");
}

/// One round of the oracle: 2 writers, 4 fenced readers (over two caches
/// with L1) and 6 plain readers for 2 s over 40 rows, a last update of every
/// row as they stop, then `sync()`; the stale entries of each family as
/// (where, id, cached, database).
async fn oracle_round(
    s: &std::sync::Arc<Streaming>,
    caches: &[Cache; 2],
    round: u32,
) -> (
    Vec<(String, i64, String, String)>,
    Vec<(String, i64, String, String)>,
) {
    use rand::Rng as _;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    const ROWS: i64 = 40;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for writer in 0..2 {
        let (s, stop) = (s.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let db = s.db.client().await;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let id = rand::rng().random_range(1..=ROWS);
                db.execute(
                    "update orders set status = $1 where id = $2",
                    &[&format!("{round}-{writer}-{n}"), &id],
                )
                .await
                .expect("update");
                // Slow enough that most fills find their row unchanged.
                let pause = rand::rng().random_range(0..4);
                tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
            }
        }));
    }
    // A read of the row, then the reader's own work before it fills.
    async fn read(db: &tokio_postgres::Client, id: i64) -> Status {
        let status: String = db
            .query_one("select status from orders where id = $1", &[&id])
            .await
            .expect("the order")
            .get(0);
        let pause = rand::rng().random_range(10..60);
        tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
        Status { status }
    }
    for reader in 0..4 {
        let (s, stop, cache) = (s.clone(), stop.clone(), caches[reader % 2].clone());
        tasks.push(tokio::spawn(async move {
            let db = s.db.client().await;
            while !stop.load(Ordering::Relaxed) {
                let id = rand::rng().random_range(1..=ROWS);
                let db = &db;
                let _: Option<Status> = cache
                    .get_or_load(&format!("order:{id}"), &[], || async move {
                        Ok::<_, Infallible>(Some(read(db, id).await))
                    })
                    .await
                    .expect("get_or_load");
            }
        }));
    }
    for _ in 0..6 {
        let (s, stop) = (s.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let db = s.db.client().await;
            let mut redis = crate::support::redis_connection().await;
            while !stop.load(Ordering::Relaxed) {
                let id = rand::rng().random_range(1..=ROWS);
                let key = format!("{}plain:{id}", s.config.redis.prefix);
                let cached: Option<String> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut redis)
                    .await
                    .expect("GET");
                if cached.is_none() {
                    let value = serde_json::to_string(&read(&db, id).await).unwrap();
                    let () = redis::cmd("SET")
                        .arg(&key)
                        .arg(value)
                        .query_async(&mut redis)
                        .await
                        .expect("SET");
                }
            }
        }));
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    // A last write of every row while the readers' last fills are in
    // flight: what they read is now old.
    s.db.execute(&format!(
        "update orders set status = 'final-{round}-' || id"
    ))
    .await;
    for task in tasks {
        task.await.expect("a task");
    }
    s.sync().await;

    let db = s.db.client().await;
    let mut redis = crate::support::redis_connection().await;
    let (mut fenced, mut plain) = (Vec::new(), Vec::new());
    for id in 1..=ROWS {
        let status: String = db
            .query_one("select status from orders where id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        for (family, stale) in [("order", &mut fenced), ("plain", &mut plain)] {
            let cached: Option<String> = redis::cmd("GET")
                .arg(format!("{}{family}:{id}", s.config.redis.prefix))
                .query_async(&mut redis)
                .await
                .unwrap();
            if let Some(cached) = cached {
                let cached: Status = serde_json::from_str(&cached).unwrap();
                if cached.status != status {
                    stale.push(("redis".into(), id, cached.status, status.clone()));
                }
            }
        }
        for (n, cache) in caches.iter().enumerate() {
            l1_caught_up(s, cache).await;
            if let Some(Some(cached)) = cache.l1_peek::<Status>(&format!("order:{id}")) {
                if cached.status != status {
                    fenced.push((format!("L1 {n}"), id, cached.status, status.clone()));
                }
            }
        }
    }
    (fenced, plain)
}

/// The four interleavings against a 3-master Redis Cluster, with the
/// client's L1 on: every fill that read before the commit is refused, and
/// no L1 keeps what it read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_every_kind_of_invalidation_voids_a_fill_in_flight() {
    let cluster = tokio::task::spawn_blocking(|| evictd::testkit::RedisCluster::start(3))
        .await
        .unwrap()
        .expect("start cluster");
    let url = cluster.url();
    // The test mapping, with user 1's namespace versioned too.
    let mapping = MAPPING.replace(
        "tags = [\"user:{user_id}\"]",
        "tags = [\"user:{user_id}\"]\nversions = [\"user:{user_id}\"]",
    );
    let s = Streaming::start_with(SCHEMA, &[("orders.toml", &mapping)], |config| {
        config.redis.url = evictd::config::SecretUrl::parse(&url).unwrap();
    })
    .await;
    let nodes: Vec<String> = cluster
        .ports()
        .iter()
        .map(|port| format!("redis://127.0.0.1:{port}"))
        .collect();
    let cache = Cache::cluster(nodes)
        .prefix(s.config.redis.prefix.clone())
        .l1_entries(100)
        .l1_channel(s.config.redis.l1_channel.clone())
        .build()
        .await
        .expect("a cluster cache");
    live(
        &cache,
        Duration::from_secs(10),
        "the L1 subscriber never went live",
    )
    .await;
    let (fill, _) = held_fill(&s, &cache, "order:1", &["user:1"], None).await;
    assert_eq!(fill, Fill::Stored, "a quiet fill is stored on a Cluster");
    cache.invalidate("order:1").await.unwrap();
    for &(key, tags, write) in INTERLEAVINGS {
        // Cold, whatever an earlier write refreshed.
        cache.invalidate(key).await.unwrap();
        let (fill, _) = held_fill(&s, &cache, key, tags, Some(write)).await;
        assert_eq!(fill, Fill::Fenced, "{key} after `{write}`");
        assert!(cache.l1_peek::<Status>(key).is_none(), "{key} in L1");
        if key == "order:1:status" {
            // What evictd wrote stays: Cluster-wide GET.
            let refreshed: Option<Status> = cache.get(key).await.unwrap();
            assert_eq!(refreshed.map(|r| r.status).as_deref(), Some("shipped"));
        }
    }
    // A tag taken from the row, invalidated during the load (the tag's
    // stamp and set live on other nodes than the key).
    s.db.execute("insert into orders values (1, 1, 'new')")
        .await;
    s.sync().await;
    let write = "insert into orders values (2, 1, 'new')";
    let (fill, _) = held_fill_with(
        &s,
        &cache,
        "order:1:view",
        &[],
        Some(&["user:1"]),
        Some(write),
    )
    .await;
    assert_eq!(fill, Fill::Fenced, "a tag from the row on a Cluster");
    let (fill, _) = held_fill_with(&s, &cache, "order:1:view", &[], Some(&["user:1"]), None).await;
    assert_eq!(fill, Fill::Stored);
    // Namespace bumps, exact and by pattern, on the counter's node.
    for write in ["insert into orders values (9, 1, 'new')", "truncate orders"] {
        let before = cache.version("user:1").await.unwrap();
        s.db.execute(write).await;
        s.sync().await;
        // Through L1, once the broadcast of the bump arrives.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let after = cache.version("user:1").await.unwrap();
            if after > before {
                break;
            }
            assert!(Instant::now() < deadline, "`{write}` left {before}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[tokio::test]
async fn stale_values_are_served_while_one_reader_reloads_and_early_refresh_reloads_before_expiry()
{
    use std::sync::atomic::Ordering;
    let prefix = format!("swr{}:", rand::random::<u32>());
    let stale = Cache::builder(stack().redis.url())
        .prefix(prefix.clone())
        .ttl(Duration::from_millis(300))
        .stale_while_revalidate(Duration::from_secs(30))
        .build()
        .await
        .unwrap();
    let value =
        |text: &'static str| move || async move { Ok::<_, Infallible>(Some(text.to_owned())) };
    let first: Option<String> = stale.get_or_load("k", &[], value("v1")).await.unwrap();
    assert_eq!(first.as_deref(), Some("v1"));
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Past its TTL, inside the window: another reader holds the right to
    // reload it (its lease wraps the value), so this read gets the old
    // value at once.
    let mut redis = crate::support::redis_connection().await;
    let key = format!("{prefix}k");
    let wrapped = format!("{}\u{0}\"v1\"", protocol::lease("another"));
    let () = redis::cmd("SET")
        .arg(&key)
        .arg(&wrapped)
        .arg("KEEPTTL")
        .query_async(&mut redis)
        .await
        .unwrap();
    let served: Option<String> = stale.get_or_load("k", &[], value("v2")).await.unwrap();
    assert_eq!(served.as_deref(), Some("v1"));
    assert_eq!(stale.stats().stale_served.load(Ordering::Relaxed), 1);
    assert_eq!(stale.stats().loads.load(Ordering::Relaxed), 1);
    // That reader never stores: its lease is still there. Unwrapped (the
    // right free), the next read takes it and reloads.
    let () = redis::cmd("SET")
        .arg(&key)
        .arg("\"v1\"")
        .arg("KEEPTTL")
        .query_async(&mut redis)
        .await
        .unwrap();
    let reloaded: Option<String> = stale.get_or_load("k", &[], value("v2")).await.unwrap();
    assert_eq!(reloaded.as_deref(), Some("v2"));
    assert_eq!(stale.stats().early_refreshes.load(Ordering::Relaxed), 1);
    let cached: Option<String> = stale.get("k").await.unwrap();
    assert_eq!(cached.as_deref(), Some("v2"));

    // Early refresh: loads take ~50 ms and beta is huge, so a read of a
    // value with 10 s left reloads it. XFetch draws: it reloads when
    // 50 ms * beta * -ln(draw) >= 10 s, which with beta 1e7 fails only for
    // a draw above 0.99998 (beta 1e4 with a minute left missed one time in
    // nine).
    let early = Cache::builder(stack().redis.url())
        .prefix(prefix.clone())
        .ttl(Duration::from_secs(10))
        .early_refresh(10_000_000.0)
        .build()
        .await
        .unwrap();
    let slow = |text: &'static str| {
        move || async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok::<_, Infallible>(Some(text.to_owned()))
        }
    };
    let _: Option<String> = early.get_or_load("e", &[], slow("e1")).await.unwrap();
    let refreshed: Option<String> = early.get_or_load("e", &[], slow("e2")).await.unwrap();
    assert_eq!(refreshed.as_deref(), Some("e2"));
    assert_eq!(early.stats().early_refreshes.load(Ordering::Relaxed), 1);
    // Off (beta 0), the same read is a plain hit.
    let plain = Cache::builder(stack().redis.url())
        .prefix(prefix.clone())
        .ttl(Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    let hit: Option<String> = plain.get_or_load("e", &[], slow("e3")).await.unwrap();
    assert_eq!(hit.as_deref(), Some("e2"));
}

/// Runs the Python client (`client/python/protocol_reader.py`, written from
/// `docs/PROTOCOL.md`) for `key`: it reads the row, is held while `write`
/// commits and evictd applies it, then fills. Returns its fill outcome.
async fn python_fill(s: &Streaming, key: &str, tags: &[&str], write: Option<&str>) -> String {
    python_fill_with(s, key, tags, None, write).await
}

/// [`python_fill`], with tags taken from the row (`row_tags`) when given.
async fn python_fill_with(
    s: &Streaming,
    key: &str,
    tags: &[&str],
    row_tags: Option<&[&str]>,
    write: Option<&str>,
) -> String {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
    let root = env!("CARGO_MANIFEST_DIR");
    let mut child = tokio::process::Command::new("python3")
        .arg(format!("{root}/client/python/protocol_reader.py"))
        .arg(stack().redis.port().to_string())
        .arg(&s.config.redis.prefix)
        .arg(key)
        .arg(tags.join(","))
        .arg(format!("{root}/client/lua"))
        .args(row_tags.map(|tags| tags.join(",")))
        .arg("--")
        .args(["psql", &s.db.url, "-Atc"])
        .arg("select json_build_object('status', status) from orders where id = 1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let read = lines.next_line().await.unwrap().expect("the client read");
    assert!(read.starts_with("read "), "{read}");
    if let Some(write) = write {
        s.db.execute(write).await;
        s.sync().await;
    }
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"go\n").await.unwrap();
    let fill = lines.next_line().await.unwrap().expect("the client filled");
    assert!(child.wait().await.unwrap().success());
    fill.strip_prefix("fill ").unwrap_or(&fill).to_owned()
}

#[tokio::test]
async fn a_python_client_written_from_the_protocol_page_is_fenced_too() {
    let s = Streaming::start(SCHEMA, &[("orders.toml", MAPPING)]).await;
    let cache = cache(&s).await;
    assert_eq!(
        python_fill(&s, "order:1", &["user:1"], None).await,
        "stored"
    );
    let cached: Option<Status> = cache.get("order:1").await.unwrap();
    assert_eq!(cached.map(|c| c.status).as_deref(), Some("new"));
    cache.invalidate("order:1").await.unwrap();
    for &(key, tags, write) in INTERLEAVINGS {
        cache.invalidate(key).await.unwrap();
        let fill = python_fill(&s, key, tags, Some(write)).await;
        assert_eq!(fill, "fenced", "{key} after `{write}`");
        let cached: Option<Status> = cache.get(key).await.unwrap();
        if key == "order:1:status" {
            assert_eq!(cached.map(|c| c.status).as_deref(), Some("shipped"));
        } else {
            assert_eq!(cached, None, "{key} after `{write}`");
        }
        // The next read loads what was committed (a fresh fill stores).
        if write != "truncate orders" && key == "order:1" {
            assert_eq!(python_fill(&s, key, tags, None).await, "stored");
            let cached: Option<Status> = cache.get(key).await.unwrap();
            assert_eq!(cached.map(|c| c.status).as_deref(), Some("paid"));
        }
    }
    // A tag taken from the row, invalidated while the row is loaded.
    s.db.execute("insert into orders values (1, 1, 'new')")
        .await;
    s.sync().await;
    let row_tags: &[&str] = &["user:1"];
    let write = "insert into orders values (2, 1, 'new')";
    let fill = python_fill_with(&s, "order:1:view", &[], Some(row_tags), Some(write)).await;
    assert_eq!(fill, "fenced");
    assert_eq!(cache.get::<Status>("order:1:view").await.unwrap(), None);
    let fill = python_fill_with(&s, "order:1:view", &[], Some(row_tags), None).await;
    assert_eq!(fill, "stored");
}

/// evictd streaming `SCHEMA` into `redis_url`, restartable: its database,
/// config and mappings.
struct Restartable {
    db: crate::support::TestDb,
    config: evictd::config::Config,
    _mappings: tempfile::TempDir,
}

impl Restartable {
    async fn new(redis_url: &str, log_len: u64) -> Restartable {
        let db = crate::support::TestDb::new().await;
        db.execute(SCHEMA).await;
        let mappings = crate::support::mapping_dir(&[("orders.toml", MAPPING)]);
        let mut config = crate::support::streaming_config(&db, mappings.path());
        config.redis.url = evictd::config::SecretUrl::parse(redis_url).unwrap();
        config.redis.l1_log_len = log_len;
        Restartable {
            db,
            config,
            _mappings: mappings,
        }
    }

    async fn start(&self) -> evictd::testkit::Evictd {
        evictd::testkit::Evictd::start(&self.config)
            .await
            .expect("start evictd")
    }

    async fn write(&self, evictd: &evictd::testkit::Evictd, status: &str) {
        self.db
            .execute(&format!(
                "update orders set status = '{status}' where id = 1"
            ))
            .await;
        evictd.sync().await.expect("sync");
    }

    /// A cache with L1 on this evictd's channel, live.
    async fn l1_cache(&self, redis_url: &str) -> Cache {
        let cache = Cache::builder(redis_url)
            .prefix(self.config.redis.prefix.clone())
            .l1_entries(100)
            .l1_channel(self.config.redis.l1_channel.clone())
            .build()
            .await
            .expect("a cache");
        live(&cache, Duration::from_secs(10), "never live").await;
        cache
    }

    /// Waits until `cache`'s L1 applied evictd's last broadcast and is live.
    async fn caught_up(&self, redis_url: &str, cache: &Cache) {
        let client = redis::Client::open(redis_url).unwrap();
        let mut redis = client.get_multiplexed_async_connection().await.unwrap();
        let last_key = format!("{}{}", self.config.redis.prefix, protocol::L1_LAST_KEY);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let last: Option<String> = redis::cmd("GET")
                .arg(&last_key)
                .query_async(&mut redis)
                .await
                .expect("GET");
            if cache.l1_live() && cache.l1_last() == last {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "L1 at {:?} (live {}), evictd at {last:?}",
                cache.l1_last(),
                cache.l1_live()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Loads order 1 through `cache` and checks that L1 keeps it.
    async fn load(&self, cache: &Cache) {
        read_order(cache, &self.db.client().await).await;
        assert!(cache.l1_peek::<Status>("order:1").is_some(), "in L1");
    }
}

fn counted(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.load(std::sync::atomic::Ordering::Relaxed)
}

#[tokio::test]
async fn a_dropped_subscription_replays_what_it_missed_instead_of_flushing() {
    let redis = evictd::testkit::Redis::start().expect("redis");
    let url = redis.url();
    let r = Restartable::new(&url, 10_000).await;
    let evictd = r.start().await;
    r.write(&evictd, "a").await;
    let cache = r.l1_cache(&url).await;
    r.caught_up(&url, &cache).await;
    r.load(&cache).await;
    let flushes = counted(&cache.stats().l1_flushes);
    let replays = counted(&cache.stats().l1_replays);
    // The cache's subscriber is this Redis's only pub/sub client: kill it,
    // and commit while it reconnects.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(killed, 1, "the subscriber");
    r.write(&evictd, "b").await;
    r.caught_up(&url, &cache).await;
    assert!(
        cache.l1_peek::<Status>("order:1").is_none(),
        "order:1 is stale in L1"
    );
    assert_eq!(counted(&cache.stats().l1_flushes), flushes, "flushed");
    assert!(counted(&cache.stats().l1_replays) > replays, "no replay");
    evictd.stop().await.unwrap();
}

#[tokio::test]
async fn a_restarted_evictd_is_replayed_from_the_log_or_flushed_without_one() {
    let redis = evictd::testkit::Redis::start().expect("redis");
    let url = redis.url();
    for log_len in [10_000, 0] {
        let r = Restartable::new(&url, log_len).await;
        let evictd = r.start().await;
        r.write(&evictd, "a").await;
        let cache = r.l1_cache(&url).await;
        r.caught_up(&url, &cache).await;
        r.load(&cache).await;
        let flushes = counted(&cache.stats().l1_flushes);
        let replayed = counted(&cache.stats().l1_replayed);
        evictd.stop().await.unwrap();
        // A new epoch, and two broadcasts of it.
        let evictd = r.start().await;
        assert_ne!(
            Some(evictd.epoch()),
            cache.l1_last().as_deref().and_then(|l| l.split(':').next())
        );
        r.write(&evictd, "b").await;
        r.write(&evictd, "c").await;
        r.caught_up(&url, &cache).await;
        assert!(
            cache.l1_peek::<Status>("order:1").is_none(),
            "log {log_len}: order:1 is stale in L1"
        );
        if log_len > 0 {
            assert_eq!(counted(&cache.stats().l1_flushes), flushes, "flushed");
            assert!(
                counted(&cache.stats().l1_replayed) > replayed,
                "nothing replayed"
            );
        } else {
            assert!(counted(&cache.stats().l1_flushes) > flushes, "not flushed");
        }
        evictd.stop().await.unwrap();
    }
}

#[tokio::test]
async fn after_wait_applied_a_read_through_a_warm_l1_sees_the_commit() {
    // 1,000 rounds: commit, read the commit position, wait_applied on a
    // cache whose L1 holds the row from the round before, read: always
    // the committed value.
    let s = Streaming::start(SCHEMA, &[("orders.toml", MAPPING)]).await;
    let reader = Cache::builder(stack().redis.url())
        .prefix(s.config.redis.prefix.clone())
        .slot(s.config.postgres.slot.clone())
        .l1_entries(100)
        .l1_channel(s.config.redis.l1_channel.clone())
        .build()
        .await
        .expect("a cache");
    live(&reader, Duration::from_secs(10), "never live").await;
    let writer = s.db.client().await;
    let db = s.db.client().await;
    let mut from_l1 = 0;
    for round in 0..1_000 {
        let status = format!("s{round}");
        writer
            .execute("update orders set status = $1 where id = 1", &[&status])
            .await
            .unwrap();
        let position = evictd_client::commit_position(&writer).await.unwrap();
        reader
            .wait_applied(position, Duration::from_secs(10))
            .await
            .unwrap_or_else(|error| panic!("round {round}: {error}"));
        let l1_before = reader.l1_peek::<Status>("order:1").is_some();
        let read = read_order(&reader, &db).await;
        assert_eq!(
            read.map(|r| r.status),
            Some(status),
            "round {round}: a read after wait_applied (from L1: {l1_before}, at {position}, L1 at {:?})",
            reader.l1_last()
        );
        from_l1 += usize::from(l1_before);
        // Warm for the next round.
        assert!(
            reader.l1_peek::<Status>("order:1").is_some(),
            "round {round}: not in L1"
        );
    }
    // Each round's commit invalidated the entry: L1 never had it at read.
    assert_eq!(from_l1, 0);
    // A position evictd cannot have reached: a timeout that says how far.
    let far = evictd_client::Position(u64::MAX >> 1);
    let error = reader
        .wait_applied(far, Duration::from_millis(100))
        .await
        .expect_err("a position in the future");
    assert!(
        error.to_string().contains("bytes of WAL short of"),
        "{error}"
    );
}

const VERSIONED: &str = r#"
[[table]]
name = "orders"
versions = ["user:{user_id}"]
"#;

/// The keys an application caches under user 1's namespace.
const UNDER_USER_1: [&str; 3] = ["orders", "profile", "page:2"];

/// Reads `key` under `namespace` through `cache`, loading the row's status.
async fn load_in(s: &Streaming, cache: &Cache, namespace: &str, key: &str) -> Option<Status> {
    cache
        .get_or_load_in(namespace, key, &[], || async {
            Ok::<_, Infallible>(Some(Status {
                status: status(s).await,
            }))
        })
        .await
        .expect("get_or_load_in")
}

#[tokio::test]
async fn a_namespace_bump_leaves_everything_under_it_behind_in_redis_and_every_l1() {
    let s = Streaming::start(SCHEMA, &[("orders.toml", VERSIONED)]).await;
    let plain = cache(&s).await;
    let (a, b) = (l1_cache(&s).await, l1_cache(&s).await);
    let caches = [&plain, &a, &b];
    for cache in caches {
        for key in UNDER_USER_1 {
            let value = load_in(&s, cache, "user:1", key).await;
            assert_eq!(value.map(|v| v.status).as_deref(), Some("new"));
        }
    }
    let before = plain.version("user:1").await.unwrap();
    for cache in [&a, &b] {
        assert_eq!(cache.version("user:1").await.unwrap(), before);
        let key = cache.versioned("user:1", "orders").await.unwrap();
        assert!(cache.l1_peek::<Status>(&key).is_some(), "{key} in L1");
    }

    s.db.execute("update orders set status = 'paid' where id = 1")
        .await;
    s.sync().await;
    l1_caught_up(&s, &a).await;
    l1_caught_up(&s, &b).await;
    let after = plain.version("user:1").await.unwrap();
    assert!(after > before, "bumped: {before} -> {after}");
    for cache in caches {
        assert_eq!(cache.version("user:1").await.unwrap(), after);
        for key in UNDER_USER_1 {
            let composed = cache.versioned("user:1", key).await.unwrap();
            assert_eq!(composed, format!("user:1@{after}:{key}"));
            assert!(cache.l1_peek::<Status>(&composed).is_none(), "{composed}");
            assert_eq!(cache.get::<Status>(&composed).await.unwrap(), None);
        }
    }
    // (They share one Redis: the first load fills it for the others.)
    for cache in caches {
        for key in UNDER_USER_1 {
            let value = load_in(&s, cache, "user:1", key).await;
            assert_eq!(value.map(|v| v.status).as_deref(), Some("paid"));
        }
    }

    // A fill that read the row before a commit and stores after its bump
    // lands under the old version, where no reader looks.
    let raced = plain.versioned("user:1", "summary").await.unwrap();
    let write = "update orders set status = 'shipped' where id = 1";
    let (_, loaded) = held_fill(&s, &plain, &raced, &[], Some(write)).await;
    assert_eq!(loaded.status, "paid");
    l1_caught_up(&s, &a).await;
    l1_caught_up(&s, &b).await;
    for cache in caches {
        let now = cache.versioned("user:1", "summary").await.unwrap();
        assert_ne!(now, raced);
        let value = load_in(&s, cache, "user:1", "summary").await;
        assert_eq!(value.map(|v| v.status).as_deref(), Some("shipped"));
    }

    // TRUNCATE bumps every namespace by pattern.
    let before = plain.version("user:1").await.unwrap();
    s.db.execute("truncate orders").await;
    s.sync().await;
    assert!(plain.version("user:1").await.unwrap() > before);

    // evictd bumps only counters a reader created: a namespace nobody
    // read leaves no key behind.
    s.db.execute("insert into orders values (5, 2, 'new')")
        .await;
    s.sync().await;
    let mut redis = crate::support::redis_connection().await;
    let counter = format!(
        "{}{}",
        s.config.redis.prefix,
        protocol::version_key("user:2")
    );
    let exists: bool = redis::cmd("EXISTS")
        .arg(&counter)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(!exists, "{counter} was created");
}

/// A publication of the counters that Redis refuses is counted, not
/// dropped: `stats().publish_failures` and
/// `evictd_client_publish_failures_total`.
#[tokio::test]
async fn a_failed_counter_publication_is_counted() {
    let mut redis = evictd::testkit::Redis::start().expect("redis");
    let cache = Cache::builder(redis.url())
        .prefix("published:")
        .publish_counters("gone", Duration::from_millis(100))
        .build()
        .await
        .expect("a cache");
    tokio::time::sleep(Duration::from_millis(350)).await;
    let failures = |cache: &Cache| {
        cache
            .stats()
            .publish_failures
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(failures(&cache), 0, "Redis answered");
    redis.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    while failures(&cache) < 2 {
        assert!(Instant::now() < deadline, "no failure counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
