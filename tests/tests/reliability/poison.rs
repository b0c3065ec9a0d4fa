//! Scenarios 7 and 8: a dead letter that cannot be written holds its
//! partition's commit back until it can; records malformed in every way we
//! know (empty, tombstone, oversized garbage, unknown fingerprint, an absurd
//! Avro array length, JSON of the wrong types, JSON nested 100,000 deep) go
//! to the DLQs once per group with their payload and headers, while an
//! oversized but valid event is handled like any other.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use backbone::codec::Encoding;
use backbone::events::{AnyEvent, ChatMessage, EventType};
use backbone::headers;
use backbone::schema::SchemaRegistry;
use producers::generator::Generated;
use producers::publisher::{Poison, PublishOptions, Publisher};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};
use shopstream_tests::{clickhouse, Broker, EventTopics};
use uuid::Uuid;

use crate::{Run, Service, System};

/// The committed offset of `group` on one partition, if any.
fn committed(system: &System, group: &str, topic: &str, partition: i32) -> Option<i64> {
    let consumer: BaseConsumer = system
        .topics
        .connection
        .client_config()
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut list = TopicPartitionList::new();
    list.add_partition(topic, partition);
    let found = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .expect("committed offsets");
    match found.find_partition(topic, partition)?.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

/// Where the record carrying `event_id` (by its traceparent) landed in
/// `topic`, if it is there.
fn find(system: &System, topic: &str, event_id: Uuid) -> Option<(i32, i64)> {
    let trace = event_id.simple().to_string();
    consumers::dlq::read_all(&system.topics.connection, topic)
        .expect("topic")
        .iter()
        .find(|m| {
            m.headers().is_some_and(|hs| {
                hs.iter().any(|h| {
                    h.key == headers::TRACEPARENT
                        && h.value
                            .is_some_and(|v| String::from_utf8_lossy(v).contains(&trace))
                })
            })
        })
        .map(|m| (m.partition(), m.offset()))
}

fn position_of(system: &System, topic: &str, event_id: Uuid) -> (i32, i64) {
    find(system, topic, event_id).expect("the record is in its topic")
}

/// For a failed check: where each poisoned record without its dead letter
/// lies, and every log line about its partition other than the dead
/// letters written there.
fn trail(system: &System, report: &checker::Report) -> String {
    let mut out = String::new();
    for finding in &report.findings {
        let checker::Finding::DeadLetterMissing {
            event_id, group, ..
        } = finding
        else {
            continue;
        };
        let Ok(id) = event_id.parse::<Uuid>() else {
            continue;
        };
        for event in EventType::ALL {
            let topic = system.topic(event);
            let Some((partition, offset)) = find(system, topic, id) else {
                continue;
            };
            out.push_str(&format!(
                "=== {event_id} (no dead letter for {group}) is {topic}[{partition}]@{offset}; the logs on that partition:\n"
            ));
            let at = format!("partition={partition} ");
            for line in system.logs_in_full().lines() {
                let ours = line.contains(topic) && line.contains(&at);
                if ours
                    && (!line.contains("Record dead-lettered.")
                        || line.contains(&format!("offset={offset} ")))
                {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
    }
    out
}

/// The offset the analytics job stored last per topic and partition
/// (none while ClickHouse does not answer).
async fn stored_offsets(system: &System) -> HashMap<(String, i32), i64> {
    pipelines::store::stored_offsets(&system.client, Duration::from_secs(30))
        .await
        .unwrap_or_default()
}

/// The last offset of every partition of the event topics holding
/// records, but `except`.
fn last_offsets(system: &System, except: (&str, i32)) -> Vec<((String, i32), i64)> {
    let consumer: BaseConsumer = system
        .topics
        .connection
        .client_config()
        .create()
        .expect("consumer");
    let mut last = Vec::new();
    for event in EventType::ALL {
        let topic = system.topic(event);
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        for p in metadata.topics()[0].partitions() {
            let (_, high) = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .expect("watermarks");
            if (topic, p.id()) != except && high > 0 {
                last.push(((topic.to_owned(), p.id()), high - 1));
            }
        }
    }
    last
}

/// 600 events on their own mock cluster, one order among them garbage,
/// and every write to Kafka failing from then on (the DLQ cannot be
/// written): the system, the events, and the poison's order topic,
/// partition and offset.
async fn with_an_unwritable_dead_letter() -> (System, Vec<Generated>, String, i32, i64) {
    let url = clickhouse().await.url();
    let system = System::on(EventTopics::new(""), url, url, &[]).await;
    let run = Run::new(77, 600, 1_000.0, 0.0);
    let mut generated: Vec<Generated> = run
        .traffic
        .generator(run.traffic.start_ms.expect("start"))
        .take(run.count)
        .collect();
    let poisoned = generated
        .iter()
        .position(|g| matches!(g.event, AnyEvent::Order(_)))
        .expect("an order");
    generated[poisoned].poison = Some(Poison::Garbage);
    let poison_id = generated[poisoned].event.event_id();
    Publisher::new(
        &system.topics.connection,
        &system.topics.catalog,
        &PublishOptions::default(),
    )
    .expect("publisher")
    .publish_all(generated.iter().map(|g| (&g.event, g.poison)))
    .await
    .expect("published");
    let topic = system.topic(EventType::Order).to_owned();
    let (partition, offset) = position_of(&system, &topic, poison_id);

    system.topics.cluster().request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 10_000],
    );
    (system, generated, topic, partition, offset)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_that_cannot_be_written_holds_its_partition_commit_back() {
    let (system, generated, topic, partition, offset) = with_an_unwritable_dead_letter().await;
    let mut worker = system.worker();
    system.ready(&[&worker]).await;
    let started = Instant::now();
    let mut others_committed = false;
    while started.elapsed() < Duration::from_secs(8) {
        let held = committed(&system, &system.worker_group, &topic, partition);
        assert!(
            held.is_none_or(|o| o <= offset),
            "committed {held:?} past the poison at {offset} while its dead letter was not written"
        );
        others_committed |= (0..3)
            .filter(|p| *p != partition)
            .any(|p| committed(&system, &system.worker_group, &topic, p).is_some_and(|o| o > 0));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(others_committed, "the other partitions went on meanwhile");
    let dlq = consumers::dlq::dead_letter_topic(&system.topics.catalog, &topic);
    assert!(
        consumers::dlq::read_all(&system.topics.connection, &dlq).is_ok_and(|d| d.is_empty()),
        "nothing reached the DLQ"
    );

    system
        .topics
        .cluster()
        .clear_request_errors(RDKafkaApiKey::Produce);
    let expected = checker::Expected::new(generated);
    let mut checks = system.checks();
    checks.analytics = false;
    checks.dead_letter_groups = vec![system.worker_group.clone()];
    let report = system
        .converge(&expected, &checks, Duration::from_secs(60))
        .await;
    assert!(report.passed(), "{report}\n{}", system.logs());
    assert!(worker.terminate(Duration::from_secs(30)).success());
    assert!(
        committed(&system, &system.worker_group, &topic, partition).is_some_and(|o| o > offset),
        "the commit moves past the poison once its dead letter is written"
    );
}

/// The analytics job likewise: while it cannot write the dead letter, its
/// partition waits and every other partition is counted and stored to its
/// end (its forwards once stalled the whole job); no stored offset passes
/// the poison. The job, the events and where the poison lies.
async fn analytics_waiting_on_an_unwritable_dead_letter(
) -> (System, Service, Vec<Generated>, String, i32, i64) {
    let (system, generated, topic, partition, offset) = with_an_unwritable_dead_letter().await;
    let analytics = system.analytics();
    system.ready(&[&analytics]).await;
    let others = last_offsets(&system, (&topic, partition));
    assert!(others.len() >= 8, "{others:?}");
    let started = Instant::now();
    loop {
        let stored = stored_offsets(&system).await;
        let held = stored.get(&(topic.clone(), partition));
        assert!(
            held.is_none_or(|o| *o < offset),
            "stored {held:?}, past the poison at {partition}/{offset} whose dead letter was not written"
        );
        let behind: Vec<_> = others
            .iter()
            .filter(|(key, last)| stored.get(key).is_none_or(|s| s < last))
            .collect();
        if behind.is_empty() && system.logs_in_full().contains("its partition waits for it") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "partitions not stored to their end within 60 s while the dead letter waits: {behind:?}\n{}",
            system.logs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    (system, analytics, generated, topic, partition, offset)
}

/// The read models and the analytics group's dead letters, exact.
async fn analytics_converge(system: &System, generated: Vec<Generated>) {
    let expected = checker::Expected::new(generated);
    let mut checks = system.checks();
    checks.events = false;
    checks.order_status = false;
    checks.dead_letter_groups = vec![system.analytics_group.clone()];
    let report = system
        .converge(&expected, &checks, Duration::from_secs(60))
        .await;
    assert!(report.passed(), "{report}\n{}", system.logs());
}

/// ... and once the DLQ can be written again, the job writes the dead
/// letter once and goes on with the partition right after it (fetching
/// again what it skipped meanwhile): exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_analytics_dead_letter_that_cannot_be_written_holds_only_its_partition() {
    let (system, mut analytics, generated, ..) =
        analytics_waiting_on_an_unwritable_dead_letter().await;
    system
        .topics
        .cluster()
        .clear_request_errors(RDKafkaApiKey::Produce);
    analytics_converge(&system, generated).await;
    system.stop(&mut [&mut analytics]);
}

/// ... or stopped meanwhile, it gives the dead letter up after its grace
/// and holds the partition back, so no flush stores an offset past it (a
/// flush taking the records fetched meanwhile once did, beside load), and
/// the restart writes it, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_analytics_dead_letter_given_up_at_shutdown_is_written_by_the_restart() {
    let (system, mut analytics, generated, topic, partition, offset) =
        analytics_waiting_on_an_unwritable_dead_letter().await;
    assert!(analytics.terminate(Duration::from_secs(60)).success());
    let stored = stored_offsets(&system).await;
    let held = stored.get(&(topic.clone(), partition));
    assert!(
        held.is_none_or(|o| *o < offset),
        "stored {held:?} at the stop, past the poison at {partition}/{offset} whose dead letter was not written"
    );
    system
        .topics
        .cluster()
        .clear_request_errors(RDKafkaApiKey::Produce);
    let mut restarted = system.analytics();
    analytics_converge(&system, generated).await;
    system.stop(&mut [&mut restarted]);
}

/// A record with the standard headers and a traceparent naming `id`.
fn crafted<'a>(
    topic: &'a str,
    event: EventType,
    content_type: &'a str,
    id: Uuid,
) -> (FutureRecord<'a, [u8], [u8]>, Uuid) {
    let trace = format!("00-{}-0000000000000001-01", id.simple());
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: headers::EVENT_TYPE,
            value: Some(event.name()),
        })
        .insert(Header {
            key: headers::CONTENT_TYPE,
            value: Some(content_type),
        })
        .insert(Header {
            key: headers::TRACEPARENT,
            value: Some(trace.as_str()),
        });
    (
        FutureRecord::to(topic)
            .key(b"crafted".as_slice())
            .headers(headers),
        id,
    )
}

