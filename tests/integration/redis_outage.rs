//! Redis goes away while changes commit: nothing is acknowledged until
//! Redis is back and the batch is applied.

use std::time::Duration;

use crate::support::{
    free_port, http_get, mapping_dir, peak_rss_kib, run_config, slot_confirmed, spawn_run,
    streaming_config, terminate, TestDb,
};
use evictd::change::Lsn;
use evictd::config::SecretUrl;
use evictd::testkit::{current_wal_lsn, Evictd, Redis};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_acknowledged_while_redis_is_down() {
    crate::support::init_logging();
    let mut redis = Redis::start().expect("redis");
    let db = TestDb::new().await;
    db.execute(
        "create table orders (id bigint primary key, status text not null);
         create publication evictd for table orders;",
    )
    .await;
    let mapping = "[[table]]\nname = \"orders\"\n[[table.refresh]]\nkey = \"order:{id}\"\ncolumns = [\"status\"]\n";
    let dir = mapping_dir(&[("orders.toml", mapping)]);
    let mut config = streaming_config(&db, dir.path());
    config.redis.url = SecretUrl::parse(&redis.url()).unwrap();
    let evictd = Evictd::start(&config).await.expect("start evictd");

    redis.stop();
    db.execute("insert into orders values (1, 'new')").await;
    let target = current_wal_lsn(&db.url).await.unwrap();
    // Barrier: the walsender sent the commit, and apply has failed on
    // Redis since (its state names the error).
    let client = db.client().await;
    let mut redis_state = evictd.running().redis.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let sent: Option<String> = client
            .query_one(
                "select sent_lsn::text from pg_stat_replication \
                 where pid = (select active_pid from pg_replication_slots where slot_name = $1)",
                &[&db.name],
            )
            .await
            .map_or(None, |row| row.get(0));
        let sent = sent.and_then(|text| Lsn::parse(&text));
        if sent.is_some_and(|sent| sent >= target) && redis_state.borrow_and_update().is_some() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the change did not reach apply (sent {sent:?}, redis {:?})",
            *redis_state.borrow()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let confirmed: String = client
        .query_one(
            "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = $1",
            &[&db.name],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        Lsn::parse(&confirmed).unwrap() < target,
        "acknowledged {confirmed} while Redis was down"
    );
    assert!(
        evictd
            .sync_within(Duration::from_millis(200))
            .await
            .is_err(),
        "sync cannot pass while Redis is down"
    );

    redis.restart().expect("restart redis");
    evictd.sync().await.expect("applied once Redis is back");
    let mut connection = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let value: Option<String> = redis::cmd("GET")
        .arg(format!("{}order:1", db.prefix))
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(
        value.as_deref(),
        Some(r#"{"status":"new"}"#),
        "the batch was written after the outage"
    );
    evictd.stop().await.unwrap();
}

/// `evictd run` on `db` and `redis` with `mapping`, once ready: the
/// process, its admin port, and the folder of its config.
async fn run_ready(
    db: &TestDb,
    redis: &Redis,
    mapping: &str,
) -> (std::process::Child, u16, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let admin_port = free_port();
    let config = run_config(
        dir.path(),
        db,
        &redis.url(),
        mapping,
        &format!("127.0.0.1:{admin_port}"),
    );
    let child = spawn_run(&config);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while status_of(admin_port, "/readyz") != Some(200) {
        assert!(std::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (child, admin_port, dir)
}

fn status_of(port: u16, path: &str) -> Option<u16> {
    http_get(port, path).map(|(status, _)| status)
}

/// F3: Redis stopped for 20 s under a steady write load. evictd stops
/// reading (memory stays bounded), reports not ready, acknowledges nothing,
/// and applies everything once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_seconds_without_redis_under_load() {
    use std::time::Instant;

    let mut redis = Redis::start().expect("redis");
    let db = TestDb::new().await;
    db.execute("create table orders (id bigint primary key, status text not null); create publication evictd for table orders;")
        .await;
    let mapping = "[[table]]\nname = \"orders\"\n[[table.refresh]]\nkey = \"order:{id}\"\ncolumns = [\"status\"]\n";
    let (child, admin_port, _dir) = run_ready(&db, &redis, mapping).await;

    let writer = db.client().await;
    let client = db.client().await;

    redis.stop();
    let outage = Instant::now();
    let mut id = 0;
    let mut saw_not_ready = false;
    let mut confirmed_during = Vec::new();
    while outage.elapsed() < Duration::from_secs(20) {
        for _ in 0..10 {
            id += 1;
            writer
                .batch_execute(&format!("insert into orders values ({id}, 'new')"))
                .await
                .unwrap();
        }
        saw_not_ready |= status_of(admin_port, "/readyz") == Some(503);
        if outage.elapsed() > Duration::from_secs(2) {
            confirmed_during.push(slot_confirmed(&client, &db.name).await);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(saw_not_ready, "/readyz said 503 during the outage");
    assert!(
        confirmed_during.windows(2).all(|w| w[0] == w[1]),
        "the slot did not advance while Redis was down"
    );

    redis.restart().expect("restart redis");
    let target = current_wal_lsn(&db.url).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while slot_confirmed(&client, &db.name).await < target {
        assert!(Instant::now() < deadline, "not caught up after the outage");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status_of(admin_port, "/readyz"), Some(200));
    let mut connection = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let written: u64 = redis::cmd("DBSIZE")
        .query_async(&mut connection)
        .await
        .unwrap();
    // Every row written during the outage was refreshed afterwards (plus
    // the continuity record and the L1 last key).
    assert!(written >= id, "{written} keys for {id} rows");
    let rss = peak_rss_kib(child.id());
    assert!(rss < 64 * 1024, "peak RSS {rss} KiB over 20 s of outage");
    terminate(child);
    eprintln!(
        "{id} rows written during a 20 s Redis outage; evictd peak RSS {} MiB",
        rss / 1024
    );
}

/// The value of the series `name` in a `/metrics` body.
fn series(body: &str, name: &str) -> Option<u64> {
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// An outage while the batch at the head holds no command (a change no
/// key follows, progress only): the failed commands stay flat, so the
/// alert watches failed attempts, which grow (its expression,
/// `rate(evictd_redis_failures_total[5m]) > 0`, goes positive).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_behind_an_empty_batch_counts_failed_attempts() {
    use std::time::Instant;

    let redis = Redis::start().expect("redis");
    let db = TestDb::new().await;
    db.execute(
        "create table t (id bigint primary key, v text, w text);
         alter table t replica identity full;
         create publication evictd for table t;
         insert into t values (1, 'a', 'x');",
    )
    .await;
    // Updates of `w` render no key: their batch carries progress only.
    let mapping = "[[table]]\nname = \"t\"\nkeys = [\"t:{id}\"]\nchanged = [\"v\"]\n";
    let (child, admin_port, _dir) = run_ready(&db, &redis, mapping).await;
    let metrics = || http_get(admin_port, "/metrics").expect("/metrics").1;
    let errors = r#"evictd_redis_commands_total{outcome="error"}"#;
    let failures = "evictd_redis_failures_total";
    let before = metrics();
    assert_eq!(series(&before, errors), Some(0), "{before}");
    assert_eq!(series(&before, failures), Some(0), "{before}");

    // Redis refuses every write (out of memory, nothing to evict).
    let mut admin = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "maxmemory-policy", "noeviction", "maxmemory", "1"][..])
        .query_async(&mut admin)
        .await
        .unwrap();
    db.execute("update t set w = 'y' where id = 1").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        let body = metrics();
        let count = series(&body, failures).unwrap_or(0);
        seen.push(count);
        if count >= 3 {
            assert_eq!(series(&body, errors), Some(0), "no command failed: {body}");
            break;
        }
        // The reason names the failure in one short line (the Redis error
        // lists every refused command; the log has it whole).
        if let Some((503, reason)) = http_get(admin_port, "/readyz") {
            assert_eq!(reason.lines().count(), 1, "{reason}");
            assert!(reason.len() < 400, "{} bytes: {reason}", reason.len());
        }
        assert!(
            Instant::now() < deadline,
            "failed attempts did not grow during the outage: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "maxmemory", "0"][..])
        .query_async(&mut admin)
        .await
        .unwrap();
    let target = current_wal_lsn(&db.url).await.unwrap();
    let client = db.client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while slot_confirmed(&client, &db.name).await < target {
        assert!(
            Instant::now() < deadline,
            "not acknowledged after the outage"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    terminate(child);
}
