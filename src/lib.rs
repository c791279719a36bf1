//! evictd keeps caches exact by following the database's change log.
//!
//! It tails Postgres logical replication (pgoutput), maps every committed row
//! change to cache keys and tags through declarative mapping files, and
//! deletes or write-through refreshes those entries in Redis.
//!
//! The major components, one line each (ARCHITECTURE.md has the full map):
//!
//! - [`config`]: `evictd.toml` layered with `EVICTD_*` variables; every
//!   problem reported at once; secrets redacted.
//! - [`change`]: the source-agnostic model, [`change::RowChange`] and
//!   [`change::Txn`] with its checkpoint.
//! - [`mapping`]: mapping files -> compiled, immutable rules -> pure
//!   evaluation of one change into cache actions.
//! - [`plan`]: pure batching of actions into ordered, deduplicated commands.
//! - [`catalog`]: the live checks of mappings against a database's catalog.
//! - `testkit` (feature `testkit`): throwaway Postgres and Redis for
//!   integration tests.

pub mod admin;
pub mod apply;
pub mod catalog;
pub mod change;
pub mod config;
pub mod continuity;
#[cfg(feature = "testkit")]
pub mod demo;
pub mod error;
pub mod lag;
pub mod lifecycle;
pub mod mapping;
pub mod pipeline;
pub mod plan;
pub mod source;
pub mod telemetry;
#[cfg(feature = "testkit")]
pub mod testkit;
