//! Postgres connections that break: the walsender is terminated, or the
//! server crashes right after an acknowledgement. evictd reconnects,
//! resumes from the slot, and nothing committed is missed.

use crate::support::{mapping_dir, redis_connection, stack, Streaming};
use evictd::config::SecretUrl;
use evictd::testkit::{Evictd, Postgres};

const SCHEMA: &str = "
    create table orders (id bigint primary key, status text not null);
    create publication evictd for table orders;
";
const MAPPING: &str = "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_walsender_is_reconnected() {
    let mut s = Streaming::start(SCHEMA, &[("orders.toml", MAPPING)]).await;
    let keys: Vec<String> = (1..=20).map(|id| format!("order:{id}")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    s.seed(&keys).await;
    s.db.execute("insert into orders select g, 'new' from generate_series(1, 10) g")
        .await;
    s.sync().await;
    let client = s.db.client().await;
    let terminated: bool = client
        .query_one(
            "select pg_terminate_backend(active_pid) from pg_replication_slots where slot_name = $1",
            &[&s.config.postgres.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert!(terminated);
    s.db.execute("insert into orders select g, 'new' from generate_series(11, 20) g")
        .await;
    s.sync().await;
    assert_eq!(s.cached(&keys).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_crash_right_after_an_ack_loses_nothing() {
    crate::support::init_logging();
    let mut postgres = tokio::task::spawn_blocking(Postgres::start)
        .await
        .unwrap()
        .expect("postgres");
    let database = postgres.create_database().await.unwrap();
    let url = postgres.url(&database);
    let admin = evictd::internal::catalog::connect(&SecretUrl::parse(&url).unwrap())
        .await
        .unwrap();
    admin.batch_execute(SCHEMA).await.unwrap();
    let dir = mapping_dir(&[("orders.toml", MAPPING)]);
    let mut config = evictd::config::Config::with_defaults(
        SecretUrl::parse(&url).unwrap(),
        SecretUrl::parse(&stack().redis.url()).unwrap(),
        dir.path().to_path_buf(),
    );
    let prefix = format!("{database}:");
    config.redis.prefix = prefix.clone();
    let mut redis = redis_connection().await;
    let mut seed = redis::pipe();
    for id in 1..=40 {
        seed.cmd("SET")
            .arg(format!("{prefix}order:{id}"))
            .arg("cached")
            .ignore();
    }
    seed.query_async::<()>(&mut redis).await.unwrap();
    let evictd = Evictd::start(&config).await.expect("start evictd");

    admin
        .batch_execute("insert into orders select g, 'new' from generate_series(1, 20) g")
        .await
        .unwrap();
    evictd.sync().await.unwrap();
    drop(admin);
    let mut postgres = tokio::task::spawn_blocking(move || {
        postgres.restart().expect("restart postgres after a crash");
        postgres
    })
    .await
    .unwrap();
    let admin = evictd::internal::catalog::connect(&SecretUrl::parse(&url).unwrap())
        .await
        .unwrap();
    admin
        .batch_execute("insert into orders select g, 'new' from generate_series(21, 40) g")
        .await
        .unwrap();
    evictd.sync().await.expect("caught up after the crash");
    for id in 1..=40 {
        let exists: bool = redis::cmd("EXISTS")
            .arg(format!("{prefix}order:{id}"))
            .query_async(&mut redis)
            .await
            .unwrap();
        assert!(!exists, "order:{id} was missed");
    }
    evictd.stop().await.unwrap();
    postgres.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_walsender_kills_under_load_are_not_lost_continuity() {
    let mut s = Streaming::start(SCHEMA, &[("orders.toml", MAPPING)]).await;
    // Only a coarse invalidation (`order:*`) deletes this key.
    s.seed(&["order:sentinel"]).await;
    let writer = {
        let client = s.db.client().await;
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let mut id: i64 = 0;
            while started.elapsed() < std::time::Duration::from_secs(8) {
                id += 1;
                client
                    .execute("insert into orders values ($1, 'new')", &[&id])
                    .await
                    .unwrap();
            }
            id
        })
    };
    let client = s.db.client().await;
    let mut killed = 0;
    for _ in 0..12 {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let row = client
            .query_one(
                "select coalesce(bool_or(pg_terminate_backend(active_pid)), false) from pg_replication_slots where slot_name = $1 and active_pid is not null",
                &[&s.config.postgres.slot],
            )
            .await
            .unwrap();
        killed += u32::from(row.get::<_, bool>(0));
    }
    let written = writer.await.unwrap();
    s.sync().await;
    assert!(killed >= 5, "only {killed} walsenders were terminated");
    assert_eq!(
        s.cached(&["order:sentinel"]).await,
        ["order:sentinel"],
        "a coarse invalidation ran after {killed} walsender kills ({written} inserts)"
    );
}
