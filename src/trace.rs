//! `evictd trace KEY`: why a key holds what it holds. Which mapping rules
//! render it (and with which values), the rows it stands for, what Redis
//! holds (and, for a write-through key, whether it equals what a refresh
//! would write now), the tag sets it is registered in, the recent
//! invalidations of it in the broadcast log, and a one-line verdict.
//!
//! What is decided without IO ([`matches`], [`mode_of`], [`verdict`]) is
//! kept apart from the reads ([`trace`]).

use std::collections::BTreeMap;

use evictd_client::protocol::{
    glob_matches, Broadcast, Stored, L1_LOG_FIELD, L1_LOG_KEY, TAG_NAMESPACE, VERSION_NAMESPACE,
};
use evictd_client::Connection;
use serde::Serialize;

use crate::audit::{record_passes, verify_refresh, Outcome, Target};
use crate::change::TableName;
use crate::config::{Config, SourceKind};
use crate::error::Error;
use crate::mapping::template::{Capture, Template};
use crate::mapping::{Mappings, TableMapping};
use crate::rows::Database;
use crate::servers::connect_redis;
use crate::sql::{equalities, quote_ident, quote_literal, select_columns};

/// How many log entries are read back, newest first, at most.
pub const LOG_READ: usize = 10_000;
/// How many invalidations are kept, newest first.
pub const INVALIDATIONS_KEPT: usize = 10;
/// How many rows are read per rule.
const ROWS_READ: usize = 5;
/// How much of a cached value is shown.
const VALUE_SHOWN: usize = 200;
/// A cached "no row" (negative caching), as the clients store it.
const ABSENT: &str = "\u{0}evictd:absent";

/// Everything `trace` found about one key.
#[derive(Debug, Default, Serialize)]
pub struct Trace {
    /// The key as the mappings render it (without the prefix).
    pub key: String,
    /// The mapping rules that can render it.
    pub rules: Vec<RuleMatch>,
    /// The rows it stands for, per rule whose values select them.
    pub rows: Vec<RowsRead>,
    /// What Redis holds under it.
    pub redis: Held,
    /// The tags its rows render (their invalidations reach the key when
    /// it was filled with them).
    pub tags: Vec<String>,
    /// Those of `tags` whose sets hold the key now.
    pub tag_sets: Vec<String>,
    /// For a write-through key: whether it equals what a refresh of its
    /// row would write now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh: Option<RefreshCheck>,
    /// The broadcast (`epoch:seq`) that last carried an invalidation of
    /// it, within the log read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_carried: Option<String>,
    /// Its recent invalidations in the broadcast log, newest first.
    pub invalidations: Vec<Invalidation>,
    /// How many log entries were read (the log's length, up to
    /// `LOG_READ`).
    pub log_read: usize,
    /// Why the rows were not read, when they were not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows_skipped: Option<String>,
    pub verdict: Verdict,
}

impl Trace {
    /// Leaves out what the database and the cache hold (the rows, the
    /// tags rendered from them, the cached value, a write-through key's
    /// difference from its row), saying why; the verdict is made again
    /// from what is left.
    pub fn hide_values(&mut self, why: &str) {
        if !self.rows.is_empty() {
            self.rows.clear();
            self.rows_skipped = Some(why.to_owned());
        }
        self.tags.clear();
        self.tag_sets.clear();
        self.redis.value = None;
        if let Some(check) = &mut self.refresh {
            check.why = match check.outcome {
                "consistent" => "equals what a refresh of its row would write now".into(),
                "stale" => "differs from what a refresh of its row would write now".into(),
                _ => "could not be compared with its row".into(),
            };
        }
        self.verdict = verdict(self);
    }
}

/// One rule that renders the key, and the values it was rendered with.
#[derive(Debug, Serialize)]
pub struct RuleMatch {
    pub table: String,
    /// `key`, `refresh` (a write-through key), `prefix` (every key under a
    /// rendered prefix) or `namespace` (a versioned key's namespace).
    pub kind: &'static str,
    pub template: String,
    /// Where the rule is written (`file:line`).
    pub at: String,
    /// Each placeholder as written, with the text the key holds for it.
    pub values: BTreeMap<String, String>,
    /// What of the key the template rendered: the key, a `prefix` rule's
    /// prefix, a `namespace` rule's namespace.
    #[serde(skip)]
    pub rendered: String,
    /// The SQL condition that selects the rows, when every placeholder can
    /// be read back: a column's text, a json path into it (`#>>`), either
    /// with `lower`, `upper` or `trim` (not `hash` or the date
    /// truncations).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lookup: Option<String>,
}

