//! [`Cache`]: get, get-or-load with fenced fills, single-flight, stampede
//! waits across processes.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng as _;
use redis::aio::MultiplexedConnection;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::OnceCell;

use crate::protocol::{lease_key, same_slot, FILL_SCRIPT, RELEASE_SCRIPT, TAG_NAMESPACE};

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
    /// store in time, Redis failed, or the key cannot be fenced.
    Skipped,
}

/// Counters since the cache was built.
#[derive(Debug, Default)]
pub struct Stats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub loads: AtomicU64,
    pub fills: AtomicU64,
    pub fenced: AtomicU64,
    pub stampede_waits: AtomicU64,
    pub degraded: AtomicU64,
}

/// Options of a [`Cache`].
#[derive(Clone, Debug)]
pub struct CacheBuilder {
    url: String,
    prefix: String,
    ttl: Option<Duration>,
    jitter: f64,
    negative_ttl: Option<Duration>,
    lease: Duration,
    wait: Duration,
}

impl CacheBuilder {
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

    pub async fn build(self) -> Result<Cache, Error> {
        let client = redis::Client::open(self.url.as_str())?;
        let redis = client.get_multiplexed_async_connection().await?;
        Ok(Cache {
            inner: Arc::new(Inner {
                redis,
                fill: redis::Script::new(FILL_SCRIPT),
                release: redis::Script::new(RELEASE_SCRIPT),
                options: self,
                inflight: Mutex::new(HashMap::new()),
                stats: Stats::default(),
            }),
        })
    }
}

/// A cache over one Redis, shared by cloning.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    redis: MultiplexedConnection,
    fill: redis::Script,
    release: redis::Script,
    options: CacheBuilder,
    /// Loads in flight in this process: one loader per key.
    inflight: Mutex<HashMap<String, Arc<OnceCell<Loaded>>>>,
    stats: Stats,
}

/// A loaded value as stored (JSON, or [`ABSENT`]) and how its fill ended.
type Loaded = (Option<String>, Fill);

impl Cache {
    pub fn builder(url: impl Into<String>) -> CacheBuilder {
        CacheBuilder {
            url: url.into(),
            prefix: String::new(),
            ttl: None,
            jitter: 0.0,
            negative_ttl: None,
            lease: Duration::from_secs(10),
            wait: Duration::from_millis(200),
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.inner.options.prefix)
    }

    /// The cached value of `key`, if any (a cached "no row" reads `None`).
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, Error> {
        let mut redis = self.inner.redis.clone();
        let raw: Option<String> = redis::cmd("GET")
            .arg(self.full(key))
            .query_async(&mut redis)
            .await?;
        decode(key, raw.as_deref())
    }

    /// Deletes `key` (and voids fills in flight for it).
    pub async fn invalidate(&self, key: &str) -> Result<(), Error> {
        let full = self.full(key);
        let lease = lease_key(&self.inner.options.prefix, &full);
        let mut redis = self.inner.redis.clone();
        redis::cmd("UNLINK")
            .arg(&full)
            .arg(&lease)
            .query_async::<()>(&mut redis)
            .await?;
        Ok(())
    }

