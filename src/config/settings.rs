//! Every setting, declared once: its key, default, range and meaning. The
//! reader takes defaults and ranges from here, the `Default` impls take
//! their values from here, and docs/CONFIGURATION.md's table, the
//! `[[purge]]` table of docs/MAPPINGS.md and `evictd.example.toml` are
//! generated from here ([`fn@reference`], [`example`]); a test fails when the
//! committed files differ from what these declarations generate.

use std::ops::RangeInclusive;

/// One setting.
pub struct Setting {
    /// `section.key`; `purge[].key` for the keys of each `[[purge]]`
    /// section, `postgres.replica[].key` for each `[[postgres.replica]]`.
    pub key: &'static str,
    pub default: Default,
    /// For integer settings, the values accepted.
    pub range: Option<RangeInclusive<u64>>,
    /// What it does, in the reference's words (Markdown).
    pub meaning: &'static str,
    /// Set (not commented out) in `evictd.example.toml`, with this value.
    pub example: Option<&'static str>,
}

/// A setting's default.
pub enum Default {
    /// The value a file that leaves the key out gets, written as TOML.
    Value(&'static str),
    /// No value by default: what happens without one, in words.
    Unset(&'static str),
}

use Default::{Unset, Value};

const fn setting(
    key: &'static str,
    default: Default,
    range: Option<RangeInclusive<u64>>,
    meaning: &'static str,
) -> Setting {
    Setting {
        key,
        default,
        range,
        meaning,
        example: None,
    }
}

const fn shown(mut setting: Setting, example: &'static str) -> Setting {
    setting.example = Some(example);
    setting
}

const DAY_MS: u64 = 86_400_000;

/// The settings, section by section, in the order the reference lists
/// them.
pub static SETTINGS: &[Setting] = &[
    shown(setting("source.kind", Value("\"postgres\""), None, "`postgres` or `kafka`"), "\"postgres\""),
    shown(setting("postgres.url", Unset("(required for postgres)"), None, "the primary, `postgres://user@host:port/db` (libpq's `sslmode` and `sslrootcert` apply; its multi-host form `host1:5432,host2:5432` with `target_session_attrs=read-write` connects to whichever is writable, which follows a failover); keep the password out of the file: `EVICTD_POSTGRES__URL` or `postgres.password_file`"), "\"postgres://evictd@127.0.0.1:5432/app\""),
    setting("postgres.password_file", Unset("none"), None, "read the password from this file (relative to the config file) instead of the URL; a password in both is refused"),
    shown(setting("postgres.slot", Value("\"evictd\""), None, "replication slot (a-z, 0-9, `_`; at most 63)"), "\"evictd\""),
    shown(setting("postgres.publication", Value("\"evictd\""), None, "publication of the mapped tables"), "\"evictd\""),
    shown(setting("postgres.create_slot", Value("true"), None, "create slot and publication when absent"), "true"),
    setting("postgres.failover_slot", Value("false"), None, "PostgreSQL 17+: create the slot as a failover slot (an existing one is switched to it), which standbys with `sync_replication_slots` keep, so that evictd continues on a promoted standby without invalidating every mapped table (see [MANAGED.md](MANAGED.md#failover-without-a-cold-cache))"),
    setting("postgres.max_retained_wal_mb", Value("1024"), Some(1..=1 << 30), "warn (log, metric, `status`) when the slot retains more WAL"),
    setting("postgres.visibility_gate", Value("true"), None, "apply a batch only once its transactions are visible to a new snapshot on the primary; with the Kafka source, when `postgres.url` is set (see [Delivery and acknowledgement](RUNNING.md#delivery-and-acknowledgement))"),
    setting("postgres.visibility_warn_ms", Value("5000"), Some(1..=DAY_MS), "past this wait for visibility: a WARN, `/readyz` 503 with the reason"),
    setting("postgres.replica_max_wait_ms", Value("30000"), Some(1..=DAY_MS), "longest a batch waits for the read replicas; then its second invalidation is applied anyway"),
    setting("postgres.replica_pending_keys", Value("100000"), Some(1..=100_000_000), "most keys, tags and counters held for second invalidations; past it, a batch's turn into their family's pattern"),
    setting("postgres.replica[].url", Unset("(required)"), None, "`[[postgres.replica]]`, one per read replica applications read from: its `postgres://` URL; each batch is invalidated again once every replica replayed it (needs `postgres.url` and `visibility_gate`)"),
    setting("postgres.replica[].name", Unset("host:port"), None, "the replica's label in metrics, logs and `/readyz`; unique"),
    setting("postgres.replica[].password_file", Unset("none"), None, "the replica's password, from this file (relative to the config file)"),
    setting("kafka.brokers", Unset("(required for kafka)"), None, "`host:port,...`"),
    setting("kafka.topics", Unset("(required for kafka)"), None, "Debezium change topics; an entry starting with `^` is a regex"),
    setting("kafka.group_id", Value("\"evictd\""), None, "consumer group; instances sharing it split the partitions"),
    setting("kafka.on_bad_record", Value("\"skip\""), None, "`skip`, `dead_letter` (to `kafka.dead_letter_topic`) or `stop`"),
    setting("kafka.dead_letter_topic", Unset("(required for dead_letter)"), None, "where bad records go with `on_bad_record = \"dead_letter\"`"),
    setting("kafka.commit_interval_ms", Value("1000"), Some(10..=60_000), "how often applied offsets are committed"),
    setting("kafka.drain_timeout_ms", Value("10000"), Some(100..=600_000), "how long a rebalance waits for in-flight records to be applied"),
    setting("kafka.metadata_refresh_ms", Value("5000"), Some(100..=3_600_000), "how often the broker's topic list is read again: a topic created after start (named, or matching a `^` pattern) is consumed within about this long (see [KAFKA.md](KAFKA.md))"),
    setting("kafka.unavailable_value_placeholder", Value("\"__debezium_unavailable_value\""), None, "Debezium's marker for an unchanged TOASTed value"),
    setting("kafka.properties", Unset("none"), None, "a table of librdkafka settings passed through (TLS, SASL, timeouts); those evictd owns are refused"),
    setting("kafka.sasl_password_file", Unset("none"), None, "sets `sasl.password` from this file (relative to the config file)"),
    shown(setting("redis.url", Value("\"redis://127.0.0.1:6379\""), None, "`redis://`, `rediss://` (TLS), or `redis+cluster://host:port` (any node; the others are discovered; TLS to a Cluster is not supported)"), "\"redis://127.0.0.1:6379\""),
    setting("redis.password_file", Unset("none"), None, "read the password from this file (relative to the config file) instead of the URL"),
    shown(setting("redis.prefix", Value("\"\""), None, "prepended to every key and tag set"), "\"\""),
    setting("redis.ca_file", Unset("the system's CAs"), None, "PEM file of the CAs trusted for `rediss://`"),
    setting("redis.cert_file", Unset("none"), None, "PEM client certificate for mutual TLS (with `key_file`)"),
    setting("redis.key_file", Unset("none"), None, "PEM key of `cert_file`"),
    setting("redis.wait_replicas", Value("0"), Some(0..=16), "replicas that must hold a batch (Redis `WAIT`) before it is acknowledged; set it when Redis has replicas, or a failover can lose confirmed invalidations"),
    setting("redis.wait_timeout_ms", Value("1000"), Some(1..=60_000), "how long `WAIT` may take before the batch is retried"),
    setting("redis.allow_plaintext", Value("false"), None, "allow a password over plain `redis://` to a host other than this machine"),
    shown(setting("redis.l1_channel", Value("\"evictd:l1\""), None, "pub/sub channel for L1 evictions"), "\"evictd:l1\""),
    setting("redis.l1_log_len", Value("10000"), Some(0..=10_000_000), "broadcasts kept in the log `evictd:l1:log` (a Stream, trimmed approximately) for subscribers to replay after a gap or reconnect; 0 keeps no log (subscribers then flush)"),
    shown(setting("mappings.dir", Value("\"mappings\""), None, "directory of `*.toml` mapping files (relative to the config file)"), "\"mappings\""),
    setting("mappings.max_key_bytes", Value("1024"), Some(16..=1 << 20), "longest rendered key; a longer one falls back to a pattern delete"),
    setting("mappings.max_keys_per_change", Value("64"), Some(1..=100_000), "most renderings per change, checked when the mappings load"),
    setting("mappings.watch", Value("true"), None, "reload the mappings when a file in `mappings.dir` changes (see [Live reload](MAPPINGS.md#live-reload))"),
    setting("mappings.sql_messages", Value("false"), None, "apply invalidations from SQL messages (see [Invalidations from SQL](MAPPINGS.md#invalidations-from-sql))"),
    setting("mappings.sql_messages_secret_file", Unset("none"), None, "the secret messages must be signed with, from a file (relative to the config file); unset (and no `_env`): messages are not authenticated (a WARN at start, a warning from `check`)"),
    setting("mappings.sql_messages_secret_env", Unset("none"), None, "the same secret from an environment variable"),
    setting("mappings.sql_messages_previous_secret_file", Unset("none"), None, "a second secret accepted during a rotation (needs the current one)"),
    setting("mappings.sql_messages_previous_secret_env", Unset("none"), None, "the same from an environment variable"),
    setting("mappings.sql_messages_allow", Unset("what the mappings render"), None, "a table of `keys`, `tags` and `prefixes`: the patterns (`*` for any run of characters, `\\` before a literal `*`) messages may name"),
    setting("batch.max_keys", Value("10000"), Some(1..=1_000_000), "most distinct keys in one Redis batch"),
    setting("batch.max_wait_ms", Value("2"), Some(0..=60_000), "longest wait for more changes before a batch is sent"),
    setting("batch.max_pending_keys", Value("100000"), Some(1..=100_000_000), "keys a streamed transaction may buffer; the subtransaction that overflows it degrades to a coarse invalidation if it commits"),
    shown(setting("admin.listen", Value("\"127.0.0.1:9187\""), None, "`/metrics`, `/healthz`, `/readyz` (`0.0.0.0:9187` in a container)"), "\"127.0.0.1:9187\""),
    setting("admin.console", Value("false"), None, "serve the console at `/ui` (see [The console](OPERATIONS.md#the-console)); on an address other than loopback it needs `token_file` or `token_env`"),
    setting("admin.token_file", Unset("none"), None, "the bearer token the console's data needs, from a file (relative to the config file), read at each request so a rotated token takes effect at once; with it, rows and cached values are shown"),
    setting("admin.token_env", Unset("none"), None, "the same token from an environment variable"),
    setting("audit.enabled", Value("false"), None, "run the consistency checker (see [Measured consistency](OPERATIONS.md#measured-consistency))"),
    setting("audit.sample", Value("0.01"), None, "share of deleted and refreshed keys checked, in (0, 1]"),
    setting("audit.delay_ms", Value("5000"), Some(0..=3_600_000), "how long after its batch was applied a key is checked"),
    setting("audit.queue", Value("10000"), Some(1..=1_000_000), "most samples waiting for their check; more are dropped and counted"),
    setting("warm.on_start", Value("false"), None, "`evictd run` warms the refresh keys once streaming began (see [Cache warming](OPERATIONS.md#cache-warming))"),
    setting("warm.rate", Value("10000"), Some(0..=10_000_000), "keys per second at most when warming (0: no limit)"),
    setting("purge[].kind", Unset("(required)"), None, "`[[purge]]`, one per CDN target (see [CDN purge by surrogate key](MAPPINGS.md#cdn-purge-by-surrogate-key)): `varnish`, `fastly`, `cloudflare` or `webhook`"),
    setting("purge[].name", Unset("the kind"), None, "the target's label in metrics and logs; unique"),
    setting("purge[].url", Unset("Fastly: `https://api.fastly.com`; Cloudflare: `https://api.cloudflare.com/client/v4`; else required"), None, "Varnish: the URL PURGE requests go to; webhook: where it POSTs; Fastly, Cloudflare: the API's base URL"),
    setting("purge[].service_id", Unset("(required for fastly)"), None, "the Fastly service"),
    setting("purge[].zone_id", Unset("(required for cloudflare)"), None, "the Cloudflare zone"),
    setting("purge[].token_file", Unset("(this or `token_env` required for fastly and cloudflare)"), None, "the API token, from a file (relative to the config file), read at each request, so a rotated token takes effect at once"),
    setting("purge[].token_env", Unset("none"), None, "the API token from an environment variable"),
    setting("purge[].secret_file", Unset("(this or `secret_env` required for webhook)"), None, "the HMAC key the webhook's requests are signed with, from a file"),
    setting("purge[].secret_env", Unset("none"), None, "the HMAC key from an environment variable"),
    setting("purge[].soft", Value("false"), None, "soft purge: Varnish `xkey.softpurge`, `Fastly-Soft-Purge: 1` (Cloudflare and the webhook have none)"),
    setting("purge[].max_keys", Unset("the provider's limit"), None, "keys per request: at most 256 (Fastly), 100 (Cloudflare), 100 (Varnish, to keep the header short), 10000 (webhook)"),
    setting("purge[].rate", Value("10"), None, "requests per second at most, in (0, 10000]"),
    setting("purge[].timeout_ms", Value("5000"), Some(100..=120_000), "per request"),
    setting("purge[].best_effort", Value("false"), None, "give up on a request after `retries` attempts instead of holding the acknowledgement back (see [CDN purge by surrogate key](MAPPINGS.md#cdn-purge-by-surrogate-key))"),
    setting("purge[].retries", Value("5"), Some(1..=1_000), "attempts per request of a `best_effort` target"),
];

/// The declaration of `key` (`section.key`, with `[]` for an array of
/// sections). Every key the reader reads is declared: a test reads every
/// default, and an undeclared key is a bug found there.
pub fn declared(key: &str) -> &'static Setting {
    SETTINGS
        .iter()
        .find(|setting| setting.key == key)
        .unwrap_or_else(|| panic!("setting `{key}` is not declared in src/config/settings.rs"))
}

/// Asserts that `array` (`postgres.replica`) is declared as an array of
/// sections: some key is declared under `array[].`.
pub fn declared_array(array: &str) {
    let prefix = format!("{array}[].");
    assert!(
        SETTINGS
            .iter()
            .any(|setting| setting.key.starts_with(&prefix)),
        "array of sections `{array}` is not declared in src/config/settings.rs"
    );
}

/// The declared key of `key` in the section named `section` as problems
/// name it (`purge[1]` -> `purge[]`, `postgres.replica[0]` ->
/// `postgres.replica[]`).
pub fn key_in(section: &str, key: &str) -> String {
    let mut declared = String::with_capacity(section.len() + key.len() + 1);
    let mut skipping = false;
    for c in section.chars() {
        match c {
            '[' => {
                skipping = true;
                declared.push('[');
            }
            ']' => {
                skipping = false;
                declared.push(']');
            }
            _ if skipping => {}
            c => declared.push(c),
        }
    }
    declared.push('.');
    declared.push_str(key);
    declared
}

fn value(key: &str) -> &'static str {
    match declared(key).default {
        Value(text) => text,
        Unset(_) => panic!("setting `{key}` has no default value"),
    }
}

