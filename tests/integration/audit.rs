//! Measured consistency: the checker `[audit]` starts in `evictd run`,
//! against real Postgres, Redis and the client crate's fills, and the
//! one-off sweep `evictd audit`.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use evictd_client::{protocol, Cache};

use crate::support::{self, stack, Streaming};

const SCHEMA: &str = "
    create table orders (id bigint primary key, user_id bigint not null, status text not null);
    alter table orders replica identity full;
    create publication evictd for table orders;
    insert into orders select g, 1, 'new' from generate_series(1, 5) g;
";

const MAPPING: &str = r#"
[[table]]
name = "orders"
keys = ["order:{id}"]

[[table.refresh]]
key = "order:{id}:summary"
columns = ["id", "status"]
"#;

/// Streams with the checker on: every invalidation sampled, checked
/// `delay_ms` after it was applied.
async fn audited(delay_ms: u64, queue: usize) -> Streaming {
    Streaming::start_with(SCHEMA, &[("orders.toml", MAPPING)], |config| {
        config.audit.enabled = true;
        config.audit.sample = 1.0;
        config.audit.delay_ms = delay_ms;
        config.audit.queue = queue;
    })
    .await
}

/// `evictd status --json`'s consistency object.
async fn consistency(s: &Streaming) -> serde_json::Value {
    let report = evictd::internal::operator::status(&s.config)
        .await
        .expect("status");
    report.to_json()["consistency"].clone()
}

