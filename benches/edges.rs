//! B8, the cache's edges: warming and CDN purges.
//!
//! - **Warming.** `ROWS` products with a write-through refresh each. Each
//!   round times `evictd::internal::warm::warm` (no rate cap) into an empty
//!   Redis, on a current-thread runtime as `evictd warm` runs it, and, as the baseline, a plain pipelined `SET` of the same keys
//!   and values in batches of the same size (1000) over one connection:
//!   what writing those values costs without reading the database, taking
//!   leases or fencing. Target: warming >= 0.7x the baseline's keys/s.
//!   A second baseline is a naive warmer: the same primary-key pages read
//!   from the database, rendered and `SET`, without leases or fencing. A
//!   third is the pipelined `SET` with two pages in flight at once, as
//!   warming stores them.
//! - **Purges.** evictd streams `TRANSACTIONS` transactions of `PER_TX`
//!   product updates each, every product with two surrogate keys, once
//!   with a local Varnish (the shipped VCL, xkey) as a purge target and,
//!   as the baseline, once without: the drain rate with the purges
//!   against without, and the surrogate keys purged per second.
//!
//! Rounds alternate the two sides of each pair; the medians are reported.
//! Run: `cargo bench --bench edges` (a table, then one JSON line).

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;

use evictd::config::{Config, PurgeKind, PurgeTarget, SecretUrl};
use evictd::testkit::{Evictd, Postgres, Redis, Varnish};

const ROWS: i64 = 100_000;
const ROUNDS: usize = 3;
/// Warming rounds: each takes about half a second, so more of them.
const WARM_ROUNDS: usize = 9;
/// Rows per page, as warming reads them (`evictd::internal::warm::PAGE`).
const PAGE: usize = evictd::internal::warm::PAGE;
const TRANSACTIONS: i64 = 200;
const PER_TX: i64 = 100;

const MAPPING: &str = r#"
[[table]]
name = "products"
keys = ["product:{id}"]
surrogate_keys = ["product-{id}", "category-{category_id}"]

[[table.refresh]]
key = "product:{id}:card"
columns = ["id", "name", "price"]
ttl = "1h"
"#;

