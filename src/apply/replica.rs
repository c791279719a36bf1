//! Read replicas: each batch is invalidated a second time once every
//! replica applications read from has replayed it.
//!
//! A replica shows a commit only once it has replayed it. A reader that
//! misses there before then loads the old row and fills the cache with it
//! after evictd's (first) invalidation. So every applied batch with
//! invalidations is held with the primary's WAL position at which it was
//! visible there (the visibility gate reads it), and its invalidations,
//! broadcast included, are applied again once every replica's
//! `pg_last_wal_replay_lsn()` has reached that position. A fill that read
//! the old row from a replica is then deleted, and a fenced fill that had
//! not landed yet loses its lease. Refreshed keys are not written again:
//! they already hold the new row, and a fenced fill cannot replace a value.
//!
//! Batches are acknowledged only once their second invalidation is
//! applied, in order, so a restart loses none. What is held is bounded:
//! past `postgres.replica_pending_keys` keys, a held batch's exact keys
//! turn into the pattern of their family (counted in
//! `evictd_replica_folded_keys_total`), and a batch waits at most
//! `postgres.replica_max_wait_ms`, after which its second invalidation is
//! applied anyway. A replica that cannot be reached or stays behind is
//! named on `/readyz`, in the log and in `evictd_replica_*`: never a
//! silent wait.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use indexmap::IndexSet;
use tokio::sync::watch;

use crate::change::Lsn;
use crate::config::ReplicaConfig;
use crate::plan::{Command, Plan};
use crate::telemetry;

/// How often a replica is asked while it is short of the wanted position.
const BUSY_POLL: Duration = Duration::from_millis(5);
/// How often it is asked otherwise, to know that it answers.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// Most batches held; past it, apply takes no new batch until the oldest
/// is released (each holds at least its progress).
const MAX_HELD_BATCHES: usize = 10_000;

/// The batches held for their second invalidation, oldest first, each with
/// what apply does once it is released (`T`).
pub struct Replicas<T> {
    /// The position the oldest held batch waits for.
    wanted: watch::Sender<u64>,
    /// The lowest position every replica has replayed.
    replayed: watch::Receiver<u64>,
    held: VecDeque<Held<T>>,
    held_keys: usize,
    max_keys: usize,
    max_wait: Duration,
}

struct Held<T> {
    /// The primary's position at which the batch was visible.
    position: Option<u64>,
    /// The invalidations to apply again (`None`: none, only its turn).
    again: Option<Plan>,
    /// Keys, tags and counters `again` holds one by one.
    keys: usize,
    since: Instant,
    then: T,
}

/// Why a held batch is released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// Every replica has replayed it.
    Replayed,
    /// `postgres.replica_max_wait_ms` passed first.
    TimedOut,
}

impl Release {
    fn as_str(self) -> &'static str {
        match self {
            Release::Replayed => "replayed",
            Release::TimedOut => "timed_out",
        }
    }
}

/// What apply needs to hold batches for the replicas.
pub struct Setup {
    pub replicas: Vec<ReplicaConfig>,
    pub max_wait: Duration,
    pub max_keys: usize,
    /// Why readiness fails (`None`: every replica keeps up).
    pub state: watch::Sender<Option<String>>,
}

impl Setup {
    pub fn new(
        config: &crate::config::PostgresConfig,
        state: watch::Sender<Option<String>>,
    ) -> Option<Setup> {
        (!config.replicas.is_empty()).then(|| Setup {
            replicas: config.replicas.clone(),
            max_wait: Duration::from_millis(config.replica_max_wait_ms),
            max_keys: config.replica_pending_keys,
            state,
        })
    }
}

impl<T> Replicas<T> {
    /// Starts watching the replicas' replay positions (until this is
    /// dropped).
    pub fn start(setup: Setup) -> Replicas<T> {
        let Setup {
            replicas,
            max_wait,
            max_keys,
            state,
        } = setup;
        let (wanted, wanted_rx) = watch::channel(0);
        let (replayed_tx, replayed) = watch::channel(0);
        let watched = replicas.iter().map(Watched::new).collect();
        tokio::spawn(watch_replicas(
            watched,
            wanted_rx,
            replayed_tx,
            state,
            max_wait,
        ));
        Replicas {
            wanted,
            replayed,
            held: VecDeque::new(),
            held_keys: 0,
            max_keys,
            max_wait,
        }
    }

