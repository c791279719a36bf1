//! `evictd.toml`, layered with `EVICTD_<SECTION>__<KEY>` environment
//! variables.
//!
//! Every field is read on its own, so one run reports every problem: unknown
//! sections and fields (with a suggestion), values of the wrong type, and
//! values out of range, each naming the key and where it was set. URLs that
//! may carry passwords are [`SecretUrl`]s, redacted in `Debug` and `Display`.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use self::read::{
    read_admin, read_audit, read_batch, read_kafka, read_mappings, read_postgres, read_purges,
    read_redis, read_source, read_warm, Section,
};
use crate::mapping::diagnostic::did_you_mean;
use crate::mapping::Limits;

/// The whole configuration, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub source: SourceKind,
    pub postgres: PostgresConfig,
    pub kafka: Option<KafkaConfig>,
    pub redis: RedisConfig,
    pub mappings: MappingsConfig,
    pub batch: BatchConfig,
    pub admin: AdminConfig,
    pub audit: AuditConfig,
    /// `[[purge]]`: CDN targets purged by surrogate key (see `src/purge/`).
    pub purge: Vec<PurgeTarget>,
    pub warm: WarmConfig,
}

/// `[warm]`: cache warming (`evictd warm`, and on start).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WarmConfig {
    /// `evictd run` warms once streaming began.
    pub on_start: bool,
    /// Keys per second at most (0: no limit).
    pub rate: u64,
}

impl Default for WarmConfig {
    fn default() -> Self {
        WarmConfig {
            on_start: settings::bool("warm.on_start"),
            rate: settings::u64("warm.rate"),
        }
    }
}

/// One `[[purge]]` target.
#[derive(Clone, Debug, PartialEq)]
pub struct PurgeTarget {
    /// Its label in metrics and logs (default: the kind); unique.
    pub name: String,
    pub kind: PurgeKind,
    /// Varnish: where PURGE requests go; webhook: where it POSTs; Fastly
    /// and Cloudflare: the API's base URL (the public one by default).
    pub url: String,
    /// Soft purge (Varnish `xkey.softpurge`, `Fastly-Soft-Purge: 1`).
    pub soft: bool,
    pub service_id: Option<String>,
    pub zone_id: Option<String>,
    /// The API token (Fastly, Cloudflare).
    pub token: Option<Secret>,
    /// The webhook's HMAC key.
    pub secret: Option<Secret>,
    /// Failures are counted, logged and dropped after `retries` attempts
    /// instead of holding the acknowledgement back.
    pub best_effort: bool,
    /// Keys per request, at most the provider's limit.
    pub max_keys: usize,
    /// Requests per second, at most.
    pub rate: f64,
    pub timeout_ms: u64,
    /// Attempts per request of a `best_effort` target.
    pub retries: u32,
}

impl PurgeTarget {
    /// A target of `kind` at `url`, every other setting at its default
    /// (named after its kind, no credentials).
    pub fn with_defaults(kind: PurgeKind, url: String) -> PurgeTarget {
        PurgeTarget {
            name: kind.as_str().to_owned(),
            kind,
            url,
            soft: settings::bool("purge[].soft"),
            service_id: None,
            zone_id: None,
            token: None,
            secret: None,
            best_effort: settings::bool("purge[].best_effort"),
            max_keys: kind.max_keys_limit(),
            rate: settings::f64("purge[].rate"),
            timeout_ms: settings::u64("purge[].timeout_ms"),
            retries: u32::try_from(settings::u64("purge[].retries")).unwrap_or(u32::MAX),
        }
    }
}

/// Which API a purge target speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PurgeKind {
    Varnish,
    Fastly,
    Cloudflare,
    Webhook,
}

