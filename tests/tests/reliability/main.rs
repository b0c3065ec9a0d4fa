//! The reliability suite: the binaries as deployed, under kills, outages,
//! broker faults, rebalance storms, poison and hostile input, each run
//! judged by `shopstream-check` (the checker crate): nothing lost, nothing
//! visible twice, order statuses in order, read models equal to a
//! recomputation, dead letters complete; and what such a run sends
//! ClickHouse replayed on a current ClickHouse. `RELIABILITY_SOAK=N` runs every
//! scenario N times longer and harder (README, "Reliability").

// Each scenario prints its figures (events, kills, faults, the report).
#![allow(clippy::print_stdout)]

#[macro_use]
extern crate shopstream_tests;

mod system;

mod broker_faults;
mod clickhouse_faults;
mod delivery;
mod fencing;
mod happy;
mod hostile;
mod kills;
mod poison;
mod versions;

pub use system::{partitions, soak, Run, Service, System};
