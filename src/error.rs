//! The one runtime error type, and the one place that decides what to do
//! about a failure ([`Error::policy`]: retry, wait for the operator, or
//! stop), for the sources, Redis and the purge targets alike.

use std::fmt;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What failed, at the level that decides what to do about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Configuration or mappings are invalid: fix them, do not retry.
    Config,
    /// Postgres could not be reached or the connection broke.
    PostgresConnection,
    /// Postgres answered with an error (SQLSTATE in the message).
    PostgresServer { transient: bool },
    /// The replication slot is streaming to another process (SQLSTATE
    /// 55006): this process is a standby until it is free.
    SlotInUse,
    /// Postgres sent something the protocol does not allow.
    Protocol,
    /// Redis could not be reached, or a command failed; retried.
    Redis,
    /// Redis refused evictd's credentials or permissions (WRONGPASS,
    /// NOAUTH, NOPERM): waiting does not fix it.
    RedisDenied,
    /// The Kafka client failed (`transient`: a timeout or a broker that is
    /// down; otherwise authentication, authorization or a fatal consumer
    /// error).
    Kafka { transient: bool },
    /// A CDN purge target answered with this HTTP status (`None`: no
    /// answer at all: a refused connection, a timeout).
    Purge { status: Option<u16> },
    /// A purge request could not be made, or was refused outside HTTP's
    /// status: a credential file that cannot be read, a URL that does not
    /// parse, Cloudflare's `success: false`.
    PurgeRefused,
    /// The process is shutting down.
    Shutdown,
}

/// What to do about a failure: the one table is [`Error::policy`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Try again with backoff: it may pass by itself.
    Retry,
    /// Keep trying, but it will not pass until someone changes something:
    /// `/readyz` fails with the reason and a hint, the log says so at
    /// ERROR, and nothing after it is acknowledged meanwhile.
    WaitForOperator,
    /// Stop the pipeline: the process exits with status 1 and an ERROR
    /// line.
    Stop,
}

