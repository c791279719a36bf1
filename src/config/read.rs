//! Reading each section field by field, so that every problem is reported:
//! [`Section`] hands out fields and reports the ones nobody asked for.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use super::settings;
use super::{
    AdminConfig, AuditConfig, BadRecordPolicy, BatchConfig, KafkaConfig, KafkaProperties,
    MappingsConfig, PostgresConfig, PurgeKind, PurgeTarget, RedisConfig, ReplicaConfig, Secret,
    SecretUrl, SourceKind, WarmConfig,
};
use crate::change::is_identifier;
use crate::mapping::diagnostic::did_you_mean;
use crate::mapping::Limits;

/// One section's fields, read one at a time so that each problem is
/// reported; [`Drop`] reports the fields nobody read as unknown.
pub(super) struct Section<'p> {
    name: String,
    /// The config file as the user named it.
    file: String,
    fields: config::Map<String, config::Value>,
    known: Vec<&'static str>,
    present: bool,
    problems: &'p mut Vec<String>,
}

impl<'p> Section<'p> {
    pub(super) fn new(
        name: impl Into<String>,
        file: &Path,
        value: Option<config::Value>,
        problems: &'p mut Vec<String>,
    ) -> Self {
        let name = name.into();
        let present = value.is_some();
        let fields = match value.map(config::Value::into_table) {
            Some(Ok(fields)) => fields,
            Some(Err(_)) => {
                problems.push(format!("[{name}] must be a table of settings"));
                config::Map::new()
            }
            None => config::Map::new(),
        };
        Section {
            name,
            file: file.display().to_string(),
            fields,
            known: Vec::new(),
            present,
            problems,
        }
    }

    fn problem(&mut self, key: &str, origin: Option<&str>, message: impl fmt::Display) {
        let origin = origin.map_or_else(String::new, |origin| format!(" (set in {origin})"));
        self.problems
            .push(format!("{}.{key}: {message}{origin}", self.name));
    }

    /// The file a value was read from, or else its environment variable.
    fn origin_of(&self, key: &str, value: &config::Value) -> String {
        // A table has no origin of its own: its entries do.
        let entry_origin = match &value.kind {
            config::ValueKind::Table(table) => table.values().find_map(config::Value::origin),
            _ => None,
        };
        match value.origin().or(entry_origin) {
            Some(origin) if origin != "the environment" => {
                match line_of(&self.file, &self.name, key) {
                    Some(line) => format!("{}:{line}", self.file),
                    None => self.file.clone(),
                }
            }
            _ => format!(
                "EVICTD_{}__{}",
                self.name.to_uppercase().replace(['[', ']'], "_"),
                key.to_uppercase()
            ),
        }
    }

    /// The field's value if set and of the right type.
    fn get<T: DeserializeOwned>(&mut self, key: &'static str) -> Option<(T, Option<String>)> {
        self.known.push(key);
        settings::declared(&settings::key_in(&self.name, key));
        let value = self.fields.remove(key)?;
        let origin = Some(self.origin_of(key, &value));
        let raw_origin = value
            .origin()
            .map(|o| format!(" in {o}"))
            .unwrap_or_default();
        match value.try_deserialize::<T>() {
            Ok(parsed) => Some((parsed, origin)),
            Err(error) => {
                // The error names the origin as config saw it; we name it below.
                let message = error.to_string().replace(&raw_origin, "");
                self.problem(key, origin.as_deref(), message);
                None
            }
        }
    }

    /// The field parsed by `parse`, or `default` when unset.
    fn parse<T, R: DeserializeOwned>(
        &mut self,
        key: &'static str,
        default: T,
        parse: impl FnOnce(R) -> Result<T, String>,
    ) -> T {
        match self.get::<R>(key) {
            Some((raw, origin)) => parse(raw).unwrap_or_else(|message| {
                self.problem(key, origin.as_deref(), message);
                default
            }),
            None => default,
        }
    }

    /// The field's raw value, to be read as sections of its own
    /// ([`Section::nested`]).
    fn take(&mut self, key: &'static str) -> Option<config::Value> {
        self.known.push(key);
        settings::declared_array(&settings::key_in(&self.name, key));
        self.fields.remove(key)
    }

