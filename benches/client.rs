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
//! - a namespace-versioned get (`get_or_load_in`: the version, then the
//!   composed key) against a plain `get_or_load` of a key, with the value
//!   in L1, with the value in Redis and the version in L1, and without L1
//!   (the version read from Redis every time).
//!
//! Each pair alternates over three rounds; the ratio is the median of the
//! rounds' ratios. Then the catch-up after a dropped subscription: 10,000
//! broadcasts missed while an L1 of 20,000 entries was cut off, replayed
//! from the log, against the flush a log that does not reach back forces.
//! Run: `cargo bench --bench client` (tables, then one JSON line).

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
        Pair {
            name: "versioned / plain, L1 hit",
            ours: vec![],
            base: vec![],
            target: 0.8,
        },
        Pair {
            name: "versioned / plain, L2 hit, version in L1",
            ours: vec![],
            base: vec![],
            target: 0.8,
        },
        Pair {
            name: "versioned / plain, L2 hit, no L1",
            ours: vec![],
            base: vec![],
            target: 0.0,
        },
    ];
    // The versioned pairs' values: "hot" under user:42 in L1, and 1,000
    // keys in Redis, plain and versioned, read through an L1 too small to
    // hold them.
    let _: Option<Order> = l1
        .get_or_load_in("user:42", "hot", &[], loader)
        .await
        .unwrap();
    let _: Option<Order> = l1.get_or_load("user:42:hot", &[], loader).await.unwrap();
    let _: Option<Order> = l2
        .get_or_load_in("user:42", "hot", &[], loader)
        .await
        .unwrap();
    const SPREAD: u64 = 1_000;
    for i in 0..SPREAD {
        let key = format!("spread:{i}");
        let _: Option<Order> = l2.get_or_load(&key, &[], loader).await.unwrap();
        let _: Option<Order> = l2
            .get_or_load_in("user:42", &key, &[], loader)
            .await
            .unwrap();
    }
    let small = Cache::builder(url.clone())
        .prefix("b:")
        .l1_entries(16)
        .build()
        .await
        .unwrap();
    while !small.l1_live() {
        assert!(Instant::now() < deadline, "L1 never went live");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let spread: Vec<String> = (0..SPREAD).map(|i| format!("spread:{i}")).collect();
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

        // The key an application would use without versions.
        let base = rate(2_000_000, |_| async {
            let value: Option<Order> = l1.get_or_load("user:42:hot", &[], loader).await.unwrap();
            std::hint::black_box(value);
        })
        .await;
        let ours = rate(2_000_000, |_| async {
            let value: Option<Order> = l1
                .get_or_load_in("user:42", "hot", &[], loader)
                .await
                .unwrap();
            std::hint::black_box(value);
        })
        .await;
        pairs[3].base.push(base);
        pairs[3].ours.push(ours);

        let base = rate(20_000, |i| {
            let (small, key) = (&small, &spread[(i % SPREAD) as usize]);
            async move {
                let value: Option<Order> = small.get_or_load(key, &[], loader).await.unwrap();
                std::hint::black_box(value);
            }
        })
        .await;
        let ours = rate(20_000, |i| {
            let (small, key) = (&small, &spread[(i % SPREAD) as usize]);
            async move {
                let value: Option<Order> = small
                    .get_or_load_in("user:42", key, &[], loader)
                    .await
                    .unwrap();
                std::hint::black_box(value);
            }
        })
        .await;
        pairs[4].base.push(base);
        pairs[4].ours.push(ours);

        let base = rate(20_000, |_| async {
            let value: Option<Order> = l2.get_or_load("hot", &[], loader).await.unwrap();
            std::hint::black_box(value);
        })
        .await;
        let ours = rate(20_000, |_| async {
            let value: Option<Order> = l2
                .get_or_load_in("user:42", "hot", &[], loader)
                .await
                .unwrap();
            std::hint::black_box(value);
        })
        .await;
        pairs[5].base.push(base);
        pairs[5].ours.push(ours);
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
        let target = if pair.target > 0.0 {
            format!(">= {}x", pair.target)
        } else {
            "none (for comparison)".to_owned()
        };
        println!(
            "| {} | {:.0} | {:.0} | {:.2}x | {target} |",
            pair.name,
            median(&pair.ours),
            median(&pair.base),
            pair.ratio(),
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
    println!();
    println!("| catch-up of 10,000 missed broadcasts | time to serving again (ms, median) | L1 entries kept of 20,000 |");
    println!("| --- | --- | --- |");
    for replay in [true, false] {
        let mut times = Vec::new();
        let mut kept = Vec::new();
        for round in 0..ROUNDS {
            let (time, entries) = catch_up(&url, replay, round).await;
            times.push(time);
            kept.push(entries);
        }
        times.sort_by(f64::total_cmp);
        kept.sort_unstable();
        let name = if replay {
            "replayed from the log"
        } else {
            "flushed (the log does not reach back)"
        };
        println!(
            "| {name} | {:.0} | {} |",
            times[ROUNDS / 2],
            kept[ROUNDS / 2]
        );
        json.push(format!(
            r#"{{"catch_up":"{name}","ms":{:.1},"kept":{}}}"#,
            times[ROUNDS / 2],
            kept[ROUNDS / 2]
        ));
    }
    println!("[{}]", json.join(","));
}

/// Entries in the L1 of [`catch_up`], and how many of them the missed
/// broadcasts invalidate.
const HELD: u64 = 20_000;
const MISSED: u64 = 10_000;
const TOUCHED: u64 = 1_000;

/// One catch-up: an L1 holding [`HELD`] entries loses its subscription
/// while [`MISSED`] broadcasts are logged (each invalidating one key,
/// [`TOUCHED`] of them held), written as evictd writes them. With
/// `replay`, the log reaches back; without, it starts after a gap. Returns
/// the time from the drop to L1 serving again, and the entries it kept.
async fn catch_up(url: &str, replay: bool, round: usize) -> (f64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let prefix = format!("c{round}{replay}:");
    let channel = format!("{prefix}l1");
    let client = redis::Client::open(url).unwrap();
    let mut redis = redis::aio::ConnectionManager::new(client).await.unwrap();
    let log = format!("{prefix}{}", evictd_client::protocol::L1_LOG_KEY);
    let last = format!("{prefix}{}", evictd_client::protocol::L1_LAST_KEY);
    let message = |seq: u64, key: String| {
        format!(r#"{{"v":1,"epoch":"e{round}","seq":{seq},"keys":["{key}"],"tags":[]}}"#)
    };
    // evictd's first message, applied live.
    let first = message(1, "nothing".into());
    let () = redis::pipe()
        .cmd("XADD")
        .arg(&log)
        .arg("*")
        .arg("m")
        .arg(&first)
        .ignore()
        .cmd("SET")
        .arg(&last)
        .arg(format!("e{round}:1"))
        .ignore()
        .query_async(&mut redis)
        .await
        .unwrap();
    let cache = Cache::builder(url)
        .prefix(prefix.clone())
        .l1_entries(2 * HELD)
        .l1_channel(channel.clone())
        .build()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cache.l1_live() {
        assert!(Instant::now() < deadline, "L1 never went live");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let () = redis::cmd("PUBLISH")
        .arg(&channel)
        .arg(&first)
        .query_async(&mut redis)
        .await
        .unwrap();
    while cache.l1_last().as_deref() != Some(&format!("e{round}:1")) {
        assert!(Instant::now() < deadline, "the first message never arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let loader = || async { Ok::<_, Infallible>(Some(order())) };
    for i in 0..HELD {
        let _: Option<Order> = cache
            .get_or_load(&format!("held:{i}"), &[], loader)
            .await
            .unwrap();
    }
    assert_eq!(cache.l1_len(), HELD);
    // The missed messages, logged but never published: the 1,000 first
    // invalidate held keys, the rest keys nobody holds.
    if !replay {
        let () = redis::cmd("DEL")
            .arg(&log)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    let mut pipe = redis::pipe();
    for seq in 2..MISSED + 2 {
        let i = seq - 2;
        let key = if i < TOUCHED {
            format!("held:{i}")
        } else {
            format!("other:{i}")
        };
        if replay || seq > MISSED {
            pipe.cmd("XADD")
                .arg(&log)
                .arg("*")
                .arg("m")
                .arg(message(seq, key))
                .ignore();
        }
    }
    pipe.cmd("SET")
        .arg(&last)
        .arg(format!("e{round}:{}", MISSED + 1))
        .ignore();
    let () = pipe.query_async(&mut redis).await.unwrap();
    let before = cache.stats().l1_flushes.load(Relaxed) + cache.stats().l1_replays.load(Relaxed);
    let started = Instant::now();
    let _: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut redis)
        .await
        .unwrap();
    loop {
        let after = cache.stats().l1_flushes.load(Relaxed) + cache.stats().l1_replays.load(Relaxed);
        if after > before && cache.l1_live() {
            break;
        }
        assert!(Instant::now() < deadline, "L1 never caught up");
        tokio::task::yield_now().await;
    }
    let elapsed = started.elapsed().as_secs_f64() * 1000.0;
    if replay {
        assert_eq!(cache.l1_last(), Some(format!("e{round}:{}", MISSED + 1)));
    }
    (elapsed, cache.l1_len())
}
