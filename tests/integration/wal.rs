//! End to end through real WAL: Postgres commits, evictd streams the slot,
//! Redis loses exactly the keys the mappings name.

use crate::support::Streaming;
use evictd::config::Secret;

const SHOP: &str = "
    create table users (id bigint primary key, email text not null, bio text);
    create table orders (id bigint primary key, user_id bigint not null, status text not null);
    alter table users replica identity full;
    alter table orders replica identity full;
    create publication evictd for table users, orders;
";

const USERS: &str = r#"
[[table]]
name = "users"
keys = ["user:{id}", "user:email:{email}"]
"#;

const ORDERS: &str = r#"
[[table]]
name = "orders"
keys = ["order:{id}", "user:{user_id}:orders"]
"#;

#[tokio::test]
async fn insert_update_delete_on_several_tables() {
    let mut s = Streaming::start(SHOP, &[("users.toml", USERS), ("orders.toml", ORDERS)]).await;
    let keys = [
        "user:1",
        "user:email:a@x.io",
        "order:10",
        "user:1:orders",
        "user:2",
        "order:11",
    ];
    s.seed(&keys).await;
    s.db.execute("insert into users values (1, 'a@x.io', null)")
        .await;
    s.db.execute("insert into orders values (10, 1, 'new')")
        .await;
    s.sync().await;
    assert_eq!(s.cached(&keys).await, ["user:2", "order:11"]);
    s.seed(&keys).await;
    s.db.execute("update orders set status = 'paid' where id = 10")
        .await;
    s.db.execute("delete from users where id = 1").await;
    s.sync().await;
    assert_eq!(s.cached(&keys).await, ["user:2", "order:11"]);
    // Every batch that held a commit was timed from the commit and from
    // the walsender sending it, which cannot come before the commit.
    let lag = s.evictd.lag();
    assert!(lag.commit_to_apply.count() >= 2, "{lag:?}");
    assert_eq!(lag.sent_to_apply.count(), lag.commit_to_apply.count());
    assert!(
        lag.sent_to_apply.max() <= lag.commit_to_apply.max(),
        "{lag:?}"
    );
}

#[tokio::test]
async fn several_tables_in_one_transaction() {
    let mut s = Streaming::start(SHOP, &[("users.toml", USERS), ("orders.toml", ORDERS)]).await;
    let keys = [
        "user:5",
        "user:email:e@x.io",
        "order:50",
        "user:5:orders",
        "order:51",
    ];
    s.seed(&keys).await;
    s.db.execute("begin; insert into users values (5, 'e@x.io', null); insert into orders values (50, 5, 'new'); commit")
        .await;
    s.sync().await;
    assert_eq!(s.cached(&keys).await, ["order:51"]);
}

#[tokio::test]
async fn a_rolled_back_transaction_invalidates_nothing() {
    let mut s = Streaming::start(SHOP, &[("users.toml", USERS)]).await;
    let keys = ["user:7", "user:email:r@x.io"];
    s.seed(&keys).await;
    s.db.execute("begin; insert into users values (7, 'r@x.io', null); rollback")
        .await;
    s.sync().await;
    assert_eq!(s.cached(&keys).await, keys);
}

#[tokio::test]
async fn an_order_moving_between_users_invalidates_both_users() {
    let mut s = Streaming::start(SHOP, &[("orders.toml", ORDERS)]).await;
    s.db.execute("insert into orders values (70, 1, 'new')")
        .await;
    s.sync().await;
    let keys = [
        "order:70",
        "user:1:orders",
        "user:2:orders",
        "user:3:orders",
    ];
    s.seed(&keys).await;
    s.db.execute("update orders set user_id = 2 where id = 70")
        .await;
    s.sync().await;
    assert_eq!(s.cached(&keys).await, ["user:3:orders"]);
}

#[tokio::test]
async fn keys_with_colons_and_unicode_in_values() {
    let mut s = Streaming::start(SHOP, &[("users.toml", USERS)]).await;
    let keys = [
        "user:email:a%3Ab@x.io",
        "user:email:zoë→日本@x.io",
        "user:email:a:b@x.io",
    ];
    s.seed(&keys).await;
    s.db.execute("insert into users values (1, 'a:b@x.io', null), (2, 'zoë→日本@x.io', null)")
        .await;
    s.sync().await;
    assert_eq!(
        s.cached(&keys).await,
        ["user:email:a:b@x.io"],
        "the raw `:` form is another key"
    );
}

#[tokio::test]
async fn truncate_deletes_every_key_the_table_can_produce() {
    let mut s = Streaming::start(SHOP, &[("orders.toml", ORDERS), ("users.toml", USERS)]).await;
    let keys = [
        "order:1",
        "order:2",
        "user:9:orders",
        "user:1",
        "orders:other",
    ];
    s.seed(&keys).await;
    s.db.execute("truncate orders").await;
    s.sync().await;
    assert_eq!(s.cached(&keys).await, ["user:1", "orders:other"]);
}

#[tokio::test]
async fn alter_table_add_column_mid_stream() {
    let mapping = "[[table]]\nname = \"users\"\nkeys = [\"user:{id}\", \"tier:{tier}\"]\n";
    let mut s = Streaming::start(SHOP, &[("users.toml", mapping)]).await;
    s.seed(&["user:1", "user:2", "tier:gold"]).await;
    // Before the column exists its placeholder is unknown: a pattern.
    s.db.execute("insert into users values (1, 'a@x.io', null)")
        .await;
    s.sync().await;
    assert_eq!(
        s.cached(&["user:1", "user:2", "tier:gold"]).await,
        ["user:2"]
    );
    s.seed(&["user:1", "user:2", "tier:gold", "tier:silver"])
        .await;
    s.db.execute("alter table users add column tier text; insert into users values (2, 'b@x.io', null, 'gold')").await;
    s.sync().await;
    assert_eq!(
        s.cached(&["user:1", "user:2", "tier:gold", "tier:silver"])
            .await,
        ["user:1", "tier:silver"]
    );
}

const PROFILE: &str = r#"
[[table]]
name = "users"
keys = ["user:{id}"]
[[table.refresh]]
key = "user:{id}:profile"
columns = ["id", "email", "bio"]
ttl = "1h"
"#;

#[tokio::test]
async fn refresh_writes_the_new_row_through() {
    let mut s = Streaming::start(SHOP, &[("users.toml", PROFILE)]).await;
    s.db.execute("insert into users values (3, 'c@x.io', 'hi')")
        .await;
    s.sync().await;
    assert_eq!(
        s.get("user:3:profile").await.as_deref(),
        Some(r#"{"id":3,"email":"c@x.io","bio":"hi"}"#)
    );
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("{}user:3:profile", s.db.prefix))
        .query_async(&mut s.cache.redis)
        .await
        .unwrap();
    assert!((3590..=3600).contains(&ttl), "{ttl}");
    s.db.execute("delete from users where id = 3").await;
    s.sync().await;
    assert_eq!(s.get("user:3:profile").await, None);
}