/// The rows of one rule's table its values select.
#[derive(Debug, Serialize)]
pub struct RowsRead {
    pub table: String,
    pub filter: String,
    /// Each row's mapped columns as text (`None`: NULL); at most five.
    pub rows: Vec<BTreeMap<String, Option<String>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What the key holds in Redis.
#[derive(Debug, Default, Serialize)]
pub struct Held {
    /// `absent`, `value`, `no row` (a cached "no such row"), `loading` (a
    /// reader's fill lease) or `reloading` (a value a reader reloads).
    pub state: &'static str,
    /// The value, cut to 200 characters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Milliseconds to its expiry; `None` without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<i64>,
    /// The apply stamp its fill recorded (measured consistency).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stamp: Option<u64>,
}

/// A write-through key against its row.
#[derive(Debug, Serialize)]
pub struct RefreshCheck {
    /// `consistent`, `stale` or `unverifiable`.
    pub outcome: &'static str,
    pub why: String,
}

/// One logged invalidation of the key.
#[derive(Debug, Clone, Serialize)]
pub struct Invalidation {
    /// When evictd logged it (UTC, from the log entry's id).
    pub at: String,
    /// The broadcast, `epoch:seq`.
    pub message: String,
    /// The WAL position of the batch (Postgres source).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    /// The mapped tables whose changes the batch held.
    pub tables: Vec<String>,
    /// The operations of the batch's changes, by table (`insert`,
    /// `update`, `delete`, `truncate`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub ops: BTreeMap<String, Vec<String>>,
    /// `exact` (the key itself), `refresh` (a write-through key written
    /// or deleted by its refresh), `tag`, `tag pattern`, `prefix`, `pattern`
    /// (a family: TRUNCATE, or a coarse invalidation after lost
    /// continuity) or `namespace` (its namespace's version bumped).
    pub mode: &'static str,
    /// What matched: the key, the tag, the pattern or the counter.
    pub by: String,
    /// The batch's apply stamp, when evictd's consistency checker ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stamp: Option<u64>,
}

/// The one-line answer.
#[derive(Debug, Default, Serialize)]
pub struct Verdict {
    /// `exact`, `stale` or `unmapped` (no mapping renders the key, so
    /// evictd never invalidates it).
    pub state: &'static str,
    pub why: String,
}

/// Every rule of `mappings` that can render `key`: key templates, write-
/// through keys, prefixes, and the namespace of a versioned key
/// (`namespace@version:rest`).
pub fn matches(mappings: &Mappings, key: &str) -> Vec<RuleMatch> {
    let mut found = Vec::new();
    for mapping in mappings.tables() {
        let table = mapping.table.to_string();
        let mut push =
            |kind, template: &Template, origin, rendered: &str, captures: Vec<Capture>| {
                found.push(rule_match(
                    mappings, &table, kind, template, origin, rendered, captures,
                ));
            };
        for rule in &mapping.keys {
            if let Some(captures) = rule.template.captures(key) {
                push("key", &rule.template, rule.origin, key, captures);
            }
        }
        for refresh in &mapping.refresh {
            if let Some(captures) = refresh.key.captures(key) {
                push("refresh", &refresh.key, refresh.origin, key, captures);
            }
        }
        for rule in &mapping.prefixes {
            if let Some((prefix, captures)) = rule.template.captures_prefix(key) {
                push("prefix", &rule.template, rule.origin, prefix, captures);
            }
        }
        for namespace in namespaces(key) {
            for rule in &mapping.versions {
                if let Some(captures) = rule.template.captures(namespace) {
                    push(
                        "namespace",
                        &rule.template,
                        rule.origin,
                        namespace,
                        captures,
                    );
                }
            }
        }
    }
    found
}

fn rule_match(
    mappings: &Mappings,
    table: &str,
    kind: &'static str,
    template: &Template,
    origin: crate::mapping::OriginId,
    rendered: &str,
    captures: Vec<Capture>,
) -> RuleMatch {
    let lookup = lookup(&captures);
    RuleMatch {
        rendered: rendered.to_owned(),
        table: table.to_owned(),
        kind,
        template: template.source().to_owned(),
        at: mappings.origin(origin).file_line(),
        values: captures
            .into_iter()
            .map(|c| (c.placeholder, c.value))
            .collect(),
        lookup,
    }
}

/// The SQL condition selecting the rows whose values render `captures`,
/// if every one can be read back.
fn lookup(captures: &[Capture]) -> Option<String> {
    if captures.iter().all(|c| c.exact) {
        return Some(equalities(
            captures
                .iter()
                .map(|c| (c.column.as_str(), c.value.as_str())),
        ));
    }
    let conditions = captures
        .iter()
        .map(|capture| {
            let mut expression = quote_ident(&capture.column);
            if !capture.path.is_empty() {
                let steps: Vec<String> = capture
                    .path
                    .iter()
                    .map(|step| format!("\"{}\"", step.replace('\\', "\\\\").replace('"', "\\\"")))
                    .collect();
                expression = format!(
                    "{expression} #>> {}",
                    quote_literal(&format!("{{{}}}", steps.join(",")))
                );
            }
            match capture.transform {
                None => {}
                Some(name @ ("lower" | "upper" | "trim")) => {
                    expression = format!("{name}(({expression})::text)");
                }
                Some(_) => return None,
            }
            Some(format!("{expression} = {}", quote_literal(&capture.value)))
        })
        .collect::<Option<Vec<String>>>()?;
    Some(if conditions.is_empty() {
        "true".to_owned()
    } else {
        conditions.join(" and ")
    })
}

/// The namespaces a versioned key can have: what comes before each
/// `@<digits>:` in it.
fn namespaces(key: &str) -> Vec<&str> {
    key.match_indices('@')
        .filter(|(at, _)| {
            let rest = &key[at + 1..];
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            digits > 0 && rest.as_bytes().get(digits) == Some(&b':')
        })
        .map(|(at, _)| &key[..at])
        .collect()
}

/// How `message` invalidated `key` (registered under `tags`, within the
/// namespaces `counters`), if it did: the strongest reason first.
pub fn mode_of(
    message: &Broadcast,
    key: &str,
    tags: &[String],
    counters: &[String],
    prefixes: &[String],
) -> Option<(&'static str, String)> {
    if message.keys.iter().any(|k| k == key) {
        return Some(("exact", key.to_owned()));
    }
    if let Some(tag) = message.tags.iter().find(|t| tags.contains(t)) {
        return Some(("tag", tag.clone()));
    }
    if let Some(counter) = message.keys.iter().find(|k| counters.contains(k)) {
        return Some(("namespace", counter.clone()));
    }
    if let Some(pattern) = message
        .tag_patterns
        .iter()
        .find(|p| tags.iter().any(|tag| glob_matches(p, tag)))
    {
        return Some(("tag pattern", pattern.clone()));
    }
    let pattern = message.patterns.iter().find(|p| glob_matches(p, key))?;
    let mode = if prefixes.iter().any(|prefix| *pattern == glob_under(prefix)) {
        "prefix"
    } else {
        "pattern"
    };
    Some((mode, pattern.clone()))
}

/// The glob evictd deletes every key under `prefix` with.
fn glob_under(prefix: &str) -> String {
    let mut glob = String::with_capacity(prefix.len() + 1);
    crate::mapping::template::escape_glob(prefix, &mut glob);
    glob.push('*');
    glob
}

/// The verdict from what was found.
pub fn verdict(trace: &Trace) -> Verdict {
    let last = trace.invalidations.first();
    let since = |what: &str| match last {
        Some(last) => format!(
            "{what}; evictd last invalidated it at {} ({}, by {} {})",
            last.at, last.message, last.mode, last.by
        ),
        None => format!(
            "{what}; no invalidation of it in the last {} broadcasts",
            trace.log_read
        ),
    };
    if trace.rules.is_empty() {
        return Verdict {
            state: "unmapped",
            why: "no mapping renders this key, so evictd never invalidates it: only its TTL or the application removes it".into(),
        };
    }
    if let Some(check) = &trace.refresh {
        let state = if check.outcome == "stale" {
            "stale"
        } else {
            "exact"
        };
        if check.outcome != "unverifiable" {
            return Verdict {
                state,
                why: format!("the write-through value {}", check.why),
            };
        }
    }
    match trace.redis.state {
        "absent" => Verdict {
            state: "exact",
            why: since("not cached"),
        },
        "loading" => Verdict {
            state: "exact",
            why: since("a reader is filling it (its lease is in the key; a fenced fill is refused if evictd invalidates it first)"),
        },
        _ => {
            if let (Some(recorded), Some(stamp)) =
                (trace.redis.stamp, last.and_then(|last| last.stamp))
            {
                if recorded < stamp {
                    return Verdict {
                        state: "stale",
                        why: format!(
                            "its fill read apply stamp {recorded}, before the invalidation {} (stamp {stamp}): it was loaded before that change and stored after its invalidation",
                            last.map_or("", |last| last.message.as_str())
                        ),
                    };
                }
            }
            Verdict {
                state: "exact",
                why: since("cached, filled after its last invalidation (a fenced fill cannot store a row read before it)"),
            }
        }
    }
}

/// `public.orders(update,delete),public.users(insert)`: the batch's tables
/// with the operations of its changes; `-` when it names none.
fn tables_with_ops(invalidation: &Invalidation) -> String {
    if invalidation.tables.is_empty() {
        return "-".to_owned();
    }
    let with_ops = |table: &String| match invalidation.ops.get(table) {
        Some(ops) if !ops.is_empty() => format!("{table}({})", ops.join(",")),
        _ => table.clone(),
    };
    invalidation
        .tables
        .iter()
        .map(with_ops)
        .collect::<Vec<_>>()
        .join(",")
}

/// Traces `key` (without the prefix): see the module's documentation.
pub async fn trace(config: &Config, mappings: &Mappings, key: &str) -> Result<Trace, Error> {
    let mut redis = connect_redis(&config.redis).await?;
    let prefix = &config.redis.prefix;
    let full = format!("{prefix}{key}");
    let mut trace = Trace {
        key: key.to_owned(),
        rules: matches(mappings, key),
        ..Trace::default()
    };
    trace.redis = held(&mut redis, &full).await?;

    // The rows, the tags they give the key, the write-through check.
    let mut tags: Vec<String> = Vec::new();
    let database = match &config.postgres.url {
        Some(url) => Some(Database::new(url.clone())),
        None => {
            trace.rows_skipped = Some("postgres.url is not set: the rows are not read".into());
            None
        }
    };
    if let Some(mut database) = database {
        // A write-through value is compared once evictd has applied
        // everything committed before the row was read (the Postgres
        // source's continuity record says how far it got).
        let reader = redis.clone();
        let record = format!(
            "{prefix}{}",
            crate::continuity::record_key(&config.postgres.slot)
        );
        let kafka = matches!(config.source, SourceKind::Kafka);
        let applied = |lsn| {
            let mut redis = reader.clone();
            let record = record.clone();
            async move {
                if kafka {
                    return Err("the Kafka source keeps no continuity record to wait for: a difference may be a change in flight".to_owned());
                }
                record_passes(&mut redis, &record, lsn).await
            }
        };
        for rule in &trace.rules {
            let (Some(filter), Ok(table)) = (&rule.lookup, TableName::parse(&rule.table)) else {
                continue;
            };
            let Some(mapping) = mappings.table(&table) else {
                continue;
            };
            database.learn(&table).await;
            let (read, row_tags) = read_rows(&database, mapping, filter).await;
            tags.extend(row_tags);
            trace.rows.push(read);
            if rule.kind == "refresh" && trace.refresh.is_none() {
                if let Some(refresh) = mapping
                    .refresh
                    .iter()
                    .find(|r| r.key.source() == rule.template)
                {
                    let target = Target {
                        table: &table,
                        refresh,
                        filter,
                        full: &full,
                    };
                    let checked = verify_refresh(&database, &mut redis, &target, applied).await;
                    trace.refresh = Some(RefreshCheck {
                        outcome: match checked.outcome {
                            Outcome::Consistent => "consistent",
                            Outcome::Stale => "stale",
                            Outcome::Unverifiable => "unverifiable",
                        },
                        why: checked.why,
                    });
                }
            }
        }
    }
    tags.sort();
    tags.dedup();
    trace.tags = tags.clone();
    for tag in tags {
        let member: bool = redis::cmd("SISMEMBER")
            .arg(format!("{prefix}{TAG_NAMESPACE}{tag}"))
            .arg(&full)
            .query_async(&mut redis)
            .await
            .map_err(|e| Error::redis("SISMEMBER failed", e))?;
        if member {
            trace.tag_sets.push(tag);
        }
    }

    // The broadcast log, newest first.
    let rendered_by = |kind: &'static str| {
        trace
            .rules
            .iter()
            .filter(move |rule| rule.kind == kind)
            .map(|rule| rule.rendered.clone())
    };
    let counters: Vec<String> = rendered_by("namespace")
        .map(|namespace| format!("{VERSION_NAMESPACE}{namespace}"))
        .collect();
    let prefixes: Vec<String> = rendered_by("prefix").collect();
    let entries: Vec<(String, Vec<String>)> = redis::cmd("XREVRANGE")
        .arg(format!("{prefix}{L1_LOG_KEY}"))
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(LOG_READ)
        .query_async(&mut redis)
        .await
        .map_err(|e| Error::redis("XREVRANGE of the broadcast log failed", e))?;
    trace.log_read = entries.len();
    let written_through = trace.rules.iter().any(|rule| rule.kind == "refresh");
    for (id, fields) in &entries {
        let Some(message) = fields
            .chunks(2)
            .find(|pair| pair[0] == L1_LOG_FIELD)
            .and_then(|pair| pair.get(1))
            .and_then(|text| serde_json::from_str::<Broadcast>(text).ok())
        else {
            continue;
        };
        let Some((mut mode, by)) = mode_of(&message, key, &trace.tags, &counters, &prefixes) else {
            continue;
        };
        if mode == "exact" && written_through {
            // A write-through key in a batch's keys was written (or
            // deleted, its row gone) by the refresh.
            mode = "refresh";
        }
        if trace.last_carried.is_none() {
            trace.last_carried = Some(format!("{}:{}", message.epoch, message.seq));
        }
        trace.invalidations.push(Invalidation {
            at: entry_time(id),
            message: format!("{}:{}", message.epoch, message.seq),
            lsn: message.lsn.clone(),
            tables: message.tables.clone(),
            ops: message.ops.clone(),
            mode,
            by,
            stamp: message.stamp,
        });
        if trace.invalidations.len() == INVALIDATIONS_KEPT {
            break;
        }
    }
    trace.verdict = verdict(&trace);
    Ok(trace)
}

