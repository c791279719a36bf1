//! Sources of committed row changes. `postgres` reads logical replication
//! (pgoutput) directly; `kafka` reads Debezium change topics.

pub mod kafka;
pub mod postgres;
