//! The Kafka source: Debezium change topics, read by a consumer group.
//!
//! - [`debezium`]: the pure envelope decoder (both JSON shapes).
//! - [`values`]: Debezium's value encodings as pgoutput's canonical text.
//! - [`consumer`]: the librdkafka consumer on its own thread: records in,
//!   applied offsets back, rebalances drained before partitions are
//!   released.
//! - [`session`]: the task between the consumer and the shared batcher and
//!   apply stage; applied offsets back to the consumer.

pub mod consumer;
pub mod debezium;
pub mod session;
pub mod values;

pub use self::session::start;
