//! A throwaway Postgres: `initdb` in a temporary directory, `wal_level =
//! logical`, a random free port, fsync off. When the current user is root,
//! initdb and the server run as the `postgres` OS user (initdb refuses root).

use std::fs;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{free_port, reaper, TestkitError};

/// A running throwaway Postgres server; stopped and removed on drop, and by
/// the reaper if this process dies first.
pub struct Postgres {
    dir: TempDir,
    port: u16,
    child: Child,
    postmaster_pid: u32,
    bin_dir: PathBuf,
    as_postgres: bool,
    settings: Vec<String>,
    /// A standby's physical slot on its primary.
    physical_slot: Option<String>,
}

/// How [`Postgres::standby_with`] sets a standby up.
#[derive(Clone, Debug, Default)]
pub struct Standby {
    /// `recovery_min_apply_delay`: how late it applies each commit.
    pub apply_delay: Duration,
    /// Synchronise the primary's failover slots of this database
    /// (`sync_replication_slots`, PostgreSQL 17+; `primary_conninfo` then
    /// names the database, as slot synchronisation needs).
    pub slot_sync_database: Option<String>,
    /// `hot_standby_feedback = off` (it is on otherwise): the primary may
    /// then remove rows a slot on the standby still needs.
    pub without_feedback: bool,
}

static NEXT_STANDBY: AtomicU32 = AtomicU32::new(1);

impl Postgres {
    /// Starts a new server. Takes a few seconds (initdb).
    pub fn start() -> Result<Postgres, TestkitError> {
        Postgres::start_with(None, &[])
    }

    /// Starts a new server with these settings (`name=value`) on top of
    /// the testkit's, e.g. `shared_preload_libraries=pg_stat_statements`.
    pub fn start_with_settings(settings: &[&str]) -> Result<Postgres, TestkitError> {
        Postgres::start_with(None, settings)
    }

    /// Starts a server that also accepts TLS with this PEM certificate
    /// (chain) and key. It listens on 127.0.0.1 and 127.0.0.2.
    pub fn start_with_tls(cert_pem: &str, key_pem: &str) -> Result<Postgres, TestkitError> {
        Postgres::start_with(Some((cert_pem, key_pem)), &[])
    }

    fn start_with(tls: Option<(&str, &str)>, extra: &[&str]) -> Result<Postgres, TestkitError> {
        let bin_dir = bin_dir()?;
        let as_postgres = running_as_root();
        let dir = server_dir("evictd-pg-", as_postgres)?;
        let data = dir.path().join("data");
        let mut initdb = command(&bin_dir, "initdb", as_postgres);
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run(&mut initdb, "initdb")?;
        let mut settings: Vec<String> = SETTINGS.iter().map(|s| (*s).to_owned()).collect();
        settings.extend(extra.iter().map(|s| (*s).to_owned()));
        if let Some((cert, key)) = tls {
            for (name, pem) in [("server.crt", cert), ("server.key", key)] {
                let path = dir.path().join(name);
                fs::write(&path, pem).map_err(|e| TestkitError::io("write a TLS file", e))?;
                run(
                    Command::new("chmod").arg("600").arg(&path),
                    "chmod a TLS file",
                )?;
                if as_postgres {
                    run(
                        Command::new("chown").arg("postgres:postgres").arg(&path),
                        "chown a TLS file",
                    )?;
                }
                let setting = if name == "server.crt" {
                    "ssl_cert_file"
                } else {
                    "ssl_key_file"
                };
                settings.push(format!("{setting}={}", path.display()));
            }
            settings.push("ssl=on".into());
            // A second loopback address, which a certificate for 127.0.0.1
            // does not name: for tests of host name checks.
            settings.push("listen_addresses=127.0.0.1,127.0.0.2".into());
        }
        Postgres::launch(dir, bin_dir, as_postgres, settings)
    }

    /// A physical standby of this server, which applies each commit
    /// `apply_delay` after the primary (`recovery_min_apply_delay`): a read
    /// replica that lags. Read-only; [`Postgres::url`] names the same
    /// databases as the primary's. See [`Postgres::standby_with`].
    pub fn standby(&mut self, apply_delay: Duration) -> Result<Postgres, TestkitError> {
        self.standby_with(&Standby {
            apply_delay,
            ..Standby::default()
        })
    }

