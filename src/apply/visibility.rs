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

use crate::change::Lsn;
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

/// Where the primary's WAL pages start, to read an insert position as the
/// end of what precedes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct WalLayout {
    block: u64,
    segment: u64,
}

/// The size of a WAL page header: the long one opens a segment.
const SHORT_PAGE_HEADER: u64 = 24;
const LONG_PAGE_HEADER: u64 = 40;

impl WalLayout {
    /// `pg_current_wal_insert_lsn()` never names a page boundary: at one,
    /// it points past the next page's header. A replica that replayed up
    /// to the boundary has everything inserted before, yet reports the
    /// boundary; so the position read is moved back over the header.
    fn end_of_previous(self, insert: u64) -> u64 {
        if self.segment > 0 && insert % self.segment == LONG_PAGE_HEADER {
            insert - LONG_PAGE_HEADER
        } else if self.block > 0 && insert % self.block == SHORT_PAGE_HEADER {
            insert - SHORT_PAGE_HEADER
        } else {
            insert
        }
    }
}

/// A batch's transactions are visible on the primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waited {
    /// With the primary's WAL position once they were (when asked for):
    /// a replica that replayed up to it shows them too.
    Visible(Option<u64>),
    /// `stop` turned true first: the batch is neither applied nor
    /// acknowledged.
    Stopped,
}

/// The gate, with its connection to the primary.
pub struct Visibility {
    url: SecretUrl,
    client: Option<(tokio_postgres::Client, WalLayout)>,
    /// The newest snapshot taken, with the WAL position read after it.
    latest: Option<(Snapshot, Option<u64>)>,
    /// Whether each batch needs the position (read replicas wait for it).
    positions: bool,
    /// Past this, a wait is logged and named on `/readyz`.
    warn_after: Duration,
    /// Why readiness fails (`None`: nothing waits long).
    state: watch::Sender<Option<String>>,
}

impl Visibility {
    /// The gate; with `positions`, each wait also gives the primary's WAL
    /// position at which the batch was visible.
    pub fn new(
        url: SecretUrl,
        warn_after: Duration,
        state: watch::Sender<Option<String>>,
        positions: bool,
    ) -> Visibility {
        Visibility {
            url,
            client: None,
            latest: None,
            positions,
            warn_after,
            state,
        }
    }

    /// Waits until every transaction of `xids` is visible on the primary.
    /// A batch that names none passes at once, unless a position is
    /// wanted (`invalidates`, with replicas): then it is the one of a new
    /// snapshot.
    pub async fn wait(
        &mut self,
        xids: &[u32],
        invalidates: bool,
        stop: &mut watch::Receiver<bool>,
    ) -> Waited {
        let positions = self.positions && invalidates;
        if xids.is_empty() && !positions {
            return Waited::Visible(None);
        }
        if let Some((latest, position)) = &self.latest {
            if !xids.is_empty() && xids.iter().all(|xid| latest.precedes(*xid)) {
                return Waited::Visible(*position);
            }
        }
        let started = Instant::now();
        let mut pause = FIRST_PAUSE;
        let mut warned = false;
        let mut held = false;
        let waited = metrics::gauge!(telemetry::VISIBILITY_WAIT);
        let position = loop {
            let why = match self.snapshot().await {
                Ok((snapshot, position)) => {
                    let hidden = xids.iter().find(|xid| !snapshot.shows(**xid)).copied();
                    self.latest = Some((snapshot, position));
                    match hidden {
                        None => break position,
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
                _ = stop.wait_for(|stop| *stop) => return Waited::Stopped,
                () = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(MAX_PAUSE);
        };
        if held {
            waited.set(0.0);
            metrics::counter!(telemetry::VISIBILITY_HELD).increment(1);
        }
        if warned {
            tracing::info!(waited = ?started.elapsed(), "the batch's transactions are visible; applying it");
            self.state.send_replace(None);
        }
        Waited::Visible(position)
    }

    /// A new snapshot, and when positions are wanted the WAL insert
    /// position read after it (so at or past every commit it shows).
    async fn snapshot(&mut self) -> Result<(Snapshot, Option<u64>), String> {
        if self.client.is_none() {
            let client = crate::catalog::connect(&self.url)
                .await
                .map_err(|e| e.to_string())?;
            let layout = if self.positions {
                let row = client
                    .query_one(
                        "select (select setting::bigint from pg_settings where name = 'wal_block_size'), \
                                (select setting::bigint from pg_settings where name = 'wal_segment_size')",
                        &[],
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                let size = |index: usize| {
                    row.get::<_, Option<i64>>(index)
                        .and_then(|n| u64::try_from(n).ok())
                };
                WalLayout {
                    block: size(0).unwrap_or(8192),
                    segment: size(1).unwrap_or(16 << 20),
                }
            } else {
                WalLayout {
                    block: 0,
                    segment: 0,
                }
            };
            self.client = Some((client, layout));
        }
        let (client, layout) = self.client.as_ref().ok_or("no connection")?;
        let query = if self.positions {
            // In this order: the position is read after the snapshot.
            "select pg_current_snapshot()::text, pg_current_wal_insert_lsn()::text"
        } else {
            "select pg_current_snapshot()::text, null::text"
        };
        let row = client
            .query_one(query, &[])
            .await
            .map_err(|e| e.to_string())?;
        let text: String = row.get(0);
        let snapshot =
            Snapshot::parse(&text).ok_or_else(|| format!("unexpected snapshot `{text}`"))?;
        let position = match row.get::<_, Option<String>>(1) {
            None => None,
            Some(text) => {
                let lsn =
                    Lsn::parse(&text).ok_or_else(|| format!("unexpected WAL position `{text}`"))?;
                Some(layout.end_of_previous(lsn.0))
            }
        };
        Ok((snapshot, position))
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
    fn an_insert_position_past_a_page_header_is_read_as_the_boundary() {
        let layout = WalLayout {
            block: 8192,
            segment: 16 << 20,
        };
        assert_eq!(layout.end_of_previous(3 * 8192 + 24), 3 * 8192);
        assert_eq!(layout.end_of_previous((5 << 24) + 40), 5 << 24);
        // Inside a page, or 40 bytes into a page that opens no segment.
        assert_eq!(layout.end_of_previous(3 * 8192 + 48), 3 * 8192 + 48);
        assert_eq!(layout.end_of_previous(3 * 8192 + 40), 3 * 8192 + 40);
    }

    #[test]
    fn the_newest_transaction_waiting_in_commit_is_not_visible() {
        // As Postgres showed it: 746 waits for a synchronous standby.
        let snapshot = Snapshot::parse("746:746:").unwrap();
        assert!(!snapshot.shows(746));
        assert!(snapshot.shows(745));
    }
}