/// The default of an integer setting.
pub fn u64(key: &str) -> u64 {
    value(key)
        .parse()
        .unwrap_or_else(|_| panic!("setting `{key}`: its default is not an integer"))
}

/// The default of an integer setting that counts things in memory.
pub fn usize(key: &str) -> usize {
    usize::try_from(u64(key)).unwrap_or(usize::MAX)
}

/// The default of a number setting.
pub fn f64(key: &str) -> f64 {
    value(key)
        .parse()
        .unwrap_or_else(|_| panic!("setting `{key}`: its default is not a number"))
}

/// The default of a boolean setting.
pub fn bool(key: &str) -> bool {
    match value(key) {
        "true" => true,
        "false" => false,
        _ => panic!("setting `{key}`: its default is not a boolean"),
    }
}

/// The default of a string setting, without its quotes.
pub fn str(key: &str) -> &'static str {
    value(key)
        .strip_prefix('"')
        .and_then(|text| text.strip_suffix('"'))
        .unwrap_or_else(|| panic!("setting `{key}`: its default is not a string"))
}

/// The range of an integer setting.
pub fn range(key: &str) -> RangeInclusive<u64> {
    declared(key)
        .range
        .clone()
        .unwrap_or_else(|| panic!("setting `{key}` has no range"))
}

