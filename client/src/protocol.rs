//! What evictd and its clients share in Redis, defined once: key names,
//! the fill scripts and the L1 broadcast message. `docs/PROTOCOL.md`
//! describes the same for other languages.

use serde::{Deserialize, Serialize};

/// Tag sets live at `<prefix>tag:<name>`; their members are full keys.
pub const TAG_NAMESPACE: &str = "tag:";

/// What every fill lease starts with. A lease lives in the cache key
/// itself: bare (`LEASE` + token) while the first fill loads, or wrapped
/// around the cached value (`LEASE` + token + `\0` + value) while a
/// reader reloads it. So whatever evictd does to the key to invalidate it
/// removes the lease too, and evictd needs no command of its own for
/// fencing.
pub const LEASE: &str = "\u{0}evictd:lease:";

/// The key holding the last broadcast's `epoch:seq`, under the prefix.
pub const L1_LAST_KEY: &str = "evictd:l1:last";

/// The broadcast log, under the prefix: a Redis Stream holding the recent
/// broadcasts (field `m`, the message as published), appended before each
/// is published, so that a subscriber that missed some replays them.
pub const L1_LOG_KEY: &str = "evictd:l1:log";

/// The field of a log entry that holds the message.
pub const L1_LOG_FIELD: &str = "m";

/// The sorted set of client instances publishing their counters (scored
/// by the time of their last write, ms); each one's hash is at
/// `<prefix>evictd:clients:<instance>` (docs/PROTOCOL.md, "Client
/// counters").
pub const CLIENTS_KEY: &str = "evictd:clients";

/// The counters clients publish, as both the crate and the Python package
/// name them.
pub const PUBLISHED_COUNTERS: [&str; 9] = [
    "l1_hits",
    "hits",
    "misses",
    "loads",
    "fills",
    "fenced",
    "degraded",
    "stale_served",
    "early_refreshes",
];

/// The Postgres source's continuity record lives at `<prefix>evictd:slot:`
/// followed by the slot's name: `<system id> <WAL position>`, the position
/// evictd applied and acknowledged through (moved also while idle).
pub const SLOT_RECORD_NAMESPACE: &str = "evictd:slot:";

/// Namespace version counters live at `<prefix>evictd:ns:` followed by
/// the namespace (`evictd:ns:user:7`). A mapping's `versions = [...]`
/// makes evictd bump the counter of each namespace a change touches; a
/// reader composes every key under the namespace with the counter's
/// value (see [`versioned_key`]), so a bump leaves everything cached under
/// the namespace behind at once.
pub const VERSION_NAMESPACE: &str = "evictd:ns:";

/// The counter of `namespace`, without the prefix.
pub fn version_key(namespace: &str) -> String {
    format!("{VERSION_NAMESPACE}{namespace}")
}

/// `key` under `namespace` at `version`: `user:7@3:orders`.
pub fn versioned_key(namespace: &str, version: u64, key: &str) -> String {
    let mut composed = String::new();
    compose_versioned(&mut composed, namespace, version, key);
    composed
}

/// [`versioned_key`] into `out` (cleared first), to reuse its buffer:
/// every versioned read composes one.
pub fn compose_versioned(out: &mut String, namespace: &str, version: u64, key: &str) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = version;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let digits = std::str::from_utf8(&digits[at..]).expect("ASCII digits");
    out.clear();
    out.reserve(namespace.len() + digits.len() + key.len() + 2);
    out.push_str(namespace);
    out.push('@');
    out.push_str(digits);
    out.push(':');
    out.push_str(key);
}

/// A WAL position, written as Postgres writes one: `16/B374D848`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position(pub u64);

impl Position {
    /// Parses Postgres' `XXX/XXX` form; `None` when it is not one.
    pub fn parse(text: &str) -> Option<Position> {
        text.parse().ok()
    }
}

