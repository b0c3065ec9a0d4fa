//! The library every shopstream binary uses: the events and their wire
//! formats, the topic catalog, configuration, Kafka clients, telemetry and
//! shutdown. Nothing here is specific to one binary.

pub mod admin;
mod avro_datum;
pub mod catalog;
pub mod codec;
pub mod config;
pub mod events;
pub mod headers;
mod json_datum;
pub mod json_object;
pub mod kafka;
pub mod metrics;
pub mod ops;
pub mod provision;
pub mod schema;
pub mod shutdown;
pub mod sql;
pub mod telemetry;
pub mod topic_config;
pub mod yaml;
