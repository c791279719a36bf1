//! Against a local 3-master Redis Cluster: keys on every node are deleted,
//! refreshed, tag sets on one node clear members on others, TRUNCATE scans
//! every master, and the broadcast still arrives; warming fills every
//! master through leases.

use crate::support::{mapping_dir, streaming_config, warm_everything, TestDb};
use evictd::config::SecretUrl;
use evictd::internal::key_slot;
use evictd::internal::warm::warm;
use evictd::testkit::{Evictd, RedisCluster};
use redis::AsyncCommands as _;

const SCHEMA: &str = "
    create table orders (id bigint primary key, user_id bigint not null, status text not null);
    alter table orders replica identity full;
    create publication evictd for table orders;
";

const MAPPING: &str = r#"
[[table]]
name = "orders"
keys = ["order:{id}", "user:{user_id}:orders"]
tags = ["user:{user_id}"]
prefixes = ["user:{user_id}:page:"]

[[table.refresh]]
key = "order:{id}:status"
columns = ["status"]
"#;

/// A test database with the orders schema, and evictd streaming from it
/// into `cluster` (the mappings' directory lives as long as the caller
/// keeps it).
async fn stream_into(cluster: &RedisCluster) -> (TestDb, Evictd, tempfile::TempDir) {
    let db = TestDb::new().await;
    db.execute(SCHEMA).await;
    let dir = mapping_dir(&[("orders.toml", MAPPING)]);
    let mut config = streaming_config(&db, dir.path());
    config.redis.url = SecretUrl::parse(&cluster.url()).unwrap();
    let evictd = Evictd::start(&config).await.expect("start evictd");
    (db, evictd, dir)
}

async fn connect(cluster: &RedisCluster) -> redis::cluster_async::ClusterConnection {
    let seeds: Vec<String> = cluster
        .ports()
        .iter()
        .map(|port| format!("redis://127.0.0.1:{port}"))
        .collect();
    let client = redis::cluster::ClusterClient::new(seeds).unwrap();
    client.get_async_connection().await.unwrap()
}

