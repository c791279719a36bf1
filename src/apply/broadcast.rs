//! The L1 broadcast: one PUBLISH per applied plan, so that application
//! servers can evict their in-process caches.
//!
//! Message: `{"v":1,"epoch":"..","seq":N,"lsn":"0/16B3748","keys":[..],"tags":[..]}`,
//! plus `"patterns"` and `"tag_patterns"` when the plan deleted by pattern
//! (TRUNCATE, coarse fallbacks), and for people watching `"tables"` and
//! `"ops"` (the operations of the batch's changes by table). `epoch` is random per process start; `seq`
//! increases by one per message within an epoch, so a subscriber that sees a
//! gap, a new epoch or a reconnect flushes its L1. The last `epoch:seq` is
//! also SET in `evictd:l1:last` (under the key prefix). A plan that is sent
//! again after a failure keeps its `seq`: subscribers may see a message
//! twice, never a gap.
//!
//! Keys are as the mappings render them, without the global key prefix.
//!
//! Each message is also appended to the broadcast log (`evictd:l1:log`, a
//! Stream bounded by `redis.l1_log_len` entries), before it is published:
//! a subscriber that sees a gap, a new epoch or reconnects replays what it
//! missed from there, and flushes only when the log no longer reaches back.

use std::fmt::Write as _;

use evictd_client::protocol::{L1_LAST_KEY, L1_LOG_FIELD, L1_LOG_KEY};
use rand::Rng as _;

use crate::change::{Checkpoint, Op};
use crate::mapping::eval::write_json_string;
use crate::plan::{Command, Plan};

pub struct Broadcast {
    channel: String,
    /// Entries the log keeps (about: trimmed with `~`); 0: no log.
    log_len: u64,
    epoch: String,
    next_seq: u64,
    /// The seq of the plan being applied, kept across retries.
    pending: Option<u64>,
}

