//! The test stack itself: servers start, tests are isolated, and nothing is
//! left running or on disk when a test process ends, however it ends.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{stack, TestDb};
use evictd::testkit::{redis_ping, Postgres, Redis};

#[tokio::test]
async fn postgres_runs_with_logical_wal_and_tests_get_their_own_database() {
    let first = TestDb::new().await;
    let second = TestDb::new().await;
    assert_ne!(first.name, second.name);
    assert_ne!(first.prefix, second.prefix);
    let client = first.client().await;
    let wal_level: String = client
        .query_one("show wal_level", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(wal_level, "logical");
    first.execute("create table only_here (id int)").await;
    let other = second.client().await;
    let tables: i64 = other
        .query_one(
            "select count(*) from pg_tables where tablename = 'only_here'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 0, "databases are isolated");
}

#[test]
fn redis_answers() {
    assert!(redis_ping(stack().redis.port()));
}

/// Run as a child process by the tests below: starts its own servers,
/// prints what it started, then dies the way EVICTD_HARNESS_CHILD says.
#[test]
#[ignore = "run only as a child of the orphan tests"]
fn child_starts_servers_then_dies() {
    let Ok(how) = std::env::var("EVICTD_HARNESS_CHILD") else {
        return;
    };
    let postgres = Postgres::start().expect("postgres");
    let redis = Redis::start().expect("redis");
    println!("\n@pid {}", postgres.postmaster_pid());
    println!("@pid {}", redis.pid());
    println!("@dir {}", postgres.data_dir().parent().unwrap().display());
    println!("@dir {}", redis.dir().display());
    // A directory of the test's own, held as tests/integration/tls.rs
    // holds its certificates: in a static, never dropped.
    static OWN: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let own = OWN.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        evictd::testkit::reaper::reap_dir(dir.path());
        dir
    });
    println!("@dir {}", own.path().display());
    match how.as_str() {
        "abort" => std::process::abort(),
        "exit" => {
            // Statics and leaked values are never dropped.
            std::mem::forget((postgres, redis));
            std::process::exit(0)
        }
        _ => panic!("a failing test"),
    }
}

fn run_child_and_check_cleanup(how: &str) {
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "harness::child_starts_servers_then_dies",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("EVICTD_HARNESS_CHILD", how)
        .output()
        .expect("run the child test process");
    let text = String::from_utf8_lossy(&output.stdout);
    let pids: Vec<u32> = text
        .lines()
        .filter_map(|l| l.strip_prefix("@pid ")?.parse().ok())
        .collect();
    let dirs: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("@dir "))
        .collect();
    assert_eq!(
        (pids.len(), dirs.len()),
        (2, 3),
        "child output:\n{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let alive: Vec<u32> = pids.iter().copied().filter(|&pid| is_alive(pid)).collect();
        let left: Vec<&str> = dirs
            .iter()
            .copied()
            .filter(|dir| Path::new(dir).exists())
            .collect();
        if alive.is_empty() && left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "after `{how}`: still alive {alive:?}, still on disk {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Alive and not a zombie.
fn is_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

#[test]
fn no_orphans_after_a_panicking_test() {
    run_child_and_check_cleanup("panic");
}

#[test]
fn no_orphans_after_an_abort() {
    run_child_and_check_cleanup("abort");
}

#[test]
fn no_orphans_after_exit_without_destructors() {
    run_child_and_check_cleanup("exit");
}
