//! Sends a [`Plan`] to Redis, and its L1 broadcast with it.
//!
//! One plan becomes as few round trips as its commands allow: the apply
//! epoch (`SET`, see [`APPLY_MARK_KEY`]), exact deletes (variadic UNLINK),
//! namespace bumps (a short script each), tag invalidations (one Lua script
//! per chunk of tags), refreshes (SET with EX and jitter) and the broadcast
//! (PUBLISH, and SET of `evictd:l1:last`) go in one pipeline, in that
//! order. Pattern deletes (TRUNCATE, coarse fallbacks) need SCAN round
//! trips and split the pipeline, keeping the plan's order.
//!
//! A plan that failed half-way is simply sent again: every command is
//! idempotent but a bump, and a second bump only leaves one more version
//! behind.

use std::time::Duration;

use redis::aio::MultiplexedConnection;

use super::broadcast::Broadcast;
use evictd_client::protocol::{BUMP_SCRIPT, TAG_AT_MS, TAG_NAMESPACE, TAG_STAMP_KEY};

use super::sink::{jittered, under_prefix, ApplyStats, Stamped, Wait, APPLY_MARK_KEY, SCAN_COUNT};
use crate::config::RedisConfig;
use crate::continuity::Recorder;
use crate::error::{Error, ErrorKind};
use crate::plan::{Command, Plan};

/// Keys per UNLINK command.
const UNLINK_CHUNK: usize = 512;
/// Tag sets per script call.
const TAG_CHUNK: usize = 64;

/// Deletes the members of each tag set in KEYS, then the sets. Members are
/// full Redis key names, as the application added them. One SUNION reads
/// the whole chunk; a tag key that is not a set makes it fail, and then each
/// tag is looked at on its own: a stray value is just deleted, so it can
/// never wedge the stream.
const TAG_SCRIPT: &str = evictd_client::protocol::INVALIDATE_TAGS_SCRIPT;

/// A standalone Redis the plans go to.
pub struct StandaloneSink {
    client: redis::Client,
    connection: Option<MultiplexedConnection>,
    pub(super) prefix: String,
    broadcast: Broadcast,
    record: Option<Recorder>,
    timeout: Duration,
    wait: Wait,
    /// The full name of the apply mark ([`APPLY_MARK_KEY`]), and the batches
    /// with commands this sink sent (what it writes there).
    mark_key: String,
    marks: u64,
}

impl StandaloneSink {
    pub fn new(
        config: &RedisConfig,
        broadcast: Broadcast,
        record: Option<Recorder>,
    ) -> Result<StandaloneSink, Error> {
        let client = crate::servers::redis_client(config)?;
        let prefix = &config.prefix;
        Ok(StandaloneSink {
            client,
            connection: None,
            prefix: prefix.to_owned(),
            broadcast,
            record,
            timeout: Duration::from_secs(10),
            wait: Wait {
                replicas: config.wait_replicas,
                timeout_ms: config.wait_timeout_ms,
            },
            mark_key: format!("{prefix}{APPLY_MARK_KEY}"),
            marks: 0,
        })
    }

