//! The operator kit in `deploy/`: the alert rules pass `promtool check
//! rules` and their unit tests, every alert docs/OPERATIONS.md recommends is a rule
//! with a test, the dashboard charts every metric docs/OPERATIONS.md lists, the
//! Kubernetes manifests' evictd config and mapping load, and the systemd
//! unit passes `systemd-analyze verify`.

use std::path::PathBuf;
use std::process::Command;

use crate::support::{repo_path, stderr, stdout};

/// promtool: `EVICTD_PROMTOOL`, else what `scripts/bootstrap` fetched,
/// else the PATH's.
fn promtool() -> PathBuf {
    if let Some(path) = std::env::var_os("EVICTD_PROMTOOL") {
        return PathBuf::from(path);
    }
    let fetched = repo_path(".tools/bin/promtool");
    if fetched.exists() {
        return fetched;
    }
    PathBuf::from("promtool")
}

fn run_promtool(args: &[&str]) -> std::process::Output {
    Command::new(promtool())
        .args(args)
        .current_dir(repo_path("deploy/prometheus"))
        .output()
        .expect("run promtool (scripts/bootstrap fetches it into .tools/bin)")
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo_path(relative)).expect(relative)
}

/// Every `evictd_...` or `kube_...` metric name in `text`.
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (start, _) in text.match_indices(['e', 'k']) {
        let rest = &text[start..];
        if !(rest.starts_with("evictd_") || rest.starts_with("kube_")) {
            continue;
        }
        if start > 0 && text.as_bytes()[start - 1].is_ascii_alphanumeric() {
            continue;
        }
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        names.push(rest[..end].to_owned());
    }
    names.sort();
    names.dedup();
    names
}

/// A section of the operations guide: from `start` to `end`.
fn readme_section(readme: &str, start: &str, end: &str) -> String {
    let from = readme.find(start).expect(start);
    let rest = &readme[from..];
    rest[..rest.find(end).expect(end)].to_owned()
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let check = run_promtool(&["check", "rules", "alerts.yml"]);
    assert!(
        check.status.success(),
        "{}{}",
        stdout(&check),
        stderr(&check)
    );
    assert!(
        stdout(&check).contains("SUCCESS: 20 rules found"),
        "{}",
        stdout(&check)
    );
    let test = run_promtool(&["test", "rules", "alerts_test.yml"]);
    assert!(test.status.success(), "{}{}", stdout(&test), stderr(&test));
}

#[test]
fn every_recommended_alert_is_a_rule_with_a_unit_test() {
    let readme = read("docs/OPERATIONS.md");
    let alerts = read("deploy/prometheus/alerts.yml");
    let tests = read("deploy/prometheus/alerts_test.yml");
    let recommended = readme_section(&readme, "Alerts worth having:", "\n## ");
    let bullets: Vec<&str> = recommended.split("\n- ").skip(1).collect();
    assert_eq!(bullets.len(), 20, "{recommended}");
    for bullet in bullets {
        for metric in metric_names(bullet) {
            assert!(
                alerts.contains(&metric),
                "no rule uses {metric}, recommended in:\n{bullet}"
            );
        }
    }
    let names: Vec<&str> = alerts
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert: "))
        .collect();
    assert_eq!(names.len(), 20);
    for name in names {
        assert!(
            tests.contains(&format!(
                "alertname: {name}\n        exp_alerts:\n          - exp_labels"
            )),
            "{name} has no unit test in which it fires"
        );
    }
}

#[test]
fn the_dashboard_charts_every_metric_of_the_operations_guide() {
    let readme = read("docs/OPERATIONS.md");
    let table = readme_section(
        &readme,
        "| metric | type | meaning |",
        "Alerts worth having:",
    );
    let listed = metric_names(&table);
    assert!(listed.len() >= 19, "{listed:?}");
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/evictd.json")).expect("the dashboard is JSON");
    let exprs: Vec<&str> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|panel| panel["targets"].as_array().expect("targets"))
        .map(|target| target["expr"].as_str().expect("expr"))
        .collect();
    for metric in listed {
        assert!(
            exprs.iter().any(|expr| metric_names(expr)
                .iter()
                .any(|used| *used == metric || *used == format!("{metric}_bucket"))),
            "no panel charts {metric}"
        );
    }
    // Every query names a metric evictd exports (or its histogram buckets).
    for expr in exprs {
        for used in metric_names(expr) {
            let base = used.strip_suffix("_bucket").unwrap_or(&used);
            assert!(
                table.contains(&format!("`{base}")),
                "{expr} uses {used}, not in docs/OPERATIONS.md"
            );
        }
    }
}

