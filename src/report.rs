//! `evictd report`: a cache strategy report from measurements taken over a
//! window: per mapped table its write rate (the database's
//! `pg_stat_user_tables`) against evictd's invalidations by mode (the
//! totals evictd keeps in Redis), per key family (template) its
//! invalidations and how long a key lives between them (from the broadcast
//! log), and, with `pg_stat_statements`, the reads worth caching with the
//! mapping that would keep them exact.
//!
//! [`sample`] reads; everything else ([`compare`], [`opportunity`],
//! [`markdown`], [`html`]) is computed from two samples without IO.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use evictd_client::protocol::{
    Broadcast, CLIENTS_KEY, L1_LOG_FIELD, L1_LOG_KEY, PUBLISHED_COUNTERS,
};
use serde::Serialize;

use crate::apply::sink::INVALIDATED_KEY;
use crate::change::TableName;
use crate::config::Config;
use crate::error::Error;
use crate::mapping::Mappings;
use crate::rows::Database;
use crate::servers::connect_redis;
use crate::sql::quote_literal;

/// How many opportunities are listed.
const OPPORTUNITIES: usize = 10;
/// A table is "rarely written" for an opportunity when the query reads it
/// at least this many times per write.
const READS_PER_WRITE: f64 = 10.0;

/// What one sample read.
#[derive(Debug, Default)]
pub struct Sample {
    pub at: Option<Instant>,
    /// Per table (`schema.table`): inserts, updates, deletes so far.
    pub writes: HashMap<String, [u64; 3]>,
    /// evictd's totals: `<table> <mode>` to keys invalidated.
    pub invalidated: HashMap<String, u64>,
    /// The broadcast log's newest entry id.
    pub log_id: Option<String>,
    /// `pg_stat_statements` per query id: text, calls, total ms; `None`
    /// when it is not installed.
    pub statements: Option<HashMap<String, (String, u64, f64)>>,
    /// Bytes between the server's WAL position and the slot's confirmed one.
    pub lag_bytes: Option<u64>,
    /// The clients publishing their counters: per instance, its cache's
    /// name and its counters.
    pub clients: HashMap<String, (String, HashMap<String, u64>)>,
    /// Why the clients' counters could not be read, when Redis refused.
    pub clients_error: Option<String>,
}

/// The report.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub window_seconds: f64,
    pub tables: Vec<TableReport>,
    pub families: Vec<FamilyReport>,
    /// The slot's lag at the end of the window, in bytes of WAL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag_bytes: Option<u64>,
    /// Per cache name, from the counters clients publish.
    pub hit_rates: Vec<HitRate>,
    /// `None` without `pg_stat_statements` (see `notes`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opportunities: Option<Vec<Opportunity>>,
    /// What could not be measured, and why.
    pub notes: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct TableReport {
    pub table: String,
    /// Rows inserted, updated and deleted per second (the database's count).
    pub writes_per_second: f64,
    pub inserts: u64,
    pub updates: u64,
    pub deletes: u64,
    /// Keys invalidated per second, by mode (`exact`, `pattern`, `coarse`,
    /// `prefix`; a tag counts one per tag).
    pub invalidations_per_second: BTreeMap<String, f64>,
    /// Keys invalidated per row written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys_per_change: Option<f64>,
    /// The share of invalidated keys that went by pattern, prefix or
    /// coarse invalidation (over-invalidation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broad_share: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
pub struct FamilyReport {
    pub table: String,
    /// `key` or `refresh` (write-through).
    pub kind: &'static str,
    pub template: String,
    /// Invalidations (or refreshes) of keys of the family per second.
    pub invalidations_per_second: f64,
    /// Distinct keys of the family invalidated in the window.
    pub keys: u64,
    /// The mean time a key lives between invalidations: the ceiling on
    /// its hit rate's life. `None` when none was invalidated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_life_seconds: Option<f64>,
    pub suggested_ttl: String,
}

/// One cache (by the name its clients publish under) over the window.
#[derive(Debug, Default, Serialize)]
pub struct HitRate {
    pub cache: String,
    /// Instances that published in the window.
    pub instances: u64,
    /// Reads per second (L1 hits, Redis hits and misses).
    pub reads_per_second: f64,
    /// The share of reads served in process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l1_hit_rate: Option<f64>,
    /// The share of the reads that reached Redis served by it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l2_hit_rate: Option<f64>,
    /// Loader calls per second.
    pub loads_per_second: f64,
    /// The share of fills refused by the fence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fenced_share: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Opportunity {
    pub query: String,
    pub calls_per_second: f64,
    pub mean_ms: f64,
    /// Milliseconds spent in it over the window.
    pub total_ms: f64,
    pub table: String,
    pub table_writes_per_second: f64,
    /// A mapping that would invalidate its cached result, ready for a
    /// mapping file (check it with `evictd check`).
    pub mapping: String,
}

/// `30s`, `5m`, `1h` or a number of seconds.
pub fn parse_window(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let seconds: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (30s, 5m, 1h)"))?;
    let scale = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("`{text}` is not a duration (30s, 5m, 1h)")),
    };
    let window = Duration::from_secs_f64(seconds * scale);
    if window < Duration::from_secs(1) {
        return Err(format!("`{text}`: a window of at least 1s"));
    }
    Ok(window)
}

