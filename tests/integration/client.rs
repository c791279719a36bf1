//! The client crate against real Postgres, evictd and Redis: a reader that
//! read the database before a commit, and is held until evictd applied
//! the commit's invalidation, must not store what it read, whichever way
//! evictd invalidates (key, tag, pattern, write-through refresh).

use std::convert::Infallible;

use evictd_client::{Cache, Fill};
use tokio::sync::oneshot;

use crate::support::{stack, Streaming};

const SCHEMA: &str = "
    create table orders (id bigint primary key, user_id bigint not null, status text not null);
    alter table orders replica identity full;
    create publication evictd for table orders;
    insert into orders values (1, 1, 'new');
";

const MAPPING: &str = r#"
[[table]]
name = "orders"
keys = ["order:{id}"]
tags = ["user:{user_id}"]

[[table.refresh]]
key = "order:{id}:status"
columns = ["status"]
"#;

/// The row's status, read from the database.
async fn status(s: &Streaming) -> String {
    s.db.client()
        .await
        .query_one("select status from orders where id = 1", &[])
        .await
        .expect("the order")
        .get(0)
}

/// The row as the refresh writes it: `{"status": ...}`.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Status {
    status: String,
}

async fn cache(s: &Streaming) -> Cache {
    Cache::builder(stack().redis.url())
        .prefix(s.config.redis.prefix.clone())
        .build()
        .await
        .expect("a cache")
}

/// Reads `key` through `cache`, reading the database first and then
/// waiting, so that `write` commits (and evictd applies it) between the
/// read and the fill. Returns how the fill ended and the value loaded.
async fn held_fill(
    s: &Streaming,
    cache: &Cache,
    key: &str,
    tags: &[&str],
    write: Option<&str>,
) -> (Fill, Status) {
    let (read_tx, read_rx) = oneshot::channel();
    let (resume_tx, resume_rx) = oneshot::channel::<()>();
    let loaded = Box::pin(status(s));
    let reader = {
        let cache = cache.clone();
        let key = key.to_owned();
        let tags: Vec<String> = tags.iter().map(|t| (*t).to_owned()).collect();
        async move {
            let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
            cache
                .get_or_load_traced(&key, &tags, || async move {
                    let status = loaded.await;
                    read_tx.send(()).expect("the test waits");
                    resume_rx.await.expect("resumed");
                    Ok::<_, Infallible>(Some(Status { status }))
                })
                .await
        }
    };
    let (result, ()) = tokio::join!(reader, async {
        read_rx.await.expect("the reader read");
        if let Some(write) = write {
            s.db.execute(write).await;
            s.sync().await;
        }
        resume_tx.send(()).expect("the reader waits");
    });
    let (value, fill) = result.expect("get_or_load");
    (fill.expect("a miss, so a fill"), value.expect("a row"))
}

#[tokio::test]
async fn a_fill_without_an_invalidation_in_between_is_stored() {
    let s = Streaming::start(SCHEMA, &[("orders.toml", MAPPING)]).await;
    let cache = cache(&s).await;
    let (fill, value) = held_fill(&s, &cache, "order:1", &["user:1"], None).await;
    assert_eq!((fill, value.status.as_str()), (Fill::Stored, "new"));
    let cached: Option<Status> = cache.get("order:1").await.unwrap();
    assert_eq!(cached.map(|c| c.status).as_deref(), Some("new"));
}

#[tokio::test]
async fn a_key_delete_voids_a_fill_in_flight() {
    let s = Streaming::start(SCHEMA, &[("orders.toml", MAPPING)]).await;
    let cache = cache(&s).await;
    let write = "update orders set status = 'paid' where id = 1";
    let (fill, value) = held_fill(&s, &cache, "order:1", &[], Some(write)).await;
    assert_eq!((fill, value.status.as_str()), (Fill::Fenced, "new"));
    assert_eq!(cache.get::<Status>("order:1").await.unwrap(), None);
    // The next read loads the committed row.
    let fresh: Option<Status> = cache
        .get_or_load("order:1", &[], || async {
            Ok::<_, Infallible>(Some(Status {
                status: status(&s).await,
            }))
        })
        .await
        .unwrap();
    assert_eq!(fresh.map(|f| f.status).as_deref(), Some("paid"));
    let cached: Option<Status> = cache.get("order:1").await.unwrap();
    assert_eq!(cached.map(|c| c.status).as_deref(), Some("paid"));
}