    /// A section inside this one (`postgres.replica[0]`), reporting into
    /// the same problems.
    fn nested(&mut self, name: String, value: config::Value) -> Section<'_> {
        Section::new(
            format!("{}.{name}", self.name),
            Path::new(&self.file),
            Some(value),
            self.problems,
        )
    }

    /// Reports that `key`, which must be set, is not.
    fn require(&mut self, key: &'static str, what: &str) {
        self.problems
            .push(format!("{}.{key}: required: {what}", self.name));
    }

    fn or<T: DeserializeOwned>(&mut self, key: &'static str, default: T) -> T {
        self.parse(key, default, Ok)
    }

    /// An integer setting with the default and range declared for it in
    /// [`settings`].
    fn ranged(&mut self, key: &'static str) -> u64 {
        let declared = settings::key_in(&self.name, key);
        self.in_range(key, settings::u64(&declared), settings::range(&declared))
    }

    fn in_range(
        &mut self,
        key: &'static str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> u64 {
        self.parse(key, default, |value: u64| {
            if range.contains(&value) {
                Ok(value)
            } else {
                Err(format!(
                    "{value} is out of range {}..={}",
                    range.start(),
                    range.end()
                ))
            }
        })
    }
}

impl Drop for Section<'_> {
    fn drop(&mut self) {
        let mut unknown: Vec<&String> = self.fields.keys().collect();
        unknown.sort();
        for key in unknown {
            let help = did_you_mean(key, &self.known)
                .map_or_else(String::new, |near| format!("; did you mean `{near}`?"));
            let origin = format!(" (set in {})", self.origin_of(key, &self.fields[key]));
            self.problems
                .push(format!("{}.{key}: unknown field{help}{origin}", self.name));
        }
    }
}

/// The line of `file` where `key` of `section` (`batch`, `purge[1]`,
/// `postgres.replica[0]`) is written, for problems to point at; `None`
/// when it cannot be told (the file cannot be read again, or the key is
/// written as part of an inline table).
fn line_of(file: &str, section: &str, key: &str) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let text = std::fs::read_to_string(file).ok()?;
    let root = DeTable::parse(&text).ok()?;
    let mut table: &DeTable<'_> = root.get_ref();
    for part in section.split('.') {
        let (name, index) = match part.split_once('[') {
            Some((name, rest)) => (
                name,
                Some(rest.trim_end_matches(']').parse::<usize>().ok()?),
            ),
            None => (part, None),
        };
        let (_, value) = table.iter().find(|(k, _)| k.get_ref() == name)?;
        table = match (value.get_ref(), index) {
            (DeValue::Table(inner), None) => inner,
            (DeValue::Array(items), Some(index)) => match items.get(index)?.get_ref() {
                DeValue::Table(inner) => inner,
                _ => return None,
            },
            _ => return None,
        };
    }
    let (found, _) = table.iter().find(|(k, _)| k.get_ref() == key)?;
    Some(text[..found.span().start].matches('\n').count() + 1)
}

pub(super) fn read_source(section: &mut Section<'_>) -> Option<SourceKind> {
    let kind = section.parse(
        "kind",
        Some(SourceKind::Postgres),
        |kind: String| match kind.as_str() {
            "postgres" => Ok(Some(SourceKind::Postgres)),
            "kafka" => Ok(Some(SourceKind::Kafka)),
            other => Err(format!(
                "unknown source kind `{other}`; use \"postgres\" or \"kafka\""
            )),
        },
    );
    kind
}

