//! `check` against a real Postgres: each live problem is reported at the
//! mapping rule it concerns, and a correct setup passes.

use crate::support::{evictd, mapping_dir, repo_path, stdout, TestDb};
use evictd::config::SecretUrl;
use evictd::internal::catalog;
use evictd::mapping::{self, Limits, Mappings};

/// `evictd check --mappings DIR --database-url URL`, with `extra` flags.
fn check_against(mappings: &str, url: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["check", "--mappings", mappings, "--database-url", url];
    args.extend_from_slice(extra);
    evictd(&args)
}

fn load(text: &str) -> Mappings {
    mapping::load_str("m.toml", text, Limits::default()).expect("mapping loads")
}

async fn live_problems(db: &TestDb, mappings: &Mappings) -> Vec<String> {
    let url = SecretUrl::parse(&db.url).expect("url");
    let client = catalog::connect(&url).await.expect("connect");
    catalog::check(mappings, &client, "evictd")
        .await
        .expect("checks run")
        .iter()
        .map(ToString::to_string)
        .collect()
}

const SCHEMA: &str = "
    create table orders (id bigint primary key, user_id bigint not null, status text);
    alter table orders replica identity full;
    create publication evictd for table orders;
";

#[tokio::test]
async fn the_demo_schema_and_mappings_pass() {
    let db = TestDb::new().await;
    db.migrate().await;
    let output = check_against(repo_path("mappings").to_str().unwrap(), &db.url, &[]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}{}",
        stdout(&output),
        crate::support::stderr(&output)
    );
    assert!(
        stdout(&output).contains("checked against the database"),
        "{}",
        stdout(&output)
    );
}

