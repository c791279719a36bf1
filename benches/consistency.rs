//! B7, measured consistency: how exact the caches are under a mixed
//! workload, with the client's fenced fills and, as the baseline, with
//! plain cache-aside readers.
//!
//! Each pass, for `SECONDS`: pgbench commits TPC-B transactions (the
//! built-in script's statements, over a hot set of `HOT` accounts so that
//! readers and writers meet), a shop writer updates orders and users of the
//! demo schema, and readers in two "application servers" read accounts and
//! orders through their cache. evictd streams with the consistency checker
//! sampling every deleted and refreshed key (`[audit] sample = 1.0`). A
//! probe commits a change to an account it has just read every 100 ms and
//! times how long until no cache holds the old value: Redis (L2) and the
//! reading server's in-process tier (L1) separately. Then the writers stop,
//! evictd catches up, the checks finish, and every cached entry is compared
//! with its row: the readers' keys by this bench, the write-through
//! refreshes by `evictd audit`'s sweep.
//!
//! - `fenced`: `evictd_client::Cache` with L1 and `record_fills(true)`;
//! - `plain`: `GET`; on a miss load and `SET` (the cache-aside most
//!   applications run), no L1.
//!
//! Loading a value takes `LOAD_DELAY` beyond the query (an application
//! rendering what it read), the same in both passes.
//!
//! With `EVICTD_BENCH_REPLICA_MS=100`, the readers read from a physical
//! standby of the database that applies each commit that many ms late,
//! named in `[[postgres.replica]]`; the writers, the probe and the
//! comparison after quiesce use the primary. `EVICTD_BENCH_SECONDS` sets
//! how long each pass runs (default 20), `EVICTD_BENCH_PASSES=fenced` runs
//! the fenced pass alone (for a long run).
//!
//! Run: `cargo bench --bench consistency` (a table, then one JSON line).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use evictd::config::{Config, SecretUrl};
use evictd::lag::LagHistogram;
use evictd::testkit::{Evictd, Postgres, Redis};
use evictd_client::protocol::Stored;
use evictd_client::Cache;
use rand::Rng as _;

