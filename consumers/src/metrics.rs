//! The worker's metrics, registered in one registry (see
//! `backbone::metrics`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use backbone::metrics::{Counter, EncodeLabelSet, Family, Gauge, Registry, TracedHistogram, Unit};

use crate::handler::BusyPartitions;

/// Upper bounds of the handler latency histogram, in seconds.
const LATENCY_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// The `tier` of retries in place (not in a retry tier).
const IN_PLACE: &str = "in_place";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabel {
    tier: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    error_class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    topic: String,
    partition: i32,
}

#[derive(Debug)]
pub struct Metrics {
    pub consumed: Counter,
    pub handled: Counter,
    /// Fetches found missing records before the one they returned (each
    /// fetched again from the expected offset).
    pub fetch_gaps: Counter,
    /// Partitions paused in librdkafka (retry backoff, a retry tier's
    /// record not due, draining; backpressure for a partition read from the
    /// consumer's queue).
    pub paused_partitions: Gauge,
    /// Partitions whose in-flight bound is full now: their reader waits,
    /// and their records wait in librdkafka's queue for the partition.
    pub full_partitions: Gauge,
    pub busy_partitions: BusyPartitions,
    /// ClickHouse insert attempts that failed (each is retried).
    pub clickhouse_insert_failures: Counter,
    /// Queries for the positions an events table already holds: one per
    /// partition's first rows, replays and retries, not one per insert.
    pub position_lookups: Counter,
    /// Times a partition filled its in-flight bound and was held back.
    pub partitions_held_back: Counter,
    /// Partitions the group gave this worker, as of the last rebalance.
    pub assigned_partitions: Gauge,
    /// Partitions taken away by rebalances: with the cooperative protocol
    /// only those moving to another member, with eager every one each time.
    pub revoked_partitions: Counter,
    /// Assignments the group gave this worker (one per rebalance it took
    /// part in): a static member restarted in time causes none.
    pub rebalances: Counter,
    batches: Counter,
    batch_records: Counter,
    handler_seconds: TracedHistogram,
    /// In-place retries (`in_place`) and retries from tier `i`.
    retries: Family<TierLabel, Counter>,
    /// Records moved into tier `i`.
    tiered: Family<TierLabel, Counter>,
    dead_lettered: Family<ClassLabel, Counter>,
    /// Consumer lag per topic and partition, as last measured.
    lag: Family<PartitionLabels, Gauge>,
    /// The partitions in `lag` (the family cannot be listed).
    lagging: Mutex<BTreeSet<(String, i32)>>,
}

impl Default for Metrics {
    /// The in-place retries and the dead letters of each decoding error
    /// start at zero (a rate then sees the first one).
    fn default() -> Self {
        let metrics = Self {
            consumed: Counter::default(),
            handled: Counter::default(),
            fetch_gaps: Counter::default(),
            paused_partitions: Gauge::default(),
            full_partitions: Gauge::default(),
            busy_partitions: BusyPartitions::default(),
            clickhouse_insert_failures: Counter::default(),
            position_lookups: Counter::default(),
            partitions_held_back: Counter::default(),
            assigned_partitions: Gauge::default(),
            revoked_partitions: Counter::default(),
            rebalances: Counter::default(),
            batches: Counter::default(),
            batch_records: Counter::default(),
            handler_seconds: TracedHistogram::new(LATENCY_BUCKETS.into_iter()),
            retries: Family::default(),
            tiered: Family::default(),
            dead_lettered: Family::default(),
            lag: Family::default(),
            lagging: Mutex::default(),
        };
        metrics
            .retries
            .get_or_create(&TierLabel {
                tier: IN_PLACE.to_owned(),
            })
            .inc_by(0);
        for class in backbone::codec::DecodeError::CLASSES {
            metrics
                .dead_lettered
                .get_or_create(&ClassLabel {
                    error_class: class.to_owned(),
                })
                .inc_by(0);
        }
        metrics
    }
}

impl Metrics {
    /// Changes when partitions are revoked (before their work is stopped)
    /// and when an assignment arrives: while it stays the same, no other
    /// member of the group has written this worker's partitions since.
    pub fn assignment_epoch(&self) -> u64 {
        self.revoked_partitions.get() + self.rebalances.get()
    }

