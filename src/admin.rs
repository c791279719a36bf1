//! The admin HTTP endpoint (`admin.listen`): `/metrics` (Prometheus text),
//! `/healthz` (the process answers) and `/readyz` (200 only while the source
//! streams and Redis answers; 503 with a one-line reason otherwise).
//!
//! With `admin.console`, also the console at `/ui` (see [`crate::console`]).
//!
//! A deliberately small HTTP/1.1 responder: GET only, one request per
//! connection, bounded request size and time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::apply::broadcast::Broadcast;
use crate::apply::RedisSink;
use crate::config::{RedisConfig, SourceKind};
use crate::console::{Console, Request};
use crate::error::Error;
use crate::pipeline::schema::{self, Problems};
use crate::pipeline::SourceState;
use crate::telemetry;

/// Largest request head read.
const MAX_REQUEST: usize = 8 * 1024;
/// The longest wait after a failed accept.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Time allowed to send the request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What the endpoints report on.
#[derive(Clone)]
pub struct AdminState {
    pub source: watch::Receiver<SourceState>,
    /// What apply last saw of Redis (`None`: it answers).
    pub redis: watch::Receiver<Option<String>>,
    /// Why a batch waits long for visibility on the primary (`None`: none
    /// does).
    pub visibility: Option<watch::Receiver<Option<String>>>,
    /// Why the read replicas hold batches too long (`None`: they keep up).
    pub replicas: Option<watch::Receiver<Option<String>>>,
    /// Purge targets refusing purges until someone acts (by name).
    pub purge: Option<watch::Receiver<std::collections::BTreeMap<String, String>>>,
    pub schema: watch::Receiver<Problems>,
    /// Which source, to say what "connecting" means.
    pub kind: SourceKind,
    /// A fresh PING per readiness probe; without one, readiness relies on
    /// apply's state (which an idle pipeline refreshes every 5 s).
    pub probe: Option<RedisProbe>,
    /// The console (`admin.console`), served under `/ui`.
    pub console: Option<Arc<Console>>,
}

/// Answers "does Redis answer now?" with a PING bounded by
/// `PROBE_TIMEOUT`, on a connection of its own, reusing an answer for at
/// most `PROBE_CACHE`, so a burst of probes costs one PING.
#[derive(Clone)]
pub struct RedisProbe {
    inner: Arc<tokio::sync::Mutex<ProbeState>>,
}

struct ProbeState {
    sink: RedisSink,
    /// When Redis last answered.
    answered: Option<Instant>,
}

/// How long one readiness PING may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a PING's answer is reused.
const PROBE_CACHE: Duration = Duration::from_secs(1);

impl RedisProbe {
    /// A probe of the Redis (or Cluster) of `config`.
    pub fn new(config: &RedisConfig) -> Result<RedisProbe, Error> {
        let sink = RedisSink::new(
            config,
            Broadcast::new(&config.l1_channel, config.l1_log_len),
            None,
        )?;
        Ok(RedisProbe {
            inner: Arc::new(tokio::sync::Mutex::new(ProbeState {
                sink,
                answered: None,
            })),
        })
    }

    /// `None` when Redis answered a PING within the last second, else why
    /// not. Only answers are reused: a failure is asked again at the next
    /// probe, once on a fresh connection (the one before may have broken
    /// with a restart), so readiness returns as soon as Redis does.
    pub async fn check(&self) -> Option<String> {
        let mut state = self.inner.lock().await;
        if state.answered.is_some_and(|at| at.elapsed() < PROBE_CACHE) {
            return None;
        }
        let ping = async {
            match state.sink.ping().await {
                Ok(()) => Ok(()),
                // The sink dropped its connection: the retry reconnects.
                Err(_) => state.sink.ping().await,
            }
        };
        let failure = match tokio::time::timeout(PROBE_TIMEOUT, ping).await {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(error.reason()),
            Err(_) => Some(format!("no answer to PING within {PROBE_TIMEOUT:?}")),
        };
        state.answered = failure.is_none().then(Instant::now);
        failure
    }
}

impl AdminState {
    /// `Ok` when ready, else the reason: the source streams, Redis answers
    /// (apply's last view, then a fresh PING), the mappings fit the schema.
    pub async fn readiness(&self) -> Result<(), String> {
        self.readiness_from_state()?;
        if let Some(probe) = &self.probe {
            if let Some(reason) = probe.check().await {
                return Err(format!("redis: {reason}"));
            }
        }
        Ok(())
    }

