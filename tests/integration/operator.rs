//! `evictd init`, `evictd status` and `evictd watch` against a real database and Redis.

use crate::support::{evictd, stack, stderr, stdout, TestDb};

fn write_config(dir: &std::path::Path, db: &TestDb, extra: &str) -> String {
    std::fs::create_dir_all(dir.join("mappings")).unwrap();
    std::fs::write(
        dir.join("mappings/orders.toml"),
        "[[table]]\nname = \"orders\"\nkeys = [\"user:{user_id}:orders\"]\n",
    )
    .unwrap();
    let config = dir.join("evictd.toml");
    std::fs::write(
        &config,
        format!(
            "[postgres]\nurl = \"{}\"\nslot = \"{}\"\n{extra}\n[redis]\nurl = \"{}\"\nprefix = \"{}\"\n",
            db.url,
            db.name,
            stack().redis.url(),
            db.prefix
        ),
    )
    .unwrap();
    config.display().to_string()
}

/// How many replication slots are named `name` (0 or 1).
async fn slot_count(client: &tokio_postgres::Client, name: &str) -> i64 {
    client
        .query_one(
            "select count(*) from pg_replication_slots where slot_name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn init_creates_the_publication_and_slot_and_advises_replica_identity() {
    let db = TestDb::new().await;
    db.execute("create table orders (id bigint primary key, user_id bigint)")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &db, "");

    let dry = evictd(&["init", "--config", &config, "--dry-run"]);
    assert_eq!(dry.status.code(), Some(0), "{}", stderr(&dry));
    let text = stdout(&dry);
    assert!(text.contains("-- would run: the mapped tables' changes reach evictd through this publication\nCREATE PUBLICATION evictd FOR TABLE public.orders;"), "{text}");
    assert!(
        text.contains(&format!(
            "SELECT pg_create_logical_replication_slot('{}', 'pgoutput');",
            db.name
        )),
        "{text}"
    );
    assert!(
        text.contains("ALTER TABLE public.orders REPLICA IDENTITY FULL;"),
        "{text}"
    );
    let client = db.client().await;
    let slots = slot_count(&client, &db.name).await;
    assert_eq!(slots, 0, "--dry-run changes nothing");

    let real = evictd(&["init", "--config", &config]);
    assert_eq!(real.status.code(), Some(0), "{}", stderr(&real));
    let slots = slot_count(&client, &db.name).await;
    let publications: i64 = client
        .query_one(
            "select count(*) from pg_publication_tables where pubname = 'evictd'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!((slots, publications), (1, 1));

    let again = stdout(&evictd(&["init", "--config", &config]));
    assert!(
        again.contains("-- already done: the mapped tables' changes"),
        "{again}"
    );
    assert!(
        again.contains("-- run this yourself (it locks the table briefly)"),
        "{again}"
    );
}

#[tokio::test]
async fn status_shows_the_slot_its_lag_and_what_was_applied() {
    let db = TestDb::new().await;
    db.execute("create table orders (id bigint primary key, user_id bigint); alter table orders replica identity full; create publication evictd for table orders")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &db, "max_retained_wal_mb = 1");

    let missing = evictd(&["status", "--config", &config]);
    assert_eq!(missing.status.code(), Some(0));
    assert!(
        stdout(&missing).contains(&format!("slot {}: missing", db.name)),
        "{}",
        stdout(&missing)
    );

    assert_eq!(
        evictd(&["init", "--config", &config]).status.code(),
        Some(0)
    );
    db.execute("insert into orders select g, g from generate_series(1, 20000) g")
        .await;
    let before = evictd(&["status", "--config", &config]);
    let text = stdout(&before);
    assert!(
        text.contains(&format!(
            "slot {}: inactive: no evictd is streaming, wal_status reserved",
            db.name
        )),
        "{text}"
    );
    assert!(text.contains("redis: no continuity record yet"), "{text}");
    assert!(
        stderr(&before).contains("warning: the slot retains"),
        "{}",
        stderr(&before)
    );

    let replay = evictd(&["replay", "--config", &config, "--until-lsn", "now"]);
    assert_eq!(replay.status.code(), Some(0), "{}", stderr(&replay));
    // Not a terminal: no progress line, one summary.
    let summary = stdout(&replay);
    assert!(
        summary.starts_with("replayed 20000 changes through 0/") && summary.lines().count() == 1,
        "{summary}"
    );
    assert!(
        !stderr(&replay).contains("replay: at"),
        "{}",
        stderr(&replay)
    );
    let after = stdout(&evictd(&["status", "--config", &config]));
    assert!(after.contains("redis: last applied 0/"), "{after}");
    assert!(after.contains("last L1 broadcast (epoch:seq)"), "{after}");

    // The same for scripts: one JSON object, warnings in it.
    let json = evictd(&["status", "--config", &config, "--json"]);
    assert_eq!(json.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_str(&stdout(&json)).expect("JSON");
    assert_eq!(json["source"], "postgres");
    assert_eq!(json["slot"]["name"], db.name.as_str());
    assert_eq!(json["slot"]["exists"], true);
    assert_eq!(json["slot"]["active"], false);
    assert!(
        json["slot"]["retained_bytes"].as_i64().unwrap() > 0,
        "{json}"
    );
    assert!(
        json["redis"]["last_applied"]
            .as_str()
            .unwrap()
            .starts_with("0/"),
        "{json}"
    );
    assert!(json["redis"]["last_broadcast"].is_string(), "{json}");
    let warnings = json["warnings"].as_array().unwrap();
    assert!(
        warnings
            .iter()
            .any(|w| w.as_str().unwrap().contains("is not being read")),
        "{json}"
    );
}

/// `evictd watch` on `config` with `args`, its stdout read line by line.
struct Watcher {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Watcher {
    fn start(config: &std::path::Path, args: &[&str]) -> Watcher {
        use tokio::io::AsyncBufReadExt as _;
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_evictd"))
            .arg("watch")
            .arg("--config")
            .arg(config)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("run evictd watch");
        let stdout = child.stdout.take().expect("stdout");
        Watcher {
            child,
            lines: tokio::io::BufReader::new(stdout).lines(),
        }
    }

    /// The next line within `within`, if any.
    async fn next(&mut self, within: std::time::Duration) -> Option<String> {
        tokio::time::timeout(within, self.lines.next_line())
            .await
            .ok()
            .and_then(|line| line.expect("read stdout"))
    }
}

#[tokio::test]
async fn watch_prints_each_applied_batch_within_a_second_filtered_by_key_and_table() {
    use std::time::Duration;
    let schema = "
        create table orders (id bigint primary key, status text not null);
        create table users (id bigint primary key, name text not null);
        create publication evictd for table orders, users;
        insert into orders values (1, 'new'), (2, 'new');
    ";
    let mappings = [(
        "shop.toml",
        "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\n\n[[table]]\nname = \"users\"\nkeys = [\"user:{id}\"]\n",
    )];
    let s = crate::support::Streaming::start(schema, &mappings).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("evictd.toml");
    std::fs::write(
        &config,
        format!(
            "[postgres]\nurl = \"{}\"\n[redis]\nurl = \"{}\"\nprefix = \"{}\"\nl1_channel = \"{}\"\n[mappings]\ndir = \"{}\"\n",
            s.db.url,
            stack().redis.url(),
            s.config.redis.prefix,
            s.config.redis.l1_channel,
            s.config.mappings.dir.display()
        ),
    )
    .unwrap();
    // A table the mappings do not name is a usage error, not a wait for
    // nothing.
    let typo = crate::support::evictd(&[
        "watch",
        "--config",
        config.to_str().unwrap(),
        "--table",
        "ordrs",
    ]);
    assert_eq!(typo.status.code(), Some(2));
    let err = crate::support::stderr(&typo);
    assert!(
        err.contains("--table: public.ordrs is not mapped; did you mean public.orders?"),
        "{err}"
    );
    // A first batch, in the log before the watchers start: the backlog.
    s.db.execute("update orders set status = 'a' where id = 1")
        .await;
    s.sync().await;
    let mut by_key = Watcher::start(&config, &["--key", "order:1"]);
    let mut by_table = Watcher::start(&config, &["--table", "public.users"]);
    let backlog = by_key
        .next(Duration::from_secs(20))
        .await
        .expect("the backlog");
    assert!(backlog.contains("keys=order:1"), "{backlog}");
    assert!(backlog.contains("tables=public.orders"), "{backlog}");
    // Subscribed once the backlog is out; give the table watcher as long.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // One batch each (synced in between), so that each is a line.
    for write in [
        "update orders set status = 'b' where id = 2",
        "insert into users values (7, 'ann')",
        "update orders set status = 'c' where id = 1",
    ] {
        s.db.execute(write).await;
        s.sync().await;
    }
    let line = by_key
        .next(Duration::from_secs(1))
        .await
        .expect("order:1 within a second");
    assert!(line.contains("keys=order:1"), "{line}");
    assert!(!line.contains("order:2"), "{line}");
    let line = by_table
        .next(Duration::from_secs(1))
        .await
        .expect("users within a second");
    assert!(
        line.contains("tables=public.users") && line.contains("keys=user:7"),
        "{line}"
    );
    // Nothing else matched: order 2's batch and the users batch were left out.
    assert_eq!(by_key.next(Duration::from_millis(300)).await, None);
    assert_eq!(by_table.next(Duration::from_millis(300)).await, None);
    by_key.child.kill().await.ok();
    by_table.child.kill().await.ok();
}
