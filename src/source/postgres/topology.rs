//! Where evictd's slot lives and what keeps it through a failover: the
//! server's role (primary or hot standby), the slot's failover and synced
//! flags (PostgreSQL 17+), and the settings a failover slot or decoding on
//! a standby (PostgreSQL 16+) needs. Read once ([`Topology::read`]) and
//! judged without IO ([`Topology::findings`]) for `run`, `check` and
//! `status`.

use crate::error::{Error, ErrorKind};

/// The first version that decodes on a hot standby.
const STANDBY_DECODING: u32 = 160_000;
/// The first version with failover slots.
const FAILOVER_SLOTS: u32 = 170_000;

/// What the server says of its role, evictd's slot and its standbys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    /// `server_version_num`.
    pub version: u32,
    /// `pg_is_in_recovery()`: a hot standby.
    pub in_recovery: bool,
    /// The slot's `failover` flag (17+); `None` when it does not exist.
    pub slot_failover: Option<bool>,
    /// The slot is synchronised from the primary (`synced`, 17+): this
    /// server is a standby that keeps the primary's failover slot.
    pub slot_synced: bool,
    /// `synchronized_standby_slots` (17+), split.
    pub standby_slots: Vec<String>,
    /// The physical slots on this server.
    pub physical_slots: Vec<PhysicalSlot>,
    /// `hot_standby_feedback` (read on a standby).
    pub hot_standby_feedback: bool,
    /// `primary_slot_name` (read on a standby).
    pub primary_slot_name: String,
    /// `sync_replication_slots` (17+, read on a standby).
    pub sync_replication_slots: bool,
}

/// A physical replication slot: a standby streams through it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhysicalSlot {
    pub name: String,
    /// A standby streams through it now.
    pub active: bool,
    /// It carries the standby's `hot_standby_feedback` (its `xmin` is set).
    pub feedback: bool,
}

/// One thing [`Topology::findings`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub message: String,
    pub help: String,
    /// `run` cannot stream this way: it stops with the message. Otherwise
    /// it streams, and the finding is a problem for `check` and a warning
    /// for `run` and `status`.
    pub blocking: bool,
}

impl Finding {
    fn blocking(message: String, help: impl Into<String>) -> Finding {
        Finding {
            message,
            help: help.into(),
            blocking: true,
        }
    }

    fn problem(message: String, help: impl Into<String>) -> Finding {
        Finding {
            message,
            help: help.into(),
            blocking: false,
        }
    }
}

impl Topology {
    /// Reads the server's role, `slot` and the settings that concern it.
    pub async fn read(client: &tokio_postgres::Client, slot: &str) -> Result<Topology, Error> {
        let query_error = |e| Error::postgres("cannot read the server's replication setup", e);
        let row = client
            .query_one(
                // current_setting(.., true) is NULL for a setting this
                // version lacks; to_jsonb reads columns it may lack.
                "select current_setting('server_version_num')::int, pg_is_in_recovery(),
                        (select (to_jsonb(s) ->> 'failover')::bool from pg_replication_slots s where slot_name = $1),
                        exists (select 1 from pg_replication_slots s where slot_name = $1 and (to_jsonb(s) ->> 'synced')::bool),
                        coalesce(current_setting('synchronized_standby_slots', true), ''),
                        current_setting('hot_standby_feedback')::bool,
                        current_setting('primary_slot_name'),
                        coalesce(current_setting('sync_replication_slots', true), 'off')::bool",
                &[&slot],
            )
            .await
            .map_err(query_error)?;
        let physical = client
            .query(
                "select slot_name::text, active, xmin is not null from pg_replication_slots
                 where slot_type = 'physical' order by slot_name",
                &[],
            )
            .await
            .map_err(query_error)?;
        let version: i32 = row.get(0);
        let standby_slots: String = row.get(4);
        Ok(Topology {
            version: u32::try_from(version).unwrap_or(0),
            in_recovery: row.get(1),
            slot_failover: row.get(2),
            slot_synced: row.get(3),
            standby_slots: standby_slots
                .split(',')
                .map(|name| name.trim().trim_matches('"').to_owned())
                .filter(|name| !name.is_empty())
                .collect(),
            physical_slots: physical
                .iter()
                .map(|row| PhysicalSlot {
                    name: row.get(0),
                    active: row.get(1),
                    feedback: row.get(2),
                })
                .collect(),
            hot_standby_feedback: row.get(5),
            primary_slot_name: row.get(6),
            sync_replication_slots: row.get(7),
        })
    }

    /// The server's role and the slot's flags, in a line for `status`.
    pub fn describe(&self, slot: &str) -> String {
        let role = if self.in_recovery {
            "a hot standby"
        } else {
            "the primary"
        };
        let slot_words = match (self.slot_failover, self.slot_synced) {
            (None, _) => String::new(),
            (Some(_), true) => format!(", slot {slot} synchronised from the primary"),
            (Some(true), false) => format!(", slot {slot} is a failover slot"),
            (Some(false), false) if self.version >= FAILOVER_SLOTS => {
                format!(", slot {slot} is not a failover slot")
            }
            (Some(false), false) => String::new(),
        };
        let standbys = if self.standby_slots.is_empty() {
            String::new()
        } else {
            format!(
                ", synchronized_standby_slots = {}",
                self.standby_slots.join(",")
            )
        };
        format!(
            "server: {role} (PostgreSQL {}){slot_words}{standbys}",
            version_words(self.version)
        )
    }

