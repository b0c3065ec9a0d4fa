//! The worker's counters, rendered in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::handler::BusyPartitions;

/// Upper bounds of the handler latency histogram, in seconds.
const LATENCY_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

#[derive(Debug, Default)]
pub struct Metrics {
    pub consumed: AtomicU64,
    pub handled: AtomicU64,
    /// Fetches found missing records before the one they returned (each
    /// fetched again from the expected offset).
    pub fetch_gaps: AtomicU64,
    /// Partitions paused in librdkafka (retry backoff, a retry tier's
    /// record not due, draining; backpressure for a partition read from the
    /// consumer's queue).
    pub paused_partitions: AtomicUsize,
    /// Partitions whose in-flight bound is full now: their reader waits,
    /// and their records wait in librdkafka's queue for the partition.
    pub full_partitions: AtomicUsize,
    pub busy_partitions: BusyPartitions,
    /// ClickHouse insert attempts that failed (each is retried).
    pub clickhouse_insert_failures: AtomicU64,
    /// Times a partition filled its in-flight bound and was held back.
    pub partitions_held_back: AtomicU64,
    /// Partitions the group gave this worker, as of the last rebalance.
    pub assigned_partitions: AtomicUsize,
    /// Partitions taken away by rebalances: with the cooperative protocol
    /// only those moving to another member, with eager every one each time.
    pub revoked_partitions: AtomicU64,
    /// Assignments the group gave this worker (one per rebalance it took
    /// part in): a static member restarted in time causes none.
    pub rebalances: AtomicU64,
    batches: AtomicU64,
    batch_records: AtomicU64,
    latency_counts: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_micros: AtomicU64,
    /// In-place retries (`None`) and retries from tier `i`.
    retries: Mutex<BTreeMap<Option<usize>, u64>>,
    /// Records moved into tier `i`.
    tiered: Mutex<BTreeMap<usize, u64>>,
    dead_lettered: Mutex<BTreeMap<String, u64>>,
    /// Consumer lag per topic and partition, as last measured.
    pub lag: Mutex<BTreeMap<(String, i32), i64>>,
}

impl Metrics {
    pub fn observe_batch(&self, records: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.batch_records
            .fetch_add(records as u64, Ordering::Relaxed);
    }

