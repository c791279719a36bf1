//! The integration tests, in one binary (one link instead of one per
//! file): each module is one area, with real Postgres, Redis and a
//! Kafka-compatible broker started by the testkit. `support` shares one
//! server pair for the whole run and gives each test its own database and
//! key prefix.

mod support;

mod admin;
mod audit;
mod auth;
mod big;
mod check_live;
mod cli;
mod client;
mod cluster;
mod config;
mod console;
mod continuity;
mod crash;
mod decoder_fuzz;
mod deploy;
mod docs;
mod failover;
mod harness;
mod kafka;
mod least_privilege;
mod map_plan;
mod mapping_errors;
mod operator;
mod purge;
mod python;
mod reconnect;
mod redis_outage;
mod redis_tls;
mod reload;
mod report;
mod silence;
mod testkit_example;
mod tls;
mod trace;
mod types;
mod wal;
mod warm;
