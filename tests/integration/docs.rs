//! The docs as a user meets them: the "Try it on your own database" walk
//! of docs/RUNNING.md runs as written (against throwaway servers instead
//! of the machine's own), every link between the docs reaches a file
//! and a heading that exist, the README's `explain` and demo examples print
//! what it shows, every TOML example is a mapping that compiles
//! or config that loads, every SQL example runs, and the client guide's
//! Rust is in an example CI builds.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{
    free_port, repo_path, slot_confirmed, spawn_evictd, stdout, terminate, wait_for_slot,
};
use evictd::testkit::{Postgres, Redis};

/// The markdown files that link to each other.
const DOCS: &[&str] = &[
    "README.md",
    "ARCHITECTURE.md",
    "CONTRIBUTING.md",
    "client/README.md",
    "docs/BENCHMARKS.md",
    "docs/CLI.md",
    "docs/CLIENT.md",
    "docs/CONFIGURATION.md",
    "docs/KAFKA.md",
    "docs/MANAGED.md",
    "docs/MAPPINGS.md",
    "docs/OPERATIONS.md",
    "docs/PROTOCOL.md",
    "docs/RUNNING.md",
    "docs/TESTKIT.md",
];

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo_path(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// The text of a markdown section: from its heading to the next heading
/// of the same or a higher level.
fn section(text: &str, heading: &str) -> String {
    let level = heading.chars().take_while(|c| *c == '#').count();
    let start = text.find(&format!("\n{heading}\n")).expect(heading) + heading.len() + 2;
    let mut out = String::new();
    let mut fenced = false;
    for line in text[start..].lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if !fenced && hashes > 0 && hashes <= level && line[hashes..].starts_with(' ') {
            break;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The code blocks of `text` fenced as ````lang`, in order, unindented.
fn blocks(text: &str, lang: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        match &mut current {
            None if trimmed == format!("```{lang}") => current = Some((indent, String::new())),
            Some((_, block)) if trimmed == "```" => {
                found.push(std::mem::take(block));
                current = None;
            }
            Some((indent, block)) => {
                block.push_str(line.get(*indent..).unwrap_or(""));
                block.push('\n');
            }
            None => {}
        }
    }
    found
}

/// GitHub's anchor for a heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == ' ' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let mut fenced = false;
    let mut found = BTreeSet::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if !fenced && hashes > 0 && line[hashes..].starts_with(' ') {
            found.insert(anchor(&line[hashes..]));
        }
    }
    found
}

