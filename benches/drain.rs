//! Backlog drain: evictd against `pg_recvlogical` on the same WAL, in one
//! run on one machine.
//!
//! For each scenario a throwaway Postgres gets two fresh pgoutput slots on
//! the same publication; the workload is written while nobody reads them;
//! then `pg_recvlogical` drains one slot to /dev/null (decoding only, the
//! physical limit of one walsender) and evictd drains the other into a
//! throwaway Redis (decode, map, plan, apply, broadcast, acknowledge).
//!
//! - small:  100k single-row update transactions (B1)
//! - big:    one 1M-row update transaction, streamed by the server (B2)
//! - fanout: 100k single-row updates of a table mapped to 10 keys and 2 tags
//!   per row (B4): Redis commands/s against `redis-benchmark` pipelining
//!   UNLINK on the same server (B0 for Redis).
//! - fanout_when: the same with a `when` condition on the entry and on
//!   every key, each matching, and a transform on every placeholder
//!   (`|trim`, `|lower`: the same keys as `fanout`): the evaluator's cost
//!   of conditions and transforms, against `fanout` in the same run.
//!
//! Fencing (docs/PROTOCOL.md) adds no command to these drains: a fill's
//! lease lives in the cache key, so evictd's deletes void it as they are.
//! The apply mark (warming's one-pass check) adds one `SET` per batch.
//!
//! Each round drains with evictd twice, with the visibility gate
//! (`postgres.visibility_gate`, the default) and without, in alternating
//! order: the gate's cost, against a baseline of the same run.
//!
//! With `EVICTD_BENCH_CONSOLE=50`, the second drain of each round is not
//! the ungated one but the gated drain with 50 subscribers of the console's
//! live stream attached (`admin.console`), each reading every event: the
//! console's cost to the drain, against the same drain without them.
//!
//! Run: `cargo bench --bench drain` (prints tables, then one JSON line);
//! `EVICTD_BENCH=small,fanout` runs only those scenarios.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use evictd::change::Lsn;
use evictd::config::{Config, SecretUrl};
use evictd::mapping;
use evictd::pipeline::{self, Options};
use evictd::testkit::{current_wal_lsn, walsender_pid, Postgres, Redis};

struct Scenario {
    name: &'static str,
    changes: u64,
    mapping: &'static str,
    setup: String,
    workload: String,
}

/// One scenario's rounds: each round drains the same WAL once with
/// `pg_recvlogical` and once with evictd, one after the other, so that the
/// two rates of a round saw the same machine.
struct Measured {
    name: &'static str,
    changes: u64,
    rounds: Vec<Round>,
    evictd_peak_rss_kib: u64,
}

struct Round {
    recvlogical: Duration,
    evictd: Duration,
    /// The same drain with `postgres.visibility_gate` off, right before or
    /// after (alternating by round): the gate's cost.
    ungated: Duration,
    /// Redis commands evictd sent in its drain.
    commands: u64,
    /// `redis-benchmark` UNLINK/s, the faster of a run right before and
    /// one right after evictd's drain (fan-out only).
    unlink_baseline: Option<f64>,
}

impl Round {
    fn ratio(&self) -> f64 {
        self.recvlogical.as_secs_f64() / self.evictd.as_secs_f64()
    }

    fn commands_per_second(&self) -> f64 {
        self.commands as f64 / self.evictd.as_secs_f64()
    }
}

/// The median of `values` (the upper one of an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "small",
            changes: 100_000,
            mapping: MAPPING,
            setup: orders_table(100_000),
            workload: single_row_transactions(100_000),
        },
        Scenario {
            name: "big",
            changes: 1_000_000,
            mapping: MAPPING,
            setup: orders_table(1_000_000),
            workload: "update orders set status = 'paid';".into(),
        },
        Scenario {
            name: "fanout",
            changes: 100_000,
            mapping: FANOUT,
            setup: orders_table(100_000),
            workload: single_row_transactions(100_000),
        },
        Scenario {
            name: "fanout_when",
            changes: 100_000,
            mapping: FANOUT_WHEN,
            setup: orders_table(100_000),
            workload: single_row_transactions(100_000),
        },
    ]
}

/// The `orders` table with `rows` rows, REPLICA IDENTITY FULL.
fn orders_table(rows: u64) -> String {
    format!(
        "create table orders (id bigint primary key, user_id bigint not null, status text not null);
         alter table orders replica identity full;
         insert into orders select g, g % 1000, 'new' from generate_series(1, {rows}) g;"
    )
}