/// The rows of `mapping`'s table matching `filter` (every column the
/// mapping reads), and the tags the entry renders from them.
async fn read_rows(
    database: &Database,
    mapping: &TableMapping,
    filter: &str,
) -> (RowsRead, Vec<String>) {
    let table = &*mapping.table;
    let columns = mapping.columns();
    let mut read = RowsRead {
        table: table.to_string(),
        filter: filter.to_owned(),
        rows: Vec::new(),
        error: None,
    };
    let sql = format!(
        "{} where {filter} limit {ROWS_READ}",
        select_columns(table, &columns)
    );
    let texts = match database.query(&sql).await {
        Ok(texts) => texts,
        Err(error) => {
            read.error = Some(crate::rows::error_chain(&error));
            return (read, Vec::new());
        }
    };
    read.rows = texts
        .iter()
        .map(|row| {
            columns
                .iter()
                .map(|c| (*c).to_owned())
                .zip(row.iter().cloned())
                .collect()
        })
        .collect();
    let mut tags = Vec::new();
    if let Ok(rows) = database.rows(table, &columns, texts) {
        for row in &rows {
            for rule in &mapping.tags {
                if let Ok(tag) = rule.template.render(|column| row.get(column)) {
                    tags.push(tag);
                }
            }
        }
    }
    (read, tags)
}

