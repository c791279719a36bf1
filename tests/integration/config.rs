//! Config loading: layering with the environment, every problem at once,
//! secrets redacted.

use std::collections::HashMap;
use std::path::Path;

use evictd::config::{Config, Secret, SourceKind};
use evictd::mapping::AllowList;

fn write(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("evictd.toml");
    std::fs::write(&path, text).expect("write config");
    (dir, path)
}

fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    )
}

#[test]
fn the_example_config_loads_with_its_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("evictd.example.toml");
    let config = Config::load_with_env(&path, env(&[])).expect("example config is valid");
    assert_eq!(config.source, SourceKind::Postgres);
    assert_eq!(config.postgres.slot, "evictd");
    assert_eq!(config.batch.max_keys, 10_000);
    assert_eq!(config.batch.max_wait_ms, 2);
    assert_eq!(
        config.mappings.dir,
        Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings")
    );
    assert_eq!(config.mappings.limits.max_key_bytes, 1024);
    assert_eq!(config.admin.listen.to_string(), "127.0.0.1:9187");
}

#[test]
fn environment_overrides_the_file() {
    let (_dir, path) = write("[postgres]\nurl = \"postgres://a@h/db\"\n[batch]\nmax_keys = 5\n");
    let config = Config::load_with_env(
        &path,
        env(&[
            (
                "EVICTD_POSTGRES__URL",
                "postgres://evictd:hunter2@db.internal:5433/app",
            ),
            ("EVICTD_BATCH__MAX_WAIT_MS", "7"),
            ("EVICTD_REDIS__PREFIX", "app1:"),
            ("EVICTD_LOG", "debug"),
            ("EVICTD_PG_BINDIR", "/usr/lib/postgresql/15/bin"),
        ]),
    )
    .expect("valid");
    assert_eq!(
        config
            .postgres
            .url
            .as_ref()
            .map(|u| u.expose().to_owned())
            .as_deref(),
        Some("postgres://evictd:hunter2@db.internal:5433/app")
    );
    assert_eq!(config.batch.max_keys, 5);
    assert_eq!(config.batch.max_wait_ms, 7);
    assert_eq!(config.redis.prefix, "app1:");
}

#[test]
fn passwords_are_redacted_in_debug_and_display() {
    let (_dir, path) = write("[postgres]\nurl = \"postgres://evictd:hunter2@db/app?password=hunter3\"\n[redis]\nurl = \"redis://:s3cret@cache:6379\"\nallow_plaintext = true\n");
    let config = Config::load_with_env(&path, env(&[])).expect("valid");
    let debug = format!("{config:?}");
    for secret in ["hunter2", "hunter3", "s3cret"] {
        assert!(!debug.contains(secret), "{secret} leaked: {debug}");
    }
    assert!(
        debug.contains("postgres://evictd:***@db/app?password=***"),
        "{debug}"
    );
    assert_eq!(config.redis.url.to_string(), "redis://:***@cache:6379");
}

#[test]
fn every_problem_is_reported_at_once() {
    let (_dir, path) = write(
        "[source]\nkind = \"mysql\"\n\
         [postgres]\nurl = \"http://x\"\nslto = \"a\"\nslot = \"Bad-Slot\"\n\
         [redis]\nurl = \"redis://x\"\n\
         [batch]\nmax_keys = 0\nmax_wait_ms = \"soon\"\n\
         [admin]\nlisten = \"everywhere\"\n\
         [metrics]\nx = 1\n",
    );
    let error = Config::load_with_env(&path, env(&[("EVICTD_MAPPINGS__MAX_KEY_BYTES", "3")]))
        .expect_err("invalid");
    // Each names the file and line it was set at (or its variable).
    let file = format!(" (set in {}:", path.display());
    let short = |p: &String| p.replace(&file, " (line ");
    let problems: Vec<String> = error.problems.iter().map(short).collect();
    assert_eq!(
        problems,
        [
            "unknown section [metrics]",
            "source.kind: unknown source kind `mysql`; use \"postgres\" or \"kafka\" (line 2)",
            "postgres.url: scheme `http` is not postgres:// or postgresql:// (line 4)",
            "postgres.slot: a slot name is 1-63 of a-z, 0-9 and _ (line 6)",
            "postgres.slto: unknown field; did you mean `slot`? (line 5)",
            "mappings.max_key_bytes: 3 is out of range 16..=1048576 (set in EVICTD_MAPPINGS__MAX_KEY_BYTES)",
            "batch.max_keys: 0 is out of range 1..=1000000 (line 10)",
            "batch.max_wait_ms: invalid type: string \"soon\", expected an integer (line 11)",
            "admin.listen: `everywhere` is not an address like 127.0.0.1:9187 (line 13)",
        ],
        "{error}"
    );
}

