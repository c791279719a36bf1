//! B3, live lag: pgbench commits single-row updates (two clients) while
//! evictd streams, first as fast as it goes ("max"), then at half of the
//! rate reached (`pgbench --rate`). Lag is read two ways:
//!
//! - evictd's histograms: commit timestamp in Postgres to the moment Redis
//!   acknowledged the batch ("commit"), and the walsender's send time of
//!   that commit to the same moment ("sent": evictd's own part, without the
//!   walsender's decoding and queueing);
//! - an outside probe: every 50 ms a separate connection commits a new
//!   version of a probe row and polls Redis until the refreshed value shows
//!   it (what an application would see);
//! - read-your-writes: every 50 ms another connection commits a new version
//!   of a second row, reads its commit position and waits with the client
//!   crate's `Cache::wait_applied` (L1 on): from the commit's return to
//!   `wait_applied`'s, against the probe above (polling Redis) in the same
//!   run.
//!
//! Run: `cargo bench --bench lag` (prints a table, then one JSON line).
//! `EVICTD_BENCH_RATE=N` runs one pass at N commits/s;
//! `EVICTD_BENCH_NICE=N` runs pgbench at that niceness and
//! `EVICTD_BENCH_WALSENDER_NICE=N` renices the walsender serving evictd, to
//! tell CPU contention on a small machine from evictd's own latency;
//! `EVICTD_BENCH_METRICS=1` prints the CPU each process used;
//! `EVICTD_BENCH_GATE=1` runs the half-rate pass with the visibility gate
//! (`postgres.visibility_gate`) and without it, alternating twice.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use evictd::config::{Config, SecretUrl};
use evictd::lag::{Lag, LagHistogram};
use evictd::mapping;
use evictd::pipeline::{self, Options};
use evictd::testkit::{Postgres, Redis};

const ROWS: i64 = 10_000;
const PROBE_ID: i64 = ROWS + 1;
/// The row the read-your-writes writer commits.
const RYW_ID: i64 = ROWS + 2;
const WRITERS: usize = 2;
const SECONDS: u64 = 10;

const MAPPING: &str = r#"
[[table]]
name = "orders"
keys = ["order:{id}"]

[[table.refresh]]
key = "order:{id}:version"
columns = ["version"]
"#;

