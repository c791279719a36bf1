//! What a [`Cache`](crate::Cache) counts: [`Stats`] for the application
//! itself, and the same events through the `metrics` facade for whatever
//! recorder the application installed (the handles are registered once, so
//! a hit costs two atomic adds).

use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{counter, Counter};

use crate::l1::FlushReason;

/// Counters since the cache was built.
#[derive(Debug, Default)]
pub struct Stats {
    /// Reads served by the in-process tier.
    pub l1_hits: AtomicU64,
    /// Reads served by Redis.
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Loader calls.
    pub loads: AtomicU64,
    /// Fills stored.
    pub fills: AtomicU64,
    /// Fills refused because evictd invalidated the key meanwhile.
    pub fenced: AtomicU64,
    /// Reads that waited for another process's fill.
    pub stampede_waits: AtomicU64,
    /// Reads or fills that found Redis failing (the loader answered).
    pub degraded: AtomicU64,
    /// Values refreshed before their TTL (early refresh or stale window).
    pub early_refreshes: AtomicU64,
    /// Values served past their TTL, within the stale window.
    pub stale_served: AtomicU64,
    /// L1 entries dropped for size or age.
    pub l1_evictions: AtomicU64,
    /// Times the whole L1 tier was emptied.
    pub l1_flushes: AtomicU64,
    /// Times L1 caught up from evictd's broadcast log instead of flushing.
    pub l1_replays: AtomicU64,
    /// Messages applied from the log.
    pub l1_replayed: AtomicU64,
    /// Time the L1 subscription was down, in milliseconds.
    pub l1_disconnected_ms: AtomicU64,
    /// Publications of these counters to Redis that failed
    /// (`publish_counters`; the next interval tries again).
    pub publish_failures: AtomicU64,
}

pub(crate) struct Meter {
    pub stats: Stats,
    l1_hits: Counter,
    l2_hits: Counter,
    misses: Counter,
    loads: Counter,
    stored: Counter,
    fenced: Counter,
    skipped: Counter,
    stampede_waits: Counter,
    degraded: Counter,
    early_refreshes: Counter,
    stale_served: Counter,
    evicted_size: Counter,
    evicted_age: Counter,
    publish_failures: Counter,
}

impl Meter {
    pub fn new() -> Meter {
        Meter {
            stats: Stats::default(),
            l1_hits: counter!("evictd_client_hits_total", "tier" => "l1"),
            l2_hits: counter!("evictd_client_hits_total", "tier" => "l2"),
            misses: counter!("evictd_client_misses_total"),
            loads: counter!("evictd_client_loads_total"),
            stored: counter!("evictd_client_fills_total", "outcome" => "stored"),
            fenced: counter!("evictd_client_fills_total", "outcome" => "fenced"),
            skipped: counter!("evictd_client_fills_total", "outcome" => "skipped"),
            stampede_waits: counter!("evictd_client_stampede_waits_total"),
            degraded: counter!("evictd_client_degraded_total"),
            early_refreshes: counter!("evictd_client_early_refreshes_total"),
            stale_served: counter!("evictd_client_stale_served_total"),
            evicted_size: counter!("evictd_client_l1_evictions_total", "cause" => "size"),
            evicted_age: counter!("evictd_client_l1_evictions_total", "cause" => "expired"),
            publish_failures: counter!("evictd_client_publish_failures_total"),
        }
    }

    pub fn l1_hit(&self) {
        self.stats.l1_hits.fetch_add(1, Ordering::Relaxed);
        self.l1_hits.increment(1);
    }

    pub fn hit(&self) {
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        self.l2_hits.increment(1);
    }

    pub fn miss(&self) {
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        self.misses.increment(1);
    }

    pub fn load(&self) {
        self.stats.loads.fetch_add(1, Ordering::Relaxed);
        self.loads.increment(1);
    }

    pub fn stored(&self) {
        self.stats.fills.fetch_add(1, Ordering::Relaxed);
        self.stored.increment(1);
    }

    pub fn fenced(&self) {
        self.stats.fenced.fetch_add(1, Ordering::Relaxed);
        self.fenced.increment(1);
    }

    pub fn skipped(&self) {
        self.skipped.increment(1);
    }

    pub fn stampede_wait(&self) {
        self.stats.stampede_waits.fetch_add(1, Ordering::Relaxed);
        self.stampede_waits.increment(1);
    }

    pub fn degraded(&self) {
        self.stats.degraded.fetch_add(1, Ordering::Relaxed);
        self.degraded.increment(1);
    }

    pub fn early_refresh(&self) {
        self.stats.early_refreshes.fetch_add(1, Ordering::Relaxed);
        self.early_refreshes.increment(1);
    }

    pub fn publish_failed(&self) {
        self.stats.publish_failures.fetch_add(1, Ordering::Relaxed);
        self.publish_failures.increment(1);
    }

    pub fn stale_served(&self) {
        self.stats.stale_served.fetch_add(1, Ordering::Relaxed);
        self.stale_served.increment(1);
    }

    pub fn l1_evicted(&self, for_size: bool) {
        self.stats.l1_evictions.fetch_add(1, Ordering::Relaxed);
        if for_size {
            self.evicted_size.increment(1);
        } else {
            self.evicted_age.increment(1);
        }
    }

    pub fn l1_replayed(&self, messages: usize) {
        let messages = messages as u64;
        self.stats.l1_replays.fetch_add(1, Ordering::Relaxed);
        self.stats
            .l1_replayed
            .fetch_add(messages, Ordering::Relaxed);
        counter!("evictd_client_l1_replays_total").increment(1);
        counter!("evictd_client_l1_replayed_messages_total").increment(messages);
    }

    pub fn l1_disconnected(&self, down: std::time::Duration) {
        let ms = u64::try_from(down.as_millis()).unwrap_or(u64::MAX);
        self.stats
            .l1_disconnected_ms
            .fetch_add(ms, Ordering::Relaxed);
        metrics::histogram!("evictd_client_l1_disconnected_seconds").record(down.as_secs_f64());
    }

    pub fn l1_flushed(&self, reason: FlushReason) {
        self.stats.l1_flushes.fetch_add(1, Ordering::Relaxed);
        counter!("evictd_client_l1_flushes_total", "reason" => reason.as_str()).increment(1);
    }
}