    pub fn observe_handler(&self, took: Duration, _records: usize) {
        let seconds = took.as_secs_f64();
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.latency_counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn retry(&self, tier: Option<usize>) {
        *self
            .retries
            .lock()
            .expect("metrics lock")
            .entry(tier)
            .or_default() += 1;
    }

    pub fn tiered(&self, tier: usize) {
        *self
            .tiered
            .lock()
            .expect("metrics lock")
            .entry(tier)
            .or_default() += 1;
    }

    pub fn dead_lettered(&self, class: &str) {
        *self
            .dead_lettered
            .lock()
            .expect("metrics lock")
            .entry(class.to_owned())
            .or_default() += 1;
    }

    /// Dead-lettered records of one error class so far.
    pub fn dead_lettered_count(&self, class: &str) -> u64 {
        self.dead_lettered
            .lock()
            .expect("metrics lock")
            .get(class)
            .copied()
            .unwrap_or(0)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        counter(
            "shopstream_records_consumed_total",
            "Records fetched from Kafka.",
            self.consumed.load(Ordering::Relaxed),
        );
        counter(
            "shopstream_records_handled_total",
            "Records the handler marked done.",
            self.handled.load(Ordering::Relaxed),
        );
        counter(
            "shopstream_fetch_gaps_total",
            "Fetches that skipped records, fetched again from the expected offset.",
            self.fetch_gaps.load(Ordering::Relaxed),
        );
        counter(
            "shopstream_batches_total",
            "Batches handed to the handler.",
            self.batches.load(Ordering::Relaxed),
        );
        counter(
            "shopstream_batch_records_total",
            "Records in those batches (divide by batches for the mean size).",
            self.batch_records.load(Ordering::Relaxed),
        );
        let _ = writeln!(out, "# HELP shopstream_handler_seconds Handler call latency.\n# TYPE shopstream_handler_seconds histogram");
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "shopstream_handler_seconds_bucket{{le=\"{bound}\"}} {}",
                self.latency_counts[i].load(Ordering::Relaxed)
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "shopstream_handler_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "shopstream_handler_seconds_sum {}",
            self.latency_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "shopstream_handler_seconds_count {count}");
        let _ = writeln!(out, "# HELP shopstream_retries_total Handler retries, in place or in a retry tier.\n# TYPE shopstream_retries_total counter");
        for (tier, n) in self.retries.lock().expect("metrics lock").iter() {
            let tier = tier.map_or("in_place".to_owned(), |t| t.to_string());
            let _ = writeln!(out, "shopstream_retries_total{{tier=\"{tier}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP shopstream_records_tiered_total Records moved to a retry tier.\n# TYPE shopstream_records_tiered_total counter");
        for (tier, n) in self.tiered.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "shopstream_records_tiered_total{{tier=\"{tier}\"}} {n}"
            );
        }
        let _ = writeln!(out, "# HELP shopstream_records_dead_lettered_total Records sent to a dead-letter queue.\n# TYPE shopstream_records_dead_lettered_total counter");
        for (class, n) in self.dead_lettered.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "shopstream_records_dead_lettered_total{{error_class=\"{class}\"}} {n}"
            );
        }
        let _ = writeln!(out, "# HELP shopstream_paused_partitions Partitions paused now.\n# TYPE shopstream_paused_partitions gauge\nshopstream_paused_partitions {}", self.paused_partitions.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP shopstream_full_partitions Partitions whose in-flight bound is full now (backpressure: their records wait in librdkafka).\n# TYPE shopstream_full_partitions gauge\nshopstream_full_partitions {}", self.full_partitions.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP shopstream_clickhouse_insert_failures_total ClickHouse insert attempts of the projections that failed (each retried with backoff; offsets wait).\n# TYPE shopstream_clickhouse_insert_failures_total counter\nshopstream_clickhouse_insert_failures_total {}", self.clickhouse_insert_failures.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP shopstream_busy_partitions Partition tasks holding records now (batching, waiting for a handler slot, handling or retrying).\n# TYPE shopstream_busy_partitions gauge\nshopstream_busy_partitions {}", self.busy_partitions.get());
        let _ = writeln!(out, "# HELP shopstream_partitions_held_back_total Times a partition filled its in-flight bound and its reader waited for room.\n# TYPE shopstream_partitions_held_back_total counter\nshopstream_partitions_held_back_total {}", self.partitions_held_back.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP shopstream_assigned_partitions Partitions the group assigned to this worker.\n# TYPE shopstream_assigned_partitions gauge\nshopstream_assigned_partitions {}", self.assigned_partitions.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP shopstream_revoked_partitions_total Partitions taken from this worker by rebalances.\n# TYPE shopstream_revoked_partitions_total counter\nshopstream_revoked_partitions_total {}", self.revoked_partitions.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP shopstream_rebalances_total Rebalances that gave this worker an assignment.\n# TYPE shopstream_rebalances_total counter\nshopstream_rebalances_total {}", self.rebalances.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP shopstream_consumer_lag Records behind the high watermark.\n# TYPE shopstream_consumer_lag gauge");
        for ((topic, partition), lag) in self.lag.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "shopstream_consumer_lag{{topic=\"{topic}\",partition=\"{partition}\"}} {lag}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let metrics = Metrics::default();
        metrics.consumed.fetch_add(3, Ordering::Relaxed);
        metrics.observe_handler(Duration::from_millis(7), 3);
        metrics.retry(None);
        metrics.retry(Some(1));
        metrics.dead_lettered("truncated");
        metrics.assigned_partitions.store(4, Ordering::Relaxed);
        let text = metrics.render();
        assert!(text.contains("shopstream_assigned_partitions 4"));
        metrics.revoked_partitions.store(3, Ordering::Relaxed);
        metrics.rebalances.store(2, Ordering::Relaxed);
        let again = metrics.render();
        assert!(again.contains("shopstream_revoked_partitions_total 3"));
        assert!(again.contains("shopstream_rebalances_total 2"));
        assert!(text.contains("shopstream_records_consumed_total 3"));
        assert!(text.contains("shopstream_handler_seconds_bucket{le=\"0.005\"} 0"));
        assert!(text.contains("shopstream_handler_seconds_bucket{le=\"0.01\"} 1"));
        assert!(text.contains("shopstream_retries_total{tier=\"in_place\"} 1"));
        assert!(text.contains("shopstream_retries_total{tier=\"1\"} 1"));
        assert!(
            text.contains("shopstream_records_dead_lettered_total{error_class=\"truncated\"} 1")
        );
    }
}
