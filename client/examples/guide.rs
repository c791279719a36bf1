//! Every Rust snippet of docs/CLIENT.md, each inside the function that
//! gives it what it uses, so that CI compiles them; a test checks that
//! each snippet appears here line for line. It also runs, over the shop
//! schema (`migrations/`) with evictd applying `mappings/`:
//!
//! ```sh
//! DATABASE_URL=postgres://app:app@127.0.0.1:5432/app REDIS_URL=redis://127.0.0.1:6379 \
//!   cargo run -p evictd-client --features postgres --example guide
//! ```

use std::error::Error;

use evictd_client::Cache;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Order {
    id: i64,
    user_id: i64,
    status: String,
}

type Loaded<T> = Result<Option<T>, tokio_postgres::Error>;

/// The guide's first snippet: a cache and one fenced read.
#[rustfmt::skip]
async fn core(db: &tokio_postgres::Client, id: i64) -> Result<(), Box<dyn Error>> {
    use std::time::Duration;
    use evictd_client::Cache;

    #[derive(Clone, serde::Serialize, serde::Deserialize)]
    struct Order { id: i64, user_id: i64, status: String }

    let cache = Cache::builder("redis://127.0.0.1:6379") // or Cache::cluster([...])
        .prefix("")                          // evictd's redis.prefix
        .ttl(Duration::from_secs(3600))
        .jitter(0.1)                         // TTL +/- 10%
        .l1_entries(10_000)                  // or .l1_bytes(64 << 20)
        .l1_channel("evictd:l1")             // evictd's redis.l1_channel
        .build()
        .await?;
    let order: Option<Order> = cache
        .get_or_load(&format!("order:{id}"), &[], || async {
            // Ok(None) when there is no such row.
            let row = db
                .query_opt("select id, user_id, status from orders where id = $1", &[&id])
                .await?;
            Ok::<_, tokio_postgres::Error>(row.map(|r| Order {
                id: r.get(0),
                user_id: r.get(1),
                status: r.get(2),
            }))
        })
        .await?;
    println!("order {id}: {:?}", order.map(|order| order.status));
    Ok(())
}

/// "Tags taken from the row".
#[rustfmt::skip]
async fn tagged(cache: &Cache, db: &tokio_postgres::Client) -> Result<(), Box<dyn Error>> {
    let load_order = |id: i64| read_order(db, id);
    let order: Option<Order> = cache
        .get_or_load_tagged("order:7", &[], || async {
            let order = load_order(7).await?;
            Ok::<_, tokio_postgres::Error>(order.map(|o| {
                let tags = vec![format!("user:{}", o.user_id)];
                (o, tags)
            }))
        })
        .await?
        .0;
    println!("order 7, tagged by its user: {order:?}");
    Ok(())
}

/// "Whole namespaces at once".
#[rustfmt::skip]
async fn namespaced(cache: &Cache, db: &tokio_postgres::Client) -> Result<(), Box<dyn Error>> {
    let load_orders = || read_orders(db, 7);
    // Key `user:7@<version>:orders`, the version read from L1 or Redis.
    let orders: Option<Vec<Order>> = cache
        .get_or_load_in("user:7", "orders", &[], load_orders)
        .await?;
    let key = cache.versioned("user:7", "profile").await?; // to use the key yourself
    println!(
        "{} orders of user 7; their profile is {key}",
        orders.map_or(0, |o| o.len())
    );
    Ok(())
}

/// "Reading your own writes": `client` commits, `reader` loads.
#[rustfmt::skip]
async fn own_writes(
    cache: &Cache,
    mut client: tokio_postgres::Client,
    reader: &tokio_postgres::Client,
) -> Result<(), Box<dyn Error>> {
    use std::time::Duration;
    let load_order = |id: i64| read_order(reader, id);
    let tx = client.transaction().await?;
    tx.execute("update orders set status = status where id = 7", &[])
        .await?;
    tx.commit().await?;
    let position = evictd_client::commit_position(&client).await?; // feature "postgres"
    cache.wait_applied(position, Duration::from_secs(2)).await?;
    let order = cache.get_or_load("order:7", &["user:1"], || load_order(7)).await?;
    println!("order 7 after the write: {order:?}");
    Ok(())
}

async fn read_order(db: &tokio_postgres::Client, id: i64) -> Loaded<Order> {
    let row = db
        .query_opt(
            "select id, user_id, status from orders where id = $1",
            &[&id],
        )
        .await?;
    Ok(row.map(|r| Order {
        id: r.get(0),
        user_id: r.get(1),
        status: r.get(2),
    }))
}

async fn read_orders(db: &tokio_postgres::Client, user_id: i64) -> Loaded<Vec<Order>> {
    let rows = db
        .query(
            "select id, user_id, status from orders where user_id = $1",
            &[&user_id],
        )
        .await?;
    Ok(Some(
        rows.iter()
            .map(|r| Order {
                id: r.get(0),
                user_id: r.get(1),
                status: r.get(2),
            })
            .collect(),
    ))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let database = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL")?;
    let redis = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let (client, connection) = tokio_postgres::connect(&database, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let cache = Cache::builder(redis).l1_entries(1_000).build().await?;
    core(&client, 7).await?;
    tagged(&cache, &client).await?;
    namespaced(&cache, &client).await?;
    let (reader, connection) = tokio_postgres::connect(&database, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    own_writes(&cache, client, &reader).await?;
    Ok(())
}