/// `rows` transactions, each updating one row.
fn single_row_transactions(rows: u64) -> String {
    format!(
        "do $$ begin for i in 1..{rows} loop
           update orders set status = 'paid' where id = i; commit;
         end loop; end $$;"
    )
}

/// 10 keys and 2 tags per row (B4).
const FANOUT: &str = r#"
[[table]]
name = "orders"
keys = ["order:{id}", "order:{id}:a", "order:{id}:b", "order:{id}:c", "order:{id}:d",
        "order:{id}:e", "order:{id}:f", "order:{id}:g", "user:{user_id}:orders", "status:{status}:{id}"]
tags = ["user:{user_id}", "order:{id}"]
"#;

/// The pure core alone (map + plan of 100k single-row updates), FANOUT
/// against FANOUT_WHEN alternated over five rounds: what conditions cost
/// the evaluator, without the noise of Postgres and Redis.
fn evaluator_with_conditions() {
    use evictd::change::{Datum, Op, Row, RowChange, TableName};
    let table = Arc::new(TableName::new("public", "orders"));
    let names: Arc<[Arc<str>]> = ["id", "user_id", "status"].map(Arc::from).into();
    let row = |id: u64, status: &str| {
        Row::new(
            names.clone(),
            vec![
                Datum::Number(id.to_string().into()),
                Datum::Number((id % 1000).to_string().into()),
                Datum::text(status),
            ],
        )
    };
    let changes: Vec<RowChange> = (1..=100_000)
        .map(|id| RowChange {
            table: table.clone(),
            op: Op::Update,
            old: Some(row(id, "new")),
            new: Some(row(id, "paid")),
        })
        .collect();
    let load = |text: &str| {
        mapping::load_str("orders.toml", text, mapping::Limits::default()).expect("loads")
    };
    let (plain, when) = (load(FANOUT), load(FANOUT_WHEN));
    let time = |mappings: &mapping::Mappings| {
        let started = Instant::now();
        for chunk in changes.chunks(1000) {
            let plan = evictd::plan::plan_changes(mappings, chunk, &mut mapping::Output::default());
            std::hint::black_box(plan);
        }
        changes.len() as f64 / started.elapsed().as_secs_f64()
    };
    let mut ratios = Vec::new();
    let (mut plain_rates, mut when_rates) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let (p, w) = (time(&plain), time(&when));
        plain_rates.push(p);
        when_rates.push(w);
        ratios.push(w / p);
    }
    println!(
        "evaluator: map + plan of fan-out updates at {:.0} changes/s with a `when` on the entry and every key, {:.0} without; ratio {:.2}x (medians of 5 alternated rounds: {})",
        median(when_rates),
        median(plain_rates),
        median(ratios.clone()),
        ratios.iter().map(|r| format!("{r:.2}x")).collect::<Vec<_>>().join(" ")
    );
}

/// FANOUT with a condition on the entry and on every key, all true.
const FANOUT_WHEN: &str = r#"
[[table]]
name = "orders"
when = "status <> 'draft' and id > 0"
keys = [
    { template = "order:{id|trim}", when = "user_id >= 0" },
    { template = "order:{id|trim}:a", when = "status in ('new', 'paid')" },
    { template = "order:{id|trim}:b", when = "id is not null" },
    { template = "order:{id|trim}:c", when = "user_id < 1000000" },
    { template = "order:{id|trim}:d", when = "not status = 'draft'" },
    { template = "order:{id|trim}:e", when = "id >= 1 or status = 'x'" },
    { template = "order:{id|trim}:f", when = "user_id <> -1" },
    { template = "order:{id|trim}:g", when = "status <> 'void'" },
    { template = "user:{user_id|trim}:orders", when = "user_id >= 0" },
    { template = "status:{status|lower}:{id|trim}", when = "status is not null" },
]
tags = ["user:{user_id|trim}", "order:{id|trim}"]
"#;