#[test]
fn postgres_url_is_required_for_the_postgres_source() {
    let (_dir, path) = write("[source]\nkind = \"postgres\"\n");
    let error = Config::load_with_env(&path, env(&[])).expect_err("no url");
    assert_eq!(
        error.problems,
        ["postgres.url: is required when source.kind = \"postgres\" (or set EVICTD_POSTGRES__URL)"]
    );
}

#[test]
fn kafka_source_needs_its_section() {
    let (_dir, path) = write("[source]\nkind = \"kafka\"\n");
    let error = Config::load_with_env(&path, env(&[])).expect_err("no kafka section");
    assert_eq!(
        error.problems,
        ["kafka.brokers: [kafka] is required when source.kind = \"kafka\""]
    );
    let (_dir, path) = write(
        "[source]\nkind = \"kafka\"\n[kafka]\nbrokers = \"b:9092\"\ntopics = [\"t1\", \"t2\"]\n",
    );
    let config = Config::load_with_env(&path, env(&[])).expect("valid kafka config");
    assert_eq!(config.kafka.expect("kafka").topics, ["t1", "t2"]);
}

#[test]
fn kafka_settings_are_checked_and_properties_pass_through() {
    let (dir, path) = write(
        "[source]\nkind = \"kafka\"\n[kafka]\nbrokers = \"b:9092\"\ntopics = [\"^dbserver1\\\\..*\"]\n\
         on_bad_record = \"dead_letter\"\ndead_letter_topic = \"evictd.dead\"\n\
         sasl_password_file = \"kafka.pass\"\n\
         [kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\"session.timeout.ms\" = 6000\n",
    );
    std::fs::write(dir.path().join("kafka.pass"), "s3cret\n").expect("password file");
    let config = Config::load_with_env(&path, env(&[])).expect("valid kafka config");
    let kafka = config.kafka.expect("kafka");
    assert_eq!(kafka.topics, ["^dbserver1\\..*"]);
    assert_eq!(
        kafka.on_bad_record,
        evictd::config::BadRecordPolicy::DeadLetter
    );
    assert_eq!(kafka.dead_letter_topic.as_deref(), Some("evictd.dead"));
    assert_eq!(kafka.commit_interval_ms, 1000);
    let properties: Vec<(&str, &str)> = kafka
        .properties
        .0
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        properties,
        [
            ("security.protocol", "SASL_SSL"),
            ("session.timeout.ms", "6000"),
            ("sasl.password", "s3cret")
        ]
    );
    assert!(!format!("{:?}", kafka.properties).contains("s3cret"));
}

#[test]
fn bad_kafka_settings_are_each_reported() {
    let (_dir, path) = write(
        "[source]\nkind = \"kafka\"\n[kafka]\nbrokers = \"b:9092\"\ntopics = [\"t\"]\n\
         on_bad_record = \"ignore\"\ncommit_interval_ms = 0\n\
         [kafka.properties]\n\"enable.auto.commit\" = \"true\"\n",
    );
    let error = Config::load_with_env(&path, env(&[])).expect_err("invalid");
    let file = path.display();
    assert_eq!(
        error.problems,
        [
            format!("kafka.on_bad_record: unknown policy `ignore`; use \"skip\", \"dead_letter\" or \"stop\" (set in {file}:6)"),
            format!("kafka.commit_interval_ms: 0 is out of range 10..=60000 (set in {file}:7)"),
            format!("kafka.properties: `enable.auto.commit` is set by evictd (offsets are stored only after apply); remove it (set in {file}:8)"),
        ]
    );
    let (_dir, path) = write(
        "[source]\nkind = \"kafka\"\n[kafka]\nbrokers = \"b:9092\"\ntopics = [\"t\"]\non_bad_record = \"dead_letter\"\n",
    );
    let error = Config::load_with_env(&path, env(&[])).expect_err("invalid");
    assert_eq!(
        error.problems,
        ["kafka.dead_letter_topic: is required when on_bad_record = \"dead_letter\""]
    );
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let error = Config::load_with_env(Path::new("/nonexistent/evictd.toml"), env(&[]))
        .expect_err("missing");
    assert!(
        error.problems[0].starts_with("cannot read /nonexistent/evictd.toml"),
        "{error}"
    );
}