/// One live problem: the schema, the mapping, and exactly what `check`
/// says (nothing, for a setup that is fine).
struct Case {
    what: &'static str,
    schema: &'static str,
    mapping: &'static str,
    expected: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        what: "a missing column is reported at its template",
        schema: SCHEMA,
        mapping: "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\", \"user:{usr_id}:orders\"]\n",
        expected: &["m.toml:3:23: error: column `usr_id` does not exist in table public.orders\n  help: did you mean `user_id`?"],
    },
    Case {
        what: "a missing column of a namespace is reported at its template",
        schema: SCHEMA,
        mapping: "[[table]]\nname = \"orders\"\nversions = [\"user:{usr_id}\"]\n",
        expected: &["m.toml:3:13: error: column `usr_id` does not exist in table public.orders\n  help: did you mean `user_id`?"],
    },
    Case {
        what: "a namespace under REPLICA IDENTITY DEFAULT falls back to a pattern bump",
        schema: "create table orders (id bigint primary key, user_id bigint not null, status text);
                 create publication evictd for table orders;",
        mapping: "[[table]]\nname = \"orders\"\nversions = [\"user:{user_id}\"]\n",
        expected: &["m.toml:3:13: error: template `user:{user_id}` reads the old value of user_id, which REPLICA IDENTITY DEFAULT of public.orders does not send; updates and deletes would fall back to a pattern bump\n  help: ALTER TABLE public.orders REPLICA IDENTITY FULL"],
    },
    Case {
        what: "a missing column of `changed` is reported at its element",
        schema: SCHEMA,
        mapping: "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\nchanged = [\"status\", \"stauts\"]\n",
        expected: &["m.toml:4:22: error: column `stauts` does not exist in table public.orders\n  help: did you mean `status`?"],
    },
    Case {
        what: "a missing column of a refresh's `columns` is reported at its element",
        schema: SCHEMA,
        mapping: "[[table]]\nname = \"orders\"\n[[table.refresh]]\nkey = \"order:{id}\"\ncolumns = [\"id\",\n  \"user\"]\n",
        expected: &["m.toml:6:3: error: column `user` does not exist in table public.orders\n  help: columns of public.orders: id, user_id, status"],
    },
    Case {
        what: "a missing table is reported with a suggestion",
        schema: SCHEMA,
        mapping: "[[table]]\nname = \"order\"\nkeys = [\"order:{id}\"]\n",
        expected: &["m.toml:2:8: error: table public.order does not exist\n  help: did you mean public.orders?"],
    },
    Case {
        what: "a table outside the publication is reported",
        schema: "create table orders (id bigint primary key);
                 create publication evictd for table orders;
                 create table users (id bigint primary key, name text)",
        mapping: "[[table]]\nname = \"users\"\nkeys = [\"user:{id}\"]\n",
        expected: &["m.toml:2:8: error: table public.users is not in publication `evictd`\n  help: ALTER PUBLICATION evictd ADD TABLE public.users"],
    },
    Case {
        what: "REPLICA IDENTITY DEFAULT is reported where FULL is needed",
        schema: "create table orders (id bigint primary key, user_id bigint not null, status text);
                 create publication evictd for table orders;",
        mapping: "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\ntags = [\"user:{user_id}\"]\n",
        expected: &["m.toml:4:9: error: template `user:{user_id}` reads the old value of user_id, which REPLICA IDENTITY DEFAULT of public.orders does not send; updates and deletes would fall back to a pattern delete\n  help: ALTER TABLE public.orders REPLICA IDENTITY FULL"],
    },
    Case {
        what: "under DEFAULT, a mapping that acts on inserts only is fine",
        schema: "create table orders (id bigint primary key, user_id bigint not null, status text);
                 create publication evictd for table orders;",
        mapping: "[[table]]\nname = \"orders\"\nkeys = [\"user:{user_id}\"]\non = [\"insert\"]\n",
        expected: &[],
    },
    Case {
        what: "under DEFAULT, keys of primary key columns only are fine",
        schema: "create table orders (id bigint primary key, user_id bigint not null, status text);
                 create publication evictd for table orders;",
        mapping: "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\n",
        expected: &[],
    },
    Case {
        what: "a table without a primary key is reported",
        schema: "create table events (id bigint, kind text); create publication evictd for table events",
        mapping: "[[table]]\nname = \"events\"\nkeys = [\"event:{id}\"]\n",
        expected: &["m.toml:2:8: error: table public.events has no primary key, so REPLICA IDENTITY DEFAULT sends no old row\n  help: ALTER TABLE public.events REPLICA IDENTITY FULL"],
    },
    Case {
        what: "a missing publication is reported",
        schema: "create table orders (id bigint primary key)",
        mapping: "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\n",
        expected: &["error: publication `evictd` does not exist\n  help: CREATE PUBLICATION evictd FOR TABLE public.orders"],
    },
    Case {
        what: "an operation the publication does not publish is reported",
        schema: "create table orders (id bigint primary key);
                 create publication evictd for table orders with (publish = 'insert, update, delete')",
        mapping: "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\n",
        expected: &["m.toml:2:8: error: publication `evictd` does not publish truncate, which the mapping of public.orders acts on\n  help: ALTER PUBLICATION evictd SET (publish = 'insert, update, delete, truncate'), or remove truncate from `on`"],
    },
    Case {
        what: "a column outside the publication's column list is reported",
        schema: "create table orders (id bigint primary key, user_id bigint, secret text);
                 alter table orders replica identity full;
                 create publication evictd for table orders (id, secret)",
        mapping: "[[table]]\nname = \"orders\"\nkeys = [\"user:{user_id}\"]\n",
        expected: &["m.toml:2:8: error: publication `evictd` does not publish column(s) user_id of public.orders\n  help: add them to the publication's column list for public.orders, or drop the column list"],
    },
    Case {
        what: "a json path into a column that is not json is reported; into jsonb it is fine",
        schema: "create table orders (id bigint primary key, note text, payload jsonb);
                 alter table orders replica identity full;
                 create publication evictd for table orders",
        mapping: "[[table]]\nname = \"orders\"\nkeys = [\"a:{note.x}\", \"b:{payload.items.0}\"]\n",
        expected: &["m.toml:3:9: error: `a:{note.x}` reaches into `note` with a json path, but note of public.orders is not json or jsonb\n  help: json columns of public.orders: payload"],
    },
    Case {
        what: "a condition's unknown column and its old value under DEFAULT are reported",
        schema: "create table orders (id bigint primary key, status text);
                 create publication evictd for table orders",
        mapping: "[[table]]\nname = \"orders\"\nkeys = [{ template = \"order:{id}\", when = \"stauts = 'paid'\" }]\n",
        expected: &[
            "m.toml:3:22: error: column `stauts` does not exist in table public.orders\n  help: did you mean `status`?",
            "m.toml:3:22: error: `when = \"stauts = 'paid'\"` reads the old value of stauts, which REPLICA IDENTITY DEFAULT of public.orders does not send; on updates and deletes it is taken as true for the old row (nothing is missed, more may be invalidated)\n  help: ALTER TABLE public.orders REPLICA IDENTITY FULL",
        ],
    },
];

