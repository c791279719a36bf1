//! `evictd audit`: a sweep of every refresh key against its row, and of the
//! fills that recorded a stamp, with the table it prints.

use std::collections::HashMap;

use evictd_client::protocol::Stored;
use evictd_client::Connection;

use super::checker::{get_value, record_passes, row_filter};
use super::*;
use crate::change::{Lsn, TableName};
use crate::config::{Config, SecretUrl};
use crate::error::{Error, ErrorKind};
use crate::mapping::eval::render_refresh;
use crate::mapping::{Mappings, TableMapping};
use crate::rows::{refresh_columns, Database};
use crate::servers::connect_redis;
use crate::sql::select_columns;

/// Rows `evictd audit` reads per round trip.
pub(crate) const SWEEP_PAGE: u64 = 500;

/// What `evictd audit` found for one refresh of one table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepLine {
    pub table: String,
    /// The refresh's key template.
    pub key: String,
    pub rows: u64,
    pub consistent: u64,
    /// Keys Redis does not hold (expired, evicted, never written): not
    /// stale, nothing to serve.
    pub absent: u64,
    pub stale: u64,
    pub unverifiable: u64,
}

/// A stale entry `evictd audit` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub key: String,
    pub table: String,
    /// The row, as the SQL condition that selects it.
    pub row: String,
    pub why: String,
}

/// What `evictd audit` found of the values clients filled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FillSweep {
    /// Cache values read (not evictd's own keys or tag sets).
    pub values: u64,
    /// Of those, values whose fill recorded an apply stamp.
    pub recorded: u64,
    /// Logged invalidations carrying an apply stamp, compared against.
    pub invalidations: u64,
    pub stale: u64,
}

/// What `evictd audit` found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    pub lines: Vec<SweepLine>,
    /// The client fills, when the whole keyspace was swept (no `--table`).
    pub fills: Option<FillSweep>,
    pub stale: Vec<Finding>,
    /// Why some entries could not be decided (one example per reason).
    pub unverifiable: Vec<Finding>,
}

