//! `check` against a real Postgres: each live problem is reported at the
//! mapping rule it concerns, and a correct setup passes.

mod support;

use evictd::catalog;
use evictd::config::SecretUrl;
use evictd::mapping::{self, Limits, Mappings};
use support::{evictd, mapping_dir, repo_path, stdout, TestDb};

fn load(text: &str) -> Mappings {
    mapping::load_str("m.toml", text, Limits::default()).expect("mapping loads")
}

async fn live_problems(db: &TestDb, mappings: &Mappings) -> Vec<String> {
    let url = SecretUrl::parse(&db.url).expect("url");
    let client = catalog::connect(&url).await.expect("connect");
    catalog::check(mappings, &client, "evictd")
        .await
        .expect("checks run")
        .iter()
        .map(ToString::to_string)
        .collect()
}

const SCHEMA: &str = "
    create table orders (id bigint primary key, user_id bigint not null, status text);
    alter table orders replica identity full;
    create publication evictd for table orders;
";

#[tokio::test]
async fn the_demo_schema_and_mappings_pass() {
    let db = TestDb::new().await;
    db.migrate().await;
    let output = evictd(&[
        "check",
        "--mappings",
        repo_path("mappings").to_str().unwrap(),
        "--database-url",
        &db.url,
    ]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}{}",
        stdout(&output),
        support::stderr(&output)
    );
    assert!(
        stdout(&output).contains("checked against the database"),
        "{}",
        stdout(&output)
    );
}

#[tokio::test]
async fn a_missing_column_is_reported_at_its_template() {
    let db = TestDb::new().await;
    db.execute(SCHEMA).await;
    let mappings =
        load("[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\", \"user:{usr_id}:orders\"]\n");
    assert_eq!(
        live_problems(&db, &mappings).await,
        ["m.toml:3:23: error: column `usr_id` does not exist in table public.orders\n  help: did you mean `user_id`?"]
    );
}

#[tokio::test]
async fn a_missing_table_is_reported_with_a_suggestion() {
    let db = TestDb::new().await;
    db.execute(SCHEMA).await;
    let mappings = load("[[table]]\nname = \"order\"\nkeys = [\"order:{id}\"]\n");
    assert_eq!(
        live_problems(&db, &mappings).await,
        ["m.toml:2:8: error: table public.order does not exist\n  help: did you mean public.orders?"]
    );
}

#[tokio::test]
async fn a_table_outside_the_publication_is_reported() {
    let db = TestDb::new().await;
    db.execute(SCHEMA).await;
    db.execute("create table users (id bigint primary key, name text)")
        .await;
    let mappings = load("[[table]]\nname = \"users\"\nkeys = [\"user:{id}\"]\n");
    assert_eq!(
        live_problems(&db, &mappings).await,
        ["m.toml:2:8: error: table public.users is not in publication `evictd`\n  help: ALTER PUBLICATION evictd ADD TABLE public.users"]
    );
}

#[tokio::test]
async fn replica_identity_default_is_reported_where_full_is_needed() {
    let db = TestDb::new().await;
    db.execute(SCHEMA).await;
    db.execute("alter table orders replica identity default")
        .await;
    let mappings = load(
        "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\ntags = [\"user:{user_id}\"]\n",
    );
    assert_eq!(
        live_problems(&db, &mappings).await,
        ["m.toml:4:9: error: template `user:{user_id}` reads the old value of user_id, which REPLICA IDENTITY DEFAULT of public.orders does not send; updates and deletes would fall back to a pattern delete\n  help: ALTER TABLE public.orders REPLICA IDENTITY FULL"]
    );
    // Keys of primary key columns only are fine under DEFAULT; so is a
    // mapping that acts on inserts only.
    let inserts_only =
        load("[[table]]\nname = \"orders\"\nkeys = [\"user:{user_id}\"]\non = [\"insert\"]\n");
    assert_eq!(
        live_problems(&db, &inserts_only).await,
        Vec::<String>::new()
    );
    let key_only = load("[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\n");
    assert_eq!(live_problems(&db, &key_only).await, Vec::<String>::new());
}

