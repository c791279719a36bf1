//! Cache warming: the refresh keys filled from the database with the right
//! values and TTLs, values already cached left alone, `[[table.warm]]`
//! queries, and warming beside a streaming evictd under writes with
//! nothing stale afterwards.

use std::time::Duration;

use evictd::internal::warm::{warm, WarmOptions};

use crate::support::{
    mapping_dir, redis_connection, streaming_config, warm_everything, Streaming, TestDb,
};

const SCHEMA: &str = "
    create table products (id bigint primary key, name text not null, price numeric(8, 2) not null, status text not null);
    alter table products replica identity full;
    create publication evictd for table products;
";

const PRODUCTS: &str = r#"
[[table]]
name = "products"
keys = ["product:{id}"]

[[table.refresh]]
key = "product:{id}:card"
columns = ["id", "name", "price"]
ttl = "1h"

[[table.refresh]]
key = "live:{id}"
columns = ["id"]
when = "status = 'live'"
"#;

/// The pages warming reads `rows` rows in.
fn pages(rows: u64) -> u64 {
    rows.div_ceil(evictd::internal::warm::PAGE as u64)
}

fn card(id: i64) -> String {
    format!(r#"{{"id":{id},"name":"p{id}","price":{id}.50}}"#)
}

async fn get(prefix: &str, key: &str) -> Option<String> {
    let mut redis = redis_connection().await;
    redis::cmd("GET")
        .arg(format!("{prefix}{key}"))
        .query_async(&mut redis)
        .await
        .expect("GET")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warming_fills_the_rendered_refresh_keys_and_leaves_cached_values_alone() {
    let db = TestDb::new().await;
    db.execute(SCHEMA).await;
    db.execute(
        "insert into products select g, 'p' || g, g + 0.5, case when g % 2 = 0 then 'live' else 'draft' end
         from generate_series(1, 1200) g",
    )
    .await;
    let dir = mapping_dir(&[("products.toml", PRODUCTS)]);
    let config = streaming_config(&db, dir.path());
    let mappings = evictd::mapping::load_dir(dir.path(), config.mappings.limits).expect("mappings");
    let mut redis = redis_connection().await;
    // A value already there (newer, as far as warming can tell): kept.
    let _: () = redis::cmd("SET")
        .arg(format!("{}product:5:card", db.prefix))
        .arg("newer")
        .query_async(&mut redis)
        .await
        .expect("SET");
    let summary = warm(&config, &mappings, &warm_everything())
        .await
        .expect("warm");
    assert_eq!(
        (
            summary.tables,
            summary.rows,
            summary.filled,
            summary.present
        ),
        (1, 1200, 1199 + 600, 1)
    );
    // Nothing streams: every page (of PAGE rows at most) in one pass.
    assert_eq!(
        (summary.one_pass_pages, summary.leased_pages),
        (pages(1200), 0)
    );
    assert_eq!(
        get(&db.prefix, "product:5:card").await.as_deref(),
        Some("newer")
    );
    for id in [1, 2, 600, 1199, 1200] {
        assert_eq!(
            get(&db.prefix, &format!("product:{id}:card")).await,
            Some(card(id))
        );
        let live = get(&db.prefix, &format!("live:{id}")).await;
        assert_eq!(
            live,
            (id % 2 == 0).then(|| format!(r#"{{"id":{id}}}"#)),
            "live:{id}"
        );
    }
    // The refresh's TTL.
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("{}product:7:card", db.prefix))
        .query_async(&mut redis)
        .await
        .expect("TTL");
    assert!((3590..=3600).contains(&ttl), "TTL {ttl}");
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("{}live:8", db.prefix))
        .query_async(&mut redis)
        .await
        .expect("TTL");
    assert_eq!(ttl, -1, "no ttl on that refresh");
    // A second run finds everything cached.
    let again = warm(&config, &mappings, &warm_everything())
        .await
        .expect("warm");
    assert_eq!((again.filled, again.present), (0, 1200 + 600));
    assert_eq!((again.one_pass_pages, again.leased_pages), (pages(1200), 0));
    let only = WarmOptions {
        table: Some(evictd::change::TableName::new("public", "nope")),
        ..warm_everything()
    };
    let error = warm(&config, &mappings, &only).await.expect_err("unmapped");
    assert_eq!(error.to_string(), "public.nope is not mapped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_query_fills_the_rows_it_names() {
    let db = TestDb::new().await;
    db.execute(SCHEMA).await;
    db.execute(
        "insert into products select g, 'p' || g, g + 0.5, case when g % 2 = 0 then 'live' else 'draft' end
         from generate_series(1, 100) g",
    )
    .await;
    let mapping = format!(
        "{PRODUCTS}\n[[table.warm]]\nwhere = \"status = 'live'\"\norder_by = \"price desc\"\nlimit = 3\n"
    );
    let dir = mapping_dir(&[("products.toml", &mapping)]);
    let config = streaming_config(&db, dir.path());
    let mappings = evictd::mapping::load_dir(dir.path(), config.mappings.limits).expect("mappings");
    let summary = warm(&config, &mappings, &warm_everything())
        .await
        .expect("warm");
    assert_eq!((summary.rows, summary.filled), (3, 6));
    for id in 1..=100 {
        let cached = get(&db.prefix, &format!("product:{id}:card"))
            .await
            .is_some();
        assert_eq!(cached, [96, 98, 100].contains(&id), "product:{id}:card");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warming_beside_a_streaming_evictd_under_writes_leaves_nothing_stale() {
    let mut s = Streaming::start(SCHEMA, &[("products.toml", PRODUCTS)]).await;
    s.db.execute(
        "insert into products select g, 'p' || g, g + 0.5, 'live' from generate_series(1, 3000) g",
    )
    .await;
    s.sync().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let client = s.db.client().await;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut round = 0_i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && round < 2_000 {
                let id = (round * 37) % 3000 + 1;
                client
                    .batch_execute(&format!(
                        "update products set name = 'renamed{round}', status = case when status = 'live' then 'draft' else 'live' end where id = {id};
                         delete from products where id = {};
                         update products set price = price + 1 where id between {id} and {id} + 20",
                        (round * 1117) % 3000 + 1
                    ))
                    .await
                    .expect("write");
                round += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            round
        })
    };
    let mappings = s.evictd.mappings();
    let (mut filled, mut leased) = (0, 0);
    for _ in 0..3 {
        // Evicted (as by memory pressure or TTLs): evictd's write-through
        // refreshes filled them all, so warming finds them gone and fills
        // while the writer's changes stream.
        evict(&s.config.redis.prefix).await;
        // Paced, so a page read ahead waits ~50 ms before it is stored: a
        // row deleted or a condition turned false meanwhile (evictd's
        // delete finds nothing to delete) is what the fencing must catch.
        // What the last pass stored stays to be checked.
        let paced = WarmOptions {
            rate: 20_000,
            ..warm_everything()
        };
        let pass = warm(&s.config, &mappings, &paced).await.expect("warm");
        filled += pass.filled;
        leased += pass.leased_pages;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = writer.await.expect("writer");
    assert!(rounds >= 20, "the writer wrote {rounds} rounds");
    warm(&s.config, &mappings, &warm_everything())
        .await
        .expect("warm");
    s.sync().await;
    assert!(filled >= 6_000, "warming filled {filled} keys");
    // Pages read ahead while evictd applied batches took leases; with
    // nothing streaming, every page goes in one pass.
    assert!(leased >= 1, "no page took leases");
    let last = warm(&s.config, &mappings, &warm_everything())
        .await
        .expect("warm");
    assert_eq!(
        (last.one_pass_pages, last.leased_pages),
        (pages(last.rows), 0)
    );
    // Every refresh key equals its row, and deleted rows left no key.
    let sweep = evictd::internal::audit::sweep(&s.config, &mappings, None, None, |_| {})
        .await
        .expect("sweep");
    assert!(sweep.stale.is_empty(), "{:?}", sweep.stale);
    let gone: Vec<i64> = s
        .db
        .client()
        .await
        .query(
            "select g from generate_series(1, 3000) g where not exists (select 1 from products where id = g)",
            &[],
        )
        .await
        .expect("deleted ids")
        .iter()
        .map(|row| row.get::<_, i32>(0).into())
        .collect();
    assert!(!gone.is_empty());
    for id in gone {
        assert_eq!(
            s.get(&format!("product:{id}:card")).await,
            None,
            "product {id} was deleted"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evictd_warm_prints_a_summary_and_refuses_an_unmapped_table() {
    let db = TestDb::new().await;
    db.execute(SCHEMA).await;
    db.execute("insert into products values (1, 'p1', 1.5, 'live'), (2, 'p2', 2.5, 'draft')")
        .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = crate::support::run_config(
        dir.path(),
        &db,
        &crate::support::stack().redis.url(),
        PRODUCTS,
        "127.0.0.1:0",
    );
    let config = config.to_str().unwrap().to_owned();
    let output = tokio::task::spawn_blocking(move || {
        let warmed = crate::support::evictd(&["warm", "--config", &config, "--rate", "100"]);
        let unmapped = crate::support::evictd(&["warm", "--config", &config, "--table", "nope"]);
        (warmed, unmapped)
    })
    .await
    .expect("evictd");
    let (warmed, unmapped) = output;
    assert_eq!(
        warmed.status.code(),
        Some(0),
        "{}",
        crate::support::stderr(&warmed)
    );
    let text = crate::support::stdout(&warmed);
    assert!(
        text.starts_with("warmed 3 keys from 2 rows of 1 table(s) in "),
        "{text}"
    );
    assert!(text.contains("0 already cached"), "{text}");
    assert_eq!(unmapped.status.code(), Some(2));
    assert!(
        crate::support::stderr(&unmapped).contains("public.nope is not mapped"),
        "{}",
        crate::support::stderr(&unmapped)
    );
    assert_eq!(
        get(&db.prefix, "product:1:card").await,
        Some(card_of(1, "p1", "1.50"))
    );
}

fn card_of(id: i64, name: &str, price: &str) -> String {
    format!(r#"{{"id":{id},"name":"{name}","price":{price}}}"#)
}

/// The apply mark that warming's one-pass fills watch: a streaming evictd
/// steps it with every batch that changes anything in Redis, and only then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evictd_steps_the_apply_mark_with_every_batch_it_applies() {
    use evictd::internal::warm::APPLY_MARK_KEY;
    let s = Streaming::start(SCHEMA, &[("products.toml", PRODUCTS)]).await;
    let mark_key = format!("{}{APPLY_MARK_KEY}", s.config.redis.prefix);
    let before = mark_of(&mark_key).await;
    s.db.execute("insert into products values (1, 'p1', 1.5, 'live')")
        .await;
    s.sync().await;
    let moved = mark_of(&mark_key).await;
    assert_ne!(before, moved, "a batch steps the epoch");
    s.db.execute("update products set price = 2.5 where id = 1")
        .await;
    s.sync().await;
    let again = mark_of(&mark_key).await;
    assert!(
        again.parse::<u64>().unwrap() > moved.parse::<u64>().unwrap(),
        "{again} after {moved}"
    );
    // A transaction that changes nothing mapped applies no commands and
    // leaves the epoch where it was.
    s.db.execute("create table unmapped (id int); insert into unmapped values (1)")
        .await;
    s.sync().await;
    assert_eq!(mark_of(&mark_key).await, again);
}

async fn mark_of(key: &str) -> String {
    let mut redis = redis_connection().await;
    redis::cmd("GET")
        .arg(key)
        .query_async::<Option<String>>(&mut redis)
        .await
        .expect("GET")
        .unwrap_or_default()
}

/// Deletes every cached product key (`product:*`, `live:*`) under `prefix`.
async fn evict(prefix: &str) {
    let mut redis = redis_connection().await;
    for pattern in ["product:*", "live:*"] {
        let mut cursor = 0_u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}{pattern}"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut redis)
                .await
                .expect("SCAN");
            if !keys.is_empty() {
                let _: i64 = redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async(&mut redis)
                    .await
                    .expect("UNLINK");
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
}
