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
//!   read, warming `WATCH`es evictd's apply mark
//!   ([`crate::apply::sink::APPLY_MARK_KEY`], written ahead of every
//!   batch's invalidations) on a connection of its own. One transaction
//!   (`MULTI`, `SET NX` each value, `EXEC`) then stores the page, and Redis
//!   refuses it if the epoch moved. An unmoved epoch means no invalidation
//!   was applied since before the read, so any change the read missed is
//!   applied later, over the stored value.
//! - **With leases**, when the epoch moved (evictd applied a batch
//!   meanwhile) and always on a Cluster: the way a client fills
//!   (`docs/PROTOCOL.md`). A fill lease on each key that holds nothing
//!   (`SET NX`), the rows read again, and each value stored with
//!   `fill.lua`, which refuses if anything invalidated the key since the
//!   lease was taken.
//!
//! Either way a change committed while warming, and applied by a running
//! `evictd run`, is never overwritten by what warming read before it.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use evictd_client::protocol::{lease, stamped, AUDIT_STAMP_KEY, FILL_SCRIPT, RELEASE_SCRIPT};
use evictd_client::Connection;
use futures_util::StreamExt as _;
use rand::Rng as _;
use redis::aio::MultiplexedConnection;
use rustc_hash::FxHashMap;

use crate::audit::refreshed_tables;
use crate::change::{Row, TableName};
use crate::config::Config;
use crate::error::{Error, ErrorKind};
use crate::mapping::{ActionKind, Mappings, Output, TableMapping, Ttl, Warm};
use crate::rows::Database;
use crate::servers::connect_redis;
use crate::sql::{quote_ident, quote_table, select_columns};

/// Rows read per page.
pub const PAGE: usize = 1000;

/// How long a warming lease holds a key (longer than a page takes).
const LEASE_MS: u64 = 30_000;

/// Rows decoded and rendered between two yields (see [`Warmer::prepare`]).
const RENDER_SLICE: usize = 125;

/// Pages stored at once: while Redis runs one page's transaction, the
/// next is encoded and sent.
const STORING: usize = 2;

/// Connections for one-pass fills: one for each page stored, waiting and
/// read at once, so that in the steady state the reader never waits for
/// one (see [`WatchPool`]).
const IN_FLIGHT: usize = STORING + 2;

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
    let redis = connect_redis(&config.redis).await?;
    let watch_pool = match redis {
        Connection::Single(_) => {
            let client = crate::servers::redis_client(&config.redis)?;
            let mut connections = Vec::new();
            for _ in 0..IN_FLIGHT {
                connections.push(
                    client
                        .get_multiplexed_async_connection()
                        .await
                        .map_err(redis_error)?,
                );
            }
            Some(WatchPool::new(connections))
        }
        Connection::Cluster(_) => None,
    };
    let mut warmer = Warmer {
        database: Database::new(url),
        redis,
        watch_pool,
        prefix: config.redis.prefix.clone(),
        mark_key: format!(
            "{}{}",
            config.redis.prefix,
            crate::apply::sink::APPLY_MARK_KEY
        ),
        stamp_key: format!("{}{AUDIT_STAMP_KEY}", config.redis.prefix),
        token: format!("{:016x}", rand::rng().random::<u64>()),
        fill: redis::Script::new(FILL_SCRIPT),
        release: redis::Script::new(RELEASE_SCRIPT),
    };
    let mut tally = Totals {
        pace: Pace::new(options.rate),
        progress: options.progress && std::io::stderr().is_terminal(),
        summary: Summary::default(),
    };
    warmer.load_scripts().await?;
    for mapping in tables {
        tally.summary.tables += 1;
        warmer
            .table(mappings, mapping, options.limit, &mut tally)
            .await?;
    }
    if tally.progress {
        eprintln!();
    }
    tally.summary.elapsed = started.elapsed();
    Ok(tally.summary)
}

/// What warming did so far, how fast it may go on, and whether it shows
/// its progress.
struct Totals {
    pace: Pace,
    progress: bool,
    summary: Summary,
}

impl Totals {
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
}

struct Warmer {
    database: Database,
    redis: Connection,
    /// Connections of the one-pass fills; none on a Cluster (there every
    /// page takes leases).
    watch_pool: Option<WatchPool>,
    prefix: String,
    /// The full names of the apply mark and the audit's apply stamp.
    mark_key: String,
    stamp_key: String,
    /// Leases are this token and a counter: unique per key and run.
    token: String,
    fill: redis::Script,
    release: redis::Script,
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
            crate::apply::sink::jittered(ttl.seconds, ttl.jitter_bp).saturating_mul(1000)
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

/// What was done in Redis just before a page's rows were read.
struct PreRead<'f> {
    /// The connection that `WATCH`es the apply mark for this page; `None`
    /// on a Cluster, or for a page that must take leases.
    mark_watch: Option<MarkWatch<'f>>,
    /// The audit's apply stamp, when there is one.
    stamp: Option<u64>,
}

