//! [`Cache`]: get, get-or-load through L1 and Redis with fenced fills,
//! single-flight, stampede waits across processes, early refresh.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng as _;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::OnceCell;
use tokio::task::AbortHandle;

use crate::l1::{self, L1Bound, L1Options, L1};
use crate::metrics::{Meter, Stats};
use crate::protocol::{
    compose_versioned, lease, record_position, stamped, version_key, versioned_key, Position,
    Stored, AUDIT_STAMP_KEY, FILL_SCRIPT, LEASE, RELEASE_SCRIPT, RELOAD_SCRIPT,
    SLOT_RECORD_NAMESPACE, TAG_AT, TAG_AT_MS, TAG_NAMESPACE, TAG_PATTERN_AT, TAG_STAMP_KEY,
    VERSION_SCRIPT,
};

thread_local! {
    /// The versioned key an L1 lookup composes (see
    /// [`Cache::get_or_load_in`]).
    static COMPOSED: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// What a negative entry ("no such row") holds: not valid JSON, so it
/// cannot be a stored value.
const ABSENT: &str = "\u{0}evictd:absent";

/// Errors of [`Cache`]: Redis failing, a value that does not decode, or
/// the loader's own error.
#[derive(Debug, thiserror::Error)]
pub enum Error<E = std::convert::Infallible> {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("the cached value of `{key}` does not decode: {source}")]
    Decode {
        key: String,
        source: serde_json::Error,
    },
    #[error("the loader failed: {0}")]
    Load(E),
    /// [`Cache::wait_applied`] timed out.
    #[error("evictd had applied through {applied} after {waited:?}, {behind} bytes of WAL short of {wanted}{l1}")]
    Behind {
        wanted: Position,
        applied: Position,
        behind: u64,
        waited: Duration,
        /// Set when Redis had it but this process's L1 had not heard yet.
        l1: &'static str,
    },
}

/// How a fill ended, for tests and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// Stored: the lease was still ours.
    Stored,
    /// Refused: evictd invalidated the key (or the lease expired) while the
    /// loader ran. The loaded value is returned but not cached.
    Fenced,
    /// Not attempted: another process holds the fill right and did not
    /// store in time, or Redis failed.
    Skipped,
}

/// Options of a [`Cache`].
#[derive(Clone, Debug)]
pub struct CacheBuilder {
    nodes: Vec<String>,
    cluster: bool,
    prefix: String,
    ttl: Option<Duration>,
    jitter: f64,
    negative_ttl: Option<Duration>,
    lease: Duration,
    wait: Duration,
    l1: Option<L1Options>,
    early_refresh: f64,
    stale: Duration,
    slot: String,
    record_fills: bool,
    /// The name and interval of the counters' publication.
    publish: Option<(String, Duration)>,
}

impl CacheBuilder {
    /// Publishes this cache's counters to Redis every `every` (at least
    /// 100 ms) under the cache name `name`, for `evictd report`'s hit
    /// rates per tier (docs/PROTOCOL.md, "Client counters"). Off by
    /// default.
    pub fn publish_counters(mut self, name: impl Into<String>, every: Duration) -> Self {
        self.publish = Some((name.into(), every.max(Duration::from_millis(100))));
        self
    }

    /// The replication slot evictd streams from (`postgres.slot`, by
    /// default `evictd`): [`Cache::wait_applied`] reads its record.
    pub fn slot(mut self, slot: impl Into<String>) -> Self {
        self.slot = slot.into();
        self
    }

    /// The key prefix evictd is configured with (`redis.prefix`).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Expiry of stored values (none by default: evictd keeps them exact).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Varies each TTL at random by up to this share either way (0.1 =
    /// ±10%), so that keys filled together do not expire together.
    pub fn jitter(mut self, share: f64) -> Self {
        self.jitter = share.clamp(0.0, 1.0);
        self
    }

