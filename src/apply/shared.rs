//! What the standalone and the Cluster sinks share: the continuity record
//! and its script, per-plan stats, WAIT settings, TTL jitter, and the
//! prefix rules for pattern deletes.

use rand::Rng as _;

use crate::change::Checkpoint;
use crate::continuity::Remembered;
use crate::error::{Error, ErrorKind};
use crate::mapping::template::escape_glob;

/// SCAN COUNT hint for pattern deletes.
pub const SCAN_COUNT: usize = 1000;

/// What one plan did in Redis.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub commands: u64,
    pub keys: u64,
    pub round_trips: u64,
}

/// WAIT after each batch (each node's pipeline, in a Cluster): how many
/// replicas must have it, and how long that may take.
#[derive(Clone, Copy, Debug)]
pub struct Wait {
    pub replicas: u32,
    pub timeout_ms: u64,
}

/// Where the continuity record goes, and the identity it names.
#[derive(Clone, Debug)]
pub struct Record {
    /// The full Redis key (prefix included).
    pub key: String,
    pub system_id: String,
}

/// Sets the continuity record (KEYS[1]) to ARGV[1] unless it already holds
/// a later position of the same database: a batch applied again after a
/// reconnect must not move the record backwards, or the next start would
/// see the slot past it and call continuity lost.
const RECORD_SCRIPT: &str = r"
local current = redis.call('GET', KEYS[1])
if current then
  local held_system, held_hi, held_lo = string.match(current, '^(%S+) (%x+)/(%x+)$')
  local new_system, new_hi, new_lo = string.match(ARGV[1], '^(%S+) (%x+)/(%x+)$')
  if held_system and held_system == new_system then
    held_hi, held_lo = tonumber(held_hi, 16), tonumber(held_lo, 16)
    new_hi, new_lo = tonumber(new_hi, 16), tonumber(new_lo, 16)
    if held_hi > new_hi or (held_hi == new_hi and held_lo > new_lo) then
      return 0
    end
  end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
";

impl Record {
    /// The record's value for a plan that acknowledges `checkpoint` (a
    /// WAL position: the record is the Postgres source's).
    pub fn value(&self, checkpoint: Option<&Checkpoint>) -> Option<String> {
        match checkpoint? {
            Checkpoint::Lsn(lsn) => Some(Remembered::encode(&self.system_id, *lsn)),
            Checkpoint::Offsets(_) => None,
        }
    }

    /// Appends the write of the record for a plan that acknowledges
    /// `checkpoint` (nothing without one). The record only moves forwards.
    pub fn append(&self, checkpoint: Option<&Checkpoint>, pipe: &mut redis::Pipeline) {
        if let Some(value) = self.value(checkpoint) {
            pipe.cmd("EVAL")
                .arg(RECORD_SCRIPT)
                .arg(1)
                .arg(&self.key)
                .arg(value)
                .ignore();
        }
    }
}

/// `pattern` under the literal (glob-escaped) key prefix and `namespace`
/// (`tag:` for tag sets). A pattern that
/// starts with a wildcard is refused whatever the prefix: the mappings
/// refuse templates that could produce one, and this is the last guard
/// against deleting every key of a Redis.
pub fn under_prefix(prefix: &str, namespace: &str, pattern: &str) -> Result<String, Error> {
    if pattern.is_empty() || pattern.starts_with(['*', '?', '[']) {
        return Err(Error::new(
            ErrorKind::Config,
            format!("refusing to delete by the pattern `{pattern}`: it has no literal prefix and could match every key"),
        ));
    }
    let mut full = String::with_capacity(prefix.len() + namespace.len() + pattern.len());
    escape_glob(prefix, &mut full);
    escape_glob(namespace, &mut full);
    full.push_str(pattern);
    Ok(full)
}

/// `seconds` varied at random by up to `jitter_bp` basis points either way.
pub fn jittered(seconds: u64, jitter_bp: u32) -> u64 {
    if jitter_bp == 0 {
        return seconds;
    }
    let spread = seconds.saturating_mul(u64::from(jitter_bp)) / 10_000;
    let low = seconds.saturating_sub(spread).max(1);
    let high = seconds.saturating_add(spread);
    rand::rng().random_range(low..=high)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..1000 {
            let ttl = jittered(3600, 1000);
            assert!((3240..=3960).contains(&ttl), "{ttl}");
        }
        assert_eq!(jittered(60, 0), 60);
        assert!(jittered(1, 9999) >= 1);
    }
}
