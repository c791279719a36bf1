//! The Postgres control plane: everything evictd asks of the database
//! outside the replication stream (the publication, the slot, positions and
//! retained WAL). `run`, `init`, `status`, `replay` and the testkit all go
//! through here.
//!
//! Identifiers in generated SQL are quoted by the server itself
//! (`format('%I')`, `quote_literal`), so a name that needs quotes gets them
//! and one that does not reads as the operator would write it.

use crate::catalog;
use crate::change::{Lsn, TableName};
use crate::config::{PostgresConfig, SecretUrl};
use crate::continuity::{invalidation, SlotState};
use crate::error::{Error, ErrorKind};
use crate::mapping::Mappings;
use crate::source::postgres::topology::Topology;

/// The server's WAL position now: what it has written, or on a standby
/// what it has replayed (`pg_current_wal_lsn()` fails during recovery).
pub const WAL_POSITION_NOW: &str =
    "(case when pg_is_in_recovery() then pg_last_wal_replay_lsn() else pg_current_wal_lsn() end)";

/// Everything written so far, durable or not (`pg_current_wal_insert_lsn()`),
/// or on a standby what it has replayed.
pub const WAL_INSERT_POSITION_NOW: &str = "(case when pg_is_in_recovery() then pg_last_wal_replay_lsn() else pg_current_wal_insert_lsn() end)";

/// A catalog connection for the control plane of one slot and publication.
pub struct Control {
    client: tokio_postgres::Client,
    slot: String,
    publication: String,
}

/// The slot as `evictd status` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotReport {
    pub active_pid: Option<i32>,
    pub confirmed_flush: String,
    pub restart: String,
    pub wal_status: String,
    /// `pg_replication_slots.invalidation_reason` (17+).
    pub invalidation_reason: Option<String>,
    /// Why the slot was invalidated, in words, or `None` while usable.
    pub invalidated: Option<String>,
    pub current: String,
    /// Bytes between the current WAL position and the confirmed position.
    pub lag_bytes: i64,
    /// Bytes of WAL the slot keeps (from its restart position).
    pub retained_bytes: i64,
}

fn query_error(error: tokio_postgres::Error) -> Error {
    Error::postgres("catalog query failed", error)
}

