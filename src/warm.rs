//! Cache warming: `evictd warm` (and `[warm] on_start`) fills the
//! write-through refresh keys of the mapped tables from the database before
//! traffic needs them, the whole table page by page in primary-key order,
//! or the rows a `[[table.warm]]` query names first.
//!
//! It never overwrites a value, and never stores one older than the
//! database. Each page's keys are rendered from its rows, and a key that
//! holds a value (evictd's or a client's, or another reader's lease) is
//! left alone. The values are stored one of two ways:
//!
//! - **In one pass**, on a standalone Redis. Before the page's rows are
//!   read, warming reads evictd's apply epoch
//!   ([`crate::apply::shared::EPOCH_KEY`], incremented ahead of every
//!   batch's invalidations). One script then checks that the epoch is
//!   unchanged and stores every value with `SET NX`. An unchanged epoch
//!   means no invalidation was applied since before the read, so any change
//!   the read missed is applied later, over the stored value.
//! - **With leases**, when the epoch moved (evictd applied a batch
//!   meanwhile) and always on a Cluster: the way a client fills
//!   (`docs/PROTOCOL.md`). A fill lease on each key that holds nothing
//!   (`SET NX`), the rows read again, and each value stored with
//!   `fill.lua`, which refuses if anything invalidated the key since the
//!   lease was taken.
//!
//! Either way a change committed while warming, and applied by a running
//! `evictd run`, is never overwritten by what warming read before it.

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use evictd_client::protocol::{lease, stamped, AUDIT_STAMP_KEY, FILL_SCRIPT, RELEASE_SCRIPT};
use evictd_client::Connection;
use rand::Rng as _;

use crate::audit::{
    connect_redis, quote_ident, quote_table, refreshed_tables, select_columns, Database,
};
use crate::change::{Op, Row, RowChange, TableName};
use crate::config::Config;
use crate::error::{Error, ErrorKind};
use crate::mapping::{ActionKind, Mappings, Output, TableMapping, Ttl, Warm};

/// Rows read per page.
pub const PAGE: usize = 500;

/// How long a warming lease holds a key (longer than a page takes).
const LEASE_MS: u64 = 30_000;

/// The one-pass fill of a page.
///
/// KEYS[1] the apply epoch, KEYS[2..] the cache keys; ARGV[1] the epoch as
/// read before the page's rows were ('' when there was none), then a value
/// and a TTL in ms (0: none) per key. Stores each value where its key holds
/// nothing. Returns how many it stored, or -1, storing nothing, when the
/// epoch moved: evictd applied a batch since, which may have invalidated a
/// key before this script could store what the read found.
pub const ONE_PASS_SCRIPT: &str = r"
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then
  return -1
end
local stored = 0
for i = 2, #KEYS do
  local ttl = tonumber(ARGV[2 * i - 1])
  local set
  if ttl > 0 then
    set = redis.call('SET', KEYS[i], ARGV[2 * i - 2], 'NX', 'PX', ttl)
  else
    set = redis.call('SET', KEYS[i], ARGV[2 * i - 2], 'NX')
  end
  if set then
    stored = stored + 1
  end
end
return stored
";

/// What to warm and how fast.
#[derive(Clone, Debug)]
pub struct WarmOptions {
    /// Only this table.
    pub table: Option<TableName>,
    /// At most this many rows per table (and per `[[table.warm]]` query).
    pub limit: Option<u64>,
    /// Keys per second at most; 0: as fast as it goes.
    pub rate: u64,
    /// Show a progress line on standard error (when it is a terminal).
    pub progress: bool,
}

/// What warming did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub tables: usize,
    pub rows: u64,
    /// Keys filled.
    pub filled: u64,
    /// Keys left alone: they held a value (or another reader's lease).
    pub present: u64,
    /// Keys whose fill was refused: a change invalidated them meanwhile.
    pub fenced: u64,
    /// Keys given back: the row went away or renders another key now.
    pub released: u64,
    /// Pages stored in one pass (no batch was applied while they were
    /// read), and pages that took leases and a second read.
    pub one_pass_pages: u64,
    pub leased_pages: u64,
    pub elapsed: Duration,
}

