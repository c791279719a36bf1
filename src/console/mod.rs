//! The console (`admin.console`): one page at `/ui` on the admin endpoint,
//! and the JSON and server-sent events it reads.
//!
//! | path | what |
//! |---|---|
//! | `/ui` | the page (static; it holds no data) |
//! | `/ui/api/events?table=&key=` | applied invalidations as server-sent events |
//! | `/ui/api/stats` | throughput and lag per second, the last five minutes |
//! | `/ui/api/tables` | the mapped tables |
//! | `/ui/api/trace?key=` | `evictd trace` of a key |
//! | `/ui/api/report?window=` | `evictd report` over a window (at most 5 min) |
//! | `/ui/api/explain?table=&op=&old=&new=` | `evictd explain` of one change |
//!
//! With `admin.token_file` (or `_env`) every `/ui/api/` request needs
//! `Authorization: Bearer <token>`; without one (allowed on a loopback
//! address only) the API answers, but rows and cached values are left out
//! of traces.
//!
//! The live stream never slows apply: apply offers each plan to a bounded
//! broadcast channel ([`Tap`], nothing is built while no one listens),
//! and a subscriber that falls [`TAP_CAPACITY`] events behind, or cannot
//! take a write within [`WRITE_TIMEOUT`], is dropped.

mod http;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, watch};

use crate::apply::Progress;
use crate::change::{Checkpoint, Op, RowChange};
use crate::config::{Config, Secret};
use crate::error::{Error, ErrorKind};
use crate::explain::{self, ColumnTypes};
use crate::lag::{Lag, LagHistogram};
use crate::mapping::Mappings;
use crate::plan::{Command, Plan};
use crate::telemetry;

pub use http::Request;

/// Events the live stream keeps for its slowest subscriber.
pub const TAP_CAPACITY: usize = 512;
/// Commands one event carries; the rest are counted (`more`).
pub const EVENT_ITEMS: usize = 50;
/// Most live-stream subscribers at once; more are answered 503.
pub const MAX_SUBSCRIBERS: usize = 100;
/// How long one write to a subscriber may take before it is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// The kernel's send buffer per subscriber (Linux doubles it).
const SEND_BUFFER: usize = 64 * 1024;
/// A comment line this often keeps proxies from closing an idle stream.
const HEARTBEAT: Duration = Duration::from_secs(15);
/// Samples kept: one per second, five minutes.
const HISTORY: usize = 300;
/// The longest report window the console runs.
const MAX_REPORT_WINDOW: Duration = Duration::from_secs(300);

/// Where apply offers each applied plan to the live stream.
#[derive(Clone)]
pub struct Tap(broadcast::Sender<Arc<Offered>>);

/// An event as offered: with its server-sent frame, made once for every
/// subscriber that takes it whole.
pub struct Offered {
    event: Event,
    frame: String,
}

/// `data: <json>\n\n`.
fn frame(event: &Event) -> Option<String> {
    serde_json::to_string(event)
        .ok()
        .map(|json| format!("data: {json}\n\n"))
}

impl Default for Tap {
    fn default() -> Self {
        Tap(broadcast::channel(TAP_CAPACITY).0)
    }
}

impl Tap {
    /// Offers an applied plan; builds nothing while no one listens.
    pub fn offer(&self, plan: &Plan) {
        if self.0.receiver_count() == 0 || plan.commands.is_empty() {
            return;
        }
        let event = Event::of(plan);
        let frame = frame(&event).unwrap_or_default();
        // A send fails only when every receiver went meanwhile.
        let _ = self.0.send(Arc::new(Offered { event, frame }));
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<Offered>> {
        self.0.subscribe()
    }
}

/// One applied plan, as the live stream shows it.
#[derive(Debug, Serialize)]
pub struct Event {
    /// When it was applied (Unix milliseconds).
    pub at_ms: u64,
    /// The WAL position of its last transaction (Postgres), or the
    /// partitions' next offsets (Kafka).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<String>,
    /// Row changes the plan covers.
    pub changes: u64,
    /// From the oldest commit in it to now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag_ms: Option<u64>,
    /// The operations of its row changes, by table.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub ops: BTreeMap<String, Vec<&'static str>>,
    pub items: Vec<Item>,
    /// Commands past [`EVENT_ITEMS`], not shown.
    pub more: usize,
}

/// One command of an applied plan. A refresh's value is not shown.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    pub table: String,
    /// `exact`, `refresh`, `prefix`, `pattern`, `tag`, `tag pattern`,
    /// `namespace`, `namespace pattern` or `coarse`.
    pub mode: &'static str,
    /// The key, tag, pattern or counter (without `redis.prefix`).
    pub target: String,
}

