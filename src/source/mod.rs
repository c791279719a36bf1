//! Sources of committed row changes. `postgres` reads logical replication
//! (pgoutput) directly.

pub mod postgres;