impl PurgeKind {
    pub fn parse(text: &str) -> Option<PurgeKind> {
        Some(match text {
            "varnish" => PurgeKind::Varnish,
            "fastly" => PurgeKind::Fastly,
            "cloudflare" => PurgeKind::Cloudflare,
            "webhook" => PurgeKind::Webhook,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PurgeKind::Varnish => "varnish",
            PurgeKind::Fastly => "fastly",
            PurgeKind::Cloudflare => "cloudflare",
            PurgeKind::Webhook => "webhook",
        }
    }

    /// The most keys one request may carry: Fastly's and Cloudflare's
    /// documented limits; for Varnish, what keeps the header short.
    pub fn max_keys_limit(self) -> usize {
        match self {
            PurgeKind::Varnish => 100,
            PurgeKind::Fastly => 256,
            PurgeKind::Cloudflare => 100,
            PurgeKind::Webhook => 10_000,
        }
    }

    /// The public API, for the providers that have one.
    pub fn default_url(self) -> Option<&'static str> {
        match self {
            PurgeKind::Fastly => Some("https://api.fastly.com"),
            PurgeKind::Cloudflare => Some("https://api.cloudflare.com/client/v4"),
            PurgeKind::Varnish | PurgeKind::Webhook => None,
        }
    }
}

/// A credential kept out of the config file: read when used, so that a
/// rotated file takes effect without a restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Secret {
    File(PathBuf),
    Env(String),
}

impl Secret {
    /// The credential, trimmed of surrounding whitespace.
    pub fn read(&self) -> Result<String, String> {
        let text = match self {
            Secret::File(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
            Secret::Env(name) => std::env::var(name)
                .map_err(|_| format!("the environment variable {name} is not set"))?,
        };
        let text = text.trim();
        if text.is_empty() {
            return Err(match self {
                Secret::File(path) => format!("{} is empty", path.display()),
                Secret::Env(name) => format!("{name} is empty"),
            });
        }
        Ok(text.to_owned())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    Postgres,
    Kafka,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PostgresConfig {
    /// Required when the source is Postgres; `check` uses it for live checks.
    pub url: Option<SecretUrl>,
    pub slot: String,
    pub publication: String,
    /// Create the slot and publication when absent.
    pub create_slot: bool,
    /// Create the slot as a failover slot (PostgreSQL 17+), and switch an
    /// existing one to it, so that standbys synchronising slots keep it.
    pub failover_slot: bool,
    /// Warn (log, `evictd status`) when the slot retains more WAL than this.
    pub max_retained_wal_mb: u64,
    /// Apply a batch only once its transactions are visible to a new
    /// snapshot on the primary.
    pub visibility_gate: bool,
    /// Past this wait for visibility, log it and fail readiness.
    pub visibility_warn_ms: u64,
    /// `[[postgres.replica]]`: the read replicas applications read from;
    /// each batch is invalidated again once every one has replayed it.
    pub replicas: Vec<ReplicaConfig>,
    /// Longest a second invalidation waits for the replicas; past it, it
    /// is applied anyway, and the replica that holds it is named on
    /// `/readyz`.
    pub replica_max_wait_ms: u64,
    /// Most keys held for second invalidations; past it, what is held
    /// turns into the key families' patterns.
    pub replica_pending_keys: usize,
}

/// One `[[postgres.replica]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaConfig {
    /// How metrics, logs and `/readyz` name it (default: its host:port).
    pub name: String,
    pub url: SecretUrl,
}

#[derive(Clone, Debug, PartialEq)]
pub struct KafkaConfig {
    pub brokers: String,
    /// Topic names; an entry starting with `^` is a regular expression
    /// (librdkafka's convention), matched against every topic.
    pub topics: Vec<String>,
    pub group_id: String,
    /// What to do with a record that cannot be decoded or names a table no
    /// mapping covers.
    pub on_bad_record: BadRecordPolicy,
    /// Where `on_bad_record = "dead_letter"` sends such records.
    pub dead_letter_topic: Option<String>,
    /// Debezium's `unavailable.value.placeholder`.
    pub unavailable_value_placeholder: String,
    /// How often stored offsets are committed.
    pub commit_interval_ms: u64,
    /// How long a rebalance waits for records in flight of revoked
    /// partitions to be applied and committed before releasing them.
    pub drain_timeout_ms: u64,
    /// How often the broker's topic list is read again, so that a topic
    /// created after start (by name or matching a pattern) is consumed
    /// within about this long (librdkafka's
    /// `topic.metadata.refresh.interval.ms`).
    pub metadata_refresh_ms: u64,
    /// librdkafka settings passed through (`security.protocol`,
    /// `sasl.mechanism`, `ssl.ca.location`, ...), `sasl.password` from
    /// `sasl_password_file` included. Redacted in `Debug`.
    pub properties: KafkaProperties,
}

impl KafkaConfig {
    /// `brokers` and `topics` with every other setting at its default, as
    /// an empty `[kafka]` section with just those two would give.
    pub fn with_defaults(brokers: &str, topics: Vec<String>) -> KafkaConfig {
        KafkaConfig {
            brokers: brokers.to_owned(),
            topics,
            group_id: settings::str("kafka.group_id").into(),
            on_bad_record: BadRecordPolicy::Skip,
            dead_letter_topic: None,
            unavailable_value_placeholder: settings::str("kafka.unavailable_value_placeholder")
                .into(),
            commit_interval_ms: settings::u64("kafka.commit_interval_ms"),
            drain_timeout_ms: settings::u64("kafka.drain_timeout_ms"),
            metadata_refresh_ms: settings::u64("kafka.metadata_refresh_ms"),
            properties: KafkaProperties::default(),
        }
    }
}

/// librdkafka settings; values are not printed, since they hold secrets.
#[derive(Clone, PartialEq, Default)]
pub struct KafkaProperties(pub Vec<(String, String)>);

impl std::fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(key, _)| format!("{key}=***")))
            .finish()
    }
}

