//! The Python package (`client/python`, distribution `evictd-cache`):
//! installed with pip into the virtualenv `scripts/bootstrap` makes, then
//! its pytest suite run against this suite's Postgres and Redis (and a
//! three-master Redis Cluster of its own), with a real `evictd run` (the
//! built binary) per test.

use std::process::Command;

use crate::support::{repo_path, stack, stderr, stdout, TestDb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_package_installs_and_passes_its_tests() {
    let python = repo_path(".tools/python/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/bootstrap",
        python.display()
    );
    let db = TestDb::new().await;
    let cluster = tokio::task::spawn_blocking(|| evictd::testkit::RedisCluster::start(3))
        .await
        .unwrap()
        .expect("a Redis Cluster");
    let cluster_url = cluster.url();
    let install = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(["--no-deps", "--no-build-isolation", "--force-reinstall"])
        .arg(repo_path("client/python"))
        .output()
        .expect("run pip");
    assert!(
        install.status.success(),
        "pip install ./client/python failed:\n{}{}",
        stdout(&install),
        stderr(&install)
    );
    let suite = tokio::task::spawn_blocking(move || {
        Command::new(&python)
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .arg(repo_path("client/python/tests"))
            // Outside the checkout: the installed package is what is tested.
            .current_dir(std::env::temp_dir())
            .env("EVICTD_BIN", env!("CARGO_BIN_EXE_evictd"))
            .env("EVICTD_TEST_POSTGRES_URL", &db.url)
            .env("EVICTD_TEST_REDIS_URL", stack().redis.url())
            .env("EVICTD_TEST_REDIS_CLUSTER_URL", &cluster_url)
            .env("EVICTD_TEST_PREFIX", &db.prefix)
            .output()
            .expect("run pytest")
    })
    .await
    .expect("the pytest thread");
    assert!(
        suite.status.success(),
        "the Python package's tests failed:\n{}{}",
        stdout(&suite),
        stderr(&suite)
    );
    assert!(stdout(&suite).contains(" passed"), "{}", stdout(&suite));
    drop(cluster);
}