/// What `full` holds: its state, value, expiry and recorded stamp.
async fn held(redis: &mut Connection, full: &str) -> Result<Held, Error> {
    let (raw, ttl): (Option<String>, i64) = redis::pipe()
        .cmd("GET")
        .arg(full)
        .cmd("PTTL")
        .arg(full)
        .query_async(redis)
        .await
        .map_err(|e| Error::redis("GET failed", e))?;
    let Some(raw) = raw else {
        return Ok(Held {
            state: "absent",
            ..Held::default()
        });
    };
    let stamp = Stored::stamp(&raw);
    let (state, value) = match Stored::parse(&raw) {
        Stored::Loading => ("loading", None),
        Stored::Reloading(value) => ("reloading", Some(value)),
        Stored::Value(value) if value == ABSENT => ("no row", None),
        Stored::Value(value) => ("value", Some(value)),
    };
    Ok(Held {
        state,
        value: value.map(|value| shortened(value, VALUE_SHOWN)),
        ttl_ms: (ttl >= 0).then_some(ttl),
        stamp,
    })
}

fn shortened(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_owned(),
    }
}

/// A stream entry id's time (`<ms>-<seq>`) as UTC, RFC 3339 to the
/// millisecond.
fn entry_time(id: &str) -> String {
    let Some(ms) = id.split('-').next().and_then(|ms| ms.parse::<u64>().ok()) else {
        return id.to_owned();
    };
    utc_text(ms)
}

