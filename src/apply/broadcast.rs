//! The L1 broadcast: one PUBLISH per applied plan, so that application
//! servers can evict their in-process caches.
//!
//! Message: `{"v":1,"epoch":"..","seq":N,"lsn":"0/16B3748","keys":[..],"tags":[..]}`,
//! plus `"patterns"` and `"tag_patterns"` when the plan deleted by pattern
//! (TRUNCATE, coarse fallbacks). `epoch` is random per process start; `seq`
//! increases by one per message within an epoch, so a subscriber that sees a
//! gap, a new epoch or a reconnect flushes its L1. The last `epoch:seq` is
//! also SET in `evictd:l1:last` (under the key prefix). A plan that is sent
//! again after a failure keeps its `seq`: subscribers may see a message
//! twice, never a gap.
//!
//! Keys are as the mappings render them, without the global key prefix.

use std::fmt::Write as _;

use evictd_client::protocol::L1_LAST_KEY;
use rand::Rng as _;

use crate::change::Checkpoint;
use crate::mapping::eval::write_json_string;
use crate::plan::{Command, Plan};

pub struct Broadcast {
    channel: String,
    epoch: String,
    next_seq: u64,
    /// The seq of the plan being applied, kept across retries.
    pending: Option<u64>,
}

impl Broadcast {
    pub fn new(channel: &str) -> Broadcast {
        let epoch: u64 = rand::rng().random();
        Broadcast {
            channel: channel.to_owned(),
            epoch: format!("{epoch:016x}"),
            next_seq: 1,
            pending: None,
        }
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// Appends PUBLISH and the `last` SET for `plan` to `pipe`, unless the
    /// plan invalidates nothing.
    pub fn append(&mut self, plan: &Plan, prefix: &str, pipe: &mut redis::Pipeline) {
        if plan.commands.is_empty() {
            return;
        }
        let seq = *self.pending.get_or_insert_with(|| {
            let seq = self.next_seq;
            self.next_seq += 1;
            seq
        });
        pipe.cmd("PUBLISH")
            .arg(&self.channel)
            .arg(self.message(plan, seq))
            .ignore();
        pipe.cmd("SET")
            .arg(format!("{prefix}{L1_LAST_KEY}"))
            .arg(format!("{}:{seq}", self.epoch))
            .ignore();
    }

    /// The plan's message was delivered: the next plan gets the next seq.
    pub fn delivered(&mut self) {
        self.pending = None;
    }

    /// The JSON message, written directly: a batch can hold thousands of
    /// keys, and a `serde_json::Value` per key would copy each one twice.
    fn message(&self, plan: &Plan, seq: u64) -> String {
        let mut keys = Vec::new();
        let mut tags = Vec::new();
        let mut patterns = Vec::new();
        let mut tag_patterns = Vec::new();
        let mut size = 96;
        for command in &plan.commands {
            let (list, text) = match command {
                Command::Unlink { key, .. } | Command::Set { key, .. } => (&mut keys, key),
                Command::InvalidateTag { tag, .. } => (&mut tags, tag),
                Command::UnlinkMatching { pattern, .. } => (&mut patterns, pattern),
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
        json.push('}');
        json
    }
}

/// Appends `,"name":["a","b"]` with JSON string escaping.
fn write_list(json: &mut String, name: &str, items: &[&str]) {
    let _ = write!(json, r#","{name}":["#);
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
        let broadcast = Broadcast::new("evictd:l1");
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
                },
            ],
            checkpoint: Some(Checkpoint::Lsn(Lsn(0x16B3748))),
            ..Plan::default()
        };
        let text = broadcast.message(&plan, 7);
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
            }
        );
        let message: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(
            message,
            serde_json::json!({
                "v": 1, "epoch": broadcast.epoch(), "seq": 7, "lsn": "0/16B3748",
                "keys": ["user:\"1\"\\x"], "tags": ["user:1"], "patterns": ["order:*"],
            })
        );
    }
}