/// `kafka.on_bad_record`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadRecordPolicy {
    /// Count, log and go on.
    Skip,
    /// Produce the raw record to `dead_letter_topic` with the error as a
    /// header, then go on.
    DeadLetter,
    /// Stop consuming at the record (not ready, with the reason) until
    /// restarted with another policy or a fixed mapping.
    Stop,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RedisConfig {
    /// With the password of `redis.password_file` put in, when given.
    pub url: SecretUrl,
    /// Prepended to every key and tag set.
    pub prefix: String,
    pub l1_channel: String,
    /// Broadcasts the log (`evictd:l1:log`) keeps for subscribers to
    /// replay; 0: no log.
    pub l1_log_len: u64,
    /// Allow a password over plain `redis://` to a host that is not this
    /// machine.
    pub allow_plaintext: bool,
    /// TLS files for `rediss://` (PEM): trusted CAs (else the system's),
    /// and a client certificate and key for mutual TLS.
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Replicas that must have a batch (WAIT) before it is acknowledged:
    /// without it, a failover can lose writes Redis already confirmed.
    pub wait_replicas: u32,
    /// How long WAIT may take before the batch is retried.
    pub wait_timeout_ms: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MappingsConfig {
    /// Relative paths are resolved against the config file's directory.
    pub dir: PathBuf,
    pub limits: Limits,
    /// Apply invalidations from SQL messages (`pg_logical_emit_message`
    /// with prefix `evictd`, Debezium's message events).
    pub sql_messages: bool,
    /// The secrets messages must be signed with, the current one first and
    /// the previous one during a rotation; none: messages are not
    /// authenticated (`check` warns).
    pub sql_messages_secrets: Vec<Secret>,
    /// What messages may name; `None`: what the mappings render.
    pub sql_messages_allow: Option<crate::mapping::message::AllowList>,
    /// Reload the mappings when a file in `dir` changes (and on SIGHUP).
    pub watch: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchConfig {
    /// Most distinct keys in one Redis batch.
    pub max_keys: usize,
    /// Keys a streamed transaction may buffer before it degrades to a
    /// coarse invalidation of its tables (the memory bound per transaction).
    pub max_pending_keys: usize,
    /// Longest wait for more transactions before a batch is sent.
    pub max_wait_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Serve the console at `/ui`.
    pub console: bool,
    /// The bearer token the console's data needs (required when `listen`
    /// is not a loopback address).
    pub token: Option<Secret>,
}

/// `[audit]`: the continuous consistency checker (see `src/audit.rs`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AuditConfig {
    pub enabled: bool,
    /// The share of invalidated keys checked, in (0, 1].
    pub sample: f64,
    /// How long after its invalidation a key is checked.
    pub delay_ms: u64,
    /// Most samples waiting for their check; more are dropped and counted.
    pub queue: usize,
}

/// Every problem found in a configuration.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .problems.join("\n  "))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

/// A URL whose password must never be printed. libpq's multi-host form
/// (`postgres://user@host1:5432,host2:5432/db?target_session_attrs=read-write`)
/// is kept whole for connecting; the other accessors see the first host.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl {
    /// The URL with the first host only.
    url: url::Url,
    /// The hosts after the first, as written (`,host2:5432,host3`), or "".
    more_hosts: String,
    /// The URL as connections take it: every host, with the password.
    full: String,
}