/// How long each pass runs (`EVICTD_BENCH_SECONDS`, default 20).
fn seconds() -> u64 {
    std::env::var("EVICTD_BENCH_SECONDS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(20)
}
/// Accounts the TPC-B transactions and the readers pick from.
const HOT: i64 = 200;
/// The account the probe changes: read by no other reader.
const PROBE: i64 = HOT + 1;
const ORDERS: i64 = 1_000;
const USERS: i64 = 100;
const PGBENCH_RATE: u32 = 300;
const SHOP_RATE: u32 = 50;
/// Reader tasks per application server; two servers.
const READERS: usize = 4;
const LOAD_DELAY: Duration = Duration::from_millis(20);
const CHECK_DELAY_MS: u64 = 1_000;

const PGBENCH_MAPPING: &str = r#"
[[table]]
name = "pgbench_accounts"
keys = ["account:{aid}"]

[[table.refresh]]
key = "account:{aid}:balance"
columns = ["aid", "abalance"]

[[table]]
name = "pgbench_tellers"
keys = ["teller:{tid}"]

[[table]]
name = "pgbench_branches"
keys = ["branch:{bid}"]
"#;

/// The TPC-B transaction of pgbench's built-in `tpcb-like`, over `HOT`
/// accounts.
fn tpcb_script() -> String {
    format!(
        "\\set aid random(1, {HOT})
\\set bid random(1, 1)
\\set tid random(1, 10)
\\set delta random(-5000, 5000)
begin;
update pgbench_accounts set abalance = abalance + :delta where aid = :aid;
select abalance from pgbench_accounts where aid = :aid;
update pgbench_tellers set tbalance = tbalance + :delta where tid = :tid;
update pgbench_branches set bbalance = bbalance + :delta where bid = :bid;
insert into pgbench_history (tid, bid, aid, delta, mtime) values (:tid, :bid, :aid, :delta, current_timestamp);
end;
"
    )
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Readers {
    Fenced,
    Plain,
}

impl Readers {
    fn name(self) -> &'static str {
        match self {
            Readers::Fenced => "fenced",
            Readers::Plain => "plain",
        }
    }
}

struct Pass {
    readers: Readers,
    tps: f64,
    reads: u64,
    checks: serde_json::Value,
    l2: LagHistogram,
    l1: LagHistogram,
    /// Cached entries compared after quiesce, and the stale ones.
    compared: u64,
    stale_after: u64,
    refreshes_compared: u64,
    refreshes_stale: u64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut postgres = tokio::task::spawn_blocking(Postgres::start)
        .await
        .unwrap()
        .expect("start postgres");
    let redis = Redis::start().expect("start redis");
    let replica = match std::env::var("EVICTD_BENCH_REPLICA_MS") {
        Ok(ms) => {
            let delay = Duration::from_millis(ms.parse().expect("EVICTD_BENCH_REPLICA_MS: ms"));
            let primary = &mut postgres;
            let standby =
                std::thread::scope(|scope| scope.spawn(|| primary.standby(delay)).join().unwrap());
            Some(standby.expect("start the standby"))
        }
        Err(_) => None,
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("load average before: {}", load.trim());
    let mut passes = vec![pass(&postgres, replica.as_ref(), &redis, Readers::Fenced).await];
    if std::env::var("EVICTD_BENCH_PASSES").as_deref() != Ok("fenced") {
        passes.push(pass(&postgres, replica.as_ref(), &redis, Readers::Plain).await);
    }
    report(&passes);
}

fn report(passes: &[Pass]) {
    let ms = |h: &LagHistogram, q: f64| h.quantile(q).as_secs_f64() * 1000.0;
    let window = |h: &LagHistogram| {
        if h.count() == 0 {
            "-".to_owned()
        } else {
            format!(
                "{:.2} / {:.2} / {:.2}",
                ms(h, 0.5),
                ms(h, 0.99),
                h.max().as_secs_f64() * 1000.0
            )
        }
    };
    println!(
        "\n{:<7} {:>6} {:>8} {:>30} {:>10} {:>22} {:>22} {:>16} {:>16}",
        "readers",
        "tps",
        "reads",
        "checks (consistent/stale/unv.)",
        "nines",
        "L2 window p50/p99/max",
        "L1 window p50/p99/max",
        "stale after/keys",
        "refresh stale"
    );
    let mut json = Vec::new();
    for pass in passes {
        let c = &pass.checks;
        println!(
            "{:<7} {:>6.0} {:>8} {:>30} {:>10} {:>22} {:>22} {:>16} {:>16}",
            pass.readers.name(),
            pass.tps,
            pass.reads,
            format!(
                "{} ({}/{}/{})",
                c["checks"], c["consistent"], c["stale"], c["unverifiable"]
            ),
            c["nines"].as_str().unwrap_or("-"),
            window(&pass.l2),
            window(&pass.l1),
            format!("{}/{}", pass.stale_after, pass.compared),
            format!("{}/{}", pass.refreshes_stale, pass.refreshes_compared),
        );
        let quantiles = |h: &LagHistogram| serde_json::json!({"p50": ms(h, 0.5), "p99": ms(h, 0.99), "max": h.max().as_secs_f64() * 1000.0, "samples": h.count()});
        json.push(serde_json::json!({
            "readers": pass.readers.name(),
            "tpcb_tps": pass.tps,
            "reads": pass.reads,
            "checks": pass.checks,
            "staleness_window_l2_ms": quantiles(&pass.l2),
            "staleness_window_l1_ms": quantiles(&pass.l1),
            "after_quiesce": {"compared": pass.compared, "stale": pass.stale_after},
            "refreshes_after_quiesce": {"compared": pass.refreshes_compared, "stale": pass.refreshes_stale},
        }));
    }
    println!("{}", serde_json::Value::Array(json));
}

async fn pass(
    postgres: &Postgres,
    replica: Option<&Postgres>,
    redis: &Redis,
    readers: Readers,
) -> Pass {
    let database = postgres.create_database().await.unwrap();
    let url = postgres.url(&database);
    // Where the readers read.
    let read_url = replica.map_or_else(|| url.clone(), |replica| replica.url(&database));
    let pgbench = postgres.bin_dir().join("pgbench");
    let init = tokio::process::Command::new(&pgbench)
        .args(["--initialize", "--scale", "1", "--quiet"])
        .arg(&url)
        .output()
        .await
        .expect("pgbench --initialize");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let admin = connect(&url).await;
    let shop = std::fs::read_to_string("migrations/0001_shop.sql").expect("the shop schema");
    admin.batch_execute(&shop).await.unwrap();
    admin
        .batch_execute(&format!(
            "insert into users (email, name) select 'u' || g || '@example.com', 'user ' || g from generate_series(1, {USERS}) g;
             insert into orders (user_id, status, total) select 1 + g % {USERS}, 'new', g from generate_series(1, {ORDERS}) g;
             alter publication evictd add table pgbench_accounts, pgbench_tellers, pgbench_branches;"
        ))
        .await
        .unwrap();
    let mappings = tempfile::tempdir().unwrap();
    for name in ["orders.toml", "users.toml", "catalog.toml"] {
        std::fs::copy(format!("mappings/{name}"), mappings.path().join(name)).unwrap();
    }
    std::fs::write(mappings.path().join("pgbench.toml"), PGBENCH_MAPPING).unwrap();
    let mut config = Config::with_defaults(
        SecretUrl::parse(&url).unwrap(),
        SecretUrl::parse(&redis.url()).unwrap(),
        mappings.path().to_path_buf(),
    );
    config.postgres.slot = format!("{database}_audit");
    config.redis.prefix = format!("{database}:");
    config.redis.l1_channel = format!("{database}:l1");
    config.audit.enabled = true;
    config.audit.sample = 1.0;
    config.audit.delay_ms = CHECK_DELAY_MS;
    config.audit.queue = 1_000_000;
    // EVICTD_BENCH_REPLICA_NAMED=0: readers on the replica, which evictd
    // is not told about (the control).
    let named = std::env::var("EVICTD_BENCH_REPLICA_NAMED").as_deref() != Ok("0");
    if replica.is_some() && named {
        config.postgres.replicas = vec![evictd::config::ReplicaConfig {
            name: "standby".into(),
            url: SecretUrl::parse(&read_url).unwrap(),
        }];
    }
    if replica.is_some() {
        wait_replayed(&admin, &read_url).await;
    }
    let evictd = Evictd::start(&config).await.expect("start evictd");
    eprintln!(
        "{}: {} s of TPC-B at {PGBENCH_RATE}/s, shop writes at {SHOP_RATE}/s, {} readers{} ...",
        readers.name(),
        seconds(),
        2 * READERS,
        if replica.is_some() {
            " on the replica"
        } else {
            ""
        }
    );

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let servers = [
        server(redis, &config, readers).await,
        server(redis, &config, readers).await,
    ];
    let mut tasks = Vec::new();
    for server in &servers {
        for _ in 0..READERS {
            tasks.push(tokio::spawn(read_loop(
                server.clone(),
                read_url.clone(),
                stop.clone(),
                reads.clone(),
            )));
        }
    }
    let shop_writer = tokio::spawn(shop_writes(url.clone(), stop.clone()));
    let probe = tokio::spawn(probe(
        servers[0].clone(),
        url.clone(),
        redis.url(),
        config.redis.prefix.clone(),
        stop.clone(),
    ));
    let tps = run_pgbench(&pgbench, &url).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    shop_writer.await.unwrap();
    let (l2, l1) = probe.await.unwrap();

    // Quiesce: evictd applies everything, then the checks finish.
    evictd.sync().await.expect("evictd caught up");
    let checks = settled_checks(&config).await;
    let (compared, stale_after) = compare_cached(&url, redis, &config).await;
    let loaded = evictd::mapping::load_dir(mappings.path(), config.mappings.limits).unwrap();
    let sweep = evictd::internal::audit::sweep(&config, &loaded, None, None, |_| {})
        .await
        .expect("audit sweep");
    let refreshes_compared = sweep.lines.iter().map(|line| line.rows).sum();
    evictd.stop().await.expect("stop evictd");
    Pass {
        readers,
        tps,
        reads: reads.load(Ordering::Relaxed),
        checks,
        l2,
        l1,
        compared,
        stale_after,
        refreshes_compared,
        refreshes_stale: sweep.stale.len() as u64,
    }
}

/// Waits until the standby at `read_url` has replayed everything written
/// so far on the primary (`admin`): the readers start on the schema and
/// the rows.
async fn wait_replayed(admin: &tokio_postgres::Client, read_url: &str) {
    let target: String = admin
        .query_one("select pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((standby, connection)) =
            tokio_postgres::connect(read_url, tokio_postgres::NoTls).await
        {
            tokio::spawn(connection);
            let replayed: bool = standby
                .query_one(
                    "select pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                    &[&target],
                )
                .await
                .unwrap()
                .get(0);
            if replayed {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the standby never replayed {target}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One application server's cache.
#[derive(Clone)]
enum Server {
    Fenced(Cache),
    Plain {
        redis: redis::aio::MultiplexedConnection,
        prefix: String,
    },
}

async fn server(redis: &Redis, config: &Config, readers: Readers) -> Server {
    match readers {
        Readers::Fenced => {
            let cache = Cache::builder(redis.url())
                .prefix(config.redis.prefix.clone())
                .l1_entries(100_000)
                .l1_channel(config.redis.l1_channel.clone())
                .record_fills(true)
                .build()
                .await
                .expect("a cache");
            let deadline = Instant::now() + Duration::from_secs(10);
            while !cache.l1_live() {
                assert!(Instant::now() < deadline, "L1 never went live");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Server::Fenced(cache)
        }
        Readers::Plain => Server::Plain {
            redis: redis::Client::open(redis.url())
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap(),
            prefix: config.redis.prefix.clone(),
        },
    }
}

impl Server {
    /// Reads `key` through the cache, loading it with `load` on a miss.
    async fn read<F, Fut>(&self, key: &str, load: F) -> Option<serde_json::Value>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Option<serde_json::Value>>,
    {
        match self {
            Server::Fenced(cache) => cache
                .get_or_load(key, &[], || async { Ok::<_, Infallible>(load().await) })
                .await
                .expect("get_or_load"),
            Server::Plain { redis, prefix } => {
                let mut redis = redis.clone();
                let full = format!("{prefix}{key}");
                let held: Option<String> = redis::cmd("GET")
                    .arg(&full)
                    .query_async(&mut redis)
                    .await
                    .unwrap();
                if let Some(held) = held {
                    return serde_json::from_str(&held).ok();
                }
                let value = load().await?;
                redis::cmd("SET")
                    .arg(&full)
                    .arg(value.to_string())
                    .query_async::<()>(&mut redis)
                    .await
                    .unwrap();
                Some(value)
            }
        }
    }
}

async fn account(db: &tokio_postgres::Client, aid: i64) -> Option<serde_json::Value> {
    let row = db
        .query_opt(
            "select abalance::int8 from pgbench_accounts where aid = $1::int8",
            &[&aid],
        )
        .await
        .unwrap()?;
    tokio::time::sleep(LOAD_DELAY).await;
    Some(serde_json::json!(row.get::<_, i64>(0)))
}

async fn order(db: &tokio_postgres::Client, id: i64) -> Option<serde_json::Value> {
    let row = db
        .query_opt(
            "select status, total::text from orders where id = $1",
            &[&id],
        )
        .await
        .unwrap()?;
    tokio::time::sleep(LOAD_DELAY).await;
    Some(serde_json::json!({"status": row.get::<_, String>(0), "total": row.get::<_, String>(1)}))
}

async fn read_loop(server: Server, url: String, stop: Arc<AtomicBool>, reads: Arc<AtomicU64>) {
    let db = connect(&url).await;
    while !stop.load(Ordering::Relaxed) {
        let (is_account, id) = {
            let mut rng = rand::rng();
            if rng.random_bool(0.7) {
                (true, rng.random_range(1..=HOT))
            } else {
                (false, rng.random_range(1..=ORDERS))
            }
        };
        if is_account {
            server
                .read(&format!("account:{id}"), || account(&db, id))
                .await;
        } else {
            server.read(&format!("order:{id}"), || order(&db, id)).await;
        }
        reads.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Shop writes at `SHOP_RATE`/s: an order's status and total, or a user's
/// name.
async fn shop_writes(url: String, stop: Arc<AtomicBool>) {
    let db = connect(&url).await;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / SHOP_RATE);
    let statuses = ["new", "paid", "shipped", "delivered"];
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let (order, status, user) = {
            let mut rng = rand::rng();
            (
                rng.random_range(1..=ORDERS),
                statuses[rng.random_range(0..statuses.len())],
                rng.random_range(1..=USERS),
            )
        };
        db.execute(
            "update orders set status = $1, total = total + 1 where id = $2",
            &[&status, &order],
        )
        .await
        .unwrap();
        if order % 4 == 0 {
            db.execute(
                "update users set name = 'user ' || $1::text || ' ' || now()::text where id = $2",
                &[&order.to_string(), &user],
            )
            .await
            .unwrap();
        }
    }
}

/// Every 100 ms: read the probe account through `server` (so both tiers
/// hold it), commit a change to it, and time from the commit's return until
/// Redis no longer holds the old value (L2), and until `server`'s L1 no
/// longer does (L1; fenced readers only).
async fn probe(
    server: Server,
    url: String,
    redis_url: String,
    prefix: String,
    stop: Arc<AtomicBool>,
) -> (LagHistogram, LagHistogram) {
    let db = connect(&url).await;
    let mut redis = redis::Client::open(redis_url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let (mut l2, mut l1) = (LagHistogram::default(), LagHistogram::default());
    let key = format!("account:{PROBE}");
    let full = format!("{prefix}{key}");
    while !stop.load(Ordering::Relaxed) {
        let Some(old) = server.read(&key, || account(&db, PROBE)).await else {
            panic!("the probe account exists");
        };
        db.execute(
            "update pgbench_accounts set abalance = abalance + 1 where aid = $1::int8",
            &[&PROBE],
        )
        .await
        .unwrap();
        let committed = Instant::now();
        let (mut l2_done, mut l1_done) = (false, !matches!(server, Server::Fenced(_)));
        while !(l2_done && l1_done) && committed.elapsed() < Duration::from_secs(10) {
            if !l2_done {
                let held: Option<String> = redis::cmd("GET")
                    .arg(&full)
                    .query_async(&mut redis)
                    .await
                    .unwrap();
                let held = held.and_then(|raw| match Stored::parse(&raw) {
                    Stored::Value(value) | Stored::Reloading(value) => {
                        serde_json::from_str::<serde_json::Value>(value).ok()
                    }
                    Stored::Loading => None,
                });
                if held.as_ref() != Some(&old) {
                    l2.record(committed.elapsed());
                    l2_done = true;
                }
            }
            if !l1_done {
                if let Server::Fenced(cache) = &server {
                    if cache.l1_peek::<serde_json::Value>(&key) != Some(Some(old.clone())) {
                        l1.record(committed.elapsed());
                        l1_done = true;
                    }
                }
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (l2, l1)
}

async fn run_pgbench(pgbench: &std::path::Path, url: &str) -> f64 {
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(script.path(), tpcb_script()).unwrap();
    let output = tokio::process::Command::new(pgbench)
        .args(["--no-vacuum", "--protocol", "prepared"])
        .args(["--client", "2", "--jobs", "2"])
        .args(["--rate", &PGBENCH_RATE.to_string()])
        .args(["--time", &seconds().to_string(), "--file"])
        .arg(script.path())
        .arg(url)
        .env("PGOPTIONS", "-c synchronous_commit=on")
        .output()
        .await
        .expect("run pgbench");
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
        .unwrap_or(0.0)
}

/// `evictd status`'s consistency once the checks stop coming.
async fn settled_checks(config: &Config) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    loop {
        tokio::time::sleep(Duration::from_millis(CHECK_DELAY_MS * 2)).await;
        let report = evictd::internal::operator::status(config)
            .await
            .expect("status");
        let now = report.to_json()["consistency"].clone();
        if now == last {
            return now;
        }
        last = now;
    }
}

/// Every account and order key a reader may have cached, compared with its
/// row: (entries cached, stale ones).
async fn compare_cached(url: &str, redis: &Redis, config: &Config) -> (u64, u64) {
    let db = connect(url).await;
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut keys: Vec<(String, serde_json::Value)> = Vec::new();
    for row in db
        .query(
            &format!("select aid::int8, abalance::int8 from pgbench_accounts where aid <= {PROBE}"),
            &[],
        )
        .await
        .unwrap()
    {
        keys.push((
            format!("account:{}", row.get::<_, i64>(0)),
            serde_json::json!(row.get::<_, i64>(1)),
        ));
    }
    for row in db
        .query("select id, status, total::text from orders", &[])
        .await
        .unwrap()
    {
        keys.push((
            format!("order:{}", row.get::<_, i64>(0)),
            serde_json::json!({"status": row.get::<_, String>(1), "total": row.get::<_, String>(2)}),
        ));
    }
    let (mut compared, mut stale) = (0, 0);
    for (key, expected) in keys {
        let held: Option<String> = redis::cmd("GET")
            .arg(format!("{}{key}", config.redis.prefix))
            .query_async(&mut conn)
            .await
            .unwrap();
        let Some(held) = held else { continue };
        let value = match Stored::parse(&held) {
            Stored::Value(value) | Stored::Reloading(value) => value,
            Stored::Loading => continue,
        };
        compared += 1;
        if serde_json::from_str::<serde_json::Value>(value).ok() != Some(expected) {
            stale += 1;
        }
    }
    (compared, stale)
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute("set synchronous_commit = on")
        .await
        .unwrap();
    client
}