const MAPPING: &str =
    "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\", \"user:{user_id}:orders\"]\n";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let postgres = tokio::task::spawn_blocking(Postgres::start)
        .await
        .unwrap()
        .expect("start postgres");
    let redis = Redis::start().expect("start redis");
    evictd::internal::telemetry::recorder();
    if std::env::var("EVICTD_BENCH")
        .map(|only| only.split(',').any(|name| name == "fanout_when"))
        .unwrap_or(true)
    {
        evaluator_with_conditions();
    }
    // EVICTD_BENCH=fanout (comma-separated names) runs only those.
    let only: Option<Vec<String>> = std::env::var("EVICTD_BENCH")
        .ok()
        .map(|names| names.split(',').map(str::to_owned).collect());
    let mut results = Vec::new();
    for scenario in scenarios() {
        if only
            .as_ref()
            .is_some_and(|only| !only.iter().any(|name| name == scenario.name))
        {
            continue;
        }
        let mappings_dir = tempfile::tempdir().unwrap();
        std::fs::write(mappings_dir.path().join("orders.toml"), scenario.mapping).unwrap();
        results.push(
            measure(
                &postgres,
                &redis,
                mappings_dir.path().to_path_buf(),
                &scenario,
            )
            .await,
        );
    }
    report(&results);
}

/// Prints the table (medians over the rounds) and one JSON line.
fn report(results: &[Measured]) {
    println!(
        "\n{:<8} {:>9} {:>7} {:>16} {:>16} {:>7} {:>10}",
        "scenario", "changes", "rounds", "recvlogical/s", "evictd/s", "ratio", "peak RSS"
    );
    let mut json = Vec::new();
    for m in results {
        let rate = |took: Duration| m.changes as f64 / took.as_secs_f64();
        let recv_rate = median(m.rounds.iter().map(|r| rate(r.recvlogical)).collect());
        let evictd_rate = median(m.rounds.iter().map(|r| rate(r.evictd)).collect());
        let ratio = median(m.rounds.iter().map(Round::ratio).collect());
        println!(
            "{:<8} {:>9} {:>7} {:>16.0} {:>16.0} {:>6.2}x {:>7} MiB",
            m.name,
            m.changes,
            m.rounds.len(),
            recv_rate,
            evictd_rate,
            ratio,
            m.evictd_peak_rss_kib / 1024
        );
        json.push(serde_json::json!({
            "scenario": m.name,
            "changes": m.changes,
            "pg_recvlogical_changes_per_second": recv_rate,
            "evictd_changes_per_second": evictd_rate,
            "ratio": ratio,
            "visibility_gate_over_none": median(m.rounds.iter().map(|r| r.ungated.as_secs_f64() / r.evictd.as_secs_f64()).collect()),
            "rounds": m.rounds.iter().map(|r| serde_json::json!({
                "pg_recvlogical_seconds": r.recvlogical.as_secs_f64(),
                "evictd_seconds": r.evictd.as_secs_f64(),
                "evictd_without_visibility_gate_seconds": r.ungated.as_secs_f64(),
                "ratio": r.ratio(),
            })).collect::<Vec<_>>(),
            "process_peak_rss_kib": m.evictd_peak_rss_kib,
        }));
    }
    let subscribers = console_subscribers();
    for m in results.iter().filter(|_| subscribers > 0) {
        // The second drain had the subscribers: its rate over the first's.
        let per_round: Vec<f64> = m
            .rounds
            .iter()
            .map(|r| r.evictd.as_secs_f64() / r.ungated.as_secs_f64())
            .collect();
        println!(
            "console: {} drains with {subscribers} live-stream subscribers at {:.2}x the rate with none (median; per round: {})",
            m.name,
            median(per_round.clone()),
            ratios(&per_round)
        );
        json.push(serde_json::json!({"scenario": m.name, "console_subscribers": subscribers, "with_subscribers_over_none": median(per_round)}));
    }
    for m in results.iter().filter(|_| subscribers == 0) {
        let per_round: Vec<f64> = m
            .rounds
            .iter()
            .map(|r| r.ungated.as_secs_f64() / r.evictd.as_secs_f64())
            .collect();
        println!(
            "visibility gate: {} drains at {:.2}x the rate without it (median; per round: {})",
            m.name,
            median(per_round.clone()),
            ratios(&per_round)
        );
    }
    let by_name = |name: &str| results.iter().find(|m| m.name == name);
    if let (Some(plain), Some(when)) = (by_name("fanout"), by_name("fanout_when")) {
        let rate = |m: &Measured| {
            median(
                m.rounds
                    .iter()
                    .map(|r| m.changes as f64 / r.evictd.as_secs_f64())
                    .collect(),
            )
        };
        let ratio = rate(when) / rate(plain);
        println!(
            "\nconditions: fan-out with a `when` on the entry and every key drains at {:.0} changes/s against {:.0} without; ratio {ratio:.2}x (medians)",
            rate(when),
            rate(plain)
        );
        json.push(serde_json::json!({"scenario": "conditions", "fanout_when_over_fanout": ratio}));
    }
    if let Some(fanout) = results.iter().find(|m| m.name == "fanout") {
        let rounds: Vec<(f64, f64)> = fanout
            .rounds
            .iter()
            .filter_map(|r| Some((r.commands_per_second(), r.unlink_baseline?)))
            .collect();
        let rate = median(rounds.iter().map(|(rate, _)| *rate).collect());
        let baseline = median(rounds.iter().map(|(_, baseline)| *baseline).collect());
        let ratio = median(
            rounds
                .iter()
                .map(|(rate, baseline)| rate / baseline)
                .collect(),
        );
        println!(
            "\nfan-out: evictd {rate:.0} Redis commands/s ({} commands for {} changes); redis-benchmark -P 64 UNLINK {baseline:.0}/s; ratio {ratio:.2}x (medians of {} rounds; per round: {})",
            fanout.rounds[0].commands,
            fanout.changes,
            rounds.len(),
            rounds
                .iter()
                .map(|(rate, baseline)| format!("{:.2}x", rate / baseline))
                .collect::<Vec<_>>()
                .join(" ")
        );
        json.push(serde_json::json!({
            "scenario": "fanout_commands",
            "evictd_redis_commands_per_second": rate,
            "redis_benchmark_unlink_per_second": baseline,
            "ratio": ratio,
            "rounds": rounds.iter().map(|(rate, baseline)| serde_json::json!({
                "evictd_redis_commands_per_second": rate,
                "redis_benchmark_unlink_per_second": baseline,
            })).collect::<Vec<_>>(),
        }));
    }
    println!("{}", serde_json::Value::Array(json));
}