on_both_brokers!(
    malformed_records_of_every_kind_are_dead_lettered_once_and_an_oversized_event_is_handled:
        |broker| malformed_records(broker)
);

async fn malformed_records(broker: Broker) {
    let url = clickhouse().await.url();
    let system = System::new(broker, url, url, &[]).await;
    let run = Run::new(78, 2_000, 2_000.0, 0.01);
    let mut expected = run.expected();
    let (mut worker, mut analytics) = system.consumers().await;
    system.publish_all(&run);

    let orders = system.topic(EventType::Order).to_owned();
    let avro = Encoding::Avro.content_type();
    let json = Encoding::Json.content_type();
    let fingerprint = SchemaRegistry::global()
        .current(EventType::Order)
        .single_object_header();
    let mut absurd = fingerprint.to_vec();
    absurd.extend_from_slice(&[0x48, b'x']); // a 36-byte event_id... cut short,
    absurd.extend_from_slice(&[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]); // then a 2^62 length
    let mut garbage = vec![0u8; 900_000];
    for (i, b) in garbage.iter_mut().enumerate() {
        *b = (i.wrapping_mul(2_654_435_761) >> 13) as u8;
    }
    let mut unknown = vec![0xC3, 0x01, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88];
    unknown.extend_from_slice(b"payload");
    let nested = "[".repeat(100_000);
    let payloads: Vec<(&str, Option<&[u8]>)> = vec![
        (avro, Some(b"".as_slice())),
        (avro, None),
        (avro, Some(garbage.as_slice())),
        (avro, Some(unknown.as_slice())),
        (avro, Some(absurd.as_slice())),
        (
            json,
            Some(br#"{"event_id": 42, "occurred_at": "yesterday", "status": ["paid"]}"#.as_slice()),
        ),
        (json, Some(b"null".as_slice())),
        (json, Some(nested.as_bytes())),
    ];
    let producer: FutureProducer = system
        .topics
        .connection
        .client_config()
        .set("message.max.bytes", "2000000")
        .create()
        .expect("producer");
    for (content_type, payload) in &payloads {
        let (mut record, id) = crafted(&orders, EventType::Order, content_type, Uuid::new_v4());
        if let Some(payload) = payload {
            record = record.payload(*payload);
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .expect("crafted record sent");
        expected.poisoned.insert(id);
    }
    // Oversized but valid: a 300 KB chat message.
    let big = AnyEvent::Chat(ChatMessage {
        event_id: Uuid::new_v4(),
        occurred_at: run.traffic.start_ms.expect("start"),
        room_id: "room-big".into(),
        user_id: "u-big".into(),
        text: "much text ".repeat(30_000),
        flagged: false,
    });
    Publisher::new(
        &system.topics.connection,
        &system.topics.catalog,
        &PublishOptions::default(),
    )
    .expect("publisher")
    .publish_all([(&big, None)])
    .await
    .expect("the big event is published");
    expected.good.push(big);

    let report = system
        .converge(&expected, &system.checks(), Duration::from_secs(120))
        .await;
    assert!(
        report.passed(),
        "{report}\n{}{}",
        system.logs(),
        trail(&system, &report)
    );
    system.stop(&mut [&mut worker, &mut analytics]);
    println!(
        "{} crafted malformed records and one 300 KB event: {report}",
        payloads.len()
    );
}
