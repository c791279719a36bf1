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

use rand::Rng as _;

use crate::change::Checkpoint;
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
            .arg(format!("{prefix}evictd:l1:last"))
            .arg(format!("{}:{seq}", self.epoch))
            .ignore();
    }

    /// The plan's message was delivered: the next plan gets the next seq.
    pub fn delivered(&mut self) {
        self.pending = None;
    }

    fn message(&self, plan: &Plan, seq: u64) -> String {
        let mut keys = Vec::new();
        let mut tags = Vec::new();
        let mut patterns = Vec::new();
        let mut tag_patterns = Vec::new();
        for command in &plan.commands {
            match command {
                Command::Unlink { key, .. } | Command::Set { key, .. } => keys.push(key.as_str()),
                Command::InvalidateTag { tag, .. } => tags.push(tag.as_str()),
                Command::UnlinkMatching { pattern, .. } => patterns.push(pattern.as_str()),
                Command::InvalidateTagsMatching { pattern, .. } => {
                    tag_patterns.push(pattern.as_str())
                }
            }
        }
        let mut message = serde_json::json!({
            "v": 1,
            "epoch": self.epoch,
            "seq": seq,
            "keys": keys,
            "tags": tags,
        });
        if let Some(Checkpoint::Lsn(lsn)) = plan.checkpoint {
            message["lsn"] = lsn.to_string().into();
        }
        if !patterns.is_empty() {
            message["patterns"] = patterns.into();
        }
        if !tag_patterns.is_empty() {
            message["tag_patterns"] = tag_patterns.into();
        }
        message.to_string()
    }
}