/// `evictd audit`: every row of each mapped table with refreshes (or of
/// `only`, at most `limit` rows a table) rendered as its refreshes would
/// write it and compared with Redis. A difference is confirmed as
/// `verify_refresh` does, waiting for evictd's continuity record (up to
/// `APPLIED_WAIT`) to pass what the row's read saw; `progress` hears
/// about each page.
pub async fn sweep(
    config: &Config,
    mappings: &Mappings,
    only: Option<&TableName>,
    limit: Option<u64>,
    mut progress: impl FnMut(&SweepLine),
) -> Result<Sweep, Error> {
    let (url, tables) = refreshed_tables(config, mappings, only, "audit", "compare")?;
    let mut database = Database::new(url);
    let mut redis = connect_redis(&config.redis).await?;
    let record = format!(
        "{}{}",
        config.redis.prefix,
        crate::continuity::record_key(&config.postgres.slot)
    );
    let reader = redis.clone();
    let applied = |lsn: Lsn| {
        let mut redis = reader.clone();
        let record = record.clone();
        async move { record_passes(&mut redis, &record, lsn).await }
    };
    let mut sweep = Sweep::default();
    for mapping in tables {
        let table = &*mapping.table;
        database.learn(table).await;
        let columns: Vec<&str> = {
            let mut columns: Vec<&str> = Vec::new();
            for refresh in &mapping.refresh {
                for column in refresh_columns(refresh) {
                    if !columns.contains(&column) {
                        columns.push(column);
                    }
                }
            }
            columns
        };
        let mut lines: Vec<SweepLine> = mapping
            .refresh
            .iter()
            .map(|refresh| SweepLine {
                table: table.to_string(),
                key: refresh.key.source().to_owned(),
                ..SweepLine::default()
            })
            .collect();
        let select = format!(
            "{}{}",
            select_columns(table, &columns),
            limit.map_or_else(String::new, |limit| format!(" limit {limit}"))
        );
        database
            .query(&format!(
                "begin isolation level repeatable read read only; declare evictd_audit no scroll cursor for {select}"
            ))
            .await
            .map_err(|why| sweep_error(table, &why))?;
        loop {
            let texts = database
                .query(&format!("fetch {SWEEP_PAGE} from evictd_audit"))
                .await
                .map_err(|why| sweep_error(table, &why))?;
            if texts.is_empty() {
                break;
            }
            let rows = database
                .rows(table, &columns, texts)
                .map_err(|why| sweep_error(table, &why))?;
            for (refresh, line) in mapping.refresh.iter().zip(&mut lines) {
                let rendered: Vec<Option<(String, String)>> = rows
                    .iter()
                    .map(|row| render_refresh(refresh, row))
                    .collect();
                let held = futures_util::future::join_all(rendered.iter().map(|rendered| {
                    let mut redis = redis.clone();
                    let prefix = &config.redis.prefix;
                    async move {
                        match rendered {
                            Some((key, _)) => {
                                get_value(&mut redis, &format!("{prefix}{key}")).await
                            }
                            None => Ok(None),
                        }
                    }
                }))
                .await;
                for (row, (rendered, held)) in rows.iter().zip(rendered.iter().zip(held)) {
                    line.rows += 1;
                    let Some((key, expected)) = rendered else {
                        line.unverifiable += 1;
                        note_once(
                            &mut sweep.unverifiable,
                            table,
                            "-",
                            "a row whose refresh cannot be rendered (NULL in its key)",
                        );
                        continue;
                    };
                    match held {
                        Ok(None) => line.absent += 1,
                        Ok(Some(held)) if held == *expected => line.consistent += 1,
                        Ok(Some(_)) => {
                            // Perhaps a change in flight: confirm as the
                            // checker does.
                            let Some(filter) = row_filter(refresh, row) else {
                                line.unverifiable += 1;
                                continue;
                            };
                            let full = format!("{}{key}", config.redis.prefix);
                            let target = Target {
                                table,
                                refresh,
                                filter: &filter,
                                full: &full,
                            };
                            let verdict =
                                verify_refresh(&database, &mut redis, &target, applied).await;
                            match verdict.outcome {
                                Outcome::Consistent => line.consistent += 1,
                                Outcome::Stale => {
                                    line.stale += 1;
                                    sweep.stale.push(Finding {
                                        key: key.clone(),
                                        table: table.to_string(),
                                        row: filter,
                                        why: verdict.why,
                                    });
                                }
                                Outcome::Unverifiable => {
                                    line.unverifiable += 1;
                                    note_once(&mut sweep.unverifiable, table, key, &verdict.why);
                                }
                            }
                        }
                        Err(error) => {
                            line.unverifiable += 1;
                            let why = crate::rows::error_chain(&error);
                            note_once(&mut sweep.unverifiable, table, key, &why);
                        }
                    }
                }
                progress(line);
            }
        }
        database
            .query("close evictd_audit; commit")
            .await
            .map_err(|why| sweep_error(table, &why))?;
        sweep.lines.extend(lines);
    }
    // On a Cluster the fills are left to the continuous checker.
    if only.is_none() && matches!(redis, Connection::Single(_)) {
        sweep.fills = Some(sweep_fills(config, &mut redis, &mut sweep.stale).await?);
    }
    Ok(sweep)
}

/// The database to read and the mapped tables with refreshes (or `only`,
/// which must be one), for a command (`audit`, `warm`) that reads them;
/// `doing` says what there would be nothing of.
pub fn refreshed_tables<'m>(
    config: &Config,
    mappings: &'m Mappings,
    only: Option<&TableName>,
    command: &str,
    doing: &str,
) -> Result<(SecretUrl, Vec<&'m TableMapping>), Error> {
    let Some(url) = config.postgres.url.clone() else {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "evictd {command} reads the mapped tables from Postgres: postgres.url is not set"
            ),
        ));
    };
    let tables: Vec<&TableMapping> = mappings
        .tables()
        .filter(|mapping| !mapping.refresh.is_empty())
        .filter(|mapping| only.is_none_or(|only| *mapping.table == *only))
        .collect();
    if let Some(only) = only {
        if tables.is_empty() {
            let why = match mappings.table(only) {
                Some(_) => format!("{only} has no [[table.refresh]] entries: nothing to {doing}"),
                None => format!("{only} is not mapped"),
            };
            return Err(Error::new(ErrorKind::Config, why));
        }
    }
    Ok((url, tables))
}