/// `1.02x 0.98x ...`: each round's ratio.
fn ratios(per_round: &[f64]) -> String {
    per_round
        .iter()
        .map(|ratio| format!("{ratio:.2}x"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Live-stream subscribers of the second drain (`EVICTD_BENCH_CONSOLE`,
/// default 0: the second drain is the ungated one).
fn console_subscribers() -> usize {
    std::env::var("EVICTD_BENCH_CONSOLE")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Rounds per scenario (`EVICTD_BENCH_ROUNDS`, default 3).
fn rounds() -> usize {
    std::env::var("EVICTD_BENCH_ROUNDS")
        .ok()
        .and_then(|rounds| rounds.parse().ok())
        .filter(|rounds| *rounds > 0)
        .unwrap_or(3)
}

async fn measure(
    postgres: &Postgres,
    redis: &Redis,
    mappings_dir: PathBuf,
    scenario: &Scenario,
) -> Measured {
    let database = postgres.create_database().await.unwrap();
    let url = postgres.url(&database);
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client.batch_execute(&scenario.setup).await.unwrap();
    client
        .batch_execute("create publication evictd for table orders")
        .await
        .unwrap();
    let version: i64 = client
        .query_one("select current_setting('server_version_num')::int8", &[])
        .await
        .unwrap()
        .get(0);
    eprintln!(
        "{}: PostgreSQL {version}, pg_recvlogical {}",
        scenario.name,
        recvlogical_program(postgres).display()
    );
    let rounds = rounds();
    // Two slots per round, all created before the workload: every drain
    // reads the same WAL.
    for round in 0..rounds {
        for reader in ["recv", "evictd", "ungated"] {
            client
                .query_one(
                    &format!(
                        "select pg_create_logical_replication_slot('{database}_{reader}_{round}', 'pgoutput')"
                    ),
                    &[],
                )
                .await
                .unwrap();
        }
    }
    eprintln!(
        "{}: writing {} changes with nobody reading ...",
        scenario.name, scenario.changes
    );
    client.batch_execute(&scenario.workload).await.unwrap();
    client.batch_execute("checkpoint").await.unwrap();
    let end = current_wal_lsn(&url).await.unwrap();
    let mut config = Config::with_defaults(
        SecretUrl::parse(&url).unwrap(),
        SecretUrl::parse(&redis.url()).unwrap(),
        mappings_dir.clone(),
    );
    config.postgres.create_slot = false;
    let mappings = Arc::new(mapping::load_dir(&mappings_dir, config.mappings.limits).unwrap());
    let fanout = scenario.name == "fanout";
    let mut measured = Vec::new();
    for round in 0..rounds {
        eprintln!(
            "{}: round {}: pg_recvlogical, then evictd, draining to {end} ...",
            scenario.name,
            round + 1
        );
        let recvlogical = recvlogical(
            postgres,
            &url,
            &format!("{database}_recv_{round}"),
            end,
            version,
        );
        // The Redis baseline runs right before and right after evictd's
        // drain; the faster of the two counts (this shared VM's speed moves
        // from minute to minute, and the ratio should not flatter evictd).
        let unlink_before = fanout.then(|| redis_benchmark(redis, &["UNLINK", "key:__rand_int__"]));
        // With the visibility gate (the default) and without, in turn
        // first: the gate's cost, measured beside it.
        let mut gated = None;
        let mut ungated = None;
        for gate in if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        } {
            let mut config = config.clone();
            // Against the console, the second drain is gated too, with its
            // subscribers.
            let subscribers = if gate { 0 } else { console_subscribers() };
            config.postgres.visibility_gate = gate || subscribers > 0;
            let reader = if gate { "evictd" } else { "ungated" };
            config.postgres.slot = format!("{database}_{reader}_{round}");
            let drained = drain(
                scenario.name,
                &config,
                mappings.clone(),
                end,
                redis,
                subscribers,
            )
            .await;
            let acked = confirmed(&client, &config.postgres.slot).await;
            assert!(acked >= end, "evictd acknowledged {acked}, short of {end}");
            if gate {
                gated = Some(drained);
            } else {
                ungated = Some(drained.0);
            }
        }
        let (evictd, commands) = gated.expect("drained with the gate");
        let ungated = ungated.expect("drained without the gate");
        let unlink_baseline = unlink_before
            .map(|before| before.max(redis_benchmark(redis, &["UNLINK", "key:__rand_int__"])));
        measured.push(Round {
            recvlogical,
            evictd,
            ungated,
            commands,
            unlink_baseline,
        });
    }
    Measured {
        name: scenario.name,
        changes: scenario.changes,
        rounds: measured,
        evictd_peak_rss_kib: peak_rss_kib(),
    }
}

/// `pg_recvlogical` of the server's binaries, else (the packaged 13-18
/// binaries ship none) the machine's, which streams from any version.
fn recvlogical_program(postgres: &Postgres) -> std::path::PathBuf {
    let own = postgres.bin_dir().join("pg_recvlogical");
    if own.exists() {
        return own;
    }
    let output = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .expect("pg_config (for the machine's pg_recvlogical)");
    std::path::PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()).join("pg_recvlogical")
}

/// `pg_recvlogical` drains `slot` to /dev/null up to `end`, with the
/// pgoutput protocol evictd uses on that server `version` (2 with
/// streaming from 14, 1 before).
fn recvlogical(postgres: &Postgres, url: &str, slot: &str, end: Lsn, version: i64) -> Duration {
    let started = Instant::now();
    let protocol: &[&str] = if version >= 140_000 {
        &["-o", "proto_version=2", "-o", "streaming=on"]
    } else {
        &["-o", "proto_version=1"]
    };
    let status = Command::new(recvlogical_program(postgres))
        .args(["-d", url, "--slot", slot, "--start", "--no-loop"])
        .args(["--endpos", &end.to_string(), "-f", "/dev/null"])
        .args(protocol)
        .args(["-o", "publication_names=evictd"])
        .status()
        .expect("run pg_recvlogical");
    let took = started.elapsed();
    assert!(status.success(), "pg_recvlogical failed: {status}");
    took
}

/// evictd drains its slot up to `end`: the time it took and the Redis
/// commands it sent.
async fn drain(
    name: &str,
    config: &Config,
    mappings: Arc<mapping::Mappings>,
    end: Lsn,
    redis: &Redis,
    subscribers: usize,
) -> (Duration, u64) {
    // The end position is past the last commit (it is the WAL insert
    // position), so evictd learns it has reached it from a keepalive, which
    // it asks for with each status update: with the default 1 s interval
    // the drain time would be rounded up to whole seconds.
    let options = Options {
        until: Some(end),
        status_interval: Duration::from_millis(10),
        ..Options::default()
    };
    let metrics = std::env::var_os("EVICTD_BENCH_METRICS").is_some();
    let cpu_before = evictd::testkit::ThreadCpu::sample();
    let redis_before = evictd::testkit::process_cpu_ticks(redis.pid());
    let started = Instant::now();
    let streamed = Arc::new(AtomicU64::new(0));
    let (running, readers): (_, Vec<tokio::task::JoinHandle<()>>) = if subscribers == 0 {
        let running = pipeline::start(config, mappings, options).expect("start evictd");
        (running, Vec::new())
    } else {
        let mut config = config.clone();
        config.admin.console = true;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let service = evictd::service::Service::start(&config, mappings, options, Some(listener))
            .expect("start evictd");
        let port = service.admin.expect("the admin address").port();
        let readers = (0..subscribers)
            .map(|_| tokio::spawn(subscribe(port, streamed.clone())))
            .collect();
        (service.running, readers)
    };
    let progress = running.progress.clone();
    // The walsender exits with the drain: sample its CPU while it runs.
    let walsender = metrics.then(|| {
        let ticks = Arc::new(AtomicU64::new(0));
        let sampler = tokio::spawn(sample_walsender(config.clone(), ticks.clone()));
        (ticks, sampler)
    });
    running.wait().await.expect("evictd drained");
    let took = started.elapsed();
    if let Some((walsender_ticks, sampler)) = walsender {
        sampler.abort();
        eprintln!(
            "{name}: CPU during the drain (ticks) by evictd thread: {:?}; redis-server: {}; walsender: {}",
            evictd::testkit::ThreadCpu::sample().since(&cpu_before),
            evictd::testkit::process_cpu_ticks(redis.pid()).saturating_sub(redis_before),
            walsender_ticks.load(Ordering::Relaxed)
        );
        for line in evictd::internal::telemetry::recorder().render().lines() {
            if line.starts_with("evictd_apply_duration_seconds_sum")
                || line.starts_with("evictd_apply_duration_seconds_count")
            {
                eprintln!("{name}: {line}");
            }
        }
    }
    let commands = progress.borrow().commands;
    for reader in readers {
        reader.abort();
    }
    if subscribers > 0 {
        eprintln!(
            "{name}: {subscribers} console subscribers read {} bytes in all",
            streamed.load(Ordering::Relaxed)
        );
    }
    (took, commands)
}

/// A live-stream subscriber reading everything it is sent, counting the
/// bytes into `total` (it runs until aborted).
async fn subscribe(port: u16, total: Arc<AtomicU64>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return;
    };
    if stream
        .write_all(b"GET /ui/api/events HTTP/1.1\r\nhost: bench\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    let mut buf = vec![0_u8; 64 * 1024];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
        total.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Samples the CPU of the walsender serving `config`'s slot into `ticks`
/// every 20 ms until aborted.
async fn sample_walsender(config: Config, ticks: Arc<AtomicU64>) {
    let (client, connection) = tokio_postgres::connect(
        config.postgres.url.as_ref().unwrap().expose(),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    loop {
        if let Ok(Some(pid)) = walsender_pid(&client, &config.postgres.slot).await {
            let used = evictd::testkit::process_cpu_ticks(pid);
            if used > 0 {
                ticks.store(used, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn confirmed(client: &tokio_postgres::Client, slot: &str) -> Lsn {
    let row = client
        .query_one(
            "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    Lsn::parse(&row.get::<_, String>(0)).unwrap()
}

/// Peak RSS of this process (evictd runs in it; the servers do not).
fn peak_rss_kib() -> u64 {
    evictd::testkit::peak_rss_kib(std::process::id()).unwrap_or(0)
}

/// Requests per second `redis-benchmark` reaches for `command`, pipelined 64
/// deep over 50 connections, on the same server.
fn redis_benchmark(redis: &Redis, command: &[&str]) -> f64 {
    let output = Command::new("redis-benchmark")
        .args([
            "-p",
            &redis.port().to_string(),
            "-P",
            "64",
            "-n",
            "1000000",
            "-r",
            "1000000",
            "-q",
        ])
        .args(command)
        .output()
        .expect("run redis-benchmark (package redis-tools)");
    // Progress lines end in \r; the last line holds the result:
    // "UNLINK key:__rand_int__: 3703703.50 requests per second, p50=...".
    let text = String::from_utf8_lossy(&output.stdout).replace('\r', "\n");
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .windows(3)
        .rev()
        .find(|w| w[1] == "requests" && w[2] == "per")
        .and_then(|w| w[0].parse().ok())
        .unwrap_or_else(|| panic!("cannot read redis-benchmark output: {text}"))
}
