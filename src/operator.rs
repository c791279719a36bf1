//! What an operator runs once or now and then: `evictd init` (publication, slot, and the
//! REPLICA IDENTITY statements the mappings need) and `evictd status` (the
//! slot, its lag and retained WAL, and what evictd last applied).

use std::fmt::Write as _;

use crate::apply::sink::INVALIDATED_KEY;
use crate::audit::Outcome;
use crate::change::Lsn;
use crate::config::Config;
use crate::continuity::{self, Remembered};
use crate::error::{Error, ErrorKind};
use crate::mapping::Mappings;
use crate::plan::Mode;
use crate::source::postgres::control::{Control, SlotReport};
use evictd_client::protocol::L1_LAST_KEY;

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
    let topology = control.topology().await?;
    let postgres = &config.postgres;
    if let Some(error) = topology.blocking_error(&postgres.slot, postgres.failover_slot) {
        return Err(error);
    }
    let failover = topology.creates_failover_slot(postgres.failover_slot);
    let mut steps = vec![
        Step {
            sql: format!("{};", control.create_publication_sql(mappings).await?),
            needed: !control.publication_exists().await?,
            why: if topology.in_recovery {
                "the mapped tables' changes reach evictd through this publication; this server is a standby: run it on the primary".into()
            } else {
                "the mapped tables' changes reach evictd through this publication".into()
            },
        },
        Step {
            sql: format!("{};", control.create_slot_sql(failover).await?),
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

/// `evictd init --reset-slot`, its Postgres half: drops the slot and
/// creates it anew (with the publication, if that is missing), so that
/// it decodes from now. The caller then invalidates every mapped table
/// coarsely, which covers the changes the old slot could not deliver.
/// Refused while a process streams from the slot.
pub async fn reset_slot(config: &Config, mappings: &Mappings) -> Result<(), Error> {
    let control = Control::connect(&config.postgres).await?;
    match control.report().await? {
        Some(SlotReport {
            active_pid: Some(pid),
            ..
        }) => {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                "the replication slot {} streams to PID {pid}: stop every evictd run on it first",
                config.postgres.slot
            ),
            ))
        }
        Some(_) => control.drop_slot().await?,
        None => {}
    }
    let topology = control.topology().await?;
    let postgres = &config.postgres;
    if let Some(error) = topology.blocking_error(&postgres.slot, postgres.failover_slot) {
        return Err(error);
    }
    control
        .ensure(
            mappings,
            true,
            topology.creates_failover_slot(postgres.failover_slot),
        )
        .await?;
    Ok(())
}

/// What `evictd status` found: as text, as JSON (`status --json`), and
/// what needs attention.
#[derive(Debug, Default)]
pub struct Report {
    pub text: String,
    pub json: serde_json::Map<String, serde_json::Value>,
    pub warnings: Vec<String>,
}

impl Report {
    /// Appends `other` (text, fields and warnings).
    pub fn extend(&mut self, other: Report) {
        self.text.push_str(&other.text);
        self.json.extend(other.json);
        self.warnings.extend(other.warnings);
    }

    /// The JSON object, with the warnings.
    pub fn to_json(&self) -> serde_json::Value {
        let mut json = self.json.clone();
        json.insert("warnings".into(), serde_json::json!(self.warnings));
        serde_json::Value::Object(json)
    }
}