    /// What stands in the way of streaming from this server with
    /// `failover_slot` as configured, and of the slot outliving a failover.
    /// Pure.
    pub fn findings(&self, slot: &str, failover_slot: bool) -> Vec<Finding> {
        if self.in_recovery {
            self.standby_findings(slot, failover_slot)
        } else {
            self.primary_findings(failover_slot)
        }
    }

    fn primary_findings(&self, failover_slot: bool) -> Vec<Finding> {
        let mut findings = Vec::new();
        if !failover_slot {
            return findings;
        }
        if self.version < FAILOVER_SLOTS {
            findings.push(Finding::blocking(
                format!(
                    "postgres.failover_slot needs PostgreSQL 17 or later; the server is {}",
                    version_words(self.version)
                ),
                "set postgres.failover_slot = false: a failover then loses the slot, and evictd invalidates every mapped table on the promoted server",
            ));
            return findings;
        }
        let names = self
            .physical_slots
            .iter()
            .map(|slot| slot.name.as_str())
            .collect::<Vec<_>>()
            .join(",");
        if self.standby_slots.is_empty() {
            findings.push(Finding::problem(
                "synchronized_standby_slots is empty: evictd can read a commit no standby has received yet, and a failover that loses the commit leaves caches filled from it".to_owned(),
                if names.is_empty() {
                    "give each standby a physical slot (primary_slot_name) and name it: ALTER SYSTEM SET synchronized_standby_slots = '<slot>'; SELECT pg_reload_conf();".to_owned()
                } else {
                    format!("ALTER SYSTEM SET synchronized_standby_slots = '{names}'; SELECT pg_reload_conf(); (the physical slots on this server)")
                },
            ));
        }
        for name in &self.standby_slots {
            match self.physical_slots.iter().find(|slot| &slot.name == name) {
                None => findings.push(Finding::problem(
                    format!("synchronized_standby_slots names `{name}`, which is not a physical slot on this server"),
                    if names.is_empty() {
                        "name the physical slot each standby streams through (its primary_slot_name)".to_owned()
                    } else {
                        format!("the physical slots here are {names}")
                    },
                )),
                Some(slot) if !slot.active => findings.push(Finding::problem(
                    format!("no standby streams through `{name}` (in synchronized_standby_slots): the primary holds evictd's changes back until it does, and the slot cannot follow a failover to it"),
                    "start the standby, or take the slot out of synchronized_standby_slots",
                )),
                Some(slot) if !slot.feedback => findings.push(Finding::problem(
                    format!("the standby streaming through `{name}` has hot_standby_feedback off: the primary can remove rows the synchronised slot still needs, and the standby then invalidates it"),
                    "on that standby: ALTER SYSTEM SET hot_standby_feedback = on; SELECT pg_reload_conf();",
                )),
                Some(_) => {}
            }
        }
        findings
    }

    fn standby_findings(&self, slot: &str, failover_slot: bool) -> Vec<Finding> {
        let mut findings = Vec::new();
        if self.slot_synced {
            findings.push(Finding::blocking(
                format!("slot `{slot}` on this standby is synchronised from the primary (a failover slot): it can be read only once this standby is promoted"),
                "point postgres.url at the primary (a URL listing both hosts with target_session_attrs=read-write follows a failover)",
            ));
            if !self.sync_replication_slots {
                findings.push(Finding::problem(
                    "sync_replication_slots is off on this standby: the slot it keeps is no longer synchronised".to_owned(),
                    "ALTER SYSTEM SET sync_replication_slots = on; SELECT pg_reload_conf();",
                ));
            }
        } else {
            if self.version < STANDBY_DECODING {
                findings.push(Finding::blocking(
                    format!(
                        "this server is a standby, and decoding on a standby needs PostgreSQL 16 or later; it is {}",
                        version_words(self.version)
                    ),
                    "point postgres.url at the primary",
                ));
                return findings;
            }
            if failover_slot {
                findings.push(Finding::blocking(
                    "postgres.failover_slot is on, but a slot on a standby cannot be a failover slot".to_owned(),
                    "set postgres.failover_slot = false to decode on this standby, or point postgres.url at the primary",
                ));
            }
        }
        if !self.hot_standby_feedback {
            findings.push(Finding::problem(
                "hot_standby_feedback is off on this standby: the primary can remove rows evictd's slot still needs, and the standby then invalidates the slot (invalidation_reason = rows_removed)".to_owned(),
                "ALTER SYSTEM SET hot_standby_feedback = on; SELECT pg_reload_conf();",
            ));
        }
        if self.primary_slot_name.is_empty() {
            findings.push(Finding::problem(
                "this standby streams without a physical slot (primary_slot_name is empty): its hot_standby_feedback is lost while it is disconnected, and the primary can remove rows evictd's slot needs".to_owned(),
                "on the primary: SELECT pg_create_physical_replication_slot('<name>'); here: ALTER SYSTEM SET primary_slot_name = '<name>'; SELECT pg_reload_conf();",
            ));
        }
        findings
    }

