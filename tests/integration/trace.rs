//! `evictd trace KEY` against real Postgres, Redis and evictd: a key
//! deleted exactly, by tag and by pattern; a write-through key that is
//! current and one corrupted by hand; a key no mapping renders.

use crate::support::{evictd, stack, stderr, stdout, Streaming};

const SCHEMA: &str = "
    create table orders (id bigint primary key, user_id bigint not null, status text not null);
    alter table orders replica identity full;
    create publication evictd for table orders;
    insert into orders values (1, 1, 'new'), (2, 1, 'new');
";

const MAPPING: &str = r#"[[table]]
name = "orders"
keys = ["order:{id}"]
tags = ["user:{user_id}"]

[[table.refresh]]
key = "order:{id}:status"
columns = ["status"]
"#;

/// `evictd trace KEY --json` on `config`: the exit code and the trace.
fn trace(config: &str, key: &str) -> (Option<i32>, serde_json::Value) {
    let output = evictd(&["trace", "--config", config, key, "--json"]);
    let json = serde_json::from_str(&stdout(&output))
        .unwrap_or_else(|e| panic!("{e}: {}{}", stdout(&output), stderr(&output)));
    (output.status.code(), json)
}

fn verdict(json: &serde_json::Value) -> (&str, &str) {
    (
        json["verdict"]["state"].as_str().unwrap(),
        json["verdict"]["why"].as_str().unwrap(),
    )
}

