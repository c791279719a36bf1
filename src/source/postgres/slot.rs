//! The replication slot and publication: created when absent (with
//! `postgres.create_slot`), and the START_REPLICATION command for the
//! server's protocol version.

use crate::catalog;
use crate::change::Lsn;
use crate::config::{PostgresConfig, SecretUrl};
use crate::continuity::SlotState;
use crate::error::{Error, ErrorKind};
use crate::mapping::Mappings;

/// Makes sure the publication and the slot exist, creating them when
/// allowed. Returns whether the slot was created now.
pub async fn ensure(
    config: &PostgresConfig,
    url: &SecretUrl,
    mappings: &Mappings,
) -> Result<bool, Error> {
    let client = catalog::connect(url)
        .await
        .map_err(|e| Error::catalog("cannot connect to Postgres", e))?;
    let query_error = |e| Error::postgres("slot setup query failed", e);
    let publication = client
        .query_opt(
            "select 1 from pg_publication where pubname = $1",
            &[&config.publication],
        )
        .await
        .map_err(query_error)?;
    if publication.is_none() {
        if !config.create_slot {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "publication `{}` does not exist and postgres.create_slot = false",
                    config.publication
                ),
            ));
        }
        let tables: Vec<String> = mappings.tables().map(|m| quote_table(&m.table)).collect();
        let sql = format!(
            "create publication {} for table {}",
            quote_ident(&config.publication),
            tables.join(", ")
        );
        client.batch_execute(&sql).await.map_err(query_error)?;
        tracing::info!(publication = %config.publication, "created publication");
    }
    let slot = client
        .query_opt(
            "select plugin, database = current_database() from pg_replication_slots where slot_name = $1",
            &[&config.slot],
        )
        .await
        .map_err(query_error)?;
    match slot {
        Some(row) => {
            let plugin: Option<String> = row.get(0);
            let same_database: Option<bool> = row.get(1);
            if plugin.as_deref() != Some("pgoutput") || same_database != Some(true) {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "slot `{}` exists but is not a pgoutput slot of this database",
                        config.slot
                    ),
                ));
            }
            Ok(false)
        }
        None if config.create_slot => {
            client
                .query_one(
                    "select pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&config.slot],
                )
                .await
                .map_err(query_error)?;
            tracing::info!(slot = %config.slot, "created replication slot");
            Ok(true)
        }
        None => Err(Error::new(
            ErrorKind::Config,
            format!(
                "replication slot `{}` does not exist and postgres.create_slot = false",
                config.slot
            ),
        )),
    }
}

/// The slot as the catalog has it.
pub async fn inspect(config: &PostgresConfig, url: &SecretUrl) -> Result<SlotState, Error> {
    let client = catalog::connect(url)
        .await
        .map_err(|e| Error::catalog("cannot connect to Postgres", e))?;
    let row = client
        .query_opt(
            "select coalesce(confirmed_flush_lsn, '0/0')::text, coalesce(wal_status, '') from pg_replication_slots where slot_name = $1",
            &[&config.slot],
        )
        .await
        .map_err(|e| Error::postgres("slot query failed", e))?;
    Ok(match row {
        None => SlotState::Missing,
        Some(row) => SlotState::Present {
            confirmed_flush: Lsn::parse(&row.get::<_, String>(0)).unwrap_or_default(),
            wal_status: row.get(1),
        },
    })
}

/// Drops the slot (it must not be streaming).
pub async fn drop_slot(config: &PostgresConfig, url: &SecretUrl) -> Result<(), Error> {
    let client = catalog::connect(url)
        .await
        .map_err(|e| Error::catalog("cannot connect to Postgres", e))?;
    client
        .query_one("select pg_drop_replication_slot($1)", &[&config.slot])
        .await
        .map_err(|e| Error::postgres("cannot drop the replication slot", e))?;
    Ok(())
}

/// START_REPLICATION for the slot, from its confirmed position, with the
/// newest pgoutput protocol evictd speaks that the server supports:
/// version 2 with streaming of large in-progress transactions from PG 14,
/// version 1 before.
pub fn start_command(slot: &str, publication: &str, server_version: u32) -> String {
    let options = if server_version >= 140_000 {
        "proto_version '2', streaming 'on'"
    } else {
        "proto_version '1'"
    };
    format!(
        "START_REPLICATION SLOT {} LOGICAL 0/0 ({options}, publication_names '{}')",
        quote_ident(slot),
        publication.replace('\'', "''")
    )
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_table(table: &crate::change::TableName) -> String {
    format!(
        "{}.{}",
        quote_ident(&table.schema),
        quote_ident(&table.name)
    )
}