/// Takes a sample, waits `window`, takes another, and compares them.
pub async fn report(
    config: &Config,
    mappings: &Mappings,
    window: Duration,
) -> Result<Report, Error> {
    let database = config.postgres.url.clone().map(Database::new);
    let before = sample(config, mappings, database.as_ref()).await?;
    tokio::time::sleep(window).await;
    let after = sample(config, mappings, database.as_ref()).await?;
    let messages = logged_between(config, &before, &after).await?;
    let mut report = compare(mappings, &before, &after, &messages);
    if database.is_none() {
        report
            .notes
            .push("postgres.url is not set: the tables' write rates and the opportunities are not measured".into());
    }
    Ok(report)
}

/// One sample of the database's and evictd's counters.
pub async fn sample(
    config: &Config,
    mappings: &Mappings,
    database: Option<&Database>,
) -> Result<Sample, Error> {
    let mut redis = connect_redis(&config.redis).await?;
    let prefix = &config.redis.prefix;
    let invalidated: Vec<(String, u64)> = redis::cmd("HGETALL")
        .arg(format!("{prefix}{INVALIDATED_KEY}"))
        .query_async(&mut redis)
        .await
        .map_err(|e| Error::redis("HGETALL of evictd's invalidation totals failed", e))?;
    let newest: Vec<(String, Vec<String>)> = redis::cmd("XREVRANGE")
        .arg(format!("{prefix}{L1_LOG_KEY}"))
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut redis)
        .await
        .map_err(|e| Error::redis("XREVRANGE of the broadcast log failed", e))?;
    let mut sample = Sample {
        at: Some(Instant::now()),
        invalidated: invalidated.into_iter().collect(),
        log_id: newest.into_iter().next().map(|(id, _)| id),
        ..Sample::default()
    };
    match clients(&mut redis, prefix).await {
        Ok(clients) => sample.clients = clients,
        Err(error) => sample.clients_error = Some(error),
    }
    let Some(database) = database else {
        return Ok(sample);
    };
    let tables: Vec<String> = mappings.tables().map(|m| m.table.to_string()).collect();
    // Every user table: an opportunity may be a table not mapped yet.
    let rows = database
        .query("select schemaname || '.' || relname, n_tup_ins::text, n_tup_upd::text, n_tup_del::text from pg_stat_user_tables")
        .await?;
    for row in rows {
        let text = |at: usize| row.get(at).cloned().flatten().unwrap_or_default();
        let count = |at: usize| text(at).parse::<u64>().unwrap_or(0);
        sample
            .writes
            .insert(text(0), [count(1), count(2), count(3)]);
    }
    for table in &tables {
        sample.writes.entry(table.clone()).or_default();
    }
    let installed = database
        .query("select 1 from pg_extension where extname = 'pg_stat_statements'")
        .await?;
    if !installed.is_empty() {
        let rows = database
            .query("select queryid::text, query, calls::text, total_exec_time::text from pg_stat_statements where dbid = (select oid from pg_database where datname = current_database())")
            .await?;
        sample.statements = Some(
            rows.into_iter()
                .filter_map(|row| {
                    let id = row.first()?.clone()?;
                    let query = row.get(1)?.clone()?;
                    let calls = row.get(2)?.as_deref()?.parse().ok()?;
                    let total = row.get(3)?.as_deref()?.parse().ok()?;
                    Some((id, (query, calls, total)))
                })
                .collect(),
        );
    }
    let lag = database
        .query(&format!(
            "select (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint::text from pg_replication_slots where slot_name = {}",
            quote_literal(&config.postgres.slot)
        ))
        .await
        .unwrap_or_default();
    sample.lag_bytes = lag
        .first()
        .and_then(|row| row.first().cloned().flatten())
        .and_then(|text| text.parse().ok());
    Ok(sample)
}