impl Control {
    /// Connects to the database of `config` (its `url`, which must be set).
    pub async fn connect(config: &PostgresConfig) -> Result<Control, Error> {
        let url = config
            .url
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::Config, "postgres.url is not set"))?;
        Control::connect_to(url, &config.slot, &config.publication).await
    }

    /// Connects to `url` for `slot` and `publication`.
    pub async fn connect_to(
        url: &SecretUrl,
        slot: &str,
        publication: &str,
    ) -> Result<Control, Error> {
        let client = catalog::connect(url)
            .await
            .map_err(|e| Error::catalog("cannot connect to Postgres", e))?;
        Ok(Control {
            client,
            slot: slot.to_owned(),
            publication: publication.to_owned(),
        })
    }

    /// Connects to `url` for database-wide calls (positions), with no slot
    /// or publication of its own.
    pub async fn database(url: &SecretUrl) -> Result<Control, Error> {
        Control::connect_to(url, "", "").await
    }

    pub fn client(&self) -> &tokio_postgres::Client {
        &self.client
    }

    pub async fn publication_exists(&self) -> Result<bool, Error> {
        let row = self
            .client
            .query_opt(
                "select 1 from pg_publication where pubname = $1",
                &[&self.publication],
            )
            .await
            .map_err(query_error)?;
        Ok(row.is_some())
    }

    /// `CREATE PUBLICATION ... FOR TABLE ...` for the mapped tables.
    pub async fn create_publication_sql(&self, mappings: &Mappings) -> Result<String, Error> {
        let schemas: Vec<&str> = mappings.tables().map(|m| &*m.table.schema).collect();
        let names: Vec<&str> = mappings.tables().map(|m| &*m.table.name).collect();
        let row = self
            .client
            .query_one(
                "select format('CREATE PUBLICATION %I FOR TABLE %s', $1::text, \
                   string_agg(format('%I.%I', s, n), ', ' order by i)) \
                 from unnest($2::text[], $3::text[]) with ordinality as t(s, n, i)",
                &[&self.publication, &schemas, &names],
            )
            .await
            .map_err(query_error)?;
        Ok(row.get(0))
    }

    /// `SELECT pg_create_logical_replication_slot(...)` for the slot, as
    /// a failover slot when `failover` (PostgreSQL 17+).
    pub async fn create_slot_sql(&self, failover: bool) -> Result<String, Error> {
        let row = self
            .client
            .query_one(
                "select format('SELECT pg_create_logical_replication_slot(%L, ''pgoutput''%s)', $1::text,
                               case when $2 then ', failover => true' else '' end)",
                &[&self.slot, &failover],
            )
            .await
            .map_err(query_error)?;
        Ok(row.get(0))
    }

    /// `ALTER TABLE ... REPLICA IDENTITY FULL` for `table`.
    pub async fn replica_identity_full_sql(&self, table: &TableName) -> Result<String, Error> {
        let row = self
            .client
            .query_one(
                "select format('ALTER TABLE %I.%I REPLICA IDENTITY FULL', $1::text, $2::text)",
                &[&&*table.schema, &&*table.name],
            )
            .await
            .map_err(query_error)?;
        Ok(row.get(0))
    }

    /// `pg_class.relreplident` of `table` (`d`, `n`, `f`, `i`), if it exists.
    pub async fn replica_identity(&self, table: &TableName) -> Result<Option<String>, Error> {
        let row = self
            .client
            .query_opt(
                "select c.relreplident::text from pg_class c join pg_namespace n on n.oid = c.relnamespace \
                 where n.nspname = $1 and c.relname = $2",
                &[&&*table.schema, &&*table.name],
            )
            .await
            .map_err(query_error)?;
        Ok(row.map(|row| row.get(0)))
    }

    /// Whether the slot exists.
    pub async fn slot_exists(&self) -> Result<bool, Error> {
        Ok(matches!(self.inspect().await?, SlotState::Present { .. }))
    }

    /// The slot as the catalog has it (for the continuity judgement).
    pub async fn inspect(&self) -> Result<SlotState, Error> {
        let row = self
            .client
            .query_opt(
                // invalidation_reason (17+) and conflicting (16+) through
                // to_jsonb, so that one query serves every version.
                "select coalesce(confirmed_flush_lsn, '0/0')::text, coalesce(wal_status, ''),
                        to_jsonb(s) ->> 'invalidation_reason', (to_jsonb(s) ->> 'conflicting')::bool
                 from pg_replication_slots s where slot_name = $1",
                &[&self.slot],
            )
            .await
            .map_err(|e| Error::postgres("slot query failed", e))?;
        Ok(match row {
            None => SlotState::Missing,
            Some(row) => {
                let wal_status: String = row.get(1);
                let reason: Option<String> = row.get(2);
                SlotState::Present {
                    confirmed_flush: Lsn::parse(&row.get::<_, String>(0)).unwrap_or_default(),
                    invalidated: invalidation(&wal_status, reason.as_deref(), row.get(3)),
                    wal_status,
                }
            }
        })
    }

    /// The slot's state, position, lag and retained WAL, if it exists.
    pub async fn report(&self) -> Result<Option<SlotReport>, Error> {
        let row = self
            .client
            .query_opt(
                &format!(
                    "select active_pid, coalesce(confirmed_flush_lsn, '0/0')::text, coalesce(restart_lsn, '0/0')::text,
                            coalesce(wal_status, ''), now.lsn::text,
                            coalesce(pg_wal_lsn_diff(now.lsn, confirmed_flush_lsn), 0)::bigint,
                            coalesce(pg_wal_lsn_diff(now.lsn, restart_lsn), 0)::bigint,
                            to_jsonb(s) ->> 'invalidation_reason', (to_jsonb(s) ->> 'conflicting')::bool
                     from pg_replication_slots s, (select {WAL_POSITION_NOW} as lsn) now where slot_name = $1"
                ),
                &[&self.slot],
            )
            .await
            .map_err(query_error)?;
        Ok(row.map(|row| {
            let wal_status: String = row.get(3);
            let reason: Option<String> = row.get(7);
            SlotReport {
                active_pid: row.get(0),
                confirmed_flush: row.get(1),
                restart: row.get(2),
                invalidated: invalidation(&wal_status, reason.as_deref(), row.get(8)),
                invalidation_reason: reason,
                wal_status,
                current: row.get(4),
                lag_bytes: row.get(5),
                retained_bytes: row.get(6),
            }
        }))
    }

    /// Bytes of WAL the slot retains, if it exists.
    pub async fn retained_wal(&self) -> Result<Option<u64>, Error> {
        let row = self
            .client
            .query_opt(
                &format!("select pg_wal_lsn_diff({WAL_POSITION_NOW}, restart_lsn)::bigint from pg_replication_slots where slot_name = $1"),
                &[&self.slot],
            )
            .await
            .map_err(query_error)?;
        Ok(row.map(|row| u64::try_from(row.get::<_, Option<i64>>(0).unwrap_or(0)).unwrap_or(0)))
    }

    /// `pg_current_wal_insert_lsn()`: everything written so far, durable or
    /// not (on a standby: everything it has replayed).
    pub async fn current_wal_insert_lsn(&self) -> Result<Lsn, Error> {
        let row = self
            .client
            .query_one(&format!("select {WAL_INSERT_POSITION_NOW}::text"), &[])
            .await
            .map_err(query_error)?;
        let text: String = row.get(0);
        Lsn::parse(&text)
            .ok_or_else(|| Error::new(ErrorKind::Protocol, format!("unexpected LSN `{text}`")))
    }

    /// The server's role, the slot's failover flags and the settings
    /// around them.
    pub async fn topology(&self) -> Result<Topology, Error> {
        Topology::read(&self.client, &self.slot).await
    }

    /// Makes sure the publication and the slot exist, creating them when
    /// `create` allows (the slot as a failover slot when `failover`; on a
    /// standby only the slot: the publication comes from the primary).
    /// Returns whether the slot was created now.
    pub async fn ensure(
        &self,
        mappings: &Mappings,
        create: bool,
        failover: bool,
    ) -> Result<bool, Error> {
        let setup_error = |e| Error::postgres("slot setup query failed", e);
        if !self.publication_exists().await? {
            if self.in_recovery().await? {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "publication `{}` does not exist, and this server is a standby, where it cannot be created: run on the primary `{}` (it reaches the standby with the WAL)",
                        self.publication,
                        self.create_publication_sql(mappings).await?
                    ),
                ));
            }
            if !create {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "publication `{}` does not exist and postgres.create_slot = false",
                        self.publication
                    ),
                ));
            }
            let sql = self.create_publication_sql(mappings).await?;
            self.client.batch_execute(&sql).await.map_err(setup_error)?;
            tracing::info!(publication = %self.publication, "created publication");
        }
        let slot = self
            .client
            .query_opt(
                "select plugin, database = current_database() from pg_replication_slots where slot_name = $1",
                &[&self.slot],
            )
            .await
            .map_err(setup_error)?;
        match slot {
            Some(row) => {
                let plugin: Option<String> = row.get(0);
                let same_database: Option<bool> = row.get(1);
                if plugin.as_deref() != Some("pgoutput") || same_database != Some(true) {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "slot `{}` exists but is not a pgoutput slot of this database",
                            self.slot
                        ),
                    ));
                }
                Ok(false)
            }
            None if create => {
                let sql = if failover {
                    "select pg_create_logical_replication_slot($1, 'pgoutput', failover => true)"
                } else {
                    "select pg_create_logical_replication_slot($1, 'pgoutput')"
                };
                // On a standby this waits for the primary to log its
                // running transactions (every 15 s at most).
                self.client
                    .query_one(sql, &[&self.slot])
                    .await
                    .map_err(setup_error)?;
                tracing::info!(slot = %self.slot, failover, "created replication slot");
                Ok(true)
            }
            None => Err(Error::new(
                ErrorKind::Config,
                format!(
                    "replication slot `{}` does not exist and postgres.create_slot = false",
                    self.slot
                ),
            )),
        }
    }

    /// `pg_is_in_recovery()`: the server is a standby.
    pub async fn in_recovery(&self) -> Result<bool, Error> {
        let row = self
            .client
            .query_one("select pg_is_in_recovery()", &[])
            .await
            .map_err(query_error)?;
        Ok(row.get(0))
    }

    /// Adds those of `tables` that exist and are not in the publication
    /// to it (nothing for a publication `FOR ALL TABLES`, or one that does
    /// not exist); returns the tables added.
    pub async fn add_to_publication(&self, tables: &[&TableName]) -> Result<Vec<TableName>, Error> {
        let setup_error = |e| Error::postgres("cannot add a table to the publication", e);
        let all_tables = self
            .client
            .query_opt(
                "select puballtables from pg_publication where pubname = $1",
                &[&self.publication],
            )
            .await
            .map_err(query_error)?
            .map(|row| row.get::<_, bool>(0));
        if all_tables != Some(false) {
            return Ok(Vec::new());
        }
        let mut added = Vec::new();
        for table in tables {
            let row = self
                .client
                .query_one(
                    "select to_regclass(format('%I.%I', $2::text, $3::text)) is not null                        and not exists (select 1 from pg_publication_tables                                        where pubname = $1 and schemaname = $2 and tablename = $3),                      format('ALTER PUBLICATION %I ADD TABLE %I.%I', $1::text, $2::text, $3::text)",
                    &[&self.publication, &&*table.schema, &&*table.name],
                )
                .await
                .map_err(query_error)?;
            if row.get::<_, bool>(0) {
                let sql: String = row.get(1);
                self.client.batch_execute(&sql).await.map_err(setup_error)?;
                added.push((*table).clone());
            }
        }
        Ok(added)
    }

    /// Drops the slot (it must not be streaming).
    pub async fn drop_slot(&self) -> Result<(), Error> {
        self.client
            .query_one("select pg_drop_replication_slot($1)", &[&self.slot])
            .await
            .map_err(|e| Error::postgres("cannot drop the replication slot", e))?;
        Ok(())
    }
}