impl Summary {
    /// One line for people.
    pub fn text(&self) -> String {
        #[allow(clippy::cast_precision_loss)]
        let rate = self.filled as f64 / self.elapsed.as_secs_f64().max(0.001);
        format!(
            "warmed {} keys from {} rows of {} table(s) in {:.1} s ({rate:.0} keys/s); {} already cached, {} changed meanwhile (left to evictd), {} rows gone or moved; {} pages in one pass, {} with leases",
            self.filled,
            self.rows,
            self.tables,
            self.elapsed.as_secs_f64(),
            self.present,
            self.fenced,
            self.released,
            self.one_pass_pages,
            self.leased_pages
        )
    }
}

/// Warms every mapped table with refreshes (or `options.table`).
pub async fn warm(
    config: &Config,
    mappings: &Mappings,
    options: &WarmOptions,
) -> Result<Summary, Error> {
    let (url, tables) = refreshed_tables(config, mappings, options.table.as_ref(), "warm", "warm")?;
    let started = Instant::now();
    let mut warmer = Warmer {
        database: Database::new(url),
        redis: connect_redis(&config.redis).await?,
        prefix: config.redis.prefix.clone(),
        epoch_key: format!("{}{}", config.redis.prefix, crate::apply::shared::EPOCH_KEY),
        stamp_key: format!("{}{AUDIT_STAMP_KEY}", config.redis.prefix),
        token: format!("{:016x}", rand::rng().random::<u64>()),
        fill: redis::Script::new(FILL_SCRIPT),
        release: redis::Script::new(RELEASE_SCRIPT),
        one_pass: redis::Script::new(ONE_PASS_SCRIPT),
        pace: Pace::new(options.rate),
        progress: options.progress && std::io::stderr().is_terminal(),
        summary: Summary::default(),
    };
    warmer.load_scripts().await?;
    for mapping in tables {
        warmer.summary.tables += 1;
        warmer.table(mappings, mapping, options.limit).await?;
    }
    if warmer.progress {
        eprintln!();
    }
    warmer.summary.elapsed = started.elapsed();
    Ok(warmer.summary)
}

struct Warmer {
    database: Database,
    redis: Connection,
    prefix: String,
    /// The full names of the apply epoch and the audit's apply stamp.
    epoch_key: String,
    stamp_key: String,
    /// Leases are this token and a counter: unique per key and run.
    token: String,
    fill: redis::Script,
    release: redis::Script,
    one_pass: redis::Script,
    pace: Pace,
    progress: bool,
    summary: Summary,
}

/// What one rendered refresh key needs to be filled.
struct Fill {
    value: String,
    ttl: Option<Ttl>,
}

impl Fill {
    /// The TTL to store with, jittered, in ms (0: none).
    fn ttl_ms(&self) -> u64 {
        self.ttl.map_or(0, |ttl| {
            crate::apply::shared::jittered(ttl.seconds, ttl.jitter_bp).saturating_mul(1000)
        })
    }

    /// The value to store: recording the apply stamp read before the rows,
    /// when evictd's consistency checker writes one (`[audit]`).
    fn stored(&self, stamp: Option<u64>) -> std::borrow::Cow<'_, str> {
        match stamp {
            Some(stamp) => stamped(stamp, &self.value).into(),
            None => self.value.as_str().into(),
        }
    }
}

/// What was read from Redis just before a page's rows.
#[derive(Clone, Debug, Default)]
struct Before {
    /// The apply epoch ('' when there is none yet); `None` on a Cluster,
    /// where the epoch is not kept and every page takes leases.
    epoch: Option<String>,
    /// The audit's apply stamp, when there is one.
    stamp: Option<u64>,
}

