//! Slot lifecycle for operators: `evictd init` (publication, slot, and the
//! REPLICA IDENTITY statements the mappings need) and `evictd status` (the
//! slot, its lag and retained WAL, and what evictd last applied).

use std::fmt::Write as _;

use crate::config::Config;
use crate::continuity::{self, Remembered};
use crate::error::Error;
use crate::mapping::Mappings;
use crate::source::postgres::control::{Control, SlotReport};

/// One step of `init`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub sql: String,
    /// Whether it is needed (otherwise it is shown as already done).
    pub needed: bool,
    pub why: String,
}

/// What `init` would do against the database of `config`.
pub async fn init_plan(config: &Config, mappings: &Mappings) -> Result<Vec<Step>, Error> {
    let control = Control::connect(&config.postgres).await?;
    let mut steps = vec![
        Step {
            sql: format!("{};", control.create_publication_sql(mappings).await?),
            needed: !control.publication_exists().await?,
            why: "the mapped tables' changes reach evictd through this publication".into(),
        },
        Step {
            sql: format!("{};", control.create_slot_sql().await?),
            needed: !control.slot_exists().await?,
            why: "the slot keeps every change until evictd has applied it".into(),
        },
    ];
    for mapping in mappings.tables() {
        let identity = control.replica_identity(&mapping.table).await?;
        let reads_old_values = mapping.templates().next().is_some();
        if identity.as_deref() != Some("f") && reads_old_values {
            steps.push(Step {
                sql: format!(
                    "{};",
                    control.replica_identity_full_sql(&mapping.table).await?
                ),
                needed: true,
                why: "updates and deletes then carry the whole old row, so keys of the old values are invalidated exactly \
                      (run `evictd check` to see which templates need it)"
                    .into(),
            });
        }
    }
    Ok(steps)
}

/// Runs the needed steps that create things (not the ALTER TABLEs, which
/// take a lock on application tables and are left to the operator).
pub async fn init(config: &Config, steps: &[Step]) -> Result<(), Error> {
    let control = Control::connect(&config.postgres).await?;
    for step in steps
        .iter()
        .filter(|step| step.needed && !step.sql.starts_with("ALTER TABLE"))
    {
        control
            .client()
            .batch_execute(&step.sql)
            .await
            .map_err(|e| Error::postgres(format!("`{}` failed", step.sql), e))?;
    }
    Ok(())
}

/// `evictd status` as text, and whether anything needs attention.
pub async fn status(config: &Config) -> Result<(String, Vec<String>), Error> {
    let control = Control::connect(&config.postgres).await?;
    let postgres = &config.postgres;
    let mut out = String::new();
    let mut warnings = Vec::new();
    match control.report().await? {
        None => {
            let _ = writeln!(
                out,
                "slot {}: missing (evictd run creates it; changes before that are not replayed)",
                postgres.slot
            );
            warnings.push(format!("slot {} does not exist", postgres.slot));
        }
        Some(SlotReport {
            active_pid,
            confirmed_flush: confirmed,
            restart,
            wal_status,
            current,
            lag_bytes: lag,
            retained_bytes: retained,
        }) => {
            let active = active_pid.is_some();
            let state = match active_pid {
                Some(pid) => format!("active (walsender pid {pid})"),
                None => "inactive: no evictd is streaming".to_owned(),
            };
            let _ = writeln!(
                out,
                "slot {}: {state}, wal_status {wal_status}",
                postgres.slot
            );
            let _ = writeln!(
                out,
                "  confirmed_flush_lsn {confirmed}, {} behind the current WAL {current}",
                bytes(lag)
            );
            let _ = writeln!(
                out,
                "  retained WAL {} (restart_lsn {restart})",
                bytes(retained)
            );
            if !active {
                warnings.push(format!("slot {} is not being read", postgres.slot));
            }
            if wal_status == "lost" {
                warnings.push(
                    "the slot was invalidated: the next start invalidates every mapped table"
                        .into(),
                );
            }
            let bound = i64::try_from(postgres.max_retained_wal_mb.saturating_mul(1 << 20))
                .unwrap_or(i64::MAX);
            if retained > bound {
                warnings.push(format!(
                    "the slot retains {} of WAL, more than max_retained_wal_mb = {}",
                    bytes(retained),
                    postgres.max_retained_wal_mb
                ));
            }
        }
    }
    let (record, last) = read_redis(config).await;
    match record {
        Ok(Some(text)) => match Remembered::decode(&text) {
            Some(remembered) => {
                let _ = writeln!(
                    out,
                    "redis: last applied {} (database system {})",
                    remembered.applied, remembered.system_id
                );
            }
            None => {
                let _ = writeln!(out, "redis: unreadable continuity record `{text}`");
            }
        },
        Ok(None) => {
            let _ = writeln!(
                out,
                "redis: no continuity record yet (evictd has not applied anything)"
            );
        }
        Err(error) => {
            let _ = writeln!(out, "redis: unreachable ({error})");
            warnings.push("Redis does not answer".into());
        }
    }
    if let Ok(Some(last)) = last {
        let _ = writeln!(out, "  last L1 broadcast (epoch:seq) {last}");
    }
    Ok((out, warnings))
}

type Read = Result<Option<String>, String>;

async fn read_redis(config: &Config) -> (Read, Read) {
    let prefix = &config.redis.prefix;
    let keys = [
        format!("{prefix}{}", continuity::record_key(&config.postgres.slot)),
        format!("{prefix}evictd:l1:last"),
    ];
    let url = config.redis.url.expose();
    let read = async {
        if let Some(nodes) = crate::apply::cluster::seed_nodes(url) {
            let client = redis::cluster::ClusterClient::new(nodes).map_err(|e| e.to_string())?;
            let mut connection = client
                .get_async_connection()
                .await
                .map_err(|e| e.to_string())?;
            get_all(&mut connection, &keys).await
        } else {
            let client = crate::apply::redis::client(&config.redis).map_err(|e| e.to_string())?;
            let mut connection = client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| e.to_string())?;
            get_all(&mut connection, &keys).await
        }
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), read).await {
        Ok(Ok(values)) => (Ok(values[0].clone()), Ok(values[1].clone())),
        Ok(Err(error)) => (Err(error.clone()), Err(error)),
        Err(_) => (Err("timed out".into()), Err("timed out".into())),
    }
}

async fn get_all(
    connection: &mut impl redis::aio::ConnectionLike,
    keys: &[String],
) -> Result<Vec<Option<String>>, String> {
    let mut values = Vec::with_capacity(keys.len());
    for key in keys {
        let value: Option<String> = redis::cmd("GET")
            .arg(key)
            .query_async(connection)
            .await
            .map_err(|e| e.to_string())?;
        values.push(value);
    }
    Ok(values)
}

/// Bytes in a readable unit.
fn bytes(count: i64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    #[allow(clippy::cast_precision_loss)]
    let mut value = count as f64;
    let mut unit = 0;
    while value.abs() >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{count} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readable_bytes() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
    }
}
