//! The `evictd` process killed with SIGKILL in the middle of a stream:
//! nothing it acknowledged was unapplied, and after a restart every key of
//! every committed transaction is invalidated.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::{
    evictd, free_port, http_get, redis_connection, run_config, slot_confirmed, spawn_run, stack,
    terminate, wait_for_slot, TestDb,
};
use evictd::change::Lsn;

const ROWS: i64 = 3000;

const MAPPING: &str = "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\n";

fn write_config(dir: &Path, db: &TestDb) -> std::path::PathBuf {
    run_config(dir, db, &stack().redis.url(), MAPPING, "127.0.0.1:0")
}

async fn deleted(
    redis: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    ids: impl Iterator<Item = i64>,
) -> Vec<i64> {
    let mut gone = Vec::new();
    for id in ids {
        let exists: bool = redis::cmd("EXISTS")
            .arg(format!("{prefix}order:{id}"))
            .query_async(redis)
            .await
            .unwrap();
        if !exists {
            gone.push(id);
        }
    }
    gone
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_nothing() {
    let db = TestDb::new().await;
    db.execute(&format!(
        "create table orders (id bigint primary key, status text not null);
         insert into orders select g, 'new' from generate_series(1, {ROWS}) g;
         create publication evictd for table orders;"
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &db);
    let mut redis = redis_connection().await;
    let mut seed = redis::pipe();
    for id in 1..=ROWS {
        seed.cmd("SET")
            .arg(format!("{}order:{id}", db.prefix))
            .arg("cached")
            .ignore();
    }
    seed.query_async::<()>(&mut redis).await.unwrap();

    let child = spawn_run(&config);
    let client = db.client().await;
    wait_for_slot(&client, &db.name, true).await;

    // One transaction per row; remember the WAL position after each commit
    // (at or past that transaction's end).
    let writer = db.client().await;
    let mut commit_positions = Vec::new();
    let mut running = Some(child);
    for id in 1..=ROWS {
        writer
            .batch_execute(&format!(
                "update orders set status = 'paid' where id = {id}"
            ))
            .await
            .unwrap();
        if id % 10 == 0 || id == ROWS {
            let row = writer
                .query_one("select pg_current_wal_insert_lsn()::text", &[])
                .await
                .unwrap();
            commit_positions.push((id, Lsn::parse(&row.get::<_, String>(0)).unwrap()));
        }
        if id == ROWS / 2 {
            let mut child = running.take().expect("still running");
            child.kill().expect("SIGKILL evictd");
            child.wait().unwrap();
        }
    }

    // The slot never acknowledged a transaction whose keys were not gone.
    wait_for_slot(&client, &db.name, false).await;
    let confirmed = slot_confirmed(&client, &db.name).await;
    let acknowledged: Vec<i64> = commit_positions
        .iter()
        .filter(|(_, position)| *position <= confirmed)
        .map(|(id, _)| *id)
        .collect();
    let last_acknowledged = acknowledged.last().copied().unwrap_or(0);
    let gone = deleted(&mut redis, &db.prefix, 1..=last_acknowledged).await;
    assert_eq!(
        gone.len() as i64,
        last_acknowledged,
        "acknowledged at {confirmed} but not applied"
    );
    assert!(
        last_acknowledged > 0,
        "evictd acknowledged something before the kill"
    );

    // Restart, replay to now, and every committed transaction is applied.
    let output = evictd(&[
        "replay",
        "--config",
        config.to_str().unwrap(),
        "--until-lsn",
        "now",
    ]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        crate::support::stderr(&output)
    );
    let gone = deleted(&mut redis, &db.prefix, 1..=ROWS).await;
    assert_eq!(
        gone.len() as i64,
        ROWS,
        "missing after restart: {} keys",
        ROWS - gone.len() as i64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_with_a_final_status_update() {
    let db = TestDb::new().await;
    db.execute("create table orders (id bigint primary key, status text not null); create publication evictd for table orders;")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &db);
    let child = spawn_run(&config);
    let client = db.client().await;
    wait_for_slot(&client, &db.name, true).await;
    db.execute("insert into orders values (1, 'new')").await;
    let target = evictd::testkit::current_wal_lsn(&db.url).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while slot_confirmed(&client, &db.name).await < target {
        assert!(
            Instant::now() < deadline,
            "evictd never acknowledged the insert"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    terminate(child);
    wait_for_slot(&client, &db.name, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_active_process_dies() {
    let db = TestDb::new().await;
    db.execute("create table orders (id bigint primary key, status text not null); create publication evictd for table orders;")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &db);
    let mut redis = redis_connection().await;
    let mut seed = redis::pipe();
    for id in 1..=200 {
        seed.cmd("SET")
            .arg(format!("{}order:{id}", db.prefix))
            .arg("cached")
            .ignore();
    }
    seed.query_async::<()>(&mut redis).await.unwrap();
    let client = db.client().await;

    let mut active = spawn_run(&config);
    wait_for_slot(&client, &db.name, true).await;
    // The standby gets an admin port of its own, to ask it why it waits.
    let standby_dir = tempfile::tempdir().unwrap();
    let standby_port = free_port();
    let standby_config = run_config(
        standby_dir.path(),
        &db,
        &stack().redis.url(),
        MAPPING,
        &format!("127.0.0.1:{standby_port}"),
    );
    let mut standby = spawn_run(&standby_config);
    // Barrier: the standby has tried the slot (its reason names the
    // server's answer) rather than a fixed wait.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (status, reason) = loop {
        let answer = http_get(standby_port, "/readyz");
        let tried = answer
            .as_ref()
            .is_some_and(|(_, reason)| !reason.contains("connecting to Postgres"));
        if tried || Instant::now() > deadline {
            break answer.expect("the standby answers /readyz");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 503, "a standby is not ready");
    assert!(
        reason.starts_with("not ready: source: postgres ERROR 55006: replication slot")
            && reason.contains("is active for PID"),
        "{reason}"
    );
    assert!(
        standby.try_wait().unwrap().is_none(),
        "the standby waits instead of exiting"
    );
    db.execute("insert into orders select g, 'new' from generate_series(1, 100) g")
        .await;

    // Kill the active process and keep writing through the switch.
    active.kill().unwrap();
    active.wait().unwrap();
    let killed = Instant::now();
    for id in 101..=200 {
        db.execute(&format!("insert into orders values ({id}, 'new')"))
            .await;
    }
    let target = evictd::testkit::current_wal_lsn(&db.url).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while slot_confirmed(&client, &db.name).await < target {
        assert!(Instant::now() < deadline, "the standby never caught up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took_over = killed.elapsed();
    assert!(
        took_over < Duration::from_secs(10),
        "takeover took {took_over:?}"
    );
    let gone = deleted(&mut redis, &db.prefix, 1..=200).await;
    assert_eq!(
        gone.len(),
        200,
        "missed {} keys across the switch",
        200 - gone.len()
    );
    terminate(standby);
}
