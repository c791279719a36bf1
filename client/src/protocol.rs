//! What evictd and its clients share in Redis, defined once: key names,
//! the fill scripts and the L1 broadcast message. `docs/PROTOCOL.md`
//! describes the same for other languages.

use serde::{Deserialize, Serialize};

/// Tag sets live at `<prefix>tag:<name>`; their members are full keys.
pub const TAG_NAMESPACE: &str = "tag:";

/// Lease keys live at `<prefix>evictd:lease:...` (see [`lease_key`]).
pub const LEASE_NAMESPACE: &str = "evictd:lease:";

/// The key holding the last broadcast's `epoch:seq`, under the prefix.
pub const L1_LAST_KEY: &str = "evictd:l1:last";

/// The fenced fill (KEYS: key, lease; ARGV: token, value, TTL in ms).
pub const FILL_SCRIPT: &str = include_str!("../lua/fill.lua");

/// Gives a fill right back if still held (KEYS: lease; ARGV: token).
pub const RELEASE_SCRIPT: &str = include_str!("../lua/release.lua");

/// evictd's tag invalidation on a standalone Redis (KEYS: tag sets; ARGV:
/// the lease prefix): members, their leases, then the sets.
pub const INVALIDATE_TAGS_SCRIPT: &str = include_str!("../lua/invalidate_tags.lua");

/// The part of `key` Redis Cluster hashes: the first `{...}` with
/// something inside, if there is one.
pub fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let close = key[open + 1..].find('}')? + open + 1;
    (close > open + 1).then(|| &key[open + 1..close])
}

/// The lease (fill right) of the full key `key` (prefix included), in the
/// same Cluster slot: `<prefix>evictd:lease:<key>` when the key has a hash
/// tag of its own, else `<prefix>evictd:lease:{<key>}`. A key holding a
/// `}` but no hash tag has its lease elsewhere ([`same_slot`] tells).
pub fn lease_key(prefix: &str, key: &str) -> String {
    let mut lease = String::with_capacity(prefix.len() + LEASE_NAMESPACE.len() + key.len() + 2);
    push_lease_key(prefix, key, &mut lease);
    lease
}

/// [`lease_key`] appended to `out`.
pub fn push_lease_key(prefix: &str, key: &str, out: &mut String) {
    out.push_str(prefix);
    out.push_str(LEASE_NAMESPACE);
    if hash_tag(key).is_some() {
        out.push_str(key);
    } else {
        out.push('{');
        out.push_str(key);
        out.push('}');
    }
}

/// The two glob patterns that match the leases of the keys `pattern` (a
/// full-key glob, prefix included and escaped) matches: the braced form
/// and the form of keys with their own hash tag.
pub fn lease_patterns(escaped_prefix: &str, pattern: &str) -> [String; 2] {
    [
        format!("{escaped_prefix}{LEASE_NAMESPACE}{{{pattern}}}"),
        format!("{escaped_prefix}{LEASE_NAMESPACE}{pattern}"),
    ]
}

/// Whether `key`'s lease shares its Cluster slot (false only for a key
/// with a `}` and no hash tag).
pub fn same_slot(key: &str) -> bool {
    hash_tag(key).is_some() || !key.contains('}')
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_tags_as_redis_cluster_reads_them() {
        assert_eq!(hash_tag("user:{42}:orders"), Some("42"));
        assert_eq!(hash_tag("{a}{b}"), Some("a"));
        assert_eq!(hash_tag("{}x{y}"), None);
        assert_eq!(hash_tag("order:1"), None);
        assert_eq!(hash_tag("a{b"), None);
    }

    #[test]
    fn leases_hash_like_their_keys() {
        assert_eq!(
            lease_key("app:", "app:order:1"),
            "app:evictd:lease:{app:order:1}"
        );
        assert_eq!(
            lease_key("", "user:{42}:orders"),
            "evictd:lease:user:{42}:orders"
        );
        assert!(same_slot("order:1"));
        assert!(same_slot("user:{42}"));
        assert!(!same_slot("a}b"));
        assert_eq!(
            lease_patterns("app:", "app:order:*"),
            [
                "app:evictd:lease:{app:order:*}",
                "app:evictd:lease:app:order:*"
            ]
        );
    }
}
