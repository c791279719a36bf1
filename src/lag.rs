//! Commit-to-applied lag: fixed-bucket histograms (log scale, 10% wide
//! buckets from 10 µs to ~10 min) cheap enough to record every batch.

use std::time::{Duration, SystemTime};

/// The lag of every applied batch, measured from its oldest transaction.
#[derive(Clone, Debug, Default)]
pub struct Lag {
    /// From the commit in the source to Redis' acknowledgement.
    pub commit_to_apply: LagHistogram,
    /// From the source sending that commit to evictd (the walsender's send
    /// time; Kafka: the record's timestamp) to Redis' acknowledgement:
    /// evictd's own part, without the source's decoding and queueing.
    pub sent_to_apply: LagHistogram,
}

const BUCKETS: usize = 200;
const FIRST_MICROS: f64 = 10.0;
const GROWTH: f64 = 1.1;

#[derive(Clone, Debug)]
pub struct LagHistogram {
    counts: Box<[u64; BUCKETS]>,
    total: u64,
    max: Duration,
}

impl Default for LagHistogram {
    fn default() -> Self {
        LagHistogram {
            counts: Box::new([0; BUCKETS]),
            total: 0,
            max: Duration::ZERO,
        }
    }
}

impl LagHistogram {
    /// Records the lag of a commit at `commit_time` applied now.
    pub fn record_commit(&mut self, commit_time: SystemTime) {
        let lag = SystemTime::now()
            .duration_since(commit_time)
            .unwrap_or_default();
        self.record(lag);
    }

    pub fn record(&mut self, lag: Duration) {
        self.counts[bucket(lag)] += 1;
        self.total += 1;
        self.max = self.max.max(lag);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// What was recorded after `earlier` (a copy of this histogram taken
    /// before); its max is the whole histogram's, a bound on the part's.
    pub fn since(&self, earlier: &LagHistogram) -> LagHistogram {
        let mut part = LagHistogram {
            max: self.max,
            ..LagHistogram::default()
        };
        for (index, (now, before)) in self.counts.iter().zip(earlier.counts.iter()).enumerate() {
            part.counts[index] = now.saturating_sub(*before);
        }
        part.total = part.counts.iter().sum();
        part
    }

    pub fn max(&self) -> Duration {
        self.max
    }

    /// The upper bound of the bucket holding quantile `q` (0..=1).
    pub fn quantile(&self, q: f64) -> Duration {
        if self.total == 0 {
            return Duration::ZERO;
        }
        // Both bounded: q in 0..=1 and total a count.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (index, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return upper_bound(index).min(self.max);
            }
        }
        self.max
    }
}

fn bucket(lag: Duration) -> usize {
    #[allow(clippy::cast_precision_loss)]
    let micros = lag.as_micros() as f64;
    if micros <= FIRST_MICROS {
        return 0;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let index = ((micros / FIRST_MICROS).ln() / GROWTH.ln()).ceil() as usize;
    index.min(BUCKETS - 1)
}

fn upper_bound(index: usize) -> Duration {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let micros = (FIRST_MICROS * GROWTH.powi(index as i32)) as u64;
    Duration::from_micros(micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_a_bucket() {
        let mut histogram = LagHistogram::default();
        for ms in 1..=100 {
            histogram.record(Duration::from_millis(ms));
        }
        let p50 = histogram.quantile(0.5).as_secs_f64() * 1000.0;
        let p99 = histogram.quantile(0.99).as_secs_f64() * 1000.0;
        assert!((50.0..=55.5).contains(&p50), "{p50}");
        assert!((99.0..=100.0).contains(&p99), "{p99}");
        assert_eq!(histogram.count(), 100);
    }
}