/// `text` with only its first host, and the hosts after it (`,h2:p2`).
pub(crate) fn split_hosts(text: &str) -> (String, String) {
    let Some(scheme_end) = text.find("://") else {
        return (text.to_owned(), String::new());
    };
    let start = scheme_end + 3;
    let end = text[start..]
        .find(['/', '?', '#'])
        .map_or(text.len(), |i| start + i);
    let hosts_start = text[start..end].rfind('@').map_or(start, |i| start + i + 1);
    match text[hosts_start..end].find(',') {
        None => (text.to_owned(), String::new()),
        Some(comma) => {
            let comma = hosts_start + comma;
            (
                format!("{}{}", &text[..comma], &text[end..]),
                text[comma..end].to_owned(),
            )
        }
    }
}

/// `url` with `more_hosts` after its first host.
pub(crate) fn with_hosts(url: &url::Url, more_hosts: &str) -> String {
    if more_hosts.is_empty() {
        return url.as_str().to_owned();
    }
    format!(
        "{}{more_hosts}{}",
        &url[..url::Position::AfterPort],
        &url[url::Position::AfterPort..]
    )
}

impl SecretUrl {
    pub fn parse(text: &str) -> Result<SecretUrl, String> {
        let (first, more_hosts) = split_hosts(text);
        let url = url::Url::parse(&first).map_err(|error| format!("not a URL ({error})"))?;
        Ok(SecretUrl::of(url, more_hosts))
    }

    fn of(url: url::Url, more_hosts: String) -> SecretUrl {
        let full = with_hosts(&url, &more_hosts);
        SecretUrl {
            url,
            more_hosts,
            full,
        }
    }

    /// The URL with its password (and every host), for connecting only.
    pub fn expose(&self) -> &str {
        &self.full
    }

    pub fn scheme(&self) -> &str {
        self.url.scheme()
    }

    pub fn host(&self) -> Option<&str> {
        self.url.host_str()
    }

    pub fn port(&self) -> Option<u16> {
        self.url.port()
    }

    pub fn has_password(&self) -> bool {
        self.url.password().is_some()
    }

    /// The same URL with `password` set.
    pub fn with_password(&self, password: &str) -> Result<SecretUrl, String> {
        let mut url = self.url.clone();
        url.set_password(Some(password))
            .map_err(|()| "this URL cannot carry a password".to_owned())?;
        Ok(SecretUrl::of(url, self.more_hosts.clone()))
    }