/// A number as the reference writes it: digits grouped by commas past
/// four digits, a power of two as one when it is one.
fn number(n: u64) -> String {
    if n >= 1 << 20 && n.is_power_of_two() {
        return format!("2^{}", n.trailing_zeros());
    }
    let digits = n.to_string();
    if digits.len() <= 4 {
        return digits;
    }
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    grouped
}

/// The reference table of the settings whose key starts with one of
/// `prefixes` (and not with one of `except`), as Markdown, keys shown
/// without `strip`.
pub fn reference(prefixes: &[&str], except: &[&str], strip: &str) -> String {
    let mut table =
        String::from("| key | default | range | meaning |\n| --- | --- | --- | --- |\n");
    for setting in SETTINGS.iter().filter(|setting| {
        prefixes.iter().any(|p| setting.key.starts_with(p))
            && !except.iter().any(|p| setting.key.starts_with(p))
    }) {
        let key = setting.key.strip_prefix(strip).unwrap_or(setting.key);
        let key = match key.split_once("[].") {
            Some((array, field)) => format!("`[[{array}]]` `{field}`"),
            None => format!("`{key}`"),
        };
        let default = match setting.default {
            Value(text) => format!("`{text}`"),
            Unset(words) => words.to_owned(),
        };
        let range = setting.range.as_ref().map_or_else(String::new, |r| {
            format!("{}-{}", number(*r.start()), number(*r.end()))
        });
        table.push_str(&format!(
            "| {key} | {default} | {range} | {} |\n",
            setting.meaning
        ));
    }
    table
}