    /// Whether apply should take no new batch until one is released.
    pub fn is_full(&self) -> bool {
        self.held.len() >= MAX_HELD_BATCHES
    }

    /// Whether a batch is held.
    pub fn is_holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// Holds `plan`, applied once, until the replicas have replayed
    /// `position`; `then` is handed back when it is released.
    /// Holds a batch whose second invalidation is `again` (see
    /// [`second_pass`]) until the replicas replayed `position`.
    pub fn hold(&mut self, mut again: Option<Plan>, position: Option<u64>, then: T) {
        let mut keys = again.as_ref().map_or(0, exact_count);
        if keys > 0 && self.held_keys + keys > self.max_keys {
            if let Some(again) = again.as_mut() {
                let folded = fold(again);
                metrics::counter!(telemetry::REPLICA_FOLDED_KEYS).increment(folded as u64);
                keys -= folded;
            }
        }
        self.held_keys += keys;
        #[allow(clippy::cast_precision_loss)]
        metrics::gauge!(telemetry::REPLICA_HELD_KEYS).set(self.held_keys as f64);
        self.held.push_back(Held {
            position,
            again,
            keys,
            since: Instant::now(),
            then,
        });
    }

    /// Waits until the oldest held batch may be released (never, when
    /// none is held). Cancel-safe: nothing changes until [`Self::release`].
    pub async fn due(&mut self) -> Release {
        let Some(head) = self.held.front() else {
            return std::future::pending().await;
        };
        let (Some(position), Some(_)) = (head.position, &head.again) else {
            // Nothing to apply again: only its turn to be acknowledged.
            return Release::Replayed;
        };
        let deadline = tokio::time::Instant::from_std(head.since + self.max_wait);
        self.wanted.send_if_modified(|wanted| {
            let changed = *wanted != position;
            *wanted = position;
            changed
        });
        tokio::select! {
            replayed = self.replayed.wait_for(|replayed| *replayed >= position) => {
                // The watcher only ends when this is dropped.
                if replayed.is_ok() { Release::Replayed } else { Release::TimedOut }
            }
            () = tokio::time::sleep_until(deadline) => Release::TimedOut,
        }
    }

    /// The oldest held batch: what to apply again, and its `then`.
    pub fn release(&mut self, why: Release) -> Option<(Option<Plan>, T)> {
        let held = self.held.pop_front()?;
        self.held_keys -= held.keys;
        #[allow(clippy::cast_precision_loss)]
        metrics::gauge!(telemetry::REPLICA_HELD_KEYS).set(self.held_keys as f64);
        if held.again.is_some() {
            metrics::counter!(telemetry::REPLICA_INVALIDATIONS, "outcome" => why.as_str())
                .increment(1);
            if why == Release::TimedOut {
                tracing::warn!(
                    waited = ?held.since.elapsed(),
                    position = %held.position.map(Lsn).map_or_else(|| "?".to_owned(), |lsn| lsn.to_string()),
                    "a batch's second invalidation is applied before every replica replayed it (postgres.replica_max_wait_ms passed): a reader on a late replica may still refill an old row"
                );
            }
        }
        Some((held.again, held.then))
    }
}

/// What a second invalidation applies: the plan's invalidations, without
/// its refreshes (their keys hold the new row), progress or purges.
pub fn second_pass(plan: &Plan) -> Option<Plan> {
    let commands: Vec<Command> = plan
        .commands
        .iter()
        .filter(|command| !matches!(command, Command::Set { .. }))
        .cloned()
        .collect();
    if commands.is_empty() {
        return None;
    }
    Some(Plan {
        commands,
        tables: plan.tables.clone(),
        families: plan.families.clone(),
        ..Plan::default()
    })
}

/// Keys, tags and counters held one by one.
fn exact_count(plan: &Plan) -> usize {
    plan.commands
        .iter()
        .filter(|command| {
            matches!(
                command,
                Command::Unlink { .. } | Command::InvalidateTag { .. } | Command::Bump { .. }
            )
        })
        .count()
}