pub(super) fn read_postgres(
    section: &mut Section<'_>,
    source: Option<SourceKind>,
    base_dir: &Path,
) -> PostgresConfig {
    let url_set = section.fields.contains_key("url");
    let url = section.parse("url", None, |text: String| {
        let url = SecretUrl::parse(&text)?;
        match url.scheme() {
            "postgres" | "postgresql" => Ok(Some(url)),
            other => Err(format!(
                "scheme `{other}` is not postgres:// or postgresql://"
            )),
        }
    });
    let url = url.map(|url| password_file(section, base_dir, url));
    if !url_set && source == Some(SourceKind::Postgres) {
        section.problem(
            "url",
            None,
            "is required when source.kind = \"postgres\" (or set EVICTD_POSTGRES__URL)",
        );
    }
    let defaults = PostgresConfig::default();
    let config = PostgresConfig {
        url,
        slot: section.parse("slot", defaults.slot, |slot: String| {
            let valid = !slot.is_empty()
                && slot.len() <= 63
                && slot
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            valid
                .then_some(slot)
                .ok_or_else(|| "a slot name is 1-63 of a-z, 0-9 and _".into())
        }),
        publication: section.parse("publication", defaults.publication, |name: String| {
            if is_identifier(&name) && name.len() <= 63 {
                Ok(name)
            } else {
                Err(format!(
                    "`{name}` is not a publication name (an identifier of at most 63 bytes)"
                ))
            }
        }),
        create_slot: section.or("create_slot", defaults.create_slot),
        failover_slot: section.or("failover_slot", defaults.failover_slot),
        max_retained_wal_mb: section.ranged("max_retained_wal_mb"),
        visibility_gate: section.or("visibility_gate", defaults.visibility_gate),
        visibility_warn_ms: section.ranged("visibility_warn_ms"),
        replicas: read_replicas(section, base_dir),
        replica_max_wait_ms: section.ranged("replica_max_wait_ms"),
        replica_pending_keys: usize::try_from(section.ranged("replica_pending_keys"))
            .unwrap_or(defaults.replica_pending_keys),
    };
    if !config.replicas.is_empty() {
        // A second invalidation waits for the primary's WAL position once
        // the batch is visible there: the gate's connection takes it.
        if config.url.is_none() {
            section.problem(
                "replica",
                None,
                "read replicas need postgres.url (the primary), where each batch's position is taken",
            );
        }
        if !config.visibility_gate {
            section.problem(
                "replica",
                None,
                "read replicas need postgres.visibility_gate = true: a batch is invalidated again once the replicas replayed the primary's position at which it became visible",
            );
        }
    }
    config
}

/// `[[postgres.replica]]`: the read replicas, each a section of its own
/// (`postgres.replica[0]`, ...).
fn read_replicas(section: &mut Section<'_>, base_dir: &Path) -> Vec<ReplicaConfig> {
    let Some(value) = section.take("replica") else {
        return Vec::new();
    };
    let Ok(entries) = value.into_array() else {
        section.problem(
            "replica",
            None,
            "must be an array of tables: write `[[postgres.replica]]`, not `[postgres.replica]`",
        );
        return Vec::new();
    };
    let mut replicas: Vec<ReplicaConfig> = Vec::new();
    for (index, entry) in entries.into_iter().enumerate() {
        let mut replica = section.nested(format!("replica[{index}]"), entry);
        let url = replica.parse("url", None, |text: String| {
            let url = SecretUrl::parse(&text)?;
            match url.scheme() {
                "postgres" | "postgresql" => Ok(Some(url)),
                other => Err(format!(
                    "scheme `{other}` is not postgres:// or postgresql://"
                )),
            }
        });
        let name: Option<String> = replica.or("name", None);
        let Some(url) = url else {
            replica.require(
                "url",
                "the replica's URL, e.g. postgres://evictd@replica-1/app",
            );
            // Read, so that it is not also reported as unknown.
            let _: Option<PathBuf> = replica.or("password_file", None);
            continue;
        };
        let url = password_file(&mut replica, base_dir, url);
        let name = name.unwrap_or_else(|| match (url.host(), url.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_owned(),
            _ => format!("replica{index}"),
        });
        replicas.push(ReplicaConfig { name, url });
    }
    let mut names: Vec<&str> = replicas.iter().map(|r| r.name.as_str()).collect();
    names.sort_unstable();
    if let Some(pair) = names.windows(2).find(|pair| pair[0] == pair[1]) {
        let message = format!(
            "two replicas are named `{}`; give each a `name` of its own",
            pair[0]
        );
        section.problem("replica", None, message);
    }
    replicas
}