/// The counters of the client instances that published in the last hour;
/// why not, when Redis refuses the reads (the report goes on without them,
/// and says so).
async fn clients(
    redis: &mut evictd_client::Connection,
    prefix: &str,
) -> Result<HashMap<String, (String, HashMap<String, u64>)>, String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(0));
    let instances: Vec<String> = redis::cmd("ZRANGEBYSCORE")
        .arg(format!("{prefix}{CLIENTS_KEY}"))
        .arg(now.saturating_sub(3_600_000))
        .arg("+inf")
        .query_async(redis)
        .await
        .map_err(|e| format!("ZRANGEBYSCORE {prefix}{CLIENTS_KEY}: {e}"))?;
    let mut found = HashMap::new();
    for instance in instances {
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(format!("{prefix}{CLIENTS_KEY}:{instance}"))
            .query_async(redis)
            .await
            .map_err(|e| format!("HGETALL {prefix}{CLIENTS_KEY}:{instance}: {e}"))?;
        let Some(cache) = fields.get("cache").cloned() else {
            continue;
        };
        let counters = PUBLISHED_COUNTERS
            .iter()
            .map(|name| {
                let value = fields.get(*name).and_then(|v| v.parse().ok()).unwrap_or(0);
                ((*name).to_owned(), value)
            })
            .collect();
        found.insert(instance, (cache, counters));
    }
    Ok(found)
}

/// Per cache name, the increase of its instances' counters: an instance
/// new in the window counts whole, one whose counters went down (it
/// restarted) counts its new totals.
fn hit_rates(before: &Sample, after: &Sample, seconds: f64) -> Vec<HitRate> {
    let mut by_cache: BTreeMap<&str, (u64, HashMap<&str, u64>)> = BTreeMap::new();
    for (instance, (cache, counters)) in &after.clients {
        let was = before.clients.get(instance).map(|(_, was)| was);
        let restarted = was.is_some_and(|was| {
            counters
                .iter()
                .any(|(name, value)| was.get(name).is_some_and(|before| before > value))
        });
        let entry = by_cache.entry(cache).or_default();
        entry.0 += 1;
        for (name, value) in counters {
            let base = match was {
                Some(was) if !restarted => was.get(name).copied().unwrap_or(0),
                _ => 0,
            };
            *entry.1.entry(name).or_insert(0) += value.saturating_sub(base);
        }
    }
    by_cache
        .into_iter()
        .map(|(cache, (instances, counts))| {
            let count = |name: &str| counts.get(name).copied().unwrap_or(0);
            let (l1, hits, misses) = (count("l1_hits"), count("hits"), count("misses"));
            let reads = l1 + hits + misses;
            let share = |part: u64, whole: u64| {
                #[allow(clippy::cast_precision_loss)]
                (whole > 0).then(|| part as f64 / whole as f64)
            };
            #[allow(clippy::cast_precision_loss)]
            HitRate {
                cache: cache.to_owned(),
                instances,
                reads_per_second: reads as f64 / seconds,
                l1_hit_rate: share(l1, reads),
                l2_hit_rate: share(hits, hits + misses),
                loads_per_second: count("loads") as f64 / seconds,
                fenced_share: share(count("fenced"), count("fills") + count("fenced")),
            }
        })
        .collect()
}

/// The broadcasts logged after `before`'s newest entry, up to `after`'s.
async fn logged_between(
    config: &Config,
    before: &Sample,
    after: &Sample,
) -> Result<Vec<Broadcast>, Error> {
    let Some(end) = &after.log_id else {
        return Ok(Vec::new());
    };
    if before.log_id.as_ref() == Some(end) {
        return Ok(Vec::new());
    }
    let start = before
        .log_id
        .as_ref()
        .map_or_else(|| "-".to_owned(), |id| format!("({id}"));
    let mut redis = connect_redis(&config.redis).await?;
    let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(format!("{}{L1_LOG_KEY}", config.redis.prefix))
        .arg(start)
        .arg(end)
        .query_async(&mut redis)
        .await
        .map_err(|e| Error::redis("XRANGE of the broadcast log failed", e))?;
    Ok(entries
        .iter()
        .filter_map(|(_, fields)| {
            let pair = fields.chunks(2).find(|pair| pair[0] == L1_LOG_FIELD)?;
            serde_json::from_str(pair.get(1)?).ok()
        })
        .collect())
}