/// Waits until the last hour holds `checks` checks; their consistency.
async fn checked(s: &Streaming, checks: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found = consistency(s).await;
        if found["checks"].as_u64() >= Some(checks) {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "only {found} after 60 s, {checks} checks expected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn apply_stamp(s: &mut Streaming) -> u64 {
    let key = format!("{}{}", s.db.prefix, protocol::AUDIT_STAMP_KEY);
    let stamp: Option<u64> = redis::cmd("GET")
        .arg(key)
        .query_async(&mut s.cache.redis)
        .await
        .expect("GET the stamp");
    stamp.expect("evictd wrote an apply stamp")
}

async fn plant(s: &mut Streaming, key: &str, value: &str) {
    redis::cmd("SET")
        .arg(format!("{}{key}", s.db.prefix))
        .arg(value)
        .query_async::<()>(&mut s.cache.redis)
        .await
        .expect("SET");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_finds_planted_stale_values_and_passes_correct_refills() {
    let mut s = audited(1_500, 1_000).await;
    let db = s.db.client().await;
    let cache = Cache::builder(stack().redis.url())
        .prefix(s.db.prefix.clone())
        .record_fills(true)
        .build()
        .await
        .expect("a cache");
    // Something applied, so that there is a stamp before the changes below.
    db.batch_execute("update orders set user_id = 2 where id = 5")
        .await
        .expect("update");
    s.sync().await;
    let before = apply_stamp(&mut s).await;

    db.batch_execute(
        "update orders set status = 'paid' where id = 1;
         update orders set status = 'paid' where id = 2;
         update orders set status = 'paid' where id = 3;
         update orders set status = 'paid' where id = 4;",
    )
    .await
    .expect("updates");
    s.sync().await;
    // A correct refill through the client: recorded after the invalidation.
    let loaded = cache
        .get_or_load("order:1", &[], || async {
            Ok::<_, Infallible>(Some("paid".to_owned()))
        })
        .await
        .expect("get_or_load");
    assert_eq!(loaded.as_deref(), Some("paid"));
    let raw = s.get("order:1").await.expect("the fill stored order:1");
    assert!(
        protocol::Stored::stamp(&raw) >= Some(before + 1),
        "the fill recorded the batch's stamp: {raw:?}"
    );
    // A value loaded before the change and stored after its invalidation,
    // bypassing the fence.
    plant(&mut s, "order:2", &protocol::stamped(before, "\"new\"")).await;
    // A value stored without a record: cannot be told either way.
    plant(&mut s, "order:3", "\"whatever\"").await;
    // A refresh overwritten with what the row held before.
    plant(&mut s, "order:4:summary", r#"{"id":4,"status":"new"}"#).await;

    // Four deletes and four refreshes, plus the two of the first update.
    let found = checked(&s, 10).await;
    assert_eq!(found["stale"], 2, "{found}");
    assert_eq!(found["unverifiable"], 1, "{found}");
    assert_eq!(found["consistent"], 7, "{found}");
    assert_eq!(found["nines"], "0.7", "2 stale of 9 verified: {found}");
    let report = evictd::internal::operator::status(&s.config)
        .await
        .expect("status");
    assert!(
        report.text.contains(
            "consistency (last hour): 10 checks: 7 consistent, 2 stale, 1 unverifiable; 0.7 nines"
        ),
        "{}",
        report.text
    );
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("2 stale cache entries")),
        "{:?}",
        report.warnings
    );
    s.evictd.stop().await.expect("stop");
}

/// The value of a counter in `/metrics`' text, 0 when absent.
fn counter(rendered: &str, name: &str) -> u64 {
    rendered
        .lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_overflows_the_checkers_queue_without_holding_the_pipeline_back() {
    let recorder = evictd::internal::telemetry::recorder();
    let dropped_before = counter(
        &recorder.render(),
        "evictd_consistency_samples_dropped_total",
    );
    let s = audited(60_000, 5).await;
    let db = s.db.client().await;
    db.batch_execute("insert into orders select g, 1, 'new' from generate_series(10, 509) g")
        .await
        .expect("insert");
    // 1,000 keys sampled against a queue of 5 checked a minute later:
    // apply does not wait.
    tokio::time::timeout(Duration::from_secs(10), s.sync())
        .await
        .expect("the pipeline kept going");
    let dropped = counter(
        &recorder.render(),
        "evictd_consistency_samples_dropped_total",
    ) - dropped_before;
    assert!(dropped >= 900, "{dropped} samples dropped");
    s.evictd.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_passes_a_clean_cache_and_names_a_corrupted_refresh() {
    let mut s = Streaming::start(SCHEMA, &[("orders.toml", MAPPING)]).await;
    let db = s.db.client().await;
    db.batch_execute("update orders set status = 'paid'")
        .await
        .expect("update");
    s.sync().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = support::run_config(
        dir.path(),
        &s.db,
        &stack().redis.url(),
        MAPPING,
        "127.0.0.1:0",
    );
    let config = config.to_str().expect("utf-8 path").to_owned();
    let audit = |args: &[&str]| {
        let mut all = vec!["audit", "--config", &config];
        all.extend_from_slice(args);
        support::evictd(&all)
    };

    let clean = tokio::task::block_in_place(|| audit(&[]));
    let out = support::stdout(&clean);
    assert_eq!(
        clean.status.code(),
        Some(0),
        "{out}{}",
        support::stderr(&clean)
    );
    assert!(
        out.contains(
            "public.orders  order:{id}:summary     5           5       0      0             0"
        ),
        "{out}"
    );
    assert!(
        out.ends_with("audit: 5 entries compared, 0 stale\n"),
        "{out}"
    );

    plant(&mut s, "order:3:summary", r#"{"id":3,"status":"new"}"#).await;
    let corrupted = tokio::task::block_in_place(|| audit(&["--table", "orders"]));
    let out = support::stdout(&corrupted);
    assert_eq!(
        corrupted.status.code(),
        Some(1),
        "{out}{}",
        support::stderr(&corrupted)
    );
    assert!(
        out.contains(r#"stale: order:3:summary (public.orders where "id" = '3'): holds {"id":3,"status":"new"}, but the row renders {"id":3,"status":"paid"}"#),
        "{out}"
    );
    assert!(
        out.ends_with("audit: 5 entries compared, 1 stale\n"),
        "{out}"
    );

    let limited = tokio::task::block_in_place(|| audit(&["--limit", "2"]));
    assert!(
        support::stdout(&limited).contains("audit: 2 entries compared"),
        "{}",
        support::stdout(&limited)
    );
    let unmapped = tokio::task::block_in_place(|| audit(&["--table", "nope"]));
    assert_eq!(unmapped.status.code(), Some(2));
    assert!(
        support::stderr(&unmapped).contains("error: public.nope is not mapped"),
        "{}",
        support::stderr(&unmapped)
    );
    s.evictd.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_compares_recorded_fills_with_the_stamped_broadcast_log() {
    let mut s = audited(60_000, 1_000).await;
    let db = s.db.client().await;
    let cache = Cache::builder(stack().redis.url())
        .prefix(s.db.prefix.clone())
        .record_fills(true)
        .build()
        .await
        .expect("a cache");
    db.batch_execute("update orders set user_id = 2 where id = 5")
        .await
        .expect("update");
    s.sync().await;
    let before = apply_stamp(&mut s).await;
    db.batch_execute(
        "update orders set status = 'paid' where id = 1;
         update orders set status = 'paid' where id = 2;",
    )
    .await
    .expect("updates");
    s.sync().await;
    // A correct refill, and a value loaded before order 2's change stored
    // after its invalidation.
    cache
        .get_or_load("order:1", &[], || async {
            Ok::<_, Infallible>(Some("paid".to_owned()))
        })
        .await
        .expect("get_or_load");
    plant(&mut s, "order:2", &protocol::stamped(before, "\"new\"")).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let config = support::run_config(
        dir.path(),
        &s.db,
        &stack().redis.url(),
        MAPPING,
        "127.0.0.1:0",
    );
    let output = tokio::task::block_in_place(|| {
        support::evictd(&["audit", "--config", config.to_str().expect("utf-8")])
    });
    let out = support::stdout(&output);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{out}{}",
        support::stderr(&output)
    );
    assert!(
        out.contains(&format!("stale: order:2 (a client fill): holds a fill that read apply stamp {before}, before the invalidation at stamp")),
        "{out}"
    );
    assert!(!out.contains("stale: order:1 "), "{out}");
    assert!(out.contains(", 2 recorded an apply stamp, "), "{out}");
    assert!(out.contains(": 1 stale\n"), "{out}");
    s.evictd.stop().await.expect("stop");
}
