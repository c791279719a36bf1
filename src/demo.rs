//! `evictd demo`: a throwaway Postgres and Redis, the demo shop schema and
//! mappings, a short mixed workload, and what evictd did about each commit,
//! as it happens, read back from the L1 broadcast channel.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;

use crate::config::{Config, Secret, SecretUrl};
use crate::mapping::message::AllowList;
use crate::mapping::{self, Diagnostic};
use crate::pipeline::{self, Options};
use crate::testkit::{Postgres, Redis};

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Setup(String),
    #[error("the mappings do not load")]
    Mappings(Vec<Diagnostic>),
}

fn setup(what: &str) -> impl FnOnce(String) -> DemoError + '_ {
    move |error| DemoError::Setup(format!("{what}: {error}"))
}

/// The workload: (what it does, SQL in one transaction).
const WORKLOAD: &[(&str, &str)] = &[
    ("two categories", "insert into categories (id, slug, name) values (1, 'books', 'Books'), (2, 'games', 'Games')"),
    ("two users", "insert into users (id, email, name) values (1, 'ada@example.com', 'Ada'), (2, 'bob@example.com', 'Bob')"),
    ("a product", "insert into products (id, sku, name, category_id, price) values (10, 'B-1', 'Rust in Action', 1, 39.90)"),
    ("Ada orders", "insert into orders (id, user_id, status, total) values (100, 1, 'new', 39.90)"),
    ("the order is paid", "update orders set status = 'paid' where id = 100"),
    ("the order moves from Ada to Bob", "update orders set user_id = 2 where id = 100"),
    ("the product moves to another category", "update products set category_id = 2 where id = 10"),
    ("Bob changes his name", "update users set name = 'Robert' where id = 2"),
    ("a column no mapping watches (`created_at`, filtered by `changed`)", "update users set created_at = now() where id = 1"),
    ("a rolled-back order", "begin; insert into orders (id, user_id) values (101, 1); rollback"),
    ("two orders in one transaction", "insert into orders (id, user_id, total) values (102, 1, 5), (103, 2, 7)"),
    ("an order is cancelled", "delete from orders where id = 102"),
    ("the order ships (it leaves `when`: Bob's open orders go once more)", "update orders set status = 'shipped' where id = 100"),
    ("an invalidation from SQL, in the application's transaction", "begin; update products set price = 35 where id = 10; select evictd_invalidate(keys => array['report:sales'], prefixes => array['search:books:']); commit"),
];

