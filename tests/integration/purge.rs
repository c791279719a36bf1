//! CDN purges by surrogate key through real WAL: a real Varnish with xkey,
//! a signed webhook, and stand-ins for the Fastly and Cloudflare APIs that
//! check each request against the providers' published API (these two
//! cannot be reached from here).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use evictd::config::{PurgeKind, PurgeTarget, Secret};
use futures_util::FutureExt as _;

use evictd::testkit::Varnish;

use crate::support::web::{get, Answer, Handler, Received, Server};
use crate::support::{redis_connection, Streaming};

const SCHEMA: &str = "
    create table products (id bigint primary key, category_id bigint not null, name text not null);
    alter table products replica identity full;
    create publication evictd for table products;
";

const PRODUCTS: &str = r#"
[[table]]
name = "products"
keys = ["product:{id}"]
surrogate_keys = ["product-{id}", "category-{category_id}"]
"#;

fn target(kind: PurgeKind, url: String) -> PurgeTarget {
    PurgeTarget {
        rate: 100.0,
        timeout_ms: 2_000,
        retries: 3,
        ..PurgeTarget::with_defaults(kind, url)
    }
}

fn handler<F>(f: F) -> Handler
where
    F: Fn(&Received) -> Answer + Send + Sync + 'static,
{
    let f = Arc::new(f);
    Arc::new(move |request: &Received| {
        let answer = f(request);
        async move { answer }.boxed()
    })
}

/// The application behind Varnish: a product page is the product's cached
/// value in Redis (the L2) or else its row; a category page lists the
/// category's products. Each page carries its surrogate keys in `xkey`.
async fn application(db_url: String, prefix: String) -> Server {
    let handler: Handler = Arc::new(move |request: &Received| {
        let (db_url, prefix, path) = (db_url.clone(), prefix.clone(), request.path.clone());
        async move {
            let (client, connection) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(connection);
            if let Some(id) = path.strip_prefix("/product/") {
                let id: i64 = id.parse().expect("id");
                let mut redis = redis_connection().await;
                let cached: Option<String> = redis::cmd("GET")
                    .arg(format!("{prefix}product:{id}"))
                    .query_async(&mut redis)
                    .await
                    .expect("GET");
                let row = client
                    .query_one(
                        "select name, category_id from products where id = $1",
                        &[&id],
                    )
                    .await
                    .expect("product");
                let (name, category): (String, i64) = (row.get(0), row.get(1));
                return Answer::new(200, cached.unwrap_or(name))
                    .header("xkey", format!("product-{id} category-{category}"))
                    .header("Cache-Control", "max-age=3600");
            }
            let category: i64 = path
                .strip_prefix("/category/")
                .and_then(|id| id.parse().ok())
                .expect("a category page");
            let names: Vec<String> = client
                .query(
                    "select name from products where category_id = $1 order by id",
                    &[&category],
                )
                .await
                .expect("products")
                .iter()
                .map(|row| row.get(0))
                .collect();
            Answer::new(200, names.join(","))
                .header("xkey", format!("category-{category}"))
                .header("Cache-Control", "max-age=3600")
        }
        .boxed()
    });
    Server::start(handler).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn varnish_pages_are_purged_by_surrogate_key_after_redis() {
    let db = crate::support::TestDb::new().await;
    db.execute(SCHEMA).await;
    db.execute("insert into products values (1, 1, 'old'), (2, 2, 'other')")
        .await;
    let app = application(db.url.clone(), db.prefix.clone()).await;
    let varnish = Varnish::start(app.port).expect("start varnishd");
    let dir = crate::support::mapping_dir(&[("products.toml", PRODUCTS)]);
    let mut config = crate::support::streaming_config(&db, dir.path());
    config.purge = vec![target(PurgeKind::Varnish, varnish.url("/"))];
    let evictd = evictd::testkit::Evictd::start(&config)
        .await
        .expect("start");
    let mut redis = redis_connection().await;
    let key = format!("{}product:1", db.prefix);
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("old")
        .query_async(&mut redis)
        .await
        .expect("SET");
    // Cached at the edge: the second read does not reach the application.
    for path in ["/product/1", "/category/1", "/category/2"] {
        get(&varnish.url(path)).await;
    }
    let fetched = app.requests().len();
    assert_eq!(get(&varnish.url("/product/1")).await, (200, "old".into()));
    assert_eq!(get(&varnish.url("/category/1")).await, (200, "old".into()));
    assert_eq!(
        get(&varnish.url("/category/2")).await,
        (200, "other".into())
    );
    assert_eq!(app.requests().len(), fetched, "served from Varnish");

    // Readers keep refilling the page while the product changes and moves
    // to category 2: had the purge gone out before Redis dropped the old
    // value, a refill would have put the old page back.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (url, stop) = (varnish.url("/product/1"), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                get(&url).await;
            }
        })
    };
    db.execute("update products set name = 'new', category_id = 2 where id = 1")
        .await;
    evictd.sync().await.expect("sync");
    stop.store(true, Ordering::Relaxed);
    reader.await.expect("reader");
    assert_eq!(get(&varnish.url("/product/1")).await, (200, "new".into()));
    // The FK move purged both categories' pages.
    assert_eq!(get(&varnish.url("/category/1")).await, (200, String::new()));
    assert_eq!(
        get(&varnish.url("/category/2")).await,
        (200, "new,other".into())
    );
    evictd.stop().await.expect("stop");
}

