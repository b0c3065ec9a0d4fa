//! The reliability suite: the binaries as deployed, under kills, outages,
//! broker faults, rebalance storms, poison and hostile input, each run
//! judged by `shopstream-check` (the checker crate): nothing lost, nothing
//! visible twice, order statuses in order, read models equal to a
//! recomputation, dead letters complete. `RELIABILITY_SOAK=N` runs every
//! scenario N times longer and harder (README, "Reliability").

// Each scenario prints its figures (events, kills, faults, the report).
#![allow(clippy::print_stdout)]

mod system;

mod broker_faults;
mod clickhouse_faults;
mod delivery;
mod happy;
mod hostile;
mod kills;
mod poison;

pub use system::{partitions, soak, Run, Service, System};
