//! B6, the client crate against what it is built from, in one run on one
//! Redis (the testkit's, on localhost):
//!
//! - an L1 hit (`get_or_load` served in process) against a bare moka `get`
//!   of the same value type;
//! - an L2 hit (`get_or_load` served by Redis, decoded) against a bare
//!   `GET` over the same kind of connection;
//! - a cold read filled with fencing (`GET`, `SET NX` of the lease into
//!   the key, the fill script) against plain cache-aside (`GET`, `SET`).
//!
//! Each pair alternates over three rounds; the ratio is the median of the
//! rounds' ratios. Run: `cargo bench --bench client` (a table, then one
//! JSON line).

use std::convert::Infallible;
use std::time::{Duration, Instant};

use evictd::testkit::Redis;
use evictd_client::Cache;

#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Order {
    id: i64,
    user_id: i64,
    status: String,
}

fn order() -> Order {
    Order {
        id: 7,
        user_id: 42,
        status: "shipped".into(),
    }
}

const ROUNDS: usize = 3;

struct Pair {
    name: &'static str,
    ours: Vec<f64>,
    base: Vec<f64>,
    target: f64,
}

impl Pair {
    fn ratio(&self) -> f64 {
        let mut ratios: Vec<f64> = self
            .ours
            .iter()
            .zip(&self.base)
            .map(|(ours, base)| ours / base)
            .collect();
        ratios.sort_by(f64::total_cmp);
        ratios[ratios.len() / 2]
    }
}

/// Operations per second of `n` awaited calls of `op`.
async fn rate<F, Fut>(n: u64, mut op: F) -> f64
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let started = Instant::now();
    for i in 0..n {
        op(i).await;
    }
    n as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let redis = Redis::start().expect("start redis");
    let url = redis.url();
    let l1 = Cache::builder(url.clone())
        .prefix("b:")
        .l1_entries(10_000)
        .build()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !l1.l1_live() {
        assert!(Instant::now() < deadline, "L1 never went live");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let l2 = Cache::builder(url.clone())
        .prefix("b:")
        .build()
        .await
        .unwrap();
    let loader = || async { Ok::<_, Infallible>(Some(order())) };
    let _: Option<Order> = l1.get_or_load("hot", &[], loader).await.unwrap();
    let moka: moka::sync::Cache<String, Order> = moka::sync::Cache::builder()
        .max_capacity(10_000)
        .time_to_live(Duration::from_secs(60))
        .build();
    moka.insert("hot".to_owned(), order());
    let client = redis::Client::open(url.as_str()).unwrap();
    let bare = redis::aio::ConnectionManager::new(client).await.unwrap();

    let mut pairs = vec![
        Pair {
            name: "L1 hit / moka get",
            ours: vec![],
            base: vec![],
            target: 0.8,
        },
        Pair {
            name: "L2 hit / GET",
            ours: vec![],
            base: vec![],
            target: 0.8,
        },
        Pair {
            name: "fenced fill / GET+SET",
            ours: vec![],
            base: vec![],
            target: 0.5,
        },
    ];
    for round in 0..ROUNDS {
        let base = rate(2_000_000, |_| {
            let value = moka.get("hot");
            async move {
                std::hint::black_box(value);
            }
        })
        .await;
        let ours = rate(2_000_000, |_| async {
            let value: Option<Order> = l1.get_or_load("hot", &[], loader).await.unwrap();
            std::hint::black_box(value);
        })
        .await;
        pairs[0].base.push(base);
        pairs[0].ours.push(ours);

        let base = rate(20_000, |_| {
            let mut bare = bare.clone();
            async move {
                let value: Option<String> = redis::cmd("GET")
                    .arg("b:hot")
                    .query_async(&mut bare)
                    .await
                    .unwrap();
                std::hint::black_box(value);
            }
        })
        .await;
        let ours = rate(20_000, |_| async {
            let value: Option<Order> = l2.get_or_load("hot", &[], loader).await.unwrap();
            std::hint::black_box(value);
        })
        .await;
        pairs[1].base.push(base);
        pairs[1].ours.push(ours);

        let json = serde_json::to_string(&order()).unwrap();
        let base = rate(10_000, |i| {
            let mut bare = bare.clone();
            let json = json.clone();
            async move {
                let key = format!("b:plain:{round}:{i}");
                let value: Option<String> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut bare)
                    .await
                    .unwrap();
                if value.is_none() {
                    let () = redis::cmd("SET")
                        .arg(&key)
                        .arg(json)
                        .query_async(&mut bare)
                        .await
                        .unwrap();
                }
            }
        })
        .await;
        let ours = rate(10_000, |i| {
            let l2 = &l2;
            async move {
                let key = format!("cold:{round}:{i}");
                let value: Option<Order> = l2.get_or_load(&key, &[], loader).await.unwrap();
                std::hint::black_box(value);
            }
        })
        .await;
        pairs[2].base.push(base);
        pairs[2].ours.push(ours);
    }

    println!("| pair | ours (ops/s, median) | baseline | ratio | target |");
    println!("| --- | --- | --- | --- | --- |");
    let mut json = Vec::new();
    for pair in &pairs {
        let median = |values: &[f64]| {
            let mut values = values.to_vec();
            values.sort_by(f64::total_cmp);
            values[values.len() / 2]
        };
        println!(
            "| {} | {:.0} | {:.0} | {:.2}x | >= {}x |",
            pair.name,
            median(&pair.ours),
            median(&pair.base),
            pair.ratio(),
            pair.target
        );
        json.push(format!(
            r#"{{"pair":"{}","ours":{:.0},"base":{:.0},"ratio":{:.3},"target":{}}}"#,
            pair.name,
            median(&pair.ours),
            median(&pair.base),
            pair.ratio(),
            pair.target
        ));
    }
    println!("[{}]", json.join(","));
}