    /// Whether the host is this machine (loopback address or `localhost`).
    pub fn is_loopback(&self) -> bool {
        match self.url.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            // Hosts of non-special schemes (redis://) arrive unparsed.
            Some(url::Host::Domain(name)) => {
                name == "localhost"
                    || name
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
            None => true,
        }
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.url.clone();
        if shown.password().is_some() {
            // Setting a password only fails for URLs that cannot have one.
            let _ = shown.set_password(Some("***"));
        }
        let mut query: Vec<(String, String)> = shown.query_pairs().into_owned().collect();
        if query.iter().any(|(key, _)| key == "password") {
            for (key, value) in &mut query {
                if key == "password" {
                    *value = "***".into();
                }
            }
            shown.query_pairs_mut().clear().extend_pairs(query);
        }
        f.write_str(&with_hosts(&shown, &self.more_hosts))
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({self})")
    }
}

impl Config {
    /// The Postgres source at `postgres_url`, with every other setting at
    /// its default (as a config file with only those three would give).
    pub fn with_defaults(
        postgres_url: SecretUrl,
        redis_url: SecretUrl,
        mappings_dir: PathBuf,
    ) -> Config {
        Config {
            source: SourceKind::Postgres,
            postgres: PostgresConfig {
                url: Some(postgres_url),
                ..PostgresConfig::default()
            },
            kafka: None,
            redis: RedisConfig {
                url: redis_url,
                ..RedisConfig::default()
            },
            mappings: MappingsConfig {
                dir: mappings_dir,
                ..MappingsConfig::default()
            },
            batch: BatchConfig::default(),
            admin: AdminConfig::default(),
            audit: AuditConfig::default(),
            purge: Vec::new(),
            warm: WarmConfig::default(),
        }
    }

    /// The Kafka source (`kafka`), with every other setting at its default.
    pub fn kafka_with_defaults(
        kafka: KafkaConfig,
        redis_url: SecretUrl,
        mappings_dir: PathBuf,
    ) -> Config {
        Config {
            source: SourceKind::Kafka,
            postgres: PostgresConfig::default(),
            kafka: Some(kafka),
            redis: RedisConfig {
                url: redis_url,
                ..RedisConfig::default()
            },
            mappings: MappingsConfig {
                dir: mappings_dir,
                ..MappingsConfig::default()
            },
            batch: BatchConfig::default(),
            admin: AdminConfig::default(),
            audit: AuditConfig::default(),
            purge: Vec::new(),
            warm: WarmConfig::default(),
        }
    }
}

/// The defaults of each section, written once: a config file that leaves a
/// key out gets these.
impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: None,
            slot: settings::str("postgres.slot").into(),
            publication: settings::str("postgres.publication").into(),
            create_slot: settings::bool("postgres.create_slot"),
            failover_slot: settings::bool("postgres.failover_slot"),
            max_retained_wal_mb: settings::u64("postgres.max_retained_wal_mb"),
            visibility_gate: settings::bool("postgres.visibility_gate"),
            visibility_warn_ms: settings::u64("postgres.visibility_warn_ms"),
            replicas: Vec::new(),
            replica_max_wait_ms: settings::u64("postgres.replica_max_wait_ms"),
            replica_pending_keys: settings::usize("postgres.replica_pending_keys"),
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: SecretUrl::parse(settings::str("redis.url")).expect("a valid URL"),
            prefix: settings::str("redis.prefix").into(),
            l1_channel: settings::str("redis.l1_channel").into(),
            l1_log_len: settings::u64("redis.l1_log_len"),
            allow_plaintext: settings::bool("redis.allow_plaintext"),
            ca_file: None,
            cert_file: None,
            key_file: None,
            wait_replicas: u32::try_from(settings::u64("redis.wait_replicas")).unwrap_or(0),
            wait_timeout_ms: settings::u64("redis.wait_timeout_ms"),
        }
    }
}

