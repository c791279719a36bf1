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
