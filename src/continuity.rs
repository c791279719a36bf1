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
//! wiped, which empties the cache anyway) is not a loss.

use crate::change::Lsn;

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
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The slot continues where evictd left off.
    Continuous,
    /// Nothing remembered: nothing to compare with.
    FirstRun,
    /// Changes may be missing; the reason says why.
    Lost(String),
}

/// Decides whether a Kafka partition whose group committed `committed`
/// still holds everything from there: it holds `low..=high`. Pure.
#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
pub fn judge_offset(committed: i64, low: i64, high: i64) -> Verdict {
    if committed < low || committed > high {
        Verdict::Lost(format!(
            "committed offset {committed} is outside {low}..={high}: records were deleted before evictd read them"
        ))
    } else {
        Verdict::Continuous
    }
}

/// Decides whether the Postgres slot lost continuity. Pure.
pub fn judge(remembered: Option<&Remembered>, slot: &SlotState, system_id: &str) -> Verdict {
    let invalidated = matches!(slot, SlotState::Present { wal_status, .. } if wal_status == "lost");
    if invalidated {
        return Verdict::Lost(
            "the replication slot was invalidated (wal_status = lost): the WAL it needed was removed".into(),
        );
    }
    let Some(remembered) = remembered else {
        return Verdict::FirstRun;
    };
    if remembered.system_id != system_id {
        return Verdict::Lost(format!(
            "the database's system identifier changed from {} to {system_id}: it was replaced (restore, failover to a server without the slot)",
            remembered.system_id
        ));
    }
    match slot {
        SlotState::Missing => Verdict::Lost(format!(
            "the replication slot is gone; evictd had applied up to {}",
            remembered.applied
        )),
        SlotState::Present { confirmed_flush, .. } if *confirmed_flush > remembered.applied => Verdict::Lost(format!(
            "the replication slot is at {confirmed_flush}, past the {} evictd applied: it was recreated or consumed by someone else",
            remembered.applied
        )),
        SlotState::Present { .. } => Verdict::Continuous,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_committed_offset_outside_the_partition_is_lost_continuity() {
        assert_eq!(judge_offset(5, 0, 10), Verdict::Continuous);
        assert_eq!(judge_offset(0, 0, 0), Verdict::Continuous);
        assert_eq!(judge_offset(10, 0, 10), Verdict::Continuous);
        for (committed, low, high) in [(1000, 0, 2), (3, 4, 9)] {
            let Verdict::Lost(reason) = judge_offset(committed, low, high) else {
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
        }
    }

    #[test]
    fn verdicts() {
        assert_eq!(judge(None, &SlotState::Missing, "7301"), Verdict::FirstRun);
        assert_eq!(
            judge(None, &present(9, "reserved"), "7301"),
            Verdict::FirstRun
        );
        assert!(
            matches!(judge(None, &present(9, "lost"), "7301"), Verdict::Lost(_)),
            "lost WAL is lost, record or not"
        );
        assert_eq!(
            judge(Some(&remembered(10)), &present(9, "reserved"), "7301"),
            Verdict::Continuous
        );
        assert_eq!(
            judge(Some(&remembered(10)), &present(10, "extended"), "7301"),
            Verdict::Continuous
        );
        for (slot, system, reason) in [
            (SlotState::Missing, "7301", "slot is gone"),
            (present(5, "lost"), "7301", "invalidated"),
            (present(11, "reserved"), "7301", "recreated or consumed"),
            (present(5, "reserved"), "9999", "system identifier changed"),
        ] {
            match judge(Some(&remembered(10)), &slot, system) {
                Verdict::Lost(text) => assert!(text.contains(reason), "{text}"),
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