pub(super) fn read_kafka(
    section: &mut Section<'_>,
    source: Option<SourceKind>,
    base_dir: &Path,
) -> Option<KafkaConfig> {
    let wanted = source == Some(SourceKind::Kafka);
    if !section.present && !wanted {
        return None;
    }
    if !section.present {
        section.problem(
            "brokers",
            None,
            "[kafka] is required when source.kind = \"kafka\"",
        );
        return None;
    }
    let non_empty = |what: &'static str| {
        move |text: String| {
            if text.is_empty() {
                Err(format!("{what} is empty"))
            } else {
                Ok(text)
            }
        }
    };
    let brokers_set = section.fields.contains_key("brokers");
    let brokers = section.parse("brokers", String::new(), non_empty("the broker list"));
    let topics = section.parse("topics", Vec::new(), |topics: Vec<String>| {
        if topics.is_empty() || topics.iter().any(String::is_empty) {
            Err("list at least one topic, none empty".into())
        } else {
            Ok(topics)
        }
    });
    let group_id = section.parse(
        "group_id",
        settings::str("kafka.group_id").into(),
        non_empty("the group id"),
    );
    if !brokers_set {
        section.problem("brokers", None, "is required when source.kind = \"kafka\"");
    }
    let on_bad_record =
        section.parse(
            "on_bad_record",
            BadRecordPolicy::Skip,
            |policy: String| match policy.as_str() {
                "skip" => Ok(BadRecordPolicy::Skip),
                "dead_letter" => Ok(BadRecordPolicy::DeadLetter),
                "stop" => Ok(BadRecordPolicy::Stop),
                other => Err(format!(
                    "unknown policy `{other}`; use \"skip\", \"dead_letter\" or \"stop\""
                )),
            },
        );
    let dead_letter_topic = section.parse("dead_letter_topic", None, |topic: String| {
        non_empty("the topic name")(topic).map(Some)
    });
    if on_bad_record == BadRecordPolicy::DeadLetter && dead_letter_topic.is_none() {
        section.problem(
            "dead_letter_topic",
            None,
            "is required when on_bad_record = \"dead_letter\"",
        );
    }
    let unavailable_value_placeholder = section.parse(
        "unavailable_value_placeholder",
        settings::str("kafka.unavailable_value_placeholder").into(),
        non_empty("the placeholder"),
    );
    let commit_interval_ms = section.ranged("commit_interval_ms");
    let drain_timeout_ms = section.ranged("drain_timeout_ms");
    let metadata_refresh_ms = section.ranged("metadata_refresh_ms");
    let mut properties = section.parse(
        "properties",
        Vec::new(),
        |table: std::collections::BTreeMap<String, String>| match table
            .keys()
            .find(|key| RESERVED_KAFKA_PROPERTIES.contains(&key.as_str()))
        {
            Some(key) => Err(format!(
                "`{key}` is set by evictd (offsets are stored only after apply); remove it"
            )),
            None => Ok(table.into_iter().collect::<Vec<_>>()),
        },
    );
    if let Some((path, origin)) = section.get::<PathBuf>("sasl_password_file") {
        let path = base_dir.join(path);
        match std::fs::read_to_string(&path) {
            Ok(password) => properties.push((
                "sasl.password".to_owned(),
                password.trim_end_matches(['\r', '\n']).to_owned(),
            )),
            Err(error) => section.problem(
                "sasl_password_file",
                origin.as_deref(),
                format!("cannot read {}: {error}", path.display()),
            ),
        }
    }
    Some(KafkaConfig {
        brokers,
        topics,
        group_id,
        on_bad_record,
        dead_letter_topic,
        unavailable_value_placeholder,
        commit_interval_ms,
        drain_timeout_ms,
        metadata_refresh_ms,
        properties: KafkaProperties(properties),
    })
}

/// librdkafka settings evictd owns: acknowledging only what is applied
/// depends on them.
const RESERVED_KAFKA_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "enable.partition.eof",
    "topic.metadata.refresh.interval.ms",
];

