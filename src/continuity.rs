//! Lost continuity: noticing that the source no longer holds every change
//! since the last one evictd applied, for both sources. What follows a loss
//! is the same for both: `Batcher::invalidate_everything` before anything
//! further is applied.
//!
//! Kafka ([`judge_offset`]): a group's committed offset outside what the
//! partition holds means records were deleted by retention before evictd
//! read them.
//!
//! Postgres ([`judge`]):
//! With each acknowledged batch evictd remembers, in Redis under
//! `evictd:slot:<slot>` (and the key prefix), the database's system
//! identifier and the end LSN it applied. Before streaming it compares that
//! record with the slot:
//!
//! - the slot is missing (dropped while evictd was down), or
//! - the slot is invalidated (`wal_status = 'lost'`: the WAL it needed is
//!   gone), or
//! - the slot's `confirmed_flush_lsn` is past the remembered position (it
//!   was recreated, or another consumer advanced it), or
//! - the system identifier differs (the database was replaced, e.g. restored
//!   or failed over to a server without the slot),
//!
//! then changes were lost: every mapped table is invalidated coarsely (as if
//! truncated) before streaming resumes, and it is logged at ERROR.
//!
//! The record is written in the same Redis pipeline as the batch it
//! describes, before the acknowledgement, so in normal operation the slot
//! never gets ahead of it. No record at all (the first run, or Redis was
//! wiped, which empties the cache anyway) is not a loss. The record is a
//! [`Store`], built with the pipeline and handed to the Postgres source
//! (which reads it and names the database) and to the sink (which writes
//! it through its [`Recorder`]).

use std::sync::Arc;

use redis::AsyncCommands as _;
use tokio::sync::watch;

use crate::change::{Checkpoint, Lsn};
use crate::config::RedisConfig;
use crate::error::Error;

/// What evictd remembers of the last applied position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remembered {
    pub system_id: String,
    pub applied: Lsn,
}

impl Remembered {
    /// The stored form: `<system id> <LSN>`.
    pub fn encode(system_id: &str, applied: Lsn) -> String {
        format!("{system_id} {applied}")
    }

    pub fn decode(text: &str) -> Option<Remembered> {
        let (system_id, applied) = text.split_once(' ')?;
        Some(Remembered {
            system_id: system_id.to_owned(),
            applied: Lsn::parse(applied)?,
        })
    }
}

/// The Redis key of the record (without the key prefix).
pub fn record_key(slot: &str) -> String {
    format!("{}{slot}", evictd_client::protocol::SLOT_RECORD_NAMESPACE)
}

/// What the catalog says about the slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotState {
    Missing,
    Present {
        confirmed_flush: Lsn,
        wal_status: String,
        /// Why Postgres invalidated it, in words (see [`invalidation`]),
        /// or `None` while it is usable.
        invalidated: Option<String>,
    },
}

impl SlotState {
    /// Why the slot can no longer be streamed from, if it cannot.
    pub fn invalidated(&self) -> Option<&str> {
        match self {
            SlotState::Present { invalidated, .. } => invalidated.as_deref(),
            SlotState::Missing => None,
        }
    }
}

