//! Shared fixtures for the integration tests: one throwaway Postgres and one
//! Redis per test binary (started on first use, stopped by the testkit's
//! reaper when the binary exits, however it exits), a fresh database and key
//! prefix per test.

#![allow(dead_code)] // each test binary uses a different part of this

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use evictd::testkit::{Postgres, Redis};

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