#[test]
fn passwords_can_come_from_files() {
    let (dir, path) = write(
        "[postgres]\nurl = \"postgres://evictd@db/app\"\npassword_file = \"pg.secret\"\n\
         [redis]\nurl = \"rediss://evictd@cache:6380\"\npassword_file = \"/dev/null\"\n",
    );
    std::fs::write(dir.path().join("pg.secret"), "s3cret\n").unwrap();
    let config = Config::load_with_env(&path, env(&[])).expect("valid");
    let postgres = config.postgres.url.expect("url");
    assert_eq!(postgres.expose(), "postgres://evictd:s3cret@db/app");
    assert_eq!(postgres.to_string(), "postgres://evictd:***@db/app");
    assert!(!format!("{:?}", config.redis).contains("s3cret"));
}

#[test]
fn password_file_problems_are_reported() {
    let (_dir, path) = write(
        "[postgres]\nurl = \"postgres://evictd:inline@db/app\"\npassword_file = \"missing.secret\"\n\
         [redis]\nurl = \"redis://:inline@cache:6379\"\npassword_file = \"/dev/null\"\n",
    );
    let error = Config::load_with_env(&path, env(&[])).expect_err("invalid");
    let text = error.to_string();
    assert!(
        text.contains("postgres.password_file: cannot read"),
        "{text}"
    );
    assert!(
        text.contains("redis.password_file: the url has a password too; keep it in one place"),
        "{text}"
    );
}

#[test]
fn a_plaintext_redis_password_to_another_host_is_refused_unless_allowed() {
    let (_dir, path) = write("[postgres]\nurl = \"postgres://db/app\"\n[redis]\nurl = \"redis://:pw@cache.internal:6379\"\n");
    let error = Config::load_with_env(&path, env(&[])).expect_err("refused");
    assert_eq!(
        error.problems,
        ["redis.url: the password would cross the network in plain text to cache.internal: use rediss:// (TLS), or set redis.allow_plaintext = true"]
    );
    for allowed in [
        "[postgres]\nurl = \"postgres://db/app\"\n[redis]\nurl = \"redis://:pw@cache.internal:6379\"\nallow_plaintext = true\n",
        "[postgres]\nurl = \"postgres://db/app\"\n[redis]\nurl = \"rediss://:pw@cache.internal:6379\"\n",
        "[postgres]\nurl = \"postgres://db/app\"\n[redis]\nurl = \"redis://:pw@127.0.0.1:6379\"\n",
    ] {
        let (_dir, path) = write(allowed);
        Config::load_with_env(&path, env(&[])).unwrap_or_else(|e| panic!("{allowed}: {e}"));
    }
}

#[test]
fn a_number_too_large_names_its_key_and_line_and_the_path_as_given() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evictd.toml");
    std::fs::write(
        &path,
        "[postgres]\nurl = \"postgres://evictd@localhost/shop\"\n\n[batch]\nmax_keys = 99999999999999999999\n",
    )
    .unwrap();
    let error = evictd::config::Config::load(&path).unwrap_err().to_string();
    let given = path.display().to_string();
    assert!(
        error.contains("batch.max_keys: ") && error.contains(&format!("({given}:5:12)")),
        "{error}"
    );
    assert!(!error.contains("../"), "{error}");
}

