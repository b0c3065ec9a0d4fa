//! Publishing on tansu and on the mock cluster (each scenario as
//! `<name>::on_a_real_broker` and `<name>::on_the_mock_cluster`): typed
//! publishers, backpressure, and shopstream-publish as a process (output,
//! exit codes, signals).

#![allow(clippy::unwrap_used)]

#[macro_use]
extern crate shopstream_tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use backbone::catalog::Catalog;
use backbone::codec::{self, content_type, DecodeHint, Decoder, Encoding};
use backbone::config::KafkaSettings;
use backbone::events::*;
use backbone::headers;
use backbone::kafka::KafkaConnection;
use backbone::schema::SchemaRegistry;
use producers::generator::{Generator, GeneratorConfig};
use producers::publisher::{PublishOptions, Publisher};
use rdkafka::message::{Headers, Message, OwnedMessage};
use shopstream_tests::{repo_root, unique_name, Broker, TestBroker};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_shopstream-publish");
const WAIT: Duration = Duration::from_secs(60);

/// A catalog of the four event topics under a fresh prefix on `broker` (a
/// mock cluster of the test's own, hosted over loopback for the publisher
/// process, or the real broker), created there unless `create` is false.
struct Topics {
    _dir: tempfile::TempDir,
    path: PathBuf,
    catalog: Catalog,
    broker: TestBroker,
}

impl Topics {
    async fn new(broker: Broker, create: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let prefix = unique_name("pub");
        let schemas = repo_root().join("schemas");
        let mut text = "defaults: {partitions: 3, replication_factor: 1}\ntopics:\n".to_owned();
        for (name, schema, key) in [
            ("users", "user_event", "user_id"),
            ("orders", "order_event", "order_id"),
            ("chat", "chat_message", "room_id"),
            ("search", "search_query", "user_id"),
        ] {
            text.push_str(&format!(
                "  - name: {prefix}-{name}\n    schema: {}/{schema}\n    key: {key}\n    dead_letter: {{enabled: false}}\n",
                schemas.display()
            ));
        }
        let path = dir.path().join("topics.yaml");
        std::fs::write(&path, text).expect("writes the catalog");
        let catalog = Catalog::load(&path, None).expect("valid catalog");
        let broker = TestBroker::on(broker);
        for topic in catalog.topics.iter().filter(|_| create) {
            broker
                .create_topic(&topic.name, topic.partitions)
                .await
                .expect("creates the topic");
        }
        Self {
            _dir: dir,
            path,
            catalog,
            broker,
        }
    }

    fn names(&self) -> Vec<&str> {
        self.catalog
            .topics
            .iter()
            .map(|t| t.name.as_str())
            .collect()
    }

    async fn consume(&self, count: usize) -> Vec<OwnedMessage> {
        shopstream_tests::consume(self.broker.bootstrap_servers(), &self.names(), count, WAIT)
            .await
            .expect("records arrive")
    }
}

fn header<'a>(message: &'a OwnedMessage, name: &str) -> Option<&'a str> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

async fn publisher(topics: &Topics, options: &PublishOptions) -> (KafkaConnection, Publisher) {
    let settings = KafkaSettings {
        bootstrap_servers: topics.broker.bootstrap_servers().to_owned(),
        ..KafkaSettings::default()
    };
    let connection = KafkaConnection::connect(&settings, &topics.catalog).expect("connects");
    let publisher = Publisher::new(&connection, &topics.catalog, options).expect("publisher");
    (connection, publisher)
}

fn order() -> OrderEvent {
    OrderEvent {
        event_id: Uuid::new_v4(),
        occurred_at: 1_763_000_000_000,
        status: OrderStatus::Paid,
        order_id: "o-42".into(),
        user_id: "u-7".into(),
        session_id: Some("u-7-s1".into()),
        items: vec![LineItem {
            sku: "sku-1".into(),
            category: "shoes".into(),
            quantity: 2,
            unit_price_minor: 1999,
        }],
        currency: "EUR".into(),
        total_minor: 3998,
    }
}

on_both_brokers!(
    typed_publishers_route_key_and_label_every_record:
        |broker| typed_publishers_route_key_and_label_every_record(broker)
);

