//! `evictd report` against a workload with known rates: a paced writer of
//! one table, a reader (by primary key) of another that is rarely written,
//! evictd streaming. The rates it prints are within 10% of the workload's,
//! and with `pg_stat_statements` it names the read, with a mapping that
//! `evictd check` accepts; without it, it says so and prints the rest.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::{evictd, mapping_dir, stack, stderr, stdout, Streaming, TestDb};

const SCHEMA: &str = "
    create extension pg_stat_statements;
    create table items (id bigint primary key, name text not null, price numeric not null);
    create table events (id bigserial primary key, kind text not null);
    create publication evictd for table items, events;
    insert into items select g, 'item ' || g, g from generate_series(1, 200) g;
";

const MAPPING: &str = r#"[[table]]
name = "events"
keys = ["event:{id}"]

[[table]]
name = "items"
keys = ["item:{id}"]
"#;

/// Inserts paced at this many per second.
const WRITES_PER_SECOND: u64 = 40;

fn config_file(dir: &std::path::Path, url: &str, config: &evictd::config::Config) -> String {
    let path = dir.join("evictd.toml");
    std::fs::write(
        &path,
        format!(
            "[postgres]\nurl = \"{url}\"\nslot = \"{}\"\n[redis]\nurl = \"{}\"\nprefix = \"{}\"\nl1_channel = \"{}\"\n[mappings]\ndir = \"{}\"\n",
            config.postgres.slot,
            stack().redis.url(),
            config.redis.prefix,
            config.redis.l1_channel,
            config.mappings.dir.display()
        ),
    )
    .unwrap();
    path.display().to_string()
}

