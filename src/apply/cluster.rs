//! Sends a [`Plan`] to a Redis Cluster.
//!
//! A cluster pipeline must stay on one node and a multi-key command in one
//! hash slot, so commands are grouped by the master that owns each key's
//! slot (from CLUSTER SLOTS, cached until an error) and each group goes in
//! one pipeline to that node, all nodes at once. The plan's order is kept by
//! phases: exact deletes, pattern deletes (SCAN on every master), tags (the
//! members of each set, then the sets), tag patterns, refreshes, and last the
//! broadcast. A tag set and its members may live on different nodes, so tag
//! invalidation is not one script here; it is idempotent all the same.
//!
//! On any error the slot map and connection are dropped; the caller sends
//! the whole plan again after backoff (a failover or resharding moved
//! slots: the next attempt routes by the new map).

use std::collections::HashMap;
use std::time::Duration;

use futures_util::future::try_join_all;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};

use super::broadcast::Broadcast;
use evictd_client::protocol::{BUMP_SCRIPT, L1_LAST_KEY, TAG_AT_MS, TAG_NAMESPACE, TAG_STAMP_KEY};

use super::sink::{jittered, under_prefix, ApplyStats, Stamped, Wait, INVALIDATED_KEY, SCAN_COUNT};

/// `UNLINK key`, for [`Phase::add`].
fn unlink(pipe: &mut redis::Pipeline, key: &str) {
    pipe.cmd("UNLINK").arg(key).ignore();
}

/// Bumps the namespace counter `key` if it exists, for [`Phase::add`].
fn bump(pipe: &mut redis::Pipeline, key: &str) {
    pipe.cmd("EVAL").arg(BUMP_SCRIPT).arg(1).arg(key).ignore();
}
use crate::continuity::Recorder;
use crate::error::{Error, ErrorKind};
use crate::plan::{Command, Plan};

/// Returns the members of a tag set, or nothing when the key is not a set.
const TAG_MEMBERS: &str = "if redis.call('TYPE', KEYS[1]).ok == 'set' then return redis.call('SMEMBERS', KEYS[1]) end return {}";

/// A master, and one slot it owns: requests are routed by that slot, so
/// that the client's own slot map (refreshed on MOVED and on connection
/// errors) picks the node, which keeps working across failovers.
#[derive(Clone, Debug)]
struct Node {
    host: String,
    port: u16,
    slot: u16,
}

impl Node {
    fn route(&self) -> SingleNodeRoutingInfo {
        SingleNodeRoutingInfo::SpecificNode(Route::new(self.slot, SlotAddr::Master))
    }
}

#[derive(Clone, Debug, Default)]
struct SlotMap {
    nodes: Vec<Node>,
    /// Owner (index into `nodes`) of each of the 16384 slots.
    owner: Vec<u16>,
}

pub struct ClusterSink {
    client: redis::cluster::ClusterClient,
    connection: Option<ClusterConnection>,
    slots: Option<SlotMap>,
    pub(super) prefix: String,
    broadcast: Broadcast,
    record: Option<Recorder>,
    timeout: Duration,
    wait: Wait,
}

