//! Redis goes away while changes commit: nothing is acknowledged until
//! Redis is back and the batch is applied.

mod support;

use std::time::Duration;

use evictd::change::Lsn;
use evictd::config::SecretUrl;
use evictd::testkit::{current_wal_lsn, Evictd, Redis};
use support::{mapping_dir, streaming_config, TestDb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_acknowledged_while_redis_is_down() {
    support::init_logging();
    let mut redis = Redis::start().expect("redis");
    let db = TestDb::new().await;
    db.execute(
        "create table orders (id bigint primary key, status text not null);
         create publication evictd for table orders;",
    )
    .await;
    let mapping = "[[table]]\nname = \"orders\"\n[[table.refresh]]\nkey = \"order:{id}\"\ncolumns = [\"status\"]\n";
    let dir = mapping_dir(&[("orders.toml", mapping)]);
    let mut config = streaming_config(&db, dir.path());
    config.redis.url = SecretUrl::parse(&redis.url()).unwrap();
    let evictd = Evictd::start(&config).await.expect("start evictd");

    redis.stop();
    db.execute("insert into orders values (1, 'new')").await;
    let target = current_wal_lsn(&db.url).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let client = db.client().await;
    let confirmed: String = client
        .query_one(
            "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = $1",
            &[&db.name],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        Lsn::parse(&confirmed).unwrap() < target,
        "acknowledged {confirmed} while Redis was down"
    );
    assert!(
        evictd
            .sync_within(Duration::from_millis(200))
            .await
            .is_err(),
        "sync cannot pass while Redis is down"
    );

    redis.restart().expect("restart redis");
    evictd.sync().await.expect("applied once Redis is back");
    let mut connection = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let value: Option<String> = redis::cmd("GET")
        .arg(format!("{}order:1", db.prefix))
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(
        value.as_deref(),
        Some(r#"{"status":"new"}"#),
        "the batch was written after the outage"
    );
    evictd.stop().await.unwrap();
}
