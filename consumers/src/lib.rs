//! shopstream-worker: the consumer-group runtime (batch, retry with backoff,
//! retry tiers, dead-letter, commit, rebalance, drain) and the handlers it runs.

pub mod builtin;
pub mod continuity;
pub mod dlq;
pub mod fetched;
pub mod forward;
pub mod handler;
pub mod metrics;
pub mod projection;
pub mod readback;
pub mod routes;
pub mod runtime;
pub mod worker;