/// Runs the demo, printing to stdout.
pub async fn run(migrations: &Path, mappings_dir: &Path) -> Result<(), DemoError> {
    let mappings =
        mapping::load_dir(mappings_dir, mapping::Limits::default()).map_err(DemoError::Mappings)?;
    println!("starting a throwaway Postgres and Redis ...");
    let postgres = tokio::task::spawn_blocking(Postgres::start)
        .await
        .map_err(|e| DemoError::Setup(e.to_string()))?
        .map_err(|e| setup("Postgres")(e.to_string()))?;
    let redis = Redis::start().map_err(|e| setup("Redis")(e.to_string()))?;
    let database = postgres
        .create_database()
        .await
        .map_err(|e| setup("database")(e.to_string()))?;
    let url = postgres.url(&database);
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .map_err(|e| setup("connect")(e.to_string()))?;
    tokio::spawn(connection);
    // The throwaway server defers WAL flushes for speed; the demo's own
    // commits wait for theirs, so the lag shown is evictd's, not the disk's.
    client
        .batch_execute("set synchronous_commit = on")
        .await
        .map_err(|e| setup("session")(e.to_string()))?;
    apply_migrations(&client, migrations).await?;
    println!(
        "postgres on port {}, redis on port {}; schema from {}, mappings from {}\n",
        postgres.port(),
        redis.port(),
        migrations.display(),
        mappings_dir.display()
    );

    let mut config = Config::with_defaults(
        SecretUrl::parse(&url).map_err(setup("url"))?,
        SecretUrl::parse(&redis.url()).map_err(setup("url"))?,
        mappings_dir.to_path_buf(),
    );
    // Invalidations from SQL, signed with a secret of this run's (the
    // database and evictd share it) and bounded to what the workload names.
    let secret: String = (0..32)
        .map(|_| char::from_digit(rand::random_range(0..16), 16).unwrap_or('0'))
        .collect();
    client
        .execute(
            "insert into evictd.message_secret (secret) values ($1)",
            &[&secret],
        )
        .await
        .map_err(|e| setup("message secret")(e.to_string()))?;
    let secret_dir = tempfile::tempdir().map_err(|e| setup("message secret")(e.to_string()))?;
    let secret_file = secret_dir.path().join("sql_messages_secret");
    std::fs::write(&secret_file, &secret).map_err(|e| setup("message secret")(e.to_string()))?;
    config.mappings.sql_messages = true;
    config.mappings.sql_messages_secrets = vec![Secret::File(secret_file)];
    config.mappings.sql_messages_allow = Some(AllowList {
        keys: vec!["report:*".into()],
        tags: Vec::new(),
        prefixes: vec!["search:*".into()],
    });
    let pubsub_client =
        redis::Client::open(redis.url()).map_err(|e| setup("redis")(e.to_string()))?;
    let mut pubsub = pubsub_client
        .get_async_pubsub()
        .await
        .map_err(|e| setup("subscribe")(e.to_string()))?;
    pubsub
        .subscribe(&config.redis.l1_channel)
        .await
        .map_err(|e| setup("subscribe")(e.to_string()))?;
    let options = Options {
        status_interval: Duration::from_millis(50),
        ..Options::default()
    };
    let running = pipeline::start(&config, Arc::new(mappings), options)
        .map_err(|e| setup("evictd")(e.to_string()))?;
    let running = running
        .streaming_within(Duration::from_secs(30))
        .await
        .map_err(DemoError::Setup)?;
    let mut messages = pubsub.on_message();
    for (what, sql) in WORKLOAD {
        println!("> {what}\n  {sql}");
        client
            .batch_execute(sql)
            .await
            .map_err(|e| setup("workload")(e.to_string()))?;
        // Each transaction's invalidations arrive as one L1 message; a
        // transaction that touched no cached key produces none.
        match tokio::time::timeout(Duration::from_millis(300), messages.next()).await {
            Ok(Some(message)) => {
                print_broadcast(&message.get_payload::<String>().unwrap_or_default())
            }
            _ => println!("  (nothing to invalidate)"),
        }
    }
    drop(messages);
    // Stopping applies what was read; the summary is taken after that.
    let progress = running.progress.clone();
    let lag = running.lag.clone();
    running.stop();
    running
        .wait()
        .await
        .map_err(|e| setup("evictd")(e.to_string()))?;
    let progress = progress.borrow().clone();
    let lag = lag
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .commit_to_apply
        .clone();
    println!(
        "\nsummary: {} row changes, {} keys invalidated or refreshed, commit-to-Redis lag p50 {:.1} ms, p99 {:.1} ms",
        progress.changes,
        progress.keys,
        lag.quantile(0.5).as_secs_f64() * 1000.0,
        lag.quantile(0.99).as_secs_f64() * 1000.0
    );
    println!("stopping the throwaway servers");
    drop(redis);
    tokio::task::spawn_blocking(move || drop(postgres))
        .await
        .map_err(|e| DemoError::Setup(e.to_string()))?;
    Ok(())
}

async fn apply_migrations(client: &tokio_postgres::Client, dir: &Path) -> Result<(), DemoError> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| setup("migrations")(format!("{}: {e}", dir.display())))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "sql"))
        .collect();
    files.sort();
    for file in files {
        let sql = std::fs::read_to_string(&file).map_err(|e| setup("migrations")(e.to_string()))?;
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| setup("migration")(format!("{}: {e}", file.display())))?;
    }
    Ok(())
}

fn print_broadcast(payload: &str) {
    let Ok(message) = serde_json::from_str::<serde_json::Value>(payload) else {
        return;
    };
    let list = |field: &str| -> Vec<String> {
        message[field]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|item| item.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let lsn = message["lsn"].as_str().unwrap_or("-");
    println!("  commit {lsn} (L1 seq {}):", message["seq"]);
    let keys = list("keys");
    if !keys.is_empty() {
        println!("    keys {}", keys.join(", "));
    }
    let tags = list("tags");
    if !tags.is_empty() {
        println!("    tags {}", tags.join(", "));
    }
    let patterns = list("patterns");
    if !patterns.is_empty() {
        println!("    patterns {}", patterns.join(", "));
    }
}