    /// Caches "no row" for this long (off by default); an insert of the
    /// row invalidates it like any value.
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.negative_ttl = Some(ttl);
        self
    }

    /// How long a fill right lasts: longer than the slowest loader.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How long a reader waits for another process's fill before loading
    /// itself (without caching).
    pub fn stampede_wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Keeps decoded values in process too (L1), at most `entries` of
    /// them, evicted as evictd's broadcasts say. Values must be `Clone`.
    pub fn l1_entries(mut self, entries: u64) -> Self {
        self.l1_options().bound = L1Bound::Entries(entries);
        self
    }

    /// [`CacheBuilder::l1_entries`], bounded by bytes instead: each entry
    /// weighs its key and its value as stored in Redis, plus 64.
    pub fn l1_bytes(mut self, bytes: u64) -> Self {
        self.l1_options().bound = L1Bound::Bytes(bytes);
        self
    }

    /// How long an L1 entry lives at most (60 s by default).
    pub fn l1_ttl(mut self, ttl: Duration) -> Self {
        self.l1_options().ttl = ttl;
        self
    }

    /// The channel evictd broadcasts on (`redis.l1_channel`, by default
    /// `evictd:l1`).
    pub fn l1_channel(mut self, channel: impl Into<String>) -> Self {
        self.l1_options().channel = channel.into();
        self
    }

    /// How long L1 keeps serving after its subscription dropped (none by
    /// default: it serves nothing while it cannot hear evictd). Within the
    /// bound a value is at most that much older than an invalidation it
    /// missed; on reconnecting L1 replays what it missed from evictd's
    /// broadcast log.
    pub fn l1_serve_disconnected(mut self, bound: Duration) -> Self {
        self.l1_options().serve_disconnected = bound;
        self
    }

    fn l1_options(&mut self) -> &mut L1Options {
        self.l1.get_or_insert_with(|| L1Options {
            bound: L1Bound::Entries(10_000),
            ttl: Duration::from_secs(60),
            channel: "evictd:l1".into(),
            serve_disconnected: Duration::ZERO,
        })
    }

    /// Record in each stored value the apply stamp the fill read (see
    /// [`crate::protocol::AUDIT_STAMP_KEY`]), so that evictd's consistency
    /// checker can verify it: one more `GET` per fill, and values that
    /// other readers of the same keys must take apart (every reader of this
    /// crate and of `docs/PROTOCOL.md` does). Off by default.
    pub fn record_fills(mut self, on: bool) -> Self {
        self.record_fills = on;
        self
    }

    /// Probabilistic early refresh (XFetch): a read may reload a value
    /// before its TTL, the more likely the closer it is to expiry and the
    /// slower loads have been; `beta` 1.0 is the usual choice, 0 turns it
    /// off. Needs a TTL.
    pub fn early_refresh(mut self, beta: f64) -> Self {
        self.early_refresh = beta.max(0.0);
        self
    }

    /// Keeps values this long past their TTL: a read in that window gets
    /// the old value at once while one reader (the holder of the fill
    /// right) reloads it. Needs a TTL.
    pub fn stale_while_revalidate(mut self, window: Duration) -> Self {
        self.stale = window;
        self
    }

    pub async fn build(self) -> Result<Cache, Error> {
        let redis = if self.cluster {
            let client = redis::cluster::ClusterClient::new(self.nodes.clone())?;
            Connection::Cluster(client.get_async_connection().await?)
        } else {
            let client = redis::Client::open(self.nodes[0].as_str())?;
            // Reconnects by itself after Redis restarts.
            Connection::Single(ConnectionManager::new(client).await?)
        };
        let meter = Arc::new(Meter::new());
        let (l1, subscriber) = match &self.l1 {
            Some(options) => {
                let l1 = Arc::new(L1::new(options, Arc::clone(&meter)));
                let task = tokio::spawn(l1::subscribe(
                    Arc::clone(&l1),
                    self.nodes.clone(),
                    options.channel.clone(),
                    l1::Log::new(redis.clone(), &self.prefix),
                ));
                (Some(l1), Some(task.abort_handle()))
            }
            None => (None, None),
        };
        let publisher = self.publish.clone().map(|(name, every)| {
            let task = tokio::spawn(publish_counters(
                redis.clone(),
                self.prefix.clone(),
                name,
                every,
                Arc::clone(&meter),
            ));
            task.abort_handle()
        });
        Ok(Cache {
            inner: Arc::new(Inner {
                redis,
                fill: redis::Script::new(FILL_SCRIPT),
                release: redis::Script::new(RELEASE_SCRIPT),
                reload: redis::Script::new(RELOAD_SCRIPT),
                version: redis::Script::new(VERSION_SCRIPT),
                options: self,
                inflight: Mutex::new(HashMap::new()),
                meter,
                l1,
                subscriber,
                publisher,
                load_micros: AtomicU64::new(0),
            }),
        })
    }
}

/// One connection to a standalone Redis (reconnecting by itself) or to a
/// Cluster: what a [`Cache`] reads and fills through, and what evictd's
/// own readers use.
#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Connection::Single(conn) => conn.req_packed_command(cmd),
            Connection::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Connection::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(conn) => conn.get_db(),
            Connection::Cluster(conn) => conn.get_db(),
        }
    }
}

/// A cache over one Redis, shared by cloning.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    redis: Connection,
    fill: redis::Script,
    release: redis::Script,
    reload: redis::Script,
    version: redis::Script,
    options: CacheBuilder,
    /// Loads in flight in this process: one loader per key.
    inflight: Mutex<HashMap<String, Arc<OnceCell<Loaded>>>>,
    meter: Arc<Meter>,
    l1: Option<Arc<L1>>,
    subscriber: Option<AbortHandle>,
    /// Publishes the counters (see [`CacheBuilder::publish_counters`]).
    publisher: Option<AbortHandle>,
    /// A moving average of loader time, for early refresh.
    load_micros: AtomicU64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in [&self.subscriber, &self.publisher].into_iter().flatten() {
            task.abort();
        }
    }
}

/// Writes `meter`'s counters to Redis every `every`, until aborted: the
/// instance's hash, its expiry, and its entry in the sorted set of
/// instances (docs/PROTOCOL.md, "Client counters"). A failed write is
/// left for the next interval.
async fn publish_counters(
    mut redis: Connection,
    prefix: String,
    name: String,
    every: Duration,
    meter: Arc<Meter>,
) {
    use crate::protocol::CLIENTS_KEY;
    const KEEP_MS: u64 = 86_400_000;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map_or_else(|| "unknown".to_owned(), |host| host.trim().to_owned());
    let instance = format!(
        "{host}:{}:{:04x}",
        std::process::id(),
        rand::rng().random::<u16>()
    );
    let key = format!("{prefix}{CLIENTS_KEY}:{instance}");
    let set = format!("{prefix}{CLIENTS_KEY}");
    let expiry = u64::try_from(every.as_millis().saturating_mul(3)).unwrap_or(u64::MAX);
    loop {
        tokio::time::sleep(every).await;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| {
                u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
            });
        let stats = &meter.stats;
        let mut hset = redis::cmd("HSET");
        hset.arg(&key)
            .arg("cache")
            .arg(&name)
            .arg("client")
            .arg("evictd-client (rust)")
            .arg("at")
            .arg(now);
        for (field, counter) in [
            ("l1_hits", &stats.l1_hits),
            ("hits", &stats.hits),
            ("misses", &stats.misses),
            ("loads", &stats.loads),
            ("fills", &stats.fills),
            ("fenced", &stats.fenced),
            ("degraded", &stats.degraded),
            ("stale_served", &stats.stale_served),
            ("early_refreshes", &stats.early_refreshes),
        ] {
            hset.arg(field).arg(counter.load(Ordering::Relaxed));
        }
        // One command at a time: on a Cluster the keys live in other slots.
        // A failure is counted; the next interval tries again.
        let written: redis::RedisResult<()> = async {
            hset.query_async::<()>(&mut redis).await?;
            redis::cmd("PEXPIRE")
                .arg(&key)
                .arg(expiry)
                .query_async::<()>(&mut redis)
                .await?;
            redis::cmd("ZADD")
                .arg(&set)
                .arg(now)
                .arg(&instance)
                .query_async::<()>(&mut redis)
                .await?;
            redis::cmd("ZREMRANGEBYSCORE")
                .arg(&set)
                .arg("-inf")
                .arg(now.saturating_sub(KEEP_MS))
                .query_async::<()>(&mut redis)
                .await
        }
        .await;
        if written.is_err() {
            meter.publish_failed();
        }
    }
}