    fn readiness_from_state(&self) -> Result<(), String> {
        match &*self.source.borrow() {
            SourceState::Streaming => {}
            SourceState::Connecting => {
                return Err(match self.kind {
                    SourceKind::Postgres => "source: connecting to Postgres".into(),
                    SourceKind::Kafka => {
                        "source: waiting for Kafka partitions (joining the consumer group)".into()
                    }
                })
            }
            SourceState::Interrupted(reason) => return Err(format!("source: {reason}")),
            SourceState::Ended => return Err("source: stopped".into()),
        }
        if let Some(reason) = &*self.redis.borrow() {
            return Err(format!("redis: {reason}"));
        }
        if let Some(reason) = self.visibility.as_ref().and_then(|v| v.borrow().clone()) {
            return Err(reason);
        }
        if let Some(reason) = self.replicas.as_ref().and_then(|r| r.borrow().clone()) {
            return Err(format!("replicas: {reason}"));
        }
        if let Some(refusals) = &self.purge {
            let refusals = refusals.borrow();
            if !refusals.is_empty() {
                let reasons: Vec<&str> = refusals.values().map(String::as_str).collect();
                return Err(format!("purge: {}", reasons.join("; ")));
            }
        }
        match schema::readiness(&self.schema.borrow()) {
            None => Ok(()),
            Some(reason) => Err(reason),
        }
    }
}

/// The longest reason `/readyz` gives; the log has the whole error.
const MAX_REASON: usize = 600;

/// `reason` on one line of at most [`MAX_REASON`] bytes: a Redis pipeline
/// error lists every failed command, which would make a probe's answer
/// kilobytes long.
fn one_line(reason: &str) -> String {
    let line: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.len() <= MAX_REASON {
        return line;
    }
    let mut end = MAX_REASON;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} ... (the log has the whole error)", &line[..end])
}

/// Serves until the listener fails.
pub async fn serve(listener: TcpListener, state: AdminState) {
    // Installed before anything is counted: a service started in process
    // (the testkit, an embedding application) counts from its start.
    telemetry::recorder();
    telemetry::describe();
    let mut failures: u32 = 0;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                failures = 0;
                stream
            }
            Err(error) => {
                // Out of file descriptors, typically: retrying at once
                // would spin a core. Back off (up to a second) and say so.
                failures = failures.saturating_add(1);
                let delay =
                    Duration::from_millis(10_u64 << failures.min(7)).min(ACCEPT_BACKOFF_MAX);
                if failures == 1 || failures.is_power_of_two() {
                    tracing::error!(%error, failures, retry_in = ?delay, "the admin endpoint cannot accept connections");
                }
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(error) = respond(stream, &state).await {
                tracing::debug!(%error, "admin request failed");
            }
        });
    }
}

async fn respond(mut stream: TcpStream, state: &AdminState) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let read = async {
        let mut buf = [0_u8; 1024];
        // A head ends with an empty line; clients that end lines with a
        // bare LF are answered too.
        while !head_complete(&head) && head.len() < MAX_REQUEST {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    if tokio::time::timeout(READ_TIMEOUT, read).await.is_err() {
        return Ok(());
    }
    if !head_complete(&head) && head.len() >= MAX_REQUEST {
        let response = "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\ncontent-length: 36\r\nconnection: close\r\n\r\nthe request head is over 8 KiB long\n";
        stream.write_all(response.as_bytes()).await?;
        return stream.shutdown().await;
    }
    let request = Request::parse(&head);
    let (method, path) = (request.method.as_str(), request.path.as_str());
    if let Some(console) = &state.console {
        if method == "GET" && (path == "/ui" || path.starts_with("/ui/")) {
            return console.respond(&request, stream).await;
        }
    }
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4",
            telemetry::recorder().render(),
        ),
        ("GET", "/healthz") => match &*state.source.borrow() {
            // The process is about to exit: it is not healthy.
            SourceState::Ended => (
                "503 Service Unavailable",
                "text/plain",
                "not healthy: the pipeline has stopped\n".to_owned(),
            ),
            _ => ("200 OK", "text/plain", "ok\n".to_owned()),
        },
        ("GET", "/readyz") => match state.readiness().await {
            Ok(()) => ("200 OK", "text/plain", "ready\n".to_owned()),
            Err(reason) => (
                "503 Service Unavailable",
                "text/plain",
                format!("not ready: {}\n", one_line(&reason)),
            ),
        },
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "not found: try /metrics, /healthz or /readyz\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Whether `head` holds a whole request head (CRLF or bare LF lines).
fn head_complete(head: &[u8]) -> bool {
    head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_readiness_reason_is_one_bounded_line() {
        assert_eq!(one_line("redis: down"), "redis: down");
        assert_eq!(one_line("a\nb\tc"), "a b c");
        let long = format!("redis: {}", "é".repeat(2000));
        let line = one_line(&long);
        assert!(line.len() <= MAX_REASON + 40, "{}", line.len());
        assert!(line.ends_with("... (the log has the whole error)"));
    }
}
