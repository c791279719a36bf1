//! A throwaway `redis-server` on a random free port, keeping nothing on disk.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{free_port, reaper, TestkitError};

/// A running throwaway Redis; stopped on drop, and by the reaper if this
/// process dies first.
pub struct Redis {
    dir: TempDir,
    port: u16,
    child: Child,
}

impl Redis {
    pub fn start() -> Result<Redis, TestkitError> {
        let dir = tempfile::Builder::new()
            .prefix("evictd-redis-")
            .tempdir()
            .map_err(|e| TestkitError::io("create a temporary directory", e))?;
        reaper::reap_dir(dir.path());
        let mut last_error = None;
        for _ in 0..3 {
            let port = free_port()?;
            match spawn(&dir, port) {
                Ok(child) => return Ok(Redis { dir, port, child }),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.expect("three attempts"))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

fn spawn(dir: &TempDir, port: u16) -> Result<Child, TestkitError> {
    let log = dir.path().join("redis.log");
    let mut child = Command::new("redis-server")
        .args([
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ])
        .arg("--port")
        .arg(port.to_string())
        .arg("--dir")
        .arg(dir.path())
        .arg("--logfile")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| {
            TestkitError::io("start redis-server (install it with scripts/bootstrap)", e)
        })?;
    reaper::reap_pid(child.id());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if ping(port) {
            return Ok(child);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(TestkitError::Start(format!(
                "redis-server exited with {status}:\n{log}"
            )));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(TestkitError::Start(
                "redis-server did not answer PING in 20 s".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether a Redis answers PING on `port`.
pub fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut reply = [0_u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
