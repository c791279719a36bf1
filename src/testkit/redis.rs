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
    extra: Vec<String>,
}

impl Redis {
    pub fn start() -> Result<Redis, TestkitError> {
        Redis::start_with(&[])
    }

    /// Starts with extra `redis-server` arguments.
    pub fn start_with(extra: &[&str]) -> Result<Redis, TestkitError> {
        let dir = tempfile::Builder::new()
            .prefix("evictd-redis-")
            .tempdir()
            .map_err(|e| TestkitError::io("create a temporary directory", e))?;
        reaper::reap_dir(dir.path());
        let mut last_error = None;
        for _ in 0..3 {
            let port = free_port()?;
            match spawn(&dir, port, extra) {
                Ok(child) => {
                    let extra = extra.iter().map(|arg| (*arg).to_owned()).collect();
                    return Ok(Redis {
                        dir,
                        port,
                        child,
                        extra,
                    });
                }
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

    /// The value of `key`, if any.
    pub async fn get(&self, key: &str) -> Result<Option<String>, TestkitError> {
        self.query(::redis::cmd("GET").arg(key)).await
    }

    /// Sets `key` to `value`, as an application caching it would.
    pub async fn set(&self, key: &str, value: &str) -> Result<(), TestkitError> {
        self.query(::redis::cmd("SET").arg(key).arg(value)).await
    }

    async fn query<T: ::redis::FromRedisValue>(
        &self,
        command: &::redis::Cmd,
    ) -> Result<T, TestkitError> {
        let failed = |e: ::redis::RedisError| TestkitError::Start(format!("redis: {e}"));
        let client = ::redis::Client::open(self.url()).map_err(failed)?;
        let mut connection = client
            .get_multiplexed_async_connection()
            .await
            .map_err(failed)?;
        command.query_async(&mut connection).await.map_err(failed)
    }

    /// Kills the server (SIGKILL): an outage.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port, empty.
    pub fn restart(&mut self) -> Result<(), TestkitError> {
        self.stop();
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        self.child = spawn(&self.dir, self.port, &extra)?;
        Ok(())
    }
}

fn spawn(dir: &TempDir, port: u16, extra: &[&str]) -> Result<Child, TestkitError> {
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
        .args(extra)
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

/// A throwaway Redis Cluster on random ports.
pub struct RedisCluster {
    nodes: Vec<Redis>,
}

impl RedisCluster {
    /// Starts `masters` cluster-enabled servers and joins them, slots split
    /// evenly. Waits until every node reports `cluster_state:ok`.
    pub fn start(masters: usize) -> Result<RedisCluster, TestkitError> {
        RedisCluster::start_with_replicas(masters, 0)
    }

    /// Starts `masters` masters with `replicas` replicas each, so that a
    /// master can fail over.
    pub fn start_with_replicas(
        masters: usize,
        replicas: usize,
    ) -> Result<RedisCluster, TestkitError> {
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
            // Replicas sync at once, so that a failover can happen early.
            "--repl-diskless-sync-delay",
            "0",
        ];
        let nodes = (0..masters * (1 + replicas))
            .map(|_| Redis::start_with(&args))
            .collect::<Result<Vec<_>, _>>()?;
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port()))
            .collect();
        let output = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| TestkitError::io("run redis-cli --cluster create", e))?;
        if !output.status.success() {
            return Err(TestkitError::Start(format!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&output.stdout)
            )));
        }
        let cluster = RedisCluster { nodes };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cluster
            .nodes
            .iter()
            .all(|node| cluster_ok(node.port()) && replica_synced(node.port()))
        {
            if Instant::now() > deadline {
                return Err(TestkitError::Start(
                    "the Redis Cluster did not reach cluster_state:ok".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(cluster)
    }

    /// `redis+cluster://` with the first node as the seed.
    pub fn url(&self) -> String {
        format!("redis+cluster://127.0.0.1:{}", self.nodes[0].port())
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(Redis::port).collect()
    }

    /// The ports of the nodes that are masters now.
    pub fn master_ports(&self) -> Vec<u16> {
        let Some(seed) = self.nodes.iter().find(|node| cluster_ok(node.port())) else {
            return Vec::new();
        };
        let output = Command::new("redis-cli")
            .args(["-p", &seed.port().to_string(), "cluster", "nodes"])
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
            .unwrap_or_default();
        output
            .lines()
            .filter(|line| line.contains("master") && !line.contains("fail"))
            .filter_map(|line| {
                line.split_whitespace()
                    .nth(1)?
                    .split(['@', ':'])
                    .nth(1)?
                    .parse()
                    .ok()
            })
            .collect()
    }

    /// The port of a replica of the master on `master`, as the master
    /// itself reports it (`slave0:ip=...,port=...` in INFO replication).
    pub fn replica_of(&self, master: u16) -> Option<u16> {
        let output = Command::new("redis-cli")
            .args(["-p", &master.to_string(), "info", "replication"])
            .output()
            .ok()?;
        let info = String::from_utf8_lossy(&output.stdout);
        info.lines()
            .find(|line| line.starts_with("slave0:"))?
            .split(',')
            .find_map(|field| field.strip_prefix("port="))?
            .trim()
            .parse()
            .ok()
    }

    /// Whether the node on `port` answers as a master.
    pub fn is_master(&self, port: u16) -> bool {
        Command::new("redis-cli")
            .args(["-p", &port.to_string(), "info", "replication"])
            .output()
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("role:master"))
    }

    /// Kills the node on `port`: a crash its replica takes over from.
    pub fn kill_node(&mut self, port: u16) {
        if let Some(node) = self.nodes.iter_mut().find(|node| node.port() == port) {
            node.stop();
        }
    }

    /// Starts a killed node again on its port and with its `nodes.conf`,
    /// empty: it rejoins the cluster, as a replica of whichever node took
    /// over its slots.
    pub fn restart_node(&mut self, port: u16) -> Result<(), TestkitError> {
        match self.nodes.iter_mut().find(|node| node.port() == port) {
            Some(node) => node.restart(),
            None => Err(TestkitError::Start(format!(
                "no cluster node on port {port}"
            ))),
        }
    }

    /// Whether every live node is a master or a replica whose link to its
    /// master is up.
    pub fn replicas_synced(&self) -> bool {
        self.nodes
            .iter()
            .map(Redis::port)
            .filter(|port| super::redis_ping(*port))
            .all(replica_synced)
    }

    /// Waits until every live node reports `cluster_state:ok` again.
    pub fn wait_healthy(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let live: Vec<u16> = self
                .nodes
                .iter()
                .map(Redis::port)
                .filter(|port| super::redis_ping(*port))
                .collect();
            if !live.is_empty() && live.iter().all(|port| cluster_ok(*port)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
}

/// A master, or a replica whose link to its master is up.
fn replica_synced(port: u16) -> bool {
    Command::new("redis-cli")
        .args(["-p", &port.to_string(), "info", "replication"])
        .output()
        .is_ok_and(|out| {
            let info = String::from_utf8_lossy(&out.stdout);
            info.contains("role:master") || info.contains("master_link_status:up")
        })
}

fn cluster_ok(port: u16) -> bool {
    Command::new("redis-cli")
        .args(["-p", &port.to_string(), "cluster", "info"])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok"))
}