#[tokio::test]
async fn unchanged_toast_is_taken_from_the_full_old_row() {
    let mut s = Streaming::start(SHOP, &[("users.toml", PROFILE)]).await;
    s.db.execute("alter table users alter column bio set storage external")
        .await;
    let bio = "x".repeat(100_000);
    s.db.execute(&format!("insert into users values (4, 'd@x.io', '{bio}')"))
        .await;
    s.sync().await;
    s.db.execute("update users set email = 'd2@x.io' where id = 4")
        .await;
    s.sync().await;
    let profile = s.get("user:4:profile").await.expect("refreshed");
    assert!(
        profile.starts_with(r#"{"id":4,"email":"d2@x.io","bio":"xxx"#),
        "{}",
        &profile[..40]
    );
    assert_eq!(
        profile.len(),
        bio.len() + r#"{"id":4,"email":"d2@x.io","bio":""}"#.len()
    );
}

#[tokio::test]
async fn unchanged_toast_without_old_value_falls_back_to_delete() {
    let mut s = Streaming::start(SHOP, &[("users.toml", PROFILE)]).await;
    s.db.execute("alter table users replica identity default; alter table users alter column bio set storage external")
        .await;
    let bio = "y".repeat(100_000);
    s.db.execute(&format!("insert into users values (5, 'e@x.io', '{bio}')"))
        .await;
    s.sync().await;
    assert!(s.get("user:5:profile").await.is_some());
    s.db.execute("update users set email = 'e2@x.io' where id = 5")
        .await;
    s.sync().await;
    assert_eq!(
        s.get("user:5:profile").await,
        None,
        "unknown bio: the key is deleted, not written"
    );
}

#[tokio::test]
async fn tags_delete_their_members() {
    let mapping = "[[table]]\nname = \"orders\"\ntags = [\"user:{user_id}\"]\n";
    let mut s = Streaming::start(SHOP, &[("orders.toml", mapping)]).await;
    let prefix = s.db.prefix.clone();
    let members = [format!("{prefix}page:a"), format!("{prefix}page:b")];
    // Round 1: one tag set. Round 2: a tag key that is not a set, in the
    // same batch as a real tag set: it is deleted, and the set's members
    // still are.
    let rounds = [
        ("insert into orders values (80, 8, 'new')", &["page:a", "page:b", "page:c"][..]),
        (
            "begin; insert into orders values (90, 9, 'new'); insert into orders values (81, 8, 'new'); commit",
            &["page:a", "page:b", "tag:user:9"][..],
        ),
    ];
    for (sql, seeded) in rounds {
        s.seed(seeded).await;
        let _: () = redis::cmd("SADD")
            .arg(format!("{prefix}tag:user:8"))
            .arg(&members)
            .query_async(&mut s.cache.redis)
            .await
            .unwrap();
        s.db.execute(sql).await;
        s.sync().await;
        assert_eq!(
            s.cached(&["page:a", "page:b", "page:c", "tag:user:8", "tag:user:9"])
                .await,
            ["page:c"],
            "{sql}"
        );
    }
}

#[tokio::test]
async fn a_rolled_back_savepoint_inside_a_streamed_transaction_invalidates_only_committed_rows() {
    let mapping = "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\n";
    let mut s = Streaming::start(SHOP, &[("orders.toml", mapping)]).await;
    let keys: Vec<String> = (1..=6000).map(|id| format!("order:{id}")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    s.seed(&keys).await;
    // Far more than logical_decoding_work_mem (64kB): the server streams it.
    s.db.execute(
        "begin;
         insert into orders select g, 1, 'new' from generate_series(1, 2000) g;
         savepoint s1;
         insert into orders select g, 1, 'new' from generate_series(2001, 4000) g;
         rollback to savepoint s1;
         insert into orders select g, 1, 'new' from generate_series(4001, 5000) g;
         commit",
    )
    .await;
    s.sync().await;
    let left = s.cached(&keys).await;
    let expected: Vec<String> = (2001..=4000)
        .chain(5001..=6000)
        .map(|id| format!("order:{id}"))
        .collect();
    assert_eq!(left, expected);
    assert!(
        streamed_transactions(&s).await >= 1,
        "the transaction was streamed"
    );
}

#[tokio::test]
async fn an_overflow_inside_a_rolled_back_savepoint_does_not_make_the_commit_coarse() {
    let mapping = "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\n";
    let mut s = Streaming::start_with(SHOP, &[("orders.toml", mapping)], |config| {
        config.batch.max_pending_keys = 100;
    })
    .await;
    s.db.execute("insert into orders select g, 1, 'new' from generate_series(1, 8000) g")
        .await;
    s.sync().await;
    let keys: Vec<String> = (1..=8000).map(|id| format!("order:{id}")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    s.seed(&keys).await;
    let applied_before = s.evictd.changes_applied();
    // The savepoint's 7,000 updates overflow max_pending_keys (and
    // logical_decoding_work_mem, on every version) and are rolled back; the 5 updates before it commit.
    s.db.execute(
        "begin;
         update orders set status = 'paid' where id <= 5;
         savepoint s1;
         update orders set status = 'gone' where id > 1000;
         rollback to savepoint s1;
         commit",
    )
    .await;
    s.sync().await;
    let left = s.cached(&keys).await;
    let expected: Vec<String> = (6..=8000).map(|id| format!("order:{id}")).collect();
    assert_eq!(left, expected, "only the committed rows' keys go");
    assert_eq!(
        s.evictd.changes_applied() - applied_before,
        5,
        "only the committed changes are counted as applied"
    );
    assert!(
        streamed_transactions(&s).await >= 1,
        "the transaction was streamed"
    );
}

#[tokio::test]
async fn invalidated_keys_are_counted_by_table_and_mode_and_status_shows_them() {
    let mapping = "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\n";
    let mut s = Streaming::start_with(SHOP, &[("orders.toml", mapping)], |config| {
        config.batch.max_pending_keys = 100;
    })
    .await;
    // Key by key: three inserts.
    s.db.execute("insert into orders select g, 1, 'new' from generate_series(1, 3) g")
        .await;
    s.sync().await;
    // Coarse: a streamed transaction (far over logical_decoding_work_mem)
    // over max_pending_keys deletes order:* (the 300 cached orders).
    let keys: Vec<String> = (1..=300).map(|id| format!("order:{id}")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    s.seed(&keys).await;
    s.db.execute("insert into orders select g, 1, 'new' from generate_series(4, 3000) g")
        .await;
    s.sync().await;
    // By pattern: TRUNCATE deletes order:* (10 cached orders).
    s.seed(&keys[..10]).await;
    s.db.execute("truncate orders").await;
    s.sync().await;

    let totals: std::collections::BTreeMap<String, u64> = redis::cmd("HGETALL")
        .arg(format!("{}evictd:invalidated", s.config.redis.prefix))
        .query_async(&mut s.cache.redis)
        .await
        .unwrap();
    let expected: std::collections::BTreeMap<String, u64> = [
        ("public.orders coarse", 300),
        ("public.orders exact", 3),
        ("public.orders pattern", 10),
    ]
    .into_iter()
    .map(|(field, keys)| (field.to_owned(), keys))
    .collect();
    assert_eq!(totals, expected);

    let report = evictd::internal::operator::status(&s.config).await.unwrap();
    let (text, warnings) = (&report.text, &report.warnings);
    // The same for scripts (`status --json`).
    let json = report.to_json();
    assert_eq!(
        json["invalidated"]["public.orders"],
        serde_json::json!({"exact": 3, "pattern": 10, "coarse": 300, "prefix": 0})
    );
    assert_eq!(json["source"], "postgres");
    assert_eq!(json["slot"]["exists"], true);
    assert_eq!(json["redis"]["reachable"], true);
    assert!(json["warnings"][0].as_str().is_some(), "{json}");
    assert!(
        text.contains("  public.orders: 3 key by key, 10 by pattern, 300 by coarse invalidation\n"),
        "{text}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.starts_with("public.orders: 310 of 313 invalidated keys were deleted by pattern or coarse invalidation")),
        "{warnings:?}"
    );
}

#[tokio::test]
async fn keys_do_not_depend_on_the_databases_output_settings() {
    use evictd::change::{Datum, Op, Row, RowChange, TableName};
    use evictd::mapping::{Limits, Output};
    use evictd::plan::{plan_changes, Command};
    // Settings that change how Postgres prints intervals, bytea and floats,
    // set for the database before evictd connects.
    let schema = "
        create table vals (id bigint primary key, i interval not null, b bytea not null, f real not null);
        alter table vals replica identity full;
        create publication evictd for table vals;
        do $$ begin
          execute format('alter database %I set IntervalStyle = %L', current_database(), 'iso_8601');
          execute format('alter database %I set bytea_output = %L', current_database(), 'escape');
          execute format('alter database %I set extra_float_digits = %L', current_database(), '0');
        end $$;";
    let mapping = "[[table]]\nname = \"vals\"\nkeys = [\"v:{i}:{b}:{f}\"]\n";
    let mut s = Streaming::start(schema, &[("vals.toml", mapping)]).await;
    // The key as an application builds it from the canonical text.
    let mappings = evictd::mapping::load_str("m.toml", mapping, Limits::default()).unwrap();
    let row = Row::from_pairs([
        ("id", Datum::Number("1".into())),
        ("i", Datum::text("1 year 2 mons 3 days 04:05:06.5")),
        ("b", Datum::text("\\xdeadbeef")),
        ("f", Datum::Number("3.4028235e+38".into())),
    ]);
    let change = RowChange {
        table: std::sync::Arc::new(TableName::new("public", "vals")),
        op: Op::Insert,
        old: None,
        new: Some(row),
    };
    let plan = plan_changes(&mappings, [&change], &mut Output::default());
    let keys: Vec<String> = plan
        .commands
        .iter()
        .filter_map(|command| match command {
            Command::Unlink { key, .. } => Some(key.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    s.seed(&keys).await;
    s.db.execute(
        "insert into vals values (1, '1 year 2 mons 3 days 4 hours 5 minutes 6.5 seconds', '\\xdeadbeef', 3.4028235e+38)",
    )
    .await;
    s.sync().await;
    assert_eq!(s.cached(&keys).await, Vec::<String>::new(), "{keys:?}");
}

#[tokio::test]
async fn l1_messages_arrive_with_a_gapless_seq() {
    use futures_util::StreamExt as _;
    let mut s = Streaming::start(SHOP, &[("orders.toml", ORDERS)]).await;
    let client = redis::Client::open(crate::support::stack().redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub.subscribe(&s.config.redis.l1_channel).await.unwrap();
    for id in 0..30 {
        s.db.execute(&format!("insert into orders values ({id}, {id}, 'new')"))
            .await;
    }
    s.sync().await;
    let mut messages = pubsub.on_message();
    let mut seqs = Vec::new();
    let mut keys = Vec::new();
    while keys.len() < 60 {
        let message = tokio::time::timeout(std::time::Duration::from_secs(5), messages.next())
            .await
            .expect("a broadcast")
            .expect("stream open");
        let payload: String = message.get_payload().unwrap();
        let json: serde_json::Value = serde_json::from_str(&payload).unwrap();
        assert_eq!(json["v"], 1);
        assert_eq!(json["epoch"], s.evictd.epoch());
        seqs.push(json["seq"].as_u64().unwrap());
        keys.extend(
            json["keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k.as_str().unwrap().to_owned()),
        );
    }
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "one message per batch, seq gapless from 1");
    assert!(keys.contains(&"order:29".to_owned()) && keys.contains(&"user:29:orders".to_owned()));
    let last: String = redis::cmd("GET")
        .arg(format!("{}evictd:l1:last", s.db.prefix))
        .query_async(&mut s.cache.redis)
        .await
        .unwrap();
    assert_eq!(last, format!("{}:{}", s.evictd.epoch(), seqs.len()));
}

#[tokio::test]
async fn a_mapped_column_dropped_mid_stream_falls_back_to_a_pattern() {
    let mapping =
        "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\", \"status:{status}:orders\"]\n";
    let mut s = Streaming::start(SHOP, &[("orders.toml", mapping)]).await;
    let keys = [
        "order:1",
        "status:new:orders",
        "status:paid:orders",
        "other:1",
    ];
    s.seed(&keys).await;
    s.db.execute("insert into orders values (1, 1, 'new')")
        .await;
    s.sync().await;
    assert_eq!(s.cached(&keys).await, ["status:paid:orders", "other:1"]);
    s.seed(&keys).await;
    // The column the second template reads goes away; the next change
    // cannot render that key, so every key the template can produce goes.
    s.db.execute(
        "alter table orders drop column status; update orders set user_id = 2 where id = 1",
    )
    .await;
    s.sync().await;
    assert_eq!(s.cached(&keys).await, ["other:1"]);
}

/// Transactions the server streamed to the slot of `s` before commit.
async fn streamed_transactions(s: &Streaming) -> i64 {
    s.db.client()
        .await
        .query_one(
            "select stream_txns from pg_stat_replication_slots where slot_name = $1",
            &[&s.config.postgres.slot],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_row_leaving_and_entering_a_condition_through_real_wal() {
    const LISTED: &str = r#"
[[table]]
name = "orders"
keys = ["order:{id}", { template = "user:{user_id}:open_orders", when = "status in ('new', 'paid')" }]

[[table.refresh]]
key = "order:{id}:open"
columns = ["id", "status"]
when = "status <> 'shipped'"
"#;
    let mut s = Streaming::start(SHOP, &[("orders.toml", LISTED)]).await;
    s.db.execute("insert into users values (1, 'a@x.io', null)")
        .await;
    s.db.execute("insert into orders values (10, 1, 'new')")
        .await;
    s.sync().await;
    assert_eq!(
        s.get("order:10:open").await.as_deref(),
        Some(r#"{"id":10,"status":"new"}"#)
    );
    let keys = ["order:10", "user:1:open_orders"];
    // Leaving both conditions: the old row matched, so its keys go and the
    // refresh key is deleted rather than rewritten.
    s.seed(&keys).await;
    s.db.execute("update orders set status = 'shipped' where id = 10")
        .await;
    s.sync().await;
    assert!(s.cached(&keys).await.is_empty());
    assert_eq!(s.get("order:10:open").await, None);
    // Outside the key's condition on both sides: only order:10 goes, and the
    // refresh (status <> 'shipped' holds again) is written.
    s.seed(&keys).await;
    s.db.execute("update orders set status = 'returned' where id = 10")
        .await;
    s.sync().await;
    assert_eq!(s.cached(&keys).await, ["user:1:open_orders"]);
    assert_eq!(
        s.get("order:10:open").await.as_deref(),
        Some(r#"{"id":10,"status":"returned"}"#)
    );
    // Entering the key's condition again.
    s.seed(&keys).await;
    s.db.execute("update orders set status = 'paid' where id = 10")
        .await;
    s.sync().await;
    assert!(s.cached(&keys).await.is_empty());
}

#[tokio::test]
async fn a_prefix_delete_through_real_wal() {
    let recorder = evictd::internal::telemetry::recorder();
    const PREFIXED: &str = r#"
[[table]]
name = "users"
keys = ["user:{id}"]
prefixes = ["user:{id}:"]
"#;
    let mut s = Streaming::start(SHOP, &[("users.toml", PREFIXED)]).await;
    let keys = [
        "user:1",
        "user:1:orders",
        "user:1:page:a",
        "user:1:x:y:z",
        "user:10:orders",
        "user:2:orders",
    ];
    s.seed(&keys).await;
    s.db.execute("insert into users values (1, 'a@x.io', null)")
        .await;
    s.sync().await;
    assert_eq!(s.cached(&keys).await, ["user:10:orders", "user:2:orders"]);
    // The keyspace the prefix walked is counted.
    let pages: u64 = recorder
        .render()
        .lines()
        .find_map(|line| line.strip_prefix("evictd_scan_pages_total ")?.parse().ok())
        .unwrap_or(0);
    assert!(pages >= 1, "evictd_scan_pages_total {pages}");
    let status = evictd::internal::operator::status(&s.config)
        .await
        .expect("status");
    assert!(
        status.text.contains(
            "  public.users: 1 key by key, 0 by pattern, 0 by coarse invalidation, 3 by prefix\n"
        ),
        "{}",
        status.text
    );
}

/// `migrations/`'s wrapper of `pg_logical_emit_message`, as users install it.
const INVALIDATE_FUNCTION: &str = include_str!("../../migrations/0002_evictd_invalidate.sql");

#[tokio::test]
async fn invalidations_from_sql_follow_their_transaction() {
    let recorder = evictd::internal::telemetry::recorder();
    let schema = format!("{SHOP}\n{INVALIDATE_FUNCTION}");
    let mut s = Streaming::start_with(&schema, &[("orders.toml", ORDERS)], |config| {
        config.mappings.sql_messages = true;
        config.mappings.sql_messages_allow = Some(allow_everything());
    })
    .await;
    let keys = [
        "committed:1",
        "rolled_back:1",
        "at_once:1",
        "feed:1:a",
        "feed:1:b:c",
        "feed:10:a",
        "order:5",
        "after_bad:1",
        "other_prefix:1",
        "streamed:1",
        "streamed_rolled_back:1",
    ];
    s.seed(&keys).await;
    // Committed with a row change: both the mapped key and the message's.
    s.db.execute(
        "begin;
         insert into orders values (5, 1, 'new');
         select evictd_invalidate(keys => array['committed:1'], prefixes => array['feed:1:']);
         commit",
    )
    .await;
    // Rolled back: the message goes with the transaction.
    s.db.execute("begin; select evictd_invalidate(keys => array['rolled_back:1']); rollback")
        .await;
    // Non-transactional: applied although its transaction rolled back.
    s.db.execute(
        "begin;
         select evictd_invalidate(keys => array['at_once:1'], transactional => false);
         rollback",
    )
    .await;
    // Malformed ones are skipped and the stream goes on; other prefixes
    // belong to someone else.
    s.db.execute(
        "select pg_logical_emit_message(true, 'evictd', 'not json');
         select pg_logical_emit_message(true, 'evictd', '{\"keys\": [\"evictd:l1:log\"]}');
         select pg_logical_emit_message(true, 'other', '{\"keys\": [\"other_prefix:1\"]}');
         select evictd_invalidate(keys => array['after_bad:1'])",
    )
    .await;
    s.sync().await;
    assert_eq!(
        s.cached(&keys).await,
        [
            "rolled_back:1",
            "feed:10:a",
            "other_prefix:1",
            "streamed:1",
            "streamed_rolled_back:1"
        ]
    );
    // Inside transactions large enough to be streamed before they commit.
    s.db.execute(
        "begin;
         insert into orders select g, 1, 'new' from generate_series(100, 2100) g;
         select evictd_invalidate(keys => array['streamed_rolled_back:1']);
         rollback",
    )
    .await;
    s.db.execute(
        "begin;
         insert into orders select g, 1, 'new' from generate_series(3000, 5000) g;
         select evictd_invalidate(keys => array['streamed:1']);
         commit",
    )
    .await;
    s.sync().await;
    assert_eq!(
        s.cached(&keys).await,
        [
            "rolled_back:1",
            "feed:10:a",
            "other_prefix:1",
            "streamed_rolled_back:1"
        ]
    );
    assert!(
        streamed_transactions(&s).await >= 1,
        "the large transactions were streamed"
    );
    // Counted at the next status tick (every second).
    let counted = async {
        loop {
            let metrics = recorder.render();
            if [
                r#"evictd_sql_messages_total{outcome="malformed"}"#,
                r#"evictd_sql_messages_total{outcome="applied"}"#,
            ]
            .iter()
            .all(|line| metrics.contains(line))
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), counted)
        .await
        .expect("evictd_sql_messages_total counts applied and malformed messages");
}

/// `mappings.sql_messages_allow` that lets messages name anything.
fn allow_everything() -> evictd::mapping::AllowList {
    evictd::mapping::AllowList {
        keys: vec!["*".into()],
        tags: vec!["*".into()],
        prefixes: vec!["*".into()],
    }
}

/// `evictd_sql_messages_total{outcome}` as the recorder shows it now.
fn sql_messages(outcome: &str) -> u64 {
    let metrics = evictd::internal::telemetry::recorder().render();
    let series = format!("evictd_sql_messages_total{{outcome=\"{outcome}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .map_or(0, |value| value.trim().parse().expect("a counter"))
}

/// Waits (10 s at most) until `outcome` was counted `at_least` times: the
/// batcher publishes its counts at the next status tick.
async fn counted(outcome: &str, at_least: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while sql_messages(outcome) < at_least {
        assert!(
            std::time::Instant::now() < deadline,
            "evictd_sql_messages_total{{outcome=\"{outcome}\"}} stayed below {at_least}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Connects to the test's database as `role` (the server trusts local
/// logins).
async fn connect_as(db: &crate::support::TestDb, role: &str) -> tokio_postgres::Client {
    let url = format!(
        "postgres://{role}@127.0.0.1:{}/{}",
        crate::support::stack().postgres.port(),
        db.name
    );
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect as {role}: {e}"));
    tokio::spawn(connection);
    client
}

#[tokio::test]
async fn only_signed_messages_naming_what_is_allowed_are_applied() {
    evictd::internal::telemetry::recorder();
    let secrets = tempfile::tempdir().expect("tempdir");
    let current = secrets.path().join("current");
    std::fs::write(&current, "current-secret\n").expect("write the secret");
    let schema = format!(
        "{SHOP}\n{INVALIDATE_FUNCTION}\n
         insert into evictd.message_secret (secret) values ('current-secret');"
    );
    let secret_file = current.clone();
    let mut s = Streaming::start_with(&schema, &[("orders.toml", ORDERS)], |config| {
        config.mappings.sql_messages = true;
        config.mappings.sql_messages_secrets = vec![Secret::File(secret_file)];
    })
    .await;
    // Roles are the server's, not the database's: named after the database.
    let app = format!("{}_app", s.db.name);
    let nobody = format!("{}_nobody", s.db.name);
    s.db.execute(&format!(
        "create role {app} login; create role {nobody} login;
         grant execute on function evictd_invalidate(text[], text[], text[], boolean) to {app};"
    ))
    .await;
    let keys = ["order:1", "order:2", "order:3", "user:1:orders", "report:1"];
    s.seed(&keys).await;
    let unauthenticated = sql_messages("unauthenticated");
    let not_allowed = sql_messages("not_allowed");
    let applied = sql_messages("applied");

    // A role with no grant at all can emit the message itself, unsigned
    // or with a made-up signature: nothing is invalidated.
    let outsider = connect_as(&s.db, &nobody).await;
    outsider
        .batch_execute(
            r#"select pg_logical_emit_message(true, 'evictd', '{"prefixes": ["order:"]}');
               select pg_logical_emit_message(true, 'evictd', '{"body": "{\"keys\": [\"order:1\"]}", "hmac_sha256": "00000000000000000000000000000000000000000000000000000000000000ff"}');"#,
        )
        .await
        .expect("pg_logical_emit_message is executable by everyone");
    let denied = outsider
        .batch_execute("select evictd_invalidate(keys => array['order:2'])")
        .await
        .expect_err("no EXECUTE on evictd_invalidate");
    assert!(
        format!("{denied:?}").contains("permission denied"),
        "{denied:?}"
    );
    let denied = outsider
        .batch_execute("select * from evictd.message_secret")
        .await
        .expect_err("the secret is not readable");
    assert!(
        format!("{denied:?}").contains("permission denied"),
        "{denied:?}"
    );

    // The granted role's messages are signed and applied, within what the
    // mappings render (order:..., user:...:orders); a key or a prefix
    // outside it is not.
    let granted = connect_as(&s.db, &app).await;
    granted
        .batch_execute(
            "select evictd_invalidate(keys => array['order:3'], prefixes => array['user:1:']);
             select evictd_invalidate(keys => array['report:1']);
             select evictd_invalidate(prefixes => array['report:']);",
        )
        .await
        .expect("the granted role calls evictd_invalidate");
    s.sync().await;
    assert_eq!(s.cached(&keys).await, ["order:1", "order:2", "report:1"]);
    counted("unauthenticated", unauthenticated + 2).await;
    counted("not_allowed", not_allowed + 2).await;
    counted("applied", applied + 1).await;
}

#[tokio::test]
async fn a_secret_rotation_loses_no_message() {
    let secrets = tempfile::tempdir().expect("tempdir");
    let (old, new) = (secrets.path().join("old"), secrets.path().join("new"));
    std::fs::write(&old, "old-secret").expect("write");
    std::fs::write(&new, "new-secret").expect("write");
    let schema = format!(
        "{SHOP}\n{INVALIDATE_FUNCTION}\n
         insert into evictd.message_secret (secret) values ('old-secret');"
    );
    let old_only = old.clone();
    let mut s = Streaming::start_with(&schema, &[("orders.toml", ORDERS)], |config| {
        config.mappings.sql_messages = true;
        config.mappings.sql_messages_secrets = vec![Secret::File(old_only)];
    })
    .await;
    let keys = ["order:1", "order:2", "order:3", "order:4"];
    s.seed(&keys).await;
    s.db.execute("select evictd_invalidate(keys => array['order:1'])")
        .await;
    s.sync().await;
    assert_eq!(s.cached(&keys).await, ["order:2", "order:3", "order:4"]);
    // Step 1: evictd takes the new secret and the old one. Meanwhile the
    // old secret still signs, and messages wait in the slot.
    let mut config = s.config.clone();
    config.mappings.sql_messages_secrets = vec![Secret::File(new.clone()), Secret::File(old)];
    s.evictd.stop().await.expect("stop");
    s.db.execute("select evictd_invalidate(keys => array['order:2'])")
        .await;
    // Step 2: the database signs with the new secret.
    s.db.execute(
        "insert into evictd.message_secret (secret) values ('new-secret')
           on conflict (only_row) do update set secret = excluded.secret;
         select evictd_invalidate(keys => array['order:3']);",
    )
    .await;
    s.evictd = evictd::testkit::Evictd::start(&config)
        .await
        .expect("start");
    s.sync().await;
    assert_eq!(s.cached(&keys).await, ["order:4"]);
    // Step 3: the old secret is dropped; the new one still verifies.
    config.mappings.sql_messages_secrets = vec![Secret::File(new)];
    s.evictd.stop().await.expect("stop");
    s.evictd = evictd::testkit::Evictd::start(&config)
        .await
        .expect("start");
    s.db.execute("select evictd_invalidate(keys => array['order:4'])")
        .await;
    s.sync().await;
    assert!(s.cached(&keys).await.is_empty());
}

#[tokio::test]
async fn invalidations_from_sql_are_skipped_while_off() {
    let schema = format!("{SHOP}\n{INVALIDATE_FUNCTION}");
    let mut s = Streaming::start(&schema, &[("orders.toml", ORDERS)]).await;
    s.seed(&["message:1", "order:1"]).await;
    s.db.execute(
        "begin;
         select evictd_invalidate(keys => array['message:1']);
         insert into orders values (1, 1, 'new');
         commit",
    )
    .await;
    s.sync().await;
    assert_eq!(s.cached(&["message:1", "order:1"]).await, ["message:1"]);
}

#[tokio::test]
async fn json_paths_and_transforms_through_real_wal() {
    const SCHEMA: &str = "
        create table events (
            id bigint primary key,
            email text not null,
            payload jsonb,
            doc json,
            created_at timestamptz not null
        );
        alter table events replica identity full;
        create publication evictd for table events;
    ";
    const EVENTS: &str = r#"
[[table]]
name = "events"
keys = [
    "event:{payload.slug}",
    "item:{payload.items.0.id}",
    "doc:{doc.meta.kind|upper}",
    "user:email:{email|lower}",
    "day:{created_at|date}",
    "title:{payload.title|hash}",
]
"#;
    let mut s = Streaming::start(SCHEMA, &[("events.toml", EVENTS)]).await;
    let keys = [
        "event:launch",
        "item:42",
        "doc:NOTE",
        "user:email:ada@example.com",
        "day:2024-01-31",
        "title:a430d84680aabd0b",
        "event:other",
    ];
    s.seed(&keys).await;
    s.db.execute(
        r#"set timezone = 'Europe/Berlin';
           insert into events values (1, 'Ada@Example.COM',
             '{"slug": "launch", "items": [{"id": 42}], "title": "hello"}',
             '{"meta": {"kind": "note"}}',
             '2024-01-31 23:30:00+00')"#,
    )
    .await;
    s.sync().await;
    assert_eq!(s.cached(&keys).await, ["event:other"]);
}

/// A table whose keys shape values (json numbers and objects, far and BC
/// dates) and whose conditions compare numbers, for `explain` against
/// `run`.
const DOCS: &str = "
    create table docs (
        id bigint primary key,
        total numeric(10,2),
        status text,
        payload jsonb,
        d date
    );
    alter table docs replica identity full;
    create publication evictd for table docs;
";

const DOCS_MAPPING: &str = r#"
[[table]]
name = "docs"
keys = [
    "doc:{id}",
    "doc:n:{payload.n}",
    "doc:o:{payload.o}",
    "doc:day:{d|date}",
    "doc:month:{d|month}",
    { template = "doc:big:{id}", when = "total >= 100" },
    { template = "doc:open:{status}", when = "status <> 'done' and total < 99.995" },
]
"#;

/// One random row: values as Postgres prints them (jsonb already in its
/// own text), and as `explain` is given them (numbers as strings, as the
/// README's explain example does).
fn random_doc(rng: &mut impl rand::Rng, id: u32) -> ([String; 4], String) {
    fn pick(rng: &mut impl rand::Rng, options: &[Option<&'static str>]) -> Option<&'static str> {
        options[rng.random_range(0..options.len())]
    }
    let total = pick(
        rng,
        &[
            Some("12.50"),
            Some("100.00"),
            Some("99.99"),
            Some("250.10"),
            None,
        ],
    );
    let status = pick(rng, &[Some("new"), Some("done"), None]);
    let payload = pick(
        rng,
        &[
            Some(r#"{"n": 1.50}"#),
            Some(r#"{"n": 100}"#),
            Some(r#"{"n": 12345678901234567890.123}"#),
            Some(r#"{"o": {"a": 1, "b": [1, 2.0]}}"#),
            Some(r#"{"m": 1}"#),
            None,
        ],
    );
    let d = pick(
        rng,
        &[
            Some("2024-01-31"),
            Some("12024-01-31"),
            Some("0044-03-15 BC"),
            None,
        ],
    );
    let sql = |value: Option<&str>| value.map_or("null".to_owned(), |v| format!("'{v}'"));
    // `total, status, payload, d` as SQL literals.
    let values = [total, status, payload, d].map(sql);
    // Written out, not through serde_json::Value: its numbers are floats.
    let string = |value: Option<&str>| value.map_or("null".to_owned(), |v| format!("\"{v}\""));
    let json = format!(
        r#"{{"id": {id}, "total": {}, "status": {}, "payload": {}, "d": {}}}"#,
        string(total),
        string(status),
        payload.unwrap_or("null"),
        string(d)
    );
    (values, json)
}

/// The exact keys an `explain` prints (`UNLINK key  # file:line`).
fn explained_keys(stdout: &str) -> std::collections::BTreeSet<String> {
    stdout
        .lines()
        .filter_map(|line| line.strip_prefix("UNLINK "))
        .filter(|rest| !rest.starts_with("MATCH "))
        .map(|rest| rest.split("  #").next().unwrap_or(rest).trim().to_owned())
        .collect()
}

#[tokio::test]
async fn explain_prints_what_run_applies_for_random_changes() {
    use futures_util::StreamExt as _;
    use rand::{Rng as _, SeedableRng as _};

    let s = Streaming::start(DOCS, &[("docs.toml", DOCS_MAPPING)]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = crate::support::run_config(
        dir.path(),
        &s.db,
        &crate::support::stack().redis.url(),
        DOCS_MAPPING,
        "127.0.0.1:0",
    );
    let mappings = config.parent().unwrap().join("mappings");
    let client = redis::Client::open(crate::support::stack().redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub.subscribe(&s.config.redis.l1_channel).await.unwrap();
    let mut messages = pubsub.on_message();
    let mut rng = rand::rngs::StdRng::seed_from_u64(34);
    let mut rows: std::collections::HashMap<u32, String> = Default::default();
    for round in 0..40 {
        let id = rng.random_range(1..5);
        let (op, sql, old, new) = match rows.get(&id).cloned() {
            None => {
                let ([total, status, payload, d], json) = random_doc(&mut rng, id);
                let sql =
                    format!("insert into docs values ({id}, {total}, {status}, {payload}, {d})");
                ("insert", sql, None, Some(json))
            }
            Some(old) if rng.random_bool(0.25) => {
                let sql = format!("delete from docs where id = {id}");
                ("delete", sql, Some(old), None)
            }
            Some(old) => {
                let ([total, status, payload, d], json) = random_doc(&mut rng, id);
                let sql = format!(
                    "update docs set total = {total}, status = {status}, payload = {payload}, d = {d} where id = {id}"
                );
                ("update", sql, Some(old), Some(json))
            }
        };
        match &new {
            Some(json) => rows.insert(id, json.clone()),
            None => rows.remove(&id),
        };
        s.db.execute(&sql).await;
        s.sync().await;
        // What run applied: the keys of this transaction's broadcast (none
        // when it invalidated nothing).
        let mut applied = std::collections::BTreeSet::new();
        if let Ok(Some(message)) =
            tokio::time::timeout(std::time::Duration::from_millis(300), messages.next()).await
        {
            let payload: String = message.get_payload().unwrap();
            let json: serde_json::Value = serde_json::from_str(&payload).unwrap();
            applied.extend(
                json["keys"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|k| k.as_str().unwrap().to_owned()),
            );
        }
        let mut args = vec![
            "explain".to_owned(),
            "--mappings".into(),
            mappings.display().to_string(),
            "--table".into(),
            "docs".into(),
            "--op".into(),
            op.into(),
            "--config".into(),
            config.display().to_string(),
        ];
        for (flag, row) in [("--old", &old), ("--new", &new)] {
            if let Some(row) = row {
                args.push(flag.into());
                args.push(row.clone());
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = crate::support::evictd(&args);
        let stdout = crate::support::stdout(&output);
        assert!(
            output.status.success(),
            "{stdout}{}",
            crate::support::stderr(&output)
        );
        assert_eq!(
            explained_keys(&stdout),
            applied,
            "round {round}: {sql}\nexplain:\n{stdout}{}",
            crate::support::stderr(&output)
        );
    }
}

/// The Python reader (`client/python/protocol_reader.py`) reading one key:
/// it prints `read <value>` after its database read, then waits to be
/// told to fill.
struct PythonReader {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl PythonReader {
    fn start(db: &crate::support::TestDb, key: &str, sql: &str) -> PythonReader {
        use tokio::io::AsyncBufReadExt as _;
        let root = env!("CARGO_MANIFEST_DIR");
        let mut child = tokio::process::Command::new("python3")
            .arg(format!("{root}/client/python/protocol_reader.py"))
            .arg(crate::support::stack().redis.port().to_string())
            .arg(&db.prefix)
            .arg(key)
            .arg("")
            .arg(format!("{root}/client/lua"))
            .arg("--")
            .args(["psql", &db.url, "-Atc", sql])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs");
        let lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        PythonReader { child, lines }
    }

    async fn read(&mut self) -> String {
        self.lines
            .next_line()
            .await
            .unwrap()
            .expect("the reader read")
    }

    /// Lets it fill; its outcome line.
    async fn fill(mut self) -> String {
        use tokio::io::AsyncWriteExt as _;
        let mut stdin = self.child.stdin.take().unwrap();
        stdin.write_all(b"go\n").await.unwrap();
        let line = self.read().await;
        assert!(self.child.wait().await.unwrap().success());
        line
    }
}

/// A throwaway Postgres of the test's own, with a database on it whose
/// keys go under `prefix`.
async fn own_server(prefix: &str) -> (evictd::testkit::Postgres, crate::support::TestDb) {
    let postgres = tokio::task::spawn_blocking(evictd::testkit::Postgres::start)
        .await
        .unwrap()
        .expect("postgres");
    let name = postgres.create_database().await.expect("database");
    let db = crate::support::TestDb {
        url: postgres.url(&name),
        name,
        prefix: format!("{prefix}{}:", std::process::id()),
    };
    (postgres, db)
}

/// The reproduction of a commit that reaches the WAL before other sessions
/// can see it: a synchronous standby that does not answer holds the
/// committing session in COMMIT after its commit record is flushed and
/// decoded. evictd must not invalidate until the commit is visible, or a
/// reader that misses in between refills the cache with the old row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_held_by_a_synchronous_standby_is_invalidated_once_visible() {
    use futures_util::StreamExt as _;

    // A server of its own: synchronous_standby_names is server-wide.
    let (_postgres, db) = own_server("vis").await;
    db.execute(
        "create table orders (id bigint primary key, status text not null);
         alter table orders replica identity full;
         create publication evictd for table orders;
         insert into orders values (1, 'new'), (2, 'new'), (3, 'new');
         create table filler (id bigint, pad text);",
    )
    .await;
    let dir = crate::support::mapping_dir(&[(
        "orders.toml",
        "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\n",
    )]);
    let mut config = crate::support::streaming_config(&db, dir.path());
    config.postgres.visibility_warn_ms = 200;
    let evictd = evictd::testkit::Evictd::start(&config)
        .await
        .expect("start");
    let mut cache = crate::support::Cache::new(&db.prefix).await;
    cache.seed(&["order:1"]).await;
    let client = redis::Client::open(crate::support::stack().redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub.subscribe(&config.redis.l1_channel).await.unwrap();
    let mut messages = pubsub.on_message();

    // A standby named synchronous that never connects.
    // ALTER SYSTEM runs outside a transaction block: a statement of its own.
    db.execute("alter system set synchronous_standby_names = 'ghost'")
        .await;
    db.execute("select pg_reload_conf()").await;
    let reader = db.client().await;
    loop {
        let row = reader
            .query_one("show synchronous_standby_names", &[])
            .await
            .unwrap();
        if row.get::<_, String>(0) == "ghost" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let writer = db.client().await;
    writer
        .batch_execute("set synchronous_commit = on")
        .await
        .unwrap();
    let committing = tokio::spawn(async move {
        writer
            // One transaction, large enough (past the server's 64 kB
            // logical_decoding_work_mem) to be streamed before its commit.
            .batch_execute(
                "update orders set status = 'refunded' where id in (1, 2, 3);
                 insert into filler select g, repeat('x', 200) from generate_series(1, 2000) g",
            )
            .await
            .expect("the commit returns once the standby is no longer required");
    });
    // The commit is in the WAL and decoded; it is not yet visible.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(
        !committing.is_finished(),
        "the commit waits for the standby"
    );
    let status: String = reader
        .query_one("select status from orders where id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "new", "other sessions still read the old row");
    // A fenced reader (the client crate) that misses now loads the old row
    // and stores it: legitimately, the commit is not visible yet. The
    // invalidation must come after this, not before.
    let fenced = evictd_client::Cache::builder(crate::support::stack().redis.url())
        .prefix(db.prefix.clone())
        .build()
        .await
        .expect("a cache");
    let loaded: Option<String> = fenced
        .get_or_load("order:2", &[], || async {
            let row = reader
                .query_one("select status from orders where id = 2", &[])
                .await
                .expect("order 2");
            Ok::<_, std::convert::Infallible>(Some(row.get::<_, String>(0)))
        })
        .await
        .expect("get_or_load");
    assert_eq!(loaded.as_deref(), Some("new"));
    // So does the Python reader written from docs/PROTOCOL.md: it takes
    // its lease and reads the old row of order 3, and fills only later.
    let mut python = PythonReader::start(&db, "order:3", "select status from orders where id = 3");
    assert_eq!(python.read().await, "read new");
    assert_eq!(
        cache.cached(&["order:1"]).await,
        ["order:1"],
        "invalidated before the commit was visible"
    );
    let reason = evictd.running().visibility.borrow().clone();
    assert!(
        reason
            .as_deref()
            .is_some_and(|reason| reason.starts_with("visibility: transaction")),
        "{reason:?}"
    );

    // The standby is no longer required: the commit returns, becomes
    // visible, and only then is the key invalidated and broadcast. A plain
    // reader that reads after the broadcast reads the new row.
    db.execute("alter system reset synchronous_standby_names")
        .await;
    db.execute("select pg_reload_conf()").await;
    committing.await.unwrap();
    let broadcast = tokio::time::timeout(std::time::Duration::from_secs(10), messages.next())
        .await
        .expect("a broadcast")
        .expect("subscribed");
    let payload: String = broadcast.get_payload().unwrap();
    assert!(payload.contains("order:1"), "{payload}");
    let status: String = db
        .client()
        .await
        .query_one("select status from orders where id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "refunded", "read after the broadcast");
    evictd.sync().await.expect("sync");
    // Exact once the commit returned: neither the seeded value nor the
    // fenced reader's fill of the old row survives.
    assert!(cache.cached(&["order:1", "order:2"]).await.is_empty());
    let streamed: i64 = db
        .client()
        .await
        .query_one(
            "select stream_txns from pg_stat_replication_slots where slot_name = $1",
            &[&config.postgres.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert!(streamed >= 1, "the held transaction was streamed");
    // The Python reader's fill comes after the invalidation, which took
    // its lease: refused.
    assert_eq!(python.fill().await, "fill fenced");
    assert!(cache.cached(&["order:3"]).await.is_empty());
    assert_eq!(*evictd.running().visibility.borrow(), None);
    evictd.stop().await.expect("stop");
}

/// A server of the test's own with table `items` (`rows` rows, mapped to
/// `item:{id}`), a physical standby of it that applies commits `delay`
/// late, and evictd's config with the standby named as its replica,
/// `{prefix}-standby`: the metrics recorder is the process's, shared with
/// the tests running beside this one, so each names its replica apart.
struct Replicated {
    _postgres: evictd::testkit::Postgres,
    standby: evictd::testkit::Postgres,
    db: crate::support::TestDb,
    _mappings: tempfile::TempDir,
    config: evictd::config::Config,
}

impl Replicated {
    async fn start(prefix: &str, rows: i64, delay: std::time::Duration) -> Replicated {
        // A server of its own: its standby copies it whole.
        let (mut postgres, db) = own_server(prefix).await;
        db.execute(&format!(
            "create table items (id bigint primary key, v bigint not null);
             create publication evictd for table items;
             insert into items select g, 0 from generate_series(1, {rows}) g;"
        ))
        .await;
        let standby = {
            let primary = &mut postgres;
            std::thread::scope(|scope| scope.spawn(|| primary.standby(delay)).join().unwrap())
                .expect("a standby")
        };
        let mappings = crate::support::mapping_dir(&[(
            "items.toml",
            "[[table]]\nname = \"items\"\nkeys = [\"item:{id}\"]\n",
        )]);
        let mut config = crate::support::streaming_config(&db, mappings.path());
        config.postgres.replicas = vec![evictd::config::ReplicaConfig {
            name: format!("{prefix}-standby"),
            url: evictd::config::SecretUrl::parse(&standby.url(&db.name)).unwrap(),
        }];
        Replicated {
            _postgres: postgres,
            standby,
            db,
            _mappings: mappings,
            config,
        }
    }
}

/// Readers that read from a read replica which replays 200 ms late: each
/// of evictd's first invalidations lands while the replica still shows the
/// old row, so fenced readers refill it. With the replica named in
/// `[[postgres.replica]]`, evictd invalidates again once the replica has
/// replayed the batch: after quiesce, nothing cached is stale. Then the
/// replica goes away: `/readyz` names it, `evictd_replica_up` is 0, and a
/// batch waits no longer than `replica_max_wait_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_readers_on_a_lagging_replica_leave_nothing_stale() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use rand::Rng as _;

    const ROWS: i64 = 20;
    const WRITES: usize = 1_000;
    // Installed before evictd records anything.
    let recorder = evictd::internal::telemetry::recorder();
    let Replicated {
        _postgres,
        standby,
        db,
        _mappings,
        mut config,
    } = Replicated::start("rep", ROWS, Duration::from_millis(200)).await;
    let name = db.name.clone();
    config.postgres.replica_max_wait_ms = 3_000;
    let evictd = evictd::testkit::Evictd::start(&config)
        .await
        .expect("start");

    let stop = Arc::new(AtomicBool::new(false));
    let loads = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for _ in 0..3 {
        let (stop, loads) = (stop.clone(), loads.clone());
        let (url, prefix) = (standby.url(&name), db.prefix.clone());
        readers.push(tokio::spawn(async move {
            let (replica, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("the replica");
            tokio::spawn(connection);
            let cache = evictd_client::Cache::builder(crate::support::stack().redis.url())
                .prefix(prefix)
                .build()
                .await
                .expect("a cache");
            while !stop.load(Ordering::Relaxed) {
                let id = rand::rng().random_range(1..=ROWS);
                let _: Option<i64> = cache
                    .get_or_load(&format!("item:{id}"), &[], || async {
                        loads.fetch_add(1, Ordering::Relaxed);
                        let row = replica
                            .query_one("select v from items where id = $1", &[&id])
                            .await?;
                        Ok::<_, tokio_postgres::Error>(Some(row.get::<_, i64>(0)))
                    })
                    .await
                    .expect("get_or_load");
            }
        }));
    }
    let writer = db.client().await;
    for _ in 0..WRITES {
        let id = rand::rng().random_range(1..=ROWS);
        writer
            .execute("update items set v = v + 1 where id = $1", &[&id])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Every batch is acknowledged only once its second invalidation, after
    // the replica replayed it, is applied.
    evictd.sync().await.expect("sync");
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.await.unwrap();
    }
    let loads = loads.load(Ordering::Relaxed);
    assert!(
        loads > 200,
        "the readers loaded {loads} rows from the replica"
    );
    let check = evictd_client::Cache::builder(crate::support::stack().redis.url())
        .prefix(db.prefix.clone())
        .build()
        .await
        .expect("a cache");
    let mut stale = Vec::new();
    for id in 1..=ROWS {
        let fresh: i64 = writer
            .query_one("select v from items where id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        let cached: Option<i64> = check
            .get_or_load(&format!("item:{id}"), &[], || async {
                Ok::<_, std::convert::Infallible>(Some(fresh))
            })
            .await
            .expect("get_or_load");
        if cached != Some(fresh) {
            stale.push(format!("item:{id} holds {cached:?}, the row {fresh}"));
        }
    }
    assert!(
        stale.is_empty(),
        "{} stale after {WRITES} writes and {loads} loads: {stale:?}",
        stale.len()
    );
    let rendered = recorder.render();
    assert!(
        rendered.contains(r#"evictd_replica_up{replica="rep-standby"} 1"#),
        "{rendered}"
    );
    assert_eq!(*evictd.running().replicas.borrow(), None);

    // The replica goes away: named on /readyz, up 0, and a batch is
    // released once replica_max_wait_ms has passed.
    drop(standby);
    let mut replicas = evictd.running().replicas.clone();
    tokio::time::timeout(
        Duration::from_secs(10),
        replicas.wait_for(|reason| {
            reason
                .as_deref()
                .is_some_and(|reason| reason.contains("replica rep-standby cannot be asked"))
        }),
    )
    .await
    .expect("the replica is named")
    .unwrap();
    let rendered = recorder.render();
    assert!(
        rendered.contains(r#"evictd_replica_up{replica="rep-standby"} 0"#),
        "{rendered}"
    );
    let timed_out = |rendered: &str| {
        rendered
            .lines()
            .find_map(|line| {
                line.strip_prefix(r#"evictd_replica_invalidations_total{outcome="timed_out"} "#)?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
    };
    let before = timed_out(&rendered);
    writer
        .execute("update items set v = v + 1 where id = 1", &[])
        .await
        .unwrap();
    let started = std::time::Instant::now();
    evictd.sync().await.expect("sync");
    assert!(
        started.elapsed() >= Duration::from_millis(2_500),
        "released after {:?}",
        started.elapsed()
    );
    assert!(timed_out(&recorder.render()) > before);
    evictd.stop().await.expect("stop");
}

/// Past `postgres.replica_pending_keys`, the keys a batch holds for its
/// second invalidation turn into their family's pattern: memory stays
/// bounded, and the second invalidation still covers them (and more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_keys_past_the_bound_fold_into_their_family_pattern() {
    use std::time::Duration;

    let recorder = evictd::internal::telemetry::recorder();
    let folded = || {
        recorder
            .render()
            .lines()
            .find_map(|line| {
                line.strip_prefix("evictd_replica_folded_keys_total ")?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
    };
    let Replicated {
        _postgres,
        standby: _standby,
        db,
        _mappings,
        mut config,
    } = Replicated::start("fold", 30, Duration::from_millis(1_500)).await;
    config.postgres.replica_pending_keys = 10;
    let evictd = evictd::testkit::Evictd::start(&config)
        .await
        .expect("start");
    let mut cache = crate::support::Cache::new(&db.prefix).await;
    let before = folded();
    // 30 keys in one batch: past the bound of 10.
    db.execute("update items set v = v + 1").await;
    let first: Vec<String> = (1..=30).map(|id| format!("item:{id}")).collect();
    let first: Vec<&str> = first.iter().map(String::as_str).collect();
    // After the first invalidation, refills from the replica (old rows)
    // and a key of the family no change named.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while folded() == before {
        assert!(std::time::Instant::now() < deadline, "nothing folded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cache.seed(&first).await;
    cache.seed(&["item:999"]).await;
    evictd.sync().await.expect("sync");
    // The 30 keys folded, unless the transaction reached evictd in more
    // than one batch (streamed in parts under load): then those of the
    // batches past the bound did, at least 11.
    let folded_keys = folded() - before;
    assert!(
        (11..=30).contains(&folded_keys),
        "{folded_keys} keys folded"
    );
    // The second invalidation went by the family's pattern.
    assert!(cache.cached(&first).await.is_empty());
    assert!(cache.cached(&["item:999"]).await.is_empty());
    evictd.stop().await.expect("stop");
}
