//! Shared fixtures for the integration tests: one throwaway Postgres and one
//! Redis per test binary (started on first use, stopped by the testkit's
//! reaper when the binary exits, however it exits), a fresh database and key
//! prefix per test.

#![allow(dead_code)] // not every helper is used in every configuration

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use evictd::testkit::{Postgres, Redis};

pub mod web;

pub struct Stack {
    pub postgres: Postgres,
    pub redis: Redis,
}

/// The binary's shared servers.
pub fn stack() -> &'static Stack {
    static STACK: OnceLock<Stack> = OnceLock::new();
    STACK.get_or_init(|| Stack {
        postgres: Postgres::start().expect("start a throwaway Postgres"),
        redis: Redis::start().expect("start a throwaway redis-server"),
    })
}

/// A database of this test's own, on the shared server.
pub struct TestDb {
    pub name: String,
    pub url: String,
    /// A Redis key prefix no other test uses.
    pub prefix: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let stack = stack();
        let name = stack
            .postgres
            .create_database()
            .await
            .expect("create a test database");
        let url = stack.postgres.url(&name);
        let prefix = format!("t{}:", NEXT.fetch_add(1, Ordering::Relaxed));
        TestDb { name, url, prefix }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.url));
        tokio::spawn(connection);
        client
    }

    /// Runs `sql` (several statements allowed).
    pub async fn execute(&self, sql: &str) {
        self.client()
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Applies the demo schema in `migrations/`.
    pub async fn migrate(&self) {
        let mut files: Vec<PathBuf> = std::fs::read_dir(repo_path("migrations"))
            .expect("migrations/")
            .map(|entry| entry.expect("entry").path())
            .collect();
        files.sort();
        for file in files {
            self.execute(&std::fs::read_to_string(&file).expect("read migration"))
                .await;
        }
    }
}

/// A path inside the repository.
pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Runs the `evictd` binary; panics if it cannot start.
pub fn evictd(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_evictd"))
        .args(args)
        .env_remove("EVICTD_POSTGRES__URL")
        .output()
        .expect("run evictd")
}

/// stdout of a run, as text.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Writes `files` (name, text) into a fresh temporary directory.
pub fn mapping_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).expect("write mapping");
    }
    dir
}

/// A test database with evictd streaming from it into the shared Redis
/// under the test's own key prefix.
pub struct Streaming {
    pub db: TestDb,
    pub evictd: evictd::testkit::Evictd,
    pub cache: Cache,
    pub config: evictd::config::Config,
    _mappings: tempfile::TempDir,
}

impl Streaming {
    /// Runs `schema` (which must create the publication `evictd`, or leave
    /// it to evictd), writes `mappings`, and starts evictd.
    pub async fn start(schema: &str, mappings: &[(&str, &str)]) -> Streaming {
        Streaming::start_with(schema, mappings, |_| {}).await
    }

    /// [`Streaming::start`] with the config changed by `adjust` first.
    pub async fn start_with(
        schema: &str,
        mappings: &[(&str, &str)],
        adjust: impl FnOnce(&mut evictd::config::Config),
    ) -> Streaming {
        init_logging();
        let db = TestDb::new().await;
        db.execute(schema).await;
        let dir = mapping_dir(mappings);
        let mut config = streaming_config(&db, dir.path());
        adjust(&mut config);
        let evictd = evictd::testkit::Evictd::start(&config)
            .await
            .expect("start evictd");
        Streaming {
            cache: Cache::new(&db.prefix).await,
            db,
            evictd,
            config,
            _mappings: dir,
        }
    }

    pub async fn seed(&mut self, keys: &[&str]) {
        self.cache.seed(keys).await;
    }

    pub async fn cached(&mut self, keys: &[&str]) -> Vec<String> {
        self.cache.cached(keys).await
    }

    pub async fn get(&mut self, key: &str) -> Option<String> {
        self.cache.get(key).await
    }

    pub async fn sync(&self) {
        self.evictd.sync().await.expect("sync");
    }
}

/// A config for `db` with its own slot and key prefix and the shared Redis.
pub fn streaming_config(db: &TestDb, mappings: &Path) -> evictd::config::Config {
    use evictd::config::{Config, SecretUrl};
    let mut config = Config::with_defaults(
        SecretUrl::parse(&db.url).expect("postgres url"),
        SecretUrl::parse(&stack().redis.url()).expect("redis url"),
        mappings.to_path_buf(),
    );
    config.postgres.slot = db.name.clone();
    config.redis.prefix = db.prefix.clone();
    config.redis.l1_channel = format!("{}l1", db.prefix);
    config
}

