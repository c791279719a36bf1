//! The console (`admin.console`) against real Postgres, Redis and evictd:
//! the live stream within a second of a commit, filtered; the trace,
//! explain, tables, stats and report answers; the token beyond loopback;
//! malformed requests; many and stalled subscribers, which are dropped
//! while apply goes on; and the page itself in headless Chromium, driven
//! over the DevTools protocol by tests/browser/console.py.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

use crate::support::{mapping_dir, streaming_config, TestDb};
use evictd::config::{Config, Secret};
use evictd::pipeline::Running;

pub const SCHEMA: &str = "
    create table orders (id bigint primary key, user_id bigint not null, status text not null);
    create table users (id bigint primary key, name text not null);
    create table docs (id bigint primary key, slug text not null);
    alter table orders replica identity full;
    create publication evictd for table orders, users, docs;
    insert into orders values (1, 1, 'new');
    insert into users values (1, 'ada');
";

pub const ORDERS: &str = r#"[[table]]
name = "orders"
keys = ["order:{id}"]
tags = ["user:{user_id}"]
"#;

pub const USERS: &str = r#"[[table]]
name = "users"
keys = ["user:{id}:profile"]
"#;

pub const DOCS: &str = r#"[[table]]
name = "docs"
keys = ["doc:{slug}"]
"#;

/// evictd with its console on, serving the admin endpoint on a free port.
pub struct Console {
    pub db: TestDb,
    pub running: Running,
    pub port: u16,
    _dir: tempfile::TempDir,
    _token: Option<tempfile::TempDir>,
}

impl Console {
    /// With `token`, the console needs it and listens on every address
    /// (`0.0.0.0`); without, it listens on loopback only.
    pub async fn start(token: Option<&str>) -> Console {
        crate::support::init_logging();
        let db = TestDb::new().await;
        db.execute(SCHEMA).await;
        let dir = mapping_dir(&[
            ("orders.toml", ORDERS),
            ("users.toml", USERS),
            ("docs.toml", DOCS),
        ]);
        let mut config = streaming_config(&db, dir.path());
        config.admin.console = true;
        let token_dir = token.map(|token| {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("token"), format!("{token}\n")).unwrap();
            config.admin.token = Some(Secret::File(dir.path().join("token")));
            config.admin.listen = "0.0.0.0:0".parse().unwrap();
            dir
        });
        if token.is_none() {
            config.admin.listen = "127.0.0.1:0".parse().unwrap();
        }
        let listener = tokio::net::TcpListener::bind(config.admin.listen)
            .await
            .unwrap();
        let mappings = evictd::mapping::load_dir(dir.path(), config.mappings.limits).unwrap();
        let service = evictd::service::Service::start(
            &config,
            Arc::new(mappings),
            evictd::pipeline::Options::default(),
            Some(listener),
        )
        .expect("start evictd");
        let port = service.admin.expect("an admin address").port();
        let running = service
            .running
            .streaming_within(Duration::from_secs(60))
            .await
            .expect("streaming");
        Console {
            db,
            running,
            port,
            _dir: dir,
            _token: token_dir,
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.running.stop();
    }
}

/// GET `path` with an optional bearer token: the status and the body.
pub async fn get(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    let auth = token.map_or_else(String::new, |token| {
        format!("authorization: Bearer {token}\r\n")
    });
    raw(
        port,
        &format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n{auth}\r\n"),
    )
    .await
}

