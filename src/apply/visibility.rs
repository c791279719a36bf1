//! The visibility gate: a batch's invalidations take effect only once each
//! of its transactions is visible to a new snapshot on the primary.
//!
//! Postgres writes and flushes a commit record, where logical decoding
//! reads it, before the transaction leaves the proc array: the committing
//! backend first waits for synchronous standbys. Until it leaves, other
//! sessions still read the old row, and a reader that misses in that window
//! refills the cache with it after evictd's delete. So before a batch is
//! applied, the gate takes `pg_current_snapshot()` on a connection of its
//! own and checks that none of the batch's transactions is among the
//! snapshot's running ones ([`Snapshot::shows`]); if one is, it waits and
//! asks again. Normally a commit is visible by the time it is decoded, and
//! the gate costs one round trip per batch (none when a batch's
//! transactions all precede a snapshot already taken).
//!
//! The wait is bounded by nothing but visibility: a synchronous standby
//! that never answers holds every batch. It is never silent: past
//! `postgres.visibility_warn_ms` it is logged at WARN, named on `/readyz`,
//! and `evictd_visibility_wait_seconds` shows how long the batch at the
//! head has waited.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::SecretUrl;
use crate::telemetry;

/// The first pause between two looks at the snapshot; it doubles up to
/// [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(1);
const MAX_PAUSE: Duration = Duration::from_millis(50);

/// `pg_current_snapshot()`: transactions below `xmin` are finished, those
/// in `running` were in progress, `xmax` is the first not yet assigned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    xmin: u64,
    xmax: u64,
    running: Vec<u64>,
}

impl Snapshot {
    /// Parses `xmin:xmax:xip,...` (the text of `pg_snapshot`).
    pub fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.trim().splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let running = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|xid| xid.parse().ok())
                .collect::<Option<Vec<u64>>>()?,
        };
        Some(Snapshot {
            xmin,
            xmax,
            running,
        })
    }

    /// The 64-bit id of `xid`, a 32-bit xid the WAL named: the one
    /// nearest `xmax` (within 2^31 either way), as Postgres widens xids.
    fn full(&self, xid: u32) -> u64 {
        // Truncation to the low 32 bits is the point here.
        #[allow(clippy::cast_possible_truncation)]
        let low = self.xmax as u32;
        let delta = i64::from(xid.wrapping_sub(low).cast_signed());
        self.xmax.saturating_add_signed(delta)
    }

    /// Whether a committed `xid` is visible to this snapshot (to every
    /// snapshot taken from now on): below `xmin`, or below `xmax` and not
    /// among the running ones. A transaction waiting in COMMIT for a
    /// synchronous standby is neither: it is running, or it is the newest
    /// and at `xmax` (not yet completed).
    pub fn shows(&self, xid: u32) -> bool {
        let full = self.full(xid);
        full < self.xmin || (full < self.xmax && !self.running.contains(&full))
    }

    /// Whether `xid` precedes this snapshot's `xmin`: visible to it and to
    /// every later one, without asking again.
    fn precedes(&self, xid: u32) -> bool {
        self.full(xid) < self.xmin
    }
}

/// The gate, with its connection to the primary.
pub struct Visibility {
    url: SecretUrl,
    client: Option<tokio_postgres::Client>,
    /// The newest snapshot taken.
    latest: Option<Snapshot>,
    /// Past this, a wait is logged and named on `/readyz`.
    warn_after: Duration,
    /// Why readiness fails (`None`: nothing waits long).
    state: watch::Sender<Option<String>>,
}

impl Visibility {
    pub fn new(
        url: SecretUrl,
        warn_after: Duration,
        state: watch::Sender<Option<String>>,
    ) -> Visibility {
        Visibility {
            url,
            client: None,
            latest: None,
            warn_after,
            state,
        }
    }