/// The shared Redis as an application sees it, under one test's key prefix.
pub struct Cache {
    pub redis: redis::aio::MultiplexedConnection,
    pub prefix: String,
}

impl Cache {
    pub async fn new(prefix: &str) -> Cache {
        Cache {
            redis: redis_connection().await,
            prefix: prefix.to_owned(),
        }
    }

    /// Caches `keys` (under the prefix) as if an application had.
    pub async fn seed(&mut self, keys: &[&str]) {
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("SET")
                .arg(format!("{}{key}", self.prefix))
                .arg("cached")
                .ignore();
        }
        pipe.query_async::<()>(&mut self.redis)
            .await
            .expect("seed keys");
    }

    /// Which of `keys` are still cached.
    pub async fn cached(&mut self, keys: &[&str]) -> Vec<String> {
        let mut left = Vec::new();
        for key in keys {
            let exists: bool = redis::cmd("EXISTS")
                .arg(format!("{}{key}", self.prefix))
                .query_async(&mut self.redis)
                .await
                .expect("EXISTS");
            if exists {
                left.push((*key).to_owned());
            }
        }
        left
    }

    pub async fn get(&mut self, key: &str) -> Option<String> {
        redis::cmd("GET")
            .arg(format!("{}{key}", self.prefix))
            .query_async(&mut self.redis)
            .await
            .expect("GET")
    }
}

pub async fn redis_connection() -> redis::aio::MultiplexedConnection {
    redis::Client::open(stack().redis.url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis")
}

/// Logs of evictd inside the tests, filtered by `EVICTD_LOG` (off unless set).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EVICTD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Puts `rules` in front of the throwaway server's pg_hba.conf (its trust
/// rules) and reloads its configuration.
pub async fn prepend_hba_rules(rules: &str) {
    let postgres = &stack().postgres;
    let hba = postgres.data_dir().join("pg_hba.conf");
    let existing = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
    std::fs::write(&hba, format!("{rules}\n{existing}")).expect("write pg_hba.conf");
    let (client, connection) =
        tokio_postgres::connect(&postgres.url("postgres"), tokio_postgres::NoTls)
            .await
            .expect("connect");
    tokio::spawn(connection);
    client
        .batch_execute("select pg_reload_conf()")
        .await
        .expect("reload");
}

/// Writes `dir/mappings/orders.toml` (`mapping`) and `dir/evictd.toml` for
/// `db`, the Redis at `redis_url` under the test's prefix, and the admin
/// endpoint on `admin_listen`; returns the config's path.
pub fn run_config(
    dir: &Path,
    db: &TestDb,
    redis_url: &str,
    mapping: &str,
    admin_listen: &str,
) -> PathBuf {
    std::fs::create_dir_all(dir.join("mappings")).expect("mappings dir");
    std::fs::write(dir.join("mappings/orders.toml"), mapping).expect("write mapping");
    let config = dir.join("evictd.toml");
    std::fs::write(
        &config,
        format!(
            "[postgres]\nurl = \"{}\"\nslot = \"{}\"\n[redis]\nurl = \"{redis_url}\"\nprefix = \"{}\"\n\
             [mappings]\ndir = \"mappings\"\n[admin]\nlisten = \"{admin_listen}\"\n",
            db.url, db.name, db.prefix
        ),
    )
    .expect("write config");
    config
}

/// `evictd run --config`, stopped by the testkit's reaper if the test dies
/// first.
pub fn spawn_run(config: &Path) -> std::process::Child {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_evictd"));
    command.args(["run", "--config", config.to_str().expect("utf-8 path")]);
    spawn_evictd(command)
}

/// Starts an evictd process logging at WARN (unless `command` sets
/// `EVICTD_LOG`), stopped by the testkit's
/// reaper if the test dies first. Its log goes to the test's captured
/// output, so cargo test shows it only when the test fails (the WARN lines
/// of a deliberate outage are not mixed into the results).
pub fn spawn_evictd(mut command: std::process::Command) -> std::process::Child {
    if !command.get_envs().any(|(name, _)| name == "EVICTD_LOG") {
        command.env("EVICTD_LOG", "warn");
    }
    let mut child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start evictd");
    evictd::testkit::reaper::reap_pid(child.id());
    let stderr = child.stderr.take().expect("piped stderr");
    // A thread spawned here inherits the test's output capture.
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stderr).lines() {
            match line {
                Ok(line) => eprintln!("{line}"),
                Err(_) => break,
            }
        }
    });
    child
}

