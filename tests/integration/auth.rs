//! Password authentication of the replication connection: SCRAM-SHA-256
//! and MD5, against the throwaway server with pg_hba.conf rules of our own.

use crate::support::stack;
use evictd::internal::ReplicationConnection;

/// Puts rules for two password roles in front of the trust rules and
/// creates the roles.
async fn password_roles() {
    static READY: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    READY
        .get_or_init(|| async {
            crate::support::prepend_hba_rules(
                "host all scram_user 127.0.0.1/32 scram-sha-256\n\
                 host replication scram_user 127.0.0.1/32 scram-sha-256\n\
                 host all md5_user 127.0.0.1/32 md5\n\
                 host replication md5_user 127.0.0.1/32 md5",
            )
            .await;
            let (client, connection) =
                tokio_postgres::connect(&stack().postgres.url("postgres"), tokio_postgres::NoTls)
                    .await
                    .expect("connect");
            tokio::spawn(connection);
            client
                .batch_execute(
                    "set password_encryption = 'scram-sha-256';
                     create role scram_user login replication password 's3cret';
                     set password_encryption = 'md5';
                     create role md5_user login replication password 'hunter2';",
                )
                .await
                .expect("create roles");
        })
        .await;
}

fn url(user: &str, password: &str) -> String {
    format!(
        "postgres://{user}:{password}@127.0.0.1:{}/postgres",
        stack().postgres.port()
    )
}

#[tokio::test]
async fn scram_sha_256() {
    password_roles().await;
    let mut conn = ReplicationConnection::connect(&url("scram_user", "s3cret"))
        .await
        .expect("SCRAM login");
    let rows = conn
        .simple_query("IDENTIFY_SYSTEM")
        .await
        .expect("IDENTIFY_SYSTEM");
    assert_eq!(rows.len(), 1);
    let error = ReplicationConnection::connect(&url("scram_user", "wrong"))
        .await
        .err()
        .expect("a wrong password fails");
    assert!(error.to_string().contains("28P01"), "{error}");
}

#[tokio::test]
async fn md5() {
    password_roles().await;
    ReplicationConnection::connect(&url("md5_user", "hunter2"))
        .await
        .expect("MD5 login");
    let error = ReplicationConnection::connect(&url("md5_user", "nope"))
        .await
        .err()
        .expect("a wrong password fails");
    assert!(
        error.to_string().contains("password authentication failed"),
        "{error}"
    );
}

#[tokio::test]
async fn a_missing_password_is_a_clear_error() {
    password_roles().await;
    let url = format!(
        "postgres://scram_user@127.0.0.1:{}/postgres",
        stack().postgres.port()
    );
    let error = ReplicationConnection::connect(&url)
        .await
        .err()
        .expect("no password");
    assert_eq!(
        error.to_string(),
        "the server asks for a password; put it in postgres.url"
    );
}
