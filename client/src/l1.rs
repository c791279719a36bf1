//! The in-process tier: a bounded moka cache of decoded values, a local
//! tag index, and the subscriber that applies evictd's broadcasts to both.
//!
//! Exactness rests on two rules. A value is served from L1 only while the
//! subscription is live (subscribed, and flushed since it last was not).
//! A value is inserted only if no broadcast applied since the reader began
//! reading it touched the key (by key, by one of its tags, by pattern):
//! such a broadcast overtook the read, and what was read may be older than
//! it. The recent broadcasts are kept for that check (the fence), the last
//! 4,096 of them; a read older than those is not inserted.
//!
//! A message missed (a gap in seq, a new epoch, a dropped subscription) is
//! replayed from evictd's broadcast log; L1 is flushed only when the log no
//! longer reaches back to the last message applied.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use moka::notification::RemovalCause;
use redis::aio::ConnectionLike;

use crate::metrics::Meter;
use crate::protocol::{
    glob_matches, version_key, Broadcast, Position, L1_LAST_KEY, L1_LOG_FIELD, L1_LOG_KEY,
    VERSION_NAMESPACE,
};

/// How the L1 tier is bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L1Bound {
    /// At most this many entries.
    Entries(u64),
    /// At most about this many bytes: key plus value as stored in Redis,
    /// plus 64 per entry.
    Bytes(u64),
}

/// Options of the L1 tier.
#[derive(Clone, Debug)]
pub struct L1Options {
    pub bound: L1Bound,
    pub ttl: Duration,
    pub channel: String,
    /// How long after the subscription dropped L1 still serves (0: not
    /// at all).
    pub serve_disconnected: Duration,
}

/// One entry, behind one `Arc`: moka clones it on every hit.
type Entry = Arc<Stored>;

struct Stored {
    /// An `Option<T>`: `None` is a cached "no row".
    value: Box<dyn Any + Send + Sync>,
    tags: Box<[String]>,
    /// Identifies this insertion in the tag index.
    id: u64,
    weight: u32,
}

/// Why the L1 tier was emptied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushReason {
    /// The subscription (re)started and the broadcast log no longer
    /// reaches back to the last message applied.
    Subscribed,
    /// A seq was skipped, further back than the log reaches.
    Gap,
    /// evictd restarted (a new epoch), and the log does not reach back.
    Epoch,
    /// A message did not parse.
    Malformed,
}

impl FlushReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FlushReason::Subscribed => "subscribed",
            FlushReason::Gap => "gap",
            FlushReason::Epoch => "epoch",
            FlushReason::Malformed => "malformed",
        }
    }
}

/// The broadcasts applied recently, each with the generation it made.
#[derive(Default)]
struct Fence {
    /// Reads that began before this generation are not inserted.
    floor: u64,
    recent: VecDeque<(u64, Broadcast)>,
}

const FENCE_MESSAGES: usize = 4096;

impl Fence {
    /// Records `message` as generation `generation`.
    fn push(&mut self, generation: u64, message: Broadcast) {
        if self.recent.len() == FENCE_MESSAGES {
            if let Some((oldest, _)) = self.recent.pop_front() {
                self.floor = oldest;
            }
        }
        self.recent.push_back((generation, message));
    }

    /// Whether a value of `key` with `tags`, read from generation `seen`
    /// on, may be inserted now.
    fn admits(&self, key: &str, tags: &[&str], seen: u64) -> bool {
        if seen < self.floor {
            return false;
        }
        for (generation, message) in self.recent.iter().rev() {
            if *generation <= seen {
                break;
            }
            if touches(message, key, tags) {
                return false;
            }
        }
        true
    }
}

/// Whether `message` invalidates `key` or one of `tags`.
fn touches(message: &Broadcast, key: &str, tags: &[&str]) -> bool {
    message.keys.iter().any(|k| k == key)
        || message.patterns.iter().any(|p| glob_matches(p, key))
        || tags.iter().any(|tag| {
            message.tags.iter().any(|t| t == tag)
                || message.tag_patterns.iter().any(|p| glob_matches(p, tag))
        })
}

