//! The Postgres source: a logical replication slot read with pgoutput.
//!
//! - [`conn`]: the replication connection (wire protocol, auth, CopyBoth).
//! - [`pgoutput`]: the pure message decoder.
//! - [`changes`]: messages -> row changes and transaction boundaries.
//! - [`slot`]: creating and inspecting the slot and publication.
//! - [`tls`]: TLS with libpq's `sslmode` semantics.

pub mod changes;
pub mod conn;
pub mod pgoutput;
pub mod slot;
pub mod tls;