impl std::str::FromStr for Position {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{text}` is not a WAL position like 0/16B3748");
        let (high, low) = text.trim().split_once('/').ok_or_else(bad)?;
        let high = u32::from_str_radix(high, 16).map_err(|_| bad())?;
        let low = u32::from_str_radix(low, 16).map_err(|_| bad())?;
        Ok(Position((u64::from(high) << 32) | u64::from(low)))
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// The position a continuity record holds (`<system id> <position>`).
pub fn record_position(record: &str) -> Option<Position> {
    record.split_once(' ')?.1.parse().ok()
}

/// The fenced fill (KEYS: key; ARGV: lease, value, TTL in ms).
pub const FILL_SCRIPT: &str = include_str!("../lua/fill.lua");

/// Gives a fill right back: deletes the key while it holds the lease
/// (KEYS: key; ARGV: lease).
pub const RELEASE_SCRIPT: &str = include_str!("../lua/release.lua");

/// Takes the right to reload a cached value by wrapping it in a lease
/// (KEYS: key; ARGV: lease, [`LEASE`]).
pub const RELOAD_SCRIPT: &str = include_str!("../lua/reload.lua");

/// evictd's tag invalidation on a standalone Redis (KEYS: tag sets):
/// the members, then the sets.
pub const INVALIDATE_TAGS_SCRIPT: &str = include_str!("../lua/invalidate_tags.lua");

/// evictd's bump of a namespace counter (KEYS: counter): INCR, only if it
/// exists. A counter that does not exist has nothing cached under it (a
/// reader creates it, with [`VERSION_SCRIPT`], before composing a key
/// with it), and creating it would leave a key behind per namespace ever
/// changed. Returns the new version, or 0. Sent with every bump, so it is
/// kept short.
pub const BUMP_SCRIPT: &str = include_str!("../lua/bump.lua");

/// A reader's read of a namespace counter, creating it at `ARGV[1]` (the
/// clock in microseconds) when there is none (KEYS: counter).
pub const VERSION_SCRIPT: &str = include_str!("../lua/version.lua");

/// The apply stamp (with the prefix in front): while evictd's consistency
/// checker runs, evictd sets it before applying each batch to a number that
/// grows with every batch (microseconds of evictd's clock, kept above the
/// stamp it found). A fill that reads it after taking its lease and before
/// reading the database records it in the value it stores (see
/// [`stamped`]), which lets the checker tell a value loaded after an
/// invalidation from one loaded before it.
pub const AUDIT_STAMP_KEY: &str = "evictd:audit:stamp";

/// The tag stamp (with the prefix in front): before each batch that
/// invalidates tags, evictd sets it to a number that grows with every such
/// batch (microseconds of evictd's clock, kept above the one it found), and
/// sets [`TAG_AT`] of each tag it invalidates, and [`TAG_PATTERN_AT`] when
/// it invalidates tags by pattern, to the same number, ahead of the
/// invalidations themselves. A fill whose tags come from the row it loads
/// reads this after taking its lease and before reading the database, and
/// stores only if no tag of its value was invalidated after it (see
/// docs/PROTOCOL.md, "Tags taken from the row").
pub const TAG_STAMP_KEY: &str = "evictd:tags:stamp";

/// `P` + this + tag: the tag stamp of the tag's last invalidation; expires
/// after [`TAG_AT_MS`].
pub const TAG_AT: &str = "evictd:tag-at:";

/// The tag stamp of the last invalidation of tags by pattern; expires
/// after [`TAG_AT_MS`].
pub const TAG_PATTERN_AT: &str = "evictd:tags:pattern-at";

/// How long a tag's stamp is kept, in milliseconds: a fill whose tags come
/// from its row and that checks them later than this after reading
/// [`TAG_STAMP_KEY`] stores nothing.
pub const TAG_AT_MS: u64 = 60_000;

/// The start of a value that records the apply stamp its fill read:
/// `\0evictd:at:STAMP\0VALUE`, `STAMP` in decimal.
pub const STAMPED: &str = "\u{0}evictd:at:";

/// `value` recording the apply stamp `stamp`.
pub fn stamped(stamp: u64, value: &str) -> String {
    format!("{STAMPED}{stamp}\u{0}{value}")
}

/// The apply stamp a stored value records, if any, and the value itself.
pub fn split_stamp(raw: &str) -> (Option<u64>, &str) {
    let Some(rest) = raw.strip_prefix(STAMPED) else {
        return (None, raw);
    };
    match rest.split_once('\u{0}') {
        Some((stamp, value)) => match stamp.parse() {
            Ok(stamp) => (Some(stamp), value),
            Err(_) => (None, raw),
        },
        None => (None, raw),
    }
}

/// What a cache key holds, as a reader sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored<'a> {
    /// A value.
    Value(&'a str),
    /// A bare lease: a reader is loading the first value.
    Loading,
    /// A value a reader is reloading: serve it meanwhile.
    Reloading(&'a str),
}

impl<'a> Stored<'a> {
    /// What `raw` holds; a value's recorded apply stamp is left out.
    pub fn parse(raw: &'a str) -> Self {
        let Some(rest) = raw.strip_prefix(LEASE) else {
            return Stored::Value(split_stamp(raw).1);
        };
        match rest.split_once('\u{0}') {
            Some((_token, value)) => Stored::Reloading(split_stamp(value).1),
            None => Stored::Loading,
        }
    }

    /// The apply stamp recorded with the value `raw` holds (wrapped in a
    /// lease or not).
    pub fn stamp(raw: &str) -> Option<u64> {
        let value = match raw.strip_prefix(LEASE) {
            Some(rest) => rest.split_once('\u{0}')?.1,
            None => raw,
        };
        split_stamp(value).0
    }
}

/// The lease of the token `token`.
pub fn lease(token: &str) -> String {
    format!("{LEASE}{token}")
}

/// Whether `key` matches a pattern of a broadcast or of evictd's pattern
/// deletes: `*` matches any run of characters and a backslash makes the
/// next character literal (no other glob syntax occurs in them).
pub fn glob_matches(pattern: &str, key: &str) -> bool {
    let pattern: Vec<(bool, char)> = {
        let mut tokens = Vec::with_capacity(pattern.len());
        let mut chars = pattern.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => tokens.push((false, chars.next().unwrap_or('\\'))),
                '*' => tokens.push((true, '*')),
                c => tokens.push((false, c)),
            }
        }
        tokens
    };
    let key: Vec<char> = key.chars().collect();
    // Classic wildcard matching with backtracking to the last star.
    let (mut p, mut k) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while k < key.len() {
        match pattern.get(p) {
            Some(&(true, _)) => {
                star = Some((p, k));
                p += 1;
            }
            Some(&(false, c)) if c == key[k] => {
                p += 1;
                k += 1;
            }
            _ => match star {
                Some((star_p, star_k)) => {
                    p = star_p + 1;
                    k = star_k + 1;
                    star = Some((star_p, star_k + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&(wild, _)| wild)
}

/// One L1 broadcast: what an applied batch invalidated. Keys are as the
/// mappings render them, without the prefix.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Broadcast {
    /// The message format, 1.
    pub v: u32,
    /// Random per evictd process start.
    pub epoch: String,
    /// One more than the previous message's within an epoch.
    pub seq: u64,
    /// The WAL position the batch acknowledges (Postgres source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    #[serde(default)]
    pub keys: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patterns: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tag_patterns: Vec<String>,
    /// The mapped tables whose changes the batch invalidated for (for
    /// people watching; a cache needs only the lists above).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<String>,
    /// The operations (`insert`, `update`, `delete`, `truncate`) of the
    /// batch's row changes, by table (for people watching too).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub ops: std::collections::BTreeMap<String, Vec<String>>,
    /// The batch's apply stamp (see [`AUDIT_STAMP_KEY`]), while evictd's
    /// consistency checker runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stamp: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versioned_keys_compose_namespace_version_and_key() {
        for (version, composed) in [
            (0, "user:7@0:orders"),
            (9, "user:7@9:orders"),
            (1_733_216_400_000_001, "user:7@1733216400000001:orders"),
            (u64::MAX, "user:7@18446744073709551615:orders"),
        ] {
            assert_eq!(versioned_key("user:7", version, "orders"), composed);
        }
        assert_eq!(version_key("user:7"), "evictd:ns:user:7");
    }

    #[test]
    fn positions_read_and_print_as_postgres_writes_them() {
        let position: Position = "16/B374D848".parse().unwrap();
        assert_eq!(position, Position(0x16_B374_D848));
        assert_eq!(position.to_string(), "16/B374D848");
        assert!("0/1".parse::<Position>().unwrap() < "1/0".parse().unwrap());
        assert!("16B3748".parse::<Position>().is_err());
        assert_eq!(
            record_position("7310 0/16B3748"),
            Some(Position(0x16B_3748))
        );
    }

    #[test]
    fn a_reader_tells_values_from_leases() {
        assert_eq!(Stored::parse("{\"a\":1}"), Stored::Value("{\"a\":1}"));
        assert_eq!(
            Stored::parse("\u{0}evictd:absent"),
            Stored::Value("\u{0}evictd:absent")
        );
        assert_eq!(Stored::parse(&lease("00ff")), Stored::Loading);
        let recorded = stamped(1_733_216_400_000_001, "{\"a\":1}");
        assert_eq!(Stored::parse(&recorded), Stored::Value("{\"a\":1}"));
        assert_eq!(Stored::stamp(&recorded), Some(1_733_216_400_000_001));
        let reloading = format!("{}\u{0}{recorded}", lease("00ff"));
        assert_eq!(Stored::parse(&reloading), Stored::Reloading("{\"a\":1}"));
        assert_eq!(Stored::stamp(&reloading), Some(1_733_216_400_000_001));
        assert_eq!(Stored::stamp("{\"a\":1}"), None);
        // Not a number: the value is taken whole.
        let odd = format!("{STAMPED}x\u{0}v");
        assert_eq!(Stored::parse(&odd), Stored::Value(&odd));
        let wrapped = format!("{}\u{0}{{\"a\":1}}", lease("00ff"));
        assert_eq!(Stored::parse(&wrapped), Stored::Reloading("{\"a\":1}"));
        let wrapped_absent = format!("{}\u{0}\u{0}evictd:absent", lease("00ff"));
        assert_eq!(
            Stored::parse(&wrapped_absent),
            Stored::Reloading("\u{0}evictd:absent")
        );
    }
}