/// The report from two samples and the broadcasts between them.
pub fn compare(
    mappings: &Mappings,
    before: &Sample,
    after: &Sample,
    messages: &[Broadcast],
) -> Report {
    let seconds = match (before.at, after.at) {
        (Some(from), Some(to)) => to.duration_since(from).as_secs_f64().max(0.001),
        _ => 1.0,
    };
    let mut report = Report {
        window_seconds: seconds,
        lag_bytes: after.lag_bytes,
        ..Report::default()
    };
    let delta = |table: &str| -> [u64; 3] {
        let was = before.writes.get(table).copied().unwrap_or_default();
        let is = after.writes.get(table).copied().unwrap_or_default();
        [0, 1, 2].map(|at| is[at].saturating_sub(was[at]))
    };
    for mapping in mappings.tables() {
        let table = mapping.table.to_string();
        let [inserts, updates, deletes] = delta(&table);
        let written = inserts + updates + deletes;
        let mut by_mode = BTreeMap::new();
        let mut keys = 0;
        let mut broad = 0;
        for mode in crate::plan::Mode::ALL {
            let field = format!("{table} {}", mode.as_str());
            let count = after
                .invalidated
                .get(&field)
                .copied()
                .unwrap_or(0)
                .saturating_sub(before.invalidated.get(&field).copied().unwrap_or(0));
            keys += count;
            if mode != crate::plan::Mode::Exact {
                broad += count;
            }
            #[allow(clippy::cast_precision_loss)]
            by_mode.insert(mode.as_str().to_owned(), count as f64 / seconds);
        }
        #[allow(clippy::cast_precision_loss)]
        report.tables.push(TableReport {
            table,
            writes_per_second: written as f64 / seconds,
            inserts,
            updates,
            deletes,
            invalidations_per_second: by_mode,
            keys_per_change: (written > 0).then(|| keys as f64 / written as f64),
            broad_share: (keys > 0).then(|| broad as f64 / keys as f64),
        });
    }
    report.families = families(mappings, messages, seconds);
    report.hit_rates = hit_rates(before, after, seconds);
    let unread = before
        .clients_error
        .as_ref()
        .or(after.clients_error.as_ref());
    if let Some(error) = unread {
        report.notes.push(format!(
            "the clients' published counters could not be read from Redis ({error}): no hit rates"
        ));
    } else if report.hit_rates.is_empty() {
        report.notes.push(
            "no client publishes its counters (publish_counters in the Rust crate and the Python package): no hit rates".into(),
        );
    }
    report.opportunities = match (&before.statements, &after.statements) {
        (Some(was), Some(is)) => Some(opportunities(was, is, seconds, &delta)),
        _ => {
            if after.writes.is_empty() {
                None
            } else {
                report.notes.push(
                    "pg_stat_statements is not installed in this database (shared_preload_libraries = 'pg_stat_statements', then CREATE EXTENSION pg_stat_statements): no caching opportunities".into(),
                );
                None
            }
        }
    };
    report
}

/// Per key family: the invalidations of its keys in `messages`.
fn families(mappings: &Mappings, messages: &[Broadcast], seconds: f64) -> Vec<FamilyReport> {
    // Every key and write-through template, in mapping order.
    let mut found: Vec<(
        FamilyReport,
        &crate::mapping::template::Template,
        HashMap<String, u64>,
    )> = Vec::new();
    for mapping in mappings.tables() {
        for rule in &mapping.keys {
            found.push((
                family(&mapping.table, "key", rule.template.source()),
                &rule.template,
                HashMap::new(),
            ));
        }
        for refresh in &mapping.refresh {
            found.push((
                family(&mapping.table, "refresh", refresh.key.source()),
                &refresh.key,
                HashMap::new(),
            ));
        }
    }
    for message in messages {
        for key in &message.keys {
            if let Some((_, _, keys)) = found
                .iter_mut()
                .find(|(_, template, _)| template.captures(key).is_some())
            {
                *keys.entry(key.clone()).or_insert(0) += 1;
            }
        }
    }
    found
        .into_iter()
        .map(|(mut family, _, keys)| {
            let total: u64 = keys.values().sum();
            #[allow(clippy::cast_precision_loss)]
            {
                family.invalidations_per_second = total as f64 / seconds;
                family.keys = keys.len() as u64;
                family.mean_life_seconds =
                    (total > 0).then(|| seconds * keys.len() as f64 / total as f64);
            }
            family.suggested_ttl = suggested_ttl(family.mean_life_seconds, seconds);
            family
        })
        .collect()
}

