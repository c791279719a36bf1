//! One huge transaction through real WAL: a 1M-row update, streamed by the
//! server, applied with bounded memory.

use std::time::{Duration, Instant};

use crate::support::{
    peak_rss_kib, redis_connection, run_config, slot_confirmed, spawn_run, stack, terminate,
    wait_for_slot, TestDb,
};

const ROWS: i64 = 1_000_000;
/// Peak resident memory allowed to the evictd process.
const MAX_RSS_KIB: u64 = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_row_update_is_applied_with_bounded_memory() {
    let db = TestDb::new().await;
    db.execute(&format!(
        "create table orders (id bigint primary key, status text not null);
         insert into orders select g, 'new' from generate_series(1, {ROWS}) g;
         create publication evictd for table orders;"
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mapping = "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\n";
    let config = run_config(
        dir.path(),
        &db,
        &stack().redis.url(),
        mapping,
        "127.0.0.1:0",
    );
    let mut redis = redis_connection().await;
    let sample = ["order:1", "order:500000", "order:1000000"];
    let mut seed = redis::pipe();
    for key in sample.iter().chain(&["other:1"]) {
        seed.cmd("SET")
            .arg(format!("{}{key}", db.prefix))
            .arg("cached")
            .ignore();
    }
    seed.query_async::<()>(&mut redis).await.unwrap();

    let child = spawn_run(&config);
    let client = db.client().await;
    wait_for_slot(&client, &db.name, true).await;

    let started = Instant::now();
    db.execute("update orders set status = 'paid'").await;
    let target = evictd::testkit::current_wal_lsn(&db.url).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if slot_confirmed(&client, &db.name).await >= target {
            break;
        }
        assert!(Instant::now() < deadline, "not applied after 300 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed();
    let rss = peak_rss_kib(child.id());
    eprintln!(
        "1M-row update committed and applied in {elapsed:?}; evictd peak RSS {} MiB",
        rss / 1024
    );
    terminate(child);

    assert!(
        rss < MAX_RSS_KIB,
        "peak RSS {rss} KiB is over {MAX_RSS_KIB} KiB"
    );
    for key in sample {
        let exists: bool = redis::cmd("EXISTS")
            .arg(format!("{}{key}", db.prefix))
            .query_async(&mut redis)
            .await
            .unwrap();
        assert!(!exists, "{key} survived the update");
    }
    let other: bool = redis::cmd("EXISTS")
        .arg(format!("{}other:1", db.prefix))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(other, "keys of no mapping are left alone");
}
