//! The `evictd` command line: exit codes and output of `check` and
//! `explain`.

use crate::support::{evictd, mapping_dir, repo_path, stderr, stdout};

fn demo_mappings() -> String {
    repo_path("mappings").display().to_string()
}

#[test]
fn check_offline_passes_on_the_demo_mappings() {
    let output = evictd(&["check", "--mappings", &demo_mappings(), "--offline"]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    assert_eq!(
        stdout(&output),
        "ok: 4 table(s) mapped in 3 file(s) (offline checks)\n"
    );
}

#[test]
fn check_speaks_json_for_scripts() {
    let output = evictd(&[
        "check",
        "--mappings",
        &demo_mappings(),
        "--offline",
        "--format",
        "json",
    ]);
    assert_eq!(output.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    assert_eq!(json["ok"], true);
    assert_eq!(json["files"], 3);
    assert_eq!(json["tables"].as_array().unwrap().len(), 4);
    assert_eq!(json["problems"], serde_json::json!([]));
    let dir = mapping_dir(&[("m.toml", "[[table]]\nname = \"t\"\nkeys = [\"{\"]\n")]);
    let output = evictd(&[
        "check",
        "--mappings",
        dir.path().to_str().unwrap(),
        "--offline",
        "--format",
        "json",
    ]);
    assert_eq!(output.status.code(), Some(2));
    let json: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    assert_eq!(json["ok"], false);
    let problem = &json["problems"][0];
    assert_eq!(
        (&problem["line"], &problem["column"]),
        (&3.into(), &10.into())
    );
    assert_eq!(problem["message"], "unclosed `{` in template");
    assert!(problem["help"].is_string());
}

#[test]
fn check_without_a_database_says_live_checks_were_skipped() {
    let output = evictd(&["check", "--mappings", &demo_mappings()]);
    assert_eq!(output.status.code(), Some(0));
    assert!(
        stderr(&output).contains("live checks skipped: no database URL"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn check_lists_every_mistake_with_file_and_line_and_exits_2() {
    let dir = mapping_dir(&[
        ("orders.toml", "[[table]]\nname = \"orders\"\nkeys = [\"user:{user_id\"]\non = [\"upsert\"]\n"),
        ("users.toml", "[[table]]\nname = \"users\"\nkeys = [\"user:{id}\"]\n[[table.refresh]]\nkey = \"user:{id}:card\"\ncolumns = [\"id\"]\nttl = \"forever\"\n"),
        ("broken.toml", "[[table]\n"),
    ]);
    let output = evictd(&[
        "check",
        "--mappings",
        dir.path().to_str().unwrap(),
        "--offline",
    ]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    let located: Vec<&str> = text
        .lines()
        .filter(|line| line.contains(": error: "))
        .map(|line| {
            line.rsplit('/')
                .next()
                .unwrap()
                .split(": error")
                .next()
                .unwrap()
        })
        .collect();
    assert_eq!(
        located,
        [
            "broken.toml:1:9",
            "orders.toml:3:15",
            "orders.toml:4:7",
            "users.toml:7:7"
        ],
        "{text}"
    );
    assert!(text.ends_with("4 problems found\n"), "{text}");
}

#[test]
fn check_reports_every_config_problem_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("evictd.toml");
    std::fs::write(
        &config,
        "[batch]\nmax_keys = -1\nmax_wiat_ms = 3\n[postgres]\nurl = \"x\"\n",
    )
    .unwrap();
    let output = evictd(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    for expected in [
        "postgres.url: not a URL",
        "batch.max_keys:",
        "batch.max_wiat_ms: unknown field; did you mean `max_wait_ms`?",
    ] {
        assert!(text.contains(expected), "{expected} missing from:\n{text}");
    }
}

#[test]
fn check_needs_config_or_mappings() {
    let output = evictd(&["check"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("give --config FILE or --mappings DIR"));
}

#[test]
fn explain_an_order_moving_between_users_prints_both_users_keys() {
    let output = evictd(&[
        "explain",
        "--mappings",
        &demo_mappings(),
        "--table",
        "orders",
        "--op",
        "update",
        "--old",
        r#"{"id": 7, "user_id": 1, "status": "new", "total": "12.50"}"#,
        "--new",
        r#"{"id": 7, "user_id": 2, "status": "new", "total": "12.50"}"#,
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let mappings = demo_mappings();
    let expected = [
        "UNLINK user:1:orders  # MAPPINGS/orders.toml:6",
        "UNLINK user:2:orders  # MAPPINGS/orders.toml:6",
        "UNLINK order:7  # MAPPINGS/orders.toml:6",
        r#"UNLINK user:1:open_orders  # MAPPINGS/orders.toml:19 (when "status in ('new', 'paid')")"#,
        r#"UNLINK user:2:open_orders  # MAPPINGS/orders.toml:19 (when "status in ('new', 'paid')")"#,
        "TAG user:1  # MAPPINGS/orders.toml:7",
        "TAG user:2  # MAPPINGS/orders.toml:7",
        r#"SET order:7:summary {"id":7,"user_id":2,"status":"new","total":"12.50"} EX 900  # MAPPINGS/orders.toml:11"#,
    ]
    .map(|line| line.replace("MAPPINGS", &mappings));
    assert_eq!(stdout(&output).lines().collect::<Vec<_>>(), expected);
}

#[test]
fn explain_notes_fallbacks_on_stderr() {
    let output = evictd(&[
        "explain",
        "--mappings",
        &demo_mappings(),
        "--table",
        "users",
        "--op",
        "update",
        "--old",
        r#"{"id": 1, "email": "a@example.com", "name": "A"}"#,
        "--new",
        r#"{"id": 1, "email": "a@example.com", "name": "B"}"#,
        "--unchanged",
        "name",
    ]);
    assert_eq!(output.status.code(), Some(0));
    assert!(
        stdout(&output).contains(
            r#"SET user:1:card {"id":1,"name":"A","email":"a@example.com"} EX 3600 JITTER 10%"#
        ),
        "{}",
        stdout(&output)
    );
    let output = evictd(&[
        "explain",
        "--mappings",
        &demo_mappings(),
        "--table",
        "users",
        "--op",
        "update",
        "--old",
        r#"{"id": 1}"#,
        "--new",
        r#"{"id": 1, "email": "a@example.com", "name": "B"}"#,
        "--unchanged",
        "name",
    ]);
    assert!(
        stdout(&output).contains("UNLINK user:1:card"),
        "{}",
        stdout(&output)
    );
    assert!(
        stderr(&output).contains(
            "note: refresh of user:1:card deletes it instead: name is an unchanged TOAST value (--unchanged), which the source does not send"
        ),
        "{}",
        stderr(&output)
    );
}

#[test]
fn explain_rejects_bad_input_with_exit_2() {
    let mappings = demo_mappings();
    let cases: [(&[&str], &str); 8] = [
        (
            &["--table", "orders", "--op", "upsert", "--new", "{}"],
            "--op: unknown op `upsert`",
        ),
        (
            &["--table", "orders", "--op", "insert", "--new", "{not json"],
            "--new: not JSON",
        ),
        (
            &["--table", "orders", "--op", "insert", "--new", "[1]"],
            "--new: expected a JSON object",
        ),
        (
            &["--table", "orders", "--op", "delete"],
            "--op delete needs --old",
        ),
        (
            &["--table", "a.b.c", "--op", "truncate"],
            "--table: `a.b.c` is not `table` or `schema.table`",
        ),
        (
            &["--table", "orderz", "--op", "truncate"],
            "--table: public.orderz is not mapped; did you mean public.orders?",
        ),
        (
            &["--table", "orders", "--op", "update", "--new", "{}"],
            "--op update needs --old (the old row, as REPLICA IDENTITY FULL sends it), or --identity default --key COLUMN,...",
        ),
        (
            &[
                "--table",
                "orders",
                "--op",
                "update",
                "--new",
                "{}",
                "--identity",
                "default",
            ],
            "--identity default needs --key COLUMN,...",
        ),
    ];
    for (args, expected) in cases {
        let mut all = vec!["explain", "--mappings", &mappings];
        all.extend_from_slice(args);
        let output = evictd(&all);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(
            stderr(&output).contains(expected),
            "{args:?}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn explain_with_broken_mappings_lists_them_and_exits_2() {
    let dir = mapping_dir(&[("m.toml", "[[table]]\nname = \"t\"\nkeys = [\"{\"]\n")]);
    let output = evictd(&[
        "explain",
        "--mappings",
        dir.path().to_str().unwrap(),
        "--table",
        "t",
        "--op",
        "truncate",
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stdout(&output).contains("m.toml:3:10: error: unclosed `{` in template"),
        "{}",
        stdout(&output)
    );
}

#[test]
fn explain_of_an_unmapped_table_says_so_and_exits_2() {
    let output = evictd(&[
        "explain",
        "--mappings",
        &demo_mappings(),
        "--table",
        "audit_log",
        "--op",
        "truncate",
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(stdout(&output), "");
    assert!(
        stderr(&output).contains("public.audit_log is not mapped; mapped: public."),
        "{}",
        stderr(&output)
    );
}

#[test]
fn explain_shows_what_replica_identity_default_sends() {
    let new = r#"{"id": 7, "user_id": 2, "status": "new", "total": "12.50"}"#;
    let run = |extra: &[&str]| {
        let mappings = demo_mappings();
        let mut args = vec![
            "explain",
            "--mappings",
            &mappings,
            "--table",
            "orders",
            "--op",
            "update",
            "--new",
            new,
            "--identity",
            "default",
            "--key",
            "id",
        ];
        args.extend_from_slice(extra);
        let output = evictd(&args);
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        let lines: Vec<String> = stdout(&output)
            .lines()
            .map(|line| line.split("  #").next().unwrap_or_default().to_owned())
            .collect();
        (lines, stderr(&output))
    };
    // An update that keeps its key: the old row is the key, so the key
    // built from it is exact and the user's keys fall back to patterns.
    let (lines, notes) = run(&[]);
    assert_eq!(
        lines,
        [
            "UNLINK user:2:orders",
            "UNLINK order:7",
            "UNLINK user:2:open_orders",
            "UNLINK MATCH user:*:orders",
            "UNLINK MATCH user:*:open_orders",
            "TAG user:2",
            "TAG MATCH user:*",
            r#"SET order:7:summary {"id":7,"user_id":2,"status":"new","total":"12.50"} EX 900"#,
        ]
    );
    assert!(
        notes.contains("an update that keeps its key sends no old row")
            && notes.contains("REPLICA IDENTITY DEFAULT does not send the old user_id")
            && notes.contains(
                "`when = \"status in ('new', 'paid')\"` is taken as true for the old row"
            ),
        "{notes}"
    );
    // An old row given under DEFAULT is cut down to its key.
    let (lines, _) = run(&["--old", r#"{"id": 6, "user_id": 1}"#]);
    assert!(lines.contains(&"UNLINK order:6".to_owned()), "{lines:?}");
    assert!(
        !lines.contains(&"UNLINK user:1:orders".to_owned()),
        "{lines:?}"
    );
}

#[test]
fn explain_says_which_value_was_not_given() {
    let output = evictd(&[
        "explain",
        "--mappings",
        &demo_mappings(),
        "--table",
        "orders",
        "--op",
        "insert",
        "--new",
        r#"{"id": 7, "user_id": 2, "status": "new"}"#,
    ]);
    assert_eq!(output.status.code(), Some(0));
    assert!(
        stderr(&output).contains(
            "note: refresh of order:7:summary deletes it instead: total is not in --new (give it; mark an unchanged TOAST value with --unchanged total)"
        ),
        "{}",
        stderr(&output)
    );
}

#[test]
fn check_refuses_a_template_whose_pattern_could_delete_other_keys() {
    let placeholders = "{id}".repeat(10_000);
    let dir = mapping_dir(&[(
        "t.toml",
        &format!("[[table]]\nname = \"t\"\nkeys = [\"{placeholders}\", \"t{{id}}\"]\n"),
    )]);
    let output = check_offline(dir.path());
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(text.contains("t.toml:3:9: error:"), "{text}");
    assert!(text.contains("has no literal prefix"), "{text}");
    assert!(
        text.contains("`t*` also matches other families' keys"),
        "{text}"
    );
    assert!(text.ends_with("2 problems found\n"), "{text}");
}

#[test]
fn broken_and_looping_symlinks_in_the_mappings_are_reported() {
    let dir = mapping_dir(&[(
        "a.toml",
        "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\n",
    )]);
    std::os::unix::fs::symlink(dir.path().join("gone.toml"), dir.path().join("b.toml")).unwrap();
    std::os::unix::fs::symlink(dir.path().join("c.toml"), dir.path().join("c.toml")).unwrap();
    let output = check_offline(dir.path());
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    for name in ["b.toml", "c.toml"] {
        assert!(
            text.contains(&format!("{name} (a symbolic link): ")),
            "{name} not reported in:\n{text}"
        );
    }
    assert!(text.contains("the link is broken or loops"), "{text}");

    // Alone, a broken link is reported as itself, not as "no mapping files".
    std::fs::remove_file(dir.path().join("a.toml")).unwrap();
    std::fs::remove_file(dir.path().join("c.toml")).unwrap();
    let text = stdout(&check_offline(dir.path()));
    assert!(text.contains("b.toml (a symbolic link)"), "{text}");
    assert!(!text.contains("no mapping files"), "{text}");
}

/// `evictd check --offline --mappings DIR`.
fn check_offline(dir: &std::path::Path) -> std::process::Output {
    evictd(&["check", "--mappings", dir.to_str().unwrap(), "--offline"])
}

/// The `rust-version` both crates declare is the true minimum: the newest
/// `rust-version` among the locked dependencies they build with on this
/// platform (normal and build dependencies, not dev-dependencies).
#[test]
fn the_declared_rust_version_is_what_the_locked_dependencies_need() {
    let output = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .args([
            "--filter-platform",
            &format!("{}-unknown-linux-gnu", std::env::consts::ARCH),
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata");
    assert!(
        output.status.success(),
        "{}",
        crate::support::stderr(&output)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let packages: std::collections::HashMap<&str, &serde_json::Value> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p))
        .collect();
    let nodes: std::collections::HashMap<&str, &serde_json::Value> = metadata["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap(), n))
        .collect();
    let version = |text: &str| -> Vec<u32> {
        let mut parts: Vec<u32> = text.split('.').map(|n| n.parse().unwrap()).collect();
        parts.resize(3, 0);
        parts
    };
    let ours: Vec<&serde_json::Value> = packages
        .values()
        .filter(|p| p["source"].is_null())
        .copied()
        .collect();
    let mut stack: Vec<&str> = ours.iter().map(|p| p["id"].as_str().unwrap()).collect();
    let mut seen = std::collections::HashSet::new();
    let mut needed = (vec![0], String::new());
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        let package = packages[id];
        if !package["source"].is_null() {
            if let Some(rust) = package["rust_version"].as_str() {
                if version(rust) > needed.0 {
                    needed = (version(rust), package["name"].as_str().unwrap().to_owned());
                }
            }
        }
        for dep in nodes[id]["deps"].as_array().unwrap() {
            let normal_or_build = dep["dep_kinds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|kind| kind["kind"].is_null() || kind["kind"] == "build");
            if normal_or_build {
                stack.push(dep["pkg"].as_str().unwrap());
            }
        }
    }
    for package in ours {
        let declared = package["rust_version"].as_str().expect("a rust-version");
        assert_eq!(
            version(declared),
            needed.0,
            "{} declares rust-version {declared}; the locked dependencies need {:?} ({})",
            package["name"],
            needed.0,
            needed.1
        );
    }
}

#[test]
fn explain_names_the_transform_and_the_json_path_behind_a_key() {
    let dir = mapping_dir(&[(
        "m.toml",
        "[[table]]\nname = \"events\"\nkeys = [\"user:email:{email|lower}\", \"event:{payload.slug}\"]\nwhen = \"kind <> 'noise'\"\n",
    )]);
    let output = evictd(&[
        "explain",
        "--mappings",
        dir.path().to_str().unwrap(),
        "--table",
        "events",
        "--op",
        "insert",
        "--new",
        r#"{"id": 1, "email": "Ada@Example.com", "kind": "signup", "payload": {"slug": "launch"}}"#,
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let lines: Vec<String> = stdout(&output)
        .lines()
        .map(|line| {
            line.split_once("  # ")
                .map(|(command, at)| {
                    let decided = at.split_once(' ').map_or("", |(_, decided)| decided);
                    format!("{command} {decided}")
                })
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(
        lines,
        [
            r#"UNLINK user:email:ada@example.com (when "kind <> 'noise'"; {email|lower})"#,
            r#"UNLINK event:launch (when "kind <> 'noise'"; {payload.slug})"#,
        ]
    );
}

#[test]
fn explain_prints_the_cdn_purges_after_the_redis_commands() {
    let dir = mapping_dir(&[(
        "m.toml",
        "[[table]]\nname = \"products\"\nkeys = [\"product:{id}\"]\nsurrogate_keys = [\"product-{id}\", \"category-{category_id}\"]\n",
    )]);
    let run = |extra: &[&str]| {
        let mut args = vec![
            "explain",
            "--mappings",
            dir.path().to_str().unwrap(),
            "--table",
            "products",
            "--op",
            "update",
            "--new",
            r#"{"id": 1, "category_id": 2}"#,
        ];
        args.extend_from_slice(extra);
        let output = evictd(&args);
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        stdout(&output)
            .lines()
            .map(|line| line.split("  #").next().unwrap_or_default().to_owned())
            .collect::<Vec<_>>()
    };
    // An FK move purges the old and the new category's pages.
    assert_eq!(
        run(&["--old", r#"{"id": 1, "category_id": 1}"#]),
        [
            "UNLINK product:1",
            "PURGE product-1",
            "PURGE category-1",
            "PURGE category-2"
        ]
    );
    // The old category is not known: a CDN has no pattern purge.
    assert_eq!(
        run(&["--identity", "default", "--key", "id"]),
        ["UNLINK product:1", "PURGE ALL"]
    );
}

#[test]
fn check_warns_when_a_keys_changed_names_a_column_the_entry_leaves_out() {
    let dir = mapping_dir(&[(
        "orders.toml",
        r#"
[[table]]
name = "orders"
changed = ["total"]
keys = [{ template = "order:{id}:status", changed = ["status"] }, "order:{id}"]
"#,
    )]);
    let output = check_offline(dir.path());
    let text = stderr(&output);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains("orders.toml:5:")
            && text.contains("warning: key `order:{id}:status` names changed column status, which the entry's changed leaves out"),
        "{text}"
    );
    assert!(!text.contains("`order:{id}` names"), "{text}");
    // The same warning in JSON, for scripts.
    let output = evictd(&[
        "check",
        "--mappings",
        dir.path().to_str().unwrap(),
        "--offline",
        "--format",
        "json",
    ]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    assert_eq!(json["ok"], true);
    let warnings = json["warnings"].as_array().expect("warnings");
    assert_eq!(warnings.len(), 1, "{json}");
    assert!(warnings[0]
        .as_str()
        .unwrap()
        .contains("names changed column status"));
}

/// `evictd explain` of inserting `new` into `table` with the mappings in
/// `dir`.
fn explain_insert(dir: &std::path::Path, table: &str, new: &str) -> std::process::Output {
    evictd(&[
        "explain",
        "--mappings",
        dir.to_str().unwrap(),
        "--table",
        table,
        "--op",
        "insert",
        "--new",
        new,
    ])
}

#[test]
fn explain_evaluates_a_number_given_as_a_string_as_a_number_and_says_so() {
    let dir = mapping_dir(&[(
        "orders.toml",
        r#"
[[table]]
name = "orders"
keys = ["order:{id}", { template = "user:{user_id}:big", when = "total >= 100" }]
"#,
    )]);
    let output = explain_insert(
        dir.path(),
        "orders",
        r#"{"id": 1, "user_id": 1, "total": "12.50"}"#,
    );
    let (out, err) = (stdout(&output), stderr(&output));
    assert!(output.status.success(), "{out}{err}");
    assert!(out.contains("UNLINK order:1"), "{out}");
    assert!(!out.contains("user:1:big"), "12.50 is not >= 100: {out}");
    assert!(
        err.contains(r#"note: total: "12.50" was taken as a number"#),
        "{err}"
    );
    // A number keeps its text: 12.50, not 12.5.
    let output = explain_insert(
        dir.path(),
        "orders",
        r#"{"id": 12.50, "user_id": 1, "total": 250}"#,
    );
    let out = stdout(&output);
    assert!(out.contains("UNLINK order:12.50"), "{out}");
    assert!(out.contains("UNLINK user:1:big"), "{out}");
}

#[test]
fn explain_says_which_step_of_a_json_path_was_missing() {
    let dir = mapping_dir(&[(
        "events.toml",
        "[[table]]\nname = \"events\"\nkeys = [\"item:{payload.items.3.id}\"]\n",
    )]);
    let output = explain_insert(
        dir.path(),
        "events",
        r#"{"payload": {"items": [{"id": 1}]}}"#,
    );
    let err = stderr(&output);
    assert!(
        err.contains("`item:{payload.items.3.id}` skipped: payload is not NULL, but it has no `payload.items.3`"),
        "{err}"
    );
}

#[test]
fn a_relative_mappings_dir_is_the_config_files_and_the_error_names_where_it_resolved() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("evictd.toml");
    std::fs::write(
        &config,
        "[postgres]\nurl = \"postgres://evictd@db/app\"\n[mappings]\ndir = \"missing\"\n",
    )
    .expect("write config");
    // From another working directory: the folder is the config file's.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_evictd"))
        .args(["check", "--offline", "--config"])
        .arg(&config)
        .current_dir(std::env::temp_dir())
        .output()
        .expect("run evictd");
    let text = format!("{}{}", stdout(&output), stderr(&output));
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(
        text.contains(&format!("{}", dir.path().join("missing").display())),
        "{text}"
    );
    let help = stdout(&evictd(&["--help"]));
    assert!(
        help.contains("relative to the folder of that config file"),
        "{help}"
    );
}
