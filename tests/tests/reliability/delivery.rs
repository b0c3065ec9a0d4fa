//! Nothing lost on the way in, on a real broker as on the mock cluster:
//! partitions of thousands of records, already in Kafka when the consumers
//! start (the first fetch takes whole partitions), through one worker and
//! one analytics job, with the default in-flight bounds and with bounds
//! below one batch, so every partition pauses and resumes for backpressure
//! many times. The events store, the order statuses, the read models and the
//! dead letters must end exact. Issue 29: on tansu the worker lost the
//! records around each backpressure pause while the mock cluster hid it.

use std::time::Duration;

use shopstream_tests::{clickhouse, Broker, EventTopics};

use crate::{partitions, soak, Run, System};

/// A partition's in-flight bound below one batch.
const TIGHT: [(&str, &str); 2] = [
    ("worker", "max_in_flight_records: 50"),
    ("worker", "batch_max_records: 200"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_record_arrives_through_backpressure_on_the_mock_cluster() {
    every_record_arrives(Broker::Mock, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_record_arrives_through_tight_backpressure_on_the_mock_cluster() {
    every_record_arrives(Broker::Mock, &TIGHT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_record_arrives_through_backpressure_on_a_real_broker() {
    every_record_arrives(Broker::Real, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_record_arrives_through_tight_backpressure_on_a_real_broker() {
    every_record_arrives(Broker::Real, &TIGHT).await;
}

async fn every_record_arrives(broker: Broker, settings: &[(&str, &str)]) {
    let url = clickhouse().await.url();
    let system = System::on(EventTopics::on(broker, &partitions()), url, url, settings).await;
    let run = Run::new(29, 20_000 * soak() as usize, 20_000.0, 0.005);
    let expected = run.expected();
    system.publish_all(&run);
    let largest = system.topics.ends().into_values().max().unwrap_or(0) + 1;
    assert!(
        largest > 2_000,
        "the largest partition holds {largest} records, past the default bound of 1000 twice"
    );

    let started = std::time::Instant::now();
    let (mut worker, mut analytics) = system.consumers().await;
    let report = system
        .converge(&expected, &system.checks(), Duration::from_secs(240))
        .await;
    assert!(
        report.passed(),
        "{broker:?} {settings:?}: {report}\n{}{}",
        system.progress(&[&worker, &analytics]).await,
        system.logs()
    );
    let gaps = [
        worker.metric("shopstream_fetch_gaps_total").await,
        analytics
            .metric("shopstream_analytics_fetch_gaps_total")
            .await,
    ];
    system.stop(&mut [&mut worker, &mut analytics]);
    println!(
        "{broker:?} {settings:?}: exact {:.1} s after the consumers started; fetch gaps refetched (worker, analytics): {gaps:?}; {report}",
        started.elapsed().as_secs_f64()
    );
}
