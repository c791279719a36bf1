//! Every Postgres type through both sources: a row written to a database
//! whose output settings are all non-default renders, through logical
//! replication, exactly the keys that Debezium's JSON encoding of the same
//! row renders through the Kafka source, and both are the canonical text
//! docs/MAPPINGS.md's type table gives.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::kafka::{kafka, kafka_config, l1_messages, names, produce, start, stop};
use crate::support::{mapping_dir, Streaming};

/// One column: its SQL type, the Kafka Connect field schema Debezium
/// declares for it (without `field`), and two rows of (SQL literal, the
/// JSON text Debezium sends, the canonical text).
struct Column {
    name: &'static str,
    sql_type: &'static str,
    schema: &'static str,
    rows: [(&'static str, &'static str, &'static str); 2],
}

const fn column(
    name: &'static str,
    sql_type: &'static str,
    schema: &'static str,
    rows: [(&'static str, &'static str, &'static str); 2],
) -> Column {
    Column {
        name,
        sql_type,
        schema,
        rows,
    }
}

/// Debezium 2.x defaults (`decimal.handling.mode=precise`,
/// `time.precision.mode=adaptive`, `binary.handling.mode=bytes`) with
/// `interval.handling.mode=string`; floats as Java prints them, NaN and
/// the infinities quoted as Jackson writes them.
const COLUMNS: &[Column] = &[
    column(
        "i2",
        "smallint",
        r#""type":"int16""#,
        [("7", "7", "7"), ("-32768", "-32768", "-32768")],
    ),
    column(
        "i4",
        "integer",
        r#""type":"int32""#,
        [
            ("2147483647", "2147483647", "2147483647"),
            ("-1", "-1", "-1"),
        ],
    ),
    column(
        "i8",
        "bigint",
        r#""type":"int64""#,
        [
            (
                "9223372036854775807",
                "9223372036854775807",
                "9223372036854775807",
            ),
            ("0", "0", "0"),
        ],
    ),
    column(
        "n2",
        "numeric(10,2)",
        r#""type":"bytes","name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"2","connect.decimal.precision":"10"}"#,
        [
            ("12.5", r#""BOI=""#, "12.50"),
            ("-12.5", r#""+x4=""#, "-12.50"),
        ],
    ),
    column(
        "n",
        "numeric",
        r#""type":"struct","name":"io.debezium.data.VariableScaleDecimal","fields":[{"type":"int32","field":"scale"},{"type":"bytes","field":"value"}]"#,
        [
            ("-0.070", r#"{"scale":3,"value":"ug=="}"#, "-0.070"),
            (
                "12345678901234567890.5",
                r#"{"scale":1,"value":"BrFOn4EvNmw5"}"#,
                "12345678901234567890.5",
            ),
        ],
    ),
    column(
        "f4",
        "real",
        r#""type":"float""#,
        [
            ("3.4028235e38", "3.4028235E38", "3.4028235e+38"),
            ("NaN", r#""NaN""#, "NaN"),
        ],
    ),
    column(
        "f4b",
        "real",
        r#""type":"float""#,
        [
            ("1e6", "1000000.0", "1e+06"),
            ("1.5e-5", "1.5E-5", "1.5e-05"),
        ],
    ),
    column(
        "f8",
        "double precision",
        r#""type":"double""#,
        [
            ("1e15", "1.0E15", "1e+15"),
            ("-Infinity", r#""-Infinity""#, "-Infinity"),
        ],
    ),
    column(
        "f8b",
        "double precision",
        r#""type":"double""#,
        [("0.1", "0.1", "0.1"), ("-0", "-0.0", "-0")],
    ),
    column(
        "bo",
        "boolean",
        r#""type":"boolean""#,
        [("true", "true", "t"), ("false", "false", "f")],
    ),
    column(
        "tx",
        "text",
        r#""type":"string""#,
        [
            ("a b,c", r#""a b,c""#, "a b,c"),
            ("ünï \"q\"", r#""ünï \"q\"""#, "ünï \"q\""),
        ],
    ),
    column(
        "ch",
        "char(5)",
        r#""type":"string""#,
        [
            ("ab", r#""ab   ""#, "ab   "),
            ("abcde", r#""abcde""#, "abcde"),
        ],
    ),
    column(
        "d",
        "date",
        r#""type":"int32","name":"io.debezium.time.Date""#,
        [
            ("2024-01-31", "19753", "2024-01-31"),
            ("infinity", "2146033979", "infinity"),
        ],
    ),
    column(
        "d2",
        "date",
        r#""type":"int32","name":"io.debezium.time.Date""#,
        [
            ("0044-03-15 BC", "-735160", "0044-03-15 BC"),
            ("-infinity", "-2147472691", "-infinity"),
        ],
    ),
    column(
        "tm",
        "time",
        r#""type":"int64","name":"io.debezium.time.MicroTime""#,
        [
            ("12:34:56.5", "45296500000", "12:34:56.5"),
            ("00:00:00", "0", "00:00:00"),
        ],
    ),
    column(
        "ttz",
        "timetz",
        r#""type":"string","name":"io.debezium.time.ZonedTime""#,
        [
            ("12:34:56.5+00", r#""12:34:56.5Z""#, "12:34:56.5+00"),
            ("23:59:59+00", r#""23:59:59Z""#, "23:59:59+00"),
        ],
    ),
    column(
        "ts",
        "timestamp",
        r#""type":"int64","name":"io.debezium.time.MicroTimestamp""#,
        [
            (
                "2024-01-31 12:34:56.789",
                "1706704496789000",
                "2024-01-31 12:34:56.789",
            ),
            ("infinity", "9223372036825200000", "infinity"),
        ],
    ),
    column(
        "ts3",
        "timestamp(3)",
        r#""type":"int64","name":"io.debezium.time.Timestamp""#,
        [
            (
                "2024-01-31 12:34:56.5",
                "1706704496500",
                "2024-01-31 12:34:56.5",
            ),
            ("-infinity", "-9223372036832400000", "-infinity"),
        ],
    ),
    column(
        "tstz",
        "timestamptz",
        r#""type":"string","name":"io.debezium.time.ZonedTimestamp""#,
        [
            (
                "2024-01-31 14:34:56.5+02",
                r#""2024-01-31T12:34:56.5Z""#,
                "2024-01-31 12:34:56.5+00",
            ),
            ("-infinity", r#""-infinity""#, "-infinity"),
        ],
    ),
    column(
        "iv",
        "interval",
        r#""type":"string","name":"io.debezium.time.Interval""#,
        [
            (
                "1 year 2 mons 3 days 04:05:06.5",
                r#""P1Y2M3DT4H5M6.5S""#,
                "1 year 2 mons 3 days 04:05:06.5",
            ),
            (
                "-1 years -2 mons +3 days -04:05:06",
                r#""P-1Y-2M3DT-4H-5M-6S""#,
                "-1 years -2 mons +3 days -04:05:06",
            ),
        ],
    ),
    column(
        "by",
        "bytea",
        r#""type":"bytes""#,
        [
            ("\\xdeadbeef", r#""3q2+7w==""#, "\\xdeadbeef"),
            ("", r#""""#, "\\x"),
        ],
    ),
    column(
        "u",
        "uuid",
        r#""type":"string","name":"io.debezium.data.Uuid""#,
        [
            (
                "5f0b6f5c-8c1e-4c53-9d42-7f3b0f0c1a2b",
                r#""5f0b6f5c-8c1e-4c53-9d42-7f3b0f0c1a2b""#,
                "5f0b6f5c-8c1e-4c53-9d42-7f3b0f0c1a2b",
            ),
            (
                "00000000-0000-0000-0000-000000000000",
                r#""00000000-0000-0000-0000-000000000000""#,
                "00000000-0000-0000-0000-000000000000",
            ),
        ],
    ),
    column(
        "ip",
        "inet",
        r#""type":"string""#,
        [
            ("192.168.0.1/24", r#""192.168.0.1/24""#, "192.168.0.1/24"),
            ("::1", r#""::1""#, "::1"),
        ],
    ),
    column(
        "j",
        "json",
        r#""type":"string","name":"io.debezium.data.Json""#,
        [
            (
                "{\"a\": 1,  \"b\":2}",
                r#""{\"a\": 1,  \"b\":2}""#,
                "{\"a\": 1,  \"b\":2}",
            ),
            ("[]", r#""[]""#, "[]"),
        ],
    ),
    column(
        "jb",
        "jsonb",
        r#""type":"string","name":"io.debezium.data.Json""#,
        [
            (
                "{\"b\":2,\"a\":[1, 2]}",
                r#""{\"a\": [1, 2], \"b\": 2}""#,
                "{\"a\": [1, 2], \"b\": 2}",
            ),
            ("\"x\"", r#""\"x\"""#, "\"x\""),
        ],
    ),
    column(
        "jn",
        "json",
        r#""type":"string","name":"io.debezium.data.Json""#,
        [
            (
                "{\"n\": 1E2, \"o\": {\"b\": 1,  \"a\": [1.50]}}",
                r#""{\"n\": 1E2, \"o\": {\"b\": 1,  \"a\": [1.50]}}""#,
                "{\"n\": 1E2, \"o\": {\"b\": 1,  \"a\": [1.50]}}",
            ),
            (
                "{\"n\": 12345678901234567890.123}",
                r#""{\"n\": 12345678901234567890.123}""#,
                "{\"n\": 12345678901234567890.123}",
            ),
        ],
    ),
    column(
        "jbn",
        "jsonb",
        r#""type":"string","name":"io.debezium.data.Json""#,
        [
            (
                "{\"n\": 1.50, \"o\": {\"b\": 1, \"aa\": 2, \"a\": 0.000001}}",
                r#""{\"n\": 1.50, \"o\": {\"a\": 0.000001, \"b\": 1, \"aa\": 2}}""#,
                "{\"n\": 1.50, \"o\": {\"a\": 0.000001, \"b\": 1, \"aa\": 2}}",
            ),
            (
                "{\"n\": 12345678901234567890.999}",
                r#""{\"n\": 12345678901234567890.999}""#,
                "{\"n\": 12345678901234567890.999}",
            ),
        ],
    ),
    column(
        "df",
        "date",
        r#""type":"int32","name":"io.debezium.time.Date""#,
        [
            ("12024-01-31", "3672178", "12024-01-31"),
            ("0001-01-01 BC", "-719528", "0001-01-01 BC"),
        ],
    ),
    column(
        "ai",
        "integer[]",
        r#""type":"array","items":{"type":"int32","optional":true}"#,
        [("{1,2,3}", "[1,2,3]", "{1,2,3}"), ("{}", "[]", "{}")],
    ),
    column(
        "at",
        "text[]",
        r#""type":"array","items":{"type":"string","optional":true}"#,
        [
            (
                "{a,\"b c\",\"\",NULL}",
                r#"["a","b c","",null]"#,
                "{a,\"b c\",\"\",NULL}",
            ),
            (
                "{\"NULL\",\"x\\\"y\"}",
                r#"["NULL","x\"y"]"#,
                "{\"NULL\",\"x\\\"y\"}",
            ),
        ],
    ),
    column(
        "ad",
        "date[]",
        r#""type":"array","items":{"type":"int32","name":"io.debezium.time.Date","optional":true}"#,
        [
            (
                "{2024-01-31,infinity}",
                "[19753,2146033979]",
                "{2024-01-31,infinity}",
            ),
            ("{NULL}", "[null]", "{NULL}"),
        ],
    ),
    column(
        "e",
        "mood",
        r#""type":"string","name":"io.debezium.data.Enum","parameters":{"allowed":"happy,sad"}"#,
        [("happy", r#""happy""#, "happy"), ("sad", r#""sad""#, "sad")],
    ),
    column(
        "dm",
        "positive",
        r#""type":"int32""#,
        [("5", "5", "5"), ("2147483647", "2147483647", "2147483647")],
    ),
];

/// Placeholders that shape a column's value (a json path, a date
/// truncation), and what each row renders, as docs/MAPPINGS.md's type table
/// says: a json value as Postgres' own text of it (`#>>`), numbers never
/// through a float; a date's year of any length, BC kept. `None`: no key
/// (a path that leads nowhere, infinity is no date).
const SHAPED: &[(&str, [Option<&str>; 2])] = &[
    ("jn.n", [Some("1E2"), Some("12345678901234567890.123")]),
    ("jn.o", [Some("{\"b\": 1,  \"a\": [1.50]}"), None]),
    ("jn.o.a.0", [Some("1.50"), None]),
    ("jbn.n", [Some("1.50"), Some("12345678901234567890.999")]),
    (
        "jbn.o",
        [Some("{\"a\": 0.000001, \"b\": 1, \"aa\": 2}"), None],
    ),
    ("jbn.o.a", [Some("0.000001"), None]),
    ("d|date", [Some("2024-01-31"), None]),
    ("d2|date", [Some("0044-03-15 BC"), None]),
    ("df|date", [Some("12024-01-31"), Some("0001-01-01 BC")]),
    ("df|month", [Some("12024-01"), Some("0001-01 BC")]),
];

/// The mapping: one key per column, `ty:{id}:<column>:{<column>}`, and one
/// per shaped placeholder, `sh:{id}:<placeholder>:{<placeholder>}`.
fn mapping() -> String {
    let keys: Vec<String> = COLUMNS
        .iter()
        .map(|c| format!("\"ty:{{id}}:{0}:{{{0}}}\"", c.name))
        .chain(
            SHAPED
                .iter()
                .map(|(placeholder, _)| format!("\"sh:{{id}}:{placeholder}:{{{placeholder}}}\"")),
        )
        .collect();
    format!(
        "[[table]]\nname = \"typed\"\nkeys = [{}]\n",
        keys.join(", ")
    )
}

/// A value as docs/MAPPINGS.md says it appears in a key: `%`, `:`, braces, glob
/// characters and ASCII whitespace percent-encoded.
fn encoded(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if matches!(c, '%' | ':' | '{' | '}' | '*' | '?' | '[' | ']') || c.is_ascii_whitespace() {
            out.push_str(&format!("%{:02X}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

fn expected_keys() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for (row, id) in [1, 2].into_iter().enumerate() {
        for c in COLUMNS {
            keys.insert(format!("ty:{id}:{}:{}", c.name, encoded(c.rows[row].2)));
        }
        for (placeholder, rendered) in SHAPED {
            if let Some(text) = rendered[row] {
                keys.insert(format!("sh:{id}:{placeholder}:{}", encoded(text)));
            }
        }
    }
    keys
}

/// The keys of the broadcasts that follow, until `want` distinct keys came.
async fn collect_keys(
    messages: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<String>>,
    want: usize,
) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    while keys.len() < want {
        let batch = tokio::time::timeout(Duration::from_secs(30), messages.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {want} keys broadcast: {keys:#?}", keys.len()))
            .expect("the subscription is open");
        keys.extend(batch);
    }
    keys
}

/// Which keys one side has that the other lacks, for a readable failure.
fn difference(what: &str, got: &BTreeSet<String>, want: &BTreeSet<String>) -> String {
    let extra: Vec<&String> = got.difference(want).collect();
    let missing: Vec<&String> = want.difference(got).collect();
    format!("{what}:\n  rendered but not expected: {extra:#?}\n  expected but not rendered: {missing:#?}")
}

fn sql_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A Debezium envelope (with its schema) creating row `id`.
fn envelope(id: i64, row: usize) -> Vec<u8> {
    let mut fields = vec![r#"{"type":"int64","optional":false,"field":"id"}"#.to_owned()];
    let mut values = vec![format!("\"id\":{id}")];
    for c in COLUMNS {
        fields.push(format!(
            "{{{},\"optional\":true,\"field\":\"{}\"}}",
            c.schema, c.name
        ));
        values.push(format!("\"{}\":{}", c.name, c.rows[row].1));
    }
    let fields = fields.join(",");
    format!(
        r#"{{"schema":{{"type":"struct","name":"dbserver1.public.typed.Envelope","fields":[
            {{"type":"struct","optional":true,"name":"dbserver1.public.typed.Value","field":"before","fields":[{fields}]}},
            {{"type":"struct","optional":true,"name":"dbserver1.public.typed.Value","field":"after","fields":[{fields}]}},
            {{"type":"struct","optional":false,"name":"io.debezium.connector.postgresql.Source","field":"source","fields":[
                {{"type":"string","optional":false,"field":"schema"}},{{"type":"string","optional":false,"field":"table"}},
                {{"type":"int64","optional":false,"field":"ts_ms"}}]}},
            {{"type":"string","optional":false,"field":"op"}}]}},
          "payload":{{"before":null,"after":{{{}}},
            "source":{{"schema":"public","table":"typed","ts_ms":1706704500000}},"op":"c"}}}}"#,
        values.join(",")
    )
    .into_bytes()
}

#[tokio::test]
async fn every_type_renders_the_same_keys_from_both_sources() {
    let want = expected_keys();
    let columns: Vec<String> = COLUMNS
        .iter()
        .map(|c| format!("{} {} not null", c.name, c.sql_type))
        .collect();
    // Every setting that changes a value's text, set away from its default
    // for the database before evictd connects.
    let schema = format!(
        "create type mood as enum ('happy', 'sad');
         create domain positive as integer check (value > 0);
         create table typed (id bigint primary key, {});
         create publication evictd for table typed;
         do $$ begin
           execute format('alter database %I set TimeZone = %L', current_database(), 'Pacific/Chatham');
           execute format('alter database %I set DateStyle = %L', current_database(), 'SQL, DMY');
           execute format('alter database %I set IntervalStyle = %L', current_database(), 'iso_8601');
           execute format('alter database %I set bytea_output = %L', current_database(), 'escape');
           execute format('alter database %I set extra_float_digits = %L', current_database(), '0');
         end $$;",
        columns.join(", ")
    );
    let mapping = mapping();
    // A key per column and per shaped placeholder, old and new row.
    let limits = |config: &mut evictd::config::Config| {
        config.mappings.limits.max_keys_per_change = 256;
    };
    let postgres = Streaming::start_with(&schema, &[("typed.toml", &mapping)], limits).await;
    let mut from_postgres = l1_messages(&postgres.config.redis.l1_channel).await;
    let rows: Vec<String> = [1, 2]
        .into_iter()
        .enumerate()
        .map(|(row, id)| {
            let values: Vec<String> = COLUMNS
                .iter()
                .map(|c| format!("{}::{}", sql_literal(c.rows[row].0), c.sql_type))
                .collect();
            format!("({id}, {})", values.join(", "))
        })
        .collect();
    postgres
        .db
        .execute(&format!("insert into typed values {}", rows.join(", ")))
        .await;
    postgres.sync().await;
    let postgres_keys = collect_keys(&mut from_postgres, want.len()).await;
    assert!(
        postgres_keys == want,
        "{}",
        difference("Postgres source", &postgres_keys, &want)
    );
    postgres.evictd.stop().await.expect("stop");

    let names = names();
    kafka().create_topic(&names.topic, 1).await.expect("topic");
    let dir = mapping_dir(&[("typed.toml", &mapping)]);
    let mut config = kafka_config(&names, dir.path());
    limits(&mut config);
    let mut from_kafka = l1_messages(&config.redis.l1_channel).await;
    let running = start(&config).await;
    for (row, id) in [1, 2].into_iter().enumerate() {
        produce(&names.topic, &id.to_string(), Some(&envelope(id, row))).await;
    }
    running
        .sync()
        .await
        .expect("every record applied and committed");
    let kafka_keys = collect_keys(&mut from_kafka, want.len()).await;
    assert!(
        kafka_keys == want,
        "{}",
        difference("Kafka source", &kafka_keys, &want)
    );
    stop(running).await;
}