/// `text` as `#` comment lines of at most 76 columns.
fn comment(text: &str, out: &mut String) {
    let mut line = String::from("#");
    for word in text.split_whitespace() {
        if line.len() + 1 + word.len() > 76 && line.len() > 1 {
            out.push_str(&line);
            out.push('\n');
            line = String::from("#");
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
}

/// Markdown links and backticks as plain text, for a TOML comment.
fn plain(meaning: &str) -> String {
    let mut text = String::new();
    let mut rest = meaning;
    while let Some(open) = rest.find('[') {
        text.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        // `[label](target)`, the label without brackets of its own.
        let link = after.find(']').and_then(|close| {
            let label = &after[..close];
            let target = after[close + 1..].strip_prefix('(')?;
            let end = target.find(')')?;
            (!label.contains('[')).then(|| (label, close + 1 + 1 + end + 1))
        });
        match link {
            Some((label, length)) => {
                text.push_str(label);
                rest = &after[length..];
            }
            None => {
                text.push('[');
                rest = after;
            }
        }
    }
    text.push_str(rest);
    text.replace('`', "")
}

/// `evictd.example.toml`: every setting with its meaning, those with an
/// example set, the others commented out at their default.
pub fn example() -> String {
    let mut out = String::from(
        "# evictd configuration, generated from src/config/settings.rs (the\n\
         # reference: docs/CONFIGURATION.md). Every key can be overridden by an\n\
         # environment variable EVICTD_<SECTION>__<KEY>, e.g. EVICTD_POSTGRES__URL.\n\
         # Relative paths are resolved against this file's directory.\n",
    );
    let mut section = "";
    for setting in SETTINGS {
        let (this, key) = setting.key.rsplit_once('.').expect("section.key");
        if this != section {
            section = this;
            out.push('\n');
            // A section none of whose keys is set stays commented out: an
            // empty `[kafka]` would ask for the Kafka source's settings.
            let used = SETTINGS.iter().any(|other| {
                other.example.is_some() && other.key.rsplit_once('.').map(|(s, _)| s) == Some(this)
            });
            match this.strip_suffix("[]") {
                Some(array) => out.push_str(&format!("# [[{array}]]\n")),
                None if used => out.push_str(&format!("[{this}]\n")),
                None => out.push_str(&format!("# [{this}]\n")),
            }
        }
        comment(&plain(setting.meaning), &mut out);
        match (setting.example, &setting.default) {
            (Some(example), _) => out.push_str(&format!("{key} = {example}\n")),
            (None, Value(default)) => out.push_str(&format!("# {key} = {default}\n")),
            (None, Unset(_)) => out.push_str(&format!("# {key} = ...\n")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_declared_once_and_defaults_parse() {
        let mut keys: Vec<&str> = SETTINGS.iter().map(|s| s.key).collect();
        keys.sort_unstable();
        let before = keys.len();
        keys.dedup();
        assert_eq!(keys.len(), before, "a key declared twice");
        for setting in SETTINGS {
            if let (Some(range), Value(_)) = (&setting.range, &setting.default) {
                assert!(range.contains(&u64(setting.key)), "{}", setting.key);
            }
        }
    }

    #[test]
    fn the_placeholder_default_is_debeziums() {
        assert_eq!(
            str("kafka.unavailable_value_placeholder"),
            crate::source::kafka::debezium::DEFAULT_UNAVAILABLE_PLACEHOLDER
        );
        assert_eq!(
            crate::mapping::Limits::default().max_key_bytes,
            usize("mappings.max_key_bytes")
        );
    }

    #[test]
    fn array_sections_name_their_declared_keys() {
        assert_eq!(key_in("purge[3]", "rate"), "purge[].rate");
        assert_eq!(
            key_in("postgres.replica[0]", "url"),
            "postgres.replica[].url"
        );
        assert_eq!(key_in("batch", "max_keys"), "batch.max_keys");
    }

    #[test]
    fn numbers_read_as_the_reference_writes_them() {
        assert_eq!(number(1024), "1024");
        assert_eq!(number(86_400_000), "86,400,000");
        assert_eq!(number(1 << 30), "2^30");
        assert_eq!(
            plain("see [Live reload](MAPPINGS.md#live-reload) and `x`"),
            "see Live reload and x"
        );
        assert_eq!(
            plain("`[[purge]]`, one (see [CDN purge](MAPPINGS.md#cdn))"),
            "[[purge]], one (see CDN purge)"
        );
    }
}