/// Why Postgres invalidated a slot, in words, from `pg_replication_slots`:
/// `wal_status` (13+; `lost` once the WAL it needs is gone),
/// `invalidation_reason` (17+; `idle_timeout` from 18) and `conflicting`
/// (16+, a logical slot on a standby). `None` while the slot is usable.
pub fn invalidation(
    wal_status: &str,
    reason: Option<&str>,
    conflicting: Option<bool>,
) -> Option<String> {
    let words = match reason {
        Some("wal_removed") => {
            "the WAL it needed was removed (max_slot_wal_keep_size let the server drop it while nobody read the slot); invalidation_reason = wal_removed".to_owned()
        }
        Some("idle_timeout") => {
            "it was not read for longer than idle_replication_slot_timeout; invalidation_reason = idle_timeout".to_owned()
        }
        Some("rows_removed") => {
            "the primary removed rows it still needed (a conflict on a standby: hot_standby_feedback with a physical slot prevents it); invalidation_reason = rows_removed".to_owned()
        }
        Some("wal_level_insufficient") => {
            "wal_level on the primary fell below logical; invalidation_reason = wal_level_insufficient".to_owned()
        }
        Some(other) => format!("invalidation_reason = {other}"),
        None if wal_status == "lost" => {
            "the WAL it needed was removed (wal_status = lost: max_slot_wal_keep_size let the server drop it while nobody read the slot)".to_owned()
        }
        None if conflicting == Some(true) => {
            "it conflicted with recovery on this standby (the primary removed rows it needed, or its wal_level fell below logical)".to_owned()
        }
        None => return None,
    };
    Some(words)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Continuity {
    /// The slot continues where evictd left off.
    Continuous,
    /// Nothing remembered: nothing to compare with.
    FirstRun,
    /// Changes may be missing: `reason` says why in words, `cause` in one
    /// word (the `cause` label of `evictd_continuity_lost_total`).
    Lost { cause: &'static str, reason: String },
}

impl Continuity {
    pub fn lost(cause: &'static str, reason: String) -> Continuity {
        Continuity::Lost { cause, reason }
    }
}

/// Decides whether a Kafka partition whose group committed `committed`
/// still holds everything from there: it holds `low..=high`. Pure.
#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
pub fn judge_offset(committed: i64, low: i64, high: i64) -> Continuity {
    if committed < low || committed > high {
        Continuity::lost("offsets_removed", format!(
            "committed offset {committed} is outside {low}..={high}: records were deleted before evictd read them"
        ))
    } else {
        Continuity::Continuous
    }
}

/// Decides whether the Postgres slot lost continuity. Pure.
pub fn judge(remembered: Option<&Remembered>, slot: &SlotState, system_id: &str) -> Continuity {
    if let Some(cause) = slot.invalidated() {
        return Continuity::lost(
            "slot_invalidated",
            format!("the replication slot was invalidated: {cause}"),
        );
    }
    let Some(remembered) = remembered else {
        return Continuity::FirstRun;
    };
    if remembered.system_id != system_id {
        return Continuity::lost("database_replaced", format!(
            "the database's system identifier changed from {} to {system_id}: it was replaced (restore, failover to a server without the slot)",
            remembered.system_id
        ));
    }
    match slot {
        SlotState::Missing => Continuity::lost("slot_missing", format!(
            "the replication slot is gone; evictd had applied up to {}",
            remembered.applied
        )),
        SlotState::Present { confirmed_flush, .. } if *confirmed_flush > remembered.applied => Continuity::lost("slot_ahead", format!(
            "the replication slot is at {confirmed_flush}, past the {} evictd applied: it was recreated or consumed by someone else",
            remembered.applied
        )),
        SlotState::Present { .. } => Continuity::Continuous,
    }
}

/// The continuity record in Redis, shared by the Postgres source and the
/// sink: the source reads it before each session ([`Store::read`]) and
/// names the database it streams from ([`Store::name_database`]); the sink
/// writes each applied checkpoint into it through its [`Recorder`], in the
/// same round trip as the plan's commands.
#[derive(Clone)]
pub struct Store {
    /// The full key (prefix included).
    key: Arc<str>,
    redis: RedisConfig,
    /// The system identifier of the database the plans come from, once a
    /// session named it: until then nothing is recorded.
    database: Arc<watch::Sender<Option<String>>>,
}

impl Store {
    /// The record of `slot` in the Redis of `redis` (under its prefix).
    pub fn new(redis: &RedisConfig, slot: &str) -> Store {
        let key = format!("{}{}", redis.prefix, record_key(slot));
        Store::at(redis, key)
    }

    /// The record at `key`, a full key.
    pub fn at(redis: &RedisConfig, key: String) -> Store {
        Store {
            key: key.into(),
            redis: redis.clone(),
            database: Arc::new(watch::channel(None).0),
        }
    }

    /// What the record holds, reading over a connection of its own and
    /// retrying while Redis is away; the last error once `stop` turns true.
    /// Plans still in flight can only move the record on: every position
    /// acknowledged so far was recorded before it was acknowledged.
    pub async fn read(
        &self,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Option<Remembered>, Error> {
        let mut backoff = crate::apply::Backoff::default();
        loop {
            let read = async {
                let mut redis = crate::servers::connect_redis(&self.redis).await?;
                let text: Option<String> = redis
                    .get(&*self.key)
                    .await
                    .map_err(|e| Error::redis("cannot read the continuity record", e))?;
                Ok::<_, Error>(text.and_then(|text| Remembered::decode(&text)))
            };
            match read.await {
                Err(error) if error.is_transient() => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, retry_in = ?delay, "cannot read the continuity record from Redis; retrying");
                    tokio::select! {
                        _ = stop.wait_for(|stop| *stop) => return Err(error),
                        () = tokio::time::sleep(delay) => {}
                    }
                }
                result => return result,
            }
        }
    }

    /// From now on, each applied checkpoint is recorded as a position of
    /// the database with this system identifier.
    pub fn name_database(&self, system_id: &str) {
        self.database.send_replace(Some(system_id.to_owned()));
    }

    /// The database named last.
    pub fn database(&self) -> Option<String> {
        self.database.borrow().clone()
    }

    /// The sink's side.
    pub fn recorder(&self) -> Recorder {
        Recorder {
            key: self.key.clone(),
            database: self.database.subscribe(),
        }
    }
}

/// Writes the continuity record with each plan that acknowledges a WAL
/// position: the sink's side of a [`Store`].
#[derive(Clone)]
pub struct Recorder {
    key: Arc<str>,
    database: watch::Receiver<Option<String>>,
}

/// Sets the continuity record (`KEYS[1]`) to `ARGV[1]` unless it already holds
/// a later position of the same database: a batch applied again after a
/// reconnect must not move the record backwards, or the next start would
/// see the slot past it and call continuity lost.
const RECORD_SCRIPT: &str = r"
local current = redis.call('GET', KEYS[1])
if current then
  local held_system, held_hi, held_lo = string.match(current, '^(%S+) (%x+)/(%x+)$')
  local new_system, new_hi, new_lo = string.match(ARGV[1], '^(%S+) (%x+)/(%x+)$')
  if held_system and held_system == new_system then
    held_hi, held_lo = tonumber(held_hi, 16), tonumber(held_lo, 16)
    new_hi, new_lo = tonumber(new_hi, 16), tonumber(new_lo, 16)
    if held_hi > new_hi or (held_hi == new_hi and held_lo > new_lo) then
      return 0
    end
  end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
";

impl Recorder {
    /// The full key the record is written to.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The record's value for a plan that acknowledges `checkpoint`: only a
    /// WAL position (the record is the Postgres source's), once the
    /// database was named.
    pub fn value(&self, checkpoint: Option<&Checkpoint>) -> Option<String> {
        let Checkpoint::Lsn(lsn) = checkpoint? else {
            return None;
        };
        let database = self.database.borrow();
        Some(Remembered::encode(database.as_deref()?, *lsn))
    }

    /// Appends the write of the record for a plan that acknowledges
    /// `checkpoint` (nothing without one). The record only moves forwards.
    pub fn append(&self, checkpoint: Option<&Checkpoint>, pipe: &mut redis::Pipeline) {
        if let Some(value) = self.value(checkpoint) {
            pipe.cmd("EVAL")
                .arg(RECORD_SCRIPT)
                .arg(1)
                .arg(&*self.key)
                .arg(value)
                .ignore();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_committed_offset_outside_the_partition_is_lost_continuity() {
        assert_eq!(judge_offset(5, 0, 10), Continuity::Continuous);
        assert_eq!(judge_offset(0, 0, 0), Continuity::Continuous);
        assert_eq!(judge_offset(10, 0, 10), Continuity::Continuous);
        for (committed, low, high) in [(1000, 0, 2), (3, 4, 9)] {
            let Continuity::Lost { reason, .. } = judge_offset(committed, low, high) else {
                panic!("{committed} outside {low}..={high} is a loss");
            };
            assert!(
                reason.contains(&format!("{committed} is outside {low}..={high}")),
                "{reason}"
            );
        }
    }

    fn remembered(lsn: u64) -> Remembered {
        Remembered {
            system_id: "7301".into(),
            applied: Lsn(lsn),
        }
    }

    fn present(lsn: u64, wal_status: &str) -> SlotState {
        SlotState::Present {
            confirmed_flush: Lsn(lsn),
            wal_status: wal_status.into(),
            invalidated: invalidation(wal_status, None, None),
        }
    }

    #[test]
    fn invalidations_are_named_by_their_cause() {
        let cases = [
            ("reserved", None, None, None),
            ("extended", None, Some(false), None),
            ("lost", None, None, Some("wal_status = lost")),
            (
                "lost",
                Some("wal_removed"),
                None,
                Some("max_slot_wal_keep_size"),
            ),
            (
                "lost",
                Some("idle_timeout"),
                None,
                Some("idle_replication_slot_timeout"),
            ),
            (
                "reserved",
                Some("rows_removed"),
                Some(true),
                Some("hot_standby_feedback"),
            ),
            (
                "reserved",
                Some("wal_level_insufficient"),
                Some(true),
                Some("wal_level"),
            ),
            (
                "reserved",
                None,
                Some(true),
                Some("conflicted with recovery"),
            ),
            (
                "reserved",
                Some("something_new"),
                None,
                Some("invalidation_reason = something_new"),
            ),
        ];
        for (wal_status, reason, conflicting, words) in cases {
            let found = invalidation(wal_status, reason, conflicting);
            match (words, &found) {
                (None, None) => {}
                (Some(words), Some(found)) => assert!(found.contains(words), "{found}"),
                _ => panic!("{wal_status} {reason:?} {conflicting:?}: {found:?}"),
            }
        }
        let idle = SlotState::Present {
            confirmed_flush: Lsn(5),
            wal_status: "lost".into(),
            invalidated: invalidation("lost", Some("idle_timeout"), None),
        };
        match judge(Some(&remembered(10)), &idle, "7301") {
            Continuity::Lost { reason: text, .. } => {
                assert!(text.contains("idle_replication_slot_timeout"), "{text}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn verdicts() {
        assert_eq!(
            judge(None, &SlotState::Missing, "7301"),
            Continuity::FirstRun
        );
        assert_eq!(
            judge(None, &present(9, "reserved"), "7301"),
            Continuity::FirstRun
        );
        assert!(
            matches!(
                judge(None, &present(9, "lost"), "7301"),
                Continuity::Lost { .. }
            ),
            "lost WAL is lost, record or not"
        );
        assert_eq!(
            judge(Some(&remembered(10)), &present(9, "reserved"), "7301"),
            Continuity::Continuous
        );
        assert_eq!(
            judge(Some(&remembered(10)), &present(10, "extended"), "7301"),
            Continuity::Continuous
        );
        for (slot, system, reason) in [
            (SlotState::Missing, "7301", "slot is gone"),
            (present(5, "lost"), "7301", "invalidated"),
            (present(11, "reserved"), "7301", "recreated or consumed"),
            (present(5, "reserved"), "9999", "system identifier changed"),
        ] {
            match judge(Some(&remembered(10)), &slot, system) {
                Continuity::Lost { reason: text, .. } => assert!(text.contains(reason), "{text}"),
                other => panic!("{slot:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn records_round_trip() {
        let text = Remembered::encode("7301", Lsn(0x16B3748));
        assert_eq!(text, "7301 0/16B3748");
        assert_eq!(Remembered::decode(&text), Some(remembered(0x16B3748)));
        assert_eq!(Remembered::decode("garbage"), None);
    }
}
