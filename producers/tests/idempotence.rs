//! The idempotent publisher when a Produce's answer is lost after the
//! broker stored its batch: librdkafka sends the batch again under the same
//! producer id and sequence numbers. A real broker answers the retry as a
//! duplicate and stores the events once; librdkafka's mock cluster checks
//! the sequence numbers of transactional producers only, and stores them
//! again, which the reliability checker expects there
//! (`checker::TopicCopies::Counted`). The same unchecked numbers let it
//! store a batch behind one it failed, which librdkafka takes for both.

#![allow(clippy::unwrap_used)]

use std::cell::Cell;
use std::collections::HashMap;
use std::time::Duration;

use backbone::config::KafkaSettings;
use backbone::events::*;
use backbone::kafka::KafkaConnection;
use producers::publisher::{PublishOptions, Publisher};
use rdkafka::message::Message;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use shopstream_tests::outage::UnreachableTansu;
use shopstream_tests::EventTopics;
use uuid::Uuid;

/// The process's log with librdkafka's (its `eos` debug context), shared
/// by the tests of this binary: each counts the lines naming its own topic.
fn librdkafka_log() -> &'static shopstream_tests::CapturedLog {
    shopstream_tests::captured_log(tracing::Level::DEBUG)
}

/// The lines of librdkafka's log holding both `what` and `topic`.
fn logged(what: &str, topic: &str) -> usize {
    librdkafka_log()
        .text()
        .lines()
        .filter(|l| l.contains(what) && l.contains(topic))
        .count()
}

/// A publisher of the order events in `topics`, logging its idempotence.
fn publisher(topics: &EventTopics) -> (KafkaConnection, Publisher) {
    librdkafka_log();
    let mut settings = KafkaSettings {
        bootstrap_servers: topics.bootstrap_servers().to_owned(),
        ..KafkaSettings::default()
    };
    settings.client.0.insert("debug".into(), "eos".into());
    let connection = KafkaConnection::connect(&settings, &topics.catalog).unwrap();
    let options = PublishOptions {
        linger_ms: 1,
        ..PublishOptions::default()
    };
    let publisher = Publisher::new(&connection, &topics.catalog, &options).unwrap();
    (connection, publisher)
}

fn order(i: u64) -> OrderEvent {
    OrderEvent {
        event_id: Uuid::new_v4(),
        occurred_at: 1_763_000_000_000,
        status: OrderStatus::Paid,
        order_id: format!("o-{i}"),
        user_id: "u-7".into(),
        session_id: None,
        items: vec![],
        currency: "EUR".into(),
        total_minor: 1,
    }
}