async fn typed_publishers_route_key_and_label_every_record(broker: Broker) {
    let topics = Topics::new(broker, true).await;
    let (_connection, avro) = publisher(&topics, &PublishOptions::default()).await;
    let event = order();
    let delivered = avro
        .typed::<OrderEvent>()
        .send(&event)
        .await
        .expect("delivered");
    assert!(delivered.offset >= 0 && delivered.bytes > 10);
    let json_options = PublishOptions {
        encoding: Encoding::Json,
        ..PublishOptions::default()
    };
    let (_connection, json) = publisher(&topics, &json_options).await;
    let chat = ChatMessage {
        event_id: Uuid::new_v4(),
        occurred_at: 1_763_000_000_001,
        room_id: "room-3".into(),
        user_id: "u-7".into(),
        text: "hi".into(),
        flagged: false,
    };
    json.send(&chat).await.expect("delivered");

    let records = topics.consume(2).await;
    let by_topic: HashMap<&str, &OwnedMessage> = records.iter().map(|m| (m.topic(), m)).collect();
    let order_record = by_topic[avro.topic(EventType::Order).unwrap()];
    assert_eq!(order_record.key(), Some("o-42".as_bytes()));
    assert_eq!(
        header(order_record, headers::EVENT_TYPE),
        Some("order_event")
    );
    assert_eq!(
        header(order_record, headers::CONTENT_TYPE),
        Some(content_type::AVRO)
    );
    let fingerprint = SchemaRegistry::global()
        .current(EventType::Order)
        .fingerprint_hex();
    assert_eq!(
        header(order_record, headers::SCHEMA_FINGERPRINT),
        Some(fingerprint)
    );
    assert!(headers::is_traceparent(
        header(order_record, headers::TRACEPARENT).unwrap()
    ));
    let produced_at: i64 = header(order_record, headers::PRODUCED_AT)
        .unwrap()
        .parse()
        .unwrap();
    assert!(produced_at > 1_700_000_000_000);
    let decoded: OrderEvent = Decoder::default()
        .decode_as(order_record.payload().unwrap(), None)
        .unwrap();
    assert_eq!(decoded, event);

    let chat_record = by_topic[json.topic(EventType::Chat).unwrap()];
    assert_eq!(chat_record.key(), Some("room-3".as_bytes()));
    assert_eq!(
        header(chat_record, headers::CONTENT_TYPE),
        Some(content_type::JSON)
    );
    let parsed: ChatMessage = serde_json::from_slice(chat_record.payload().unwrap()).unwrap();
    assert_eq!(parsed, chat);
}

on_both_brokers!(
    a_full_local_queue_makes_senders_wait_and_drops_nothing:
        |broker| a_full_local_queue_makes_senders_wait_and_drops_nothing(broker)
);