fn family(table: &TableName, kind: &'static str, template: &str) -> FamilyReport {
    FamilyReport {
        table: table.to_string(),
        kind,
        template: template.to_owned(),
        ..FamilyReport::default()
    }
}

/// A TTL for a family: evictd keeps its keys exact, so the TTL only bounds
/// how long a key nobody reads stays. Keys invalidated about every `life`
/// seconds gain nothing from living much longer: twice that, between a
/// minute and a day; a family with no invalidation in the window: a day.
fn suggested_ttl(life: Option<f64>, window: f64) -> String {
    let Some(life) = life else {
        return format!("1d (no invalidation in {window:.0}s)");
    };
    let seconds = (2.0 * life).clamp(60.0, 86_400.0);
    if seconds >= 3600.0 {
        format!("{:.0}h", (seconds / 3600.0).round())
    } else {
        format!("{:.0}m", (seconds / 60.0).round())
    }
}

/// The reads with the most time in the window over rarely written tables.
fn opportunities(
    was: &HashMap<String, (String, u64, f64)>,
    is: &HashMap<String, (String, u64, f64)>,
    seconds: f64,
    writes: &dyn Fn(&str) -> [u64; 3],
) -> Vec<Opportunity> {
    let mut found: Vec<Opportunity> = is
        .iter()
        .filter_map(|(id, (query, calls, total))| {
            let (calls_before, total_before) = was.get(id).map_or((0, 0.0), |(_, c, t)| (*c, *t));
            let calls = calls.saturating_sub(calls_before);
            let total = total - total_before;
            if calls == 0 {
                return None;
            }
            let read = parse_read(query)?;
            let table = read.table.to_string();
            let written: u64 = writes(&table).iter().sum();
            #[allow(clippy::cast_precision_loss)]
            let (calls_per_second, writes_per_second) =
                (calls as f64 / seconds, written as f64 / seconds);
            if calls_per_second < READS_PER_WRITE * writes_per_second {
                return None;
            }
            #[allow(clippy::cast_precision_loss)]
            Some(Opportunity {
                query: query.clone(),
                calls_per_second,
                mean_ms: total / calls as f64,
                total_ms: total,
                table,
                table_writes_per_second: writes_per_second,
                mapping: opportunity(&read),
            })
        })
        .collect();
    found.sort_by(|a, b| b.total_ms.total_cmp(&a.total_ms));
    found.truncate(OPPORTUNITIES);
    found
}

/// A read of one table by equality: what a cache key can stand for.
#[derive(Debug, PartialEq, Eq)]
pub struct Read {
    pub table: TableName,
    /// The columns selected (`None`: `*`).
    pub columns: Option<Vec<String>>,
    /// The columns compared with a parameter.
    pub keys: Vec<String>,
}

/// `select <columns> from <table> where <a> = $1 [and <b> = $2 ...]
/// [limit ...]`, as `pg_stat_statements` normalises it; `None` for
/// anything else (joins, ranges, sub-queries).
pub fn parse_read(query: &str) -> Option<Read> {
    let words: Vec<&str> = query.split_whitespace().collect();
    let text = words.join(" ").to_lowercase();
    let text = text.trim_end_matches(';').trim();
    let rest = text.strip_prefix("select ")?;
    let (columns, rest) = rest.split_once(" from ")?;
    let (table, rest) = rest.split_once(" where ")?;
    let rest = match rest.split_once(" limit ") {
        Some((conditions, limit)) if limit.starts_with('$') && !limit.contains(' ') => conditions,
        Some(_) => return None,
        None => rest,
    };
    let identifier = |text: &str| {
        let text = text.trim().trim_matches('"');
        crate::change::is_identifier(text).then(|| text.to_owned())
    };
    let table = TableName::parse(table.trim()).ok()?;
    let columns = if columns.trim() == "*" {
        None
    } else {
        Some(
            columns
                .split(',')
                .map(identifier)
                .collect::<Option<Vec<String>>>()?,
        )
    };
    let keys = rest
        .split(" and ")
        .map(|condition| {
            let (column, value) = condition.split_once('=')?;
            let value = value.trim();
            (value.starts_with('$') && value[1..].bytes().all(|b| b.is_ascii_digit()))
                .then_some(())?;
            identifier(column)
        })
        .collect::<Option<Vec<String>>>()?;
    Some(Read {
        table,
        columns,
        keys,
    })
}