async fn exists(connection: &mut redis::cluster_async::ClusterConnection, key: &str) -> bool {
    connection.exists(key).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_are_applied_across_every_node() {
    crate::support::init_logging();
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3))
        .await
        .unwrap()
        .expect("start cluster");
    let (db, evictd, _mappings) = stream_into(&cluster).await;

    let mut redis = connect(&cluster).await;
    let p = &db.prefix;
    let order_keys: Vec<String> = (1..=30).map(|id| format!("{p}order:{id}")).collect();
    let slots: std::collections::BTreeSet<u16> = order_keys
        .iter()
        .map(|k| key_slot(k.as_bytes()) / 5462)
        .collect();
    assert_eq!(slots.len(), 3, "the keys spread over all three masters");
    for key in &order_keys {
        let _: () = redis.set(key, "cached").await.unwrap();
    }
    let tag_members = [
        format!("{p}page:a"),
        format!("{p}page:b"),
        format!("{p}page:c"),
    ];
    for member in &tag_members {
        let _: () = redis.set(member, "cached").await.unwrap();
    }
    let _: () = redis
        .sadd(format!("{p}tag:user:7"), &tag_members)
        .await
        .unwrap();
    let _: () = redis.set(format!("{p}unrelated"), "cached").await.unwrap();
    // Keys under user 7's prefix, on every master; user 8's stay.
    let pages: Vec<String> = (1..=30).map(|n| format!("{p}user:7:page:{n}")).collect();
    for key in &pages {
        let _: () = redis.set(key, "cached").await.unwrap();
    }
    let other = format!("{p}user:8:page:1");
    let _: () = redis.set(&other, "cached").await.unwrap();

    db.execute("insert into orders select g, 7, 'new' from generate_series(1, 30) g")
        .await;
    evictd.sync().await.unwrap();
    for key in order_keys.iter().chain(&tag_members).chain(&pages) {
        assert!(!exists(&mut redis, key).await, "{key} survived");
    }
    assert!(
        exists(&mut redis, &other).await,
        "another user's prefix went too"
    );
    let status: Option<String> = redis.get(format!("{p}order:5:status")).await.unwrap();
    assert_eq!(status.as_deref(), Some(r#"{"status":"new"}"#));
    assert!(!exists(&mut redis, &format!("{p}tag:user:7")).await);

    db.execute("truncate orders").await;
    evictd.sync().await.unwrap();
    for id in 1..=30 {
        assert!(
            !exists(&mut redis, &format!("{p}order:{id}:status")).await,
            "order:{id}:status survived TRUNCATE"
        );
    }
    assert!(exists(&mut redis, &format!("{p}unrelated")).await);
    let last: Option<String> = redis.get(format!("{p}evictd:l1:last")).await.unwrap();
    assert!(last.is_some_and(|last| last.starts_with(evictd.epoch())));
    evictd.stop().await.unwrap();
}

#[test]
fn key_slots_agree_with_the_cluster() {
    let cluster = RedisCluster::start(3).expect("start cluster");
    for key in [
        "foo",
        "user:1000",
        "{user1000}.following",
        "order:42",
        "zoë→日本",
    ] {
        let output = std::process::Command::new("redis-cli")
            .args([
                "-p",
                &cluster.ports()[0].to_string(),
                "cluster",
                "keyslot",
                key,
            ])
            .output()
            .unwrap();
        let slot: u16 = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .unwrap();
        assert_eq!(key_slot(key.as_bytes()), slot, "{key}");
    }
}

/// A master killed right after evictd applied a batch: with
/// `redis.wait_replicas = 1` nothing evictd acknowledged is lost, and while
/// the promoted replica has no replica of its own evictd holds back (WAIT
/// cannot be met) instead of acknowledging writes only one node holds.
/// Without WAIT a batch acknowledged by a master that dies before its
/// replica copied it is lost: asynchronous replication, which is why the
/// docs/RUNNING.md asks for `wait_replicas` when Redis has replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_failover_loses_nothing() {
    crate::support::init_logging();
    let mut cluster = tokio::task::spawn_blocking(|| RedisCluster::start_with_replicas(3, 1))
        .await
        .unwrap()
        .expect("start a cluster with replicas");
    let db = TestDb::new().await;
    db.execute(SCHEMA).await;
    let dir = mapping_dir(&[("orders.toml", MAPPING)]);
    let mut config = streaming_config(&db, dir.path());
    config.redis.url = SecretUrl::parse(&cluster.url()).unwrap();
    config.redis.wait_replicas = 1;
    let evictd = Evictd::start(&config).await.expect("start evictd");
    db.execute("insert into orders select g, 1, 'new' from generate_series(1, 50) g")
        .await;
    evictd.sync().await.unwrap();

    // Kill a master that is not the seed node and has a replica attached
    // (the master reports it once it has): that replica takes over. Any
    // such master will do; under load one may be re-syncing its replica,
    // or the cluster may have failed one over on its own.
    let seed = cluster.ports()[0];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let (victim, heir) = loop {
        let attached = cluster
            .master_ports()
            .into_iter()
            .filter(|port| *port != seed)
            .find_map(|master| Some((master, cluster.replica_of(master)?)));
        if let Some(pair) = attached {
            break pair;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no master but the seed had a replica attached: masters {:?}",
            cluster.master_ports()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    cluster.kill_node(victim);
    for id in 51..=100 {
        db.execute(&format!("insert into orders values ({id}, 1, 'new')"))
            .await;
    }
    let cluster = tokio::task::spawn_blocking(move || {
        let wait = |what: &str, done: &dyn Fn() -> bool| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while !done() {
                assert!(std::time::Instant::now() < deadline, "{what}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        };
        wait("the replica never took over", &|| cluster.is_master(heir));
        assert!(
            cluster.wait_healthy(std::time::Duration::from_secs(30)),
            "the cluster did not recover"
        );
        // The old master comes back empty and becomes the new master's
        // replica: WAIT can be met again.
        cluster
            .restart_node(victim)
            .expect("restart the old master");
        wait("the old master never became a synced replica", &|| {
            !cluster.is_master(victim) && cluster.replicas_synced()
        });
        cluster
    })
    .await
    .unwrap();
    evictd.sync().await.expect("caught up after the failover");
    let seeds: Vec<String> = cluster
        .master_ports()
        .iter()
        .map(|port| format!("redis://127.0.0.1:{port}"))
        .collect();
    let client = redis::cluster::ClusterClient::new(seeds).unwrap();
    let mut redis = client.get_async_connection().await.unwrap();
    for id in 1..=100 {
        let status: Option<String> = redis
            .get(format!("{}order:{id}:status", db.prefix))
            .await
            .unwrap();
        assert_eq!(
            status.as_deref(),
            Some(r#"{"status":"new"}"#),
            "order:{id}:status missing after the failover"
        );
    }
    evictd.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warming_a_cluster_fills_every_master_with_leases() {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3))
        .await
        .unwrap()
        .expect("start cluster");
    let (db, evictd, dir) = stream_into(&cluster).await;
    db.execute("insert into orders select g, g % 4, 'new' from generate_series(1, 30) g")
        .await;
    evictd.sync().await.unwrap();
    evictd.stop().await.unwrap();

    let mut redis = connect(&cluster).await;
    let p = &db.prefix;
    // An empty cache but for one value an application stored.
    for id in 1..=30 {
        let _: () = redis.del(format!("{p}order:{id}:status")).await.unwrap();
    }
    let _: () = redis
        .set(format!("{p}order:7:status"), "the application's")
        .await
        .unwrap();
    db.execute("update orders set status = 'paid' where id <= 10")
        .await;

    let mut config = streaming_config(&db, dir.path());
    config.redis.url = SecretUrl::parse(&cluster.url()).unwrap();
    let mappings = evictd::mapping::load_dir(dir.path(), config.mappings.limits).expect("mappings");
    let summary = warm(&config, &mappings, &warm_everything())
        .await
        .expect("warming a cluster");
    assert_eq!(
        (
            summary.filled,
            summary.present,
            summary.one_pass_pages,
            summary.leased_pages
        ),
        (29, 1, 0, 1),
        "on a Cluster every page takes leases: {summary:?}"
    );
    for id in 1..=30 {
        let value: Option<String> = redis.get(format!("{p}order:{id}:status")).await.unwrap();
        let expected = match id {
            7 => "the application's",
            1..=10 => r#"{"status":"paid"}"#,
            _ => r#"{"status":"new"}"#,
        };
        assert_eq!(value.as_deref(), Some(expected), "order:{id}:status");
    }
}