impl Warmer {
    async fn table(
        &mut self,
        mappings: &Mappings,
        mapping: &TableMapping,
        limit: Option<u64>,
    ) -> Result<(), Error> {
        let table = &*mapping.table;
        self.database.learn(table).await;
        let key_columns = self.primary_key(table).await?;
        let mut columns: Vec<&str> = mapping.columns();
        for column in &key_columns {
            if !columns.contains(&column.as_str()) {
                columns.push(column);
            }
        }
        let keys = Keys {
            names: &key_columns,
            positions: key_columns
                .iter()
                .filter_map(|k| columns.iter().position(|c| c == k))
                .collect(),
        };
        let queries: Vec<Option<&Warm>> = if mapping.warm.is_empty() {
            vec![None]
        } else {
            mapping.warm.iter().map(Some).collect()
        };
        for query in queries {
            let limit = match (limit, query.and_then(|q| q.limit)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let filter = query.and_then(|q| q.filter.as_deref());
            match query.and_then(|q| q.order_by.as_deref()) {
                Some(order_by) => {
                    let select = format!(
                        "{} order by {order_by} limit {}",
                        self.select(table, &columns, filter),
                        limit.unwrap_or(u64::MAX >> 1)
                    );
                    let before = self.before().await?;
                    let texts = self.query(table, &select).await?;
                    for page in texts.chunks(PAGE) {
                        let filled = self
                            .page(
                                mappings,
                                table,
                                (&columns, &keys),
                                &before,
                                page.to_vec(),
                                Reread::Listed,
                            )
                            .await?;
                        self.record(table, filled).await;
                    }
                }
                None => {
                    self.by_key(mappings, table, &columns, &keys, filter, limit)
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// The whole table (or `filter`'s rows) in primary-key order, page by
    /// page (keyset pagination: each page starts after the last key).
    async fn by_key(
        &mut self,
        mappings: &Mappings,
        table: &TableName,
        columns: &[&str],
        keys: &Keys<'_>,
        filter: Option<&str>,
        limit: Option<u64>,
    ) -> Result<(), Error> {
        let mut left = limit.unwrap_or(u64::MAX);
        let mut next = Some(
            self.key_page(table, columns, keys, filter, None, left)
                .await?,
        );
        // Each page is filled while the next one is read.
        while let Some((before, texts)) = next.take() {
            let Some(last) = texts.last().cloned() else {
                break;
            };
            let size = page_size(left);
            left = left.saturating_sub(texts.len() as u64);
            let more = texts.len() == size && left > 0;
            let (filled, following) = tokio::join!(
                self.page(
                    mappings,
                    table,
                    (columns, keys),
                    &before,
                    texts,
                    Reread::Range
                ),
                async {
                    if more {
                        self.key_page(table, columns, keys, filter, Some(&last), left)
                            .await
                            .map(Some)
                    } else {
                        Ok(None)
                    }
                }
            );
            self.record(table, filled?).await;
            next = following?;
        }
        Ok(())
    }

    /// The page of at most `left` (and [`PAGE`]) rows after `after` in key
    /// order, and what Redis held just before it was read.
    async fn key_page(
        &self,
        table: &TableName,
        columns: &[&str],
        keys: &Keys<'_>,
        filter: Option<&str>,
        after: Option<&[Option<String>]>,
        left: u64,
    ) -> Result<(Before, Vec<Vec<Option<String>>>), Error> {
        let key_list = keys.list();
        let page = page_size(left);
        let after_clause =
            after.map(|last| format!("({key_list}) > ({})", literals(&keys.of(last))));
        let condition = match (filter, after_clause) {
            (Some(filter), Some(after)) => Some(format!("({filter}) and {after}")),
            (Some(filter), None) => Some(format!("({filter})")),
            (None, after) => after,
        };
        let select = format!(
            "{} order by {key_list} limit {page}",
            self.select(table, columns, condition.as_deref())
        );
        let before = self.before().await?;
        Ok((before, self.query(table, &select).await?))
    }

    /// The apply epoch and stamp, read before a page's rows are.
    async fn before(&self) -> Result<Before, Error> {
        match self.redis.clone() {
            Connection::Single(mut single) => {
                let (epoch, stamp): (Option<String>, Option<String>) = redis::cmd("MGET")
                    .arg(&self.epoch_key)
                    .arg(&self.stamp_key)
                    .query_async(&mut single)
                    .await
                    .map_err(|e| redis_error(&e))?;
                Ok(Before {
                    epoch: Some(epoch.unwrap_or_default()),
                    stamp: stamp.and_then(|stamp| stamp.parse().ok()),
                })
            }
            Connection::Cluster(mut cluster) => {
                let stamp: Option<String> = redis::cmd("GET")
                    .arg(&self.stamp_key)
                    .query_async(&mut cluster)
                    .await
                    .map_err(|e| redis_error(&e))?;
                Ok(Before {
                    epoch: None,
                    stamp: stamp.and_then(|stamp| stamp.parse().ok()),
                })
            }
        }
    }

    /// Adds a page's counts, paces, and shows progress.
    async fn record(&mut self, table: &TableName, page: Summary) {
        let summary = &mut self.summary;
        summary.rows += page.rows;
        summary.filled += page.filled;
        summary.present += page.present;
        summary.fenced += page.fenced;
        summary.released += page.released;
        summary.one_pass_pages += page.one_pass_pages;
        summary.leased_pages += page.leased_pages;
        let keys = page.filled + page.present + page.fenced + page.released;
        self.pace
            .wait(usize::try_from(keys).unwrap_or(usize::MAX))
            .await;
        if self.progress {
            eprint!(
                "\r{table}: {} rows, {} keys filled, {} already cached   ",
                self.summary.rows, self.summary.filled, self.summary.present
            );
        }
    }

    /// One page: in one pass when the epoch read `before` it still holds;
    /// else lease the keys its rows render, read the rows again, and fill
    /// what the leases still guard. `reread` selects the page's rows again
    /// (by key range when the page is a key range).
    async fn page(
        &self,
        mappings: &Mappings,
        table: &TableName,
        (columns, keys): (&[&str], &Keys<'_>),
        before: &Before,
        texts: Vec<Vec<Option<String>>>,
        reread: Reread,
    ) -> Result<Summary, Error> {
        let mut summary = Summary::default();
        let condition = match reread {
            Reread::Range => {
                let (Some(first), Some(last)) = (texts.first(), texts.last()) else {
                    return Ok(summary);
                };
                format!(
                    "({list}) >= ({}) and ({list}) <= ({})",
                    literals(&keys.of(first)),
                    literals(&keys.of(last)),
                    list = keys.list()
                )
            }
            Reread::Listed => format!(
                "({}) in ({})",
                keys.list(),
                texts
                    .iter()
                    .map(|row| format!("({})", literals(&keys.of(row))))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let rows = self.rows(table, columns, texts)?;
        summary.rows += rows.len() as u64;
        let rendered = render(mappings, table, &rows);
        if let Some(epoch) = &before.epoch {
            if let Some(stored) = self.one_pass(&rendered, epoch, before.stamp).await? {
                summary.filled = stored;
                summary.present = rendered.len() as u64 - stored;
                summary.one_pass_pages = 1;
                return Ok(summary);
            }
        }
        summary.leased_pages = 1;
        // Leases first, on keys that hold nothing.
        let leases: Vec<(String, String)> = rendered
            .into_keys()
            .enumerate()
            .map(|(index, key)| {
                let lease = lease(&format!("{}{index:x}", self.token));
                (key, lease)
            })
            .collect();
        let commands: Vec<redis::Cmd> = leases
            .iter()
            .map(|(key, lease)| {
                let mut command = redis::cmd("SET");
                command
                    .arg(format!("{}{key}", self.prefix))
                    .arg(lease)
                    .arg("NX")
                    .arg("PX")
                    .arg(LEASE_MS);
                command
            })
            .collect();
        let taken: Vec<Option<String>> = self.all(commands).await?;
        let mut held = Vec::new();
        for ((key, lease), taken) in leases.into_iter().zip(taken) {
            match taken {
                Some(_) => held.push((key, lease)),
                None => summary.present += 1,
            }
        }
        if held.is_empty() {
            return Ok(summary);
        }
        // The rows again, read after the leases: what is stored is at
        // least as new as the leases, which any invalidation removes.
        let select = self.select(table, columns, Some(&condition));
        let texts = self.query(table, &select).await?;
        let rows = self.rows(table, columns, texts)?;
        let fresh = render(mappings, table, &rows);
        let commands: Vec<redis::Cmd> = held
            .iter()
            .map(|(key, lease)| {
                let full = format!("{}{key}", self.prefix);
                match fresh.get(key) {
                    Some(fill) => {
                        let mut command = redis::cmd("EVALSHA");
                        command
                            .arg(self.fill.get_hash())
                            .arg(1)
                            .arg(full)
                            .arg(lease)
                            .arg(&*fill.stored(before.stamp))
                            .arg(fill.ttl_ms());
                        command
                    }
                    None => {
                        let mut command = redis::cmd("EVALSHA");
                        command
                            .arg(self.release.get_hash())
                            .arg(1)
                            .arg(full)
                            .arg(lease)
                            .arg("");
                        command
                    }
                }
            })
            .collect();
        let done: Vec<i64> = self.all(commands).await?;
        for ((key, _), stored) in held.iter().zip(done) {
            match (fresh.contains_key(key), stored) {
                (true, 1) => summary.filled += 1,
                (true, _) => summary.fenced += 1,
                (false, _) => summary.released += 1,
            }
        }
        Ok(summary)
    }

    /// Stores `fills` where their keys hold nothing, unless the apply epoch
    /// moved from `epoch`: how many were stored, or `None` (nothing was).
    async fn one_pass(
        &self,
        fills: &HashMap<String, Fill>,
        epoch: &str,
        stamp: Option<u64>,
    ) -> Result<Option<u64>, Error> {
        if fills.is_empty() {
            return Ok(Some(0));
        }
        let fills: Vec<(&String, &Fill)> = fills.iter().collect();
        let mut command = redis::cmd("EVALSHA");
        command
            .arg(self.one_pass.get_hash())
            .arg(fills.len() + 1)
            .arg(&self.epoch_key);
        for (key, _) in &fills {
            command.arg(format!("{}{key}", self.prefix));
        }
        command.arg(epoch);
        for (_, fill) in &fills {
            command.arg(&*fill.stored(stamp)).arg(fill.ttl_ms());
        }
        let stored: i64 = command
            .query_async(&mut self.redis.clone())
            .await
            .map_err(|e| redis_error(&e))?;
        Ok(u64::try_from(stored).ok())
    }

    /// Runs `commands`, in one pipeline on a single Redis (concurrently on
    /// a Cluster, where each goes to its key's master). Scripts are called
    /// by hash: [`Warmer::load_scripts`] loaded them.
    async fn all<T: redis::FromRedisValue>(
        &self,
        commands: Vec<redis::Cmd>,
    ) -> Result<Vec<T>, Error> {
        match &self.redis {
            Connection::Single(_) => {
                let mut pipe = redis::pipe();
                for command in commands {
                    pipe.add_command(command);
                }
                let mut redis = self.redis.clone();
                pipe.query_async(&mut redis)
                    .await
                    .map_err(|e| redis_error(&e))
            }
            Connection::Cluster(_) => {
                let results = futures_util::future::join_all(commands.into_iter().map(|command| {
                    let mut redis = self.redis.clone();
                    async move { command.query_async::<T>(&mut redis).await }
                }))
                .await;
                results
                    .into_iter()
                    .map(|result| result.map_err(|e| redis_error(&e)))
                    .collect()
            }
        }
    }

    /// Loads the scripts (on every master of a Cluster).
    async fn load_scripts(&self) -> Result<(), Error> {
        for source in [FILL_SCRIPT, RELEASE_SCRIPT, ONE_PASS_SCRIPT] {
            let mut command = redis::cmd("SCRIPT");
            command.arg("LOAD").arg(source);
            match self.redis.clone() {
                Connection::Single(mut single) => {
                    command
                        .query_async::<String>(&mut single)
                        .await
                        .map_err(|e| redis_error(&e))?;
                }
                Connection::Cluster(mut cluster) => {
                    let routing = redis::cluster_routing::RoutingInfo::MultiNode((
                        redis::cluster_routing::MultipleNodeRoutingInfo::AllMasters,
                        None,
                    ));
                    cluster
                        .route_command(command, routing)
                        .await
                        .map_err(|e| redis_error(&e))?;
                }
            }
        }
        Ok(())
    }

    fn select(&self, table: &TableName, columns: &[&str], condition: Option<&str>) -> String {
        format!(
            "{}{}",
            select_columns(table, columns),
            condition.map_or_else(String::new, |c| format!(" where {c}"))
        )
    }

    async fn query(&self, table: &TableName, sql: &str) -> Result<Vec<Vec<Option<String>>>, Error> {
        self.database
            .query(sql)
            .await
            .map_err(|why| Error::new(ErrorKind::Protocol, format!("warming {table}: {why}")))
    }

    fn rows(
        &self,
        table: &TableName,
        columns: &[&str],
        texts: Vec<Vec<Option<String>>>,
    ) -> Result<Vec<Row>, Error> {
        self.database
            .rows(table, columns, texts)
            .map_err(|why| Error::new(ErrorKind::Protocol, format!("warming {table}: {why}")))
    }

    /// The table's primary key columns, in key order.
    async fn primary_key(&self, table: &TableName) -> Result<Vec<String>, Error> {
        let sql = format!(
            "select a.attname from pg_index i join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey) \
             where i.indrelid = {}::regclass and i.indisprimary order by array_position(i.indkey::int2[], a.attnum)",
            literals(&[Some(quote_table(table))])
        );
        let rows = self.query(table, &sql).await?;
        let columns: Vec<String> = rows
            .into_iter()
            .filter_map(|row| row.into_iter().next().flatten())
            .collect();
        if columns.is_empty() {
            return Err(Error::new(
                ErrorKind::Config,
                format!("{table} has no primary key: evictd warm reads a table page by page in primary-key order"),
            ));
        }
        Ok(columns)
    }
}

/// The primary key: its columns, and where they are in a page's rows.
struct Keys<'k> {
    names: &'k [String],
    positions: Vec<usize>,
}

impl Keys<'_> {
    fn list(&self) -> String {
        self.names
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The key values of one row as read.
    fn of(&self, row: &[Option<String>]) -> Vec<Option<String>> {
        self.positions.iter().map(|&at| row[at].clone()).collect()
    }
}

/// How a page's rows are selected again after the leases.
#[derive(Clone, Copy)]
enum Reread {
    /// A page of a primary-key walk: its key range.
    Range,
    /// Rows in any order: their keys, listed.
    Listed,
}

/// The refresh keys `rows` render as inserts (conditions included), with
/// their values and TTLs.
fn render(mappings: &Mappings, table: &TableName, rows: &[Row]) -> HashMap<String, Fill> {
    let table = Arc::new(table.clone());
    let mut out = Output::default();
    let mut fills = HashMap::with_capacity(rows.len());
    for row in rows {
        out.clear();
        let change = RowChange {
            table: table.clone(),
            op: Op::Insert,
            old: None,
            new: Some(row.clone()),
        };
        mappings.eval(&change, &mut out);
        for action in out.actions.drain(..) {
            if let ActionKind::Refresh { key, value, ttl } = action.kind {
                fills.insert(key, Fill { value, ttl });
            }
        }
    }
    fills
}

/// Rows in the next key page when `left` rows may still be warmed.
fn page_size(left: u64) -> usize {
    usize::try_from(left).unwrap_or(PAGE).min(PAGE)
}

/// SQL literals of text values, comma-separated (NULL as `null`).
fn literals(values: &[Option<String>]) -> String {
    values
        .iter()
        .map(|value| match value {
            Some(text) => format!("'{}'", text.replace('\'', "''")),
            None => "null".to_owned(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn redis_error(error: &redis::RedisError) -> Error {
    Error::new(ErrorKind::Redis, format!("warming: Redis failed: {error}"))
}

/// Paces warming at `rate` keys per second.
struct Pace {
    rate: u64,
    started: Instant,
    done: u64,
}

impl Pace {
    fn new(rate: u64) -> Pace {
        Pace {
            rate,
            started: Instant::now(),
            done: 0,
        }
    }

    /// Waits until `keys` more keys keep within the rate.
    async fn wait(&mut self, keys: usize) {
        self.done += keys as u64;
        if self.rate == 0 {
            return;
        }
        #[allow(clippy::cast_precision_loss)]
        let due = Duration::from_secs_f64(self.done as f64 / self.rate as f64);
        let elapsed = self.started.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
    }
}