/// A loaded value as stored (JSON, or [`ABSENT`]), how its fill ended,
/// and the L1 generation from before it was read (`None`: keep it out of
/// L1).
/// The tags a loader took from its row, handed to the fill.
type LateTags = Mutex<Vec<String>>;

#[derive(Clone)]
struct Loaded {
    raw: String,
    fill: Fill,
    generation: Option<u64>,
    /// The tags the loader took from the row (see
    /// [`Cache::get_or_load_tagged`]).
    late: Vec<String>,
}

/// What a read of Redis found.
enum Read {
    Hit(String),
    /// No value (nothing, or another reader's lease: it is loading).
    Miss,
    /// A value this read should reload (early refresh, or past its TTL
    /// within the stale window).
    Refresh(Current),
}

struct Current {
    raw: String,
    /// Past its TTL, within the stale window.
    stale: bool,
}

impl Cache {
    /// A cache over the standalone Redis at `url`.
    pub fn builder(url: impl Into<String>) -> CacheBuilder {
        Cache::builder_for(vec![url.into()], false)
    }

    /// A cache over a Redis Cluster, given one or more of its nodes.
    pub fn cluster<I, S>(nodes: I) -> CacheBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Cache::builder_for(nodes.into_iter().map(Into::into).collect(), true)
    }

    fn builder_for(nodes: Vec<String>, cluster: bool) -> CacheBuilder {
        assert!(!nodes.is_empty(), "a cache needs at least one Redis node");
        CacheBuilder {
            nodes,
            cluster,
            prefix: String::new(),
            ttl: None,
            jitter: 0.0,
            negative_ttl: None,
            lease: Duration::from_secs(10),
            wait: Duration::from_millis(200),
            l1: None,
            early_refresh: 0.0,
            stale: Duration::ZERO,
            slot: "evictd".into(),
            record_fills: false,
            publish: None,
        }
    }

    /// Waits until evictd has applied the Postgres WAL through `position`
    /// (read right after your commit, e.g. with [`commit_position`]), so
    /// that a read through this cache sees your write: Redis holds nothing
    /// older, and with L1 on, this process's L1 has applied the broadcasts
    /// up to it. Learns it from L1's broadcasts while they flow, else from
    /// evictd's continuity record (polled every 10 ms). Fails with
    /// [`Error::Behind`], saying how far behind evictd is, after `timeout`.
    /// For the Postgres source only (the Kafka source has no WAL position).
    pub async fn wait_applied(&self, position: Position, timeout: Duration) -> Result<(), Error> {
        let started = Instant::now();
        let prefix = &self.inner.options.prefix;
        let record_key = format!("{prefix}{SLOT_RECORD_NAMESPACE}{}", self.inner.options.slot);
        let mut redis = self.inner.redis.clone();
        let mut log = l1::Log::new(redis.clone(), prefix);
        let mut applied = Position(0);
        // With L1: the broadcast evictd had published when Redis was known
        // to be there, which L1 must have applied too.
        let mut l1_target: Option<(String, u64)> = None;
        let mut read_redis = true;
        loop {
            let l1 = self.inner.l1.as_deref();
            let mut changed = std::pin::pin!(l1.map(L1::changed));
            if let Some(changed) = changed.as_mut().as_pin_mut() {
                changed.enable();
            }
            if let Some(l1) = l1 {
                applied = applied.max(l1.applied());
                if applied >= position {
                    return Ok(());
                }
            }
            if read_redis && l1_target.is_none() {
                let record: Option<String> = redis::cmd("GET")
                    .arg(&record_key)
                    .query_async(&mut redis)
                    .await?;
                if let Some(at) = record.as_deref().and_then(record_position) {
                    applied = applied.max(at);
                }
                if applied >= position {
                    let Some(l1) = l1 else {
                        return Ok(());
                    };
                    // Read after the record: evictd sets it after
                    // publishing the batch's broadcast.
                    let Some(target) = log.last().await? else {
                        return Ok(());
                    };
                    if l1.reached(&target) {
                        return Ok(());
                    }
                    l1_target = Some(target);
                }
            }
            if let (Some(l1), Some(target)) = (l1, &l1_target) {
                if l1.reached(target) {
                    return Ok(());
                }
            }
            let waited = started.elapsed();
            if waited >= timeout {
                return Err(Error::Behind {
                    wanted: position,
                    applied,
                    behind: position.0.saturating_sub(applied.0),
                    waited,
                    l1: if l1_target.is_some() {
                        " (Redis had it; this process's L1 had not applied its broadcast)"
                    } else {
                        ""
                    },
                });
            }
            let tick = (timeout - waited).min(Duration::from_millis(10));
            read_redis = match changed.as_mut().as_pin_mut() {
                // A broadcast arrived: look at it before Redis.
                Some(changed) => tokio::time::timeout(tick, changed).await.is_err(),
                None => {
                    tokio::time::sleep(tick).await;
                    true
                }
            };
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.meter.stats
    }

    /// The last broadcast the L1 tier applied, as `epoch:seq` (the format
    /// of evictd's `evictd:l1:last`); `None` without L1, before the first
    /// message and after a flush.
    pub fn l1_last(&self) -> Option<String> {
        self.inner.l1.as_ref().and_then(|l1| l1.last())
    }

    /// Whether the L1 tier is subscribed and serving.
    pub fn l1_live(&self) -> bool {
        self.inner.l1.as_ref().is_some_and(|l1| l1.is_live())
    }

    /// The keys the L1 tier holds (for checks against the database).
    pub fn l1_keys(&self) -> Vec<String> {
        self.inner
            .l1
            .as_ref()
            .map(|l1| l1.keys())
            .unwrap_or_default()
    }

    /// How many entries the L1 tier holds.
    pub fn l1_len(&self) -> u64 {
        self.inner.l1.as_ref().map_or(0, |l1| l1.entry_count())
    }

    /// What L1 holds for `key`, without reading Redis: `Some(None)` is a
    /// cached "no row".
    pub fn l1_peek<T: Clone + 'static>(&self, key: &str) -> Option<Option<T>> {
        self.inner.l1.as_ref()?.get::<T>(key)
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.inner.options.prefix)
    }

    /// The current version of `namespace` (one a mapping's `versions = [...]`
    /// renders, e.g. `user:7`): from L1, else from its counter in Redis,
    /// which is created when there is none. evictd bumps it on every change
    /// the mapping covers, and the broadcast of the bump drops it from
    /// every L1.
    pub async fn version(&self, namespace: &str) -> Result<u64, Error> {
        if let Some(version) = self.inner.l1.as_ref().and_then(|l1| l1.version(namespace)) {
            return Ok(version);
        }
        let counter = version_key(namespace);
        // Taken before Redis is read: a bump broadcast from here on keeps
        // what this read returns out of L1.
        let seen = self.generation();
        // A new counter starts at the clock, above any version a counter
        // of this name held before it was deleted or evicted.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |since| {
                u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
            });
        let mut redis = self.inner.redis.clone();
        let version: u64 = self
            .inner
            .version
            .key(self.full(&counter))
            .arg(start)
            .invoke_async(&mut redis)
            .await?;
        if let (Some(l1), Some(seen)) = (&self.inner.l1, seen) {
            l1.insert_version(namespace, version, seen);
        }
        Ok(version)
    }

    /// `key` under the current version of `namespace`
    /// (`<namespace>@<version>:<key>`, e.g. `user:7@1733216400000001:orders`),
    /// to read and fill like any key: after evictd bumps the namespace,
    /// no reader composes that key again, so everything cached under the
    /// namespace is gone at once, in Redis and in every L1. A fill that
    /// raced the bump lands under the old version, where nobody reads.
    pub async fn versioned(&self, namespace: &str, key: &str) -> Result<String, Error> {
        let version = self.version(namespace).await?;
        Ok(versioned_key(namespace, version, key))
    }

    /// [`Cache::get_or_load`] of `key` under the current version of
    /// `namespace` (see [`Cache::versioned`]). With Redis down the loader
    /// is called and nothing is cached.
    pub async fn get_or_load_in<T, E, F, Fut>(
        &self,
        namespace: &str,
        key: &str,
        tags: &[&str],
        loader: F,
    ) -> Result<Option<T>, Error<E>>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        // An L1 hit composes the key in a reused buffer: no allocation.
        let l1 = self.inner.l1.as_ref();
        if let Some(version) = l1.and_then(|l1| l1.version(namespace)) {
            let hit = COMPOSED.with_borrow_mut(|composed| {
                compose_versioned(composed, namespace, version, key);
                self.l1_get::<T>(composed)
            });
            if let Some(value) = hit {
                return Ok(value);
            }
        }
        match self.versioned(namespace, key).await {
            Ok(key) => self.get_or_load(&key, tags, loader).await,
            Err(_) => {
                self.inner.meter.degraded();
                self.inner.meter.load();
                loader().await.map_err(Error::Load)
            }
        }
    }

    /// The cached value of `key`, if any (a cached "no row" reads `None`):
    /// from L1, else from Redis. A value read here is not kept in L1 (its
    /// tags are not known); [`Cache::get_or_load`] keeps it.
    pub async fn get<T>(&self, key: &str) -> Result<Option<T>, Error>
    where
        T: DeserializeOwned + Clone + 'static,
    {
        if let Some(value) = self.l1_get::<T>(key) {
            return Ok(value);
        }
        let mut redis = self.inner.redis.clone();
        let raw: Option<String> = redis::cmd("GET")
            .arg(self.full(key))
            .query_async(&mut redis)
            .await?;
        let value = raw.as_deref().and_then(|raw| match Stored::parse(raw) {
            Stored::Value(value) | Stored::Reloading(value) => Some(value),
            Stored::Loading => None,
        });
        decode(key, value)
    }

    /// Deletes `key` from Redis and from this process's L1 (and voids
    /// fills in flight for it: their lease goes with the key). Other
    /// processes' L1 tiers learn of evictd's invalidations only.
    pub async fn invalidate(&self, key: &str) -> Result<(), Error> {
        if let Some(l1) = &self.inner.l1 {
            l1.remove(key);
        }
        let mut redis = self.inner.redis.clone();
        redis::cmd("UNLINK")
            .arg(self.full(key))
            .query_async::<()>(&mut redis)
            .await?;
        Ok(())
    }

    /// The value of `key`: from L1, from Redis, or from `loader`
    /// (`Ok(None)`: no such row), stored with a fenced fill and registered
    /// in the sets of `tags`. Concurrent calls for one key in this process
    /// share one load; across processes, the holder of the fill right
    /// loads and the others wait up to the stampede wait for its value.
    /// With Redis down the loader is called and nothing is cached.
    pub async fn get_or_load<T, E, F, Fut>(
        &self,
        key: &str,
        tags: &[&str],
        loader: F,
    ) -> Result<Option<T>, Error<E>>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        self.get_or_load_traced(key, tags, loader)
            .await
            .map(|(value, _)| value)
    }

    /// [`Cache::get_or_load`], also saying how the fill ended (`None` on a
    /// hit).
    pub async fn get_or_load_traced<T, E, F, Fut>(
        &self,
        key: &str,
        tags: &[&str],
        loader: F,
    ) -> Result<(Option<T>, Option<Fill>), Error<E>>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        self.get_or_load_with(key, tags, loader, None).await
    }

    /// [`Cache::get_or_load`] for a value whose tags come from the row it
    /// loads (`user:{user_id}` of `order:{id}`): the loader returns the
    /// value with those tags. They are registered after the load, and the
    /// value is stored only if evictd invalidated none of them since this
    /// fill read the tag stamp, before the load (docs/PROTOCOL.md, "Tags
    /// taken from the row"); otherwise it is returned uncached, as a
    /// fenced fill. `tags` are the ones known before the load.
    pub async fn get_or_load_tagged<T, E, F, Fut>(
        &self,
        key: &str,
        tags: &[&str],
        loader: F,
    ) -> Result<(Option<T>, Option<Fill>), Error<E>>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<(T, Vec<String>)>, E>>,
    {
        let late = LateTags::default();
        let late_ref = &late;
        let loader = move || async move {
            let loaded = loader().await?;
            Ok(loaded.map(|(value, tags)| {
                *late_ref
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = tags;
                value
            }))
        };
        self.get_or_load_with(key, tags, loader, Some(&late)).await
    }

    async fn get_or_load_with<T, E, F, Fut>(
        &self,
        key: &str,
        tags: &[&str],
        loader: F,
        late: Option<&LateTags>,
    ) -> Result<(Option<T>, Option<Fill>), Error<E>>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        if let Some(value) = self.l1_get::<T>(key) {
            return Ok((value, None));
        }
        let meter = &self.inner.meter;
        // Taken before Redis is read: a broadcast applied from here on
        // keeps what this read returns out of L1.
        let seen = self.generation();
        let full = self.full(key);
        let current = match self.read(&full).await {
            Ok(Read::Hit(raw)) => {
                meter.hit();
                let value = decode(key, Some(&raw)).map_err(retype)?;
                self.keep(key, &value, tags, raw.len(), seen);
                return Ok((value, None));
            }
            Ok(Read::Refresh(current)) => {
                meter.hit();
                Some(current)
            }
            Ok(Read::Miss) => {
                meter.miss();
                None
            }
            Err(_) => {
                // Graceful degradation: the database answers, nothing is
                // cached.
                meter.degraded();
                meter.load();
                let value = loader().await.map_err(Error::Load)?;
                return Ok((value, Some(Fill::Skipped)));
            }
        };
        let cell = {
            let mut inflight = self
                .inner
                .inflight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            inflight.entry(full.clone()).or_default().clone()
        };
        let mut load_error: Option<Error<E>> = None;
        let failed = &mut load_error;
        let key_ref = &full;
        let result = cell
            .get_or_try_init(move || async move {
                // Boxed: the fill's Redis round trips and the loader's
                // future would otherwise make every caller's future large.
                match Box::pin(self.fill(key_ref, tags, loader, current, late)).await {
                    Ok(loaded) => Ok(loaded),
                    Err(error) => {
                        *failed = Some(error);
                        Err(())
                    }
                }
            })
            .await
            .cloned();
        {
            let mut inflight = self
                .inner
                .inflight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if inflight
                .get(&full)
                .is_some_and(|held| Arc::ptr_eq(held, &cell))
            {
                inflight.remove(&full);
            }
        }
        match result {
            Ok(loaded) => {
                let value = decode(key, Some(&loaded.raw)).map_err(retype)?;
                if loaded.fill != Fill::Fenced {
                    if let Some(seen) = loaded.generation {
                        // L1 evicts by the tags from the row too.
                        let mut all: Vec<&str> = tags.to_vec();
                        all.extend(loaded.late.iter().map(String::as_str));
                        self.keep(key, &value, &all, loaded.raw.len(), Some(seen));
                    }
                }
                Ok((value, Some(loaded.fill)))
            }
            Err(()) => Err(load_error.unwrap_or_else(|| {
                Error::Redis(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "a concurrent load of this key failed",
                )))
            })),
        }
    }

    fn l1_get<T: Clone + 'static>(&self, key: &str) -> Option<Option<T>> {
        let value = self.inner.l1.as_ref()?.get::<T>(key)?;
        self.inner.meter.l1_hit();
        Some(value)
    }

    fn generation(&self) -> Option<u64> {
        self.inner.l1.as_ref().map(|l1| l1.generation())
    }

    /// Puts a value read at generation `seen` into L1, unless a broadcast
    /// was applied since.
    fn keep<T: Clone + Send + Sync + 'static>(
        &self,
        key: &str,
        value: &Option<T>,
        tags: &[&str],
        size: usize,
        seen: Option<u64>,
    ) {
        if let (Some(l1), Some(seen)) = (&self.inner.l1, seen) {
            l1.insert(key, value.clone(), tags, size, seen);
        }
    }

    /// Reads `full` from Redis; with early refresh or a stale window, also
    /// its remaining TTL, to decide whether this read should reload it.
    async fn read(&self, full: &str) -> redis::RedisResult<Read> {
        let options = &self.inner.options;
        let mut redis = self.inner.redis.clone();
        let refreshing =
            options.ttl.is_some() && (options.early_refresh > 0.0 || !options.stale.is_zero());
        if !refreshing {
            let raw: Option<String> = redis::cmd("GET").arg(full).query_async(&mut redis).await?;
            return Ok(match raw {
                None => Read::Miss,
                Some(raw) => match Stored::parse(&raw) {
                    Stored::Value(value) | Stored::Reloading(value) => Read::Hit(value.to_owned()),
                    Stored::Loading => Read::Miss,
                },
            });
        }
        let (raw, left): (Option<String>, i64) = redis::pipe()
            .cmd("GET")
            .arg(full)
            .cmd("PTTL")
            .arg(full)
            .query_async(&mut redis)
            .await?;
        let Some(raw) = raw else {
            return Ok(Read::Miss);
        };
        let fresh_for = left - i64::try_from(options.stale.as_millis()).unwrap_or(i64::MAX);
        let raw = match Stored::parse(&raw) {
            Stored::Value(value) => value.to_owned(),
            Stored::Loading => return Ok(Read::Miss),
            Stored::Reloading(value) => {
                // Another reader reloads it: serve the value meanwhile.
                if left >= 0 && fresh_for <= 0 {
                    self.inner.meter.stale_served();
                }
                return Ok(Read::Hit(value.to_owned()));
            }
        };
        if left < 0 {
            // No expiry (a write-through refresh by evictd, say).
            return Ok(Read::Hit(raw));
        }
        if fresh_for <= 0 {
            return Ok(Read::Refresh(Current { raw, stale: true }));
        }
        if options.early_refresh > 0.0 {
            // XFetch: reload early with a probability that grows as the
            // expiry nears, scaled by how long loads take.
            let load_ms = self.inner.load_micros.load(Ordering::Relaxed) as f64 / 1000.0;
            let draw: f64 = rand::rng().random_range(f64::MIN_POSITIVE..1.0);
            if load_ms * options.early_refresh * -draw.ln() >= fresh_for as f64 {
                return Ok(Read::Refresh(Current { raw, stale: false }));
            }
        }
        Ok(Read::Hit(raw))
    }

    /// Takes the fill right, registers the tags, loads, and stores if the
    /// right is still ours. With a `current` value (a refresh), a reader
    /// that does not get the right returns it instead of waiting.
    async fn fill<T, E, F, Fut>(
        &self,
        full: &str,
        tags: &[&str],
        loader: F,
        current: Option<Current>,
        late: Option<&LateTags>,
    ) -> Result<Loaded, Error<E>>
    where
        T: Serialize,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        let meter = &self.inner.meter;
        let options = &self.inner.options;
        let generation = self.generation();
        let loaded = |raw: String, fill: Fill| Loaded {
            raw,
            fill,
            generation,
            late: Vec::new(),
        };
        let mut redis = self.inner.redis.clone();
        let lease = lease(&format!("{:016x}", rand::rng().random::<u64>()));
        let held = match &current {
            // A first fill: the bare lease, only where there is no value.
            None => redis::cmd("SET")
                .arg(full)
                .arg(&lease)
                .arg("NX")
                .arg("PX")
                .arg(millis(options.lease))
                .query_async::<Option<String>>(&mut redis)
                .await
                .map(|reply| reply.is_some()),
            // A reload: the lease wraps the value, which readers keep
            // getting meanwhile.
            Some(_) => self
                .inner
                .reload
                .key(full)
                .arg(&lease)
                .arg(LEASE)
                .invoke_async::<i64>(&mut redis)
                .await
                .map(|taken| taken == 1),
        };
        match (held, current) {
            (Ok(true), current) => {
                if current.is_some() {
                    meter.early_refresh();
                }
            }
            (Ok(false) | Err(_), Some(current)) => {
                // Another reader refreshes it: serve what is there.
                if current.stale {
                    meter.stale_served();
                }
                return Ok(loaded(current.raw, Fill::Skipped));
            }
            (Ok(false), None) => {
                // Another process fills: wait for its value, briefly.
                meter.stampede_wait();
                if let Some(raw) = self.wait_for(full).await {
                    meter.hit();
                    return Ok(loaded(raw, Fill::Skipped));
                }
                let raw = self.load(full, loader).await?;
                meter.skipped();
                return Ok(loaded(raw, Fill::Skipped));
            }
            (Err(_), None) => {
                meter.degraded();
                let raw = self.load(full, loader).await?;
                return Ok(Loaded {
                    raw,
                    fill: Fill::Skipped,
                    generation: None,
                    late: Vec::new(),
                });
            }
        }
        // Read after the lease is ours and before the database: a stamp at
        // or past an invalidation's proves this fill loads after it.
        let stamp = if options.record_fills {
            redis::cmd("GET")
                .arg(format!("{}{AUDIT_STAMP_KEY}", options.prefix))
                .query_async::<Option<u64>>(&mut redis)
                .await
                .ok()
                .flatten()
        } else {
            None
        };
        // Registered before the database is read: a tag invalidation from
        // here on deletes the key, and the lease in it. A key is never stored
        // without its tags: if they cannot be registered, nothing is.
        if !tags.is_empty() && self.register(full, tags).await.is_err() {
            meter.degraded();
            let _ = self.release(full, &lease).await;
            let raw = self.load(full, loader).await?;
            meter.skipped();
            return Ok(loaded(raw, Fill::Skipped));
        }
        // With tags from the row: the tag stamp, read before the database.
        let tag_stamp = match late {
            None => None,
            Some(_) => match self.tag_stamp().await {
                Ok(stamp) => Some((stamp, Instant::now())),
                Err(_) => {
                    meter.degraded();
                    let _ = self.release(full, &lease).await;
                    let raw = self.load(full, loader).await?;
                    meter.skipped();
                    return Ok(loaded(raw, Fill::Skipped));
                }
            },
        };
        let raw = self.load(full, loader).await?;
        let late: Vec<String> = late.map_or_else(Vec::new, |late| {
            late.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        });
        if let Some((stamp, read_at)) = tag_stamp {
            if !late.is_empty() {
                let fresh = self.late_tags_fresh(full, &late, stamp, read_at).await;
                if !matches!(fresh, Ok(true)) {
                    let _ = self.release(full, &lease).await;
                    if fresh.is_ok() {
                        meter.fenced();
                        return Ok(loaded(raw, Fill::Fenced));
                    }
                    meter.degraded();
                    meter.skipped();
                    return Ok(loaded(raw, Fill::Skipped));
                }
            }
        }
        let ttl = if raw == ABSENT {
            if options.negative_ttl.is_none() {
                // "No row" without negative caching: give the right back.
                let _ = self.release(full, &lease).await;
                meter.skipped();
                return Ok(loaded(raw, Fill::Skipped));
            }
            options.negative_ttl
        } else {
            options.ttl
        };
        let ttl_ms = ttl.map_or(0, |ttl| {
            millis(jittered(ttl, options.jitter).saturating_add(options.stale))
        });
        let stored = match stamp {
            Some(stamp) => std::borrow::Cow::Owned(stamped(stamp, &raw)),
            None => std::borrow::Cow::Borrowed(raw.as_str()),
        };
        let outcome: Result<i64, _> = self
            .inner
            .fill
            .key(full)
            .arg(&lease)
            .arg(stored.as_ref())
            .arg(ttl_ms)
            .invoke_async(&mut redis)
            .await;
        let fill = match outcome {
            Ok(1) => {
                meter.stored();
                Fill::Stored
            }
            Ok(_) => {
                meter.fenced();
                Fill::Fenced
            }
            Err(_) => {
                meter.degraded();
                meter.skipped();
                Fill::Skipped
            }
        };
        Ok(Loaded {
            late,
            ..loaded(raw, fill)
        })
    }

    /// Calls the loader, timing it for early refresh; the value as stored.
    async fn load<T, E, F, Fut>(&self, full: &str, loader: F) -> Result<String, Error<E>>
    where
        T: Serialize,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        self.inner.meter.load();
        let started = Instant::now();
        let value = loader().await.map_err(Error::Load)?;
        let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        // An exponential moving average, weight 1/8.
        let average = &self.inner.load_micros;
        let before = average.load(Ordering::Relaxed);
        let after = if before == 0 {
            took
        } else {
            before - before / 8 + took / 8
        };
        average.store(after, Ordering::Relaxed);
        encode(full, value.as_ref())
    }

    /// Adds `full` to the sets of `tags`: one pipeline on a standalone
    /// Redis, one command per set on a Cluster (the sets live in other
    /// slots).
    async fn register(&self, full: &str, tags: &[&str]) -> redis::RedisResult<()> {
        let prefix = &self.inner.options.prefix;
        let mut redis = self.inner.redis.clone();
        let set = |tag: &str| format!("{prefix}{TAG_NAMESPACE}{tag}");
        if matches!(self.inner.redis, Connection::Cluster(_)) {
            for tag in tags {
                redis::cmd("SADD")
                    .arg(set(tag))
                    .arg(full)
                    .query_async::<()>(&mut redis)
                    .await?;
            }
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for tag in tags {
            pipe.cmd("SADD").arg(set(tag)).arg(full).ignore();
        }
        pipe.query_async::<()>(&mut redis).await
    }

    /// The tag stamp evictd last wrote (0: none yet).
    async fn tag_stamp(&self) -> redis::RedisResult<u64> {
        let mut redis = self.inner.redis.clone();
        let stamp: Option<u64> = redis::cmd("GET")
            .arg(format!("{}{TAG_STAMP_KEY}", self.inner.options.prefix))
            .query_async(&mut redis)
            .await?;
        Ok(stamp.unwrap_or(0))
    }

    /// Registers `full` under the tags taken from its row, then says
    /// whether evictd invalidated none of them (nor tags by pattern) after
    /// the tag stamp `stamp`, read at `read_at` before the load. Registered
    /// first: an invalidation whose stamp this misses comes later and finds
    /// the key in the set.
    async fn late_tags_fresh(
        &self,
        full: &str,
        late: &[String],
        stamp: u64,
        read_at: Instant,
    ) -> redis::RedisResult<bool> {
        let tags: Vec<&str> = late.iter().map(String::as_str).collect();
        self.register(full, &tags).await?;
        let prefix = &self.inner.options.prefix;
        let mut keys: Vec<String> = late
            .iter()
            .map(|tag| format!("{prefix}{TAG_AT}{tag}"))
            .collect();
        keys.push(format!("{prefix}{TAG_PATTERN_AT}"));
        let mut redis = self.inner.redis.clone();
        let stamps: Vec<Option<u64>> = if matches!(self.inner.redis, Connection::Cluster(_)) {
            let mut stamps = Vec::with_capacity(keys.len());
            for key in &keys {
                stamps.push(redis::cmd("GET").arg(key).query_async(&mut redis).await?);
            }
            stamps
        } else {
            redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut redis)
                .await?
        };
        // A tag's stamp lives TAG_AT_MS: past it, one may have expired.
        let in_time = read_at.elapsed() < Duration::from_millis(TAG_AT_MS);
        Ok(in_time && stamps.iter().flatten().all(|at| *at <= stamp))
    }

    /// Polls for the value another process is filling, up to the wait.
    async fn wait_for(&self, full: &str) -> Option<String> {
        let deadline = tokio::time::Instant::now() + self.inner.options.wait;
        let mut redis = self.inner.redis.clone();
        let mut pause = Duration::from_millis(2);
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(25));
            if let Ok(Some(raw)) = redis::cmd("GET")
                .arg(full)
                .query_async::<Option<String>>(&mut redis)
                .await
            {
                match Stored::parse(&raw) {
                    Stored::Value(value) | Stored::Reloading(value) => {
                        return Some(value.to_owned())
                    }
                    Stored::Loading => {}
                }
            }
        }
        None
    }

    /// Deletes `full` if it still holds `lease` (bare or wrapped).
    async fn release(&self, full: &str, lease: &str) -> Result<(), redis::RedisError> {
        let mut redis = self.inner.redis.clone();
        self.inner
            .release
            .key(full)
            .arg(lease)
            .invoke_async::<i64>(&mut redis)
            .await
            .map(drop)
    }
}

