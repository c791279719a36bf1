//! One huge transaction through real WAL: a 1M-row update, streamed by the
//! server, applied with bounded memory.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{redis_connection, stack, TestDb};

const ROWS: i64 = 1_000_000;
/// Peak resident memory allowed to the evictd process.
const MAX_RSS_KIB: u64 = 64 * 1024;

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

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
    std::fs::create_dir(dir.path().join("mappings")).unwrap();
    std::fs::write(
        dir.path().join("mappings/orders.toml"),
        "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\n",
    )
    .unwrap();
    let config = dir.path().join("evictd.toml");
    std::fs::write(
        &config,
        format!(
            "[postgres]\nurl = \"{}\"\nslot = \"{}\"\n[redis]\nurl = \"{}\"\nprefix = \"{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            db.url,
            db.name,
            stack().redis.url(),
            db.prefix
        ),
    )
    .unwrap();
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

    let mut child = Command::new(env!("CARGO_BIN_EXE_evictd"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env("EVICTD_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    evictd::testkit::reaper::reap_pid(child.id());
    let client = db.client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .query_opt(
            "select 1 from pg_replication_slots where slot_name = $1 and active",
            &[&db.name],
        )
        .await
        .unwrap()
        .is_none()
    {
        assert!(Instant::now() < deadline, "evictd did not start streaming");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let started = Instant::now();
    db.execute("update orders set status = 'paid'").await;
    let target = evictd::testkit::current_wal_lsn(&db.url).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let row = client
            .query_one(
                "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = $1",
                &[&db.name],
            )
            .await
            .unwrap();
        let confirmed = evictd::change::Lsn::parse(&row.get::<_, String>(0)).unwrap();
        if confirmed >= target {
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
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));

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
