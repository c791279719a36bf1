//! TLS to Postgres with libpq's sslmode semantics, against a throwaway
//! server with a certificate from a throwaway CA.

use std::sync::OnceLock;

use crate::support::{mapping_dir, redis_connection, stack};
use evictd::config::SecretUrl;
use evictd::internal::ReplicationConnection;
use evictd::testkit::{Evictd, Postgres};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

struct Pki {
    ca_pem: String,
    other_ca_pem: String,
    dir: tempfile::TempDir,
}

fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let pem = params.self_signed(&key).unwrap().pem();
    (params, key, pem)
}

/// One TLS server for the binary: a CA, a server certificate for
/// `localhost` and 127.0.0.1 signed by it, and an unrelated second CA.
fn server() -> &'static (Postgres, Pki) {
    static SERVER: OnceLock<(Postgres, Pki)> = OnceLock::new();
    SERVER.get_or_init(|| {
        let (ca_params, ca_key, ca_pem) = ca("evictd test CA");
        let (_, _, other_ca_pem) = ca("some other CA");
        let issuer = Issuer::new(ca_params, ca_key);
        let params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let postgres = Postgres::start_with_tls(&cert.pem(), &key.serialize_pem())
            .expect("start a TLS postgres");
        let dir = tempfile::tempdir().unwrap();
        // Held in a static, whose destructor never runs: the reaper removes
        // the directory when the test process ends.
        evictd::testkit::reaper::reap_dir(dir.path());
        std::fs::write(dir.path().join("ca.pem"), &ca_pem).unwrap();
        std::fs::write(dir.path().join("other.pem"), &other_ca_pem).unwrap();
        (
            postgres,
            Pki {
                ca_pem,
                other_ca_pem,
                dir,
            },
        )
    })
}

fn url(host: &str, query: &str) -> String {
    let (postgres, _) = server();
    format!(
        "postgres://postgres@{host}:{}/postgres?{query}",
        postgres.port()
    )
}

fn ca_file(name: &str) -> String {
    server().1.dir.path().join(name).display().to_string()
}

async fn connect(url: &str) -> Result<ReplicationConnection, String> {
    ReplicationConnection::connect(url).await.map_err(|e| {
        let cause = std::error::Error::source(&e)
            .map(ToString::to_string)
            .unwrap_or_default();
        format!("{e}: {cause}")
    })
}

#[tokio::test]
async fn verify_full_accepts_the_right_ca_and_name() {
    let ca = ca_file("ca.pem");
    for host in ["localhost", "127.0.0.1"] {
        let url = url(host, &format!("sslmode=verify-full&sslrootcert={ca}"));
        connect(&url)
            .await
            .unwrap_or_else(|e| panic!("{host}: {e}"));
    }
}

#[tokio::test]
async fn verify_full_rejects_another_ca() {
    let url = url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", ca_file("other.pem")),
    );
    let error = connect(&url)
        .await
        .err()
        .expect("an untrusted certificate is refused");
    assert!(
        error.contains("TLS handshake with Postgres at localhost failed"),
        "{error}"
    );
    assert!(error.contains("UnknownIssuer"), "{error}");
}

#[tokio::test]
async fn verify_ca_does_not_check_the_name_but_verify_full_does() {
    // The server also listens on 127.0.0.2, which its certificate does not
    // name.
    let ca = ca_file("ca.pem");
    let verify_ca = url("127.0.0.2", &format!("sslmode=verify-ca&sslrootcert={ca}"));
    let verify_full = url(
        "127.0.0.2",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    connect(&verify_ca)
        .await
        .expect("verify-ca ignores the name");
    let error = connect(&verify_full)
        .await
        .err()
        .expect("verify-full checks the name");
    assert!(
        error.contains("certificate not valid for name \"127.0.0.2\""),
        "{error}"
    );
}

#[tokio::test]
async fn require_encrypts_without_a_ca_and_fails_without_tls() {
    connect(&url("localhost", "sslmode=require"))
        .await
        .expect("require without CA");
    let plain = stack().postgres.url("postgres");
    let error = connect(&format!("{plain}?sslmode=require"))
        .await
        .err()
        .expect("plain server");
    assert!(
        error.contains("does not accept TLS, and sslmode requires it"),
        "{error}"
    );
    connect(&format!("{plain}?sslmode=prefer"))
        .await
        .expect("prefer falls back to plain");
}

#[tokio::test]
async fn evictd_streams_over_verify_full() {
    crate::support::init_logging();
    let ca = ca_file("ca.pem");
    let (postgres, pki) = server();
    assert!(pki.ca_pem.contains("BEGIN CERTIFICATE") && pki.other_ca_pem != pki.ca_pem);
    let database = postgres.create_database().await.unwrap();
    let base = format!(
        "postgres://postgres@localhost:{}/{database}",
        postgres.port()
    );
    let url = format!("{base}?sslmode=verify-full&sslrootcert={ca}");
    let client = evictd::internal::catalog::connect(&SecretUrl::parse(&url).unwrap())
        .await
        .unwrap();
    client
        .batch_execute("create table orders (id bigint primary key); create publication evictd for table orders")
        .await
        .unwrap();
    let dir = mapping_dir(&[(
        "orders.toml",
        "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\n",
    )]);
    let mut config = evictd::config::Config::with_defaults(
        SecretUrl::parse(&url).unwrap(),
        SecretUrl::parse(&stack().redis.url()).unwrap(),
        dir.path().to_path_buf(),
    );
    config.postgres.slot = format!("{database}_tls");
    config.redis.prefix = format!("{database}:");
    let mut redis = redis_connection().await;
    let key = format!("{database}:order:1");
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("cached")
        .query_async(&mut redis)
        .await
        .unwrap();
    let evictd = Evictd::start(&config).await.expect("evictd over TLS");
    client
        .batch_execute("insert into orders values (1)")
        .await
        .unwrap();
    evictd.sync().await.unwrap();
    let exists: bool = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(!exists);
    let encrypted: bool = client
        .query_one(
            "select bool_and(s.ssl) from pg_stat_ssl s join pg_stat_replication r using (pid) where r.application_name = 'evictd'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(encrypted, "the replication connection uses TLS");
    evictd.stop().await.unwrap();
}