impl Event {
    fn of(plan: &Plan) -> Event {
        let table_of = |origin: crate::mapping::OriginId| {
            plan.tables
                .as_ref()
                .and_then(|tables| tables.get(origin.0 as usize))
                .map_or_else(|| "?".to_owned(), ToString::to_string)
        };
        let items = plan
            .commands
            .iter()
            .take(EVENT_ITEMS)
            .map(|command| {
                let (mode, target) = describe(command);
                Item {
                    table: table_of(command.origin()),
                    mode,
                    target: target.to_owned(),
                }
            })
            .collect();
        let now = SystemTime::now();
        let lag_ms = plan.commit_time.map(|commit| {
            u64::try_from(now.duration_since(commit).unwrap_or_default().as_millis())
                .unwrap_or(u64::MAX)
        });
        Event {
            at_ms: unix_ms(now),
            position: plan.checkpoint.as_ref().map(|checkpoint| match checkpoint {
                Checkpoint::Lsn(lsn) => lsn.to_string(),
                Checkpoint::Offsets(offsets) => offsets
                    .0
                    .iter()
                    .map(|(partition, next)| format!("{partition}@{next}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            }),
            changes: plan.changes,
            lag_ms,
            ops: plan
                .ops
                .iter()
                .map(|(table, ops)| (table.to_string(), ops.iter().map(Op::as_str).collect()))
                .collect(),
            items,
            more: plan.commands.len().saturating_sub(EVENT_ITEMS),
        }
    }
}

/// A command's mode and what it names.
fn describe(command: &Command) -> (&'static str, &str) {
    match command {
        Command::Unlink { key, .. } => ("exact", key),
        Command::Set { key, .. } => ("refresh", key),
        Command::UnlinkMatching {
            pattern,
            coarse,
            prefix,
            ..
        } => match (coarse, prefix) {
            (true, _) => ("coarse", pattern),
            (false, true) => ("prefix", pattern),
            (false, false) => ("pattern", pattern),
        },
        Command::InvalidateTag { tag, .. } => ("tag", tag),
        Command::InvalidateTagsMatching {
            pattern, coarse, ..
        } => (if *coarse { "coarse" } else { "tag pattern" }, pattern),
        Command::Bump { key, .. } => ("namespace", key),
        Command::BumpMatching {
            pattern, coarse, ..
        } => (
            if *coarse {
                "coarse"
            } else {
                "namespace pattern"
            },
            pattern,
        ),
    }
}

fn unix_ms(time: SystemTime) -> u64 {
    u64::try_from(
        time.duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(u64::MAX)
}

/// What a subscriber asked to see: commands of one table (`orders` or
/// `public.orders`), and whose target contains `key` (or matches it, with
/// `*`).
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub table: Option<String>,
    pub key: Option<String>,
}

impl Filter {
    fn admits(&self, item: &Item) -> bool {
        let table = self.table.as_deref().is_none_or(|table| {
            item.table == table
                || item
                    .table
                    .rsplit_once('.')
                    .is_some_and(|(_, name)| name == table)
        });
        let key = self.key.as_deref().is_none_or(|key| {
            if key.contains('*') {
                evictd_client::protocol::glob_matches(key, &item.target)
            } else {
                item.target.contains(key)
            }
        });
        table && key
    }

    /// The frame this subscriber is sent; `None` when none of the event
    /// is admitted.
    fn frame<'o>(&self, offered: &'o Offered) -> Option<std::borrow::Cow<'o, str>> {
        if self.table.is_none() && self.key.is_none() {
            return Some(std::borrow::Cow::Borrowed(&offered.frame));
        }
        self.apply(&offered.event).map(std::borrow::Cow::Owned)
    }

    /// The event as this subscriber sees it; `None` when none of it is
    /// admitted.
    fn apply(&self, event: &Event) -> Option<String> {
        let items: Vec<Item> = event
            .items
            .iter()
            .filter(|item| self.admits(item))
            .cloned()
            .collect();
        if items.is_empty() {
            return None;
        }
        let shown = Event {
            at_ms: event.at_ms,
            position: event.position.clone(),
            changes: event.changes,
            lag_ms: event.lag_ms,
            ops: event.ops.clone(),
            items,
            more: event.more,
        };
        frame(&shown)
    }
}

/// One second of throughput and lag.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    pub at_ms: u64,
    pub changes: u64,
    pub keys: u64,
    pub batches: u64,
    /// Commit to Redis, of what was applied in that second (`None`: nothing
    /// was).
    pub lag_p50_ms: Option<f64>,
    pub lag_p99_ms: Option<f64>,
}

/// The console's state, shared by its requests.
pub struct Console {
    tap: Tap,
    history: Arc<Mutex<VecDeque<Sample>>>,
    config: Config,
    mappings: watch::Receiver<Arc<Mappings>>,
    token: Option<Secret>,
    subscribers: Arc<AtomicUsize>,
}

impl Console {
    /// The console of a running pipeline; starts its sampler. Fails when
    /// the token is configured but cannot be read.
    pub fn start(
        config: &Config,
        tap: Tap,
        progress: watch::Receiver<Progress>,
        lag: Arc<Mutex<Lag>>,
        mappings: watch::Receiver<Arc<Mappings>>,
    ) -> Result<Console, Error> {
        if let Some(token) = &config.admin.token {
            token.read().map_err(|reason| {
                Error::new(ErrorKind::Config, format!("admin.token: {reason}"))
            })?;
        }
        let history = Arc::new(Mutex::new(VecDeque::with_capacity(HISTORY)));
        tokio::spawn(sample(progress, lag, Arc::downgrade(&history)));
        Ok(Console {
            tap,
            history,
            config: config.clone(),
            mappings,
            token: config.admin.token.clone(),
            subscribers: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Answers one `/ui` request on `stream`.
    pub async fn respond(&self, request: &Request, mut stream: TcpStream) -> std::io::Result<()> {
        if request.path == "/ui" || request.path == "/ui/" {
            return http::send(
                &mut stream,
                "200 OK",
                "text/html; charset=utf-8",
                PAGE.as_bytes(),
            )
            .await;
        }
        let access = match self.access(request) {
            Ok(access) => access,
            Err((status, why)) => {
                return http::send_json(&mut stream, status, &Problem { error: why }).await
            }
        };
        match request.path.as_str() {
            "/ui/api/events" => {
                let filter = Filter {
                    table: request.query("table").filter(|t| !t.is_empty()),
                    key: request.query("key").filter(|k| !k.is_empty()),
                };
                self.stream(stream, filter).await
            }
            "/ui/api/stats" => {
                let samples: Vec<Sample> = self
                    .history
                    .lock()
                    .map(|history| history.iter().copied().collect())
                    .unwrap_or_default();
                let stats = Stats {
                    samples,
                    subscribers: self.subscribers.load(Ordering::Relaxed),
                    values: access.values,
                };
                http::send_json(&mut stream, "200 OK", &stats).await
            }
            "/ui/api/tables" => {
                let mappings = self.mappings.borrow().clone();
                let tables: Vec<String> = mappings.tables().map(|t| t.table.to_string()).collect();
                http::send_json(&mut stream, "200 OK", &tables).await
            }
            "/ui/api/trace" => {
                let Some(key) = request.query("key").filter(|k| !k.is_empty()) else {
                    return bad(&mut stream, "give the key: ?key=...").await;
                };
                let mappings = self.mappings.borrow().clone();
                match crate::trace::trace(&self.config, &mappings, &key).await {
                    Ok(mut trace) => {
                        if !access.values {
                            trace.hide_values(HIDDEN);
                        }
                        http::send_json(&mut stream, "200 OK", &trace).await
                    }
                    Err(error) => failed(&mut stream, &error.to_string()).await,
                }
            }
            "/ui/api/report" => {
                let window = request.query("window").unwrap_or_else(|| "10s".into());
                let window = match crate::report::parse_window(&window) {
                    Ok(window) if window <= MAX_REPORT_WINDOW => window,
                    Ok(_) => return bad(&mut stream, "window: at most 5m").await,
                    Err(why) => return bad(&mut stream, &format!("window: {why}")).await,
                };
                let mappings = self.mappings.borrow().clone();
                match crate::report::report(&self.config, &mappings, window).await {
                    Ok(report) => {
                        let shown = ReportShown {
                            markdown: crate::report::markdown(&report),
                            report,
                        };
                        http::send_json(&mut stream, "200 OK", &shown).await
                    }
                    Err(error) => failed(&mut stream, &error.to_string()).await,
                }
            }
            "/ui/api/explain" => match self.explain(request) {
                Ok(explained) => http::send_json(&mut stream, "200 OK", &explained).await,
                Err(why) => bad(&mut stream, &why).await,
            },
            _ => {
                http::send_json(
                    &mut stream,
                    "404 Not Found",
                    &Problem {
                        error: "not found: the console's API is /ui/api/{events,stats,tables,trace,report,explain}".into(),
                    },
                )
                .await
            }
        }
    }

    /// Whether the request may read the API, and whether it may see rows
    /// and cached values; else the status and why not.
    fn access(&self, request: &Request) -> Result<Access, (&'static str, String)> {
        let Some(token) = &self.token else {
            return Ok(Access { values: false });
        };
        let token = token.read().map_err(|reason| {
            tracing::error!(%reason, "the console's token cannot be read");
            (
                "500 Internal Server Error",
                "the console's token cannot be read (see evictd's log)".to_owned(),
            )
        })?;
        let given = request
            .authorization
            .as_deref()
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim);
        match given {
            Some(given) if same(given.as_bytes(), token.as_bytes()) => Ok(Access { values: true }),
            Some(_) => Err(("401 Unauthorized", "the bearer token is wrong".into())),
            None => Err((
                "401 Unauthorized",
                "the console's API needs Authorization: Bearer <admin token>".into(),
            )),
        }
    }

    fn explain(&self, request: &Request) -> Result<explain::Explained, String> {
        let mappings = self.mappings.borrow().clone();
        let table = request.query("table").unwrap_or_default();
        let table = crate::change::TableName::parse(&table).map_err(|e| format!("table: {e}"))?;
        if mappings.table(&table).is_none() {
            return Err(format!("table: {table} is not mapped"));
        }
        let op = request.query("op").unwrap_or_default();
        let op = Op::parse(&op)
            .ok_or_else(|| format!("op: `{op}`; use insert, update, delete or truncate"))?;
        let types = ColumnTypes::offline(&mappings, &table);
        let mut notes = Vec::new();
        let mut row = |name: &str| {
            request
                .query(name)
                .filter(|json| !json.trim().is_empty())
                .map(|json| explain::row_from_json(name, &json, &[], &types, &mut notes))
                .transpose()
        };
        let old = row("old")?;
        let new = row("new")?;
        if let Some(missing) = explain::missing_row(op, old.as_ref(), new.as_ref()) {
            return Err(format!("{op} {missing}"));
        }
        let change = RowChange {
            table: Arc::new(table),
            op,
            old,
            new,
        };
        let mut explained = explain::explain(&mappings, &change, false);
        explained.notes.extend(notes);
        Ok(explained)
    }

    /// The live stream: applied plans as server-sent events until the
    /// client goes, falls behind or stops reading.
    async fn stream(&self, mut stream: TcpStream, filter: Filter) -> std::io::Result<()> {
        let Some(_subscribed) = Subscribed::new(&self.subscribers) else {
            return http::send_json(
                &mut stream,
                "503 Service Unavailable",
                &Problem {
                    error: format!("the live stream has {MAX_SUBSCRIBERS} subscribers already"),
                },
            )
            .await;
        };
        // A fixed send buffer: the kernel holds at most this much for a
        // subscriber that does not read (autotuned, it would grow to
        // megabytes), and a stalled one blocks, so it is dropped.
        if let Err(error) = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER) {
            tracing::debug!(%error, "cannot bound a subscriber's send buffer");
        }
        let mut events = self.tap.subscribe();
        let (mut reader, mut writer) = stream.split();
        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-store\r\nx-content-type-options: nosniff\r\nconnection: close\r\n\r\n: connected\n\n";
        if !write_within(&mut writer, head.as_bytes()).await {
            return drop_slow("its first write timed out");
        }
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.tick().await;
        let mut scratch = [0_u8; 256];
        loop {
            let offered;
            let text = tokio::select! {
                event = events.recv() => match event {
                    Ok(event) => {
                        offered = event;
                        match filter.frame(&offered) {
                            Some(frame) => frame,
                            None => continue,
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        let why = format!("it fell {missed} events behind");
                        let _ = write_within(&mut writer, format!("event: dropped\ndata: {why}\n\n").as_bytes()).await;
                        return drop_slow(&why);
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                _ = heartbeat.tick() => std::borrow::Cow::Borrowed(": keepalive\n\n"),
                read = reader.read(&mut scratch) => match read {
                    // The client closed (or sent something: a stream is
                    // read-only, so that ends it too).
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(_) => continue,
                },
            };
            if !write_within(&mut writer, text.as_bytes()).await {
                return drop_slow("a write did not complete within 5 s");
            }
        }
    }
}

/// Without a token: the answers leave rows and cached values out.
const HIDDEN: &str = "hidden: the console shows rows and cached values only to a request with the admin token (admin.token_file)";

struct Access {
    /// Rows and cached values may be shown.
    values: bool,
}

#[derive(Serialize)]
struct Problem {
    error: String,
}

#[derive(Serialize)]
struct Stats {
    samples: Vec<Sample>,
    subscribers: usize,
    /// Whether this request may see rows and cached values.
    values: bool,
}

#[derive(Serialize)]
struct ReportShown {
    markdown: String,
    report: crate::report::Report,
}

async fn bad(stream: &mut TcpStream, why: &str) -> std::io::Result<()> {
    http::send_json(stream, "400 Bad Request", &Problem { error: why.into() }).await
}

async fn failed(stream: &mut TcpStream, why: &str) -> std::io::Result<()> {
    http::send_json(stream, "502 Bad Gateway", &Problem { error: why.into() }).await
}

/// Compares without stopping at the first difference.
fn same(given: &[u8], token: &[u8]) -> bool {
    given.len() == token.len()
        && given
            .iter()
            .zip(token)
            .fold(0_u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

async fn write_within(writer: &mut tokio::net::tcp::WriteHalf<'_>, bytes: &[u8]) -> bool {
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, writer.write_all(bytes)).await,
        Ok(Ok(()))
    )
}

fn drop_slow(why: &str) -> std::io::Result<()> {
    metrics::counter!(telemetry::CONSOLE_DROPPED).increment(1);
    tracing::info!(
        why,
        "dropped a slow subscriber of the console's live stream"
    );
    Ok(())
}

/// A live-stream subscriber, counted while it lasts.
struct Subscribed(Arc<AtomicUsize>);

impl Subscribed {
    fn new(count: &Arc<AtomicUsize>) -> Option<Subscribed> {
        let before = count.fetch_add(1, Ordering::SeqCst);
        let subscribed = Subscribed(count.clone());
        if before >= MAX_SUBSCRIBERS {
            return None;
        }
        #[allow(clippy::cast_precision_loss)]
        metrics::gauge!(telemetry::CONSOLE_SUBSCRIBERS).set((before + 1) as f64);
        Some(subscribed)
    }
}

impl Drop for Subscribed {
    fn drop(&mut self) {
        let after = self.0.fetch_sub(1, Ordering::SeqCst) - 1;
        #[allow(clippy::cast_precision_loss)]
        metrics::gauge!(telemetry::CONSOLE_SUBSCRIBERS).set(after.min(MAX_SUBSCRIBERS) as f64);
    }
}

/// Samples throughput and lag once a second while the console lives.
async fn sample(
    progress: watch::Receiver<Progress>,
    lag: Arc<Mutex<Lag>>,
    history: std::sync::Weak<Mutex<VecDeque<Sample>>>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut before = progress.borrow().clone();
    let mut lag_before: LagHistogram = lag
        .lock()
        .map(|lag| lag.commit_to_apply.clone())
        .unwrap_or_default();
    loop {
        tick.tick().await;
        let Some(history) = history.upgrade() else {
            return;
        };
        let now = progress.borrow().clone();
        let lag_now = lag
            .lock()
            .map(|lag| lag.commit_to_apply.clone())
            .unwrap_or_default();
        let second = lag_now.since(&lag_before);
        let ms = |q: f64| (second.count() > 0).then(|| second.quantile(q).as_secs_f64() * 1000.0);
        let sample = Sample {
            at_ms: unix_ms(SystemTime::now()),
            changes: now.changes.saturating_sub(before.changes),
            keys: now.keys.saturating_sub(before.keys),
            batches: now.applied_plans.saturating_sub(before.applied_plans),
            lag_p50_ms: ms(0.5),
            lag_p99_ms: ms(0.99),
        };
        if let Ok(mut history) = history.lock() {
            if history.len() == HISTORY {
                history.pop_front();
            }
            history.push_back(sample);
        }
        before = now;
        lag_before = lag_now;
    }
}

/// The page: HTML, CSS and script in one file, no build step.
const PAGE: &str = include_str!("page.html");

#[cfg(test)]
mod tests {
    use super::*;

    fn item(table: &str, target: &str) -> Item {
        Item {
            table: table.into(),
            mode: "exact",
            target: target.into(),
        }
    }

    #[test]
    fn a_filter_admits_by_table_and_key() {
        let by_table = Filter {
            table: Some("orders".into()),
            key: None,
        };
        assert!(by_table.admits(&item("public.orders", "order:1")));
        assert!(by_table.admits(&item("orders", "order:1")));
        assert!(!by_table.admits(&item("public.users", "user:1")));
        let by_key = Filter {
            table: None,
            key: Some("order:1".into()),
        };
        assert!(by_key.admits(&item("public.orders", "order:12")));
        assert!(!by_key.admits(&item("public.orders", "order:2")));
        let by_glob = Filter {
            table: None,
            key: Some("order:*:lines".into()),
        };
        assert!(by_glob.admits(&item("public.orders", "order:7:lines")));
        assert!(!by_glob.admits(&item("public.orders", "order:7")));
    }

    #[test]
    fn a_filtered_event_keeps_only_what_it_admits() {
        let event = Event {
            at_ms: 1,
            position: Some("0/1".into()),
            changes: 2,
            lag_ms: None,
            ops: BTreeMap::new(),
            items: vec![
                item("public.orders", "order:1"),
                item("public.users", "user:1"),
            ],
            more: 0,
        };
        let filter = Filter {
            table: Some("users".into()),
            key: None,
        };
        let shown = filter.apply(&event).unwrap();
        assert!(
            shown.contains("user:1") && !shown.contains("order:1"),
            "{shown}"
        );
        let none = Filter {
            table: Some("products".into()),
            key: None,
        };
        assert!(none.apply(&event).is_none());
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"secret", b"secret"));
        assert!(!same(b"secreT", b"secret"));
        assert!(!same(b"secret1", b"secret"));
        assert!(!same(b"", b"secret"));
    }
}