#[tokio::test]
async fn a_tag_invalidation_voids_a_fill_in_flight() {
    let s = Streaming::start(SCHEMA, &[("orders.toml", MAPPING)]).await;
    let cache = cache(&s).await;
    // A key evictd never renders, only tagged: a new order of user 1
    // invalidates the tag.
    let write = "insert into orders values (2, 1, 'new')";
    let (fill, _) = held_fill(&s, &cache, "user:1:order-page", &["user:1"], Some(write)).await;
    assert_eq!(fill, Fill::Fenced);
    assert_eq!(
        cache.get::<Status>("user:1:order-page").await.unwrap(),
        None
    );
}

#[tokio::test]
async fn a_pattern_delete_voids_a_fill_in_flight() {
    let s = Streaming::start(SCHEMA, &[("orders.toml", MAPPING)]).await;
    let cache = cache(&s).await;
    // TRUNCATE deletes order:* by pattern, cached or not.
    let (fill, _) = held_fill(&s, &cache, "order:1", &[], Some("truncate orders")).await;
    assert_eq!(fill, Fill::Fenced);
    assert_eq!(cache.get::<Status>("order:1").await.unwrap(), None);
}

#[tokio::test]
async fn a_fill_cannot_overwrite_a_refresh() {
    let s = Streaming::start(SCHEMA, &[("orders.toml", MAPPING)]).await;
    let cache = cache(&s).await;
    let write = "update orders set status = 'shipped' where id = 1";
    let (fill, value) = held_fill(&s, &cache, "order:1:status", &[], Some(write)).await;
    assert_eq!((fill, value.status.as_str()), (Fill::Fenced, "new"));
    // What evictd wrote stays.
    let cached: Option<Status> = cache.get("order:1:status").await.unwrap();
    assert_eq!(cached.map(|c| c.status).as_deref(), Some("shipped"));
}

#[tokio::test]
async fn a_cold_key_is_loaded_at_most_once_per_instance() {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    let s = Streaming::start(SCHEMA, &[("orders.toml", MAPPING)]).await;
    let mut caches = Vec::new();
    for _ in 0..3 {
        caches.push(cache(&s).await);
    }
    let loads: Vec<Arc<AtomicU32>> = (0..3).map(|_| Arc::new(AtomicU32::new(0))).collect();
    let mut readers = Vec::new();
    for (cache, loads) in caches.iter().zip(&loads) {
        for _ in 0..20 {
            let cache = cache.clone();
            let loads = loads.clone();
            readers.push(tokio::spawn(async move {
                cache
                    .get_or_load("order:1", &[], || async move {
                        loads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        Ok::<_, Infallible>(Some(Status {
                            status: "new".into(),
                        }))
                    })
                    .await
                    .expect("get_or_load")
            }));
        }
    }
    for reader in readers {
        let value = reader.await.expect("a reader");
        assert_eq!(value.map(|v| v.status).as_deref(), Some("new"));
    }
    let per_instance: Vec<u32> = loads.iter().map(|l| l.load(Ordering::SeqCst)).collect();
    assert!(
        per_instance.iter().all(|&n| n <= 1) && per_instance.iter().sum::<u32>() >= 1,
        "loads per instance: {per_instance:?}"
    );
}