/// `ms` since 1970 as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn utc_text(ms: u64) -> String {
    let seconds = ms / 1000;
    let days = i64::try_from(seconds / 86_400).unwrap_or(0);
    let rest = seconds % 86_400;
    // Days to a civil date (proleptic Gregorian), after H. Hinnant.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        ms % 1000
    )
}

/// The trace as text: one section per finding, the verdict last.
pub fn text(trace: &Trace) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "key: {}", trace.key);
    if trace.rules.is_empty() {
        let _ = writeln!(out, "rules: none renders it");
    } else {
        let _ = writeln!(out, "rules:");
    }
    for rule in &trace.rules {
        let values: Vec<String> = rule
            .values
            .iter()
            .map(|(placeholder, value)| format!("{placeholder}={value}"))
            .collect();
        let _ = writeln!(
            out,
            "  {} {} \"{}\" ({}){}",
            rule.table,
            rule.kind,
            rule.template,
            rule.at,
            if values.is_empty() {
                String::new()
            } else {
                format!(": {}", values.join(" "))
            }
        );
    }
    if let Some(why) = &trace.rows_skipped {
        let _ = writeln!(out, "rows: {why}");
    }
    for read in &trace.rows {
        let _ = writeln!(out, "rows of {} where {}:", read.table, read.filter);
        if let Some(error) = &read.error {
            let _ = writeln!(out, "  cannot read them: {error}");
        } else if read.rows.is_empty() {
            let _ = writeln!(out, "  none");
        }
        for row in &read.rows {
            let columns: Vec<String> = row
                .iter()
                .map(|(column, value)| match value {
                    Some(value) => format!("{column}={value}"),
                    None => format!("{column}=NULL"),
                })
                .collect();
            let _ = writeln!(out, "  {}", columns.join(" "));
        }
    }
    let held = &trace.redis;
    let mut redis = format!("redis: {}", held.state);
    if let Some(ttl) = held.ttl_ms {
        let _ = write!(redis, ", expires in {ttl} ms");
    } else if held.state != "absent" {
        redis.push_str(", no expiry");
    }
    if let Some(stamp) = held.stamp {
        let _ = write!(redis, ", fill stamp {stamp}");
    }
    if let Some(value) = &held.value {
        let _ = write!(redis, ": {value}");
    }
    let _ = writeln!(out, "{redis}");
    if !trace.tags.is_empty() {
        let held: Vec<String> = trace
            .tags
            .iter()
            .map(|tag| {
                if trace.tag_sets.contains(tag) {
                    format!("{tag} (its set holds the key)")
                } else {
                    tag.clone()
                }
            })
            .collect();
        let _ = writeln!(out, "tags of its rows: {}", held.join(", "));
    }
    if let Some(check) = &trace.refresh {
        let _ = writeln!(out, "write-through: {}: {}", check.outcome, check.why);
    }
    if let Some(last) = &trace.last_carried {
        let _ = writeln!(out, "L1: last carried by broadcast {last}");
    }
    if trace.invalidations.is_empty() {
        let _ = writeln!(
            out,
            "invalidations: none in the last {} broadcasts",
            trace.log_read
        );
    } else {
        let _ = writeln!(out, "invalidations (newest first):");
    }
    for invalidation in &trace.invalidations {
        let _ = writeln!(
            out,
            "  {} {}{} {} {} {}",
            invalidation.at,
            invalidation.message,
            invalidation
                .lsn
                .as_deref()
                .map_or_else(String::new, |lsn| format!(" lsn={lsn}")),
            tables_with_ops(invalidation),
            invalidation.mode,
            invalidation.by
        );
    }
    let _ = writeln!(
        out,
        "verdict: {}: {}",
        trace.verdict.state, trace.verdict.why
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mappings(text: &str) -> Mappings {
        crate::mapping::compile::load_str(
            "m.toml",
            text,
            crate::mapping::compile::Limits::default(),
        )
        .expect("the mapping compiles")
    }

    #[test]
    fn matches_name_each_rule_that_renders_the_key() {
        let m = mappings(
            r#"
[[table]]
name = "orders"
keys = ["order:{id}", "user:{user_id}:orders"]
tags = ["user:{user_id}"]
versions = ["user:{user_id}"]

[[table.refresh]]
key = "order:{id}:status"
columns = ["status"]

[[table]]
name = "categories"
keys = ["category:{slug|lower}"]
prefixes = ["category:{id}:"]
"#,
        );
        let found = matches(&m, "order:7");
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].kind, found[0].template.as_str()),
            ("key", "order:{id}")
        );
        assert_eq!(found[0].lookup.as_deref(), Some("\"id\" = '7'"));
        assert_eq!(found[0].at, "m.toml:4");
        let found = matches(&m, "order:7:status");
        assert_eq!(found[0].kind, "refresh");
        // A transform that can be read back, and one that cannot.
        let found = matches(&m, "category:books");
        assert_eq!(
            (found[0].kind, found[0].lookup.as_deref()),
            ("key", Some("lower((\"slug\")::text) = 'books'"))
        );
        let m2 = mappings(
            "[[table]]\nname = \"events\"\nkeys = [\"day:{at|date}\", \"item:{payload.item.id}\"]\n",
        );
        assert_eq!(matches(&m2, "day:2024-12-03")[0].lookup, None);
        assert_eq!(
            matches(&m2, "item:7")[0].lookup.as_deref(),
            Some("\"payload\" #>> '{\"item\",\"id\"}' = '7'")
        );
        let found = matches(&m, "category:5:page:2");
        assert_eq!(found.iter().map(|f| f.kind).collect::<Vec<_>>(), ["prefix"]);
        assert_eq!(found[0].values["id"], "5");
        let found = matches(&m, "user:3@1733216400000001:dashboard");
        assert_eq!(
            found.iter().map(|f| f.kind).collect::<Vec<_>>(),
            ["namespace"]
        );
        assert!(matches(&m, "session:9").is_empty());
    }

    #[test]
    fn each_way_a_message_invalidates_a_key_is_named() {
        let message = |json: &str| -> Broadcast { serde_json::from_str(json).unwrap() };
        let key = "category:5:page:2";
        let tags = ["category:5".to_owned()];
        let prefixes = ["category:5:".to_owned()];
        let of = |json| mode_of(&message(json), key, &tags, &[], &prefixes);
        assert_eq!(
            of(r#"{"v":1,"epoch":"e","seq":1,"keys":["category:5:page:2"]}"#),
            Some(("exact", key.to_owned()))
        );
        assert_eq!(
            of(r#"{"v":1,"epoch":"e","seq":1,"tags":["category:5"]}"#),
            Some(("tag", "category:5".to_owned()))
        );
        assert_eq!(
            of(r#"{"v":1,"epoch":"e","seq":1,"patterns":["category:5:*"]}"#),
            Some(("prefix", "category:5:*".to_owned()))
        );
        assert_eq!(
            of(r#"{"v":1,"epoch":"e","seq":1,"patterns":["category:*"]}"#),
            Some(("pattern", "category:*".to_owned()))
        );
        assert_eq!(
            of(r#"{"v":1,"epoch":"e","seq":1,"tag_patterns":["category:*"]}"#),
            Some(("tag pattern", "category:*".to_owned()))
        );
        assert_eq!(
            of(r#"{"v":1,"epoch":"e","seq":1,"keys":["category:6:page:2"]}"#),
            None
        );
    }

    #[test]
    fn times_are_utc() {
        assert_eq!(utc_text(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc_text(1_733_216_400_123), "2024-12-03T09:00:00.123Z");
        assert_eq!(utc_text(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(entry_time("1733216400123-0"), "2024-12-03T09:00:00.123Z");
    }
}