/// The WAL position of the database `client` is connected to, read right
/// after a commit on it: give it to [`Cache::wait_applied`] to read your
/// own write. (`pg_current_wal_insert_lsn()`: at or past the end of every
/// commit record written before it, even under `synchronous_commit = off`,
/// where the write position may still be behind the commit.)
#[cfg(feature = "postgres")]
pub async fn commit_position(
    client: &tokio_postgres::Client,
) -> Result<Position, tokio_postgres::Error> {
    let row = client
        .query_one(
            "select pg_current_wal_insert_lsn()::text, current_setting('wal_block_size')::int8, \
             (select setting::int8 from pg_settings where name = 'wal_segment_size')",
            &[],
        )
        .await?;
    let text: String = row.get(0);
    let (block, segment): (i64, i64) = (row.get(1), row.get(2));
    let position: Position = text.parse().unwrap_or_default();
    Ok(before_page_header(
        position,
        u64::try_from(block).unwrap_or(0),
        u64::try_from(segment).unwrap_or(0),
    ))
}

/// `position` moved back over a WAL page header it sits just past. When
/// the last record ends exactly at a page boundary, the insert position
/// is after the next page's header, but the commit's end (what evictd
/// reports applied) is the boundary itself, and no further WAL may come
/// to carry evictd past the header. Headers are 24 bytes, 40 on the first
/// page of a segment (64-bit builds); with no record bytes before them on
/// their page, the boundary is still at or past every record's end.
#[cfg(any(feature = "postgres", test))]
fn before_page_header(position: Position, block: u64, segment: u64) -> Position {
    const SHORT: u64 = 24;
    const LONG: u64 = 40;
    let Position(lsn) = position;
    if segment > 0 && lsn % segment == LONG {
        Position(lsn - LONG)
    } else if block > 0 && lsn % block == SHORT && (segment == 0 || lsn % segment != SHORT) {
        Position(lsn - SHORT)
    } else {
        position
    }
}