#[test]
fn every_link_between_the_docs_reaches_a_file_and_a_heading() {
    let mut checked = 0;
    for doc in DOCS {
        let text = read(doc);
        let dir = Path::new(doc).parent().unwrap_or(Path::new(""));
        for (at, _) in text.match_indices("](") {
            let rest = &text[at + 2..];
            let target = &rest[..rest.find(')').expect("a closed link")];
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, fragment) = target.split_once('#').unwrap_or((target, ""));
            let file = if file.is_empty() {
                doc.to_string()
            } else {
                let joined = dir.join(file);
                let normal =
                    joined
                        .components()
                        .fold(std::path::PathBuf::new(), |mut path, part| {
                            match part {
                                std::path::Component::ParentDir => {
                                    path.pop();
                                }
                                other => path.push(other),
                            }
                            path
                        });
                normal.to_string_lossy().into_owned()
            };
            assert!(
                repo_path(&file).exists(),
                "{doc} links to {target}: no file {file}"
            );
            if !fragment.is_empty() {
                assert!(
                    anchors(&read(&file)).contains(fragment),
                    "{doc} links to {target}: {file} has no heading #{fragment}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 40, "only {checked} links found");
}

#[test]
fn the_readme_stays_a_landing_page() {
    let readme = read("README.md");
    assert!(
        readme.lines().count() <= 250,
        "README.md has {} lines",
        readme.lines().count()
    );
    // Every guide is in its table of contents.
    for doc in DOCS.iter().filter(|doc| doc.starts_with("docs/")) {
        assert!(readme.contains(&format!("]({doc})")), "README omits {doc}");
    }
}

/// One line of a walk's shell block, run as the docs say with the
/// throwaway servers' ports, Postgres' binaries first on the PATH, and
/// `sudo -u postgres` as the throwaway server's superuser.
fn shell(line: &str, postgres: &Postgres, redis: &Redis) -> std::process::Output {
    let line = line
        .trim_start_matches("sudo -u postgres ")
        .replace("127.0.0.1:5432", &format!("127.0.0.1:{}", postgres.port()))
        .replace("redis-cli ", &format!("redis-cli -p {} ", redis.port()));
    let path = format!(
        "{}:{}",
        postgres.bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = Command::new("sh")
        .args(["-c", &line])
        .current_dir(repo_path(""))
        .env("PATH", path)
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", postgres.port().to_string())
        .env("PGUSER", "postgres")
        .output()
        .expect("sh");
    assert!(
        output.status.success(),
        "{line}: {}{}",
        stdout(&output),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trying_it_on_your_own_database_works_as_written() {
    let walk = section(&read("docs/RUNNING.md"), "## Try it on your own database");
    let sh = blocks(&walk, "sh");
    assert_eq!(sh.len(), 4, "{walk}");
    // Its own servers: the walk creates cluster-wide roles.
    let postgres = Postgres::start().expect("postgres");
    let redis = Redis::start().expect("redis");

    // 1. wal_level (the throwaway server has it already; no restart here).
    let first: Vec<&str> = sh[0].lines().collect();
    assert_eq!(first.len(), 2, "{}", sh[0]);
    assert!(first[1].contains("restart postgresql"), "{}", sh[0]);
    shell(first[0], &postgres, &redis);

    // 2. The database, the schema and the roles, from the file the docs show.
    for line in sh[1].lines() {
        shell(line, &postgres, &redis);
    }
    let sql = blocks(&walk, "sql");
    assert_eq!(sql.len(), 1, "{walk}");
    assert_eq!(sql[0], read("docs/own-database.sql"));

    // 3. The config, as written, next to the repository's mappings.
    let toml = blocks(&walk, "toml");
    assert_eq!(toml.len(), 1, "{walk}");
    let dir = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(repo_path("mappings"), dir.path().join("mappings"))
        .expect("link the mappings");
    let config = dir.path().join("evictd.toml");
    std::fs::write(
        &config,
        toml[0]
            .replace("127.0.0.1:5432", &format!("127.0.0.1:{}", postgres.port()))
            .replace("127.0.0.1:6379", &format!("127.0.0.1:{}", redis.port())),
    )
    .expect("write evictd.toml");

    // 4. check, then run.
    let steps: Vec<&str> = sh[2].lines().collect();
    assert_eq!(
        steps,
        [
            "cargo run -- check --config evictd.toml",
            "cargo run -- run --config evictd.toml"
        ]
    );
    let check = Command::new(env!("CARGO_BIN_EXE_evictd"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("evictd check");
    assert!(check.status.success(), "{check:?}");
    assert!(
        stdout(&check).starts_with("ok: ")
            && stdout(&check).contains("checked against the database"),
        "{}",
        stdout(&check)
    );
    let mut run = Command::new(env!("CARGO_BIN_EXE_evictd"));
    run.args(["run", "--config"])
        .arg(&config)
        .env("EVICTD_ADMIN__LISTEN", format!("127.0.0.1:{}", free_port()));
    let child = spawn_evictd(run);
    let (client, connection) = tokio_postgres::connect(&postgres.url("app"), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    wait_for_slot(&client, "evictd", true).await;

    // 5. Cache a value, change its row, see it go.
    let last: Vec<&str> = sh[3].lines().collect();
    assert_eq!(last.len(), 4, "{}", sh[3]);
    assert_eq!(last[3], "redis-cli GET user:1");
    // The insert is applied before the value is cached, so only the
    // update can delete it.
    shell(last[0], &postgres, &redis);
    let inserted: String = client
        .query_one("select pg_current_wal_insert_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    let inserted = evictd::change::Lsn::parse(&inserted).expect("an LSN");
    while slot_confirmed(&client, "evictd").await < inserted {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for line in &last[1..3] {
        shell(line, &postgres, &redis);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let output = shell(last[3], &postgres, &redis);
        if stdout(&output).trim().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "user:1 is still cached: {}",
            stdout(&output)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    terminate(child);
}

/// The lines of `text`, trimmed, without blank ones.
fn trimmed_lines(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect()
}

#[test]
fn every_rust_snippet_of_the_client_guide_is_in_an_example_ci_builds() {
    let guide = read("docs/CLIENT.md");
    let example = read("client/examples/guide.rs");
    let example = trimmed_lines(&example);
    let snippets = blocks(&guide, "rust");
    assert!(snippets.len() >= 4, "{} snippets", snippets.len());
    for snippet in snippets {
        let lines = trimmed_lines(&snippet);
        assert!(
            example.windows(lines.len()).any(|window| window == lines),
            "client/examples/guide.rs does not hold this snippet of docs/CLIENT.md:\n{snippet}"
        );
    }
}

#[test]
fn the_testkit_guide_shows_the_example_the_suite_runs() {
    let snippets = blocks(&read("docs/TESTKIT.md"), "rust");
    assert_eq!(snippets.len(), 1);
    let example = read("tests/integration/testkit_example.rs");
    assert!(
        example.starts_with(&snippets[0]),
        "docs/TESTKIT.md's example is not the start of tests/integration/testkit_example.rs"
    );
    assert!(snippets[0].contains("async fn placing_an_order_invalidates_the_users_order_list"));
}

const GENERATED: &str = "<!-- generated from src/config/settings.rs: edit there, then run `EVICTD_BLESS=1 cargo test --test integration docs::` -->\n";
const GENERATED_END: &str = "<!-- end of generated -->";

/// Whether `relative` holds `expected` (between the generated markers when
/// `marked`); with `EVICTD_BLESS=1`, writes it there instead.
fn generated(relative: &str, expected: &str, marked: bool) -> Result<(), String> {
    let text = read(relative);
    let wanted = if marked {
        let start = text.find(GENERATED).ok_or("no generated marker")? + GENERATED.len();
        let end = text[start..].find(GENERATED_END).ok_or("no end marker")? + start;
        format!("{}{expected}{}", &text[..start], &text[end..])
    } else {
        expected.to_owned()
    };
    if wanted == text {
        return Ok(());
    }
    if std::env::var("EVICTD_BLESS").as_deref() == Ok("1") {
        std::fs::write(repo_path(relative), wanted).expect("write");
        return Ok(());
    }
    Err(format!(
        "{relative} differs from what src/config/settings.rs generates; run EVICTD_BLESS=1 cargo test --test integration docs::"
    ))
}

#[test]
fn the_configuration_reference_and_example_are_generated_from_the_declarations() {
    use evictd::config::settings;
    let problems: Vec<String> = [
        generated(
            "docs/CONFIGURATION.md",
            &settings::reference(&[""], &[], ""),
            true,
        ),
        generated(
            "docs/MAPPINGS.md",
            &settings::reference(&["purge[]."], &[], "purge[]."),
            true,
        ),
        generated("evictd.example.toml", &settings::example(), false),
    ]
    .into_iter()
    .filter_map(Result::err)
    .collect();
    assert!(problems.is_empty(), "{problems:#?}");
}

/// Every TOML block of the guides is read by evictd as what it shows: a
/// mapping file (it has `[[table]]`) compiles, and anything else is a
/// config section that loads (with the settings it leaves out given by
/// `EVICTD_*` variables), so an example cannot name a key that does not
/// exist or a value evictd refuses.
#[test]
fn every_config_and_mapping_example_in_the_docs_is_read_by_evictd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mappings = dir.path().join("mappings");
    std::fs::create_dir(&mappings).expect("mappings dir");
    let env: std::collections::HashMap<String, String> = [
        (
            "EVICTD_POSTGRES__URL",
            "postgres://evictd@127.0.0.1:5432/app",
        ),
        ("EVICTD_REDIS__URL", "redis://127.0.0.1:6379"),
        ("EVICTD_MAPPINGS__DIR", mappings.to_str().expect("utf-8")),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value.to_owned()))
    .collect();
    let mut checked = 0;
    for doc in DOCS.iter().filter(|doc| doc.starts_with("docs/")) {
        for (index, block) in blocks(&read(doc), "toml").into_iter().enumerate() {
            let place = format!("{doc}, TOML block {}", index + 1);
            if block.contains("[[table]]") {
                if let Err(problems) =
                    evictd::mapping::load_str(&place, &block, evictd::mapping::Limits::default())
                {
                    let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
                    panic!("{place} does not compile:\n{}", problems.join("\n"));
                }
            } else {
                let path = dir.path().join(format!("block-{checked}.toml"));
                std::fs::write(&path, &block).expect("write");
                if let Err(error) = evictd::config::Config::load_with_env(&path, Some(env.clone()))
                {
                    panic!("{place} does not load:\n{error}\n---\n{block}");
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 8, "only {checked} TOML blocks were found");
}

/// Every SQL example of the guides runs as written on a server of its own
/// (roles are server-wide), each guide in a database with the demo shop's
/// schema and evictd's migrations (the walk's own SQL, indented in its
/// steps, runs in `trying_it_on_your_own_database_works_as_written`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sql_example_in_the_docs_runs() {
    let postgres = Postgres::start().expect("postgres");
    let mut ran = 0;
    for doc in ["docs/RUNNING.md", "docs/MANAGED.md", "docs/MAPPINGS.md"] {
        let database = postgres.create_database().await.expect("database");
        for setup in [
            read("migrations/0001_shop.sql"),
            read("migrations/0002_evictd_invalidate.sql"),
            // The reader's database: their tables (MAPPINGS.md's examples
            // update one of its own), no publication for evictd yet.
            "create table reports (id int primary key, body text); drop publication evictd"
                .to_owned(),
            "do $$ begin create role app; exception when duplicate_object then null; end $$"
                .to_owned(),
        ] {
            postgres.execute(&database, &setup).await.expect("setup");
        }
        let text = read(doc);
        let top_level: Vec<String> = blocks(&text, "sql")
            .into_iter()
            .filter(|block| {
                let first = block.lines().next().unwrap_or_default();
                text.lines().any(|line| line == first)
            })
            .collect();
        assert!(!top_level.is_empty(), "{doc} has no SQL example");
        for (index, block) in top_level.iter().enumerate() {
            if let Err(error) = postgres.execute(&database, block).await {
                panic!("{doc}, SQL block {}: {error:?}\n---\n{block}", index + 1);
            }
            ran += 1;
        }
    }
    assert!(ran >= 4, "only {ran} SQL blocks ran");
}

/// The README's `explain` example, run as written (`cargo run --` being
/// the built binary), prints exactly the output the README shows; and
/// `evictd demo` prints the README's excerpt (the commit position and L1
/// seq aside, which vary from run to run).
#[test]
fn the_readmes_explain_and_demo_examples_print_what_it_shows() {
    let readme = read("README.md");
    let explain = blocks(&readme, "sh")
        .into_iter()
        .find(|block| block.contains("-- explain"))
        .expect("the README's explain example");
    let outputs = blocks(&readme, "text");
    let shown = outputs
        .iter()
        .find(|block| block.starts_with("UNLINK"))
        .expect("the README's explain output");
    let command = explain.replace(
        "cargo run --",
        &format!("'{}'", env!("CARGO_BIN_EXE_evictd")),
    );
    let output = Command::new("sh")
        .args(["-c", &command])
        .current_dir(repo_path(""))
        .output()
        .expect("sh");
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    assert_eq!(stdout(&output), *shown, "README's explain example");

    let excerpt = outputs
        .iter()
        .find(|block| block.starts_with("> "))
        .expect("the README's demo excerpt");
    let demo = Command::new(env!("CARGO_BIN_EXE_evictd"))
        .arg("demo")
        .current_dir(repo_path(""))
        .output()
        .expect("run the demo");
    assert_eq!(demo.status.code(), Some(0), "{}", stdout(&demo));
    let normalize = |text: &str| -> String {
        text.lines()
            .map(|line| match line.trim_start().strip_prefix("commit ") {
                Some(rest) => {
                    let indent = &line[..line.len() - line.trim_start().len()];
                    // `commit 0/1965CB0 (L1 seq 6):` and what follows
                    let after = rest.split_once("):").map_or("", |(_, after)| after);
                    format!("{indent}commit <position> (L1 seq <n>):{after}")
                }
                None => line.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let printed = normalize(&stdout(&demo));
    let excerpt = normalize(excerpt.trim_end());
    assert!(
        printed.contains(&excerpt),
        "the demo no longer prints the README's excerpt:\n{excerpt}\n--- it printed:\n{printed}"
    );
}