/// Publishes an order (each its own key) every `every` until `faults` ends;
/// then every acknowledgement must have come. The order topic's records
/// per key, and what `faults` returned.
async fn publish_through<T>(
    topics: &EventTopics,
    every: Duration,
    faults: impl std::future::Future<Output = T>,
) -> (HashMap<Vec<u8>, usize>, usize, T) {
    let (_connection, publisher) = publisher(topics);
    // The producer id first, so the faults meet batches in flight.
    publisher.send(&order(0)).await.unwrap();
    let done = Cell::new(false);
    let send = async {
        let started = tokio::time::Instant::now();
        let mut pending = Vec::new();
        for i in 1.. {
            if done.get() {
                break;
            }
            tokio::time::sleep_until(started + every * i as u32).await;
            pending.push(publisher.enqueue(&order(i), None).await.unwrap());
        }
        let sent = pending.len() + 1;
        for p in pending {
            p.delivered().await.expect("every event acknowledged");
        }
        sent
    };
    let faults = async {
        let out = faults.await;
        done.set(true);
        out
    };
    let (sent, faulted) = tokio::join!(send, faults);
    publisher.flush(Duration::from_secs(30)).unwrap();
    let name = topics.topic(EventType::Order);
    let stored: i64 = topics
        .ends()
        .iter()
        .filter(|((topic, _), _)| topic == name)
        .map(|(_, end)| end + 1)
        .sum();
    let records = shopstream_tests::consume(
        topics.bootstrap_servers(),
        &[name],
        stored as usize,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let mut copies: HashMap<Vec<u8>, usize> = HashMap::new();
    for record in &records {
        *copies.entry(record.key().unwrap().to_vec()).or_default() += 1;
    }
    (copies, sent, faulted)
}

fn stored_twice(copies: &HashMap<Vec<u8>, usize>) -> usize {
    copies.values().filter(|&&n| n > 1).count()
}

/// tansu behind a proxy that cuts every connection for 300 ms, again and
/// again, until tansu has answered a retry of a batch it had stored as a
/// duplicate (librdkafka logs `DUPSEQ`); no event is stored twice.
#[test]
fn a_real_broker_stores_a_retried_batch_once() {
    shopstream_tests::run_scenario(async {
        let tansu = UnreachableTansu::start().await.unwrap();
        let topics = EventTopics::at(tansu.bootstrap_servers(), "");
        let name = topics.topic(EventType::Order).to_owned();
        let faults = async {
            let mut cuts = 0;
            while logged("DUPSEQ", &name) == 0 {
                assert!(
                    cuts < 60,
                    "{cuts} cuts, and no retry of a stored batch came ({} lines of librdkafka's log name a fenced producer)",
                    logged("enced", &name)
                );
                tokio::time::sleep(Duration::from_millis(700)).await;
                tansu.unreachable_for(Duration::from_millis(300)).await;
                cuts += 1;
            }
            cuts
        };
        let (copies, sent, cuts) =
            publish_through(&topics, Duration::from_micros(500), faults).await;
        println!(
            "tansu: {sent} events through {cuts} cuts, {} retries answered as duplicates, {} stored twice",
            logged("DUPSEQ", &name),
            stored_twice(&copies)
        );
        assert_eq!(copies.len(), sent, "every event sent is stored");
        assert_eq!(stored_twice(&copies), 0);
    });
}

/// The same on the mock cluster (two brokers, answers 200 ms late, so
/// batches are in flight; the second broker down for 1 s, three times):
/// it stores the retried batches again. If this fails, the mock cluster
/// has learnt to deduplicate, and `TopicCopies::Counted` can go.
#[test]
fn the_mock_cluster_stores_a_retried_batch_again() {
    shopstream_tests::run_scenario(async {
        let topics = EventTopics::with_brokers(2, "");
        let cluster = topics.cluster();
        let name = topics.topic(EventType::Order).to_owned();
        for (partition, leader) in [(0, 1), (1, 2), (2, 1)] {
            cluster
                .partition_leader(&name, partition, Some(leader))
                .unwrap();
        }
        for broker in [1, 2] {
            cluster
                .broker_round_trip_time(broker, Duration::from_millis(200))
                .unwrap();
        }
        let faults = async {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(800)).await;
                cluster.broker_down(2).unwrap();
                tokio::time::sleep(Duration::from_secs(1)).await;
                cluster.broker_up(2).unwrap();
            }
        };
        let (copies, sent, ()) = publish_through(&topics, Duration::from_micros(500), faults).await;
        println!(
            "mock cluster: {sent} events, {} stored twice",
            stored_twice(&copies)
        );
        assert_eq!(copies.len(), sent, "every event sent is stored");
        assert!(stored_twice(&copies) > 0);
    });
}

/// The mock cluster answers an error to a Produce and then stores the
/// next batch of the same partition, already in flight behind it: a real
/// broker refuses that batch (its sequence numbers skip the failed one's),
/// the mock cluster checks them for transactional producers only. From the
/// success librdkafka concludes that the failed batch was stored too
/// (`IMPLICITACK`) and acknowledges its events, which no topic holds. On
/// the mock cluster the reliability checker therefore expects such an
/// event nowhere downstream (`checker::TopicCopies::Counted`). If this
/// fails, the mock cluster checks sequence numbers, and that can go.
#[test]
fn the_mock_cluster_stores_a_batch_behind_a_failed_one_and_the_failed_one_is_lost() {
    shopstream_tests::run_scenario(async {
        // One partition: the batches in flight behind a failed one are its.
        let topics = EventTopics::with_brokers(1, "    partitions: 1\n");
        let cluster = topics.cluster();
        let name = topics.topic(EventType::Order).to_owned();
        cluster
            .broker_round_trip_time(1, Duration::from_millis(200))
            .unwrap();
        let faults = async {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                cluster.request_errors(
                    RDKafkaApiKey::Produce,
                    &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS],
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            // Read back promptly: the mock cluster serves a batch a fetch.
            cluster.broker_round_trip_time(1, Duration::ZERO).unwrap();
        };
        // An event every 50 ms: batches of one, four in flight (librdkafka
        // sends no batch more while five events of the partition are).
        let (copies, sent, ()) = publish_through(&topics, Duration::from_millis(50), faults).await;
        println!(
            "mock cluster: {sent} events acknowledged, {} stored, {} batches acknowledged implicitly",
            copies.len(),
            logged("IMPLICITACK", &name)
        );
        assert!(logged("IMPLICITACK", &name) > 0);
        assert!(copies.len() < sent, "an event acknowledged is not stored");
    });
}