    /// The value of `key`: from Redis, or from `loader` (`Ok(None)`: no
    /// such row), stored with a fenced fill and registered in the sets of
    /// `tags`. Concurrent calls for one key in this process share one
    /// load; across processes, the holder of the fill right loads and the
    /// others wait up to the stampede wait for its value. With Redis down
    /// the loader is called and nothing is cached.
    pub async fn get_or_load<T, E, F, Fut>(
        &self,
        key: &str,
        tags: &[&str],
        loader: F,
    ) -> Result<Option<T>, Error<E>>
    where
        T: Serialize + DeserializeOwned,
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
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        let stats = &self.inner.stats;
        let full = self.full(key);
        let mut redis = self.inner.redis.clone();
        match redis::cmd("GET")
            .arg(&full)
            .query_async::<Option<String>>(&mut redis)
            .await
        {
            Ok(Some(raw)) => {
                stats.hits.fetch_add(1, Ordering::Relaxed);
                return Ok((decode(key, Some(&raw)).map_err(retype)?, None));
            }
            Ok(None) => {
                stats.misses.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                // Graceful degradation: the database answers, nothing is
                // cached.
                stats.degraded.fetch_add(1, Ordering::Relaxed);
                stats.loads.fetch_add(1, Ordering::Relaxed);
                let value = loader().await.map_err(Error::Load)?;
                return Ok((value, Some(Fill::Skipped)));
            }
        }
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
                match Box::pin(self.fill(key_ref, tags, loader)).await {
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
            Ok((raw, fill)) => Ok((decode(key, raw.as_deref()).map_err(retype)?, Some(fill))),
            Err(()) => Err(load_error.unwrap_or_else(|| {
                Error::Redis(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "a concurrent load of this key failed",
                )))
            })),
        }
    }

    /// Takes the fill right, registers the tags, loads, and stores if the
    /// right is still ours. Returns the value as stored.
    async fn fill<T, E, F, Fut>(
        &self,
        full: &str,
        tags: &[&str],
        loader: F,
    ) -> Result<Loaded, Error<E>>
    where
        T: Serialize,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        let stats = &self.inner.stats;
        let options = &self.inner.options;
        let mut redis = self.inner.redis.clone();
        let lease = lease_key(&options.prefix, full);
        let token = format!("{:016x}", rand::rng().random::<u64>());
        let held = if same_slot(full) {
            redis::cmd("SET")
                .arg(&lease)
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(millis(options.lease))
                .query_async::<Option<String>>(&mut redis)
                .await
                .map(|reply| reply.is_some())
        } else {
            Ok(false)
        };
        match held {
            Ok(true) => {}
            Ok(false) => {
                // Another process fills: wait for its value, briefly.
                stats.stampede_waits.fetch_add(1, Ordering::Relaxed);
                if let Some(raw) = self.wait_for(full).await {
                    stats.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok((Some(raw), Fill::Skipped));
                }
                stats.loads.fetch_add(1, Ordering::Relaxed);
                let value = loader().await.map_err(Error::Load)?;
                return Ok((Some(encode(full, value.as_ref())?), Fill::Skipped));
            }
            Err(_) => {
                stats.degraded.fetch_add(1, Ordering::Relaxed);
                stats.loads.fetch_add(1, Ordering::Relaxed);
                let value = loader().await.map_err(Error::Load)?;
                return Ok((Some(encode(full, value.as_ref())?), Fill::Skipped));
            }
        }
        // Registered before the database is read: a tag invalidation from
        // here on deletes the lease with the key.
        if !tags.is_empty() {
            let mut pipe = redis::pipe();
            for tag in tags {
                pipe.cmd("SADD")
                    .arg(format!("{}{TAG_NAMESPACE}{tag}", options.prefix))
                    .arg(full)
                    .ignore();
            }
            if pipe.query_async::<()>(&mut redis).await.is_err() {
                stats.degraded.fetch_add(1, Ordering::Relaxed);
            }
        }
        stats.loads.fetch_add(1, Ordering::Relaxed);
        let value = loader().await.map_err(Error::Load)?;
        let raw = encode(full, value.as_ref())?;
        let ttl = if raw == ABSENT {
            if options.negative_ttl.is_none() {
                // "No row" without negative caching: give the right back.
                let _ = self.release(&lease, &token).await;
                return Ok((Some(raw), Fill::Skipped));
            }
            options.negative_ttl
        } else {
            options.ttl
        };
        let ttl_ms = ttl.map_or(0, |ttl| millis(jittered(ttl, options.jitter)));
        let outcome: Result<i64, _> = self
            .inner
            .fill
            .key(full)
            .key(&lease)
            .arg(&token)
            .arg(&raw)
            .arg(ttl_ms)
            .invoke_async(&mut redis)
            .await;
        let fill = match outcome {
            Ok(1) => {
                stats.fills.fetch_add(1, Ordering::Relaxed);
                Fill::Stored
            }
            Ok(_) => {
                stats.fenced.fetch_add(1, Ordering::Relaxed);
                Fill::Fenced
            }
            Err(_) => {
                stats.degraded.fetch_add(1, Ordering::Relaxed);
                Fill::Skipped
            }
        };
        Ok((Some(raw), fill))
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
                return Some(raw);
            }
        }
        None
    }

    /// Deletes the lease if it is still `token`'s.
    async fn release(&self, lease: &str, token: &str) -> Result<(), redis::RedisError> {
        let mut redis = self.inner.redis.clone();
        self.inner
            .release
            .key(lease)
            .arg(token)
            .invoke_async::<i64>(&mut redis)
            .await
            .map(drop)
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