/// Turns the plan's exact keys, tags and counters into the patterns of
/// their families, once each; returns how many it turned. Those of an
/// origin without a template (a SQL message) stay.
fn fold(plan: &mut Plan) -> usize {
    let Some(families) = plan.families.clone() else {
        return 0;
    };
    let family = |origin: crate::mapping::OriginId| -> Option<String> {
        families
            .get(origin.0 as usize)
            .and_then(Option::as_deref)
            .map(str::to_owned)
    };
    let mut folded = 0;
    let mut seen: IndexSet<(u8, String)> = IndexSet::new();
    let mut commands = Vec::with_capacity(plan.commands.len());
    for command in std::mem::take(&mut plan.commands) {
        let turned = match &command {
            Command::Unlink { origin, .. } => family(*origin).map(|pattern| {
                (
                    0,
                    Command::UnlinkMatching {
                        pattern,
                        origin: *origin,
                        coarse: true,
                        prefix: false,
                    },
                )
            }),
            Command::InvalidateTag { origin, .. } => family(*origin).map(|pattern| {
                (
                    1,
                    Command::InvalidateTagsMatching {
                        pattern,
                        origin: *origin,
                        coarse: true,
                    },
                )
            }),
            Command::Bump { origin, .. } => family(*origin).map(|pattern| {
                (
                    2,
                    Command::BumpMatching {
                        pattern,
                        origin: *origin,
                        coarse: true,
                    },
                )
            }),
            _ => None,
        };
        match turned {
            Some((kind, matching)) => {
                folded += 1;
                let pattern = match &matching {
                    Command::UnlinkMatching { pattern, .. }
                    | Command::InvalidateTagsMatching { pattern, .. }
                    | Command::BumpMatching { pattern, .. } => pattern.clone(),
                    _ => String::new(),
                };
                if seen.insert((kind, pattern)) {
                    commands.push(matching);
                }
            }
            None => commands.push(command),
        }
    }
    plan.commands = commands;
    folded
}

/// One replica, as the watcher sees it.
struct Watched {
    config: ReplicaConfig,
    client: Option<tokio_postgres::Client>,
    /// What it last said it replayed.
    replayed: u64,
    /// Why it could not be asked, the last time.
    error: Option<String>,
    /// Since when it is short of the wanted position.
    behind_since: Option<Instant>,
}

impl Watched {
    fn new(config: &ReplicaConfig) -> Watched {
        metrics::gauge!(telemetry::REPLICA_UP, "replica" => config.name.clone()).set(0.0);
        metrics::gauge!(telemetry::REPLICA_WAIT, "replica" => config.name.clone()).set(0.0);
        metrics::gauge!(telemetry::REPLICA_BEHIND, "replica" => config.name.clone()).set(0.0);
        Watched {
            config: config.clone(),
            client: None,
            replayed: 0,
            error: None,
            behind_since: None,
        }
    }

    /// Asks the replica how far it has replayed.
    async fn poll(&mut self) {
        match self.replay_position().await {
            Ok(position) => {
                if self.error.take().is_some() {
                    tracing::info!(replica = %self.config.name, "read replica answers again");
                }
                self.replayed = self.replayed.max(position);
            }
            Err(error) => {
                self.client = None;
                if self.error.is_none() {
                    tracing::warn!(replica = %self.config.name, %error, "cannot read the replay position of a read replica; second invalidations wait for it");
                }
                self.error = Some(error);
            }
        }
        let up = if self.error.is_none() { 1.0 } else { 0.0 };
        metrics::gauge!(telemetry::REPLICA_UP, "replica" => self.config.name.clone()).set(up);
    }

    async fn replay_position(&mut self) -> Result<u64, String> {
        if self.client.is_none() {
            let client = crate::catalog::connect(&self.config.url)
                .await
                .map_err(|e| e.to_string())?;
            self.client = Some(client);
        }
        let client = self.client.as_ref().ok_or("no connection")?;
        let row = client
            .query_one("select pg_last_wal_replay_lsn()::text", &[])
            .await
            .map_err(|e| e.to_string())?;
        let Some(text) = row.get::<_, Option<String>>(0) else {
            return Err(format!(
                "{} is not a standby (pg_last_wal_replay_lsn() is null): name the replicas applications read from",
                self.config.url
            ));
        };
        Lsn::parse(&text)
            .map(|lsn| lsn.0)
            .ok_or_else(|| format!("unexpected replay position `{text}`"))
    }

