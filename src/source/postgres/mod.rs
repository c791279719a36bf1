//! The Postgres source: a logical replication slot read with pgoutput.
//!
//! - [`conn`]: the replication connection (wire protocol, auth, CopyBoth).
//! - [`pgoutput`]: the pure message decoder.
//! - [`changes`]: messages -> row changes and transaction boundaries.
//! - [`control`]: the control plane (publication, slot, positions,
//!   retained WAL) for `run`, `init`, `status`, `replay` and the testkit.
//! - [`slot`]: the START_REPLICATION command.
//! - [`replication`]: one replication session (read, decode, batch, ack).
//! - [`schema`]: the live catalog checks under a running source, and a
//!   reload's step against the database.
//! - [`supervisor`]: sessions one after another, reconnects, standby,
//!   continuity, retained WAL.
//! - [`tls`]: TLS with libpq's `sslmode` semantics.
//! - [`topology`]: the server's role (primary or hot standby) and what
//!   keeps the slot through a failover.

pub mod changes;
pub mod conn;
pub mod control;
pub mod pgoutput;
pub mod replication;
pub mod schema;
pub mod slot;
pub mod supervisor;
pub mod tls;
pub mod topology;

pub use self::supervisor::start;
