//! evictd running with the least privileges docs/RUNNING.md documents: a
//! Postgres role with REPLICATION and SELECT on the mapped tables only, and
//! a Redis ACL user limited to evictd's commands, keys and channel; and
//! `evictd warm` as the same role and user.

use crate::support::{
    mapping_dir, prepend_hba_rules, redis_connection, stack, streaming_config, warm_everything,
    TestDb,
};
use evictd::config::SecretUrl;
use evictd::internal::warm::warm;
use evictd::testkit::Evictd;

const MAPPING: &str = r#"
[[table]]
name = "orders"
keys = ["order:{id}"]
tags = ["user:{user_id}"]

[[table.refresh]]
key = "order:{id}:status"
columns = ["status"]
ttl = "1h"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evictd_runs_as_a_least_privilege_role_and_redis_user() {
    let db = TestDb::new().await;
    let role = format!("{}_evictd", db.name);
    prepend_hba_rules(&format!(
        "host all {role} 127.0.0.1/32 scram-sha-256\nhost replication {role} 127.0.0.1/32 scram-sha-256"
    ))
    .await;
    // What an administrator runs once (docs/RUNNING.md, "Least privilege").
    db.execute(&format!(
        "create table orders (id bigint primary key, user_id bigint not null, status text not null);
         create table secrets (id bigint primary key, value text);
         alter table orders replica identity full;
         create publication evictd for table orders;
         create role {role} login replication password 'pg-secret';
         grant select on orders to {role};"
    ))
    .await;
    let prefix = db.prefix.clone();
    let user = format!("{}evictd", prefix.trim_end_matches(':'));
    let mut admin = redis_connection().await;
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("reset")
        .arg("on")
        .arg(">redis-secret")
        .arg(format!("~{prefix}*"))
        .arg(format!("&{prefix}l1"))
        .arg("+@connection")
        .arg(
            &[
                "+unlink",
                "+set",
                "+get",
                "+eval",
                "+scan",
                "+smembers",
                "+type",
                "+publish",
                "+xadd",
                "+cluster|slots",
            ][..],
        )
        .query_async(&mut admin)
        .await
        .expect("create the ACL user");

    let dir = mapping_dir(&[("orders.toml", MAPPING)]);
    let mut config = streaming_config(&db, dir.path());
    let port = stack().postgres.port();
    config.postgres.url = Some(
        SecretUrl::parse(&format!(
            "postgres://{role}:pg-secret@127.0.0.1:{port}/{}",
            db.name
        ))
        .unwrap(),
    );
    config.postgres.create_slot = true;
    let redis_port = stack().redis.port();
    config.redis.url = SecretUrl::parse(&format!(
        "redis://{user}:redis-secret@127.0.0.1:{redis_port}"
    ))
    .unwrap();

    // The role cannot read what is not mapped.
    let limited = evictd::internal::catalog::connect(config.postgres.url.as_ref().unwrap())
        .await
        .expect("login as the role");
    let denied = limited
        .query("select * from secrets", &[])
        .await
        .expect_err("no SELECT on secrets");
    assert!(
        format!("{denied:?}").contains("permission denied"),
        "{denied:?}"
    );

    let keys = ["order:1", "page:a", "order:1:status"];
    for key in &keys {
        let _: () = redis::cmd("SET")
            .arg(format!("{prefix}{key}"))
            .arg("cached")
            .query_async(&mut admin)
            .await
            .unwrap();
    }
    let _: () = redis::cmd("SADD")
        .arg(format!("{prefix}tag:user:5"))
        .arg(format!("{prefix}page:a"))
        .query_async(&mut admin)
        .await
        .unwrap();

    let evictd = Evictd::start(&config)
        .await
        .expect("evictd starts with least privileges");
    let writer = db.client().await;
    writer
        .batch_execute("insert into orders values (1, 5, 'new')")
        .await
        .unwrap();
    evictd.sync().await.expect("sync");
    let page: bool = redis::cmd("EXISTS")
        .arg(format!("{prefix}page:a"))
        .query_async(&mut admin)
        .await
        .unwrap();
    let status: Option<String> = redis::cmd("GET")
        .arg(format!("{prefix}order:1:status"))
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(!page, "the tag's member was deleted");
    assert_eq!(status.as_deref(), Some(r#"{"status":"new"}"#));
    writer.batch_execute("truncate orders").await.unwrap();
    evictd.sync().await.expect("sync after truncate");
    let status: bool = redis::cmd("EXISTS")
        .arg(format!("{prefix}order:1:status"))
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(!status, "TRUNCATE's SCAN + UNLINK works under the ACL");
    evictd.stop().await.unwrap();

    // Warming, as the same role and the same user with the commands
    // docs/RUNNING.md adds for it.
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg(
            &[
                "+watch",
                "+unwatch",
                "+multi",
                "+exec",
                "+evalsha",
                "+script|load",
            ][..],
        )
        .query_async(&mut admin)
        .await
        .expect("allow warming's commands");
    writer
        .batch_execute("insert into orders values (2, 5, 'paid'), (3, 6, 'new')")
        .await
        .unwrap();
    let mappings = evictd::mapping::load_dir(dir.path(), config.mappings.limits).expect("mappings");
    let summary = warm(&config, &mappings, &warm_everything())
        .await
        .expect("warming with least privileges");
    assert_eq!(
        (summary.filled, summary.one_pass_pages),
        (2, 1),
        "{summary:?}"
    );
    let status: Option<String> = redis::cmd("GET")
        .arg(format!("{prefix}order:2:status"))
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(status.as_deref(), Some(r#"{"status":"paid"}"#));

    // And the Redis user really is limited.
    let mut limited_redis = redis::Client::open(config.redis.url.expose())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let flush: Result<(), _> = redis::cmd("FLUSHALL").query_async(&mut limited_redis).await;
    assert!(
        flush
            .as_ref()
            .is_err_and(|e| format!("{e:?}").to_uppercase().contains("NOPERM")),
        "{flush:?}"
    );
    let outside: Result<(), _> = redis::cmd("SET")
        .arg("elsewhere")
        .arg("x")
        .query_async(&mut limited_redis)
        .await;
    assert!(
        outside
            .as_ref()
            .is_err_and(|e| format!("{e:?}").to_uppercase().contains("NOPERM")),
        "{outside:?}"
    );
}