    /// A registry holding every metric of this worker (shared, not copied).
    pub fn registry(&self) -> Registry {
        let mut r = Registry::default();
        r.register(
            "shopstream_records_consumed",
            "Records fetched from Kafka",
            self.consumed.clone(),
        );
        r.register(
            "shopstream_records_handled",
            "Records the handler marked done",
            self.handled.clone(),
        );
        r.register(
            "shopstream_fetch_gaps",
            "Fetches that skipped records, fetched again from the expected offset",
            self.fetch_gaps.clone(),
        );
        r.register(
            "shopstream_batches",
            "Batches handed to the handler",
            self.batches.clone(),
        );
        r.register(
            "shopstream_batch_records",
            "Records in those batches (divide by batches for the mean size)",
            self.batch_records.clone(),
        );
        r.register_with_unit(
            "shopstream_handler",
            "Handler call latency",
            Unit::Seconds,
            self.handler_seconds.clone(),
        );
        r.register(
            "shopstream_retries",
            "Handler retries, in place or in a retry tier",
            self.retries.clone(),
        );
        r.register(
            "shopstream_records_tiered",
            "Records moved to a retry tier",
            self.tiered.clone(),
        );
        r.register(
            "shopstream_records_dead_lettered",
            "Records sent to a dead-letter queue",
            self.dead_lettered.clone(),
        );
        r.register(
            "shopstream_paused_partitions",
            "Partitions paused now",
            self.paused_partitions.clone(),
        );
        r.register(
            "shopstream_full_partitions",
            "Partitions whose in-flight bound is full now (backpressure: their records wait in librdkafka)",
            self.full_partitions.clone(),
        );
        r.register(
            "shopstream_clickhouse_insert_failures",
            "ClickHouse insert attempts of the projections that failed (each retried with backoff; offsets wait)",
            self.clickhouse_insert_failures.clone(),
        );
        r.register(
            "shopstream_clickhouse_position_lookups",
            "Lookups of the Kafka positions an events table already holds (a partition's first rows after each rebalance, replays, retries)",
            self.position_lookups.clone(),
        );
        r.register(
            "shopstream_busy_partitions",
            "Partition tasks holding records now (batching, waiting for a handler slot, handling or retrying)",
            self.busy_partitions.gauge(),
        );
        r.register(
            "shopstream_partitions_held_back",
            "Times a partition filled its in-flight bound and its reader waited for room",
            self.partitions_held_back.clone(),
        );
        r.register(
            "shopstream_assigned_partitions",
            "Partitions the group assigned to this worker",
            self.assigned_partitions.clone(),
        );
        r.register(
            "shopstream_revoked_partitions",
            "Partitions taken from this worker by rebalances",
            self.revoked_partitions.clone(),
        );
        r.register(
            "shopstream_rebalances",
            "Rebalances that gave this worker an assignment",
            self.rebalances.clone(),
        );
        r.register(
            "shopstream_consumer_lag",
            "Records behind the high watermark",
            self.lag.clone(),
        );
        r
    }

    pub fn observe_batch(&self, records: usize) {
        self.batches.inc();
        self.batch_records.inc_by(records as u64);
    }

    /// A batch's time in the handler, its trace (the batch's span's) as the
    /// exemplar.
    pub fn observe_handler(&self, took: Duration) {
        backbone::metrics::observe_in(
            &self.handler_seconds,
            took.as_secs_f64(),
            &tracing::Span::current(),
        );
    }

    pub fn retry(&self, tier: Option<usize>) {
        let tier = tier.map_or_else(|| IN_PLACE.to_owned(), |t| t.to_string());
        self.retries.get_or_create(&TierLabel { tier }).inc();
    }

    pub fn tiered(&self, tier: usize) {
        self.tiered
            .get_or_create(&TierLabel {
                tier: tier.to_string(),
            })
            .inc();
    }

    pub fn dead_lettered(&self, class: &str) {
        self.dead_lettered
            .get_or_create(&ClassLabel {
                error_class: class.to_owned(),
            })
            .inc();
    }

    /// Dead-lettered records of one error class so far.
    pub fn dead_lettered_count(&self, class: &str) -> u64 {
        self.dead_lettered
            .get(&ClassLabel {
                error_class: class.to_owned(),
            })
            .map_or(0, |n| n.get())
    }

    /// Replaces the lag of every partition with `lag` (partitions no longer
    /// measured leave the family).
    pub fn set_lag(&self, lag: BTreeMap<(String, i32), i64>) {
        let labels = |(topic, partition): &(String, i32)| PartitionLabels {
            topic: topic.clone(),
            partition: *partition,
        };
        let mut lagging = self.lagging.lock().expect("metrics lock");
        for (key, behind) in &lag {
            self.lag.get_or_create(&labels(key)).set(*behind);
        }
        for gone in lagging.iter().filter(|key| !lag.contains_key(*key)) {
            self.lag.remove(&labels(gone));
        }
        *lagging = lag.into_keys().collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let metrics = Metrics::default();
        let render = || backbone::metrics::encode(&metrics.registry(), false);
        metrics.consumed.inc_by(3);
        metrics.observe_handler(Duration::from_millis(7));
        metrics.retry(None);
        metrics.retry(Some(1));
        metrics.dead_lettered("truncated");
        metrics.assigned_partitions.set(4);
        let text = render();
        assert!(text.contains("shopstream_assigned_partitions 4"));
        metrics.revoked_partitions.inc_by(3);
        metrics.rebalances.inc_by(2);
        let again = render();
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