struct Run {
    name: String,
    rate: f64,
    evictd: Lag,
    probe: LagHistogram,
    wait_applied: LagHistogram,
    rss_kib: u64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let postgres = tokio::task::spawn_blocking(Postgres::start)
        .await
        .unwrap()
        .expect("start postgres");
    let redis = Redis::start().expect("start redis");
    // EVICTD_BENCH_RATE=N runs only a fixed-rate pass at N commits/s.
    if let Some(rate) = std::env::var("EVICTD_BENCH_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
    {
        let fixed = run(&postgres, &redis, "fixed", Some(rate), true).await;
        report(&[fixed]);
        return;
    }
    let max = run(&postgres, &redis, "max", None, true).await;
    // EVICTD_BENCH_GATE=1: at half the rate, with the visibility gate and
    // without, alternating twice: the gate's cost to the lag.
    if std::env::var_os("EVICTD_BENCH_GATE").is_some() {
        let rate = Some(max.rate / 2.0);
        let mut runs = vec![max];
        for _ in 0..2 {
            runs.push(run(&postgres, &redis, "gate", rate, true).await);
            runs.push(run(&postgres, &redis, "nogate", rate, false).await);
        }
        report(&runs);
        return;
    }
    let half = run(&postgres, &redis, "half", Some(max.rate / 2.0), true).await;
    report(&[max, half]);
}

/// Prints the table (milliseconds) and one JSON line.
fn report(runs: &[Run]) {
    println!(
        "\n{:<6} {:>9} {:>28} {:>28} {:>18} {:>20} {:>8}",
        "load",
        "commits/s",
        "commit->Redis p50/p99/p99.9",
        "sent->Redis p50/p99/p99.9",
        "probe p50/p99",
        "wait_applied p50/p99",
        "RSS MiB"
    );
    let ms = |histogram: &LagHistogram, q: f64| histogram.quantile(q).as_secs_f64() * 1000.0;
    let three = |h: &LagHistogram| {
        format!(
            "{:.2} / {:.2} / {:.2}",
            ms(h, 0.5),
            ms(h, 0.99),
            ms(h, 0.999)
        )
    };
    let mut json = Vec::new();
    for run in runs {
        println!(
            "{:<6} {:>9.0} {:>28} {:>28} {:>18} {:>20} {:>8}",
            run.name,
            run.rate,
            three(&run.evictd.commit_to_apply),
            three(&run.evictd.sent_to_apply),
            format!("{:.2} / {:.2}", ms(&run.probe, 0.5), ms(&run.probe, 0.99)),
            format!(
                "{:.2} / {:.2}",
                ms(&run.wait_applied, 0.5),
                ms(&run.wait_applied, 0.99)
            ),
            run.rss_kib / 1024
        );
        let quantiles = |h: &LagHistogram| serde_json::json!({"p50": ms(h, 0.5), "p99": ms(h, 0.99), "p999": ms(h, 0.999), "batches": h.count()});
        json.push(serde_json::json!({
            "load": run.name,
            "commits_per_second": run.rate,
            "evictd_commit_to_apply_ms": quantiles(&run.evictd.commit_to_apply),
            "evictd_sent_to_apply_ms": quantiles(&run.evictd.sent_to_apply),
            "probe_lag_ms": {"p50": ms(&run.probe, 0.5), "p99": ms(&run.probe, 0.99), "samples": run.probe.count()},
            "wait_applied_ms": {"p50": ms(&run.wait_applied, 0.5), "p99": ms(&run.wait_applied, 0.99), "samples": run.wait_applied.count()},
            "process_peak_rss_kib": run.rss_kib,
        }));
    }
    println!("{}", serde_json::Value::Array(json));
}

async fn run(
    postgres: &Postgres,
    redis: &Redis,
    name: &str,
    rate: Option<f64>,
    visibility_gate: bool,
) -> Run {
    let database = postgres.create_database().await.unwrap();
    let url = postgres.url(&database);
    let admin = connect(&url).await;
    admin
        .batch_execute(&format!(
            "create table orders (id bigint primary key, version bigint not null);
             alter table orders replica identity full;
             insert into orders select g, 0 from generate_series(1, {RYW_ID}) g;
             create publication evictd for table orders;"
        ))
        .await
        .unwrap();
    let mappings_dir = tempfile::tempdir().unwrap();
    std::fs::write(mappings_dir.path().join("orders.toml"), MAPPING).unwrap();
    let mut config = Config::with_defaults(
        SecretUrl::parse(&url).unwrap(),
        SecretUrl::parse(&redis.url()).unwrap(),
        mappings_dir.path().to_path_buf(),
    );
    config.postgres.slot = format!("{database}_lag");
    config.postgres.visibility_gate = visibility_gate;
    config.redis.prefix = format!("{database}:");
    let mappings =
        Arc::new(mapping::load_dir(mappings_dir.path(), config.mappings.limits).unwrap());
    let running = pipeline::start(&config, mappings, Options::default())
        .expect("start evictd")
        .streaming_within(Duration::from_secs(30))
        .await
        .expect("streaming");
    if let Ok(nice) = std::env::var("EVICTD_BENCH_WALSENDER_NICE") {
        // Raise (or lower) the priority of the walsender serving evictd, to
        // tell its share of the CPU from evictd's own latency.
        let pid = evictd::testkit::walsender_pid(&admin, &config.postgres.slot)
            .await
            .unwrap()
            .expect("a walsender serves evictd once it streams");
        let status = std::process::Command::new("renice")
            .args(["-n", &nice, "-p", &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run renice");
        assert!(
            status.success(),
            "renice {nice} of the walsender failed (root only for < 0)"
        );
    }
    eprintln!("{name}: {} s of single-row updates ...", SECONDS);

    let stop = Arc::new(AtomicBool::new(false));
    let probe = probe(&url, redis, &config.redis.prefix, stop.clone());
    let wait_applied = read_your_writes(&url, redis, &config, stop.clone());
    let cpu_before = evictd::testkit::cpu_by_process_name();
    let rate = pgbench(postgres, &url, rate).await;
    stop.store(true, Ordering::Relaxed);
    if std::env::var_os("EVICTD_BENCH_METRICS").is_some() {
        // pgbench has exited by now, so its CPU is not in the second sample:
        // the others' is, and what the CPUs could give is 2 x 10 s.
        let after = evictd::testkit::cpu_by_process_name();
        let used: Vec<(String, u64)> = after
            .into_iter()
            .map(|(name, ticks)| {
                let before = cpu_before.get(&name).copied().unwrap_or(0);
                (name, ticks.saturating_sub(before))
            })
            .filter(|(_, ticks)| *ticks > 0)
            .collect();
        eprintln!("{name}: CPU ticks by process during the run: {used:?}");
    }
    let probe = probe.await.unwrap();
    let wait_applied = wait_applied.await.unwrap();
    let evictd = running.lag.lock().unwrap().clone();
    running.stop();
    running.wait().await.expect("evictd stopped");
    Run {
        name: name.to_owned(),
        rate,
        evictd,
        probe,
        wait_applied,
        rss_kib: peak_rss_kib(),
    }
}

/// Runs pgbench for `SECONDS` with `WRITERS` clients, each transaction one
/// single-row update, at `rate` transactions/s in all (or as fast as it
/// goes); returns the rate it reached.
async fn pgbench(postgres: &Postgres, url: &str, rate: Option<f64>) -> f64 {
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        script.path(),
        format!(
            "\\set id random(1, {ROWS})\nupdate orders set version = version + 1 where id = :id;\n"
        ),
    )
    .unwrap();
    // EVICTD_BENCH_NICE=N runs pgbench at that niceness, to tell CPU
    // contention on a small machine from evictd's own latency.
    let nice = std::env::var("EVICTD_BENCH_NICE").unwrap_or_else(|_| "0".into());
    let mut command = tokio::process::Command::new("nice");
    command
        .args(["-n", &nice])
        .arg(postgres.bin_dir().join("pgbench"))
        .args(["--no-vacuum", "--protocol", "prepared"])
        .args([
            "--client",
            &WRITERS.to_string(),
            "--jobs",
            &WRITERS.to_string(),
        ])
        .args(["--time", &SECONDS.to_string(), "--file"])
        .arg(script.path());
    if let Some(rate) = rate {
        command.args(["--rate", &format!("{rate:.0}")]);
    }
    // Commits wait for the WAL flush, as an application's would (the
    // throwaway server defaults to asynchronous commit).
    command.env("PGOPTIONS", "-c synchronous_commit=on");
    let output = command.arg(url).output().await.expect("run pgbench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "pgbench failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|tps| tps.parse().ok())
        .unwrap_or_else(|| panic!("no tps in pgbench's output: {stdout}"))
}

/// Every 50 ms: commit a new version of the probe row, then poll Redis until
/// the refreshed value carries it.
fn probe(
    url: &str,
    redis: &Redis,
    prefix: &str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<LagHistogram> {
    let (url, redis_url, key) = (
        url.to_owned(),
        redis.url(),
        format!("{prefix}order:{PROBE_ID}:version"),
    );
    tokio::spawn(async move {
        let client = connect(&url).await;
        let redis = redis::Client::open(redis_url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        commit_every_50ms(&client, PROBE_ID, &stop, |version, committed| {
            let (mut redis, key) = (redis.clone(), &key);
            async move {
                let expected = format!(r#"{{"version":{version}}}"#);
                loop {
                    let value: Option<String> = redis::cmd("GET")
                        .arg(key)
                        .query_async(&mut redis)
                        .await
                        .unwrap();
                    if value.as_deref() == Some(expected.as_str()) {
                        return true;
                    }
                    if committed.elapsed() > Duration::from_secs(10) {
                        return false;
                    }
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
            }
        })
        .await
    })
}

/// Until `stop`, every 50 ms: commits a new version of row `id`, then
/// records how long `seen(version, committed)` took from the commit's
/// return (unless it gave up and said false).
async fn commit_every_50ms<F>(
    client: &tokio_postgres::Client,
    id: i64,
    stop: &AtomicBool,
    mut seen: impl FnMut(i64, Instant) -> F,
) -> LagHistogram
where
    F: std::future::Future<Output = bool>,
{
    let mut histogram = LagHistogram::default();
    let mut version: i64 = 0;
    while !stop.load(Ordering::Relaxed) {
        version += 1;
        client
            .execute(
                "update orders set version = $1 where id = $2",
                &[&version, &id],
            )
            .await
            .unwrap();
        let committed = Instant::now();
        if seen(version, committed).await {
            histogram.record(committed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    histogram
}

/// Every 50 ms: commit, read the commit position, `wait_applied` through a
/// cache with L1; the time from the commit's return to `wait_applied`'s.
fn read_your_writes(
    url: &str,
    redis: &Redis,
    config: &Config,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<LagHistogram> {
    let url = url.to_owned();
    let cache = evictd_client::Cache::builder(redis.url())
        .prefix(config.redis.prefix.clone())
        .slot(config.postgres.slot.clone())
        .l1_entries(1_000)
        .l1_channel(config.redis.l1_channel.clone());
    tokio::spawn(async move {
        let client = connect(&url).await;
        let cache = cache.build().await.expect("a cache");
        commit_every_50ms(&client, RYW_ID, &stop, |_, _| {
            let (client, cache) = (&client, &cache);
            async move {
                let position = evictd_client::commit_position(client).await.unwrap();
                // A timeout counts as the 10 s it took.
                let _ = cache.wait_applied(position, Duration::from_secs(10)).await;
                true
            }
        })
        .await
    })
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    // Commits wait for the WAL flush, as an application's would.
    client
        .batch_execute("set synchronous_commit = on")
        .await
        .unwrap();
    client
}

fn peak_rss_kib() -> u64 {
    evictd::testkit::peak_rss_kib(std::process::id()).unwrap_or(0)
}