/// Verifies a webhook request's signature with `secret`, independently of
/// evictd's own code.
fn signed_by(request: &Received, secret: &[u8]) -> bool {
    let (Some(timestamp), Some(signature)) = (
        request.header("X-Evictd-Timestamp"),
        request.header("X-Evictd-Signature"),
    ) else {
        return false;
    };
    let Some(hex) = signature.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(tag) = (0..hex.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(hex.get(at..at + 2).unwrap_or("zz"), 16))
        .collect::<Result<Vec<u8>, _>>()
    else {
        return false;
    };
    let mut message = format!("{timestamp}.").into_bytes();
    message.extend_from_slice(&request.body);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    ring::hmac::verify(&key, &message, &tag).is_ok()
}

fn webhook_target(url: String, secret_file: &std::path::Path) -> PurgeTarget {
    PurgeTarget {
        secret: Some(Secret::File(secret_file.to_path_buf())),
        ..target(PurgeKind::Webhook, url)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_webhook_gets_the_keys_after_redis_and_holds_the_ack_while_down_as_redis_goes_on()
{
    let secret_dir = tempfile::tempdir().expect("tempdir");
    let secret_file = secret_dir.path().join("secret");
    std::fs::write(&secret_file, "s3cret\n").expect("write the secret");
    // Bind a port, then leave it closed: the receiver is down at first.
    let port = crate::support::free_port();
    let url = format!("http://127.0.0.1:{port}/purge");
    let mut s = Streaming::start_with(SCHEMA, &[("products.toml", PRODUCTS)], |config| {
        config.purge = vec![webhook_target(url.clone(), &secret_file)];
    })
    .await;
    s.seed(&["product:1", "product:2"]).await;
    s.db.execute("insert into products values (1, 7, 'a')")
        .await;
    // Nothing is acknowledged while the receiver is down.
    assert!(
        s.evictd.sync_within(Duration::from_secs(2)).await.is_err(),
        "acknowledged before the webhook accepted the purge"
    );
    // Redis goes on with the batches after (their purges wait in order),
    // and those are not acknowledged either.
    s.db.execute("insert into products values (2, 8, 'b')")
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !s.cached(&["product:2"]).await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "Redis waited for the purge before it"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        s.evictd
            .sync_within(Duration::from_millis(500))
            .await
            .is_err(),
        "a later batch acknowledged before the purge before it"
    );
    // The receiver comes up; at each request it checks that Redis already
    // dropped the key.
    let prefix = s.db.prefix.clone();
    let redis_state = Arc::new(Mutex::new(Vec::new()));
    let seen = redis_state.clone();
    let handler: Handler = Arc::new(move |_request: &Received| {
        let (prefix, seen) = (prefix.clone(), seen.clone());
        async move {
            let mut redis = redis_connection().await;
            let exists: bool = redis::cmd("EXISTS")
                .arg(format!("{prefix}product:1"))
                .query_async(&mut redis)
                .await
                .expect("EXISTS");
            seen.lock().unwrap().push(exists);
            Answer::new(200, "ok")
        }
        .boxed()
    });
    let receiver = Server::start_on(port, handler).await;
    s.sync().await;
    let requests = receiver.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    let request = &requests[0];
    assert_eq!(
        (request.method.as_str(), request.path.as_str()),
        ("POST", "/purge")
    );
    assert!(signed_by(request, b"s3cret"), "the signature verifies");
    assert!(!signed_by(request, b"other"), "and only with the secret");
    assert_eq!(
        request.json(),
        serde_json::json!({"surrogate_keys": ["product-1", "category-7"], "purge_all": false})
    );
    assert_eq!(
        requests[1].json(),
        serde_json::json!({"surrogate_keys": ["product-2", "category-8"], "purge_all": false}),
        "in order"
    );
    assert_eq!(
        *redis_state.lock().unwrap(),
        [false, false],
        "Redis was invalidated first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_best_effort_webhook_that_is_down_does_not_hold_the_ack() {
    let secret_dir = tempfile::tempdir().expect("tempdir");
    let secret_file = secret_dir.path().join("secret");
    std::fs::write(&secret_file, "s3cret").expect("write the secret");
    let failing = Server::start(handler(|_| Answer::new(503, "down"))).await;
    let url = failing.url("/purge");
    let mut s = Streaming::start_with(SCHEMA, &[("products.toml", PRODUCTS)], |config| {
        config.purge = vec![PurgeTarget {
            best_effort: true,
            retries: 2,
            ..webhook_target(url.clone(), &secret_file)
        }];
    })
    .await;
    s.seed(&["product:1"]).await;
    s.db.execute("insert into products values (1, 7, 'a')")
        .await;
    s.evictd
        .sync_within(Duration::from_secs(20))
        .await
        .expect("acknowledged after the retries gave up");
    assert!(s.cached(&["product:1"]).await.is_empty());
    assert_eq!(failing.requests().len(), 2, "two attempts, then dropped");
}

/// A stand-in for the Fastly and Cloudflare purge APIs, checking each
/// request against their documentation: paths, authentication headers,
/// JSON bodies and batch limits. The first request to each answers 429
/// with `Retry-After: 1`, Cloudflare's second 503; later ones succeed.
fn provider_api() -> Handler {
    let fastly_calls = Arc::new(AtomicUsize::new(0));
    let cloudflare_calls = Arc::new(AtomicUsize::new(0));
    handler(move |request| {
        let bad = |why: &str| Answer::new(400, format!("{{\"msg\": \"{why}\"}}"));
        match request.path.as_str() {
            "/fastly/service/SVC123/purge" => {
                if request.method != "POST" {
                    return bad("method");
                }
                if request.header("Fastly-Key") != Some("fastly-token") {
                    return Answer::new(
                        401,
                        r#"{"msg":"Provided credentials are missing or invalid"}"#,
                    );
                }
                if request.header("Content-Type") != Some("application/json")
                    || request.header("Accept") != Some("application/json")
                {
                    return bad("content type");
                }
                let keys = request.json()["surrogate_keys"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if keys.is_empty() || keys.len() > 256 {
                    return bad("between 1 and 256 surrogate keys per request");
                }
                if fastly_calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    return Answer::new(429, r#"{"msg":"rate limited"}"#)
                        .header("Retry-After", "1");
                }
                Answer::new(200, r#"{"status":"ok"}"#)
            }
            "/cloudflare/zones/ZONE9/purge_cache" => {
                if request.method != "POST" {
                    return bad("method");
                }
                if request.header("Authorization") != Some("Bearer cf-token") {
                    return Answer::new(
                        401,
                        r#"{"success":false,"errors":[{"code":10000,"message":"Authentication error"}]}"#,
                    );
                }
                if request.header("Content-Type") != Some("application/json") {
                    return bad("content type");
                }
                let tags = request.json()["tags"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if tags.is_empty() || tags.len() > 100 {
                    return Answer::new(
                        400,
                        r#"{"success":false,"errors":[{"code":1018,"message":"too many tags"}]}"#,
                    );
                }
                match cloudflare_calls.fetch_add(1, Ordering::SeqCst) {
                    0 => Answer::new(
                        429,
                        r#"{"success":false,"errors":[{"code":971,"message":"rate limited"}]}"#,
                    )
                    .header("Retry-After", "1"),
                    1 => Answer::new(503, "unavailable"),
                    _ => Answer::new(
                        200,
                        r#"{"success":true,"errors":[],"messages":[],"result":{"id":"ZONE9"}}"#,
                    ),
                }
            }
            _ => Answer::new(404, "no such path"),
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fastly_and_cloudflare_get_batches_within_their_limits_paced_and_retried() {
    let api = Server::start(provider_api()).await;
    let tokens = tempfile::tempdir().expect("tempdir");
    let fastly_token = tokens.path().join("fastly");
    std::fs::write(&fastly_token, "fastly-token\n").expect("write");
    // SAFETY-free: the variable is this test's own.
    let cloudflare_env = format!("EVICTD_TEST_CF_TOKEN_{}", std::process::id());
    std::env::set_var(&cloudflare_env, "cf-token");
    let fastly = PurgeTarget {
        service_id: Some("SVC123".into()),
        token: Some(Secret::File(fastly_token)),
        ..target(PurgeKind::Fastly, api.url("/fastly"))
    };
    let cloudflare = PurgeTarget {
        zone_id: Some("ZONE9".into()),
        token: Some(Secret::Env(cloudflare_env)),
        rate: 5.0,
        ..target(PurgeKind::Cloudflare, api.url("/cloudflare"))
    };
    let s = Streaming::start_with(SCHEMA, &[("products.toml", PRODUCTS)], |config| {
        config.purge = vec![fastly, cloudflare];
        // The batch timer must not cut the transaction below in two (it
        // did on a busy machine): the request counts below are per batch.
        config.batch.max_wait_ms = 10_000;
    })
    .await;
    // 300 products in one category: 301 surrogate keys in one batch.
    s.db.execute("insert into products select g, 1, 'p' from generate_series(1, 300) g")
        .await;
    // Both answered "come back in a second": nothing is acknowledged yet.
    assert!(
        s.evictd
            .sync_within(Duration::from_millis(500))
            .await
            .is_err(),
        "acknowledged before the providers accepted the purges"
    );
    s.sync().await;
    let requests = api.requests();
    // The keys, the times and the size of every request to one provider.
    let accepted = |prefix: &str, field: &str| -> (Vec<String>, Vec<Instant>, Vec<usize>) {
        let mut keys = Vec::new();
        let mut times = Vec::new();
        let mut sizes = Vec::new();
        for request in requests.iter().filter(|r| r.path.starts_with(prefix)) {
            times.push(request.at);
            let batch = request.json()[field].as_array().unwrap().clone();
            sizes.push(batch.len());
            keys.extend(batch.iter().map(|key| key.as_str().unwrap().to_owned()));
        }
        (keys, times, sizes)
    };
    let mut expected: Vec<String> = (1..=300).map(|id| format!("product-{id}")).collect();
    expected.push("category-1".into());
    expected.sort();
    // Fastly: 256 + 45 keys, the first request retried after its 429.
    let (mut keys, times, sizes) = accepted("/fastly/", "surrogate_keys");
    assert_eq!(sizes, [256, 256, 45], "two batches and one retry");
    assert!(
        times[1].duration_since(times[0]) >= Duration::from_millis(900),
        "Retry-After honoured"
    );
    keys.sort();
    keys.dedup();
    assert_eq!(keys, expected);
    // Cloudflare: four batches of at most 100 tags, paced at 5 a second,
    // the first retried after a 429 and again after a 503.
    let (mut keys, times, sizes) = accepted("/cloudflare/", "tags");
    assert_eq!(
        sizes,
        [100, 100, 100, 100, 100, 1],
        "four batches and two retries"
    );
    for pair in times.windows(2) {
        assert!(
            pair[1].duration_since(pair[0]) >= Duration::from_millis(190),
            "paced: {times:?}"
        );
    }
    keys.sort();
    keys.dedup();
    assert_eq!(keys, expected);
}

/// `/readyz` of `s`'s pipeline, served as `evictd run` serves it.
async fn serve_admin(s: &Streaming) -> u16 {
    let state = evictd::service::admin_state(&s.config, s.evictd.running()).expect("admin state");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(evictd::internal::serve(listener, state));
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_refusing_the_token_waits_for_the_operator_and_says_so_on_readyz() {
    let api = Server::start(provider_api()).await;
    let tokens = tempfile::tempdir().expect("tempdir");
    let token = tokens.path().join("fastly");
    std::fs::write(&token, "a-revoked-token\n").expect("write");
    let fastly = PurgeTarget {
        service_id: Some("SVC123".into()),
        token: Some(Secret::File(token.clone())),
        ..target(PurgeKind::Fastly, api.url("/fastly"))
    };
    let mut s = Streaming::start_with(SCHEMA, &[("products.toml", PRODUCTS)], |config| {
        config.purge = vec![fastly];
    })
    .await;
    let port = serve_admin(&s).await;
    s.seed(&["product:1"]).await;
    s.db.execute("insert into products values (1, 7, 'a')")
        .await;
    // Redis is invalidated; the purge is refused (401): not acknowledged,
    // and /readyz says why and what to do.
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (status, body) =
            crate::support::web::get(&format!("http://127.0.0.1:{port}/readyz")).await;
        if status == 503 && body.contains("purge:") {
            break body;
        }
        assert!(Instant::now() < deadline, "readyz: {status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        body.contains("target fastly refuses purges (HTTP 401"),
        "{body}"
    );
    assert!(body.contains("check its token_file"), "{body}");
    assert!(s.cached(&["product:1"]).await.is_empty());
    assert!(
        s.evictd.sync_within(Duration::from_secs(1)).await.is_err(),
        "acknowledged before the target accepted the purge"
    );
    let refused = api
        .requests()
        .iter()
        .filter(|r| r.header("Fastly-Key") == Some("a-revoked-token"))
        .count();
    assert!(refused >= 2, "retried: {refused} requests");
    // The operator fixes the token file: the next attempt reads it.
    std::fs::write(&token, "fastly-token\n").expect("write");
    s.evictd
        .sync_within(Duration::from_secs(30))
        .await
        .expect("acknowledged once the target accepted");
    let (status, body) = crate::support::web::get(&format!("http://127.0.0.1:{port}/readyz")).await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
}