#[tokio::test]
async fn a_table_without_primary_key_is_reported() {
    let db = TestDb::new().await;
    db.execute(
        "create table events (id bigint, kind text); create publication evictd for table events",
    )
    .await;
    let mappings = load("[[table]]\nname = \"events\"\nkeys = [\"event:{id}\"]\n");
    assert_eq!(
        live_problems(&db, &mappings).await,
        ["m.toml:2:8: error: table public.events has no primary key, so REPLICA IDENTITY DEFAULT sends no old row\n  help: ALTER TABLE public.events REPLICA IDENTITY FULL"]
    );
}

#[tokio::test]
async fn a_missing_publication_and_unpublished_ops_are_reported() {
    let db = TestDb::new().await;
    db.execute("create table orders (id bigint primary key)")
        .await;
    let mappings = load("[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\n");
    assert_eq!(
        live_problems(&db, &mappings).await,
        ["error: publication `evictd` does not exist\n  help: CREATE PUBLICATION evictd FOR TABLE public.orders"]
    );
    db.execute(
        "create publication evictd for table orders with (publish = 'insert, update, delete')",
    )
    .await;
    assert_eq!(
        live_problems(&db, &mappings).await,
        ["m.toml:2:8: error: publication `evictd` does not publish truncate, which the mapping of public.orders acts on\n  help: ALTER PUBLICATION evictd SET (publish = 'insert, update, delete, truncate'), or remove truncate from `on`"]
    );
}

#[tokio::test]
async fn a_column_outside_the_publication_column_list_is_reported() {
    let db = TestDb::new().await;
    db.execute(
        "create table orders (id bigint primary key, user_id bigint, secret text);
         alter table orders replica identity full;
         create publication evictd for table orders (id, secret)",
    )
    .await;
    let mappings = load("[[table]]\nname = \"orders\"\nkeys = [\"user:{user_id}\"]\n");
    assert_eq!(
        live_problems(&db, &mappings).await,
        ["m.toml:2:8: error: publication `evictd` does not publish column(s) user_id of public.orders\n  help: add them to the publication's column list for public.orders, or drop the column list"]
    );
}

#[tokio::test]
async fn the_cli_lists_every_live_problem_and_exits_2() {
    let db = TestDb::new().await;
    db.execute(SCHEMA).await;
    db.execute("create table users (id bigint primary key)")
        .await;
    let dir = mapping_dir(&[
        (
            "orders.toml",
            "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\", \"x:{nope}\"]\n",
        ),
        (
            "users.toml",
            "[[table]]\nname = \"users\"\nkeys = [\"user:{id}\"]\n",
        ),
    ]);
    let output = evictd(&[
        "check",
        "--mappings",
        dir.path().to_str().unwrap(),
        "--database-url",
        &db.url,
    ]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(
        text.contains(
            "orders.toml:3:23: error: column `nope` does not exist in table public.orders"
        ),
        "{text}"
    );
    assert!(
        text.contains("users.toml:2:8: error: table public.users is not in publication `evictd`"),
        "{text}"
    );
    assert!(text.ends_with("2 problems found\n"), "{text}");
}

#[tokio::test]
async fn the_cli_reads_the_database_from_the_config() {
    let db = TestDb::new().await;
    db.migrate().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("evictd.toml");
    let mappings = repo_path("mappings");
    std::fs::write(
        &config,
        format!(
            "[postgres]\nurl = \"{}\"\n[mappings]\ndir = \"{}\"\n",
            db.url,
            mappings.display()
        ),
    )
    .expect("write config");
    let output = evictd(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}{}",
        stdout(&output),
        support::stderr(&output)
    );
    let unreachable = "postgres://nobody@127.0.0.1:1/none";
    let output = evictd(&[
        "check",
        "--config",
        config.to_str().unwrap(),
        "--database-url",
        unreachable,
    ]);
    assert_eq!(
        output.status.code(),
        Some(1),
        "a runtime failure: {}",
        support::stderr(&output)
    );
    assert!(support::stderr(&output)
        .contains("cannot connect to Postgres at postgres://nobody@127.0.0.1:1/none"));
}
