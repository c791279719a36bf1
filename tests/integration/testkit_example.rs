//! What an application's own test looks like (docs/TESTKIT.md shows this
//! file up to the end of the first test). It uses only evictd's public API
//! (the `testkit` feature), the crates the testkit re-exports and
//! `tempfile`, so it can be copied as is.

use evictd::config::{Config, SecretUrl};
use evictd::testkit::{Evictd, Postgres, Redis};

const SCHEMA: &str = "
    create table orders (id bigint primary key, user_id bigint not null, total numeric not null);
    alter table orders replica identity full;
    create publication evictd for table orders;
";

const MAPPING: &str = r#"
[[table]]
name = "orders"
keys = ["user:{user_id}:orders"]
"#;

#[evictd::testkit::deps::tokio::test(crate = "evictd::testkit::deps::tokio")]
async fn placing_an_order_invalidates_the_users_order_list() {
    let postgres = Postgres::start().unwrap();
    let redis = Redis::start().unwrap();
    let db = postgres.create_database().await.unwrap();
    postgres.execute(&db, SCHEMA).await.unwrap();
    let mappings = tempfile::tempdir().unwrap();
    std::fs::write(mappings.path().join("orders.toml"), MAPPING).unwrap();
    let config = Config::with_defaults(
        SecretUrl::parse(&postgres.url(&db)).unwrap(),
        SecretUrl::parse(&redis.url()).unwrap(),
        mappings.path().into(),
    );
    let evictd = Evictd::start(&config).await.unwrap();
    redis.set("user:1:orders", "[]").await.unwrap();
    redis.set("user:2:orders", "[]").await.unwrap();

    // What the application does: place an order for user 1.
    postgres
        .execute(&db, "insert into orders values (1, 1, 12.50)")
        .await
        .unwrap();
    evictd.sync().await.unwrap();

    assert_eq!(redis.get("user:1:orders").await.unwrap(), None);
    assert_eq!(
        redis.get("user:2:orders").await.unwrap().as_deref(),
        Some("[]")
    );
    evictd.stop().await.unwrap();
}

#[test]
fn a_testkit_error_prints_as_the_cli_would() {
    let runtime = evictd::testkit::deps::tokio::runtime::Runtime::new().unwrap();
    let mappings = tempfile::tempdir().unwrap();
    std::fs::write(
        mappings.path().join("orders.toml"),
        "[[table]]\nname = \"orders\"\nkeys = [\"order:{id\"]\n",
    )
    .unwrap();
    let config = Config::with_defaults(
        SecretUrl::parse("postgres://127.0.0.1:1/none").unwrap(),
        SecretUrl::parse("redis://127.0.0.1:1").unwrap(),
        mappings.path().into(),
    );
    let error = runtime
        .block_on(Evictd::start(&config))
        .err()
        .expect("the mapping does not load");
    // `.unwrap()` prints the Debug form: the same lines as the CLI.
    let printed = format!("{error:?}");
    assert!(
        printed.starts_with("the mappings do not load:\n"),
        "{printed}"
    );
    assert!(printed.contains("orders.toml:3:"), "{printed}");
    assert!(
        !printed.contains("\\n") && !printed.contains("Start("),
        "{printed}"
    );
}