/// `evictd status` of the Postgres source.
pub async fn status(config: &Config) -> Result<Report, Error> {
    let control = Control::connect(&config.postgres).await?;
    let postgres = &config.postgres;
    let mut report = Report::default();
    report.json.insert("source".into(), "postgres".into());
    let out = &mut report.text;
    let warnings = &mut report.warnings;
    let slot = match control.report().await? {
        None => {
            let _ = writeln!(
                out,
                "slot {}: missing (evictd run creates it; changes before that are not replayed)",
                postgres.slot
            );
            warnings.push(format!("slot {} does not exist", postgres.slot));
            serde_json::json!({"name": postgres.slot, "exists": false})
        }
        Some(SlotReport {
            active_pid,
            confirmed_flush: confirmed,
            restart,
            wal_status,
            invalidation_reason,
            invalidated,
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
            if let Some(cause) = &invalidated {
                let _ = writeln!(out, "  invalidated: {cause}");
                warnings.push(format!(
                    "the slot was invalidated ({cause}): the next start creates it again and invalidates every mapped table"
                ));
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
            serde_json::json!({
                "name": postgres.slot,
                "exists": true,
                "active": active,
                "walsender_pid": active_pid,
                "wal_status": wal_status,
                "invalidation_reason": invalidation_reason,
                "invalidated": invalidated,
                "confirmed_flush_lsn": confirmed.to_string(),
                "current_lsn": current.to_string(),
                "lag_bytes": lag,
                "restart_lsn": restart.to_string(),
                "retained_bytes": retained,
            })
        }
    };
    report.json.insert("slot".into(), slot);
    let topology = control.topology().await?;
    let _ = writeln!(report.text, "{}", topology.describe(&postgres.slot));
    for finding in topology.findings(&postgres.slot, postgres.failover_slot) {
        let _ = writeln!(report.text, "  {} ({})", finding.message, finding.help);
        report.warnings.push(finding.message);
    }
    report.json.insert(
        "server".into(),
        serde_json::json!({
            "role": if topology.in_recovery { "standby" } else { "primary" },
            "version": topology.version,
            "slot_failover": topology.slot_failover,
            "slot_synced": topology.slot_synced,
            "synchronized_standby_slots": topology.standby_slots,
        }),
    );
    let view = read_redis(config).await;
    let mut redis = serde_json::Map::new();
    let out = &mut report.text;
    match &view {
        Ok(view) => {
            redis.insert("reachable".into(), true.into());
            match &view.record {
                Some(text) => match Remembered::decode(text) {
                    Some(remembered) => {
                        let _ = writeln!(
                            out,
                            "redis: last applied {} (database system {})",
                            remembered.applied, remembered.system_id
                        );
                        redis.insert("last_applied".into(), remembered.applied.to_string().into());
                        redis.insert("system_id".into(), remembered.system_id.to_string().into());
                    }
                    None => {
                        let _ = writeln!(out, "redis: unreadable continuity record `{text}`");
                        redis.insert("unreadable_record".into(), text.as_str().into());
                    }
                },
                None => {
                    let _ = writeln!(
                        out,
                        "redis: no continuity record yet (evictd has not applied anything)"
                    );
                }
            }
        }
        Err(error) => {
            let _ = writeln!(out, "redis: unreachable ({error})");
            report.warnings.push("Redis does not answer".into());
            redis.insert("reachable".into(), false.into());
            redis.insert("error".into(), error.as_str().into());
        }
    }
    if let Ok(view) = &view {
        if let Some(last) = &view.last {
            let _ = writeln!(out, "  last L1 broadcast (epoch:seq) {last}");
            redis.insert("last_broadcast".into(), last.as_str().into());
        }
        report
            .json
            .insert("redis".into(), serde_json::Value::Object(redis));
        invalidated(&view.invalidated, &mut report);
        consistency(&view.checks, &mut report);
    } else {
        report
            .json
            .insert("redis".into(), serde_json::Value::Object(redis));
    }
    Ok(report)
}

/// What `evictd status` shows of Redis for a Kafka source: the keys
/// invalidated by table and mode.
pub async fn kafka_status(config: &Config) -> Report {
    let mut report = Report::default();
    match read_redis(config).await {
        Ok(view) => {
            report
                .json
                .insert("redis".into(), serde_json::json!({"reachable": true}));
            invalidated(&view.invalidated, &mut report);
            consistency(&view.checks, &mut report);
        }
        Err(error) => {
            let _ = writeln!(report.text, "redis: unreachable ({error})");
            report.warnings.push("Redis does not answer".into());
            report.json.insert(
                "redis".into(),
                serde_json::json!({"reachable": false, "error": error}),
            );
        }
    }
    report
}

/// A table whose invalidated keys were at least this share deleted by
/// pattern or coarse invalidation (and at least [`MANY_KEYS`] of them) is
/// warned about.
const MOSTLY_BROAD: f64 = 0.5;
const MANY_KEYS: u64 = 100;

/// The totals of `evictd_keys_invalidated_total` kept in Redis, one line
/// per table, and a warning for each table most of whose keys went by
/// pattern or coarse invalidation.
fn invalidated(fields: &[(String, u64)], report: &mut Report) {
    let mut tables: std::collections::BTreeMap<&str, [u64; 4]> = Default::default();
    for (field, keys) in fields {
        let Some((table, mode)) = field.rsplit_once(' ') else {
            continue;
        };
        let Some(index) = Mode::ALL.iter().position(|m| m.as_str() == mode) else {
            continue;
        };
        tables.entry(table).or_default()[index] += keys;
    }
    let json: serde_json::Map<String, serde_json::Value> = tables
        .iter()
        .map(|(table, [exact, pattern, coarse, prefix])| {
            let counts = serde_json::json!({"exact": exact, "pattern": pattern, "coarse": coarse, "prefix": prefix});
            ((*table).to_owned(), counts)
        })
        .collect();
    report
        .json
        .insert("invalidated".into(), serde_json::Value::Object(json));
    if tables.is_empty() {
        return;
    }
    let out = &mut report.text;
    let _ = writeln!(out, "keys invalidated (since the first batch applied):");
    for (table, [exact, pattern, coarse, prefix]) in tables {
        // Prefix deletes are what a mapping asked for: not broad.
        let prefixed = if prefix > 0 {
            format!(", {prefix} by prefix")
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "  {table}: {exact} key by key, {pattern} by pattern, {coarse} by coarse invalidation{prefixed}"
        );
        let broad = pattern + coarse;
        let total = broad + exact;
        #[allow(clippy::cast_precision_loss)]
        if total >= MANY_KEYS && broad as f64 >= MOSTLY_BROAD * total as f64 {
            report.warnings.push(format!(
                "{table}: {broad} of {total} invalidated keys were deleted by pattern or coarse invalidation, not key by key (`evictd check` and `evictd explain` show why: REPLICA IDENTITY, unknown TOAST values, large transactions)"
            ));
        }
    }
}

/// What `status` reads from Redis.
struct RedisView {
    /// The continuity record (Postgres source).
    record: Option<String>,
    /// The last L1 `epoch:seq`.
    last: Option<String>,
    /// The invalidation totals: (`<table> <mode>`, keys).
    invalidated: Vec<(String, u64)>,
    /// The consistency checks per minute and outcome.
    checks: Vec<(String, u64)>,
}

async fn read_redis(config: &Config) -> Result<RedisView, String> {
    let prefix = &config.redis.prefix;
    let keys = [
        format!("{prefix}{}", continuity::record_key(&config.postgres.slot)),
        format!("{prefix}{L1_LAST_KEY}"),
        format!("{prefix}{INVALIDATED_KEY}"),
        format!("{prefix}{}", crate::audit::CHECKS_KEY),
    ];
    let read = async {
        let mut connection = crate::servers::connect_redis(&config.redis)
            .await
            .map_err(|e| e.to_string())?;
        read_all(&mut connection, &keys).await
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), read).await {
        Ok(result) => result,
        Err(_) => Err("timed out".into()),
    }
}

/// GETs the record and the last broadcast, HGETALLs the totals and the
/// consistency checks.
async fn read_all(
    connection: &mut impl redis::aio::ConnectionLike,
    [record, last, totals, checks]: &[String; 4],
) -> Result<RedisView, String> {
    let get = |key: &String| redis::cmd("GET").arg(key).clone();
    let record: Option<String> = get(record)
        .query_async(connection)
        .await
        .map_err(|e| e.to_string())?;
    let last: Option<String> = get(last)
        .query_async(connection)
        .await
        .map_err(|e| e.to_string())?;
    // Totals are optional: a Redis user without HGETALL sees none.
    let invalidated: Vec<(String, u64)> = redis::cmd("HGETALL")
        .arg(totals)
        .query_async(connection)
        .await
        .unwrap_or_default();
    let checks: Vec<(String, u64)> = redis::cmd("HGETALL")
        .arg(checks)
        .query_async(connection)
        .await
        .unwrap_or_default();
    Ok(RedisView {
        record,
        last,
        invalidated,
        checks,
    })
}

/// The consistency checks of the last hour (`[audit]`), in nines.
fn consistency(fields: &[(String, u64)], report: &mut Report) {
    let sums = crate::audit::last_hour(fields);
    let count = |outcome| sums.get(&outcome).copied().unwrap_or(0);
    let (consistent, stale, unverifiable) = (
        count(Outcome::Consistent),
        count(Outcome::Stale),
        count(Outcome::Unverifiable),
    );
    let checks = consistent + stale + unverifiable;
    let nines = crate::audit::nines(consistent, stale);
    report.json.insert(
        "consistency".into(),
        serde_json::json!({
            "window_minutes": 60,
            "checks": checks,
            "consistent": consistent,
            "stale": stale,
            "unverifiable": unverifiable,
            "nines": nines,
        }),
    );
    let out = &mut report.text;
    if checks == 0 {
        let _ = writeln!(
            out,
            "consistency (last hour): no checks ([audit] enabled = true turns the checker on)"
        );
        return;
    }
    let _ = writeln!(
        out,
        "consistency (last hour): {checks} checks: {consistent} consistent, {stale} stale, {unverifiable} unverifiable; {} nines",
        nines.as_deref().unwrap_or("no verified checks, so no")
    );
    if stale > 0 {
        report.warnings.push(format!(
            "{stale} stale cache entries found in the last hour (the log's \"stale cache entry\" lines name them)"
        ));
    }
}

/// Where a `replay` stands, for its progress line and summary.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReplayProgress {
    /// Where it started (the first position applied) and stops.
    pub from: Lsn,
    pub until: Lsn,
    /// The last position applied.
    pub at: Lsn,
    pub changes: u64,
    pub elapsed: std::time::Duration,
}