impl Default for MappingsConfig {
    fn default() -> Self {
        MappingsConfig {
            dir: PathBuf::from(settings::str("mappings.dir")),
            limits: Limits::default(),
            sql_messages: settings::bool("mappings.sql_messages"),
            sql_messages_secrets: Vec::new(),
            sql_messages_allow: None,
            watch: settings::bool("mappings.watch"),
        }
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_keys: settings::usize("batch.max_keys"),
            max_pending_keys: settings::usize("batch.max_pending_keys"),
            max_wait_ms: settings::u64("batch.max_wait_ms"),
        }
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            enabled: settings::bool("audit.enabled"),
            sample: settings::f64("audit.sample"),
            delay_ms: settings::u64("audit.delay_ms"),
            queue: settings::usize("audit.queue"),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: settings::str("admin.listen")
                .parse()
                .expect("a valid address"),
            console: settings::bool("admin.console"),
            token: None,
        }
    }
}

const SECTIONS: &[&str] = &[
    "source", "postgres", "kafka", "redis", "mappings", "batch", "admin", "audit", "purge", "warm",
];

impl Config {
    /// Reads `path` and the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with_env(path, None)
    }

    /// Reads `path` and `env` (instead of the process environment, when
    /// given) as `EVICTD_*` variables.
    pub fn load_with_env(
        path: &Path,
        env: Option<HashMap<String, String>>,
    ) -> Result<Config, ConfigError> {
        // Only EVICTD_<SECTION>__<KEY> variables are settings; others such
        // as EVICTD_LOG belong to the process, not the config.
        let env: HashMap<String, String> = env
            .unwrap_or_else(|| std::env::vars().collect())
            .into_iter()
            .filter(|(name, _)| name.starts_with("EVICTD_") && name.contains("__"))
            .collect();
        let environment = config::Environment::with_prefix("EVICTD")
            .prefix_separator("_")
            .separator("__")
            .list_separator(",")
            .with_list_parse_key("kafka.topics")
            .source(Some(env));
        // Read and parse the file first: the layering library names neither
        // the key nor the line of a TOML error, and shows paths relative to
        // the working directory rather than as given.
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError {
            problems: vec![format!("cannot read {}: {error}", path.display())],
        })?;
        if let Err(error) = text.parse::<toml::Table>() {
            return Err(ConfigError {
                problems: vec![toml_problem(path, &text, &error)],
            });
        }
        let file = config::File::from(path).format(config::FileFormat::Toml);
        let layered = config::Config::builder()
            .add_source(file)
            .add_source(environment)
            .build()
            .map_err(|error| ConfigError {
                problems: vec![format!("cannot read {}: {error}", path.display())],
            })?;
        // `get` keeps each value's origin (the file); deserializing the whole
        // tree would drop it. The tree is only used for the section names.
        let names = layered
            .clone()
            .try_deserialize::<config::Map<String, config::Value>>();
        let layered: config::Map<String, config::Value> = names
            .into_iter()
            .flat_map(config::Map::into_keys)
            .map(|name| {
                let value = match (layered.get_table(&name), layered.get_array(&name)) {
                    (Ok(table), _) => config::Value::from(table),
                    (_, Ok(array)) => config::Value::from(array),
                    _ => config::Value::from(""),
                };
                (name, value)
            })
            .collect();
        Config::from_layers(layered, path)
    }

    fn from_layers(
        mut root: config::Map<String, config::Value>,
        file: &Path,
    ) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let mut unknown: Vec<String> = root
            .keys()
            .filter(|key| !SECTIONS.contains(&key.as_str()))
            .cloned()
            .collect();
        unknown.sort();
        for section in unknown {
            let help = did_you_mean(&section, SECTIONS)
                .map_or_else(String::new, |near| format!("; did you mean [{near}]?"));
            problems.push(format!("unknown section [{section}]{help}"));
        }
        let source = read_source(&mut Section::new(
            "source",
            file,
            root.remove("source"),
            &mut problems,
        ));
        let base_dir = file.parent().unwrap_or(Path::new("."));
        let postgres = read_postgres(
            &mut Section::new("postgres", file, root.remove("postgres"), &mut problems),
            source,
            base_dir,
        );
        let kafka = read_kafka(
            &mut Section::new("kafka", file, root.remove("kafka"), &mut problems),
            source,
            base_dir,
        );
        let redis = read_redis(
            &mut Section::new("redis", file, root.remove("redis"), &mut problems),
            base_dir,
        );
        let mappings = read_mappings(
            &mut Section::new("mappings", file, root.remove("mappings"), &mut problems),
            base_dir,
        );
        let batch = read_batch(&mut Section::new(
            "batch",
            file,
            root.remove("batch"),
            &mut problems,
        ));
        let admin = read_admin(
            &mut Section::new("admin", file, root.remove("admin"), &mut problems),
            base_dir,
        );
        let audit = read_audit(&mut Section::new(
            "audit",
            file,
            root.remove("audit"),
            &mut problems,
        ));
        let purge = read_purges(root.remove("purge"), file, base_dir, &mut problems);
        let warm = read_warm(&mut Section::new(
            "warm",
            file,
            root.remove("warm"),
            &mut problems,
        ));
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        Ok(Config {
            source: source.unwrap_or(SourceKind::Postgres),
            postgres,
            kafka,
            redis,
            mappings,
            batch,
            admin,
            audit,
            purge,
            warm,
        })
    }
}