    /// A physical hot standby of this server, streaming its WAL through a
    /// physical slot of its own on this server (`primary_slot_name`), with
    /// `hot_standby_feedback` on unless [`Standby::without_feedback`]. It is a copy of this server's data
    /// directory taken while this server is shut down cleanly for a moment
    /// (so it works with any version's binaries, `pg_basebackup` or not):
    /// connections to this server are closed by it.
    pub fn standby_with(&mut self, standby: &Standby) -> Result<Postgres, TestkitError> {
        let dir = server_dir("evictd-pg-standby-", self.as_postgres)?;
        self.shut_down()?;
        let data = dir.path().join("data");
        let copied = run(
            Command::new("cp").arg("-a").arg(self.data_dir()).arg(&data),
            "copy the data directory",
        );
        self.start_again()?;
        copied?;
        let _ = fs::remove_file(data.join("postmaster.pid"));
        fs::write(data.join("standby.signal"), "")
            .map_err(|e| TestkitError::io("write standby.signal", e))?;
        if self.as_postgres {
            run(
                Command::new("chown")
                    .arg("-R")
                    .arg("postgres:postgres")
                    .arg(dir.path()),
                "chown the standby's data directory",
            )?;
        }
        let slot = format!("standby_{}", NEXT_STANDBY.fetch_add(1, Ordering::Relaxed));
        // A physical slot keeps the WAL the standby has yet to read (from
        // the shutdown checkpoint the copy starts at) and carries its
        // feedback.
        self.execute_blocking(
            "postgres",
            &format!("select pg_create_physical_replication_slot('{slot}', true)"),
        )?;
        let mut conninfo = format!("host=127.0.0.1 port={} user=postgres", self.port);
        let mut settings = self.settings.clone();
        if let Some(database) = &standby.slot_sync_database {
            conninfo.push_str(&format!(" dbname={database}"));
            settings.push("sync_replication_slots=on".into());
        }
        settings.extend([
            format!("primary_conninfo={conninfo}"),
            format!("primary_slot_name={slot}"),
            format!(
                "recovery_min_apply_delay={}ms",
                standby.apply_delay.as_millis()
            ),
            "hot_standby=on".into(),
            format!(
                "hot_standby_feedback={}",
                if standby.without_feedback {
                    "off"
                } else {
                    "on"
                }
            ),
        ]);
        let mut server = Postgres::launch(dir, self.bin_dir.clone(), self.as_postgres, settings)?;
        server.physical_slot = Some(slot);
        Ok(server)
    }

    /// What the server has logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// The physical slot on its primary this standby streams through
    /// (`None` for a server that is not a standby made by the testkit).
    pub fn physical_slot(&self) -> Option<&str> {
        self.physical_slot.as_deref()
    }

    /// Promotes this standby to a primary (`pg_promote()`, which waits
    /// until it accepts writes).
    pub async fn promote(&self) -> Result<(), TestkitError> {
        self.execute("postgres", "select pg_promote(true, 60)")
            .await
    }

    /// Shuts the server down cleanly (a fast shutdown: sessions are ended,
    /// a shutdown checkpoint written) and waits until it has exited.
    fn shut_down(&mut self) -> Result<(), TestkitError> {
        let _ = Command::new("kill")
            .args(["-INT", &self.postmaster_pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.data_dir().join("postmaster.pid").exists() {
            if Instant::now() > deadline {
                return Err(TestkitError::Start(
                    "postgres did not shut down in 60 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.wait();
        Ok(())
    }

    /// Runs `sql` from a thread of its own (callable inside or outside an
    /// async runtime).
    fn execute_blocking(&self, database: &str, sql: &str) -> Result<(), TestkitError> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| TestkitError::io("start a runtime", e))?
                        .block_on(self.execute(database, sql))
                })
                .join()
                .unwrap_or_else(|_| Err(TestkitError::Start("a testkit thread panicked".into())))
        })
    }