/// Namespace versions L1 holds at most; past that it starts over.
const MAX_VERSIONS: usize = 100_000;

/// The last version a thread read from an L1: a request reads several
/// keys under one namespace, and this spares each but the first the
/// shared map's lock and hash.
struct LastVersion {
    /// Which L1 ([`L1::id`]).
    l1: u64,
    /// The L1's generation when it was read: valid while it is the same.
    generation: u64,
    namespace: Box<str>,
    version: u64,
}

thread_local! {
    static LAST_VERSION: std::cell::RefCell<Option<LastVersion>> =
        const { std::cell::RefCell::new(None) };
}

/// Tells L1 tiers apart (an address can be reused).
static NEXT_L1: AtomicU64 = AtomicU64::new(1);

pub(crate) struct L1 {
    /// Unique per process.
    id: u64,
    entries: moka::sync::Cache<String, Entry>,
    /// namespace -> its version: beside the entries, not among them, as
    /// every versioned read looks one up first. Kept and dropped by the
    /// same rules as entries (the counter's key is what broadcasts name).
    versions: RwLock<HashMap<Box<str>, u64>>,
    /// tag -> key -> the entry id that registered it.
    tags: Arc<Mutex<HashMap<String, HashMap<String, u64>>>>,
    /// Held while a broadcast is applied and while a value is inserted.
    fence: Mutex<Fence>,
    generation: AtomicU64,
    live: AtomicBool,
    next_id: AtomicU64,
    /// The last applied broadcast, `epoch:seq`.
    last: Mutex<Option<(String, u64)>>,
    /// Since when the subscription is down, while L1 may still serve.
    down_since: Mutex<Option<Instant>>,
    serve_disconnected: Duration,
    /// The highest WAL position a broadcast applied here acknowledged.
    applied: AtomicU64,
    /// Woken by every message applied and every flush.
    changed: tokio::sync::Notify,
    meter: Arc<Meter>,
}

impl L1 {
    pub fn new(options: &L1Options, meter: Arc<Meter>) -> L1 {
        let tags: Arc<Mutex<HashMap<String, HashMap<String, u64>>>> = Arc::default();
        let index = Arc::clone(&tags);
        let listener_meter = Arc::clone(&meter);
        let mut builder = moka::sync::Cache::builder()
            .time_to_live(options.ttl)
            .eviction_listener(move |key: Arc<String>, entry: Entry, cause| {
                // Drop the index's reference only if it is still this
                // insertion's: the key may have been inserted again since.
                let mut tags = lock(&index);
                for tag in entry.tags.iter() {
                    if let Some(keys) = tags.get_mut(tag) {
                        if keys.get(key.as_str()) == Some(&entry.id) {
                            keys.remove(key.as_str());
                        }
                        if keys.is_empty() {
                            tags.remove(tag);
                        }
                    }
                }
                drop(tags);
                if matches!(cause, RemovalCause::Size | RemovalCause::Expired) {
                    listener_meter.l1_evicted(cause == RemovalCause::Size);
                }
            });
        builder = match options.bound {
            L1Bound::Entries(entries) => builder.max_capacity(entries),
            L1Bound::Bytes(bytes) => builder
                .max_capacity(bytes)
                .weigher(|_key: &String, entry: &Entry| entry.weight),
        };
        L1 {
            id: NEXT_L1.fetch_add(1, Ordering::Relaxed),
            entries: builder.build(),
            versions: RwLock::default(),
            tags,
            fence: Mutex::new(Fence::default()),
            generation: AtomicU64::new(0),
            live: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            last: Mutex::new(None),
            down_since: Mutex::new(None),
            serve_disconnected: options.serve_disconnected,
            applied: AtomicU64::new(0),
            changed: tokio::sync::Notify::new(),
            meter,
        }
    }

