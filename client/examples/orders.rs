//! Reads orders of the shop schema (`migrations/`) through the cache: L1,
//! then Redis, then Postgres, with fenced fills. Keys are the ones
//! `mappings/orders.toml` invalidates (`order:{id}`), so with evictd
//! running every read is exact.
//!
//! ```sh
//! DATABASE_URL=postgres://app:app@127.0.0.1:5432/app REDIS_URL=redis://127.0.0.1:6379 \
//!   cargo run -p evictd-client --example orders -- 1 2 3
//! ```
//!
//! It reads each order twice a second for `ORDERS_SECONDS` (default 10)
//! and prints an order whenever it changes, then what the cache counted.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use evictd_client::Cache;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Order {
    id: i64,
    user_id: i64,
    status: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let database = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL")?;
    let redis = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let seconds: u64 = std::env::var("ORDERS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let ids: Vec<i64> = std::env::args()
        .skip(1)
        .map(|id| id.parse())
        .collect::<Result<_, _>>()
        .map_err(|_| "order ids are integers")?;

    let (db, connection) = tokio_postgres::connect(&database, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let cache = Cache::builder(redis)
        .ttl(Duration::from_secs(3600))
        .jitter(0.1)
        .l1_entries(10_000)
        .build()
        .await?;

    let mut last: Vec<Option<Order>> = vec![None; ids.len()];
    let until = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < until {
        for (id, last) in ids.iter().zip(&mut last) {
            let db = &db;
            let order: Option<Order> = cache
                .get_or_load(&format!("order:{id}"), &[], || async move {
                    let row = db
                        .query_opt(
                            "select id, user_id, status from orders where id = $1",
                            &[id],
                        )
                        .await?;
                    Ok::<_, tokio_postgres::Error>(row.map(|row| Order {
                        id: row.get(0),
                        user_id: row.get(1),
                        status: row.get(2),
                    }))
                })
                .await?;
            if order != *last {
                println!("order {id}: {order:?}");
                *last = order;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let stats = cache.stats();
    println!(
        "L1 hits {}, Redis hits {}, loads {}, fills {}, fenced {}, degraded {}",
        stats.l1_hits.load(Ordering::Relaxed),
        stats.hits.load(Ordering::Relaxed),
        stats.loads.load(Ordering::Relaxed),
        stats.fills.load(Ordering::Relaxed),
        stats.fenced.load(Ordering::Relaxed),
        stats.degraded.load(Ordering::Relaxed),
    );
    Ok(())
}