impl Broadcast {
    pub fn new(channel: &str, log_len: u64) -> Broadcast {
        let epoch: u64 = rand::rng().random();
        Broadcast {
            channel: channel.to_owned(),
            log_len,
            epoch: format!("{epoch:016x}"),
            next_seq: 1,
            pending: None,
        }
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// The message of `plan`, with its seq; `None` when the plan
    /// invalidates nothing.
    pub fn prepare(&mut self, plan: &Plan, stamp: Option<u64>) -> Option<Message> {
        if plan.commands.is_empty() {
            return None;
        }
        let seq = *self.pending.get_or_insert_with(|| {
            let seq = self.next_seq;
            self.next_seq += 1;
            seq
        });
        Some(Message {
            seq,
            text: self.message(plan, seq, stamp),
        })
    }

    /// The log's key under `prefix`.
    pub fn log_key(prefix: &str) -> String {
        format!("{prefix}{L1_LOG_KEY}")
    }

    /// Appends the message to the log (XADD, trimmed to about
    /// `redis.l1_log_len`): before it is published, so that whoever sees
    /// it published can find it and its predecessors there.
    pub fn append_log(&self, message: &Message, prefix: &str, pipe: &mut redis::Pipeline) {
        if self.log_len == 0 {
            return;
        }
        pipe.cmd("XADD")
            .arg(Broadcast::log_key(prefix))
            .arg("MAXLEN")
            .arg("~")
            .arg(self.log_len)
            .arg("*")
            .arg(L1_LOG_FIELD)
            .arg(&message.text)
            .ignore();
    }

    /// Appends PUBLISH and the `last` SET of the message to `pipe`.
    pub fn append_publish(&self, message: &Message, prefix: &str, pipe: &mut redis::Pipeline) {
        pipe.cmd("PUBLISH")
            .arg(&self.channel)
            .arg(&message.text)
            .ignore();
        pipe.cmd("SET")
            .arg(format!("{prefix}{L1_LAST_KEY}"))
            .arg(format!("{}:{}", self.epoch, message.seq))
            .ignore();
    }

    /// Both, in order, to one pipeline (a standalone Redis).
    pub fn append(
        &mut self,
        plan: &Plan,
        stamp: Option<u64>,
        prefix: &str,
        pipe: &mut redis::Pipeline,
    ) {
        if let Some(message) = self.prepare(plan, stamp) {
            self.append_log(&message, prefix, pipe);
            self.append_publish(&message, prefix, pipe);
        }
    }

    /// The plan's message was delivered: the next plan gets the next seq.
    pub fn delivered(&mut self) {
        self.pending = None;
    }

    /// The JSON message, written directly: a batch can hold thousands of
    /// keys, and a `serde_json::Value` per key would copy each one twice.
    fn message(&self, plan: &Plan, seq: u64, stamp: Option<u64>) -> String {
        let mut keys = Vec::new();
        let mut tags = Vec::new();
        let mut patterns = Vec::new();
        let mut tag_patterns = Vec::new();
        let mut tables: Vec<&str> = Vec::new();
        let mut size = 96;
        for command in &plan.commands {
            let table = plan
                .tables
                .as_ref()
                .and_then(|tables| tables.get(command.origin().0 as usize));
            if let Some(table) = table {
                if !tables.contains(&&**table) {
                    tables.push(table);
                }
            }
            let (list, text) = match command {
                // A bumped counter is a key like any other: L1 forgets
                // the version it cached.
                Command::Unlink { key, .. }
                | Command::Set { key, .. }
                | Command::Bump { key, .. } => (&mut keys, key),
                Command::InvalidateTag { tag, .. } => (&mut tags, tag),
                Command::UnlinkMatching { pattern, .. } | Command::BumpMatching { pattern, .. } => {
                    (&mut patterns, pattern)
                }
                Command::InvalidateTagsMatching { pattern, .. } => (&mut tag_patterns, pattern),
            };
            size += text.len() + 3;
            list.push(text.as_str());
        }
        let mut json = String::with_capacity(size);
        let _ = write!(json, r#"{{"v":1,"epoch":"{}","seq":{seq}"#, self.epoch);
        if let Some(Checkpoint::Lsn(lsn)) = &plan.checkpoint {
            let _ = write!(json, r#","lsn":"{lsn}""#);
        }
        write_list(&mut json, "keys", &keys);
        write_list(&mut json, "tags", &tags);
        if !patterns.is_empty() {
            write_list(&mut json, "patterns", &patterns);
        }
        if !tag_patterns.is_empty() {
            write_list(&mut json, "tag_patterns", &tag_patterns);
        }
        if !tables.is_empty() {
            write_list(&mut json, "tables", &tables);
        }
        if !plan.ops.is_empty() {
            json.push_str(r#","ops":{"#);
            for (index, (table, ops)) in plan.ops.iter().enumerate() {
                if index > 0 {
                    json.push(',');
                }
                write_json_string(&table.to_string(), &mut json);
                json.push(':');
                let ops: Vec<&str> = ops.iter().map(Op::as_str).collect();
                write_array(&mut json, &ops);
            }
            json.push('}');
        }
        if let Some(stamp) = stamp {
            let _ = write!(json, r#","stamp":{stamp}"#);
        }
        json.push('}');
        json
    }
}

/// One plan's broadcast.
pub struct Message {
    seq: u64,
    text: String,
}

/// Appends `,"name":["a","b"]` with JSON string escaping.
fn write_list(json: &mut String, name: &str, items: &[&str]) {
    let _ = write!(json, r#","{name}":"#);
    write_array(json, items);
}

/// Appends `["a","b"]` with JSON string escaping.
fn write_array(json: &mut String, items: &[&str]) {
    json.push('[');
    for (index, item) in items.iter().enumerate() {
        if index > 0 {
            json.push(',');
        }
        write_json_string(item, json);
    }
    json.push(']');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Lsn;
    use crate::mapping::OriginId;

    #[test]
    fn the_message_is_valid_json_with_escaping() {
        let broadcast = Broadcast::new("evictd:l1", 0);
        let mut ops = crate::change::OpSet::default();
        ops.insert(Op::Update);
        ops.insert(Op::Insert);
        let plan = Plan {
            commands: vec![
                Command::Unlink {
                    key: "user:\"1\"\\x".into(),
                    origin: OriginId(0),
                },
                Command::InvalidateTag {
                    tag: "user:1".into(),
                    origin: OriginId(0),
                },
                Command::UnlinkMatching {
                    pattern: "order:*".into(),
                    origin: OriginId(0),
                    coarse: false,
                    prefix: false,
                },
            ],
            checkpoint: Some(Checkpoint::Lsn(Lsn(0x16B3748))),
            ops: vec![(
                std::sync::Arc::new(crate::change::TableName::parse("orders").unwrap()),
                ops,
            )],
            ..Plan::default()
        };
        let text = broadcast.message(&plan, 7, None);
        // The one definition of the message the clients read.
        let typed: evictd_client::protocol::Broadcast =
            serde_json::from_str(&text).expect("a protocol::Broadcast");
        assert_eq!(
            typed,
            evictd_client::protocol::Broadcast {
                v: 1,
                epoch: broadcast.epoch().to_owned(),
                seq: 7,
                lsn: Some("0/16B3748".into()),
                keys: vec!["user:\"1\"\\x".into()],
                tags: vec!["user:1".into()],
                patterns: vec!["order:*".into()],
                tag_patterns: Vec::new(),
                tables: Vec::new(),
                ops: [(
                    "public.orders".to_owned(),
                    vec!["insert".to_owned(), "update".to_owned()]
                )]
                .into(),
                stamp: None,
            }
        );
        let message: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(
            message,
            serde_json::json!({
                "v": 1, "epoch": broadcast.epoch(), "seq": 7, "lsn": "0/16B3748",
                "keys": ["user:\"1\"\\x"], "tags": ["user:1"], "patterns": ["order:*"],
                "ops": {"public.orders": ["insert", "update"]},
            })
        );
    }
}
