//! The running pipeline: source -> map -> plan -> apply -> broadcast -> ack.
//!
//! Two tasks joined by a bounded channel of plans:
//! - the replication task ([`replication`]) reads the slot, decodes, maps
//!   and plans ([`batcher`]), and sends standby status updates;
//! - the apply task ([`crate::apply`]) sends each plan to Redis with its L1
//!   broadcast, retrying until it succeeds, and publishes [`Progress`].
//!
//! Acknowledgement is a value flowing back (a `watch` of [`Progress`]),
//! never a side effect of reading.

pub mod batcher;
pub mod replication;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use self::batcher::{BatchLimits, Batcher};
use self::replication::{Ended, Replication};
use crate::apply::broadcast::Broadcast;
use crate::apply::{self, Progress, RedisSink};
use crate::change::Lsn;
use crate::config::Config;
use crate::error::{Error, ErrorKind};
use crate::lag::LagHistogram;
use crate::mapping::Mappings;
use crate::source::postgres::changes::ChangeDecoder;
use crate::source::postgres::conn::ReplicationConnection;
use crate::source::postgres::slot;

/// Plans queued between the replication and apply tasks.
const PLAN_CHANNEL_CAPACITY: usize = 4;

/// Knobs that are not in the config file.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// How often a standby status update is sent (and a keepalive asked for).
    pub status_interval: Duration,
    /// Buffered actions per streamed transaction before it goes coarse.
    pub max_pending_keys: usize,
    /// Stop once everything up to this position is applied.
    pub until: Option<Lsn>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            status_interval: Duration::from_secs(1),
            max_pending_keys: 100_000,
            until: None,
        }
    }
}

/// A running pipeline.
pub struct Running {
    /// What apply has finished.
    pub progress: watch::Receiver<Progress>,
    /// The flush position last reported to the server.
    pub acked: watch::Receiver<Lsn>,
    pub lag: Arc<Mutex<LagHistogram>>,
    pub epoch: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<Ended, Error>>,
}

impl Running {
    /// Asks the pipeline to stop: it finishes or abandons the batch in
    /// flight and sends a final status update.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Waits for the pipeline to end.
    pub async fn wait(self) -> Result<Ended, Error> {
        match self.task.await {
            Ok(result) => result,
            Err(join) => Err(Error::with_source(
                ErrorKind::Shutdown,
                "the pipeline task failed",
                join,
            )),
        }
    }
}

/// Connects everything and starts the tasks on the current runtime.
pub async fn start(
    config: &Config,
    mappings: Arc<Mappings>,
    options: Options,
) -> Result<Running, Error> {
    let url = config
        .postgres
        .url
        .clone()
        .ok_or_else(|| Error::new(ErrorKind::Config, "postgres.url is not set"))?;
    let created = slot::ensure(&config.postgres, &url, &mappings).await?;
    if created {
        tracing::info!(slot = %config.postgres.slot, "streaming from a new slot: changes before now are not replayed");
    }
    let mut conn = ReplicationConnection::connect(url.expose()).await?;
    let command = slot::start_command(
        &config.postgres.slot,
        &config.postgres.publication,
        conn.server_version(),
    );
    conn.start_replication(&command).await?;
    tracing::info!(slot = %config.postgres.slot, server_version = conn.server_version(), "streaming started");

    let broadcast = Broadcast::new(&config.redis.l1_channel);
    let epoch = broadcast.epoch().to_owned();
    let sink = RedisSink::new(config.redis.url.expose(), &config.redis.prefix, broadcast)?;
    let (plans_tx, plans_rx) = mpsc::channel(PLAN_CHANNEL_CAPACITY);
    let (progress_tx, progress_rx) = watch::channel(Progress::default());
    let (acked_tx, acked_rx) = watch::channel(Lsn(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let lag = Arc::new(Mutex::new(LagHistogram::default()));

    let apply_task = tokio::spawn(apply::run(
        sink,
        plans_rx,
        progress_tx,
        lag.clone(),
        stop_rx.clone(),
    ));
    let replication = Replication {
        conn,
        decoder: ChangeDecoder::new(mappings.clone()),
        batcher: Batcher::new(
            mappings,
            BatchLimits {
                max_keys: config.batch.max_keys,
                max_pending_keys: options.max_pending_keys,
            },
        ),
        plans: plans_tx,
        progress: progress_rx.clone(),
        acked: acked_tx,
        max_wait: Duration::from_millis(config.batch.max_wait_ms),
        status_interval: options.status_interval,
        until: options.until,
    };
    let task = tokio::spawn(async move {
        let ended = replication.run(stop_rx).await;
        let applied = apply_task.await;
        match (ended, applied) {
            (Err(error), _) | (Ok(_), Ok(Err(error))) => Err(error),
            (Ok(_), Err(join)) => Err(Error::with_source(
                ErrorKind::Shutdown,
                "the apply task failed",
                join,
            )),
            (Ok(ended), Ok(Ok(()))) => Ok(ended),
        }
    });
    Ok(Running {
        progress: progress_rx,
        acked: acked_rx,
        lag,
        epoch,
        stop: stop_tx,
        task,
    })
}