/// `request` sent as is: the status and the body of the answer.
async fn raw(port: u16, request: &str) -> (u16, String) {
    use tokio::io::AsyncReadExt as _;
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let read = async {
        let mut buf = [0_u8; 8192];
        // A reset after the answer (the server closed with the rest of a
        // long request unread) keeps what was read.
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
            response.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("an answer within 60 s");
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or_else(String::new, |(_, body)| body.to_owned());
    (status, body)
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// A live-stream subscriber reading its events.
struct Subscriber {
    lines: tokio::io::Lines<BufReader<TcpStream>>,
}

impl Subscriber {
    async fn connect(port: u16, query: &str, token: Option<&str>) -> Subscriber {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let auth = token.map_or_else(String::new, |token| {
            format!("authorization: Bearer {token}\r\n")
        });
        stream
            .write_all(
                format!("GET /ui/api/events{query} HTTP/1.1\r\nhost: x\r\n{auth}\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let mut lines = BufReader::new(stream).lines();
        let first = lines.next_line().await.unwrap().unwrap();
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        // Up to the comment that says it is subscribed.
        while let Some(line) = lines.next_line().await.unwrap() {
            if line == ": connected" {
                break;
            }
        }
        Subscriber { lines }
    }

    /// The next event's JSON, within `timeout`.
    async fn next(&mut self, timeout: Duration) -> Option<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.next_line())
                .await
                .ok()?
                .ok()??;
            if let Some(data) = line.strip_prefix("data: ") {
                return Some(json(data));
            }
        }
    }
}

fn targets(event: &serde_json::Value) -> Vec<String> {
    event["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["target"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_stream_shows_a_commit_within_a_second_filtered_by_table() {
    let c = Console::start(None).await;
    let (status, page) = get(c.port, "/ui", None).await;
    assert_eq!(status, 200);
    assert!(page.contains("evictd console"), "{page}");

    let mut everything = Subscriber::connect(c.port, "", None).await;
    let mut orders = Subscriber::connect(c.port, "?table=orders", None).await;
    let mut by_key = Subscriber::connect(c.port, "?key=user%3A*%3Aprofile", None).await;

    // One user, then one order: each subscriber sees what it asked for.
    c.db.execute("update users set name = 'grace' where id = 1")
        .await;
    let committed = Instant::now();
    c.db.execute("insert into orders values (7, 1, 'new')")
        .await;
    let mut seen_order = None;
    let mut seen_user = false;
    while seen_order.is_none() || !seen_user {
        let event = everything
            .next(Duration::from_secs(5))
            .await
            .expect("an event");
        let shown = targets(&event);
        seen_user |= shown.iter().any(|t| t == "user:1:profile");
        if let Some(at) = shown.iter().position(|t| t == "order:7") {
            seen_order = Some(committed.elapsed());
            assert_eq!(event["items"][at]["table"], "public.orders", "{event}");
            assert_eq!(event["items"][at]["mode"], "exact", "{event}");
            assert_eq!(
                event["ops"]["public.orders"],
                serde_json::json!(["insert"]),
                "{event}"
            );
            assert!(event["position"].as_str().unwrap().contains('/'), "{event}");
        }
    }
    let took = seen_order.unwrap();
    assert!(
        took < Duration::from_secs(1),
        "the commit took {took:?} to appear"
    );

    let event = orders.next(Duration::from_secs(5)).await.expect("an order");
    let shown = targets(&event);
    assert!(shown.contains(&"order:7".to_owned()), "{event}");
    assert!(shown.iter().all(|t| !t.contains("profile")), "{event}");
    assert!(orders.next(Duration::from_millis(500)).await.is_none());
    let event = by_key.next(Duration::from_secs(5)).await.expect("a user");
    assert_eq!(targets(&event), ["user:1:profile"], "{event}");
    assert!(by_key.next(Duration::from_millis(500)).await.is_none());

    // The other answers.
    let (status, tables) = get(c.port, "/ui/api/tables", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        json(&tables),
        serde_json::json!(["public.docs", "public.orders", "public.users"])
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, stats) = get(c.port, "/ui/api/stats", None).await;
        assert_eq!(status, 200);
        let stats = json(&stats);
        assert_eq!(stats["values"], false, "{stats}");
        let changes: u64 = stats["samples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["changes"].as_u64().unwrap())
            .sum();
        if changes >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no throughput in {stats}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // The trace without a token: the verdict, no rows or values.
    let (status, trace) = get(c.port, "/ui/api/trace?key=order%3A7", None).await;
    assert_eq!(status, 200, "{trace}");
    let trace = json(&trace);
    assert_eq!(trace["verdict"]["state"], "exact", "{trace}");
    assert_eq!(trace["rows"], serde_json::json!([]), "{trace}");
    assert!(
        trace["rows_skipped"].as_str().unwrap().contains("hidden"),
        "{trace}"
    );
    assert!(
        !trace.to_string().contains("\"new\""),
        "a row value leaked: {trace}"
    );
    assert_eq!(trace["invalidations"][0]["mode"], "exact", "{trace}");

    let (status, explained) = get(
        c.port,
        "/ui/api/explain?table=orders&op=update&old=%7B%22id%22%3A7%2C%22user_id%22%3A1%2C%22status%22%3A%22new%22%7D&new=%7B%22id%22%3A7%2C%22user_id%22%3A2%2C%22status%22%3A%22paid%22%7D",
        None,
    )
    .await;
    assert_eq!(status, 200, "{explained}");
    let commands: Vec<String> = json(&explained)["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|line| line["command"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(commands, ["UNLINK order:7", "TAG user:1", "TAG user:2"]);
    let (status, refused) = get(c.port, "/ui/api/explain?table=invoices&op=insert", None).await;
    assert_eq!(status, 400);
    assert!(refused.contains("invoices is not mapped"), "{refused}");
    let (status, refused) = get(c.port, "/ui/api/explain?table=orders&op=delete", None).await;
    assert_eq!(status, 400);
    assert!(refused.contains("needs the old row"), "{refused}");

    let (status, report) = get(c.port, "/ui/api/report?window=1s", None).await;
    assert_eq!(status, 200, "{report}");
    let report = json(&report);
    assert!(
        report["markdown"]
            .as_str()
            .unwrap()
            .contains("public.orders"),
        "{report}"
    );
    let (status, _) = get(c.port, "/ui/api/report?window=1h", None).await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_loopback_the_console_needs_its_token() {
    // Not even loaded without one.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("evictd.toml");
    std::fs::write(
        &file,
        "[postgres]\nurl = \"postgres://evictd@db/app\"\n[redis]\nurl = \"redis://127.0.0.1\"\n[admin]\nlisten = \"0.0.0.0:9187\"\nconsole = true\n",
    )
    .unwrap();
    let error = Config::load(&file).unwrap_err().to_string();
    assert!(
        error.contains("admin.console") && error.contains("token_file"),
        "{error}"
    );
    std::fs::write(
        &file,
        "[postgres]\nurl = \"postgres://evictd@db/app\"\n[redis]\nurl = \"redis://127.0.0.1\"\n[admin]\nlisten = \"0.0.0.0:9187\"\nconsole = true\ntoken_file = \"token\"\n",
    )
    .unwrap();
    let config = Config::load(&file).expect("a console with a token loads");
    assert_eq!(
        config.admin.token,
        Some(Secret::File(dir.path().join("token")))
    );

    let c = Console::start(Some("s3cret-token")).await;
    // The page holds no data: it is served, and asks for the token.
    assert_eq!(get(c.port, "/ui", None).await.0, 200);
    for path in [
        "/ui/api/stats",
        "/ui/api/tables",
        "/ui/api/trace?key=order%3A1",
        "/ui/api/explain?table=orders&op=truncate",
        "/ui/api/events",
    ] {
        let (status, body) = get(c.port, path, None).await;
        assert_eq!(status, 401, "{path}: {body}");
        assert!(body.contains("Bearer"), "{body}");
        let (status, _) = get(c.port, path, Some("wrong")).await;
        assert_eq!(status, 401, "{path}");
    }
    let (status, stats) = get(c.port, "/ui/api/stats", Some("s3cret-token")).await;
    assert_eq!(status, 200);
    assert_eq!(json(&stats)["values"], true);
    // With the token, the trace shows the rows and the cached value.
    let mut redis = crate::support::redis_connection().await;
    let _: () = redis::cmd("SET")
        .arg(format!("{}order:1", c.db.prefix))
        .arg("{\"status\":\"cached\"}")
        .query_async(&mut redis)
        .await
        .unwrap();
    let (status, trace) = get(c.port, "/ui/api/trace?key=order%3A1", Some("s3cret-token")).await;
    assert_eq!(status, 200, "{trace}");
    let trace = json(&trace);
    assert_eq!(trace["rows"][0]["rows"][0]["user_id"], "1", "{trace}");
    assert!(
        trace["redis"]["value"].as_str().unwrap().contains("cached"),
        "{trace}"
    );
    assert_eq!(trace["tags"], serde_json::json!(["user:1"]), "{trace}");
    let mut events = Subscriber::connect(c.port, "", Some("s3cret-token")).await;
    c.db.execute("delete from orders where id = 1").await;
    let event = events.next(Duration::from_secs(5)).await.expect("an event");
    assert!(targets(&event).contains(&"order:1".to_owned()), "{event}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_and_stalled_subscribers_never_hold_apply() {
    let c = Console::start(None).await;
    // Malformed, oversized, wrong method, unknown paths: each answered or
    // closed, and the endpoint goes on.
    for (request, status) in [
        ("POST /ui/api/stats HTTP/1.1\r\nhost: x\r\n\r\n", 405),
        ("GET /ui/api/nothing HTTP/1.1\r\nhost: x\r\n\r\n", 404),
        ("GET /ui/../metrics HTTP/1.1\r\nhost: x\r\n\r\n", 404),
        ("GET /ui/api/trace HTTP/1.1\r\nhost: x\r\n\r\n", 400),
        (
            "GET /ui/api/explain?table=%zz&op=%ff HTTP/1.1\r\nhost: x\r\n\r\n",
            400,
        ),
        ("\u{0}\u{1}garbage\r\n\r\n", 405),
    ] {
        assert_eq!(raw(c.port, request).await.0, status, "{request:?}");
    }
    let huge = format!("GET /ui/api/stats?{} HTTP/1.1\r\n\r\n", "a".repeat(20_000));
    let (status, _) = raw(c.port, &huge).await;
    assert_eq!(status, 431, "a head past 8 KiB");
    // A client that sends half a head and waits is cut off (5 s), and
    // holds nothing meanwhile.
    let mut half = TcpStream::connect(("127.0.0.1", c.port)).await.unwrap();
    half.write_all(b"GET /ui/api/stats HTTP/1.1\r\n")
        .await
        .unwrap();

    // 100 subscribers at most: 80 that never read, and one that does.
    let mut stalled = Vec::new();
    for _ in 0..80 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket
            .connect(([127, 0, 0, 1], c.port).into())
            .await
            .unwrap();
        stream
            .write_all(b"GET /ui/api/events HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        stalled.push(stream);
    }
    let mut reader = Subscriber::connect(c.port, "?table=docs", None).await;
    let subscribers = |stats: &str| json(stats)["subscribers"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while subscribers(&get(c.port, "/ui/api/stats", None).await.1) < 81 {
        assert!(
            Instant::now() < deadline,
            "the subscribers did not all arrive"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut extra = Vec::new();
    for _ in 0..19 {
        extra.push(Subscriber::connect(c.port, "", None).await);
    }
    let (status, body) = get(c.port, "/ui/api/events", None).await;
    assert_eq!(status, 503, "the 101st subscriber: {body}");
    drop(extra);

    // Megabytes of invalidations (40 commits of 50 long keys) while 80
    // subscribers do not read: apply goes on, and they are dropped.
    let (commits, per_commit) = (40_u64, 50_u64);
    let rows = commits * per_commit;
    let base = c.running.progress.borrow().changes;
    let started = Instant::now();
    let writer = c.db.client().await;
    for commit in 0..commits {
        let first = commit * per_commit;
        writer
            .batch_execute(&format!(
                "insert into docs select id, repeat('slug-', 80) || id from generate_series({first}, {}) id",
                first + per_commit - 1
            ))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut shown = 0;
    while shown < rows {
        let event = reader
            .next(Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("the reading subscriber saw {shown} of {rows} keys"));
        shown += targets(&event).len() as u64 + event["more"].as_u64().unwrap();
    }
    let applied = started.elapsed();
    assert_eq!(shown, rows);
    assert!(c.running.progress.borrow().changes >= base + rows);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, stats) = get(c.port, "/ui/api/stats", None).await;
        if subscribers(&stats) == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stalled subscribers were not dropped: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, metrics) = get(c.port, "/metrics", None).await;
    let dropped: f64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("evictd_console_dropped_total "))
        .expect("the dropped counter")
        .parse()
        .unwrap();
    assert!(dropped >= 80.0, "{dropped} dropped");
    eprintln!("{rows} keys applied and streamed in {applied:?} with 80 stalled subscribers");
    assert_eq!(raw(c.port, "GET /healthz HTTP/1.1\r\n\r\n").await.0, 200);
    drop(half);
    drop(stalled);
}

/// The page in a real browser (headless Chromium): it asks for the token,
/// connects with it, shows a commit within a second, traces a key and
/// explains a change. Its screenshot is kept in
/// `target/test-artifacts/console.png`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_in_a_browser_streams_traces_and_explains() {
    let python = crate::support::repo_path(".tools/python/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/bootstrap",
        python.display()
    );
    let c = Console::start(Some("browser-token")).await;
    let artifacts = crate::support::repo_path("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("console.png");
    let _ = std::fs::remove_file(&screenshot);
    let script = crate::support::repo_path("tests/browser/console.py");
    let url = format!("http://127.0.0.1:{}/ui", c.port);
    let db_url = c.db.url.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .args([url.as_str(), "browser-token", db_url.as_str()])
            .arg(&screenshot)
            .output()
            .expect("run the browser driver")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the browser driver failed:\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen = json(stdout.trim());
    assert_eq!(seen["without_token"], "token needed", "{seen}");
    assert_eq!(seen["with_token"], "live", "{seen}");
    let took = seen["stream_ms"].as_f64().unwrap();
    assert!(took < 1000.0, "the commit took {took} ms to appear: {seen}");
    let verdict = seen["verdict"].as_str().unwrap();
    assert!(verdict.starts_with("exact: "), "{seen}");
    let explain = seen["explain"].as_str().unwrap();
    assert!(explain.contains("UNLINK order:4242"), "{seen}");
    assert!(seen["chart_points"].as_u64().unwrap() >= 2, "{seen}");
    let png = std::fs::read(artifacts.join("console.png")).expect("the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
}
