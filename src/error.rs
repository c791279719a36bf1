//! The one runtime error type, and the one place that decides whether a
//! failure is worth retrying.

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
    /// Redis could not be reached, or a command failed.
    Redis,
    /// The process is shutting down.
    Shutdown,
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

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether trying again later (reconnecting, resending) can succeed.
    /// This is the single place that decides retry versus stop.
    pub fn is_transient(&self) -> bool {
        match self.kind {
            ErrorKind::PostgresConnection | ErrorKind::Redis | ErrorKind::SlotInUse => true,
            ErrorKind::PostgresServer { transient } => transient,
            ErrorKind::Config | ErrorKind::Protocol | ErrorKind::Shutdown => false,
        }
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

/// Whether a Postgres SQLSTATE names a condition that may pass: connection
/// exceptions (08), insufficient resources (53) and operator intervention
/// (57, e.g. admin shutdown). "Object in use" (55006) is [`ErrorKind::SlotInUse`].
pub fn sqlstate_is_transient(code: &str) -> bool {
    code.starts_with("08") || code.starts_with("53") || code.starts_with("57")
}
