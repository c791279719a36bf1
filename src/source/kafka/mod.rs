//! The Kafka source: Debezium change topics, read by a consumer group.
//!
//! - [`debezium`]: the pure envelope decoder (both JSON shapes).
//! - [`values`]: Debezium's value encodings as pgoutput's canonical text.
//! - [`consumer`]: the librdkafka consumer on its own thread: records in,
//!   applied offsets back, rebalances drained before partitions are
//!   released.
//! - [`session`]: the task between the consumer and the shared batcher and
//!   apply stage; applied offsets back to the consumer.
//!
//! The consumer and the session need the `kafka` feature (librdkafka);
//! the pure decoders are always built (the config's defaults use them).

// Without the `kafka` feature nothing reads the decoders.
#![cfg_attr(not(feature = "kafka"), allow(dead_code))]

#[cfg(feature = "kafka")]
pub mod consumer;
pub mod debezium;
#[cfg(feature = "kafka")]
pub mod session;
pub mod values;

#[cfg(feature = "kafka")]
pub use self::session::start;