    /// The value of `key` if L1 holds one of type `T` and may serve it.
    /// `Some(None)` is a cached "no row".
    pub fn get<T: Clone + 'static>(&self, key: &str) -> Option<Option<T>> {
        if !self.serving() {
            return None;
        }
        let entry = self.entries.get(key)?;
        entry.value.downcast_ref::<Option<T>>().cloned()
    }

    /// The version of `namespace`, if L1 holds it and may serve it.
    pub fn version(&self, namespace: &str) -> Option<u64> {
        if !self.serving() {
            return None;
        }
        // The generation before the map: every drop of a version happens
        // before the generation moves on, so a version read here is
        // current for as long as the generation stays where it was.
        let generation = self.generation.load(Ordering::Acquire);
        let remembered = LAST_VERSION.with_borrow(|last| {
            last.as_ref()
                .filter(|last| {
                    last.l1 == self.id
                        && last.generation == generation
                        && *last.namespace == *namespace
                })
                .map(|last| last.version)
        });
        if remembered.is_some() {
            return remembered;
        }
        let version = read(&self.versions).get(namespace).copied()?;
        LAST_VERSION.with_borrow_mut(|last| {
            *last = Some(LastVersion {
                l1: self.id,
                generation,
                namespace: namespace.into(),
                version,
            });
        });
        Some(version)
    }

    /// Keeps the version of `namespace` read at generation `seen`, unless
    /// a broadcast applied since bumped it (see [`L1::insert`]).
    pub fn insert_version(&self, namespace: &str, version: u64, seen: u64) -> bool {
        let fence = lock(&self.fence);
        if !self.live.load(Ordering::Acquire) || !fence.admits(&version_key(namespace), &[], seen) {
            return false;
        }
        let mut versions = write(&self.versions);
        if versions.len() >= MAX_VERSIONS && !versions.contains_key(namespace) {
            versions.clear();
        }
        versions.insert(namespace.into(), version);
        true
    }

    /// Drops the versions `message` bumped, by counter key or pattern.
    fn drop_versions(&self, message: &Broadcast) {
        let keys = message
            .keys
            .iter()
            .filter_map(|key| key.strip_prefix(VERSION_NAMESPACE));
        let patterns: Vec<&str> = message
            .patterns
            .iter()
            .filter(|pattern| pattern.starts_with(VERSION_NAMESPACE))
            .map(String::as_str)
            .collect();
        let mut keys = keys.peekable();
        if keys.peek().is_none() && patterns.is_empty() {
            return;
        }
        let mut versions = write(&self.versions);
        for namespace in keys {
            versions.remove(namespace);
        }
        if !patterns.is_empty() {
            versions.retain(|namespace, _| {
                let counter = version_key(namespace);
                !patterns
                    .iter()
                    .any(|pattern| glob_matches(pattern, &counter))
            });
        }
    }

    /// Taken before a reader reads Redis or the database; [`L1::insert`]
    /// stores only if no broadcast applied since touched the key.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn insert<T: Send + Sync + 'static>(
        &self,
        key: &str,
        value: Option<T>,
        tags: &[&str],
        size: usize,
        seen: u64,
    ) -> bool {
        let fence = lock(&self.fence);
        if !self.live.load(Ordering::Acquire) || !fence.admits(key, tags, seen) {
            return false;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if !tags.is_empty() {
            let mut index = lock(&self.tags);
            for tag in tags {
                index
                    .entry((*tag).to_owned())
                    .or_default()
                    .insert(key.to_owned(), id);
            }
        }
        let weight = u32::try_from(key.len() + size + 64).unwrap_or(u32::MAX);
        let entry = Arc::new(Stored {
            value: Box::new(value),
            tags: tags.iter().map(|tag| (*tag).to_owned()).collect(),
            id,
            weight,
        });
        // The listener may run here and lock the index: it is not held.
        self.entries.insert(key.to_owned(), entry);
        true
    }

    /// Drops `key` (the application invalidated it).
    pub fn remove(&self, key: &str) {
        let mut fence = lock(&self.fence);
        let message = Broadcast {
            keys: vec![key.to_owned()],
            ..Broadcast::default()
        };
        self.drop_versions(&message);
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        fence.push(generation, message);
        self.entries.invalidate(key);
    }

    /// The last applied broadcast as `epoch:seq` (the format of
    /// `evictd:l1:last`).
    pub fn last(&self) -> Option<String> {
        lock(&self.last)
            .as_ref()
            .map(|(epoch, seq)| format!("{epoch}:{seq}"))
    }

    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// Live, or down for less than `serve_disconnected`.
    fn serving(&self) -> bool {
        if self.live.load(Ordering::Acquire) {
            return true;
        }
        !self.serve_disconnected.is_zero()
            && lock(&self.down_since).is_some_and(|since| since.elapsed() < self.serve_disconnected)
    }

    pub fn entry_count(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    /// Every key L1 could serve now, for checks against the database.
    pub fn keys(&self) -> Vec<String> {
        self.entries.iter().map(|(key, _)| (*key).clone()).collect()
    }

    fn flush(&self, reason: FlushReason, live: bool) {
        let mut fence = lock(&self.fence);
        write(&self.versions).clear();
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        fence.floor = generation;
        fence.recent.clear();
        self.live.store(live, Ordering::Release);
        *lock(&self.down_since) = None;
        self.entries.invalidate_all();
        lock(&self.tags).clear();
        *lock(&self.last) = None;
        self.meter.l1_flushed(reason);
        self.changed.notify_waiters();
    }

    /// The subscription dropped: serve nothing (or only within
    /// `serve_disconnected`) and store nothing until it is back.
    fn disconnected(&self) {
        let _fence = lock(&self.fence);
        if self.live.swap(false, Ordering::AcqRel) {
            *lock(&self.down_since) = Some(Instant::now());
        }
    }

    /// Serving again, with every message since the last one applied.
    fn resumed(&self) {
        let _fence = lock(&self.fence);
        if let Some(since) = lock(&self.down_since).take() {
            self.meter.l1_disconnected(since.elapsed());
        }
        self.live.store(true, Ordering::Release);
    }

    fn position(&self) -> Option<(String, u64)> {
        lock(&self.last).clone()
    }

    /// The highest WAL position the broadcasts applied here acknowledged.
    pub fn applied(&self) -> Position {
        Position(self.applied.load(Ordering::Acquire))
    }

    /// Whether the last message applied is `last` (`epoch`, `seq`) or later.
    pub fn reached(&self, last: &(String, u64)) -> bool {
        lock(&self.last)
            .as_ref()
            .is_some_and(|(epoch, seq)| *epoch == last.0 && *seq >= last.1)
    }

    /// Completes after the next message applied or flush.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Whether `message` comes right after what was applied (or is one
    /// applied already).
    fn follows(&self, message: &Broadcast) -> bool {
        match &*lock(&self.last) {
            None => true,
            Some((epoch, seq)) => *epoch == message.epoch && message.seq <= seq + 1,
        }
    }

    /// Catches up from the log after the subscription (re)started: replays
    /// what was missed, or flushes when the log does not reach back.
    async fn resume<C: ConnectionLike>(&self, log: &mut Log<C>) {
        match self.position() {
            Some(position) => {
                // evictd's last message first: everything up to it is in
                // the log read after it (logged before published), and
                // everything after it arrives on the channel.
                let read = async {
                    let target = log.last().await?;
                    let missed = log.since(&position).await?;
                    Ok::<_, redis::RedisError>((target, missed))
                };
                match read.await {
                    Ok((target, Some(missed))) => {
                        self.replay(missed);
                        let reached = match (target, self.position()) {
                            (None, _) => true,
                            (Some((epoch, seq)), Some((at_epoch, at_seq))) => {
                                epoch == at_epoch && at_seq >= seq
                            }
                            (Some(_), None) => false,
                        };
                        if reached {
                            self.resumed();
                        } else {
                            self.flush(FlushReason::Subscribed, true);
                        }
                    }
                    _ => self.flush(FlushReason::Subscribed, true),
                }
            }
            None => {
                // Nothing applied yet: start from evictd's last message
                // (anything published after it arrives on the channel).
                self.flush(FlushReason::Subscribed, true);
                if let Ok(Some(last)) = log.last().await {
                    let mut position = lock(&self.last);
                    if position.is_none() {
                        *position = Some(last);
                    }
                }
            }
        }
    }

    /// Applies one message from the channel; a gap or a new epoch first
    /// replays what was missed from the log (or flushes).
    async fn receive<C: ConnectionLike>(&self, payload: &[u8], log: &mut Log<C>) {
        let message: Broadcast = match serde_json::from_slice(payload) {
            Ok(message) => message,
            Err(_) => return self.flush(FlushReason::Malformed, true),
        };
        if let Some(position) = self.position().filter(|_| !self.follows(&message)) {
            // Serve nothing until the missed messages are applied.
            self.live.store(false, Ordering::Release);
            if let Ok(Some(missed)) = log.since(&position).await {
                self.replay(missed);
            }
            if self.follows(&message) {
                self.live.store(true, Ordering::Release);
            } else if position.0 != message.epoch {
                self.flush(FlushReason::Epoch, true);
            } else {
                self.flush(FlushReason::Gap, true);
            }
        }
        self.apply_message(message);
    }

    fn replay(&self, missed: Vec<Broadcast>) {
        self.meter.l1_replayed(missed.len());
        for message in missed {
            self.apply_message(message);
        }
    }

    /// Applies one message: drops what it invalidates, records it in the
    /// fence, and moves the position.
    fn apply_message(&self, message: Broadcast) {
        let mut fence = lock(&self.fence);
        self.drop_versions(&message);
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        for key in &message.keys {
            self.entries.invalidate(key.as_str());
        }
        let mut doomed: Vec<String> = Vec::new();
        {
            let mut index = lock(&self.tags);
            for tag in &message.tags {
                if let Some(keys) = index.remove(tag.as_str()) {
                    doomed.extend(keys.into_keys());
                }
            }
            for pattern in &message.tag_patterns {
                let matching: Vec<String> = index
                    .keys()
                    .filter(|tag| glob_matches(pattern, tag))
                    .cloned()
                    .collect();
                for tag in matching {
                    if let Some(keys) = index.remove(&tag) {
                        doomed.extend(keys.into_keys());
                    }
                }
            }
        }
        for key in &doomed {
            self.entries.invalidate(key.as_str());
        }
        if !message.patterns.is_empty() {
            for (key, _) in self.entries.iter() {
                if message
                    .patterns
                    .iter()
                    .any(|pattern| glob_matches(pattern, &key))
                {
                    self.entries.invalidate(key.as_str());
                }
            }
        }
        let mut last = lock(&self.last);
        let seq = match &*last {
            Some((epoch, seq)) if *epoch == message.epoch => (*seq).max(message.seq),
            _ => message.seq,
        };
        *last = Some((message.epoch.clone(), seq));
        drop(last);
        if let Some(lsn) = message
            .lsn
            .as_deref()
            .and_then(|lsn| lsn.parse::<Position>().ok())
        {
            self.applied.fetch_max(lsn.0, Ordering::AcqRel);
        }
        fence.push(generation, message);
        drop(fence);
        self.changed.notify_waiters();
    }
}

/// Follows the broadcast channel for as long as the cache lives. On every
/// (re)subscription L1 catches up from the log (or is flushed) before it
/// serves again; while the subscription is down it stores nothing and
/// serves only within `serve_disconnected`.
pub(crate) async fn subscribe<C: ConnectionLike>(
    l1: Arc<L1>,
    urls: Vec<String>,
    channel: String,
    mut log: Log<C>,
) {
    let mut attempt: usize = 0;
    loop {
        let url = &urls[attempt % urls.len()];
        attempt += 1;
        if let Ok(mut pubsub) = connect(url, &channel).await {
            attempt = 0;
            l1.resume(&mut log).await;
            let mut messages = pubsub.on_message();
            while let Some(message) = messages.next().await {
                l1.receive(message.get_payload_bytes(), &mut log).await;
            }
            drop(messages);
            l1.disconnected();
        }
        let pause = Duration::from_millis(100 * (attempt.min(10) as u64));
        tokio::time::sleep(pause).await;
    }
}

/// Entries read from the log per round trip.
const REPLAY_CHUNK: usize = 1000;

/// The message a log entry's fields hold.
fn logged(fields: &[String]) -> Option<&str> {
    let pair = fields.chunks(2).find(|pair| pair[0] == L1_LOG_FIELD)?;
    pair.get(1).map(String::as_str)
}

/// `newest_first` in order, if it continues `position` without a gap:
/// within an epoch each seq at most one past the one before (a message may
/// be there twice), and a new epoch starting at 1.
fn contiguous(
    position: &(String, u64),
    mut newest_first: Vec<Broadcast>,
) -> Option<Vec<Broadcast>> {
    newest_first.reverse();
    let (mut epoch, mut seq) = (position.0.as_str(), position.1);
    for message in &newest_first {
        let next = if message.epoch == epoch {
            message.seq <= seq + 1
        } else {
            message.seq == 1
        };
        if !next {
            return None;
        }
        if message.epoch != epoch || message.seq > seq {
            (epoch, seq) = (message.epoch.as_str(), message.seq);
        }
    }
    Some(newest_first)
}

/// evictd's broadcast log (`evictd:l1:log`) and last message
/// (`evictd:l1:last`), read over any connection (the cache's own, for L1).
pub struct Log<C> {
    connection: C,
    log_key: String,
    last_key: String,
}

impl<C: ConnectionLike> Log<C> {
    pub fn new(connection: C, prefix: &str) -> Log<C> {
        Log {
            connection,
            log_key: format!("{prefix}{L1_LOG_KEY}"),
            last_key: format!("{prefix}{L1_LAST_KEY}"),
        }
    }

    /// The messages after `position` (oldest first), or `None` when the log
    /// does not reach back to it or they have a gap.
    pub async fn since(
        &mut self,
        position: &(String, u64),
    ) -> redis::RedisResult<Option<Vec<Broadcast>>> {
        let (epoch, seq) = position;
        let mut missed: Vec<Broadcast> = Vec::new();
        let mut end = "+".to_owned();
        loop {
            let entries: Vec<(String, Vec<String>)> = redis::cmd("XREVRANGE")
                .arg(&self.log_key)
                .arg(&end)
                .arg("-")
                .arg("COUNT")
                .arg(REPLAY_CHUNK)
                .query_async(&mut self.connection)
                .await?;
            for (id, fields) in &entries {
                end = format!("({id}");
                let Some(Ok(message)) = logged(fields).map(serde_json::from_str::<Broadcast>)
                else {
                    // An entry that does not parse: the log cannot be
                    // trusted to be whole.
                    return Ok(None);
                };
                if message.epoch == *epoch && message.seq <= *seq {
                    return Ok(contiguous(position, missed));
                }
                missed.push(message);
            }
            if entries.len() < REPLAY_CHUNK {
                // The log's oldest entry: enough if it is the very next one.
                let next = missed
                    .last()
                    .is_some_and(|oldest| oldest.epoch == *epoch && oldest.seq == seq + 1);
                return Ok(if next {
                    contiguous(position, missed)
                } else {
                    None
                });
            }
        }
    }

    /// The newest `count` messages, oldest first (an entry that does not
    /// parse is left out).
    pub async fn recent(&mut self, count: usize) -> redis::RedisResult<Vec<Broadcast>> {
        let entries: Vec<(String, Vec<String>)> = redis::cmd("XREVRANGE")
            .arg(&self.log_key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.connection)
            .await?;
        let mut messages: Vec<Broadcast> = entries
            .iter()
            .filter_map(|(_, fields)| serde_json::from_str(logged(fields)?).ok())
            .collect();
        messages.reverse();
        Ok(messages)
    }

    /// evictd's last message, `(epoch, seq)`.
    pub async fn last(&mut self) -> redis::RedisResult<Option<(String, u64)>> {
        let last: Option<String> = redis::cmd("GET")
            .arg(&self.last_key)
            .query_async(&mut self.connection)
            .await?;
        Ok(last.and_then(|last| {
            let (epoch, seq) = last.rsplit_once(':')?;
            Some((epoch.to_owned(), seq.parse().ok()?))
        }))
    }
}

async fn connect(url: &str, channel: &str) -> redis::RedisResult<redis::aio::PubSub> {
    let client = redis::Client::open(url)?;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel).await?;
    Ok(pubsub)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l1() -> L1 {
        let options = L1Options {
            bound: L1Bound::Entries(100),
            ttl: Duration::from_secs(60),
            channel: "c".into(),
            serve_disconnected: Duration::ZERO,
        };
        let l1 = L1::new(&options, Arc::new(Meter::new()));
        l1.flush(FlushReason::Subscribed, true);
        l1
    }

    fn message(seq: u64, body: &str) -> Broadcast {
        serde_json::from_str(&format!(r#"{{"v":1,"epoch":"e","seq":{seq},{body}}}"#))
            .expect("a message")
    }

    #[test]
    fn versions_go_with_their_counter_and_are_fenced_like_entries() {
        let l1 = l1();
        let seen = l1.generation();
        assert!(l1.insert_version("user:1", 5, seen));
        assert!(l1.insert_version("user:2", 5, seen));
        assert_eq!(l1.version("user:1"), Some(5));
        l1.apply_message(message(1, r#""keys":["evictd:ns:user:1"]"#));
        assert_eq!(
            (l1.version("user:1"), l1.version("user:2")),
            (None, Some(5))
        );
        // A read from before the bump's broadcast is not kept.
        assert!(!l1.insert_version("user:1", 5, seen));
        assert!(l1.insert_version("user:1", 6, l1.generation()));
        l1.apply_message(message(2, r#""patterns":["evictd:ns:user:*"]"#));
        assert_eq!((l1.version("user:1"), l1.version("user:2")), (None, None));
        // Read once more before each drop: the thread's last read goes too.
        assert!(l1.insert_version("user:3", 1, l1.generation()));
        assert_eq!(l1.version("user:3"), Some(1));
        l1.remove("evictd:ns:user:3");
        assert_eq!(l1.version("user:3"), None);
        assert!(l1.insert_version("user:3", 2, l1.generation()));
        assert_eq!(l1.version("user:3"), Some(2));
        l1.flush(FlushReason::Gap, true);
        assert_eq!(l1.version("user:3"), None);
    }

    #[test]
    fn a_read_overtaken_by_a_broadcast_of_its_key_tag_or_pattern_is_not_kept() {
        let l1 = l1();
        for (seq, body, key, tags) in [
            (1, r#""keys":["order:1"]"#, "order:1", &[][..]),
            (2, r#""tags":["user:1"]"#, "page:1", &["user:1"][..]),
            (3, r#""patterns":["order:*"]"#, "order:2", &[][..]),
            (4, r#""tag_patterns":["user:*"]"#, "page:2", &["user:2"][..]),
        ] {
            let seen = l1.generation();
            l1.apply_message(message(seq, body));
            assert!(!l1.insert(key, Some(1u8), tags, 1, seen), "{body}");
            assert_eq!(l1.get::<u8>(key), None);
            // A read that began after the broadcast is kept.
            assert!(l1.insert(key, Some(1u8), tags, 1, l1.generation()));
            assert_eq!(l1.get::<u8>(key), Some(Some(1)));
        }
    }

    #[test]
    fn a_broadcast_of_something_else_does_not_keep_a_read_out() {
        let l1 = l1();
        let seen = l1.generation();
        l1.apply_message(message(1, r#""keys":["order:9"],"tags":["user:9"]"#));
        assert!(l1.insert("order:1", Some(1u8), &["user:1"], 1, seen));
    }

    #[test]
    fn entries_go_with_their_key_tag_or_pattern() {
        let l1 = l1();
        let keep =
            |key: &str, tags: &[&str]| assert!(l1.insert(key, Some(()), tags, 1, l1.generation()));
        keep("a", &[]);
        keep("b", &["t"]);
        keep("c:1", &[]);
        keep("d", &["u:1"]);
        keep("e", &["v"]);
        l1.apply_message(message(
            1,
            r#""keys":["a"],"tags":["t"],"patterns":["c:*"],"tag_patterns":["u:*"]"#,
        ));
        for gone in ["a", "b", "c:1", "d"] {
            assert_eq!(l1.get::<()>(gone), None, "{gone}");
        }
        assert_eq!(l1.get::<()>("e"), Some(Some(())));
    }

    #[test]
    fn a_read_older_than_the_fence_remembers_is_not_kept() {
        let l1 = l1();
        let seen = l1.generation();
        for seq in 1..=FENCE_MESSAGES as u64 + 1 {
            l1.apply_message(message(seq, r#""keys":["other"]"#));
        }
        assert!(!l1.insert("order:1", Some(1u8), &[], 1, seen));
    }

    #[test]
    fn nothing_is_served_or_kept_while_deaf() {
        let l1 = l1();
        assert!(l1.insert("a", Some(1u8), &[], 1, l1.generation()));
        l1.disconnected();
        assert_eq!(l1.get::<u8>("a"), None);
        assert!(!l1.insert("a", Some(1u8), &[], 1, l1.generation()));
        // Back with nothing missed: the entry is served again.
        l1.resumed();
        assert_eq!(l1.get::<u8>("a"), Some(Some(1)));
    }

    #[test]
    fn while_deaf_entries_are_served_only_within_the_bound() {
        let mut options = L1Options {
            bound: L1Bound::Entries(100),
            ttl: Duration::from_secs(60),
            channel: "c".into(),
            serve_disconnected: Duration::from_millis(50),
        };
        let l1 = L1::new(&options, Arc::new(Meter::new()));
        l1.flush(FlushReason::Subscribed, true);
        assert!(l1.insert("a", Some(1u8), &[], 1, l1.generation()));
        l1.disconnected();
        assert_eq!(l1.get::<u8>("a"), Some(Some(1)), "within the bound");
        assert!(!l1.insert("b", Some(1u8), &[], 1, l1.generation()));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(l1.get::<u8>("a"), None, "past the bound");
        options.serve_disconnected = Duration::ZERO;
        let l1 = L1::new(&options, Arc::new(Meter::new()));
        l1.flush(FlushReason::Subscribed, true);
        assert!(l1.insert("a", Some(1u8), &[], 1, l1.generation()));
        l1.disconnected();
        assert_eq!(l1.get::<u8>("a"), None, "a zero bound serves nothing");
    }

    #[test]
    fn a_replay_must_continue_the_position_without_a_gap() {
        let at = |epoch: &str, seq: u64| {
            let mut m = message(seq, r#""keys":[]"#);
            m.epoch = epoch.into();
            m
        };
        let position = ("e".to_owned(), 4);
        let replay = |newest_first: Vec<Broadcast>| contiguous(&position, newest_first).is_some();
        assert!(replay(vec![]));
        assert!(replay(vec![at("e", 6), at("e", 5)]));
        assert!(replay(vec![at("e", 5), at("e", 5)]), "a message twice");
        assert!(
            replay(vec![at("f", 2), at("f", 1), at("e", 5)]),
            "a restart"
        );
        assert!(!replay(vec![at("e", 7), at("e", 5)]), "6 is missing");
        assert!(!replay(vec![at("f", 2)]), "a new epoch from 2");
    }

    #[test]
    fn a_value_of_another_type_is_a_miss() {
        let l1 = l1();
        assert!(l1.insert("a", Some(1u8), &[], 1, l1.generation()));
        assert_eq!(l1.get::<String>("a"), None);
    }
}