impl ReplayProgress {
    /// The progress line a terminal shows, rewritten in place:
    /// position, rate and what is left.
    pub fn line(&self) -> String {
        let seconds = self.elapsed.as_secs_f64().max(0.001);
        let done = self.at.0.saturating_sub(self.from.0);
        let left = self.until.0.saturating_sub(self.at.0);
        #[allow(clippy::cast_precision_loss)]
        let (rate, changes_rate) = (done as f64 / seconds, self.changes as f64 / seconds);
        let eta = if rate > 0.0 {
            #[allow(clippy::cast_precision_loss)]
            let eta = left as f64 / rate;
            format!(", ~{eta:.0} s left")
        } else {
            String::new()
        };
        #[allow(clippy::cast_possible_wrap)]
        let (left, rate) = (bytes(left as i64), bytes(rate as i64));
        format!(
            "replay: at {} of {}, {left} of WAL left, {rate}/s, {changes_rate:.0} changes/s{eta}",
            self.at, self.until
        )
    }

    /// The one line printed when it is done.
    pub fn summary(&self) -> String {
        let seconds = self.elapsed.as_secs_f64();
        #[allow(clippy::cast_precision_loss)]
        let rate = self.changes as f64 / seconds.max(0.001);
        format!(
            "replayed {} changes through {} in {seconds:.1} s ({rate:.0} changes/s)",
            self.changes, self.until
        )
    }
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
    fn replay_progress_reads_as_position_rate_and_what_is_left() {
        let progress = ReplayProgress {
            from: Lsn(0),
            until: Lsn(40 << 20),
            at: Lsn(10 << 20),
            changes: 50_000,
            elapsed: std::time::Duration::from_secs(5),
        };
        assert_eq!(
            progress.line(),
            "replay: at 0/A00000 of 0/2800000, 30.0 MiB of WAL left, 2.0 MiB/s, 10000 changes/s, ~15 s left"
        );
        assert_eq!(
            progress.summary(),
            "replayed 50000 changes through 0/2800000 in 5.0 s (10000 changes/s)"
        );
    }

    #[test]
    fn readable_bytes() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
    }
}