pub(super) fn read_redis(section: &mut Section<'_>, base_dir: &Path) -> RedisConfig {
    let defaults = RedisConfig::default();
    let url = section.parse("url", defaults.url, |text: String| {
        let url = SecretUrl::parse(&text)?;
        match url.scheme() {
            "redis" | "rediss" | "redis+cluster" => Ok(url),
            "rediss+cluster" => Err(
                "TLS to a Redis Cluster is not supported: use redis+cluster:// on a trusted network, or one server over rediss://".into(),
            ),
            other => Err(format!(
                "scheme `{other}` is not redis://, rediss:// or redis+cluster://"
            )),
        }
    });
    let url = password_file(section, base_dir, url);
    let allow_plaintext = section.or("allow_plaintext", defaults.allow_plaintext);
    let plaintext = matches!(url.scheme(), "redis" | "redis+cluster");
    if plaintext && url.has_password() && !url.is_loopback() && !allow_plaintext {
        section.problem(
            "url",
            None,
            format!(
                "the password would cross the network in plain text to {}: use rediss:// (TLS), or set redis.allow_plaintext = true",
                url.host().unwrap_or("the server")
            ),
        );
    }
    let mut tls_file = |key: &'static str| {
        section.parse(key, None, |path: PathBuf| {
            let path = base_dir.join(path);
            if path.is_file() {
                Ok(Some(path))
            } else {
                Err(format!("{} is not a readable file", path.display()))
            }
        })
    };
    let ca_file = tls_file("ca_file");
    let cert_file = tls_file("cert_file");
    let key_file = tls_file("key_file");
    if cert_file.is_some() != key_file.is_some() {
        section.problem(
            "cert_file",
            None,
            "cert_file and key_file go together (mutual TLS)",
        );
    }
    let files = ca_file.is_some() || cert_file.is_some();
    if files && !matches!(url.scheme(), "rediss" | "rediss+cluster") {
        section.problem(
            "ca_file",
            None,
            "TLS files are set but redis.url is not rediss://",
        );
    }
    let wait_replicas = section.ranged("wait_replicas");
    let wait_timeout_ms = section.ranged("wait_timeout_ms");
    RedisConfig {
        url,
        wait_replicas: u32::try_from(wait_replicas).unwrap_or(0),
        wait_timeout_ms,
        ca_file,
        cert_file,
        key_file,
        prefix: section.or("prefix", defaults.prefix),
        l1_channel: section.parse("l1_channel", defaults.l1_channel, |channel: String| {
            if channel.is_empty() {
                Err("the channel name is empty".into())
            } else {
                Ok(channel)
            }
        }),
        l1_log_len: section.ranged("l1_log_len"),
        allow_plaintext,
    }
}

/// Puts the password read from `password_file` (relative to the config
/// file) into `url`. A password in both places is a problem: one source of
/// truth.
fn password_file(section: &mut Section<'_>, base_dir: &Path, url: SecretUrl) -> SecretUrl {
    let Some((path, origin)) = section.get::<PathBuf>("password_file") else {
        return url;
    };
    let path = base_dir.join(path);
    let password = match std::fs::read_to_string(&path) {
        Ok(text) => text.trim_end_matches(['\n', '\r']).to_owned(),
        Err(error) => {
            section.problem(
                "password_file",
                origin.as_deref(),
                format!("cannot read {}: {error}", path.display()),
            );
            return url;
        }
    };
    if url.has_password() {
        section.problem(
            "password_file",
            origin.as_deref(),
            "the url has a password too; keep it in one place",
        );
        return url;
    }
    url.with_password(&password).unwrap_or_else(|message| {
        section.problem("password_file", origin.as_deref(), message);
        url
    })
}

pub(super) fn read_mappings(section: &mut Section<'_>, base_dir: &Path) -> MappingsConfig {
    let all_defaults = MappingsConfig::default();
    let dir: PathBuf = section.or("dir", all_defaults.dir);
    let sql_messages = section.or("sql_messages", all_defaults.sql_messages);
    let mut sql_messages_secrets = Vec::new();
    for (file_key, env_key, previous) in [
        ("sql_messages_secret_file", "sql_messages_secret_env", false),
        (
            "sql_messages_previous_secret_file",
            "sql_messages_previous_secret_env",
            true,
        ),
    ] {
        let file: Option<PathBuf> = section.or(file_key, None);
        let env: Option<String> = section.or(env_key, None);
        let secret = match (file, env) {
            (Some(_), Some(_)) => {
                section.problem(file_key, None, format!("set it or {env_key}, not both"));
                continue;
            }
            (Some(file), None) => Secret::File(base_dir.join(file)),
            (None, Some(env)) => Secret::Env(env),
            (None, None) => continue,
        };
        if previous && sql_messages_secrets.is_empty() {
            section.problem(
                file_key,
                None,
                "a previous secret without a current one: set sql_messages_secret_file (or _env) to the secret evictd_invalidate() signs with now",
            );
        }
        sql_messages_secrets.push(secret);
    }
    let sql_messages_allow = section.parse(
        "sql_messages_allow",
        None,
        |list: crate::mapping::message::AllowList| {
            let problems = list.problems();
            if problems.is_empty() {
                Ok(Some(list))
            } else {
                Err(problems.join("; "))
            }
        },
    );
    let watch = section.or("watch", all_defaults.watch);
    let max_key_bytes = section.ranged("max_key_bytes");
    let max_keys_per_change = section.ranged("max_keys_per_change");
    MappingsConfig {
        dir: base_dir.join(dir),
        limits: Limits {
            max_key_bytes: usize::try_from(max_key_bytes).unwrap_or(usize::MAX),
            max_keys_per_change: usize::try_from(max_keys_per_change).unwrap_or(usize::MAX),
        },
        sql_messages,
        sql_messages_secrets,
        sql_messages_allow,
        watch,
    }
}