/// The indented block under `key: |` in a YAML text.
fn yaml_block(text: &str, key: &str) -> String {
    let start = text.find(&format!("{key}: |\n")).expect(key) + key.len() + 3;
    let mut block = String::new();
    for line in text[start..].lines() {
        if !line.is_empty() && !line.starts_with("    ") {
            break;
        }
        block.push_str(line.get(4..).unwrap_or_default());
        block.push('\n');
    }
    block
}

#[test]
fn the_kubernetes_pair_loads_its_config_and_probes_readyz() {
    let manifest = read("deploy/kubernetes/evictd.yaml");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("evictd.toml");
    std::fs::write(&config, yaml_block(&manifest, "evictd.toml")).unwrap();
    let mappings = dir.path().join("mappings");
    std::fs::create_dir(&mappings).unwrap();
    std::fs::write(
        mappings.join("orders.toml"),
        yaml_block(&manifest, "orders.toml"),
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_evictd"))
        .args(["check", "--config", config.to_str().unwrap(), "--mappings"])
        .arg(&mappings)
        .arg("--offline")
        .env("EVICTD_POSTGRES__URL", "postgres://evictd@db:5432/shop")
        .env("EVICTD_REDIS__URL", "redis://redis:6379")
        .output()
        .expect("run evictd");
    assert!(
        output.status.success(),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    assert!(manifest.contains("replicas: 2"));
    for probe in [
        "readinessProbe:\n            httpGet:\n              path: /readyz",
        "livenessProbe:\n            httpGet:\n              path: /healthz",
        "listen = \"0.0.0.0:9187\"",
    ] {
        assert!(manifest.contains(probe), "missing: {probe}");
    }
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = read("deploy/systemd/evictd.service");
    assert!(unit.contains("ExecStart=/usr/local/bin/evictd run --config /etc/evictd/evictd.toml"));
    // Verified with the binary just built in place of the installed one.
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("evictd.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/evictd", env!("CARGO_BIN_EXE_evictd")),
    )
    .unwrap();
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("run systemd-analyze (Debian's systemd package)");
    assert!(
        output.status.success() && stderr(&output).is_empty(),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
}

/// The Dockerfile's build stage copies only some of the repository: every
/// file the build reads besides Rust sources (`include_str!`,
/// `include_bytes!` in the crate and the client) must be among what it
/// copies, or `docker build` fails where nothing here would.
#[test]
fn the_docker_build_stage_copies_every_file_the_build_reads() {
    let dockerfile = read("Dockerfile");
    // From the first FROM to the second.
    let build_stage = dockerfile.split("\nFROM ").nth(1).expect("a build stage");
    let copied: Vec<PathBuf> = build_stage
        .lines()
        .filter_map(|line| line.strip_prefix("COPY "))
        .filter(|line| !line.starts_with("--"))
        .flat_map(|line| {
            let parts: Vec<&str> = line.split_whitespace().collect();
            parts[..parts.len() - 1]
                .iter()
                .map(|source| repo_path(source))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        copied.iter().any(|path| path.ends_with("src")),
        "{copied:?}"
    );
    let mut checked = 0;
    let mut stack = vec![repo_path("src"), repo_path("client/src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|ext| ext != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read source");
            for macro_name in ["include_str!(\"", "include_bytes!(\""] {
                for (at, _) in text.match_indices(macro_name) {
                    let rest = &text[at + macro_name.len()..];
                    let relative = &rest[..rest.find('"').expect("a closing quote")];
                    let included = path.parent().unwrap().join(relative);
                    let included = included
                        .canonicalize()
                        .unwrap_or_else(|e| panic!("{}: {relative}: {e}", path.display()));
                    assert!(
                        copied.iter().any(|source| source
                            .canonicalize()
                            .is_ok_and(|source| included.starts_with(source))),
                        "{} includes {}, which the Dockerfile's build stage does not copy",
                        path.display(),
                        included.display()
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 2, "{checked} includes checked");
}