    /// The error that stops `run` at the first blocking finding.
    pub fn blocking_error(&self, slot: &str, failover_slot: bool) -> Option<Error> {
        self.findings(slot, failover_slot)
            .into_iter()
            .find(|finding| finding.blocking)
            .map(|finding| {
                Error::new(
                    ErrorKind::Config,
                    format!("{} ({})", finding.message, finding.help),
                )
            })
    }

    /// A failover slot that is not one yet and can become one.
    pub fn needs_failover_switch(&self, failover_slot: bool) -> bool {
        failover_slot
            && !self.in_recovery
            && self.version >= FAILOVER_SLOTS
            && self.slot_failover == Some(false)
    }

    /// The slot can be created as a failover slot here.
    pub fn creates_failover_slot(&self, failover_slot: bool) -> bool {
        failover_slot && !self.in_recovery && self.version >= FAILOVER_SLOTS
    }
}

/// `170004` as `17.4`, `130020` as `13.20`.
fn version_words(version: u32) -> String {
    format!("{}.{}", version / 10_000, version % 10_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn primary(version: u32) -> Topology {
        Topology {
            version,
            slot_failover: Some(false),
            ..Topology::default()
        }
    }

    fn standby(version: u32) -> Topology {
        Topology {
            version,
            in_recovery: true,
            hot_standby_feedback: true,
            primary_slot_name: "standby_1".into(),
            ..Topology::default()
        }
    }

    #[test]
    fn a_primary_without_failover_slots_has_nothing_to_say() {
        assert!(primary(150_004).findings("evictd", false).is_empty());
        assert!(primary(170_004).findings("evictd", false).is_empty());
    }

    #[test]
    fn failover_slots_before_17_stop_run() {
        let findings = primary(160_002).findings("evictd", true);
        assert_eq!(findings.len(), 1);
        assert!(findings[0].blocking);
        assert!(findings[0]
            .message
            .contains("17 or later; the server is 16.2"));
    }

    #[test]
    fn failover_slots_name_what_the_standbys_lack() {
        let mut topology = primary(170_004);
        let findings = topology.findings("evictd", true);
        assert_eq!(findings.len(), 1, "{findings:?}");
        assert!(findings[0]
            .message
            .contains("synchronized_standby_slots is empty"));
        assert!(!findings[0].blocking);
        topology.physical_slots = vec![
            PhysicalSlot {
                name: "a".into(),
                active: true,
                feedback: true,
            },
            PhysicalSlot {
                name: "b".into(),
                active: false,
                feedback: false,
            },
            PhysicalSlot {
                name: "c".into(),
                active: true,
                feedback: false,
            },
        ];
        let findings = topology.findings("evictd", true);
        assert!(findings[0].help.contains("= 'a,b,c'"), "{findings:?}");
        topology.standby_slots = vec!["a".into(), "b".into(), "c".into(), "d".into()];
        let messages: Vec<String> = topology
            .findings("evictd", true)
            .into_iter()
            .map(|f| f.message)
            .collect();
        assert_eq!(messages.len(), 3, "{messages:?}");
        assert!(messages[0].contains("no standby streams through `b`"));
        assert!(messages[1].contains("`c` has hot_standby_feedback off"));
        assert!(messages[2].contains("names `d`, which is not a physical slot"));
        assert!(topology.needs_failover_switch(true));
        assert!(!topology.needs_failover_switch(false));
    }

    #[test]
    fn decoding_on_a_standby_needs_16_and_feedback() {
        assert!(standby(160_000).findings("evictd", false).is_empty());
        let old = standby(150_010).findings("evictd", false);
        assert!(old[0].blocking && old[0].message.contains("16 or later; it is 15.10"));
        let mut bare = standby(170_000);
        bare.hot_standby_feedback = false;
        bare.primary_slot_name.clear();
        let findings = bare.findings("evictd", true);
        assert_eq!(findings.len(), 3, "{findings:?}");
        assert!(findings[0].blocking && findings[0].message.contains("cannot be a failover slot"));
        assert!(findings[1].message.contains("hot_standby_feedback is off"));
        assert!(findings[2].message.contains("primary_slot_name is empty"));
        assert!(!bare.creates_failover_slot(true));
    }

    #[test]
    fn a_synchronised_slot_is_read_only_after_promotion() {
        let mut topology = standby(170_000);
        topology.slot_synced = true;
        topology.slot_failover = Some(true);
        let findings = topology.findings("evictd", true);
        assert!(
            findings[0].blocking
                && findings[0]
                    .message
                    .contains("synchronised from the primary")
        );
        assert!(findings[1]
            .message
            .contains("sync_replication_slots is off"));
        assert_eq!(
            topology.describe("evictd"),
            "server: a hot standby (PostgreSQL 17.0), slot evictd synchronised from the primary"
        );
    }
}