/// A runtime failure with its kind and cause.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<BoxError>,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    pub fn with_source(
        kind: ErrorKind,
        message: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Error {
        Error {
            kind,
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// A failed Postgres connection or query, classified by its cause: a
    /// server error by its SQLSTATE ([`postgres_kind`]), anything else (the
    /// connection refused, broken or closed) as a connection error.
    pub fn postgres(message: impl Into<String>, error: tokio_postgres::Error) -> Error {
        let (kind, message) = described(message.into(), &error);
        Error::with_source(kind, message, error)
    }

    /// A catalog connection or query that failed, classified like
    /// [`Error::postgres`]; bad TLS settings are a config error.
    pub fn catalog(message: impl Into<String>, error: crate::catalog::CatalogError) -> Error {
        use crate::catalog::CatalogError;
        let (kind, message) = match &error {
            CatalogError::Connect { source, .. } | CatalogError::Query(source) => {
                described(message.into(), source)
            }
            CatalogError::Tls(_) => (ErrorKind::Config, message.into()),
        };
        Error::with_source(kind, message, error)
    }

    /// A failed Redis command or connection, classified by its cause
    /// ([`redis_kind`]).
    pub fn redis(message: impl Into<String>, error: redis::RedisError) -> Error {
        let kind = redis_kind(error.kind(), error.code());
        Error::with_source(kind, message, error)
    }

    /// A failed Kafka client call, classified by its cause ([`kafka_kind`]).
    #[cfg(feature = "kafka")]
    pub fn kafka(message: impl Into<String>, error: rdkafka::error::KafkaError) -> Error {
        let kind = match &error {
            rdkafka::error::KafkaError::ClientCreation(_) => ErrorKind::Config,
            rdkafka::error::KafkaError::MessageConsumptionFatal(_) => {
                ErrorKind::Kafka { transient: false }
            }
            other => kafka_kind(other.rdkafka_error_code()),
        };
        Error::with_source(kind, message, error)
    }

    /// The underlying cause's text, or empty: logged beside the error.
    pub fn cause(&self) -> String {
        std::error::Error::source(self)
            .map(ToString::to_string)
            .unwrap_or_default()
    }

    /// The error and its cause on one line: what readiness and the logs
    /// give as the reason.
    pub fn reason(&self) -> String {
        format!("{self} {}", self.cause()).trim_end().to_owned()
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The way out, where one error has a known one: a publication that
    /// does not exist at the slot's position (dropped, perhaps created
    /// again: the slot still decodes from before it existed, so every
    /// start fails the same way).
    pub fn help(&self) -> Option<&'static str> {
        match self.kind {
            ErrorKind::Purge {
                status: Some(401 | 403),
            } => Some(PURGE_CREDENTIALS_HELP),
            ErrorKind::Purge {
                status: Some(404 | 410),
            } => Some(PURGE_ADDRESS_HELP),
            ErrorKind::Purge { .. } | ErrorKind::PurgeRefused
                if self.policy() == Policy::WaitForOperator =>
            {
                Some(PURGE_REFUSED_HELP)
            }
            _ => {
                let text = self.reason();
                (text.contains("42704") && text.contains("publication")).then_some(
                    "if the publication was dropped (and created again), the slot decodes from before it existed and every start fails like this: create it if it is missing, then run `evictd init --reset-slot --config <file>`, which re-creates the slot and invalidates every mapped table coarsely (the changes in between cannot be read); see docs/OPERATIONS.md, \"When something goes wrong\"",
                )
            }
        }
    }

    /// What to do about this failure: retry, wait for the operator, or
    /// stop. This is the single place that decides it, for every source,
    /// Redis and every purge target.
    pub fn policy(&self) -> Policy {
        match self.kind {
            ErrorKind::PostgresConnection | ErrorKind::Redis | ErrorKind::SlotInUse => {
                Policy::Retry
            }
            ErrorKind::PostgresServer { transient } | ErrorKind::Kafka { transient } => {
                if transient {
                    Policy::Retry
                } else {
                    Policy::Stop
                }
            }
            ErrorKind::Purge { status } => purge_policy(status),
            ErrorKind::PurgeRefused => Policy::WaitForOperator,
            ErrorKind::Config
            | ErrorKind::Protocol
            | ErrorKind::RedisDenied
            | ErrorKind::Shutdown => Policy::Stop,
        }
    }

    /// Whether trying again later (reconnecting, resending) can succeed
    /// without anyone's help ([`Policy::Retry`]).
    pub fn is_transient(&self) -> bool {
        self.policy() == Policy::Retry
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn std::error::Error + 'static))
    }
}

const PURGE_CREDENTIALS_HELP: &str = "the target refuses evictd's credentials: check its token_file (secret_file for a webhook) and the token's rights; the file is read again at every attempt, so fixing it is enough";
const PURGE_ADDRESS_HELP: &str = "the target does not know the address: check its url and service_id (Fastly) or zone_id (Cloudflare), then restart evictd; the batches waiting are in Redis already and are purged again after the restart, as nothing is acknowledged before they are";
const PURGE_REFUSED_HELP: &str = "the target refuses the request as evictd sends it: check the target's [[purge]] section (kind, url, ids, credentials); evictd keeps retrying, and acknowledges nothing after this batch until the target accepts it";

/// What to do when a purge target answers with `status` (`None`: no
/// answer): a timeout, a connection that failed, 408, 425, 429 and 5xx may
/// pass by themselves; any other answer (401, 403, 404, 400, a redirect)
/// will not until someone changes the target's configuration.
pub fn purge_policy(status: Option<u16>) -> Policy {
    match status {
        None | Some(408 | 425 | 429) => Policy::Retry,
        Some(status) if status >= 500 => Policy::Retry,
        Some(_) => Policy::WaitForOperator,
    }
}

/// The kind of a tokio-postgres failure, and `message` with the server's
/// error in it as the replication connection words one
/// (`postgres ERROR 42501: permission denied ...`).
fn described(message: String, error: &tokio_postgres::Error) -> (ErrorKind, String) {
    match error.as_db_error() {
        Some(db) => (
            postgres_kind(Some(db.code().code())),
            format!(
                "{message}: postgres {} {}: {}",
                db.severity(),
                db.code().code(),
                db.message()
            ),
        ),
        None => (postgres_kind(None), message),
    }
}

/// The kind of a Postgres failure with this SQLSTATE (`None`: no server
/// answer at all, the connection failed).
pub fn postgres_kind(sqlstate: Option<&str>) -> ErrorKind {
    match sqlstate {
        None => ErrorKind::PostgresConnection,
        Some("55006") => ErrorKind::SlotInUse,
        Some(code) => ErrorKind::PostgresServer {
            transient: sqlstate_is_transient(code),
        },
    }
}

/// Whether a Postgres SQLSTATE names a condition that may pass: connection
/// exceptions (08), transaction rollbacks such as deadlocks (40),
/// insufficient resources (53), a lock not available (55P03) and operator
/// intervention (57, e.g. admin shutdown, the server starting). Everything
/// else (permissions 42501, authentication 28, a missing object 42704 or
/// 3D000, ...) does not pass by waiting: the pipeline stops and says so.
/// "Object in use" (55006) is [`ErrorKind::SlotInUse`].
pub fn sqlstate_is_transient(code: &str) -> bool {
    ["08", "40", "53", "57"]
        .iter()
        .any(|class| code.starts_with(class))
        || code == "55P03"
}

/// The kind of a Redis failure: refused credentials or permissions stop
/// the pipeline; everything else (the server down, loading, read-only after
/// a failover, out of memory, a cluster resharding, a timeout) is retried.
pub fn redis_kind(kind: redis::ErrorKind, code: Option<&str>) -> ErrorKind {
    use redis::{ErrorKind as K, ServerErrorKind as S};
    let denied = matches!(
        kind,
        K::AuthenticationFailed | K::InvalidClientConfig | K::Server(S::NoPerm)
    ) || matches!(code, Some("WRONGPASS" | "NOAUTH" | "NOPERM"));
    if denied {
        ErrorKind::RedisDenied
    } else {
        ErrorKind::Redis
    }
}

/// The kind of a Kafka failure by librdkafka's error code: authentication
/// and authorization failures, an unknown topic and a fatal client error
/// stop the pipeline; timeouts, transport failures and anything else
/// librdkafka reports are retried.
#[cfg(feature = "kafka")]
pub fn kafka_kind(code: Option<rdkafka::types::RDKafkaErrorCode>) -> ErrorKind {
    use rdkafka::types::RDKafkaErrorCode as C;
    let fatal = matches!(
        code,
        Some(
            C::Authentication
                | C::SaslAuthenticationFailed
                | C::TopicAuthorizationFailed
                | C::GroupAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::UnknownTopicOrPartition
                | C::Fatal
        )
    );
    ErrorKind::Kafka { transient: !fatal }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_failures_are_classified_by_sqlstate() {
        let cases = [
            (None, true, "no answer: connection refused or broken"),
            (Some("08006"), true, "connection failure"),
            (Some("40P01"), true, "deadlock"),
            (Some("53300"), true, "too many connections"),
            (Some("55P03"), true, "lock not available"),
            (Some("57P01"), true, "admin shutdown"),
            (Some("57P03"), true, "the server is starting"),
            (Some("55006"), true, "the slot is in use: stand by"),
            (Some("42501"), false, "permission denied"),
            (Some("28P01"), false, "wrong password"),
            (Some("42704"), false, "publication does not exist"),
            (Some("3D000"), false, "database does not exist"),
            (Some("42P01"), false, "table does not exist"),
            (Some("XX000"), false, "internal error"),
        ];
        for (sqlstate, transient, what) in cases {
            let error = Error::new(postgres_kind(sqlstate), what);
            assert_eq!(error.is_transient(), transient, "{sqlstate:?}: {what}");
        }
        assert_eq!(postgres_kind(Some("55006")), ErrorKind::SlotInUse);
        assert_eq!(postgres_kind(None), ErrorKind::PostgresConnection);
    }

    #[test]
    fn purge_failures_are_classified_by_status() {
        let cases = [
            (None, Policy::Retry, "no answer: refused, timed out"),
            (Some(408), Policy::Retry, "request timeout"),
            (Some(425), Policy::Retry, "too early"),
            (Some(429), Policy::Retry, "rate limited (Retry-After)"),
            (Some(500), Policy::Retry, "internal error"),
            (Some(502), Policy::Retry, "bad gateway"),
            (Some(503), Policy::Retry, "unavailable"),
            (
                Some(400),
                Policy::WaitForOperator,
                "a request it cannot take",
            ),
            (Some(401), Policy::WaitForOperator, "a wrong token"),
            (
                Some(403),
                Policy::WaitForOperator,
                "a token without the right",
            ),
            (
                Some(404),
                Policy::WaitForOperator,
                "a wrong service or zone id",
            ),
            (
                Some(301),
                Policy::WaitForOperator,
                "a redirect: a wrong url",
            ),
        ];
        for (status, policy, what) in cases {
            let error = Error::new(ErrorKind::Purge { status }, what);
            assert_eq!(error.policy(), policy, "{status:?}: {what}");
            assert_eq!(
                error.help().is_some(),
                policy == Policy::WaitForOperator,
                "{status:?}: {what}"
            );
        }
        let refused = Error::new(ErrorKind::PurgeRefused, "no credential configured");
        assert_eq!(refused.policy(), Policy::WaitForOperator);
        assert_eq!(refused.help(), Some(PURGE_REFUSED_HELP));
        assert_eq!(
            Error::new(ErrorKind::Purge { status: Some(401) }, "x").help(),
            Some(PURGE_CREDENTIALS_HELP)
        );
        assert_eq!(Error::new(ErrorKind::Config, "x").policy(), Policy::Stop);
        assert_eq!(
            Error::new(ErrorKind::RedisDenied, "x").policy(),
            Policy::Stop
        );
    }

    #[test]
    fn redis_failures_are_classified_by_kind_and_code() {
        use redis::{ErrorKind as K, ServerErrorKind as S};
        let cases = [
            (
                K::Io,
                None,
                true,
                "the server is down or the connection broke",
            ),
            (K::Server(S::BusyLoading), None, true, "loading its dataset"),
            (
                K::Server(S::ReadOnly),
                None,
                true,
                "a replica after a failover",
            ),
            (K::Server(S::ClusterDown), None, true, "the cluster is down"),
            (K::Server(S::TryAgain), None, true, "resharding"),
            (K::Extension, Some("OOM"), true, "out of memory"),
            (
                K::Server(S::ResponseError),
                Some("ERR"),
                true,
                "max clients",
            ),
            (K::AuthenticationFailed, None, false, "wrong password"),
            (K::Extension, Some("WRONGPASS"), false, "wrong password"),
            (
                K::Extension,
                Some("NOAUTH"),
                false,
                "a password is required",
            ),
            (
                K::Server(S::NoPerm),
                None,
                false,
                "the ACL user lacks a command",
            ),
            (K::InvalidClientConfig, None, false, "a bad URL"),
        ];
        for (kind, code, transient, what) in cases {
            let error = Error::new(redis_kind(kind, code), what);
            assert_eq!(error.is_transient(), transient, "{kind:?} {code:?}: {what}");
        }
    }

    #[test]
    #[cfg(feature = "kafka")]
    fn kafka_failures_are_classified_by_code() {
        use rdkafka::types::RDKafkaErrorCode as C;
        let cases = [
            (None, true, "no code"),
            (Some(C::OperationTimedOut), true, "a timeout"),
            (Some(C::RequestTimedOut), true, "a broker timeout"),
            (Some(C::AllBrokersDown), true, "every broker down"),
            (Some(C::BrokerTransportFailure), true, "a broken connection"),
            (Some(C::Authentication), false, "bad credentials"),
            (
                Some(C::SaslAuthenticationFailed),
                false,
                "bad SASL credentials",
            ),
            (
                Some(C::TopicAuthorizationFailed),
                false,
                "no right to the topic",
            ),
            (
                Some(C::GroupAuthorizationFailed),
                false,
                "no right to the group",
            ),
            (Some(C::UnknownTopicOrPartition), false, "no such topic"),
            (Some(C::Fatal), false, "a fatal client error"),
        ];
        for (code, transient, what) in cases {
            let error = Error::new(kafka_kind(code), what);
            assert_eq!(error.is_transient(), transient, "{code:?}: {what}");
        }
        let creation = rdkafka::error::KafkaError::ClientCreation("bad".into());
        assert_eq!(Error::kafka("x", creation).kind(), ErrorKind::Config);
    }
}