#[test]
fn purge_targets_are_read_and_every_problem_named() {
    let (_dir, path) = write(
        "[postgres]\nurl = \"postgres://u@h/db\"\n\
         [[purge]]\nkind = \"varnish\"\nurl = \"http://127.0.0.1:6081/\"\nsoft = true\n\
         [[purge]]\nkind = \"fastly\"\nservice_id = \"S\"\ntoken_file = \"fastly-token\"\nmax_keys = 100\n\
         [[purge]]\nkind = \"webhook\"\nname = \"hook\"\nurl = \"https://hooks.example.com/x\"\nsecret_env = \"HOOK_SECRET\"\nbest_effort = true\n",
    );
    let config = Config::load_with_env(&path, env(&[])).expect("valid purge targets");
    let names: Vec<(&str, &str)> = config
        .purge
        .iter()
        .map(|t| (t.name.as_str(), t.url.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("varnish", "http://127.0.0.1:6081/"),
            ("fastly", "https://api.fastly.com"),
            ("hook", "https://hooks.example.com/x"),
        ]
    );
    assert!(config.purge[0].soft);
    assert_eq!(config.purge[1].max_keys, 100);
    assert_eq!(
        config.purge[1].token,
        Some(evictd::config::Secret::File(
            path.parent().unwrap().join("fastly-token")
        ))
    );
    assert!(config.purge[2].best_effort);

    let (_dir, path) = write(
        "[postgres]\nurl = \"postgres://u@h/db\"\n\
         [[purge]]\nkind = \"akamai\"\n\
         [[purge]]\nkind = \"fastly\"\nmax_keys = 300\nrate = 0\n\
         [[purge]]\nkind = \"webhook\"\nurl = \"ftp://x/\"\n\
         [[purge]]\nkind = \"varnish\"\nurl = \"http://a/\"\n[[purge]]\nkind = \"varnish\"\nurl = \"http://b/\"\nsoft = \"maybe\"\n",
    );
    let error = Config::load_with_env(&path, env(&[])).expect_err("invalid");
    let file = path.display();
    assert_eq!(
        error.problems,
        [
            format!("purge[0].kind: unknown purge target `akamai`; use \"varnish\", \"fastly\", \"cloudflare\" or \"webhook\" (set in {file}:4)"),
            "purge[0].kind: required: the kind of target: \"varnish\", \"fastly\", \"cloudflare\" or \"webhook\"".to_owned(),
            "purge[1].service_id: required: the Fastly service whose cache is purged".to_owned(),
            "purge[1].token_file: required: the API token: `token_file = \"...\"` or `token_env = \"VARIABLE\"`".to_owned(),
            format!("purge[1].max_keys: 300 is out of range 1..=256 (set in {file}:7)"),
            format!("purge[1].rate: 0 is not a rate in (0, 10000] requests per second (set in {file}:8)"),
            format!("purge[2].url: `ftp://x/`: use http:// or https://, not ftp:// (set in {file}:11)"),
            "purge[2].url: required: where purges go, e.g. http://127.0.0.1:6081/".to_owned(),
            "purge[2].secret_file: required: the HMAC key the webhook's requests are signed with: `secret_file = \"...\"` or `secret_env = \"VARIABLE\"`".to_owned(),
            format!("purge[4].soft: invalid type: string \"maybe\", expected a boolean (set in {file}:18)"),
            "[[purge]]: two targets are named `varnish`; give each a `name` of its own".to_owned(),
        ]
    );
}