fn within(measured: f64, expected: f64, share: f64) -> bool {
    (measured - expected).abs() <= expected * share
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_measures_the_workload_and_names_a_read_worth_caching() {
    use evictd::config::{Config, SecretUrl};
    let postgres = tokio::task::spawn_blocking(|| {
        evictd::testkit::Postgres::start_with_settings(&[
            "shared_preload_libraries=pg_stat_statements",
        ])
    })
    .await
    .unwrap()
    .expect("postgres with pg_stat_statements");
    let database = postgres.create_database().await.expect("database");
    postgres.execute(&database, SCHEMA).await.expect("schema");
    let url = postgres.url(&database);
    let probe = TestDb::new().await;
    let mappings = mapping_dir(&[("shop.toml", MAPPING)]);
    let mut config = Config::with_defaults(
        SecretUrl::parse(&url).unwrap(),
        SecretUrl::parse(&stack().redis.url()).unwrap(),
        mappings.path().to_path_buf(),
    );
    config.redis.prefix = probe.prefix.clone();
    config.redis.l1_channel = format!("{}l1", probe.prefix);
    let running = evictd::testkit::Evictd::start(&config)
        .await
        .expect("evictd");

    // The workload: paced inserts of events (each flushing its statistics
    // at once), reads of items by primary key, an item update a second.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let connect = || async {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(connection);
        client
    };
    let writer = {
        let (stop, written, client) = (stop.clone(), written.clone(), connect().await);
        tokio::spawn(async move {
            let mut pace =
                tokio::time::interval(Duration::from_micros(1_000_000 / WRITES_PER_SECOND));
            let started = Instant::now();
            let mut updates = 0;
            while !stop.load(Ordering::Relaxed) {
                pace.tick().await;
                client
                    .batch_execute("insert into events (kind) values ('click'); select pg_stat_force_next_flush()")
                    .await
                    .unwrap();
                written.fetch_add(1, Ordering::Relaxed);
                if started.elapsed().as_secs() >= updates {
                    updates += 1;
                    client
                        .batch_execute("update items set price = price + 1 where id = 1; select pg_stat_force_next_flush()")
                        .await
                        .unwrap();
                }
            }
            started.elapsed()
        })
    };
    let reader = {
        let (stop, client) = (stop.clone(), connect().await);
        tokio::spawn(async move {
            let mut id = 0i64;
            while !stop.load(Ordering::Relaxed) {
                id = id % 200 + 1;
                client
                    .query_one("select name from items where id = $1", &[&id])
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    // A cache over items publishing its counters: 20 keys read over and
    // over, so nearly every read is a Redis hit.
    let cached = {
        let (stop, client) = (stop.clone(), connect().await);
        let cache = evictd_client::Cache::builder(stack().redis.url())
            .prefix(config.redis.prefix.clone())
            .publish_counters("items", Duration::from_millis(200))
            .build()
            .await
            .expect("a cache");
        tokio::spawn(async move {
            let mut id = 0i64;
            while !stop.load(Ordering::Relaxed) {
                id = id % 20 + 1;
                let _: Option<String> = cache
                    .get_or_load(&format!("item:{id}"), &[], || async {
                        let row = client
                            .query_one("select name from items where id = $1", &[&id])
                            .await?;
                        Ok::<_, tokio_postgres::Error>(Some(row.get::<_, String>(0)))
                    })
                    .await
                    .expect("get_or_load");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let file = config_file(dir.path(), &url, &config);
    let output = {
        let file = file.clone();
        tokio::task::spawn_blocking(move || {
            evictd(&[
                "report", "--config", &file, "--window", "4s", "--format", "json",
            ])
        })
        .await
        .unwrap()
    };
    stop.store(true, Ordering::Relaxed);
    let elapsed = writer.await.unwrap();
    reader.await.unwrap();
    cached.await.unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    #[allow(clippy::cast_precision_loss)]
    let rate = written.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64();
    assert!(
        within(rate, WRITES_PER_SECOND as f64, 0.05),
        "the writer kept {rate}/s"
    );

    let table = |name: &str| {
        report["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["table"] == name)
            .unwrap_or_else(|| panic!("{name} in {report}"))
            .clone()
    };
    let events = table("public.events");
    let writes = events["writes_per_second"].as_f64().unwrap();
    assert!(
        within(writes, rate, 0.1),
        "events: {writes}/s written, the workload {rate}/s: {report}"
    );
    let exact = events["invalidations_per_second"]["exact"]
        .as_f64()
        .unwrap();
    assert!(
        within(exact, rate, 0.1),
        "events: {exact} keys/s, the workload {rate}/s: {report}"
    );
    assert!(
        within(events["keys_per_change"].as_f64().unwrap(), 1.0, 0.1),
        "{report}"
    );
    assert_eq!(events["broad_share"].as_f64(), Some(0.0), "{report}");
    let items = table("public.items");
    assert!(
        within(items["writes_per_second"].as_f64().unwrap(), 1.0, 0.5),
        "{report}"
    );
    let family = report["families"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["template"] == "event:{id}")
        .expect("the event family")
        .clone();
    let per_second = family["invalidations_per_second"].as_f64().unwrap();
    assert!(
        within(per_second, rate, 0.15),
        "event:{{id}}: {per_second}/s: {report}"
    );

    // The hit rates the cache published.
    let rate = report["hit_rates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["cache"] == "items")
        .unwrap_or_else(|| panic!("the items cache in {report}"))
        .clone();
    assert_eq!(rate["instances"], 1, "{rate}");
    assert!(rate["reads_per_second"].as_f64().unwrap() > 20.0, "{rate}");
    assert!(rate["l2_hit_rate"].as_f64().unwrap() > 0.8, "{rate}");
    assert_eq!(rate["l1_hit_rate"].as_f64(), Some(0.0), "{rate}");

    // The read by primary key of a table written once a second.
    let opportunity = report["opportunities"]
        .as_array()
        .expect("opportunities")
        .iter()
        .find(|o| o["query"] == "select name from items where id = $1")
        .unwrap_or_else(|| panic!("the items read in {report}"))
        .clone();
    let mapping = opportunity["mapping"].as_str().unwrap();
    assert_eq!(
        mapping,
        "[[table]]\nname = \"public.items\"\nkeys = [\"items:{id}\"]\nchanged = [\"name\"]\n"
    );
    assert!(
        opportunity["calls_per_second"].as_f64().unwrap() > 50.0,
        "{opportunity}"
    );
    let suggested = mapping_dir(&[("items.toml", mapping)]);
    let check = evictd(&[
        "check",
        "--mappings",
        suggested.path().to_str().unwrap(),
        "--database-url",
        &url,
    ]);
    assert_eq!(
        check.status.code(),
        Some(0),
        "{}{}",
        stdout(&check),
        stderr(&check)
    );

    // Markdown and HTML say the same.
    let text = evictd(&["report", "--config", &file, "--window", "1s"]);
    let text = stdout(&text);
    assert!(
        text.contains("## Tables\n") && text.contains("| public.events |"),
        "{text}"
    );
    assert!(text.contains("## Caching opportunities"), "{text}");
    let page = stdout(&evictd(&[
        "report", "--config", &file, "--window", "1s", "--format", "html",
    ]));
    assert!(
        page.starts_with("<!doctype html>") && page.contains("<td>public.events</td>"),
        "{page}"
    );
    running.stop().await.expect("stop");
}

// Multi-threaded: evictd (on this runtime) goes on while the test blocks
// on the `evictd report` process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pg_stat_statements_the_report_says_so_and_prints_the_rest() {
    let s = Streaming::start(
        "create table items (id bigint primary key, name text not null);
         create publication evictd for table items;",
        &[(
            "items.toml",
            "[[table]]\nname = \"items\"\nkeys = [\"item:{id}\"]\n",
        )],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = config_file(dir.path(), &s.db.url, &s.config);
    let output = evictd(&["report", "--config", &file, "--window", "1s"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(
        text.contains("| public.items | 0.00 | 0 / 0 / 0 |"),
        "{text}"
    );
    assert!(text.contains("`item:{id}`"), "{text}");
    assert!(
        text.contains("- pg_stat_statements is not installed in this database"),
        "{text}"
    );
    assert!(!text.contains("## Caching opportunities"), "{text}");
    assert!(
        text.contains("- no client publishes its counters"),
        "{text}"
    );
    let bad = evictd(&["report", "--config", &file, "--window", "soon"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr(&bad).contains("--window: `soon` is not a duration"),
        "{}",
        stderr(&bad)
    );
}
