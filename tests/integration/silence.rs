//! `evictd run` never fails silently: a pipeline that stops ends the
//! process, schema drift under a mapped table is loud, memory stays bounded
//! whether or not anyone scrapes `/metrics`, and a huge value does not stay
//! in memory.

use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use crate::support::{free_port, http_get, stack, TestDb};
use evictd::pipeline::SourceState;

/// `evictd run` as a process, its log in a file.
struct Run {
    child: Child,
    port: u16,
    log: PathBuf,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Run {
    /// Writes a config for `db` with `mapping` as `mappings/t.toml` and
    /// starts `evictd run`.
    fn start(db: &TestDb, mapping: &str) -> Run {
        Run::start_with_env(db, mapping, &[])
    }

    /// [`Run::start`] with more environment variables.
    fn start_with_env(db: &TestDb, mapping: &str, env: &[(&str, &str)]) -> Run {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let config = crate::support::run_config(
            dir.path(),
            db,
            &stack().redis.url(),
            mapping,
            &format!("127.0.0.1:{port}"),
        );
        let log = dir.path().join("evictd.log");
        let child = spawn(&config, &log, env);
        Run {
            child,
            port,
            log,
            config,
            _dir: dir,
        }
    }

    /// Stops the process (SIGTERM) and starts it again with the same config.
    fn restart(&mut self) {
        signal(&self.child, "TERM");
        let _ = self.child.wait();
        self.child = spawn(&self.config, &self.log, &[]);
    }

    /// Polls `path` until it answers `status`; returns the body.
    fn wait_for(&self, path: &str, status: u16) -> String {
        self.wait_until(path, |code, _| code == status)
    }

    /// Polls `path` until `done(status, body)`; returns the body.
    fn wait_until(&self, path: &str, done: impl Fn(u16, &str) -> bool) -> String {
        let mut last = None;
        let (_, body) = within(Duration::from_secs(60), &self.log, || {
            last = http_get(self.port, path);
            last.clone().filter(|(code, body)| done(*code, body))
        })
        .unwrap_or_else(|log| {
            panic!("{path} never answered as expected; last: {last:?}\nlog:\n{log}")
        });
        body
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The first log line at `level` that contains `text`; fails the test
    /// (showing the log) when there is none.
    fn logged(&self, level: &str, text: &str) -> String {
        let log = self.log();
        log.lines()
            .find(|line| line.contains(level) && line.contains(text))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no {level} line with `{text}` in:\n{log}"))
    }

    /// Waits (bounded) for the process to exit by itself.
    fn exit_within(&mut self, timeout: Duration) -> ExitStatus {
        let log = self.log.clone();
        within(timeout, &log, || self.child.try_wait().expect("try_wait"))
            .unwrap_or_else(|log| panic!("evictd run is still up {timeout:?} later; log:\n{log}"))
    }

    /// Resident memory now, in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches(" kB").parse().ok())
            .expect("VmRSS")
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls every 100 ms until `poll` gives a value; past `timeout`, the log.
fn within<T>(
    timeout: Duration,
    log: &Path,
    mut poll: impl FnMut() -> Option<T>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = poll() {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(std::fs::read_to_string(log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn spawn(config: &Path, log: &Path, extra_env: &[(&str, &str)]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_evictd"))
        .args(["run", "--config", config.to_str().expect("utf-8 path")])
        .env("EVICTD_LOG", "info")
        .envs(extra_env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start evictd run");
    evictd::testkit::reaper::reap_pid(child.id());
    child
}

fn signal(child: &Child, name: &str) {
    std::process::Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .expect("kill");
}

/// Waits until `key` (under the test's prefix) is gone from Redis.
async fn gone(db: &TestDb, key: &str) {
    let mut redis = crate::support::redis_connection().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let exists: bool = redis::cmd("EXISTS")
            .arg(format!("{}{key}", db.prefix))
            .query_async(&mut redis)
            .await
            .expect("EXISTS");
        if !exists {
            return;
        }
        assert!(Instant::now() < deadline, "{key} was never invalidated");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn seed(db: &TestDb, keys: &[&str]) {
    let mut cache = crate::support::Cache::new(&db.prefix).await;
    cache.seed(keys).await;
}

const MAPPING: &str = "[[table]]\nname = \"t\"\nkeys = [\"t:{id}\", \"tv:{v}\"]\n";
const SCHEMA: &str = "create table t (id bigint primary key, v text, w text);
    alter table t replica identity full;
    create publication evictd for table t;
    insert into t values (1, 'a', 'x');";

/// A test database with [`SCHEMA`], and `evictd run` on it with
/// [`MAPPING`], ready.
async fn ready_run() -> (TestDb, Run) {
    let db = TestDb::new().await;
    db.execute(SCHEMA).await;
    let run = Run::start(&db, MAPPING);
    assert_eq!(run.wait_for("/readyz", 200), "ready\n");
    (db, run)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_that_stops_ends_the_process_with_status_1() {
    let (db, mut run) = ready_run().await;

    db.execute("drop publication evictd; update t set w = 'y' where id = 1")
        .await;
    let status = run.exit_within(Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "log:\n{}", run.log());
    let logged = run.logged("ERROR", "the pipeline stops");
    assert!(logged.contains("42704"), "{logged}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_denied_is_not_retried_forever() {
    let mut db = TestDb::new().await;
    // No publication, and a role that may replicate but not create one.
    let role = format!("{}_nopub", db.name);
    db.execute(&format!(
        "create table t (id bigint primary key, v text, w text);
         create role {role} login replication;
         grant select on t to {role};"
    ))
    .await;
    db.url = db
        .url
        .replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    let mut run = Run::start(&db, MAPPING);
    let status = run.exit_within(Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "log:\n{}", run.log());
    run.logged("ERROR", "42501");
}

/// The admin endpoint alone, on a free port, over a source state the test
/// controls.
async fn admin() -> (u16, tokio::sync::watch::Sender<SourceState>) {
    let (source_tx, source) = tokio::sync::watch::channel(SourceState::Streaming);
    // The other states never change (a receiver keeps the last value).
    let (_, redis) = tokio::sync::watch::channel(None);
    let (_, schema) = tokio::sync::watch::channel(Default::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let state = evictd::internal::AdminState {
        source,
        redis,
        visibility: None,
        replicas: None,
        purge: None,
        schema,
        kind: evictd::config::SourceKind::Kafka,
        probe: None,
        console: None,
    };
    tokio::spawn(evictd::internal::serve(listener, state));
    (port, source_tx)
}

/// `request` sent raw to the endpoint on `port`; the whole answer.
async fn raw(port: u16, request: &'static str) -> String {
    tokio::task::spawn_blocking(move || {
        use std::io::{Read as _, Write as _};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("an answer");
        response
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_not_ok_once_the_pipeline_has_ended() {
    let (port, source) = admin().await;
    let healthz = "GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";
    assert!(raw(port, healthz).await.starts_with("HTTP/1.1 200"));
    source.send_replace(SourceState::Ended);
    let response = raw(port, healthz).await;
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(
        response.ends_with("the pipeline has stopped\n"),
        "{response}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_names_the_source_it_waits_for() {
    let (port, source) = admin().await;
    source.send_replace(SourceState::Connecting);
    let response = raw(port, "GET /readyz HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(
        response.ends_with(
            "not ready: source: waiting for Kafka partitions (joining the consumer group)\n"
        ),
        "{response}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_bare_lf_line_endings_is_answered() {
    let (port, _source) = admin().await;
    let response = raw(port, "GET /healthz HTTP/1.1\nhost: x\n\n").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("ok\n"), "{response}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_mapped_table_is_still_invalidated_and_reported() {
    let (db, run) = ready_run().await;
    seed(&db, &["t:1", "t:2"]).await;
    db.execute("update t set w = 'y' where id = 1").await;
    gone(&db, "t:1").await;

    db.execute("alter table t rename to t2; update t2 set w = 'z' where id = 1; insert into t2 values (2, 'b', 'x')")
        .await;
    // Kept under its old mapping: no invalidation is missed.
    gone(&db, "t:2").await;
    let body = run.wait_for("/readyz", 503);
    assert!(
        body.contains("public.t") && body.contains("renamed to public.t2"),
        "{body}"
    );
    run.logged("ERROR", "renamed to public.t2");
    let (_, metrics) = http_get(run.port, "/metrics").expect("metrics");
    assert!(
        metrics.lines().any(
            |line| line.starts_with(r#"evictd_schema_problems{table="public.t"}"#)
                && !line.ends_with(" 0")
        ),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_mapped_column_is_reported_live_and_at_start() {
    let (db, mut run) = ready_run().await;

    db.execute("alter table t drop column v; update t set w = 'y' where id = 1")
        .await;
    let body = run.wait_for("/readyz", 503);
    assert!(body.contains("column(s) v"), "{body}");
    let metrics = run.wait_until("/metrics", |_, body| {
        body.lines().any(|line| {
            line.strip_prefix(r#"evictd_pattern_fallbacks_total{table="public.t"} "#)
                .is_some_and(|count| count != "0")
        })
    });
    assert!(
        metrics.contains(r#"evictd_schema_problems{table="public.t"}"#),
        "{metrics}"
    );
    run.logged("WARN", "deleted by pattern");

    // Started again with the column still gone: not ready from the start.
    run.restart();
    let body = run.wait_until("/readyz", |code, body| {
        code == 503 && body.contains("does not exist")
    });
    assert!(body.contains("public.t"), "{body}");
}

/// How long the soak runs: `EVICTD_SOAK_SECS`, 10 minutes by default.
fn soak_seconds() -> u64 {
    std::env::var("EVICTD_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_flat_without_scrapes() {
    let db = TestDb::new().await;
    db.execute(
        "create table t (id bigint primary key, v text, w text);
         alter table t replica identity full;
         create publication evictd for table t;",
    )
    .await;
    let run = Run::start(&db, MAPPING);
    // Readiness only: /metrics is never scraped.
    run.wait_for("/readyz", 200);
    let client = db.client().await;
    let insert = client
        .prepare("insert into t values ($1, 'v', 'w')")
        .await
        .unwrap();
    let total = Duration::from_secs(soak_seconds());
    let warm_up = total / 5;
    let started = Instant::now();
    let mut id: i64 = 0;
    let mut baseline = None;
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    while started.elapsed() < total {
        tick.tick().await;
        id += 1;
        client.execute(&insert, &[&id]).await.unwrap();
        if baseline.is_none() && started.elapsed() >= warm_up {
            baseline = Some((id, run.rss_kib()));
        }
    }
    let (id_then, rss_then) = baseline.expect("a baseline sample");
    let rss_now = run.rss_kib();
    let transactions = id - id_then;
    eprintln!(
        "soak: {id} single-row transactions in {total:?}; RSS {rss_then} KiB after {} \
         transactions, {rss_now} KiB after {transactions} more",
        id_then
    );
    // Histogram samples held until a scrape cost ~66 bytes per batch:
    // several MiB over this run. Bounded memory leaves allocator noise.
    // 50,000 over the 10 minutes of the full soak; as many per second when
    // EVICTD_SOAK_SECS shortens it.
    let wanted = i64::try_from(50_000 * soak_seconds() / 600).unwrap_or(i64::MAX);
    assert!(
        transactions > wanted,
        "the workload ran too slowly to show anything: {transactions} transactions (wanted {wanted})"
    );
    assert!(
        rss_now <= rss_then + 1024,
        "RSS grew from {rss_then} KiB to {rss_now} KiB over {transactions} transactions without a scrape"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_value_is_not_held_after_it_was_applied() {
    let (db, run) = ready_run().await;
    let idle = run.rss_kib();
    seed(&db, &["t:2"]).await;
    // 100 MB in a column that no mapping reads, as an insert and then as
    // an update of the whole row (old and new values).
    db.execute("alter table t alter column w set storage external")
        .await;
    db.execute("insert into t values (2, 'b', repeat('x', 100000000))")
        .await;
    gone(&db, "t:2").await;
    seed(&db, &["t:2"]).await;
    db.execute("update t set w = repeat('y', 100000000) where id = 2")
        .await;
    gone(&db, "t:2").await;
    // Give the allocator a moment; then the memory must be back.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = run.rss_kib();
    let peak = crate::support::peak_rss_kib(run.child.id());
    eprintln!("huge value: RSS idle {idle} KiB, peak {peak} KiB, after {after} KiB");
    assert!(
        after < idle + 16 * 1024,
        "RSS stayed at {after} KiB after a 100 MB value (idle: {idle} KiB, peak {peak} KiB)"
    );
}

/// CPU time of process `pid` so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    evictd::testkit::process_cpu_ticks(pid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_backs_off_when_it_runs_out_of_file_descriptors() {
    let (_db, run) = ready_run().await;
    // Lower the running process' descriptor limit to what it holds now,
    // and hold connections until accept fails.
    let pid = run.child.id();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let limit = (open + 4).to_string();
    let status = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .status()
        .expect("prlimit");
    assert!(status.success());
    let held: Vec<std::net::TcpStream> = (0..32)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", run.port)).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(3));
    let spent = cpu_ticks(pid) - before;
    drop(held);
    run.logged("ERROR", "cannot accept connections");
    // Spinning on accept burns a core: ~300 ticks in 3 s.
    assert!(
        spent < 60,
        "{spent} ticks of CPU in 3 s while accept failed"
    );
    // Descriptors back (the held connections closed): it answers again.
    run.wait_for("/healthz", 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_to_a_file_carry_no_colour_codes() {
    let (_db, run) = ready_run().await;
    let log = run.log();
    assert!(log.contains("INFO"), "nothing logged:\n{log}");
    assert!(!log.contains('\x1b'), "colour codes in a log file:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let db = TestDb::new().await;
    db.execute(SCHEMA).await;
    let run = Run::start_with_env(&db, MAPPING, &[("EVICTD_LOG_FORMAT", "json")]);
    assert_eq!(run.wait_for("/readyz", 200), "ready\n");
    let log = run.log();
    let mut lines = 0;
    for line in log.lines().filter(|line| !line.is_empty()) {
        let object: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|error| panic!("not JSON ({error}): {line}"));
        assert!(
            object["level"].is_string() && object["fields"].is_object(),
            "{line}"
        );
        lines += 1;
    }
    assert!(lines > 0, "nothing logged");
}

#[test]
fn an_unknown_log_format_is_refused_with_exit_2() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_evictd"))
        .args(["check", "--mappings", "mappings"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("EVICTD_LOG_FORMAT", "xml")
        .output()
        .expect("run evictd");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("EVICTD_LOG_FORMAT is `xml`"), "{stderr}");
}

/// The value of the counter line `name` in a `/metrics` body.
fn counter_in(body: &str, name: &str) -> u64 {
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evictd_run_reloads_an_edited_mapping_and_on_sighup_and_says_so() {
    let (db, run) = ready_run().await;
    let mappings = run.config.parent().expect("config dir").join("mappings");
    let applied = r#"evictd_mapping_reloads_total{outcome="applied"}"#;
    let invalid = r#"evictd_mapping_reloads_total{outcome="invalid"}"#;
    // A broken edit is refused, logged, counted; the running set stays.
    std::fs::write(mappings.join("broken.toml"), "[[table]\n").expect("write");
    run.wait_until("/metrics", |_, body| counter_in(body, invalid) == 1);
    run.logged("ERROR", "mapping reload refused");
    std::fs::remove_file(mappings.join("broken.toml")).expect("remove");
    run.wait_until("/metrics", |_, body| counter_in(body, applied) == 1);
    // An edit that adds a key takes effect.
    std::fs::write(
        mappings.join("orders.toml"),
        "[[table]]\nname = \"t\"\nkeys = [\"t:{id}\", \"tv:{v}\", \"tw:{w}\"]\n",
    )
    .expect("write");
    run.wait_until("/metrics", |_, body| counter_in(body, applied) == 2);
    let summary = run.logged("INFO", "changes=changed: public.t");
    assert!(summary.contains("mappings reloaded"), "{summary}");
    seed(&db, &["tw:y"]).await;
    db.execute("update t set w = 'y' where id = 1").await;
    db.execute("update t set w = 'z' where id = 1").await;
    gone(&db, "tw:y").await;
    // SIGHUP reloads the unchanged files on request.
    signal(&run.child, "HUP");
    run.wait_until("/metrics", |_, body| counter_in(body, applied) == 3);
    run.logged("INFO", "SIGHUP: reloading the mappings");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsigned_sql_message_is_refused_counted_and_logged_with_its_position() {
    let db = TestDb::new().await;
    db.execute(SCHEMA).await;
    db.execute(include_str!("../../migrations/0002_evictd_invalidate.sql"))
        .await;
    db.execute("insert into evictd.message_secret (secret) values ('s3cret')")
        .await;
    seed(&db, &["t:1", "t:9"]).await;
    let run = Run::start_with_env(
        &db,
        MAPPING,
        &[
            ("EVICTD_MAPPINGS__SQL_MESSAGES", "true"),
            (
                "EVICTD_MAPPINGS__SQL_MESSAGES_SECRET_ENV",
                "EVICTD_TEST_MESSAGE_SECRET",
            ),
            ("EVICTD_TEST_MESSAGE_SECRET", "s3cret"),
        ],
    );
    run.wait_for("/readyz", 200);
    let unauthenticated = r#"evictd_sql_messages_total{outcome="unauthenticated"}"#;
    // Exported at 0 before any message, so the first refusal is an increase.
    let metrics = run.wait_for("/metrics", 200);
    assert!(
        metrics.contains(&format!("{unauthenticated} 0")),
        "{metrics}"
    );
    // Anyone can emit it; only evictd_invalidate() signs.
    db.execute(
        r#"select pg_logical_emit_message(true, 'evictd', '{"keys": ["t:9"]}');
           select evictd_invalidate(keys => array['t:1']);"#,
    )
    .await;
    gone(&db, "t:1").await;
    let mut cache = crate::support::Cache::new(&db.prefix).await;
    assert_eq!(cache.cached(&["t:1", "t:9"]).await, ["t:9"]);
    let line = run.logged("WARN", "skipped an invalidation from SQL (unauthenticated)");
    assert!(
        line.contains("position=\"lsn ") || line.contains("position=lsn"),
        "{line}"
    );
    assert!(line.contains("the message is not signed"), "{line}");
    run.wait_until("/metrics", |_, body| counter_in(body, unauthenticated) == 1);

    // `check` warns when messages are on without a secret.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_evictd"))
        .args(["check", "--offline", "--config"])
        .arg(&run.config)
        .env("EVICTD_MAPPINGS__SQL_MESSAGES", "true")
        .output()
        .expect("run evictd check");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: mappings.sql_messages is on without a secret"),
        "{stderr}"
    );
}

/// Makes a FIFO at `path`.
fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_or_socket_in_the_mappings_directory_is_named_and_never_blocks() {
    let (db, mut run) = ready_run().await;
    let mappings = run.config.parent().expect("config dir").join("mappings");
    // Added while running: the reload is refused with the file named, and
    // the process goes on serving and applying.
    mkfifo(&mappings.join("pipe.toml"));
    let _socket =
        std::os::unix::net::UnixListener::bind(mappings.join("sock.toml")).expect("bind a socket");
    let invalid = r#"evictd_mapping_reloads_total{outcome="invalid"}"#;
    run.wait_until("/metrics", |_, body| counter_in(body, invalid) >= 1);
    let line = run.logged(
        "ERROR",
        "pipe.toml is a FIFO (named pipe), not a regular file",
    );
    assert!(line.contains("mapping reload refused"), "{line}");
    run.logged("ERROR", "sock.toml is a socket, not a regular file");
    run.wait_for("/healthz", 200);
    seed(&db, &["t:1"]).await;
    db.execute("update t set w = 'fifo' where id = 1").await;
    gone(&db, "t:1").await;
    // SIGTERM ends it, promptly.
    signal(&run.child, "TERM");
    let status = run.exit_within(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "log:\n{}", run.log());

    // Present at start: `run` and `check` name them and exit 2 at once.
    for args in [
        &["run", "--config"][..],
        &["check", "--offline", "--config"][..],
    ] {
        let started = Instant::now();
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_evictd"))
            .args(args)
            .arg(&run.config)
            .output()
            .expect("run evictd");
        // `check` reports on stdout, `run` on stderr.
        let stderr = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{args:?} took {:?}",
            started.elapsed()
        );
        assert!(
            stderr.contains("pipe.toml is a FIFO (named pipe), not a regular file"),
            "{stderr}"
        );
        assert!(
            stderr.contains("sock.toml is a socket, not a regular file"),
            "{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_is_not_a_refused_reload() {
    let (_db, run) = ready_run().await;
    let mappings = run.config.parent().expect("config dir").join("mappings");
    let pid = run.child.id().to_string();
    // The soft limit only: raising a hard limit needs a privilege.
    let nofile = |limit: &str| {
        let status = std::process::Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={limit}:")])
            .status()
            .expect("prlimit");
        assert!(status.success());
    };
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let soft = limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the soft limit")
        .to_owned();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    // A few descriptors to spare, taken by connections to the admin
    // endpoint until accept fails: not one is left. Then an edit the
    // watcher must read.
    nofile(&(open + 4).to_string());
    let held: Vec<std::net::TcpStream> = (0..32)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", run.port)).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(
        mappings.join("orders.toml"),
        "[[table]]\nname = \"t\"\nkeys = [\"t:{id}\", \"tv:{v}\", \"tw:{w}\"]\n",
    )
    .expect("write");
    within(Duration::from_secs(30), &run.log, || {
        run.log()
            .contains("cannot read the mapping files now")
            .then_some(())
    })
    .unwrap_or_else(|log| panic!("no WARN about the shortage:\n{log}"));
    drop(held);
    nofile(&soft);
    // Descriptors back: the edit is applied, and nothing was refused.
    let applied = r#"evictd_mapping_reloads_total{outcome="applied"}"#;
    let body = run.wait_until("/metrics", |_, body| counter_in(body, applied) == 1);
    let invalid = r#"evictd_mapping_reloads_total{outcome="invalid"}"#;
    assert_eq!(counter_in(&body, invalid), 0, "{body}");
    assert!(
        !run.log().contains("mapping reload refused"),
        "{}",
        run.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_counter_is_exported_at_zero_from_the_start() {
    let (_db, run) = ready_run().await;
    let body = run.wait_for("/metrics", 200);
    for series in [
        "evictd_reconnects_total",
        r#"evictd_redis_commands_total{outcome="error"}"#,
        "evictd_redis_failures_total",
        r#"evictd_mapping_reloads_total{outcome="invalid"}"#,
        r#"evictd_mapping_reloads_total{outcome="applied"}"#,
        r#"evictd_pattern_fallbacks_total{table="public.t"}"#,
        r#"evictd_prefix_deletes_total{table="public.t"}"#,
        r#"evictd_keys_invalidated_total{table="public.t",mode="coarse"}"#,
        r#"evictd_changes_received_total{table="public.t",op="truncate"}"#,
        r#"evictd_sql_messages_total{outcome="malformed"}"#,
        r#"evictd_consistency_checks_total{outcome="stale"}"#,
        "evictd_coarse_invalidations_total",
        r#"evictd_continuity_lost_total{cause="slot_invalidated"}"#,
        r#"evictd_continuity_lost_total{cause="database_replaced"}"#,
        "evictd_log_lines_dropped_total",
    ] {
        assert!(
            body.lines().any(|line| line == format!("{series} 0")),
            "{series} is not exported at 0:\n{body}"
        );
    }
}

/// `evictd run` with its stderr on `stderr`, its admin endpoint on `port`.
fn spawn_with_stderr(config: &Path, stderr: std::process::Stdio) -> Child {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_evictd"))
        .args(["run", "--config", config.to_str().expect("utf-8 path")])
        .env("EVICTD_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start evictd run");
    evictd::testkit::reaper::reap_pid(child.id());
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_sink_that_cannot_be_written_never_stops_invalidations() {
    for sink in ["/dev/full", "a closed pipe"] {
        let db = TestDb::new().await;
        db.execute(SCHEMA).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let config = crate::support::run_config(
            dir.path(),
            &db,
            &stack().redis.url(),
            MAPPING,
            &format!("127.0.0.1:{port}"),
        );
        let mut child = if sink == "/dev/full" {
            let full = std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .expect("/dev/full");
            spawn_with_stderr(&config, full.into())
        } else {
            let mut child = spawn_with_stderr(&config, std::process::Stdio::piped());
            drop(child.stderr.take());
            child
        };
        let dropped = "evictd_log_lines_dropped_total";
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = http_get(port, "/readyz").is_some_and(|(status, _)| status == 200);
            if ready {
                break;
            }
            assert!(
                child.try_wait().expect("try_wait").is_none(),
                "{sink}: evictd run exited: {:?}",
                child.try_wait()
            );
            assert!(Instant::now() < deadline, "{sink}: never ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        seed(&db, &["t:1"]).await;
        // Each change logs nothing by itself; a reload logs several lines.
        signal(&child, "HUP");
        db.execute("update t set w = 'sink' where id = 1").await;
        gone(&db, "t:1").await;
        let (_, body) = http_get(port, "/metrics").expect("/metrics");
        assert!(counter_in(&body, dropped) > 0, "{sink}: {body}");
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "{sink}: it exited"
        );
        signal(&child, "TERM");
        let status = within(Duration::from_secs(30), Path::new("/dev/null"), || {
            child.try_wait().expect("try_wait")
        })
        .expect("evictd run stops on SIGTERM");
        assert_eq!(status.code(), Some(0), "{sink}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_dropped_and_created_again_is_recovered_by_reset_slot() {
    let (db, mut run) = ready_run().await;
    seed(&db, &["t:1", "tv:a", "tv:b", "tv:c"]).await;
    // Each its own transaction (a multi-statement query is one): a change
    // while the publication is gone, then the publication back.
    db.execute("drop publication evictd").await;
    db.execute("update t set v = 'b' where id = 1").await;
    db.execute("create publication evictd for table t").await;
    let status = run.exit_within(Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "log:\n{}", run.log());
    let line = run.logged("ERROR", "the pipeline stops");
    assert!(line.contains("42704"), "{line}");
    assert!(line.contains("evictd init --reset-slot"), "{line}");
    // Every start fails the same way: the slot decodes from before the
    // publication existed.
    run.restart();
    run.exit_within(Duration::from_secs(60));
    // The way out the error names.
    db.execute("update t set v = 'c' where id = 1").await;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_evictd"))
        .args(["init", "--reset-slot", "--config"])
        .arg(&run.config)
        .output()
        .expect("evictd init --reset-slot");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("re-created the replication slot"),
        "{stdout}"
    );
    // Nothing missed: what changed while the slot could not decode is gone.
    let mut cache = crate::support::Cache::new(&db.prefix).await;
    assert!(
        cache
            .cached(&["t:1", "tv:a", "tv:b", "tv:c"])
            .await
            .is_empty(),
        "{stdout}{stderr}"
    );
    // And `run` streams again from the new slot.
    run.restart();
    assert_eq!(run.wait_for("/readyz", 200), "ready\n");
    seed(&db, &["tv:d"]).await;
    db.execute("update t set v = 'd' where id = 1").await;
    db.execute("update t set v = 'e' where id = 1").await;
    gone(&db, "tv:d").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_a_replica_identity_change_at_its_next_change() {
    let (db, run) = ready_run().await;
    // The live checks run every minute; a changed Relation message runs
    // them at once, so both directions show within seconds.
    let started = Instant::now();
    db.execute("alter table t replica identity nothing").await;
    db.execute("insert into t values (2, 'b', 'x')").await;
    let reason = run.wait_for("/readyz", 503);
    assert!(reason.contains("REPLICA IDENTITY NOTHING"), "{reason}");
    db.execute("alter table t replica identity full").await;
    db.execute("insert into t values (3, 'c', 'x')").await;
    run.wait_for("/readyz", 200);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "readiness took {:?} to follow",
        started.elapsed()
    );
}