    /// Waits until every transaction of `xids` is visible on the primary;
    /// `false` when `stop` turned true first (the batch is then not
    /// applied, nor acknowledged).
    pub async fn wait(&mut self, xids: &[u32], stop: &mut watch::Receiver<bool>) -> bool {
        if let Some(latest) = &self.latest {
            if xids.iter().all(|xid| latest.precedes(*xid)) {
                return true;
            }
        }
        let started = Instant::now();
        let mut pause = FIRST_PAUSE;
        let mut warned = false;
        let mut held = false;
        let waited = metrics::gauge!(telemetry::VISIBILITY_WAIT);
        loop {
            let why = match self.snapshot().await {
                Ok(snapshot) => {
                    let hidden = xids.iter().find(|xid| !snapshot.shows(**xid)).copied();
                    self.latest = Some(snapshot);
                    match hidden {
                        None => break,
                        Some(xid) => format!(
                            "transaction {xid} is committed in the WAL but not yet visible on the primary (a synchronous standby not answering?)"
                        ),
                    }
                }
                Err(error) => {
                    self.client = None;
                    format!("cannot check that the batch's transactions are visible: {error}")
                }
            };
            let elapsed = started.elapsed();
            held = true;
            waited.set(elapsed.as_secs_f64());
            if elapsed >= self.warn_after && !warned {
                warned = true;
                tracing::warn!(waited = ?elapsed, reason = %why, "a batch waits for its transactions to become visible before it is applied");
                self.state.send_replace(Some(format!(
                    "visibility: {why}; waited {} ms",
                    elapsed.as_millis()
                )));
            }
            tokio::select! {
                biased;
                _ = stop.wait_for(|stop| *stop) => return false,
                () = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(MAX_PAUSE);
        }
        if held {
            waited.set(0.0);
            metrics::counter!(telemetry::VISIBILITY_HELD).increment(1);
        }
        if warned {
            tracing::info!(waited = ?started.elapsed(), "the batch's transactions are visible; applying it");
            self.state.send_replace(None);
        }
        true
    }

    async fn snapshot(&mut self) -> Result<Snapshot, String> {
        if self.client.is_none() {
            let client = crate::catalog::connect(&self.url)
                .await
                .map_err(|e| e.to_string())?;
            self.client = Some(client);
        }
        let client = self.client.as_ref().ok_or("no connection")?;
        let row = client
            .query_one("select pg_current_snapshot()::text", &[])
            .await
            .map_err(|e| e.to_string())?;
        let text: String = row.get(0);
        Snapshot::parse(&text).ok_or_else(|| format!("unexpected snapshot `{text}`"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_shows_what_is_not_running() {
        let snapshot = Snapshot::parse("100:105:100,102").unwrap();
        assert!(!snapshot.shows(100));
        assert!(snapshot.shows(101));
        assert!(!snapshot.shows(102));
        assert!(snapshot.shows(99));
        assert!(snapshot.precedes(99));
        assert!(!snapshot.precedes(101));
        assert_eq!(Snapshot::parse("7:7:").unwrap().running, Vec::<u64>::new());
        assert_eq!(Snapshot::parse("nope"), None);
    }

    #[test]
    fn a_32_bit_xid_takes_the_epoch_nearest_the_snapshot() {
        // xmax in epoch 1, just past the wrap: xid 4294967290 is epoch 0's.
        let xmax = (1_u64 << 32) + 10;
        let snapshot = Snapshot::parse(&format!("{}:{xmax}:{}", xmax - 20, xmax - 16)).unwrap();
        assert_eq!(snapshot.full(5), (1 << 32) + 5);
        assert_eq!(snapshot.full(4_294_967_290), 4_294_967_290);
        assert!(!snapshot.shows(4_294_967_290));
        assert!(snapshot.shows(4_294_967_291));
        // At or past xmax: not completed yet, so not visible.
        assert_eq!(snapshot.full(10), xmax);
        assert!(!snapshot.shows(10));
        assert!(!snapshot.shows(11));
    }

    #[test]
    fn the_newest_transaction_waiting_in_commit_is_not_visible() {
        // As Postgres showed it: 746 waits for a synchronous standby.
        let snapshot = Snapshot::parse("746:746:").unwrap();
        assert!(!snapshot.shows(746));
        assert!(snapshot.shows(745));
    }
}