#[test]
fn sql_message_secrets_and_allowed_patterns_are_read_and_checked() {
    let (dir, path) = write(
        "[postgres]\nurl = \"postgres://evictd@db/app\"\n\
         [mappings]\nsql_messages = true\nsql_messages_secret_file = \"new.secret\"\n\
         sql_messages_previous_secret_env = \"OLD_SECRET\"\n\
         [mappings.sql_messages_allow]\nkeys = [\"report:*\"]\nprefixes = [\"search:*\"]\n",
    );
    let config = Config::load_with_env(&path, env(&[])).expect("valid");
    assert_eq!(
        config.mappings.sql_messages_secrets,
        [
            Secret::File(dir.path().join("new.secret")),
            Secret::Env("OLD_SECRET".into())
        ]
    );
    assert_eq!(
        config.mappings.sql_messages_allow,
        Some(AllowList {
            keys: vec!["report:*".into()],
            tags: vec![],
            prefixes: vec!["search:*".into()],
        })
    );

    let (_dir, path) = write(
        "[postgres]\nurl = \"postgres://evictd@db/app\"\n\
         [mappings]\nsql_messages_secret_file = \"a\"\nsql_messages_secret_env = \"B\"\n\
         sql_messages_allow = { keys = [\"\"], table = [\"x\"] }\n",
    );
    let error = Config::load_with_env(&path, env(&[])).expect_err("invalid");
    let text = error.problems.join("\n");
    assert!(
        text.contains(
            "mappings.sql_messages_secret_file: set it or sql_messages_secret_env, not both"
        ),
        "{text}"
    );
    assert!(
        text.contains("mappings.sql_messages_allow: ") && text.contains("unknown field `table`"),
        "{text}"
    );

    let (_dir, path) = write(
        "[postgres]\nurl = \"postgres://evictd@db/app\"\n\
         [mappings]\nsql_messages_previous_secret_file = \"old\"\nsql_messages_allow = { keys = [\"\"] }\n",
    );
    let error = Config::load_with_env(&path, env(&[])).expect_err("invalid");
    let text = error.problems.join("\n");
    assert!(
        text.contains(
            "mappings.sql_messages_previous_secret_file: a previous secret without a current one"
        ),
        "{text}"
    );
    assert!(
        text.contains("mappings.sql_messages_allow: keys[0] is empty"),
        "{text}"
    );
}

#[test]
fn read_replicas_are_read_and_every_problem_named() {
    let (_dir, path) = write(
        "[postgres]\nurl = \"postgres://u@primary/db\"\nreplica_max_wait_ms = 5000\n\
         [[postgres.replica]]\nurl = \"postgres://u@replica-1:5433/db\"\n\
         [[postgres.replica]]\nname = \"r2\"\nurl = \"postgres://u@replica-2/db\"\n",
    );
    let config = Config::load_with_env(&path, env(&[])).expect("valid");
    let names: Vec<&str> = config
        .postgres
        .replicas
        .iter()
        .map(|replica| replica.name.as_str())
        .collect();
    assert_eq!(names, ["replica-1:5433", "r2"]);
    assert_eq!(config.postgres.replica_max_wait_ms, 5000);
    assert_eq!(config.postgres.replica_pending_keys, 100_000);

    let (_dir, path) = write(
        "[postgres]\nurl = \"postgres://u@primary/db\"\nvisibility_gate = false\nreplica_pending_keys = 0\n\
         [[postgres.replica]]\nname = \"r\"\nurl = \"redis://x/\"\n\
         [[postgres.replica]]\nname = \"r\"\nport = 5\n\
         [[postgres.replica]]\nname = \"r\"\nurl = \"postgres://u@a/db\"\n\
         [[postgres.replica]]\nname = \"r\"\nurl = \"postgres://u@b/db\"\n",
    );
    let error = Config::load_with_env(&path, env(&[])).expect_err("invalid");
    let file = path.display();
    assert_eq!(
        error.problems,
        [
            format!("postgres.replica[0].url: scheme `redis` is not postgres:// or postgresql:// (set in {file}:7)"),
            "postgres.replica[0].url: required: the replica's URL, e.g. postgres://evictd@replica-1/app".to_owned(),
            "postgres.replica[1].url: required: the replica's URL, e.g. postgres://evictd@replica-1/app".to_owned(),
            format!("postgres.replica[1].port: unknown field (set in {file}:10)"),
            "postgres.replica: two replicas are named `r`; give each a `name` of its own".to_owned(),
            format!("postgres.replica_pending_keys: 0 is out of range 1..=100000000 (set in {file}:4)"),
            "postgres.replica: read replicas need postgres.visibility_gate = true: a batch is invalidated again once the replicas replayed the primary's position at which it became visible".to_owned(),
        ]
    );
}
