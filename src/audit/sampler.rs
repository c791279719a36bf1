//! The apply task's side of the checker: each sampled batch is stamped, and
//! its keys offered to the checker without ever waiting for it.

use std::sync::Arc;
use std::time::Instant;

use rand::Rng as _;
use tokio::sync::mpsc;

use crate::apply::RedisSink;
use crate::change::Checkpoint;
use crate::error::Error;
use crate::mapping::OriginId;
use crate::plan::{Command, Plan};
use crate::telemetry;

/// One key an applied batch deleted or refreshed, to be checked later.
#[derive(Debug)]
pub struct Sample {
    /// As the mappings render it, without the prefix.
    pub(crate) key: String,
    /// For a refresh, the value evictd wrote.
    pub(crate) refreshed: Option<String>,
    pub(crate) origin: OriginId,
    pub(crate) table: Arc<str>,
    /// The origin tables of the mappings the plan was made with: `origin`
    /// means something only under those (a reload makes new ones).
    pub(crate) made_with: Option<Arc<[Arc<str>]>>,
    /// The apply stamp written before the batch's commands.
    pub(crate) stamp: u64,
    pub(crate) checkpoint: Option<Checkpoint>,
    pub(crate) applied: Instant,
}

/// The apply task's side: stamps each batch and offers its keys to the
/// checker, never waiting for it.
pub struct Sampler {
    pub(crate) share: f64,
    pub(crate) stamp_key: String,
    /// The stamps written, above the one found in Redis.
    pub(crate) clock: crate::apply::StampClock,
    pub(crate) samples: mpsc::Sender<Sample>,
}

impl Sampler {
    /// Writes the next apply stamp, before a batch's commands.
    pub async fn write_stamp(&mut self, sink: &mut RedisSink) -> Result<u64, Error> {
        let stamp = self.clock.next(sink, &self.stamp_key).await?;
        sink.set(&self.stamp_key, &stamp.to_string()).await?;
        Ok(stamp)
    }

    /// Offers a share of the keys `plan` deleted or refreshed under
    /// `stamp`; a full queue drops them (counted).
    pub fn offer(&self, plan: &Plan, stamp: u64) {
        let mut rng = rand::rng();
        let applied = Instant::now();
        for command in &plan.commands {
            let (key, refreshed, origin) = match command {
                Command::Unlink { key, origin } => (key, None, *origin),
                Command::Set {
                    key, value, origin, ..
                } => (key, Some(value), *origin),
                _ => continue,
            };
            if !rng.random_bool(self.share) {
                continue;
            }
            let table = plan
                .tables
                .as_ref()
                .and_then(|tables| tables.get(origin.0 as usize).cloned())
                .unwrap_or_else(|| Arc::from("?"));
            let sample = Sample {
                key: key.clone(),
                refreshed: refreshed.cloned(),
                origin,
                table,
                made_with: plan.tables.clone(),
                stamp,
                checkpoint: plan.checkpoint.clone(),
                applied,
            };
            if self.samples.try_send(sample).is_err() {
                metrics::counter!(telemetry::CONSISTENCY_DROPPED).increment(1);
            }
        }
        metrics::gauge!(telemetry::CONSISTENCY_QUEUE)
            .set((self.samples.max_capacity() - self.samples.capacity()) as f64);
    }
}