    /// Why it holds batches, if it does so long that readiness fails.
    fn reason(&mut self, wanted: u64, max_wait: Duration) -> Option<String> {
        let name = &self.config.name;
        let behind = wanted.saturating_sub(self.replayed);
        if behind == 0 {
            self.behind_since = None;
        } else if self.behind_since.is_none() {
            self.behind_since = Some(Instant::now());
        }
        let waited = self
            .behind_since
            .map_or(Duration::ZERO, |since| since.elapsed());
        metrics::gauge!(telemetry::REPLICA_WAIT, "replica" => name.clone())
            .set(waited.as_secs_f64());
        #[allow(clippy::cast_precision_loss)]
        metrics::gauge!(telemetry::REPLICA_BEHIND, "replica" => name.clone()).set(behind as f64);
        if let Some(error) = &self.error {
            return Some(format!(
                "replica {name} cannot be asked how far it replayed: {error}"
            ));
        }
        (waited >= max_wait).then(|| {
            format!(
                "replica {name} has replayed to {}, short of {} that a batch has waited for for {} ms",
                Lsn(self.replayed),
                Lsn(wanted),
                waited.as_millis()
            )
        })
    }
}

/// Polls every replica: often while one is short of `wanted`, every
/// [`IDLE_POLL`] otherwise; publishes the lowest replayed position and why
/// readiness fails. Ends when the [`Replicas`] is dropped.
async fn watch_replicas(
    mut replicas: Vec<Watched>,
    mut wanted: watch::Receiver<u64>,
    replayed: watch::Sender<u64>,
    state: watch::Sender<Option<String>>,
    max_wait: Duration,
) {
    loop {
        for replica in &mut replicas {
            replica.poll().await;
        }
        let target = *wanted.borrow_and_update();
        let lowest = replicas
            .iter()
            .map(|r| r.replayed)
            .min()
            .unwrap_or(u64::MAX);
        replayed.send_if_modified(|current| {
            let changed = *current != lowest;
            *current = lowest;
            changed
        });
        let reasons: Vec<String> = replicas
            .iter_mut()
            .filter_map(|replica| replica.reason(target, max_wait))
            .collect();
        let reason = (!reasons.is_empty()).then(|| reasons.join("; "));
        state.send_if_modified(|current| {
            let changed = *current != reason;
            current.clone_from(&reason);
            changed
        });
        let pause = if lowest < target {
            BUSY_POLL
        } else {
            IDLE_POLL
        };
        tokio::select! {
            changed = wanted.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(pause) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::mapping::OriginId;

    fn plan(commands: Vec<Command>) -> Plan {
        let families: Arc<[Option<Arc<str>>]> =
            vec![Some("order:*".into()), Some("user:*".into()), None].into();
        Plan {
            commands,
            families: Some(families),
            ..Plan::default()
        }
    }

    fn unlink(key: &str, origin: u32) -> Command {
        Command::Unlink {
            key: key.into(),
            origin: OriginId(origin),
        }
    }

    #[test]
    fn a_second_pass_applies_the_invalidations_but_not_the_refreshes() {
        let refresh = Command::Set {
            key: "order:1:json".into(),
            value: "{}".into(),
            ttl: None,
            origin: OriginId(0),
        };
        let again = second_pass(&plan(vec![unlink("order:1", 0), refresh])).unwrap();
        assert_eq!(again.commands, vec![unlink("order:1", 0)]);
        assert_eq!(again.checkpoint, None);
        let refresh_only = Command::Set {
            key: "order:1:json".into(),
            value: "{}".into(),
            ttl: None,
            origin: OriginId(0),
        };
        assert_eq!(second_pass(&plan(vec![refresh_only])), None);
    }

    #[test]
    fn folding_turns_exact_keys_into_their_family_once() {
        let mut again = plan(vec![
            unlink("order:1", 0),
            unlink("order:2", 0),
            Command::InvalidateTag {
                tag: "user:7".into(),
                origin: OriginId(1),
            },
            // A SQL message's key has no family: it stays.
            unlink("anything", 2),
        ]);
        assert_eq!(exact_count(&again), 4);
        assert_eq!(fold(&mut again), 3);
        assert_eq!(
            again.commands,
            vec![
                Command::UnlinkMatching {
                    pattern: "order:*".into(),
                    origin: OriginId(0),
                    coarse: true,
                    prefix: false,
                },
                Command::InvalidateTagsMatching {
                    pattern: "user:*".into(),
                    origin: OriginId(1),
                    coarse: true,
                },
                unlink("anything", 2),
            ]
        );
        assert_eq!(exact_count(&again), 1);
    }
}