    async fn connection(&mut self) -> Result<MultiplexedConnection, Error> {
        if let Some(connection) = &self.connection {
            return Ok(connection.clone());
        }
        let connect = self.client.get_multiplexed_async_connection();
        let connection = tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| Error::new(ErrorKind::Redis, "connecting to Redis timed out"))?
            .map_err(|e| Error::redis("cannot connect to Redis", e))?;
        self.connection = Some(connection.clone());
        Ok(connection)
    }

    /// Runs `command`, which reads or writes the one (full) key `_key`.
    pub async fn on_key<T: redis::FromRedisValue>(
        &mut self,
        command: &redis::Cmd,
        _key: &str,
    ) -> Result<T, Error> {
        let mut connection = self.connection().await?;
        let mut stats = ApplyStats::default();
        self.query(&mut connection, command, &mut stats).await
    }

    /// Checks that Redis answers (for readiness and start-up).
    pub async fn ping(&mut self) -> Result<(), Error> {
        let mut connection = self.connection().await?;
        let result: Result<String, _> = redis::cmd("PING").query_async(&mut connection).await;
        result.map(drop).map_err(|e| self.broken(e))
    }

    /// Applies `plan` and publishes its broadcast. On error the connection
    /// is dropped; the caller retries the whole plan.
    pub async fn apply(&mut self, plan: &Plan, stamped: Stamped) -> Result<ApplyStats, Error> {
        let mut connection = self.connection().await?;
        let mut stats = ApplyStats::default();
        let mut pipe = redis::pipe();
        let mut unlinks = Unlinks::new();
        let mut tags: Vec<String> = Vec::new();
        if !plan.commands.is_empty() {
            // Ahead of every invalidation: see APPLY_MARK_KEY.
            self.marks += 1;
            pipe.cmd("SET").arg(&self.mark_key).arg(self.marks).ignore();
        }
        if let Some(stamp) = stamped.tag {
            // Ahead of the tag invalidations: see TAG_STAMP_KEY.
            pipe.cmd("SET")
                .arg(self.prefixed(TAG_STAMP_KEY))
                .arg(stamp)
                .ignore();
            for key in plan.tag_stamp_keys() {
                pipe.cmd("SET")
                    .arg(self.prefixed(&key))
                    .arg(stamp)
                    .arg("PX")
                    .arg(TAG_AT_MS)
                    .ignore();
            }
        }
        for command in &plan.commands {
            stats.commands += 1;
            match command {
                Command::Unlink { key, .. } => {
                    unlinks.add(&self.prefix, key, &mut pipe, &mut stats);
                }
                Command::UnlinkMatching { pattern, .. } => {
                    unlinks.flush(&mut pipe, &mut stats);
                    self.send(&mut connection, &mut pipe, &mut stats).await?;
                    let deleted = self
                        .act_on_matching(&mut connection, pattern, Matching::Unlink, &mut stats)
                        .await?;
                    stats.keys += deleted;
                    stats.matched.push(deleted);
                }
                Command::Bump { key, .. } => {
                    pipe.cmd("EVAL")
                        .arg(BUMP_SCRIPT)
                        .arg(1)
                        .arg(self.prefixed(key))
                        .ignore();
                    stats.keys += 1;
                }
                Command::BumpMatching { pattern, .. } => {
                    unlinks.flush(&mut pipe, &mut stats);
                    self.send(&mut connection, &mut pipe, &mut stats).await?;
                    let bumped = self
                        .act_on_matching(&mut connection, pattern, Matching::Bump, &mut stats)
                        .await?;
                    stats.keys += bumped;
                    stats.matched.push(bumped);
                }
                Command::InvalidateTag { tag, .. } => {
                    unlinks.flush(&mut pipe, &mut stats);
                    tags.push(self.tag_set(tag));
                    if tags.len() == TAG_CHUNK {
                        pipe.cmd("EVAL")
                            .arg(TAG_SCRIPT)
                            .arg(tags.len())
                            .arg(&tags)
                            .ignore();
                        tags.clear();
                    }
                }
                Command::InvalidateTagsMatching { pattern, .. } => {
                    flush_tags(&mut pipe, &mut tags);
                    self.send(&mut connection, &mut pipe, &mut stats).await?;
                    let deleted = self
                        .invalidate_tags_matching(&mut connection, pattern, &mut stats)
                        .await?;
                    stats.keys += deleted;
                    stats.matched.push(deleted);
                }
                Command::Set {
                    key, value, ttl, ..
                } => {
                    unlinks.flush(&mut pipe, &mut stats);
                    flush_tags(&mut pipe, &mut tags);
                    // Overwrites a fill lease too: a fill racing the
                    // refresh cannot overwrite it.
                    let set = pipe.cmd("SET").arg(self.prefixed(key)).arg(value);
                    if let Some(ttl) = ttl {
                        set.arg("EX").arg(jittered(ttl.seconds, ttl.jitter_bp));
                    }
                    set.ignore();
                    stats.keys += 1;
                }
            }
        }
        unlinks.flush(&mut pipe, &mut stats);
        flush_tags(&mut pipe, &mut tags);
        stats.count_invalidated(plan);
        stats.append_invalidated(&self.prefix, &mut pipe);
        self.broadcast
            .append(plan, stamped.apply, &self.prefix, &mut pipe);
        if let Some(record) = &self.record {
            record.append(plan.checkpoint.as_ref(), &mut pipe);
        }
        self.send(&mut connection, &mut pipe, &mut stats).await?;
        self.broadcast.delivered();
        Ok(stats)
    }

    /// Sends what the pipeline holds, if anything, and empties it.
    async fn send(
        &mut self,
        connection: &mut MultiplexedConnection,
        pipe: &mut redis::Pipeline,
        stats: &mut ApplyStats,
    ) -> Result<(), Error> {
        if pipe.cmd_iter().next().is_none() {
            return Ok(());
        }
        stats.round_trips += 1;
        if self.wait.replicas > 0 {
            pipe.cmd("WAIT")
                .arg(self.wait.replicas)
                .arg(self.wait.timeout_ms);
        }
        let sent =
            tokio::time::timeout(self.timeout, pipe.query_async::<Vec<i64>>(connection)).await;
        pipe.clear();
        match sent {
            Ok(Ok(replies)) => {
                let acknowledged = replies.last().copied().unwrap_or(0);
                if self.wait.replicas > 0 && acknowledged < i64::from(self.wait.replicas) {
                    return Err(Error::new(
                        ErrorKind::Redis,
                        format!(
                            "only {acknowledged} of {} replicas acknowledged the batch",
                            self.wait.replicas
                        ),
                    ));
                }
                Ok(())
            }
            Ok(Err(error)) => Err(self.broken(error)),
            Err(_) => {
                self.connection = None;
                Err(Error::new(ErrorKind::Redis, "a Redis pipeline timed out"))
            }
        }
    }

    /// One SCAN page: the next cursor and the keys matching `full` (of
    /// `kind`, when given).
    async fn scan_page(
        &mut self,
        connection: &mut MultiplexedConnection,
        cursor: u64,
        full: &str,
        kind: Option<&str>,
        stats: &mut ApplyStats,
    ) -> Result<(u64, Vec<String>), Error> {
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(full)
            .arg("COUNT")
            .arg(SCAN_COUNT);
        if let Some(kind) = kind {
            scan.arg("TYPE").arg(kind);
        }
        stats.scan_pages += 1;
        self.query(connection, &scan, stats).await
    }

    /// SCAN for `pattern` under the prefix and act on what matches: UNLINK
    /// the keys, or bump the namespace counters. Returns how many matched
    /// (for deletes, how many were still there).
    async fn act_on_matching(
        &mut self,
        connection: &mut MultiplexedConnection,
        pattern: &str,
        action: Matching,
        stats: &mut ApplyStats,
    ) -> Result<u64, Error> {
        let full = under_prefix(&self.prefix, "", pattern)?;
        let kind = match action {
            Matching::Unlink => None,
            Matching::Bump => Some("string"),
        };
        let mut cursor: u64 = 0;
        let mut matched = 0;
        loop {
            let (next, keys) = self
                .scan_page(connection, cursor, &full, kind, stats)
                .await?;
            if !keys.is_empty() {
                matched += match action {
                    Matching::Unlink => {
                        let unlink = redis::cmd("UNLINK").arg(&keys).clone();
                        self.query::<u64>(connection, &unlink, stats).await?
                    }
                    Matching::Bump => {
                        let mut pipe = redis::pipe();
                        for counter in &keys {
                            pipe.cmd("EVAL")
                                .arg(BUMP_SCRIPT)
                                .arg(1)
                                .arg(counter)
                                .ignore();
                        }
                        self.send(connection, &mut pipe, stats).await?;
                        keys.len() as u64
                    }
                };
            }
            if next == 0 {
                return Ok(matched);
            }
            cursor = next;
        }
    }

    async fn invalidate_tags_matching(
        &mut self,
        connection: &mut MultiplexedConnection,
        pattern: &str,
        stats: &mut ApplyStats,
    ) -> Result<u64, Error> {
        let full = under_prefix(&self.prefix, TAG_NAMESPACE, pattern)?;
        let mut cursor: u64 = 0;
        let mut deleted = 0;
        loop {
            let (next, sets) = self
                .scan_page(connection, cursor, &full, Some("set"), stats)
                .await?;
            for chunk in sets.chunks(TAG_CHUNK) {
                let mut eval = redis::cmd("EVAL");
                eval.arg(TAG_SCRIPT).arg(chunk.len()).arg(chunk);
                let members: u64 = self.query(connection, &eval, stats).await?;
                deleted += members;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    async fn query<T: redis::FromRedisValue>(
        &mut self,
        connection: &mut MultiplexedConnection,
        command: &redis::Cmd,
        stats: &mut ApplyStats,
    ) -> Result<T, Error> {
        stats.round_trips += 1;
        match tokio::time::timeout(self.timeout, command.query_async(connection)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(self.broken(error)),
            Err(_) => {
                self.connection = None;
                Err(Error::new(ErrorKind::Redis, "a Redis command timed out"))
            }
        }
    }

    /// Forgets the connection so the next attempt reconnects.
    fn broken(&mut self, error: redis::RedisError) -> Error {
        self.connection = None;
        Error::redis("a Redis command failed", error)
    }

    fn prefixed(&self, key: &str) -> String {
        let mut full = String::with_capacity(self.prefix.len() + key.len());
        full.push_str(&self.prefix);
        full.push_str(key);
        full
    }

    fn tag_set(&self, tag: &str) -> String {
        format!("{}{TAG_NAMESPACE}{tag}", self.prefix)
    }
}

/// What [`StandaloneSink::act_on_matching`] does to each match.
#[derive(Clone, Copy)]
enum Matching {
    Unlink,
    Bump,
}

/// The UNLINK being filled: keys go straight into the command's arguments
/// through one reused buffer, not into a string each.
struct Unlinks {
    cmd: redis::Cmd,
    count: usize,
    key: String,
}

impl Unlinks {
    fn new() -> Unlinks {
        Unlinks {
            cmd: redis::cmd("UNLINK"),
            count: 0,
            key: String::with_capacity(128),
        }
    }

    fn add(&mut self, prefix: &str, key: &str, pipe: &mut redis::Pipeline, stats: &mut ApplyStats) {
        self.key.clear();
        self.key.push_str(prefix);
        self.key.push_str(key);
        self.cmd.arg(self.key.as_str());
        self.count += 1;
        if self.count == UNLINK_CHUNK {
            self.flush(pipe, stats);
        }
    }

    fn flush(&mut self, pipe: &mut redis::Pipeline, stats: &mut ApplyStats) {
        if self.count > 0 {
            let cmd = std::mem::replace(&mut self.cmd, redis::cmd("UNLINK"));
            pipe.add_command(cmd).ignore();
            stats.keys += self.count as u64;
            self.count = 0;
        }
    }
}

fn flush_tags(pipe: &mut redis::Pipeline, tags: &mut Vec<String>) {
    if !tags.is_empty() {
        pipe.cmd("EVAL")
            .arg(TAG_SCRIPT)
            .arg(tags.len())
            .arg(&*tags)
            .ignore();
        tags.clear();
    }
}
