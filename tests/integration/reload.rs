//! Live reload of the mapping files under a running pipeline, through real
//! WAL: a reload that maps more tables (one of them missing from the
//! publication) while writes continue, and reloads that are refused.

use std::time::Duration;

use evictd::change::TableName;

use crate::support::Streaming;

const SCHEMA: &str = "
    create table users (id bigint primary key, email text not null);
    create table orders (id bigint primary key, user_id bigint not null);
    create table items (id bigint primary key, order_id bigint not null);
    alter table users replica identity full;
    alter table orders replica identity full;
    alter table items replica identity full;
    create publication evictd for table users, orders;
";

const USERS: &str = "[[table]]\nname = \"users\"\nkeys = [\"user:{id}\"]\n";

const ORDERS_AND_ITEMS: &str = "
[[table]]
name = \"orders\"
keys = [\"order:{id}\", \"user:{user_id}:orders\"]

[[table]]
name = \"items\"
keys = [\"item:{id}\", \"order:{order_id}:items\"]
";

fn reloads(outcome: &str) -> u64 {
    let rendered = evictd::internal::telemetry::recorder().render();
    let name = format!("evictd_mapping_reloads_total{{outcome=\"{outcome}\"}}");
    rendered
        .lines()
        .find_map(|line| line.strip_prefix(&name)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until the running mappings satisfy `done`.
async fn until_mappings(s: &Streaming, done: impl Fn(&evictd::mapping::Mappings) -> bool) {
    let waited = async {
        while !done(&s.evictd.mappings()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), waited)
        .await
        .expect("the reload took effect");
}

/// Waits until `outcome` was counted more than `before` times.
async fn until_counted(outcome: &str, before: u64) {
    let waited = async {
        while reloads(outcome) <= before {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), waited)
        .await
        .unwrap_or_else(|_| panic!("a reload counted as {outcome}"));
}

fn orders() -> TableName {
    TableName::new("public", "orders")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_maps_new_tables_while_writes_continue_and_misses_nothing() {
    evictd::internal::telemetry::recorder();
    let mut s = Streaming::start(SCHEMA, &[("users.toml", USERS)]).await;
    let users: Vec<String> = (1..=300).map(|id| format!("user:{id}")).collect();
    let users: Vec<&str> = users.iter().map(String::as_str).collect();
    s.seed(&users).await;
    // Orders are published but not mapped yet: their relation is known to
    // the stream as unmapped.
    s.db.execute("insert into orders values (1, 1)").await;
    s.sync().await;
    let applied_before = reloads("applied");

    // A writer that keeps committing user rows across the reload.
    let writer = {
        let client = s.db.client().await;
        tokio::spawn(async move {
            for id in 1..=300_i64 {
                client
                    .execute("insert into users values ($1, 'x')", &[&id])
                    .await
                    .expect("insert user");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(s.config.mappings.dir.join("orders.toml"), ORDERS_AND_ITEMS)
        .expect("write the new mapping");
    until_mappings(&s, |m| m.table(&orders()).is_some()).await;
    assert!(reloads("applied") > applied_before);
    // `items` was not in the publication: the reload added it.
    let published: i64 = s
        .db
        .client()
        .await
        .query_one(
            "select count(*) from pg_publication_tables where pubname = 'evictd' and tablename = 'items'",
            &[],
        )
        .await
        .expect("publication query")
        .get(0);
    assert_eq!(published, 1, "items was added to the publication");

    let keys = [
        "order:2",
        "user:7:orders",
        "item:3",
        "order:2:items",
        "order:9",
    ];
    s.seed(&keys).await;
    s.db.execute("insert into orders values (2, 7); insert into items values (3, 2)")
        .await;
    writer.await.expect("writer");
    s.sync().await;
    assert_eq!(s.cached(&keys).await, ["order:9"]);
    assert!(
        s.cached(&users).await.is_empty(),
        "every user change across the reload was invalidated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_reload_is_refused_and_the_running_mappings_stay() {
    evictd::internal::telemetry::recorder();
    let mut s = Streaming::start(SCHEMA, &[("users.toml", USERS)]).await;
    let dir = s.config.mappings.dir.clone();
    // Does not parse.
    let invalid = reloads("invalid");
    std::fs::write(dir.join("orders.toml"), "[[table]\nname = \"orders\"\n").expect("write");
    until_counted("invalid", invalid).await;
    // Parses, but names a column the table does not have: the live check
    // refuses it.
    let invalid = reloads("invalid");
    std::fs::write(
        dir.join("orders.toml"),
        "[[table]]\nname = \"orders\"\nkeys = [\"order:{nope}\"]\n",
    )
    .expect("write");
    until_counted("invalid", invalid).await;
    assert!(s.evictd.mappings().table(&orders()).is_none());
    // The running mappings still work.
    s.seed(&["user:1", "order:1"]).await;
    s.db.execute("insert into users values (1, 'a'); insert into orders values (1, 1)")
        .await;
    s.sync().await;
    assert_eq!(s.cached(&["user:1", "order:1"]).await, ["order:1"]);
    // Fixed, and asked for explicitly (SIGHUP under `evictd run`).
    std::fs::write(
        dir.join("orders.toml"),
        "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\n",
    )
    .expect("write");
    s.evictd.reload_mappings();
    until_mappings(&s, |m| m.table(&orders()).is_some()).await;
    s.db.execute("update orders set user_id = 2 where id = 1")
        .await;
    s.sync().await;
    assert!(s.cached(&["order:1"]).await.is_empty());
}