    /// Starts the server of `dir` on a free port (three tries).
    fn launch(
        dir: TempDir,
        bin_dir: PathBuf,
        as_postgres: bool,
        settings: Vec<String>,
    ) -> Result<Postgres, TestkitError> {
        let mut last_error = None;
        for _ in 0..3 {
            let port = free_port()?;
            match Postgres::spawn(&bin_dir, dir.path(), port, as_postgres, &settings) {
                Ok((child, postmaster_pid)) => {
                    return Ok(Postgres {
                        dir,
                        port,
                        child,
                        postmaster_pid,
                        bin_dir,
                        as_postgres,
                        settings,
                        physical_slot: None,
                    })
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.expect("three attempts"))
    }

    fn spawn(
        bin_dir: &Path,
        dir: &Path,
        port: u16,
        as_postgres: bool,
        settings: &[String],
    ) -> Result<(Child, u32), TestkitError> {
        let log_path = dir.join("postgres.log");
        let log = fs::File::create(&log_path)
            .map_err(|e| TestkitError::io("create the server log", e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| TestkitError::io("open the server log", e))?;
        if as_postgres {
            run(
                Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&log_path),
                "chown the log",
            )?;
        }
        let mut server = command(bin_dir, "postgres", as_postgres);
        server
            .arg("-D")
            .arg(dir.join("data"))
            .arg("-p")
            .arg(port.to_string())
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.display()))
            .args(settings.iter().flat_map(|setting| ["-c", setting.as_str()]))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0);
        let mut child = server
            .spawn()
            .map_err(|e| TestkitError::io("start postgres", e))?;
        reaper::reap_group(child.id());
        let pid_file = dir.join("data").join("postmaster.pid");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(text) = fs::read_to_string(&pid_file) {
                let lines: Vec<&str> = text.lines().collect();
                // A hot standby says "standby" once it accepts reads.
                if lines.len() >= 8 && matches!(lines[7].trim(), "ready" | "standby") {
                    let pid = lines[0].trim().parse().unwrap_or(child.id());
                    reaper::reap_pid(pid);
                    return Ok((child, pid));
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                return Err(TestkitError::Start(format!(
                    "postgres exited with {status}:\n{log}"
                )));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(TestkitError::Start(
                    "postgres did not become ready in 60 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server and every backend at once (SIGKILL to its process
    /// group): a crash. Committed data survives; recovery runs on restart.
    pub fn kill(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = Command::new("kill")
            .args(["-KILL", &self.postmaster_pid.to_string()])
            .status();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port and data directory (after
    /// [`Postgres::kill`]), waiting until it accepts connections.
    pub fn restart(&mut self) -> Result<(), TestkitError> {
        self.kill();
        // The killed server's lock file still says "ready"; the new server
        // writes its own.
        let _ = fs::remove_file(self.data_dir().join("postmaster.pid"));
        self.start_again()
    }

    /// Starts the stopped server on its port and data directory.
    fn start_again(&mut self) -> Result<(), TestkitError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match Postgres::spawn(
                &self.bin_dir,
                self.dir.path(),
                self.port,
                self.as_postgres,
                &self.settings,
            ) {
                Ok((child, postmaster_pid)) => {
                    self.child = child;
                    self.postmaster_pid = postmaster_pid;
                    return Ok(());
                }
                // Backends of the killed server may take a moment to go.
                Err(error) if Instant::now() > deadline => return Err(error),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// A connection URL for `database` as the superuser `postgres`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The directory of the server's binaries (pg_recvlogical, pgbench, ...).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    pub fn postmaster_pid(&self) -> u32 {
        self.postmaster_pid
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs `sql` (one or more statements) in `database`.
    pub async fn execute(&self, database: &str, sql: &str) -> Result<(), TestkitError> {
        let (client, connection) =
            tokio_postgres::connect(&self.url(database), tokio_postgres::NoTls)
                .await
                .map_err(TestkitError::Postgres)?;
        let task = tokio::spawn(connection);
        let result = client
            .batch_execute(sql)
            .await
            .map_err(TestkitError::Postgres);
        drop(client);
        let _ = task.await;
        result
    }

    /// Creates a fresh, uniquely named database and returns its name.
    pub async fn create_database(&self) -> Result<String, TestkitError> {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let (client, connection) =
            tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
                .await
                .map_err(TestkitError::Postgres)?;
        let task = tokio::spawn(connection);
        client
            .batch_execute(&format!("create database {name}"))
            .await
            .map_err(TestkitError::Postgres)?;
        drop(client);
        let _ = task.await;
        Ok(name)
    }
}

/// Settings for a fast, disposable, replication-capable server.
const SETTINGS: &[&str] = &[
    "listen_addresses=127.0.0.1",
    "wal_level=logical",
    // One server serves a whole test run: every test's slot stays (tests
    // end with it inactive), and a few dozen stream at once.
    "max_wal_senders=64",
    "max_replication_slots=256",
    "max_connections=200",
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    "logical_decoding_work_mem=64kB",
    "wal_writer_delay=10ms",
];

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGQUIT: immediate shutdown, which also ends every backend.
        let _ = Command::new("kill")
            .args(["-QUIT", &self.postmaster_pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temporary directory for a server, removed by the reaper if this
/// process dies first, owned by `postgres` when the server runs as it.
fn server_dir(prefix: &str, as_postgres: bool) -> Result<TempDir, TestkitError> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(|e| TestkitError::io("create a temporary directory", e))?;
    reaper::reap_dir(dir.path());
    if as_postgres {
        run(
            Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path()),
            "chown the data directory",
        )?;
    }
    Ok(dir)
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

fn command(bin_dir: &Path, program: &str, as_postgres: bool) -> Command {
    let program = bin_dir.join(program);
    if as_postgres {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn run(command: &mut Command, what: &str) -> Result<(), TestkitError> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| TestkitError::io(what, e))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(TestkitError::Start(format!(
            "{what} failed with {}: {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )))
    }
}

/// Where the Postgres server binaries are: `$EVICTD_PG_BINDIR`, else
/// `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`.
fn bin_dir() -> Result<PathBuf, TestkitError> {
    if let Some(dir) = std::env::var_os("EVICTD_PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if dir.join("postgres").exists() && dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir).ok_or_else(|| {
        TestkitError::Start(
            "no Postgres server binaries found: install postgresql (scripts/bootstrap) or set EVICTD_PG_BINDIR".into(),
        )
    })
}
