//! The reliability suite: the binaries as deployed, under kills, outages,
//! broker faults, rebalance storms, poison and hostile input, each run
//! judged by `shopstream-check` (the checker crate): nothing lost, nothing
//! visible twice, order statuses in order, read models equal to a
//! recomputation, dead letters complete; and what such a run sends
//! ClickHouse replayed on a current ClickHouse. `RELIABILITY_SOAK=N` runs every
//! scenario N times longer and harder (README, "Reliability").

// Each scenario prints its figures (events, kills, faults, the report).
#![allow(clippy::print_stdout)]

/// A scenario run on each broker, as `$name::on_the_mock_cluster` and
/// `$name::on_a_real_broker` (tansu in scripts/test): `$scenario` with
/// `$broker` bound to the one in hand.
macro_rules! on_both_brokers {
    ($(#[$doc:meta])* $name:ident: |$broker:ident| $scenario:expr) => {
        $(#[$doc])*
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn on_the_mock_cluster() {
                let $broker = shopstream_tests::Broker::Mock;
                $scenario.await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn on_a_real_broker() {
                let $broker = shopstream_tests::Broker::Real;
                $scenario.await;
            }
        }
    };
}

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
