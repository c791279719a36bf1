//! The admin endpoint of `evictd run`: /healthz, /readyz through a Redis
//! outage, and /metrics after real traffic.

use std::time::{Duration, Instant};

use crate::support::{free_port, http_get, run_config, spawn_run, terminate, TestDb};
use evictd::testkit::Redis;

/// Polls until `path` answers `status`; returns the body.
fn wait_for(port: u16, path: &str, status: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match http_get(port, path) {
            Some((code, body)) if code == status => return body,
            other => assert!(
                Instant::now() < deadline,
                "{path} never answered {status}; last: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics() {
    let mut redis = Redis::start().expect("redis");
    let db = TestDb::new().await;
    db.execute("create table orders (id bigint primary key, status text not null); create publication evictd for table orders;")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mapping = "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\n";
    let config = run_config(
        dir.path(),
        &db,
        &redis.url(),
        mapping,
        &format!("127.0.0.1:{port}"),
    );
    let child = spawn_run(&config);

    assert_eq!(wait_for(port, "/healthz", 200), "ok\n");
    assert_eq!(wait_for(port, "/readyz", 200), "ready\n");
    assert_eq!(http_get(port, "/nope").map(|(code, _)| code), Some(404));

    db.execute("insert into orders values (1, 'new'), (2, 'new'), (3, 'new')")
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        let (_, body) = http_get(port, "/metrics").expect("metrics");
        if body.contains(r#"evictd_changes_received_total{table="public.orders",op="insert"} 3"#) {
            break body;
        }
        assert!(Instant::now() < deadline, "no received count in:\n{body}");
        std::thread::sleep(Duration::from_millis(200));
    };
    for expected in [
        "evictd_changes_applied_total 3",
        r#"evictd_keys_invalidated_total{table="public.orders",mode="exact"} 3"#,
        "evictd_streaming 1",
        "evictd_commit_to_apply_lag_seconds_bucket",
        "evictd_replication_lag_bytes",
        "# HELP evictd_ack_lsn",
    ] {
        assert!(
            metrics.contains(expected),
            "{expected} missing from:\n{metrics}"
        );
    }

    // The walsender killed: a reconnect, counted.
    db.execute(&format!(
        "select pg_terminate_backend(active_pid) from pg_replication_slots where slot_name = '{}'",
        db.name
    ))
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = http_get(port, "/metrics").expect("metrics");
        if body.contains("evictd_reconnects_total 1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no reconnect counted in:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_for(port, "/readyz", 200);

    // Redis goes away: not ready, with the reason; back: ready again.
    redis.stop();
    db.execute("insert into orders values (4, 'new')").await;
    let body = wait_for(port, "/readyz", 503);
    assert!(body.starts_with("not ready: redis:"), "{body}");
    redis.restart().expect("restart redis");
    wait_for(port, "/readyz", 200);

    // Idle (nothing to apply): a probe is answered from a fresh PING, not
    // from the last idle ping of apply (up to 5 s old).
    redis.stop();
    std::thread::sleep(Duration::from_millis(1100));
    let (status, body) = http_get(port, "/readyz").expect("readyz");
    assert_eq!(
        (status, body.starts_with("not ready: redis:")),
        (503, true),
        "{body}"
    );
    redis.restart().expect("restart redis");
    wait_for(port, "/readyz", 200);

    terminate(child);
}