impl ClusterSink {
    /// `url` is `redis+cluster://host:port` (any node; the rest are found).
    pub fn new(
        url: &str,
        prefix: &str,
        broadcast: Broadcast,
        wait: Wait,
        record: Option<Recorder>,
    ) -> Result<ClusterSink, Error> {
        let nodes = crate::servers::cluster_seeds(url).ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                "a cluster redis.url starts with redis+cluster://",
            )
        })?;
        // Few, quick internal retries: a failed batch is retried whole by
        // apply, with a fresh connection and slot map, which is what gets
        // past a failover.
        let client = redis::cluster::ClusterClient::builder(nodes)
            .retries(2)
            .connection_timeout(Duration::from_secs(1))
            .response_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| Error::with_source(ErrorKind::Config, "invalid redis.url", e))?;
        Ok(ClusterSink {
            client,
            connection: None,
            slots: None,
            prefix: prefix.to_owned(),
            broadcast,
            record,
            timeout: Duration::from_secs(10),
            wait,
        })
    }

    async fn connection(&mut self) -> Result<ClusterConnection, Error> {
        if let Some(connection) = &self.connection {
            return Ok(connection.clone());
        }
        let connect = self.client.get_async_connection();
        let connection = tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Redis,
                    "connecting to the Redis Cluster timed out",
                )
            })?
            .map_err(|e| Error::redis("cannot connect to the Redis Cluster", e))?;
        self.connection = Some(connection.clone());
        Ok(connection)
    }

    /// Runs `command`, which reads or writes the one (full) key `key`, on
    /// the master that owns it.
    pub async fn on_key<T: redis::FromRedisValue>(
        &mut self,
        command: &redis::Cmd,
        key: &str,
    ) -> Result<T, Error> {
        let result = async {
            let connection = self.connection().await?;
            let slots = self.slot_map().await?;
            let node =
                &slots.nodes[usize::from(slots.owner[usize::from(key_slot(key.as_bytes()))])];
            let value = route(&connection, command.clone(), node, self.timeout).await?;
            redis::from_redis_value(value)
                .map_err(|e| Error::with_source(ErrorKind::Redis, "unexpected Redis reply", e))
        }
        .await;
        if result.is_err() {
            self.forget();
        }
        result
    }

    pub async fn ping(&mut self) -> Result<(), Error> {
        let result = self.slot_map().await.map(drop);
        if result.is_err() {
            self.forget();
        }
        result
    }

    /// Applies `plan` and publishes its broadcast; on error forgets the
    /// connection and slot map so that the retry starts afresh.
    pub async fn apply(&mut self, plan: &Plan, stamped: Stamped) -> Result<ApplyStats, Error> {
        let result = self.apply_phases(plan, stamped).await;
        match &result {
            Ok(_) => self.broadcast.delivered(),
            Err(_) => self.forget(),
        }
        result
    }

    fn forget(&mut self) {
        self.connection = None;
        self.slots = None;
    }

    async fn apply_phases(&mut self, plan: &Plan, stamped: Stamped) -> Result<ApplyStats, Error> {
        let connection = self.connection().await?;
        let slots = self.slot_map().await?;
        let mut stats = ApplyStats::default();
        if let Some(stamp) = stamped.tag {
            // Ahead of the tag invalidations, on every node they touch:
            // see TAG_STAMP_KEY.
            let mut stamps = Phase::new(&slots, self.wait);
            stamps.add(&self.prefixed(TAG_STAMP_KEY), |pipe, key| {
                pipe.cmd("SET").arg(key).arg(stamp).ignore();
            });
            for key in plan.tag_stamp_keys() {
                stamps.add(&self.prefixed(&key), |pipe, key| {
                    pipe.cmd("SET")
                        .arg(key)
                        .arg(stamp)
                        .arg("PX")
                        .arg(TAG_AT_MS)
                        .ignore();
                });
            }
            stamps.send(&connection, &mut stats, self.timeout).await?;
        }
        let mut phase = Phase::new(&slots, self.wait);
        let mut tags: Vec<String> = Vec::new();
        for command in &plan.commands {
            stats.commands += 1;
            if !matches!(command, Command::InvalidateTag { .. }) && !tags.is_empty() {
                stats.keys += self
                    .invalidate_tags(&connection, &slots, std::mem::take(&mut tags), &mut stats)
                    .await?;
            }
            match command {
                Command::Unlink { key, .. } => {
                    stats.keys += 1;
                    phase.add(&self.prefixed(key), unlink);
                }
                Command::UnlinkMatching { pattern, .. } => {
                    phase.send(&connection, &mut stats, self.timeout).await?;
                    let full = under_prefix(&self.prefix, "", pattern)?;
                    let keys = self
                        .scan_masters(&connection, &slots, &full, None, &mut stats)
                        .await?;
                    stats.keys += keys.len() as u64;
                    stats.matched.push(keys.len() as u64);
                    let mut deletes = Phase::new(&slots, self.wait);
                    for key in &keys {
                        deletes.add(key, unlink);
                    }
                    deletes.send(&connection, &mut stats, self.timeout).await?;
                }
                Command::Bump { key, .. } => {
                    stats.keys += 1;
                    phase.add(&self.prefixed(key), bump);
                }
                Command::BumpMatching { pattern, .. } => {
                    phase.send(&connection, &mut stats, self.timeout).await?;
                    let full = under_prefix(&self.prefix, "", pattern)?;
                    let counters = self
                        .scan_masters(&connection, &slots, &full, Some("string"), &mut stats)
                        .await?;
                    stats.keys += counters.len() as u64;
                    stats.matched.push(counters.len() as u64);
                    let mut bumps = Phase::new(&slots, self.wait);
                    for counter in &counters {
                        bumps.add(counter, bump);
                    }
                    bumps.send(&connection, &mut stats, self.timeout).await?;
                }
                Command::InvalidateTag { tag, .. } => {
                    phase.send(&connection, &mut stats, self.timeout).await?;
                    tags.push(format!("{}{TAG_NAMESPACE}{tag}", self.prefix));
                }
                Command::InvalidateTagsMatching { pattern, .. } => {
                    phase.send(&connection, &mut stats, self.timeout).await?;
                    let full = under_prefix(&self.prefix, TAG_NAMESPACE, pattern)?;
                    let sets = self
                        .scan_masters(&connection, &slots, &full, Some("set"), &mut stats)
                        .await?;
                    let deleted = self
                        .invalidate_tags(&connection, &slots, sets, &mut stats)
                        .await?;
                    stats.keys += deleted;
                    stats.matched.push(deleted);
                }
                Command::Set {
                    key, value, ttl, ..
                } => {
                    stats.keys += 1;
                    // Overwrites a fill lease too: a fill racing the
                    // refresh cannot overwrite it.
                    phase.add(&self.prefixed(key), |pipe, key| {
                        let set = pipe.cmd("SET").arg(key).arg(value);
                        if let Some(ttl) = ttl {
                            set.arg("EX").arg(jittered(ttl.seconds, ttl.jitter_bp));
                        }
                        set.ignore();
                    });
                }
            }
        }
        if !tags.is_empty() {
            stats.keys += self
                .invalidate_tags(&connection, &slots, tags, &mut stats)
                .await?;
        }
        phase.send(&connection, &mut stats, self.timeout).await?;
        stats.count_invalidated(plan);
        let mut counts = redis::pipe();
        stats.append_invalidated(&self.prefix, &mut counts);
        if counts.cmd_iter().next().is_some() {
            let key = format!("{}{INVALIDATED_KEY}", self.prefix);
            let node =
                &slots.nodes[usize::from(slots.owner[usize::from(key_slot(key.as_bytes()))])];
            stats.round_trips += 1;
            send_to(&connection, node, counts, self.timeout, self.wait).await?;
        }
        let last = format!("{}{L1_LAST_KEY}", self.prefix);
        let message = self.broadcast.prepare(plan, stamped.apply);
        let mut log = redis::pipe();
        if let Some(message) = &message {
            self.broadcast.append_log(message, &self.prefix, &mut log);
        }
        if log.cmd_iter().next().is_some() {
            // The log first: a subscriber that sees the message published
            // finds it there.
            let key = Broadcast::log_key(&self.prefix);
            let node =
                &slots.nodes[usize::from(slots.owner[usize::from(key_slot(key.as_bytes()))])];
            stats.round_trips += 1;
            send_to(&connection, node, log, self.timeout, self.wait).await?;
        }
        let mut broadcast = redis::pipe();
        if let Some(message) = &message {
            self.broadcast
                .append_publish(message, &self.prefix, &mut broadcast);
        }
        if broadcast.cmd_iter().next().is_some() {
            let node =
                &slots.nodes[usize::from(slots.owner[usize::from(key_slot(last.as_bytes()))])];
            stats.round_trips += 1;
            send_to(&connection, node, broadcast, self.timeout, self.wait).await?;
        }
        let mut remember = redis::pipe();
        if let Some(record) = &self.record {
            record.append(plan.checkpoint.as_ref(), &mut remember);
        }
        let any = remember.cmd_iter().next().is_some();
        if let (Some(record), true) = (&self.record, any) {
            let node = &slots.nodes
                [usize::from(slots.owner[usize::from(key_slot(record.key().as_bytes()))])];
            stats.round_trips += 1;
            send_to(&connection, node, remember, self.timeout, self.wait).await?;
        }
        Ok(stats)
    }

    /// Deletes the members of each tag set, then the sets. Returns how many
    /// members there were.
    async fn invalidate_tags(
        &self,
        connection: &ClusterConnection,
        slots: &SlotMap,
        sets: Vec<String>,
        stats: &mut ApplyStats,
    ) -> Result<u64, Error> {
        let mut members = Vec::new();
        for set in &sets {
            let mut eval = redis::cmd("EVAL");
            eval.arg(TAG_MEMBERS).arg(1).arg(set);
            let node =
                &slots.nodes[usize::from(slots.owner[usize::from(key_slot(set.as_bytes()))])];
            stats.round_trips += 1;
            let value = route(connection, eval, node, self.timeout).await?;
            let found: Vec<String> = redis::from_redis_value(value)
                .map_err(|e| Error::with_source(ErrorKind::Redis, "unexpected tag members", e))?;
            members.extend(found);
        }
        let count = members.len() as u64;
        let mut deletes = Phase::new(slots, self.wait);
        for key in members.iter().chain(&sets) {
            deletes.add(key, unlink);
        }
        deletes.send(connection, stats, self.timeout).await?;
        Ok(count)
    }

    /// Every key matching `pattern` (of `kind`, when given) on every master.
    async fn scan_masters(
        &self,
        connection: &ClusterConnection,
        slots: &SlotMap,
        pattern: &str,
        kind: Option<&str>,
        stats: &mut ApplyStats,
    ) -> Result<Vec<String>, Error> {
        let mut found = Vec::new();
        for node in &slots.nodes {
            let mut cursor: u64 = 0;
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(SCAN_COUNT);
                if let Some(kind) = kind {
                    scan.arg("TYPE").arg(kind);
                }
                stats.round_trips += 1;
                stats.scan_pages += 1;
                let value = route(connection, scan, node, self.timeout).await?;
                let (next, keys): (u64, Vec<String>) =
                    redis::from_redis_value(value).map_err(|e| {
                        Error::with_source(ErrorKind::Redis, "unexpected SCAN reply", e)
                    })?;
                found.extend(keys);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(found)
    }

    async fn slot_map(&mut self) -> Result<SlotMap, Error> {
        if let Some(slots) = &self.slots {
            return Ok(slots.clone());
        }
        let mut connection = self.connection().await?;
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary);
        let reply = tokio::time::timeout(
            self.timeout,
            connection.route_command(redis::cmd("CLUSTER").arg("SLOTS").clone(), routing),
        )
        .await
        .map_err(|_| Error::new(ErrorKind::Redis, "CLUSTER SLOTS timed out"))?
        .map_err(|e| Error::redis("CLUSTER SLOTS failed", e))?;
        let slots = parse_slots(reply)?;
        self.slots = Some(slots.clone());
        Ok(slots)
    }

    fn prefixed(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

/// Commands of one phase, one pipeline per node.
struct Phase<'s> {
    slots: &'s SlotMap,
    wait: Wait,
    pipes: HashMap<u16, redis::Pipeline>,
}