pub(super) fn read_batch(section: &mut Section<'_>) -> BatchConfig {
    let max_keys = section.ranged("max_keys");
    let max_pending_keys = section.ranged("max_pending_keys");
    BatchConfig {
        max_keys: usize::try_from(max_keys).unwrap_or(usize::MAX),
        max_pending_keys: usize::try_from(max_pending_keys).unwrap_or(usize::MAX),
        max_wait_ms: section.ranged("max_wait_ms"),
    }
}

pub(super) fn read_admin(section: &mut Section<'_>, base_dir: &Path) -> AdminConfig {
    let defaults = AdminConfig::default();
    let listen: std::net::SocketAddr = section.parse("listen", defaults.listen, |text: String| {
        text.parse()
            .map_err(|_| format!("`{text}` is not an address like 127.0.0.1:9187"))
    });
    let console = section.or("console", defaults.console);
    let file: Option<PathBuf> = section.or("token_file", None);
    let env: Option<String> = section.or("token_env", None);
    let token = match (file, env) {
        (Some(_), Some(_)) => {
            section.problem("token_file", None, "set it or token_env, not both");
            None
        }
        (Some(file), None) => Some(Secret::File(base_dir.join(file))),
        (None, Some(env)) => Some(Secret::Env(env)),
        (None, None) => None,
    };
    if console && token.is_none() && !listen.ip().is_loopback() {
        section.problem(
            "console",
            None,
            format!("the console on {listen}, not a loopback address, needs a bearer token: set token_file (or token_env)"),
        );
    }
    AdminConfig {
        listen,
        console,
        token,
    }
}

/// `[[purge]]`: the CDN targets, each its own section (`purge[0]`, ...).
pub(super) fn read_purges(
    value: Option<config::Value>,
    file: &Path,
    base_dir: &Path,
    problems: &mut Vec<String>,
) -> Vec<PurgeTarget> {
    let Some(value) = value else {
        return Vec::new();
    };
    let entries = match value.into_array() {
        Ok(entries) => entries,
        Err(_) => {
            problems.push(
                "[[purge]] must be an array of tables: write `[[purge]]`, not `[purge]`".into(),
            );
            return Vec::new();
        }
    };
    let mut targets: Vec<PurgeTarget> = Vec::new();
    for (index, entry) in entries.into_iter().enumerate() {
        let mut section = Section::new(format!("purge[{index}]"), file, Some(entry), problems);
        if let Some(target) = read_purge(&mut section, base_dir) {
            targets.push(target);
        }
    }
    let mut names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    for pair in names.windows(2) {
        if pair[0] == pair[1] {
            problems.push(format!(
                "[[purge]]: two targets are named `{}`; give each a `name` of its own",
                pair[0]
            ));
        }
    }
    targets
}