/// Writers and readers for a while, then quiet: every cached entry must
/// equal the database. Plain GET/SET readers of a second key family, racing
/// the same way, leave stale entries: the proof that the test can fail
/// (rounds repeat until they do, at most five).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_concurrent_writes_no_fenced_entry_is_stale() {
    let schema = "
        create table orders (id bigint primary key, user_id bigint not null, status text not null);
        alter table orders replica identity full;
        create publication evictd for table orders;
        insert into orders select g, 1, '0' from generate_series(1, 5) g;
    ";
    let mapping = "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\", \"plain:{id}\"]\n";
    let s = std::sync::Arc::new(Streaming::start(schema, &[("orders.toml", mapping)]).await);
    let cache = cache(&s).await;
    for round in 1..=5 {
        let (fenced_stale, plain_stale) = Box::pin(oracle_round(&s, &cache, round)).await;
        assert!(
            fenced_stale.is_empty(),
            "round {round}: stale fenced entries: {fenced_stale:?}"
        );
        if !plain_stale.is_empty() {
            return;
        }
    }
    panic!("plain cache-aside left nothing stale in five rounds: the race was not exercised");
}

/// One round of the oracle: 2 writers, 3 fenced and 6 plain readers for 2
/// s over 5 rows, a last update of every row as they stop, then `sync()`;
/// the stale entries of each family as (id, cached, database).
async fn oracle_round(
    s: &std::sync::Arc<Streaming>,
    cache: &Cache,
    round: u32,
) -> (Vec<(i64, String, String)>, Vec<(i64, String, String)>) {
    use rand::Rng as _;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    const ROWS: i64 = 5;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for writer in 0..2 {
        let (s, stop) = (s.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let db = s.db.client().await;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let id = rand::rng().random_range(1..=ROWS);
                db.execute(
                    "update orders set status = $1 where id = $2",
                    &[&format!("{round}-{writer}-{n}"), &id],
                )
                .await
                .expect("update");
            }
        }));
    }
    // A read of the row, then the reader's own work before it fills.
    async fn read(db: &tokio_postgres::Client, id: i64) -> Status {
        let status: String = db
            .query_one("select status from orders where id = $1", &[&id])
            .await
            .expect("the order")
            .get(0);
        let pause = rand::rng().random_range(10..60);
        tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
        Status { status }
    }
    for _ in 0..3 {
        let (s, stop, cache) = (s.clone(), stop.clone(), cache.clone());
        tasks.push(tokio::spawn(async move {
            let db = s.db.client().await;
            while !stop.load(Ordering::Relaxed) {
                let id = rand::rng().random_range(1..=ROWS);
                let db = &db;
                let _: Option<Status> = cache
                    .get_or_load(&format!("order:{id}"), &[], || async move {
                        Ok::<_, Infallible>(Some(read(db, id).await))
                    })
                    .await
                    .expect("get_or_load");
            }
        }));
    }
    for _ in 0..6 {
        let (s, stop) = (s.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let db = s.db.client().await;
            let mut redis = crate::support::redis_connection().await;
            while !stop.load(Ordering::Relaxed) {
                let id = rand::rng().random_range(1..=ROWS);
                let key = format!("{}plain:{id}", s.config.redis.prefix);
                let cached: Option<String> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut redis)
                    .await
                    .expect("GET");
                if cached.is_none() {
                    let value = serde_json::to_string(&read(&db, id).await).unwrap();
                    let () = redis::cmd("SET")
                        .arg(&key)
                        .arg(value)
                        .query_async(&mut redis)
                        .await
                        .expect("SET");
                }
            }
        }));
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    // A last write of every row while the readers' last fills are in
    // flight: what they read is now old.
    s.db.execute(&format!(
        "update orders set status = 'final-{round}-' || id"
    ))
    .await;
    for task in tasks {
        task.await.expect("a task");
    }
    s.sync().await;

    let db = s.db.client().await;
    let mut redis = crate::support::redis_connection().await;
    let (mut fenced, mut plain) = (Vec::new(), Vec::new());
    for id in 1..=ROWS {
        let status: String = db
            .query_one("select status from orders where id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        for (family, stale) in [("order", &mut fenced), ("plain", &mut plain)] {
            let cached: Option<String> = redis::cmd("GET")
                .arg(format!("{}{family}:{id}", s.config.redis.prefix))
                .query_async(&mut redis)
                .await
                .unwrap();
            if let Some(cached) = cached {
                let cached: Status = serde_json::from_str(&cached).unwrap();
                if cached.status != status {
                    stale.push((id, cached.status, status.clone()));
                }
            }
        }
    }
    (fenced, plain)
}
