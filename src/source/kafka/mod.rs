//! The Kafka source: Debezium change topics, read by a consumer group.
//!
//! - [`debezium`]: the pure envelope decoder (both JSON shapes).
//! - [`values`]: Debezium's value encodings as pgoutput's canonical text.
//! - [`consumer`]: the librdkafka consumer on its own thread: records in,
//!   applied offsets back, rebalances drained before partitions are
//!   released.

pub mod consumer;
pub mod debezium;
pub mod values;