impl<'s> Phase<'s> {
    fn new(slots: &'s SlotMap, wait: Wait) -> Phase<'s> {
        Phase {
            slots,
            wait,
            pipes: HashMap::new(),
        }
    }

    /// Adds the command `build` writes for `key` to the pipeline of the
    /// key's node.
    fn add(&mut self, key: &str, build: impl FnOnce(&mut redis::Pipeline, &str)) {
        let owner = self.slots.owner[usize::from(key_slot(key.as_bytes()))];
        build(self.pipes.entry(owner).or_insert_with(redis::pipe), key);
    }

    /// Sends every node's pipeline at once and empties the phase.
    async fn send(
        &mut self,
        connection: &ClusterConnection,
        stats: &mut ApplyStats,
        timeout: Duration,
    ) -> Result<(), Error> {
        let wait = self.wait;
        let sends = self.pipes.drain().map(|(owner, pipe)| {
            let node = self.slots.nodes[usize::from(owner)].clone();
            async move { send_to(connection, &node, pipe, timeout, wait).await }
        });
        let sends: Vec<_> = sends.collect();
        stats.round_trips += sends.len() as u64;
        try_join_all(sends).await.map(drop)
    }
}

async fn send_to(
    connection: &ClusterConnection,
    node: &Node,
    mut pipe: redis::Pipeline,
    timeout: Duration,
    wait: Wait,
) -> Result<(), Error> {
    if wait.replicas > 0 {
        pipe.cmd("WAIT").arg(wait.replicas).arg(wait.timeout_ms);
    }
    let count = pipe.cmd_iter().count();
    let route = node.route();
    let mut connection = connection.clone();
    let replies = tokio::time::timeout(timeout, connection.route_pipeline(pipe, 0, count, route))
        .await
        .map_err(|_| {
            Error::new(
                ErrorKind::Redis,
                format!("a pipeline to {}:{} timed out", node.host, node.port),
            )
        })?
        .map_err(|e| {
            Error::redis(
                format!("a pipeline to {}:{} failed", node.host, node.port),
                e,
            )
        })?;
    if wait.replicas > 0 {
        let acknowledged = match replies.last() {
            Some(redis::Value::Int(count)) => *count,
            _ => 0,
        };
        if acknowledged < i64::from(wait.replicas) {
            return Err(Error::new(
                ErrorKind::Redis,
                format!(
                    "only {acknowledged} of {} replicas of {}:{} acknowledged the batch",
                    wait.replicas, node.host, node.port
                ),
            ));
        }
    }
    for reply in replies {
        if let redis::Value::ServerError(error) = reply {
            return Err(Error::redis(
                format!("a command on {}:{} failed", node.host, node.port),
                redis::RedisError::from(error),
            ));
        }
    }
    Ok(())
}

async fn route(
    connection: &ClusterConnection,
    cmd: redis::Cmd,
    node: &Node,
    timeout: Duration,
) -> Result<redis::Value, Error> {
    let routing = RoutingInfo::SingleNode(node.route());
    let mut connection = connection.clone();
    tokio::time::timeout(timeout, connection.route_command(cmd, routing))
        .await
        .map_err(|_| {
            Error::new(
                ErrorKind::Redis,
                format!("a command to {}:{} timed out", node.host, node.port),
            )
        })?
        .map_err(|e| {
            Error::redis(
                format!("a command to {}:{} failed", node.host, node.port),
                e,
            )
        })
}

/// CLUSTER SLOTS -> owner of every slot.
fn parse_slots(reply: redis::Value) -> Result<SlotMap, Error> {
    let bad = || Error::new(ErrorKind::Redis, "unexpected CLUSTER SLOTS reply");
    let ranges: Vec<Vec<redis::Value>> = redis::from_redis_value(reply).map_err(|_| bad())?;
    let mut map = SlotMap {
        nodes: Vec::new(),
        owner: vec![u16::MAX; 16384],
    };
    for range in ranges {
        let [start, end, master, ..] = range.as_slice() else {
            return Err(bad());
        };
        let start: u16 = redis::from_redis_value(start.clone()).map_err(|_| bad())?;
        let end: u16 = redis::from_redis_value(end.clone()).map_err(|_| bad())?;
        let master: Vec<redis::Value> =
            redis::from_redis_value(master.clone()).map_err(|_| bad())?;
        let [host, port, ..] = master.as_slice() else {
            return Err(bad());
        };
        let node = Node {
            host: redis::from_redis_value(host.clone()).map_err(|_| bad())?,
            port: redis::from_redis_value(port.clone()).map_err(|_| bad())?,
            slot: start,
        };
        let index = match map
            .nodes
            .iter()
            .position(|n| n.host == node.host && n.port == node.port)
        {
            Some(index) => index,
            None => {
                map.nodes.push(node);
                map.nodes.len() - 1
            }
        };
        let index = u16::try_from(index).map_err(|_| bad())?;
        for slot in start..=end.min(16383) {
            map.owner[usize::from(slot)] = index;
        }
    }
    if map.owner.contains(&u16::MAX) {
        return Err(Error::new(
            ErrorKind::Redis,
            "the Redis Cluster does not cover every slot",
        ));
    }
    Ok(map)
}

/// The cluster hash slot of `key` (CRC16/XMODEM of the key or of its
/// `{hash tag}`, mod 16384).
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(0) | None => key,
            Some(close) => &key[open + 1..open + 1 + close],
        },
        None => key,
    };
    crc16(hashed) % 16384
}

fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from CLUSTER KEYSLOT.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_eq!(
            key_slot(b"123456789"),
            0x31C3,
            "the CRC16/XMODEM check value"
        );
    }
}