async fn a_full_local_queue_makes_senders_wait_and_drops_nothing(broker: Broker) {
    let topics = Topics::new(broker, true).await;
    let options = PublishOptions {
        max_queued: 4,
        linger_ms: 20,
        ..PublishOptions::default()
    };
    let (_connection, publisher) = publisher(&topics, &options).await;
    let mut pending = Vec::new();
    for i in 0..400 {
        let event = OrderEvent {
            order_id: format!("o-{i}"),
            event_id: Uuid::new_v4(),
            ..order()
        };
        // Never fails for a full queue: it waits for room.
        pending.push(publisher.enqueue(&event, None).await.expect("enqueued"));
        // librdkafka's out-queue length counts each queued message (at most
        // max_queued, acknowledged ones included until their delivery report
        // is served) plus the delivery-report events not yet served (at most
        // one per such message): rd_kafka_outq_len in rdkafka.c.
        assert!(
            publisher.in_flight() <= 2 * options.max_queued as i32,
            "queue bound holds: {}",
            publisher.in_flight()
        );
    }
    for p in pending {
        p.delivered().await.expect("delivered");
    }
    publisher.flush(WAIT).unwrap();
    assert_eq!(topics.consume(400).await.len(), 400);
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn publish(catalog: &Path, brokers: &str, args: &[&str]) -> Run {
    let output = Command::new(BIN)
        .args(["--brokers", brokers, "--set"])
        .arg(format!("catalog.path={}", catalog.display()))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("shopstream-publish runs");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

const START: i64 = 1_763_000_000_000;

fn regenerate(seed: u64, count: usize, poison_rate: f64) -> Vec<producers::generator::Generated> {
    Generator::new(GeneratorConfig {
        seed,
        start_ms: START,
        spacing_ms: 1000.0 / 20_000.0,
        poison_rate,
        ..GeneratorConfig::default()
    })
    .take(count)
    .collect()
}

on_both_brokers!(
    generated_traffic_arrives_complete_in_order_and_reads_in_fastavro:
        |broker| generated_traffic_arrives_complete_in_order_and_reads_in_fastavro(broker)
);

async fn generated_traffic_arrives_complete_in_order_and_reads_in_fastavro(broker: Broker) {
    let topics = Topics::new(broker, true).await;
    let brokers = topics.broker.bootstrap_servers();
    let run = publish(
        &topics.path,
        brokers,
        &[
            "--count",
            "600",
            "--seed",
            "11",
            "--start-ms",
            &START.to_string(),
            "--rate",
            "20000",
        ],
    );
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout
            .starts_with("Sent 600 events (0 deliberately malformed), 0 failed"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("Recompute with --seed 11 --start-ms 1763000000000."),
        "{}",
        run.stdout
    );

    let expected: HashMap<Uuid, AnyEvent> = regenerate(11, 600, 0.0)
        .into_iter()
        .map(|g| (g.event.event_id(), g.event))
        .collect();
    let records = topics.consume(600).await;
    let decoder = Decoder::default();
    let dir = tempfile::tempdir().unwrap();
    let mut last_status: HashMap<String, (i64, OrderStatus)> = HashMap::new();
    for (i, record) in records.iter().enumerate() {
        let event = decoder
            .decode(record.payload().unwrap(), DecodeHint::default())
            .expect("decodes");
        assert_eq!(
            expected.get(&event.event_id()),
            Some(&event),
            "exactly the recomputed event"
        );
        let key = std::str::from_utf8(record.key().unwrap()).unwrap();
        let (want_key, bytes_json) = match &event {
            AnyEvent::User(e) => (e.user_id.clone(), codec::encode(e, Encoding::Json)),
            AnyEvent::Order(e) => (e.order_id.clone(), codec::encode(e, Encoding::Json)),
            AnyEvent::Chat(e) => (e.room_id.clone(), codec::encode(e, Encoding::Json)),
            AnyEvent::Search(e) => (e.user_id.clone(), codec::encode(e, Encoding::Json)),
        };
        assert_eq!(key, want_key);
        if let AnyEvent::Order(o) = &event {
            // Within a partition an order's steps arrive in lifecycle order.
            if let Some((offset, before)) =
                last_status.insert(o.order_id.clone(), (record.offset(), o.status))
            {
                assert!(
                    record.offset() > offset && o.status != before,
                    "{}: {before:?} then {:?}",
                    o.order_id,
                    o.status
                );
            }
        }
        std::fs::write(
            dir.path().join(format!("{i:04}.avro")),
            record.payload().unwrap(),
        )
        .unwrap();
        std::fs::write(dir.path().join(format!("{i:04}.json")), bytes_json).unwrap();
    }
    // An independent Avro implementation, given only schemas/.
    let output = shopstream_tests::succeeds(
        Command::new("python3")
            .arg(repo_root().join("tests/avro_interop.py"))
            .arg(repo_root().join("schemas"))
            .arg(dir.path()),
        "python3 runs",
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("600 samples decoded and equal"));
}

on_both_brokers!(
    json_format_and_poison_records:
        |broker| json_format_and_poison_records(broker)
);

async fn json_format_and_poison_records(broker: Broker) {
    let topics = Topics::new(broker, true).await;
    let brokers = topics.broker.bootstrap_servers();
    let run = publish(
        &topics.path,
        brokers,
        &[
            "--count",
            "300",
            "--seed",
            "5",
            "--start-ms",
            &START.to_string(),
            "--rate",
            "20000",
            "--format",
            "json",
            "--poison-rate",
            "0.2",
        ],
    );
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let generated = regenerate(5, 300, 0.2);
    let poisoned = generated.iter().filter(|g| g.poison.is_some()).count();
    assert!(poisoned > 30, "{poisoned}");
    assert!(
        run.stdout.contains(&format!(
            "Sent 300 events ({poisoned} deliberately malformed)"
        )),
        "{}",
        run.stdout
    );
    let expected_poison: std::collections::HashSet<Uuid> = generated
        .iter()
        .filter(|g| g.poison.is_some())
        .map(|g| g.event.event_id())
        .collect();
    let decoder = Decoder::default();
    let mut failures = 0;
    for record in topics.consume(300).await {
        assert_eq!(
            header(&record, headers::CONTENT_TYPE),
            Some(content_type::JSON)
        );
        let hint = DecodeHint {
            content_type: header(&record, headers::CONTENT_TYPE),
            event_type: header(&record, headers::EVENT_TYPE).and_then(EventType::from_name),
        };
        match decoder.decode(record.payload().unwrap(), hint) {
            Ok(event) => assert!(!expected_poison.contains(&event.event_id())),
            Err(_) => failures += 1,
        }
    }
    assert_eq!(
        failures, poisoned,
        "exactly the poisoned records fail to decode"
    );
}

on_both_brokers!(
    bad_input_fails_fast_with_a_clear_error:
        |broker| bad_input_fails_fast_with_a_clear_error(broker)
);

async fn bad_input_fails_fast_with_a_clear_error(broker: Broker) {
    let topics = Topics::new(broker, true).await;
    let brokers = topics.broker.bootstrap_servers();
    let run = publish(&topics.path, brokers, &["--mix", "user=1,spam=2"]);
    assert_ne!(run.code, 0);
    assert!(
        run.stderr
            .contains("unknown event type \"spam\"; valid: user, order, chat, search"),
        "{}",
        run.stderr
    );
    for rate in ["0", "-5", "fast"] {
        let run = publish(&topics.path, brokers, &["--rate", rate]);
        assert_ne!(run.code, 0);
        assert!(
            run.stderr
                .contains("must be a positive number of events per second"),
            "{}",
            run.stderr
        );
    }
    let run = publish(&topics.path, brokers, &["--poison-rate", "2"]);
    assert!(
        run.stderr.contains("must be a fraction from 0 to 1"),
        "{}",
        run.stderr
    );

    let missing = Topics::new(broker, false).await;
    let started = Instant::now();
    let run = publish(&missing.path, brokers, &["--count", "10"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("is not on the cluster")
            && run.stderr.contains("shopstream-topics apply"),
        "{}",
        run.stderr
    );
    assert!(started.elapsed() < Duration::from_secs(15));

    let port = shopstream_tests::free_port().unwrap();
    let started = Instant::now();
    let run = publish(
        &topics.path,
        &format!("127.0.0.1:{port}"),
        &["--count", "10"],
    );
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!(
            "cannot reach Kafka at 127.0.0.1:{port} within 10s"
        )),
        "{}",
        run.stderr
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

on_both_brokers!(
    sigterm_stops_publishing_and_flushes_everything_sent:
        |broker| sigterm_stops_publishing_and_flushes_everything_sent(broker)
);

async fn sigterm_stops_publishing_and_flushes_everything_sent(broker: Broker) {
    let topics = Topics::new(broker, true).await;
    let brokers = topics.broker.bootstrap_servers();
    let child = Command::new(BIN)
        .args(["--brokers", brokers, "--set"])
        .arg(format!("catalog.path={}", topics.path.display()))
        .args(["--rate", "300", "--duration", "5m"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let started = Instant::now();
    let output = child.wait_with_output().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "drains promptly"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let sent: usize = stdout
        .strip_prefix("Sent ")
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a summary: {stdout}"));
    assert!(sent > 100, "{stdout}");
    assert!(stdout.contains(", 0 failed"), "{stdout}");
    // Everything it reported sent is on the cluster.
    assert_eq!(topics.consume(sent).await.len(), sent);
}