/// A TOML syntax or value error as `section.key: message (file:line:column)`,
/// with the path as given.
fn toml_problem(path: &Path, text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end();
    // TOML integers are 64-bit; the parser's own words for a bigger one
    // ("invalid type: integer `...` as i128") do not say that.
    let message = match message.strip_prefix("invalid type: integer `") {
        Some(rest) => format!(
            "{} is too large (integers go up to 9223372036854775807)",
            rest.split('`').next().unwrap_or(rest)
        ),
        None => message.to_owned(),
    };
    let Some(start) = error.span().map(|span| span.start.min(text.len())) else {
        return format!("{}: {message}", path.display());
    };
    let before = &text[..start];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    let location = format!("{}:{line}:{column}", path.display());
    // The key written on that line, under the last [section] above it.
    let this_line = text[line_start..].lines().next().unwrap_or("");
    let key = this_line
        .split_once('=')
        .map(|(key, _)| key.trim())
        .filter(|key| !key.is_empty() && !key.starts_with('['));
    let section = before[..line_start].lines().rev().find_map(|line| {
        let line = line.trim();
        line.strip_prefix('[')
            .and_then(|rest| rest.split_once(']'))
            .map(|(name, _)| name.trim_matches(['[', ']', ' ']).to_owned())
    });
    match (section, key) {
        (Some(section), Some(key)) => format!("{section}.{key}: {message} ({location})"),
        (None, Some(key)) => format!("{key}: {message} ({location})"),
        _ => format!("{location}: {message}"),
    }
}

mod read;
pub mod settings;

#[cfg(test)]
mod tests {
    use super::SecretUrl;

    #[test]
    fn a_multi_host_url_is_kept_whole_and_its_password_hidden() {
        let text =
            "postgres://evictd:s3cret@db1:5432,db2:6432,db3/app?target_session_attrs=read-write";
        let url = SecretUrl::parse(text).expect("libpq's multi-host form");
        assert_eq!(url.expose(), text);
        assert_eq!(url.host(), Some("db1"));
        assert_eq!(url.port(), Some(5432));
        assert_eq!(
            url.to_string(),
            "postgres://evictd:***@db1:5432,db2:6432,db3/app?target_session_attrs=read-write"
        );
        let changed = SecretUrl::parse("postgres://evictd@db1,db2/app")
            .unwrap()
            .with_password("pw")
            .unwrap();
        assert_eq!(changed.expose(), "postgres://evictd:pw@db1,db2/app");
        let single = SecretUrl::parse("postgres://evictd@db/app").unwrap();
        assert_eq!(single.expose(), "postgres://evictd@db/app");
        assert!(SecretUrl::parse("not a url").is_err());
    }
}