/// The connections one-pass fills `WATCH` the apply mark on. A `WATCH`
/// belongs to its connection, so each is lent to one page at a time: from
/// before the page's rows are read until its transaction ran, or the page
/// was dropped. A page read while every connection is lent waits for one.
struct WatchPool {
    free: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<MultiplexedConnection>>,
    give_back: tokio::sync::mpsc::UnboundedSender<MultiplexedConnection>,
}

/// A connection lent to one page; it goes back when dropped.
struct MarkWatch<'f> {
    connection: MultiplexedConnection,
    watch_pool: &'f WatchPool,
}

impl WatchPool {
    fn new(connections: Vec<MultiplexedConnection>) -> WatchPool {
        let (give_back, free) = tokio::sync::mpsc::unbounded_channel();
        for connection in connections {
            // The receiver is alive: it is in `free` below.
            let _ = give_back.send(connection);
        }
        WatchPool {
            free: tokio::sync::Mutex::new(free),
            give_back,
        }
    }

    /// The next free connection, once there is one.
    async fn take(&self) -> Option<MarkWatch<'_>> {
        let connection = self.free.lock().await.recv().await?;
        Some(MarkWatch {
            connection,
            watch_pool: self,
        })
    }
}

impl Drop for MarkWatch<'_> {
    fn drop(&mut self) {
        // Its watch, if any, is ended by the next page's `UNWATCH`.
        let _ = self.watch_pool.give_back.send(self.connection.clone());
    }
}