fn read_purge(section: &mut Section<'_>, base_dir: &Path) -> Option<PurgeTarget> {
    let kind = section.parse("kind", None, |kind: String| {
        PurgeKind::parse(&kind).map(Some).ok_or_else(|| {
            format!("unknown purge target `{kind}`; use \"varnish\", \"fastly\", \"cloudflare\" or \"webhook\"")
        })
    });
    let Some(kind) = kind else {
        section.require(
            "kind",
            "the kind of target: \"varnish\", \"fastly\", \"cloudflare\" or \"webhook\"",
        );
        return None;
    };
    let limit = kind.max_keys_limit();
    let url = section.parse(
        "url",
        kind.default_url().map(str::to_owned),
        |url: String| {
            url::Url::parse(&url)
                .map_err(|e| format!("`{url}` is not a URL ({e})"))
                .and_then(|parsed| match parsed.scheme() {
                    "http" | "https" => Ok(Some(url)),
                    other => Err(format!("`{url}`: use http:// or https://, not {other}://")),
                })
        },
    );
    if url.is_none() {
        section.require("url", "where purges go, e.g. http://127.0.0.1:6081/");
    }
    let path = |section: &mut Section<'_>, key: &'static str| -> Option<PathBuf> {
        section
            .or::<Option<PathBuf>>(key, None)
            .map(|p| base_dir.join(p))
    };
    let token_file = path(section, "token_file");
    let token_env: Option<String> = section.or("token_env", None);
    let secret_file = path(section, "secret_file");
    let secret_env: Option<String> = section.or("secret_env", None);
    let service_id: Option<String> = section.or("service_id", None);
    let zone_id: Option<String> = section.or("zone_id", None);
    match kind {
        PurgeKind::Fastly if service_id.is_none() => {
            section.require("service_id", "the Fastly service whose cache is purged")
        }
        PurgeKind::Cloudflare if zone_id.is_none() => {
            section.require("zone_id", "the Cloudflare zone whose cache is purged")
        }
        _ => {}
    }
    let token = match (kind, token_file, token_env) {
        (PurgeKind::Fastly | PurgeKind::Cloudflare, None, None) => {
            section.require(
                "token_file",
                "the API token: `token_file = \"...\"` or `token_env = \"VARIABLE\"`",
            );
            None
        }
        (_, Some(file), _) => Some(Secret::File(file)),
        (_, None, Some(env)) => Some(Secret::Env(env)),
        (_, None, None) => None,
    };
    let secret = match (kind, secret_file, secret_env) {
        (PurgeKind::Webhook, None, None) => {
            section.require("secret_file", "the HMAC key the webhook's requests are signed with: `secret_file = \"...\"` or `secret_env = \"VARIABLE\"`");
            None
        }
        (_, Some(file), _) => Some(Secret::File(file)),
        (_, None, Some(env)) => Some(Secret::Env(env)),
        (_, None, None) => None,
    };
    // The provider's limit is the default and the most allowed.
    let max_keys = section.in_range("max_keys", limit as u64, 1..=limit as u64);
    let rate = section.parse("rate", settings::f64("purge[].rate"), |rate: f64| {
        if rate > 0.0 && rate <= 10_000.0 {
            Ok(rate)
        } else {
            Err(format!(
                "{rate} is not a rate in (0, 10000] requests per second"
            ))
        }
    });
    Some(PurgeTarget {
        name: section.or("name", kind.as_str().to_owned()),
        kind,
        url: url?,
        soft: section.or("soft", settings::bool("purge[].soft")),
        service_id,
        zone_id,
        token,
        secret,
        best_effort: section.or("best_effort", settings::bool("purge[].best_effort")),
        max_keys: usize::try_from(max_keys).unwrap_or(limit),
        rate,
        timeout_ms: section.ranged("timeout_ms"),
        retries: u32::try_from(section.ranged("retries")).unwrap_or(u32::MAX),
    })
}

pub(super) fn read_warm(section: &mut Section<'_>) -> WarmConfig {
    let defaults = WarmConfig::default();
    WarmConfig {
        on_start: section.or("on_start", defaults.on_start),
        rate: section.ranged("rate"),
    }
}

pub(super) fn read_audit(section: &mut Section<'_>) -> AuditConfig {
    let defaults = AuditConfig::default();
    let queue = section.ranged("queue");
    AuditConfig {
        enabled: section.or("enabled", defaults.enabled),
        sample: section.parse("sample", defaults.sample, |share: f64| {
            if share > 0.0 && share <= 1.0 {
                Ok(share)
            } else {
                Err(format!(
                    "{share} is not a share in (0, 1], like 0.01 for 1%"
                ))
            }
        }),
        delay_ms: section.ranged("delay_ms"),
        queue: usize::try_from(queue).unwrap_or(usize::MAX),
    }
}
