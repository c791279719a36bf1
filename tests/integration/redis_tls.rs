//! `rediss://` with a private CA and a client certificate (mutual TLS),
//! against a throwaway redis-server that requires client certificates.

use std::path::Path;

use crate::support::{mapping_dir, streaming_config, TestDb};
use evictd::config::SecretUrl;
use evictd::testkit::{Evictd, Redis};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// Writes ca.pem, server.pem/server.key and client.pem/client.key.
fn pki(dir: &Path) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "evictd redis test CA");
    let ca_key = KeyPair::generate().unwrap();
    std::fs::write(
        dir.join("ca.pem"),
        ca_params.self_signed(&ca_key).unwrap().pem(),
    )
    .unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    for (name, names) in [
        (
            "server",
            vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
        ),
        ("client", vec!["evictd".to_owned()]),
    ] {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evictd_applies_over_mutual_tls() {
    let certs = tempfile::tempdir().unwrap();
    pki(certs.path());
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let file = |name: &str| certs.path().join(name).display().to_string();
    let redis = Redis::start_with(&[
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &file("server.pem"),
        "--tls-key-file",
        &file("server.key"),
        "--tls-ca-cert-file",
        &file("ca.pem"),
        "--tls-auth-clients",
        "yes",
    ])
    .expect("a TLS redis-server");

    let db = TestDb::new().await;
    db.execute(
        "create table orders (id bigint primary key); create publication evictd for table orders",
    )
    .await;
    let dir = mapping_dir(&[(
        "orders.toml",
        "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\n",
    )]);
    let mut config = streaming_config(&db, dir.path());
    config.redis.url = SecretUrl::parse(&format!("rediss://127.0.0.1:{tls_port}")).unwrap();
    config.redis.ca_file = Some(certs.path().join("ca.pem"));
    config.redis.cert_file = Some(certs.path().join("client.pem"));
    config.redis.key_file = Some(certs.path().join("client.key"));

    // The plain port of the same server, to seed and to look.
    let mut plain = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = format!("{}order:1", db.prefix);
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("cached")
        .query_async(&mut plain)
        .await
        .unwrap();

    let evictd = Evictd::start(&config).await.expect("evictd over TLS");
    db.execute("insert into orders values (1)").await;
    evictd.sync().await.expect("applied over TLS");
    let exists: bool = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut plain)
        .await
        .unwrap();
    assert!(!exists);
    evictd.stop().await.unwrap();

    // Without a client certificate the server refuses the connection.
    let mut no_cert = config.redis.clone();
    no_cert.cert_file = None;
    no_cert.key_file = None;
    let client = evictd::internal::redis_client(&no_cert).unwrap();
    let refused = async {
        let mut connection = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
    };
    assert!(refused.await.is_err(), "mutual TLS is enforced");
}