/// Sends SIGTERM and asserts a clean exit.
pub fn terminate(mut child: std::process::Child) {
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert_eq!(
        child.wait().expect("wait").code(),
        Some(0),
        "evictd exits 0 on SIGTERM"
    );
}

/// Peak resident memory of process `pid`, in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    evictd::testkit::peak_rss_kib(pid).expect("VmHWM of the process")
}

/// GET `path` on 127.0.0.1:`port`: (status code, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

/// A port that was free a moment ago.
/// Warming options for every mapped table, without a limit or a rate cap,
/// and without a progress line.
pub fn warm_everything() -> evictd::internal::warm::WarmOptions {
    evictd::internal::warm::WarmOptions {
        table: None,
        limit: None,
        rate: 0,
        progress: false,
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The slot's `confirmed_flush_lsn`.
pub async fn slot_confirmed(client: &tokio_postgres::Client, slot: &str) -> evictd::change::Lsn {
    let row = client
        .query_one("select coalesce(confirmed_flush_lsn, '0/0')::text from pg_replication_slots where slot_name = $1", &[&slot])
        .await
        .expect("the slot exists");
    evictd::change::Lsn::parse(&row.get::<_, String>(0)).expect("an LSN")
}

/// Waits until a walsender streams from `slot` (`streaming`), or until no
/// process holds it (`!streaming`). "Active" alone is not enough: the
/// backend creating a slot holds it too, and a transaction that starts
/// while the slot is being created is never decoded from it.
pub async fn wait_for_slot(client: &tokio_postgres::Client, slot: &str, streaming: bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let row = client
            .query_opt(
                "select s.active_pid is not null, exists (select 1 from pg_stat_replication r where r.pid = s.active_pid) \
                 from pg_replication_slots s where s.slot_name = $1",
                &[&slot],
            )
            .await
            .expect("read the slot");
        let (held, walsender) = row.map_or((false, false), |row| (row.get(0), row.get(1)));
        if (streaming && walsender) || (!streaming && !held) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "slot {slot} never became streaming = {streaming}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// `server_version_num` of the server at `url` (`170004` for 17.4).
pub async fn server_version(url: &str) -> i64 {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect for the server version");
    tokio::spawn(connection);
    client
        .query_one("select current_setting('server_version_num')::int8", &[])
        .await
        .expect("server_version_num")
        .get(0)
}

/// A Postgres server of the test's own (for server-wide settings, a
/// standby, a crash), `schema` run in a database of its own, and evictd's
/// config for it: the shared Redis under a key prefix of the test's own,
/// `mappings` written to a directory.
pub struct OwnServer {
    pub postgres: evictd::testkit::Postgres,
    pub database: String,
    pub config: evictd::config::Config,
    /// Gives the key prefix; its database on the shared server is unused.
    pub probe: TestDb,
    pub mappings: tempfile::TempDir,
}

impl OwnServer {
    pub async fn start(schema: &str, mappings: &[(&str, &str)]) -> OwnServer {
        use evictd::config::{Config, SecretUrl};
        init_logging();
        let postgres = tokio::task::spawn_blocking(evictd::testkit::Postgres::start)
            .await
            .expect("the postgres thread")
            .expect("postgres");
        let database = postgres.create_database().await.expect("database");
        postgres.execute(&database, schema).await.expect("schema");
        let probe = TestDb::new().await;
        let mappings = mapping_dir(mappings);
        let mut config = Config::with_defaults(
            SecretUrl::parse(&postgres.url(&database)).expect("url"),
            SecretUrl::parse(&stack().redis.url()).expect("redis url"),
            mappings.path().to_path_buf(),
        );
        config.redis.prefix = probe.prefix.clone();
        config.redis.l1_channel = format!("{}l1", probe.prefix);
        OwnServer {
            postgres,
            database,
            config,
            probe,
            mappings,
        }
    }
}