/// A loaded value as stored: its JSON, or [`ABSENT`] for "no row".
fn encode<T: Serialize, E>(key: &str, value: Option<&T>) -> Result<String, Error<E>> {
    match value {
        Some(value) => serde_json::to_string(value).map_err(|source| Error::Decode {
            key: key.to_owned(),
            source,
        }),
        None => Ok(ABSENT.to_owned()),
    }
}

fn decode<T: DeserializeOwned>(key: &str, raw: Option<&str>) -> Result<Option<T>, Error> {
    match raw {
        None => Ok(None),
        Some(ABSENT) => Ok(None),
        Some(raw) => serde_json::from_str(raw)
            .map(Some)
            .map_err(|source| Error::Decode {
                key: key.to_owned(),
                source,
            }),
    }
}

/// An error without a loader error, as one of a loader's.
fn retype<E>(error: Error) -> Error<E> {
    match error {
        Error::Redis(error) => Error::Redis(error),
        Error::Decode { key, source } => Error::Decode { key, source },
        Error::Load(never) => match never {},
        Error::Behind {
            wanted,
            applied,
            behind,
            waited,
            l1,
        } => Error::Behind {
            wanted,
            applied,
            behind,
            waited,
            l1,
        },
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

fn jittered(ttl: Duration, share: f64) -> Duration {
    if share <= 0.0 {
        return ttl;
    }
    let factor = rand::rng().random_range((1.0 - share)..=(1.0 + share));
    ttl.mul_f64(factor).max(Duration::from_millis(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_just_past_a_wal_page_header_moves_back_to_the_boundary() {
        let (block, segment) = (8192, 16 << 20);
        let at = |lsn| before_page_header(Position(lsn), block, segment).0;
        // Past a page's short header: the boundary (what evictd reports).
        assert_eq!(at(0x21DA_0018), 0x21DA_0000);
        // Past a segment's long header.
        assert_eq!(at(0x2200_0028), 0x2200_0000);
        // Inside a page, or past record bytes: as it is.
        assert_eq!(at(0x21DA_0040), 0x21DA_0040);
        assert_eq!(at(0x21DA_0028), 0x21DA_0028);
        assert_eq!(at(0x21DA_1018), 0x21DA_0000 + 0x1018);
        assert_eq!(at(0x21DA_2018), 0x21DA_2000);
        // Sizes not known: as it is.
        assert_eq!(
            before_page_header(Position(0x21DA_0018), 0, 0).0,
            0x21DA_0018
        );
    }
}