/// Client fills against the broadcast log: a value whose fill recorded an
/// apply stamp below that of a logged invalidation of its key (by key or
/// by pattern) was loaded before that invalidation and stored after it.
/// Reaches as far back as the log (`redis.l1_log_len`) and the stamps in
/// it (batches applied while the checker ran); tag invalidations are not
/// compared (a filled key's tags are not known once its tag set is gone).
pub(crate) async fn sweep_fills(
    config: &Config,
    redis: &mut Connection,
    stale: &mut Vec<Finding>,
) -> Result<FillSweep, Error> {
    let prefix = &config.redis.prefix;
    let mut log = evictd_client::Log::new(redis.clone(), prefix);
    let count = usize::try_from(config.redis.l1_log_len.min(1_000_000)).unwrap_or(1_000_000);
    let messages = log
        .recent(count)
        .await
        .map_err(|e| Error::redis("cannot read the broadcast log", e))?;
    let mut by_key: HashMap<String, u64> = HashMap::new();
    let mut by_pattern: Vec<(String, u64)> = Vec::new();
    let mut found = FillSweep::default();
    for message in &messages {
        let Some(stamp) = message.stamp else {
            continue;
        };
        found.invalidations += 1;
        for key in &message.keys {
            let at = by_key.entry(key.clone()).or_default();
            *at = (*at).max(stamp);
        }
        by_pattern.extend(message.patterns.iter().map(|p| (p.clone(), stamp)));
    }
    let mut glob = String::new();
    crate::mapping::template::escape_glob(prefix, &mut glob);
    glob.push('*');
    let own = format!("{prefix}evictd:");
    let tags = format!("{prefix}{}", evictd_client::protocol::TAG_NAMESPACE);
    let keys = scan_all(redis, &glob).await?;
    for full in keys {
        if full.starts_with(&own) || full.starts_with(&tags) {
            continue;
        }
        let raw: Option<String> = redis::cmd("GET")
            .arg(&full)
            .query_async(redis)
            .await
            .unwrap_or(None);
        let Some(raw) = raw else { continue };
        found.values += 1;
        let Some(recorded) = Stored::stamp(&raw) else {
            continue;
        };
        found.recorded += 1;
        let key = &full[prefix.len()..];
        let invalidated = by_pattern
            .iter()
            .filter(|(pattern, _)| evictd_client::protocol::glob_matches(pattern, key))
            .map(|(_, stamp)| *stamp)
            .chain(by_key.get(key).copied())
            .max();
        if let Some(invalidated) = invalidated.filter(|at| *at > recorded) {
            found.stale += 1;
            stale.push(Finding {
                key: key.to_owned(),
                table: "-".into(),
                row: "-".into(),
                why: format!("holds a fill that read apply stamp {recorded}, before the invalidation at stamp {invalidated} in the broadcast log: it was loaded before the change and stored after its invalidation"),
            });
        }
    }
    Ok(found)
}

/// Every key matching `glob` on a standalone Redis.
pub(crate) async fn scan_all(redis: &mut Connection, glob: &str) -> Result<Vec<String>, Error> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, page): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(glob)
            .arg("COUNT")
            .arg(1000)
            .query_async(redis)
            .await
            .map_err(|e| Error::redis("cannot SCAN the keyspace", e))?;
        keys.extend(page);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

/// The summary table `evictd audit` prints, one line per refresh.
pub fn table_text(sweep: &Sweep) -> String {
    let header = [
        "table",
        "key",
        "rows",
        "consistent",
        "absent",
        "stale",
        "unverifiable",
    ];
    let mut rows: Vec<[String; 7]> = vec![header.map(str::to_owned)];
    for line in &sweep.lines {
        rows.push([
            line.table.clone(),
            line.key.clone(),
            line.rows.to_string(),
            line.consistent.to_string(),
            line.absent.to_string(),
            line.stale.to_string(),
            line.unverifiable.to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|column| rows.iter().map(|row| row[column].len()).max().unwrap_or(0))
        .collect();
    let mut text = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(column, (cell, width))| {
                if column < 2 {
                    format!("{cell:<width$}")
                } else {
                    format!("{cell:>width$}")
                }
            })
            .collect();
        text.push_str(cells.join("  ").trim_end());
        text.push('\n');
    }
    text
}

/// Reading `table` failed: the sweep stops with the cause.
pub(crate) fn sweep_error(table: &TableName, error: &Error) -> Error {
    Error::new(
        ErrorKind::PostgresServer { transient: false },
        format!("cannot read {table}: {}", crate::rows::error_chain(error)),
    )
}

/// Keeps the first entry of each reason.
pub(crate) fn note_once(notes: &mut Vec<Finding>, table: &TableName, key: &str, why: &str) {
    if notes.iter().any(|note| note.why == why) {
        return;
    }
    notes.push(Finding {
        key: key.to_owned(),
        table: table.to_string(),
        row: String::new(),
        why: why.to_owned(),
    });
}