// Multi-threaded: the test blocks on the `evictd trace` process while the
// evictd it traces (on this runtime) goes on applying and moving its
// continuity record, which the write-through check waits for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_names_the_rule_the_rows_the_invalidations_and_a_verdict() {
    let s = Streaming::start(SCHEMA, &[("orders.toml", MAPPING)]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("evictd.toml");
    std::fs::write(
        &config,
        format!(
            "[postgres]\nurl = \"{}\"\nslot = \"{}\"\n[redis]\nurl = \"{}\"\nprefix = \"{}\"\nl1_channel = \"{}\"\n[mappings]\ndir = \"{}\"\n",
            s.db.url,
            s.config.postgres.slot,
            stack().redis.url(),
            s.config.redis.prefix,
            s.config.redis.l1_channel,
            s.config.mappings.dir.display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();

    // Deleted exactly: the row changed.
    s.db.execute("update orders set status = 'paid' where id = 1")
        .await;
    s.sync().await;
    let (code, json) = trace(config, "order:1");
    assert_eq!(code, Some(0), "{json}");
    let rule = &json["rules"][0];
    assert_eq!(
        (
            rule["table"].as_str(),
            rule["kind"].as_str(),
            rule["template"].as_str()
        ),
        (Some("public.orders"), Some("key"), Some("order:{id}")),
        "{json}"
    );
    assert!(
        rule["at"].as_str().unwrap().ends_with("orders.toml:3"),
        "{json}"
    );
    assert_eq!(json["rows"][0]["rows"][0]["status"], "paid", "{json}");
    assert_eq!(json["tags"][0], "user:1", "{json}");
    assert_eq!(json["redis"]["state"], "absent", "{json}");
    let last = &json["invalidations"][0];
    assert_eq!(
        (last["mode"].as_str(), last["by"].as_str()),
        (Some("exact"), Some("order:1")),
        "{json}"
    );
    assert_eq!(last["tables"][0], "public.orders", "{json}");
    assert_eq!(
        last["ops"],
        serde_json::json!({"public.orders": ["update"]}),
        "{json}"
    );
    assert!(
        last["lsn"].as_str().is_some() && last["at"].as_str().unwrap().ends_with('Z'),
        "{json}"
    );
    assert_eq!(json["last_carried"], last["message"], "{json}");
    let (state, why) = verdict(&json);
    assert_eq!(state, "exact");
    assert!(
        why.starts_with("not cached; evictd last invalidated it at "),
        "{why}"
    );

    // Deleted by its tag: order 2 filled under user:1, then another order
    // of user 1 (the mapping's tag) changes.
    let cache = evictd_client::Cache::builder(stack().redis.url())
        .prefix(s.config.redis.prefix.clone())
        .build()
        .await
        .expect("a cache");
    let loaded: Option<String> = cache
        .get_or_load("order:2", &["user:1"], || async {
            Ok::<_, std::convert::Infallible>(Some("two".to_owned()))
        })
        .await
        .unwrap();
    assert_eq!(loaded.as_deref(), Some("two"));
    let (_, json) = trace(config, "order:2");
    assert_eq!(json["redis"]["state"], "value", "{json}");
    assert_eq!(json["redis"]["value"], "\"two\"", "{json}");
    assert_eq!(json["tag_sets"][0], "user:1", "{json}");
    assert_eq!(verdict(&json).0, "exact");
    s.db.execute("insert into orders values (3, 1, 'new')")
        .await;
    s.sync().await;
    let (_, json) = trace(config, "order:2");
    assert_eq!(json["redis"]["state"], "absent", "{json}");
    let last = &json["invalidations"][0];
    assert_eq!(
        (last["mode"].as_str(), last["by"].as_str()),
        (Some("tag"), Some("user:1")),
        "{json}"
    );
    assert_eq!(last["ops"]["public.orders"], serde_json::json!(["insert"]));

    // Deleted by pattern: TRUNCATE.
    s.db.execute("truncate orders").await;
    s.sync().await;
    let (_, json) = trace(config, "order:2");
    let last = &json["invalidations"][0];
    assert_eq!(
        (last["mode"].as_str(), last["by"].as_str()),
        (Some("pattern"), Some("order:*")),
        "{json}"
    );
    assert_eq!(
        last["ops"]["public.orders"],
        serde_json::json!(["truncate"])
    );
    assert_eq!(
        json["rows"][0]["rows"].as_array().map(Vec::len),
        Some(0),
        "{json}"
    );

    // A write-through key, current: what a refresh of its row writes now.
    s.db.execute("insert into orders values (1, 1, 'shipped')")
        .await;
    s.sync().await;
    let (code, json) = trace(config, "order:1:status");
    assert_eq!(code, Some(0), "{json}");
    assert_eq!(json["rules"][0]["kind"], "refresh", "{json}");
    assert_eq!(json["refresh"]["outcome"], "consistent", "{json}");
    assert_eq!(verdict(&json).0, "exact", "{json}");
    // Corrupted by hand: stale, exit 1, and the text says why.
    let mut redis = crate::support::redis_connection().await;
    let _: () = redis::cmd("SET")
        .arg(format!("{}order:1:status", s.config.redis.prefix))
        .arg(r#"{"status":"bogus"}"#)
        .query_async(&mut redis)
        .await
        .unwrap();
    let (code, json) = trace(config, "order:1:status");
    assert_eq!(code, Some(1), "{json}");
    let (state, why) = verdict(&json);
    assert_eq!(state, "stale");
    assert!(
        why.contains(r#"holds {"status":"bogus"}, but the row renders {"status":"shipped"}"#),
        "{why}"
    );
    let text = evictd(&["trace", "--config", config, "order:1:status"]);
    assert_eq!(text.status.code(), Some(1));
    let text = stdout(&text);
    assert!(
        text.contains("rules:\n  public.orders refresh \"order:{id}:status\""),
        "{text}"
    );
    assert!(
        text.contains("\nverdict: stale: the write-through value holds"),
        "{text}"
    );
    // Each invalidation names its tables with the operations.
    assert!(
        text.contains(" public.orders(insert) refresh order:1:status\n"),
        "{text}"
    );

    // A key no mapping renders.
    let (code, json) = trace(config, "session:9");
    assert_eq!(code, Some(0), "{json}");
    assert_eq!(json["rules"].as_array().map(Vec::len), Some(0));
    assert_eq!(verdict(&json).0, "unmapped");
}