/// The mapping that invalidates a cached `read`: its key from the
/// equality predicates, `changed` from the columns it reads.
pub fn opportunity(read: &Read) -> String {
    let placeholders: Vec<String> = read.keys.iter().map(|key| format!("{{{key}}}")).collect();
    let mut mapping = format!(
        "[[table]]\nname = \"{}\"\nkeys = [\"{}:{}\"]\n",
        read.table,
        read.table.name,
        placeholders.join(":")
    );
    if let Some(columns) = &read.columns {
        let quoted: Vec<String> = columns.iter().map(|c| format!("\"{c}\"")).collect();
        mapping.push_str(&format!("changed = [{}]\n", quoted.join(", ")));
    }
    mapping
}

/// The report as Markdown.
pub fn markdown(report: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Cache strategy report\n\nMeasured over {:.1} s.",
        report.window_seconds
    );
    if let Some(lag) = report.lag_bytes {
        let _ = writeln!(out, "The slot was {lag} bytes of WAL behind at the end.");
    }
    let _ = writeln!(out, "\n## Tables\n\n| table | writes/s | ins / upd / del | invalidated keys/s (exact, pattern, coarse, prefix) | keys per change | by pattern, prefix or coarse |\n| --- | --- | --- | --- | --- | --- |");
    for table in &report.tables {
        let modes: Vec<String> = ["exact", "pattern", "coarse", "prefix"]
            .iter()
            .map(|mode| {
                format!(
                    "{:.2}",
                    table
                        .invalidations_per_second
                        .get(*mode)
                        .copied()
                        .unwrap_or(0.0)
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "| {} | {:.2} | {} / {} / {} | {} | {} | {} |",
            table.table,
            table.writes_per_second,
            table.inserts,
            table.updates,
            table.deletes,
            modes.join(", "),
            table
                .keys_per_change
                .map_or("-".into(), |k| format!("{k:.2}")),
            table
                .broad_share
                .map_or("-".into(), |s| format!("{:.0}%", s * 100.0)),
        );
    }
    let _ = writeln!(out, "\n## Key families\n\n| table | kind | template | invalidations/s | keys | mean life between invalidations | suggested TTL |\n| --- | --- | --- | --- | --- | --- | --- |");
    for family in &report.families {
        let _ = writeln!(
            out,
            "| {} | {} | `{}` | {:.2} | {} | {} | {} |",
            family.table,
            family.kind,
            family.template.replace('|', "\\|"),
            family.invalidations_per_second,
            family.keys,
            family
                .mean_life_seconds
                .map_or("-".into(), |s| format!("{s:.1} s")),
            family.suggested_ttl
        );
    }
    if !report.hit_rates.is_empty() {
        let _ = writeln!(out, "\n## Hit rates (as the clients publish them)\n\n| cache | instances | reads/s | L1 hit rate | Redis hit rate | loads/s | fills fenced |\n| --- | --- | --- | --- | --- | --- | --- |");
        let percent =
            |share: Option<f64>| share.map_or("-".to_owned(), |s| format!("{:.1}%", s * 100.0));
        for rate in &report.hit_rates {
            let _ = writeln!(
                out,
                "| {} | {} | {:.1} | {} | {} | {:.1} | {} |",
                rate.cache,
                rate.instances,
                rate.reads_per_second,
                percent(rate.l1_hit_rate),
                percent(rate.l2_hit_rate),
                rate.loads_per_second,
                percent(rate.fenced_share)
            );
        }
    }
    if let Some(opportunities) = &report.opportunities {
        let _ = writeln!(out, "\n## Caching opportunities\n");
        if opportunities.is_empty() {
            let _ = writeln!(
                out,
                "No read by equality over a rarely written table in the window."
            );
        }
        for found in opportunities {
            let _ = writeln!(
                out,
                "- `{}`: {:.1} calls/s, {:.3} ms each, {:.0} ms in the window; {} is written {:.2} times/s. Mapping:\n\n```toml\n{}```\n",
                found.query,
                found.calls_per_second,
                found.mean_ms,
                found.total_ms,
                found.table,
                found.table_writes_per_second,
                found.mapping
            );
        }
    }
    if !report.notes.is_empty() {
        let _ = writeln!(out, "\n## Not measured\n");
        for note in &report.notes {
            let _ = writeln!(out, "- {note}");
        }
    }
    out
}

/// The report as one HTML page.
pub fn html(report: &Report) -> String {
    let markdown = markdown(report);
    let mut body = String::new();
    let mut in_table = false;
    let mut in_code = false;
    for line in markdown.lines() {
        if line.starts_with("```") {
            body.push_str(if in_code {
                "</code></pre>\n"
            } else {
                "<pre><code>"
            });
            in_code = !in_code;
            continue;
        }
        if in_code {
            body.push_str(&escape(line));
            body.push('\n');
            continue;
        }
        if let Some(cells) = line.strip_prefix('|') {
            if line.starts_with("| ---") {
                continue;
            }
            let tag = if in_table { "td" } else { "th" };
            if !in_table {
                body.push_str("<table>\n");
                in_table = true;
            }
            body.push_str("<tr>");
            for cell in cells.trim_end_matches('|').split(" | ") {
                let cell = cell.trim().replace("\\|", "|");
                body.push_str(&format!("<{tag}>{}</{tag}>", escape(&cell)));
            }
            body.push_str("</tr>\n");
            continue;
        }
        if in_table {
            body.push_str("</table>\n");
            in_table = false;
        }
        if let Some(title) = line.strip_prefix("## ") {
            body.push_str(&format!("<h2>{}</h2>\n", escape(title)));
        } else if let Some(title) = line.strip_prefix("# ") {
            body.push_str(&format!("<h1>{}</h1>\n", escape(title)));
        } else if let Some(item) = line.strip_prefix("- ") {
            body.push_str(&format!("<p>{}</p>\n", escape(item)));
        } else if !line.is_empty() {
            body.push_str(&format!("<p>{}</p>\n", escape(line)));
        }
    }
    if in_table {
        body.push_str("</table>\n");
    }
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>evictd cache strategy report</title>\n<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}</style></head>\n<body>\n{body}</body></html>\n"
    )
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_by_equality_become_mappings() {
        let read = parse_read("SELECT name, price FROM items WHERE id = $1").unwrap();
        assert_eq!(read.keys, ["id"]);
        assert_eq!(
            opportunity(&read),
            "[[table]]\nname = \"public.items\"\nkeys = [\"items:{id}\"]\nchanged = [\"name\", \"price\"]\n"
        );
        let read =
            parse_read("select * from shop.orders where user_id = $1 and status = $2 limit $3")
                .unwrap();
        assert_eq!(
            (read.table.to_string(), read.keys.len(), read.columns),
            ("shop.orders".into(), 2, None)
        );
        assert_eq!(parse_read("select a from t where id > $1"), None);
        assert_eq!(
            parse_read("select a from t join u on t.id = u.id where t.id = $1"),
            None
        );
        assert_eq!(parse_read("update t set a = $1 where id = $2"), None);
    }

    #[test]
    fn hit_rates_sum_each_caches_instances() {
        let counters = |pairs: &[(&str, u64)]| -> HashMap<String, u64> {
            pairs.iter().map(|(n, v)| ((*n).to_owned(), *v)).collect()
        };
        let start = Instant::now();
        let before = Sample {
            at: Some(start),
            clients: [
                (
                    "a".to_owned(),
                    (
                        "users".to_owned(),
                        counters(&[("hits", 100), ("misses", 10)]),
                    ),
                ),
                (
                    "b".to_owned(),
                    ("users".to_owned(), counters(&[("hits", 500)])),
                ),
            ]
            .into(),
            ..Sample::default()
        };
        let after = Sample {
            at: Some(start + Duration::from_secs(10)),
            clients: [
                // 60 more hits, 20 more misses, 20 L1 hits.
                (
                    "a".to_owned(),
                    (
                        "users".to_owned(),
                        counters(&[("hits", 160), ("misses", 30), ("l1_hits", 20)]),
                    ),
                ),
                // Restarted: its new totals count.
                (
                    "b".to_owned(),
                    ("users".to_owned(), counters(&[("hits", 20)])),
                ),
                // New in the window.
                (
                    "c".to_owned(),
                    (
                        "orders".to_owned(),
                        counters(&[("misses", 5), ("fills", 4), ("fenced", 1)]),
                    ),
                ),
            ]
            .into(),
            ..Sample::default()
        };
        let rates = hit_rates(&before, &after, 10.0);
        let users = rates.iter().find(|r| r.cache == "users").unwrap();
        assert_eq!(users.instances, 2);
        assert!((users.reads_per_second - 12.0).abs() < 1e-9);
        assert!((users.l1_hit_rate.unwrap() - 20.0 / 120.0).abs() < 1e-9);
        assert!((users.l2_hit_rate.unwrap() - 80.0 / 100.0).abs() < 1e-9);
        let orders = rates.iter().find(|r| r.cache == "orders").unwrap();
        assert_eq!(
            (orders.l2_hit_rate, orders.fenced_share),
            (Some(0.0), Some(0.2))
        );
    }

    #[test]
    fn windows_and_ttls() {
        assert_eq!(parse_window("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_window("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_window("90"), Ok(Duration::from_secs(90)));
        assert!(parse_window("0.5s").is_err() && parse_window("5 parsecs").is_err());
        assert_eq!(suggested_ttl(Some(10.0), 60.0), "1m");
        assert_eq!(suggested_ttl(Some(900.0), 60.0), "30m");
        assert_eq!(suggested_ttl(Some(1e9), 60.0), "24h");
        assert!(suggested_ttl(None, 60.0).starts_with("1d"));
    }

    #[test]
    fn rates_come_from_the_deltas() {
        let mappings = crate::mapping::compile::load_str(
            "m.toml",
            "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\n",
            crate::mapping::compile::Limits::default(),
        )
        .unwrap();
        let start = Instant::now();
        let before = Sample {
            at: Some(start),
            writes: [("public.orders".to_owned(), [10, 5, 0])].into(),
            invalidated: [("public.orders exact".to_owned(), 7)].into(),
            ..Sample::default()
        };
        let after = Sample {
            at: Some(start + Duration::from_secs(10)),
            writes: [("public.orders".to_owned(), [30, 25, 0])].into(),
            invalidated: [
                ("public.orders exact".to_owned(), 47),
                ("public.orders coarse".to_owned(), 10),
            ]
            .into(),
            ..Sample::default()
        };
        let message: Broadcast = serde_json::from_str(
            r#"{"v":1,"epoch":"e","seq":1,"keys":["order:1","order:2","order:1"]}"#,
        )
        .unwrap();
        let report = compare(&mappings, &before, &after, &[message]);
        let table = &report.tables[0];
        assert_eq!((table.inserts, table.updates, table.deletes), (20, 20, 0));
        assert!((table.writes_per_second - 4.0).abs() < 1e-9);
        assert!((table.invalidations_per_second["exact"] - 4.0).abs() < 1e-9);
        assert!((table.broad_share.unwrap() - 0.2).abs() < 1e-9);
        assert!((table.keys_per_change.unwrap() - 1.25).abs() < 1e-9);
        let family = &report.families[0];
        assert_eq!((family.keys, family.template.as_str()), (2, "order:{id}"));
        assert!((family.mean_life_seconds.unwrap() - 10.0 * 2.0 / 3.0).abs() < 1e-9);
        assert!(report
            .notes
            .iter()
            .any(|n| n.contains("pg_stat_statements is not installed")));
        assert!(report
            .notes
            .iter()
            .any(|n| n.contains("no client publishes its counters")));
        assert!(markdown(&report).contains("| public.orders | 4.00 | 20 / 20 / 0 |"));
        assert!(html(&report).contains("<td>public.orders</td>"));

        // Redis refused the clients' counters: said so, not "no client".
        let refused = Sample {
            clients_error: Some("ZRANGEBYSCORE evictd:clients: NOPERM".into()),
            ..Sample::default()
        };
        let report = compare(&mappings, &refused, &after, &[]);
        assert!(report.notes.iter().any(|n| n
            .contains("the clients' published counters could not be read from Redis (ZRANGEBYSCORE evictd:clients: NOPERM)")));
        assert!(!report
            .notes
            .iter()
            .any(|n| n.contains("no client publishes")));
    }
}