#[tokio::test]
async fn each_live_problem_is_reported_at_the_rule_it_concerns() {
    let mut failures = Vec::new();
    for case in CASES {
        let db = TestDb::new().await;
        db.execute(case.schema).await;
        let problems = live_problems(&db, &load(case.mapping)).await;
        if problems != case.expected {
            failures.push(format!(
                "{}:\n  expected {:?}\n  got      {problems:?}",
                case.what, case.expected
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn the_cli_lists_every_live_problem_and_exits_2() {
    let db = TestDb::new().await;
    db.execute(SCHEMA).await;
    db.execute("create table users (id bigint primary key)")
        .await;
    let dir = mapping_dir(&[
        (
            "orders.toml",
            "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\", \"x:{nope}\"]\n",
        ),
        (
            "users.toml",
            "[[table]]\nname = \"users\"\nkeys = [\"user:{id}\"]\n",
        ),
    ]);
    let output = check_against(dir.path().to_str().unwrap(), &db.url, &[]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(
        text.contains(
            "orders.toml:3:23: error: column `nope` does not exist in table public.orders"
        ),
        "{text}"
    );
    assert!(
        text.contains("users.toml:2:8: error: table public.users is not in publication `evictd`"),
        "{text}"
    );
    assert!(text.ends_with("2 problems found\n"), "{text}");

    // The same for scripts and CI.
    let output = check_against(dir.path().to_str().unwrap(), &db.url, &["--format", "json"]);
    assert_eq!(output.status.code(), Some(2));
    let json: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    assert_eq!((&json["ok"], &json["live"]), (&false.into(), &true.into()));
    let problems: Vec<(String, u64, u64)> = json["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let file = p["file"].as_str().unwrap();
            let name = file.rsplit('/').next().unwrap().to_owned();
            (
                name,
                p["line"].as_u64().unwrap(),
                p["column"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        problems,
        [
            ("orders.toml".to_owned(), 3, 23),
            ("users.toml".to_owned(), 2, 8)
        ]
    );
    assert_eq!(
        json["problems"][0]["message"],
        "column `nope` does not exist in table public.orders"
    );
}

#[tokio::test]
async fn the_cli_reads_the_database_from_the_config() {
    let db = TestDb::new().await;
    db.migrate().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("evictd.toml");
    let mappings = repo_path("mappings");
    std::fs::write(
        &config,
        format!(
            "[postgres]\nurl = \"{}\"\n[mappings]\ndir = \"{}\"\n",
            db.url,
            mappings.display()
        ),
    )
    .expect("write config");
    let output = evictd(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}{}",
        stdout(&output),
        crate::support::stderr(&output)
    );
    let unreachable = "postgres://nobody@127.0.0.1:1/none";
    let output = evictd(&[
        "check",
        "--config",
        config.to_str().unwrap(),
        "--database-url",
        unreachable,
    ]);
    assert_eq!(
        output.status.code(),
        Some(1),
        "a runtime failure: {}",
        crate::support::stderr(&output)
    );
    assert!(crate::support::stderr(&output)
        .contains("cannot connect to Postgres at postgres://nobody@127.0.0.1:1/none"));
}

/// A server that can invalidate the slot while evictd is down: `check`
/// warns with the setting and the outage it allows (and still passes).
/// On its own server: the settings are server-wide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_warns_about_settings_that_can_invalidate_the_slot() {
    use evictd::testkit::Postgres;
    let postgres = Postgres::start().expect("postgres");
    let name = postgres.create_database().await.expect("database");
    postgres.execute(&name, SCHEMA).await.expect("schema");
    let version = crate::support::server_version(&postgres.url(&name)).await;
    let mut settings = vec!["alter system set max_slot_wal_keep_size = '1GB'"];
    if version >= 180_000 {
        settings.push("alter system set idle_replication_slot_timeout = '2h'");
    }
    settings.push("select pg_reload_conf()");
    for sql in settings {
        postgres.execute("postgres", sql).await.expect(sql);
    }
    let dir = mapping_dir(&[(
        "orders.toml",
        "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\n",
    )]);
    let output = check_against(dir.path().to_str().unwrap(), &postgres.url(&name), &[]);
    let stderr = crate::support::stderr(&output);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("max_slot_wal_keep_size = 1024MB: Postgres invalidates evictd's slot"),
        "{stderr}"
    );
    assert!(
        stderr.contains("an evictd outage of about") || stderr.contains("WAL rate is not known"),
        "{stderr}"
    );
    if version >= 180_000 {
        assert!(
            stderr.contains("an evictd outage longer than 2.0 h invalidates its slot"),
            "{stderr}"
        );
    }
    // The shared server keeps the defaults: no such warning.
    let db = TestDb::new().await;
    db.execute(SCHEMA).await;
    let output = check_against(dir.path().to_str().unwrap(), &db.url, &[]);
    assert!(
        !crate::support::stderr(&output).contains("max_slot_wal_keep_size"),
        "{}",
        crate::support::stderr(&output)
    );
}

/// `check` as the role evictd connects with: one that may not stream
/// changes is a problem (exit 2) with the grant that fixes it, and the
/// REPLICATION attribute or, as RDS and Aurora grant it, membership in
/// `rds_replication` passes. Roles are server-wide: on a server of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_a_role_that_may_not_stream_and_the_grant_that_fixes_it() {
    use evictd::testkit::Postgres;
    let postgres = Postgres::start().expect("postgres");
    let name = postgres.create_database().await.expect("database");
    postgres
        .execute(
            &name,
            &format!("{SCHEMA} create role plain login; grant select on orders to plain;"),
        )
        .await
        .expect("schema");
    let dir = mapping_dir(&[(
        "orders.toml",
        "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\n",
    )]);
    let url = postgres.url(&name);
    let as_plain = url.replacen("://postgres@", "://plain@", 1);
    assert_ne!(as_plain, url, "the testkit's URL names its user: {url}");
    let check = || check_against(dir.path().to_str().unwrap(), &as_plain, &[]);

    let output = check();
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
    assert!(
        stdout(&output).contains("role `plain` may not stream changes")
            && stdout(&output).contains(r#"ALTER ROLE "plain" WITH REPLICATION"#),
        "{}",
        stdout(&output)
    );

    // Where the server has RDS's role, the grant is that role.
    postgres
        .execute(&name, "create role rds_replication")
        .await
        .expect("role");
    let output = check();
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
    assert!(
        stdout(&output).contains(r#"GRANT rds_replication TO "plain""#),
        "{}",
        stdout(&output)
    );
    postgres
        .execute(&name, "grant rds_replication to plain")
        .await
        .expect("grant");
    let output = check();
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));

    postgres
        .execute(
            &name,
            "revoke rds_replication from plain; alter role plain replication",
        )
        .await
        .expect("alter");
    let output = check();
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
}