impl Warmer {
    async fn table(
        &mut self,
        mappings: &Mappings,
        mapping: &TableMapping,
        limit: Option<u64>,
        tally: &mut Totals,
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
        let walk = TableWalk {
            mappings,
            table,
            columns: &columns,
            keys: &keys,
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
                    let first = self.before().await?;
                    let stamp = first.stamp;
                    let mut first = Some(first);
                    let texts = self.query(table, &select).await?;
                    for page in texts.chunks(PAGE) {
                        // The watch ends with the first page's transaction:
                        // the rest of what the query read take leases.
                        let before = first.take().unwrap_or(PreRead {
                            mark_watch: None,
                            stamp,
                        });
                        let page = self
                            .prepare(walk, before, page.to_vec(), Reread::Listed)
                            .await?;
                        let filled = self.page(walk, page).await?;
                        tally.record(table, filled).await;
                    }
                }
                None => self.by_key(walk, filter, limit, tally).await?,
            }
        }
        Ok(())
    }

    /// The whole table (or `filter`'s rows) in primary-key order, page by
    /// page (keyset pagination: each page starts after the last key).
    ///
    /// Two loops run side by side: one reads and renders pages, one stores
    /// them ([`STORING`] at once, each on the connection it watched on),
    /// with one page waiting between them. So Redis runs a page's
    /// transaction while the next is sent and the one after is read.
    async fn by_key(
        &self,
        walk: TableWalk<'_>,
        filter: Option<&str>,
        limit: Option<u64>,
        tally: &mut Totals,
    ) -> Result<(), Error> {
        let (pages, mut ready) = tokio::sync::mpsc::channel::<Prepared<'_>>(1);
        let reader = async move {
            let mut left = limit.unwrap_or(u64::MAX);
            let mut after: Option<Vec<Option<String>>> = None;
            loop {
                let size = page_size(left) as u64;
                let (last, read) = self.key_page(walk, filter, after.as_deref(), left).await?;
                let rows = read.rows;
                left = left.saturating_sub(rows);
                if rows == 0 || pages.send(read).await.is_err() {
                    break;
                }
                if rows < size || left == 0 {
                    break;
                }
                after = last;
            }
            Ok::<(), Error>(())
        };
        let storer = async {
            let mut storing = futures_util::stream::FuturesOrdered::new();
            let mut open = true;
            loop {
                tokio::select! {
                    page = ready.recv(), if open && storing.len() < STORING => match page {
                        Some(page) => storing.push_back(self.page(walk, page)),
                        None => open = false,
                    },
                    Some(filled) = storing.next(), if !storing.is_empty() => {
                        tally.record(walk.table, filled?).await;
                    }
                    else => break,
                }
            }
            Ok(())
        };
        tokio::try_join!(reader, storer)?;
        Ok(())
    }

    /// The page of at most `left` (and [`PAGE`]) rows of `filter` after
    /// `after` in key order, read (after what [`Warmer::before`] does in
    /// Redis) and rendered; and its last row as read, where the next page
    /// starts.
    async fn key_page(
        &self,
        walk: TableWalk<'_>,
        filter: Option<&str>,
        after: Option<&[Option<String>]>,
        left: u64,
    ) -> Result<(Option<Vec<Option<String>>>, Prepared<'_>), Error> {
        let TableWalk {
            table,
            columns,
            keys,
            ..
        } = walk;
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
        let texts = self.query(table, &select).await?;
        let last = texts.last().cloned();
        let page = self.prepare(walk, before, texts, Reread::Range).await?;
        Ok((last, page))
    }

    /// Before a page's rows are read: `WATCH` the apply mark on a lent
    /// connection of the page's own (on a standalone Redis), and read the
    /// apply stamp.
    async fn before(&self) -> Result<PreRead<'_>, Error> {
        let mark_watch = match &self.watch_pool {
            Some(watch_pool) => watch_pool.take().await,
            None => None,
        };
        let (mark_watch, stamp): (Option<MarkWatch<'_>>, Option<String>) = match mark_watch {
            Some(mut mark_watch) => {
                // UNWATCH first: a page that was read but never stored
                // (an empty query) left its watch behind.
                let (stamp,): (Option<String>,) = redis::pipe()
                    .cmd("UNWATCH")
                    .ignore()
                    .cmd("WATCH")
                    .arg(&self.mark_key)
                    .ignore()
                    .cmd("GET")
                    .arg(&self.stamp_key)
                    .query_async(&mut mark_watch.connection)
                    .await
                    .map_err(redis_error)?;
                (Some(mark_watch), stamp)
            }
            None => (
                None,
                redis::cmd("GET")
                    .arg(&self.stamp_key)
                    .query_async(&mut self.redis.clone())
                    .await
                    .map_err(redis_error)?,
            ),
        };
        Ok(PreRead {
            mark_watch,
            stamp: stamp.and_then(|stamp| stamp.parse().ok()),
        })
    }

    /// A page as read: its rows decoded and rendered, and how to select
    /// them again (`reread`: by key range when the page is a key range).
    /// It yields between slices of rows, so that on a single thread the
    /// reply to the page being stored meanwhile is taken in without
    /// waiting for the whole page to render.
    async fn prepare<'f>(
        &self,
        walk: TableWalk<'_>,
        before: PreRead<'f>,
        texts: Vec<Vec<Option<String>>>,
        reread: Reread,
    ) -> Result<Prepared<'f>, Error> {
        let TableWalk {
            mappings,
            table,
            columns,
            keys,
        } = walk;
        let condition = match (reread, texts.first(), texts.last()) {
            (_, None, _) | (_, _, None) => String::new(),
            (Reread::Range, Some(first), Some(last)) => format!(
                "({list}) >= ({}) and ({list}) <= ({})",
                literals(&keys.of(first)),
                literals(&keys.of(last)),
                list = keys.list()
            ),
            (Reread::Listed, _, _) => format!(
                "({}) in ({})",
                keys.list(),
                texts
                    .iter()
                    .map(|row| format!("({})", literals(&keys.of(row))))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let mut prepared = Prepared {
            before,
            condition,
            rows: texts.len() as u64,
            rendered: FxHashMap::with_capacity_and_hasher(texts.len(), Default::default()),
        };
        let mut texts = texts.into_iter();
        loop {
            let slice: Vec<_> = texts.by_ref().take(RENDER_SLICE).collect();
            if slice.is_empty() {
                break;
            }
            let rows = self.rows(table, columns, slice)?;
            render(mappings, table, rows, &mut prepared.rendered);
            tokio::task::yield_now().await;
        }
        Ok(prepared)
    }

    /// One page: in one pass when the epoch watched before it was read did
    /// not move; else lease the keys its rows render, read the rows again,
    /// and fill what the leases still guard.
    async fn page(&self, walk: TableWalk<'_>, page: Prepared<'_>) -> Result<Summary, Error> {
        let TableWalk {
            mappings,
            table,
            columns,
            ..
        } = walk;
        let Prepared {
            before,
            condition,
            rows,
            rendered,
        } = page;
        let mut summary = Summary {
            rows,
            ..Summary::default()
        };
        if rows == 0 {
            return Ok(summary);
        }
        if let Some(mut mark_watch) = before.mark_watch {
            let stored = self
                .one_pass(&mut mark_watch.connection, &rendered, before.stamp)
                .await?;
            if let Some(stored) = stored {
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
        let mut fresh = FxHashMap::default();
        render(mappings, table, rows, &mut fresh);
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

    /// Stores `fills` where their keys hold nothing, in one transaction on
    /// the page's watching connection, which Redis refuses if the apply mark
    /// it watches moved: how many were stored, or `None` (nothing was).
    async fn one_pass(
        &self,
        mark_watch: &mut MultiplexedConnection,
        fills: &FxHashMap<String, Fill>,
        stamp: Option<u64>,
    ) -> Result<Option<u64>, Error> {
        if fills.is_empty() {
            // Nothing to store: the watch is left to the next
            // `Warmer::before` on this connection, which ends it first.
            return Ok(Some(0));
        }
        let mut transaction = redis::pipe();
        transaction.atomic();
        for (key, fill) in fills {
            let set = transaction
                .cmd("SET")
                .arg(format!("{}{key}", self.prefix))
                .arg(&*fill.stored(stamp))
                .arg("NX");
            match fill.ttl_ms() {
                0 => {}
                ttl => {
                    set.arg("PX").arg(ttl);
                }
            }
        }
        let stored: Option<Vec<Option<redis::Value>>> = transaction
            .query_async(mark_watch)
            .await
            .map_err(redis_error)?;
        Ok(stored.map(|stored| stored.iter().flatten().count() as u64))
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
                pipe.query_async(&mut redis).await.map_err(redis_error)
            }
            Connection::Cluster(_) => {
                let results = futures_util::future::join_all(commands.into_iter().map(|command| {
                    let mut redis = self.redis.clone();
                    async move { command.query_async::<T>(&mut redis).await }
                }))
                .await;
                results
                    .into_iter()
                    .map(|result| result.map_err(redis_error))
                    .collect()
            }
        }
    }

    /// Loads the scripts (on every master of a Cluster).
    async fn load_scripts(&self) -> Result<(), Error> {
        for source in [FILL_SCRIPT, RELEASE_SCRIPT] {
            let mut command = redis::cmd("SCRIPT");
            command.arg("LOAD").arg(source);
            match self.redis.clone() {
                Connection::Single(mut single) => {
                    command
                        .query_async::<String>(&mut single)
                        .await
                        .map_err(redis_error)?;
                }
                Connection::Cluster(mut cluster) => {
                    let routing = redis::cluster_routing::RoutingInfo::MultiNode((
                        redis::cluster_routing::MultipleNodeRoutingInfo::AllMasters,
                        None,
                    ));
                    cluster
                        .route_command(command, routing)
                        .await
                        .map_err(redis_error)?;
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

/// What the pages of one table are read, rendered and stored with.
#[derive(Clone, Copy)]
struct TableWalk<'w> {
    mappings: &'w Mappings,
    table: &'w TableName,
    /// The columns read, key columns included.
    columns: &'w [&'w str],
    keys: &'w Keys<'w>,
}

/// A page read and rendered, to be stored.
struct Prepared<'f> {
    before: PreRead<'f>,
    /// The SQL condition that selects the page's rows again.
    condition: String,
    rows: u64,
    rendered: FxHashMap<String, Fill>,
}

/// How a page's rows are selected again after the leases.
#[derive(Clone, Copy)]
enum Reread {
    /// A page of a primary-key walk: its key range.
    Range,
    /// Rows in any order: their keys, listed.
    Listed,
}

/// Adds the refresh keys `rows` render as inserts (conditions included),
/// with their values and TTLs, to `fills`.
fn render(
    mappings: &Mappings,
    table: &TableName,
    rows: Vec<Row>,
    fills: &mut FxHashMap<String, Fill>,
) {
    let Some(mapping) = mappings.table(table) else {
        return;
    };
    let mut out = Output::default();
    for row in rows {
        out.clear();
        mappings.eval_refreshes(mapping, &row, &mut out);
        for action in out.actions.drain(..) {
            if let ActionKind::Refresh { key, value, ttl } = action.kind {
                fills.insert(key, Fill { value, ttl });
            }
        }
    }
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

/// A Redis failure while warming, classified as every Redis failure is
/// (refused credentials stop; the rest may pass).
fn redis_error(error: redis::RedisError) -> Error {
    Error::redis("warming: Redis failed", error)
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
