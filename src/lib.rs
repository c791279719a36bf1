//! evictd keeps caches exact by following the database's change log.
//!
//! It tails Postgres logical replication (pgoutput) or Debezium change
//! topics in Kafka, maps every committed row change to cache keys and tags
//! through declarative mapping files, and deletes or write-through refreshes
//! those entries in Redis.
//!
//! The library API (ARCHITECTURE.md has the full map):
//!
//! - [`config`]: `evictd.toml` layered with `EVICTD_*` variables; every
//!   problem reported at once; secrets redacted.
//! - [`change`]: the source-neutral model: [`change::RowChange`], and the
//!   [`change::Event`]s every source yields with their
//!   [`change::Checkpoint`].
//! - [`mapping`]: mapping files -> compiled, immutable rules -> pure
//!   evaluation of one change into cache actions (for tools).
//! - [`plan`]: pure batching of actions into ordered, deduplicated commands.
//! - [`pipeline`]: [`pipeline::start`] runs the whole pipeline in-process.
//! - [`error`]: the runtime error and its retry-or-stop classification.
//! - `testkit` (feature `testkit`): throwaway Postgres, Redis and Kafka, and
//!   evictd in-process with `sync()`, for integration tests.
//!
//! Everything else is private; [`internal`] re-exports what the `evictd`
//! binary, the benches and the integration tests use, with no stability
//! promise.

pub mod change;
pub mod config;
pub mod error;
pub mod lag;
pub mod mapping;
pub mod pipeline;
pub mod plan;
pub mod service;
#[cfg(feature = "testkit")]
pub mod testkit;

mod admin;
mod apply;
mod audit;
mod catalog;
mod console;
mod continuity;
mod demo;
mod explain;
mod operator;
mod purge;
mod report;
mod rows;
mod servers;
mod source;
mod sql;
mod telemetry;
mod trace;
mod warm;
mod watch;
// Without the feature, only the demo's throwaway servers are used.
#[cfg(not(feature = "testkit"))]
#[allow(dead_code, unused_imports)]
mod testkit;

/// What the `evictd` binary, the benches and the integration tests reach
/// beyond the library API. Not a stable interface.
#[doc(hidden)]
pub mod internal {
    pub use crate::admin::{serve, AdminState, RedisProbe};
    pub use crate::apply::broadcast::Broadcast;
    pub use crate::apply::cluster::key_slot;
    pub use crate::apply::RedisSink;
    pub use crate::servers::redis_client;
    #[cfg(feature = "kafka")]
    pub use crate::source::kafka::consumer::{consumer_config, group_status, topic_coverage};
    pub use crate::source::postgres::conn::ReplicationConnection;
    pub use crate::source::postgres::control::Control;
    pub use crate::source::postgres::pgoutput;
    pub use crate::source::postgres::topology::Topology;

    pub mod audit {
        pub use crate::audit::{sweep, table_text, FillSweep, Finding, Sweep, SweepLine};
    }
    pub mod catalog {
        pub use crate::catalog::{
            check, column_categories, connect, replication_privilege, slot_limit_warnings,
        };
    }
    pub mod continuity {
        pub use crate::continuity::{Recorder, Store};
    }
    pub mod demo {
        pub use crate::demo::{run, DemoError};
    }
    pub mod explain {
        pub use crate::explain::{explain, row_from_json, ColumnTypes, Explained, Line};
    }
    pub mod operator {
        pub use crate::operator::{
            init, init_plan, kafka_status, reset_slot, status, ReplayProgress,
        };
    }
    pub mod telemetry {
        pub use crate::telemetry::{recorder, upkeep, LogSink};
    }
    pub mod report {
        pub use crate::report::{html, markdown, parse_window, report, Report};
    }
    pub mod trace {
        pub use crate::trace::{text, trace, Trace};
    }
    pub mod warm {
        pub use crate::apply::sink::APPLY_MARK_KEY;
        pub use crate::warm::{warm, Summary, WarmOptions, PAGE};
    }
    pub mod watch {
        pub use crate::watch::{line, watch, Filter};
    }
}