/// `SET`s `values` in pipelines of a page each, `in_flight` pipelines at
/// once: keys per second.
async fn set_pages(
    conn: &redis::aio::MultiplexedConnection,
    values: &[(String, String)],
    in_flight: usize,
) -> f64 {
    let started = Instant::now();
    let mut pages = futures_util::stream::iter(values.chunks(PAGE).map(|page| {
        let mut pipe = redis::pipe();
        for (key, value) in page {
            pipe.cmd("SET")
                .arg(key)
                .arg(value)
                .arg("EX")
                .arg(3600)
                .ignore();
        }
        let mut conn = conn.clone();
        async move { pipe.query_async::<()>(&mut conn).await }
    }))
    .buffered(in_flight);
    while let Some(done) = pages.next().await {
        done.expect("SET");
    }
    #[allow(clippy::cast_precision_loss)]
    let rate = values.len() as f64 / started.elapsed().as_secs_f64();
    rate
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("load average before: {}", load.trim());
    let postgres = Postgres::start().expect("start postgres");
    let redis = Redis::start().expect("start redis");
    let database = postgres.create_database().await.expect("database");
    let url = postgres.url(&database);
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "create table products (id bigint primary key, category_id bigint not null, name text not null, price numeric(8, 2) not null);
             alter table products replica identity full;
             insert into products select g, g % 50, 'product ' || g, g % 1000 + 0.99 from generate_series(1, {ROWS}) g;
             create publication evictd for table products;"
        ))
        .await
        .expect("schema");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("products.toml"), MAPPING).expect("mapping");
    let mut config = Config::with_defaults(
        SecretUrl::parse(&url).expect("url"),
        SecretUrl::parse(&redis.url()).expect("url"),
        dir.path().to_path_buf(),
    );
    config.redis.prefix = "b:".into();
    let mappings = evictd::mapping::load_dir(dir.path(), config.mappings.limits).expect("mappings");
    let mut redis_conn = redis::Client::open(redis.url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");

    // The values warming writes, for the baseline.
    let values: Vec<(String, String)> = client
        .query(
            "select id, name, price::text from products order by id",
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|row| {
            let (id, name, price): (i64, String, String) = (row.get(0), row.get(1), row.get(2));
            (
                format!("b:product:{id}:card"),
                format!(r#"{{"id":{id},"name":"{name}","price":{price}}}"#),
            )
        })
        .collect();
    let options = evictd::internal::warm::WarmOptions {
        table: None,
        limit: None,
        rate: 0,
        progress: false,
    };
    let (mut warm_rates, mut set_rates, mut naive_rates, mut overlapped_rates) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..WARM_ROUNDS {
        // A naive warmer: the same pages read, rendered and SET, without
        // leases or fencing (what a warming script usually does).
        let _: () = redis::cmd("FLUSHDB")
            .query_async(&mut redis_conn)
            .await
            .unwrap();
        let started = Instant::now();
        let mut after = 0_i64;
        loop {
            let rows = client
                .query(
                    "select id, name, price::text from products where id > $1 order by id limit $2",
                    &[&after, &(PAGE as i64)],
                )
                .await
                .expect("page");
            let Some(last) = rows.last() else { break };
            after = last.get(0);
            let mut pipe = redis::pipe();
            for row in &rows {
                let (id, name, price): (i64, String, String) = (row.get(0), row.get(1), row.get(2));
                pipe.cmd("SET")
                    .arg(format!("b:product:{id}:card"))
                    .arg(format!(r#"{{"id":{id},"name":"{name}","price":{price}}}"#))
                    .arg("EX")
                    .arg(3600)
                    .ignore();
            }
            let _: () = pipe.query_async(&mut redis_conn).await.unwrap();
        }
        #[allow(clippy::cast_precision_loss)]
        naive_rates.push(values.len() as f64 / started.elapsed().as_secs_f64());
        let _: () = redis::cmd("FLUSHDB")
            .query_async(&mut redis_conn)
            .await
            .unwrap();
        set_rates.push(set_pages(&redis_conn, &values, 1).await);
        let _: () = redis::cmd("FLUSHDB")
            .query_async(&mut redis_conn)
            .await
            .unwrap();
        overlapped_rates.push(set_pages(&redis_conn, &values, 2).await);
        let _: () = redis::cmd("FLUSHDB")
            .query_async(&mut redis_conn)
            .await
            .unwrap();
        // On a runtime of its own thread, as `evictd warm` runs it.
        let summary = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime")
                        .block_on(evictd::internal::warm::warm(&config, &mappings, &options))
                })
                .join()
                .expect("warm thread")
        })
        .expect("warm");
        assert_eq!(summary.filled, u64::try_from(ROWS).unwrap());
        #[allow(clippy::cast_precision_loss)]
        warm_rates.push(summary.filled as f64 / summary.elapsed.as_secs_f64());
    }
    let (warm_rate, set_rate, naive_rate, overlapped_rate) = (
        median(warm_rates),
        median(set_rates),
        median(naive_rates),
        median(overlapped_rates),
    );

    // Purges: the same updates drained with and without a Varnish target.
    let app = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let varnish = Varnish::start(app.local_addr().unwrap().port()).expect("start varnishd");
    let (mut with_rates, mut without_rates, mut purge_rates) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        for purging in [true, false] {
            let mut config = config.clone();
            config.postgres.slot = format!("bench_{round}_{purging}");
            if purging {
                config.purge = vec![PurgeTarget {
                    rate: 10_000.0,
                    ..PurgeTarget::with_defaults(PurgeKind::Varnish, varnish.url("/"))
                }];
            }
            let evictd = Evictd::start(&config).await.expect("evictd");
            let started = Instant::now();
            for tx in 0..TRANSACTIONS {
                let first = (tx * PER_TX) % ROWS + 1;
                client
                    .batch_execute(&format!(
                        "update products set price = price + 1 where id between {first} and {}",
                        first + PER_TX - 1
                    ))
                    .await
                    .expect("update");
            }
            evictd
                .sync_within(Duration::from_secs(300))
                .await
                .expect("drained");
            let took = started.elapsed().as_secs_f64();
            evictd.stop().await.expect("stop");
            #[allow(clippy::cast_precision_loss)]
            let changes = (TRANSACTIONS * PER_TX) as f64;
            if purging {
                with_rates.push(changes / took);
                // Each change purges its product and its category.
                purge_rates.push(changes * 2.0 / took);
            } else {
                without_rates.push(changes / took);
            }
        }
    }
    let (with, without, purged) = (
        median(with_rates),
        median(without_rates),
        median(purge_rates),
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("load average after: {}", load.trim());
    println!("| measure | evictd | baseline | ratio | target |");
    println!("| --- | --- | --- | --- | --- |");
    println!(
        "| warming, keys/s ({ROWS} keys) vs pipelined SET | {warm_rate:.0} | {set_rate:.0} | {:.2}x | >= 0.7x |",
        warm_rate / set_rate
    );
    println!(
        "| warming, keys/s vs pipelined SET with two pages in flight | {warm_rate:.0} | {overlapped_rate:.0} | {:.2}x | |",
        warm_rate / overlapped_rate
    );
    println!(
        "| warming, keys/s vs a naive warmer (same pages read, SET without leases) | {warm_rate:.0} | {naive_rate:.0} | {:.2}x | |",
        warm_rate / naive_rate
    );
    println!(
        "| drain with a Varnish purge target vs without, changes/s | {with:.0} | {without:.0} | {:.2}x | |",
        with / without
    );
    println!("| surrogate keys purged per second (Varnish) | {purged:.0} | | | |");
    println!(
        "{}",
        serde_json::json!({
            "warm_keys_per_s": warm_rate,
            "pipelined_set_keys_per_s": set_rate,
            "naive_warm_keys_per_s": naive_rate,
            "warm_over_naive": warm_rate / naive_rate,
            "warm_over_set": warm_rate / set_rate,
            "overlapped_set_keys_per_s": overlapped_rate,
            "warm_over_overlapped_set": warm_rate / overlapped_rate,
            "drain_with_purge": with,
            "drain_without_purge": without,
            "purged_keys_per_s": purged,
        })
    );
}
