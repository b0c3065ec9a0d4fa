//! The harness itself: every test after this relies on it handing out a
//! working Kafka and ClickHouse, and on faults being injectable.

use std::collections::BTreeMap;
use std::time::Duration;

use backbone::catalog::Catalog;
use backbone::codec::{encode, Decoder, Encoding};
use backbone::config::KafkaSettings;
use backbone::events::{ChatMessage, Event};
use backbone::kafka::KafkaConnection;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaApiKey;
use rdkafka::Message;
use shopstream_tests::{clickhouse, kafka, mock_cluster, repo_root};

const WAIT: Duration = Duration::from_secs(30);

async fn produce(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: &[u8],
) -> anyhow::Result<()> {
    producer
        .send(FutureRecord::to(topic).key(key).payload(payload), WAIT)
        .await
        .map_err(|(e, _)| e)?;
    Ok(())
}

/// (key, payload) of `count` records from `topic`.
async fn consume(
    bootstrap: &str,
    topic: &str,
    count: usize,
) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let records = shopstream_tests::consume(bootstrap, &[topic], count, WAIT).await?;
    Ok(records
        .iter()
        .map(|m| {
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            (key, m.payload().unwrap_or_default().to_vec())
        })
        .collect())
}

#[tokio::test]
async fn records_round_trip_through_the_test_kafka_in_key_order() {
    let kafka = kafka().await;
    let topic = kafka.topic("roundtrip", 3).await.unwrap();
    let producer: FutureProducer = kafka.client_config().create().unwrap();
    for i in 0..30 {
        let key = format!("key-{}", i % 5);
        produce(&producer, &topic, &key, format!("{i}").as_bytes())
            .await
            .unwrap();
    }
    let records = consume(kafka.bootstrap_servers(), &topic, 30)
        .await
        .unwrap();
    let mut per_key: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (key, payload) in records {
        per_key
            .entry(key)
            .or_default()
            .push(String::from_utf8(payload).unwrap().parse().unwrap());
    }
    assert_eq!(per_key.len(), 5);
    for (key, values) in per_key {
        let mut sorted = values.clone();
        sorted.sort();
        assert_eq!(values, sorted, "order within {key}");
        assert_eq!(values.len(), 6);
    }
}

#[tokio::test]
async fn each_test_gets_its_own_clickhouse_database() {
    #[derive(clickhouse::Row, serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Row {
        id: u64,
        name: String,
    }
    let server = clickhouse().await;
    let (a, b) = (
        server.database().await.unwrap(),
        server.database().await.unwrap(),
    );
    assert_ne!(a.name, b.name);
    for db in [&a, &b] {
        db.client
            .query("CREATE TABLE t (id UInt64, name String) ENGINE = MergeTree ORDER BY id")
            .execute()
            .await
            .unwrap();
    }
    let mut insert = a.client.insert::<Row>("t").await.unwrap();
    for id in 0..100u64 {
        insert
            .write(&Row {
                id,
                name: format!("n{id}"),
            })
            .await
            .unwrap();
    }
    insert.end().await.unwrap();
    let count: u64 = a
        .client
        .query("SELECT count() FROM t")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(count, 100);
    let row: Row = a
        .client
        .query("SELECT id, name FROM t WHERE id = ?")
        .bind(42)
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(
        row,
        Row {
            id: 42,
            name: "n42".into()
        }
    );
    let other: u64 = b
        .client
        .query("SELECT count() FROM t")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(other, 0);
}

#[tokio::test]
async fn embedded_bootstrap_starts_a_cluster_with_every_catalog_topic() {
    let catalog = Catalog::load(&repo_root().join("topics.yaml"), Some("dev")).unwrap();
    let settings = KafkaSettings::default();
    assert_eq!(settings.bootstrap_servers, "embedded://");
    let connection = KafkaConnection::connect(&settings, &catalog).unwrap();
    assert!(connection.is_embedded());
    let producer: FutureProducer = connection.client_config().create().unwrap();
    let metadata = producer.client().fetch_metadata(None, WAIT).unwrap();
    let live: BTreeMap<String, usize> = metadata
        .topics()
        .iter()
        .map(|t| (t.name().to_owned(), t.partitions().len()))
        .collect();
    for desired in catalog.desired_topics() {
        assert_eq!(
            live.get(&desired.name),
            Some(&(desired.partitions as usize)),
            "{}",
            desired.name
        );
    }

    let message = ChatMessage {
        event_id: uuid::Uuid::new_v4(),
        occurred_at: 1_700_000_000_000,
        room_id: "room-7".into(),
        user_id: "user-1".into(),
        text: "hello".into(),
        flagged: false,
    };
    let topic = &catalog.topic("chat-messages").unwrap();
    let key = message.string_field(&topic.key).unwrap().to_owned();
    produce(
        &producer,
        &topic.name,
        &key,
        &encode(&message, Encoding::Avro),
    )
    .await
    .unwrap();
    let records = consume(connection.bootstrap_servers(), &topic.name, 1)
        .await
        .unwrap();
    assert_eq!(records[0].0, "room-7");
    let decoded: ChatMessage = Decoder::default().decode_as(&records[0].1, None).unwrap();
    assert_eq!(decoded, message);
}

#[tokio::test]
async fn an_unreachable_broker_is_an_error_within_the_timeout_not_a_hang() {
    let port = shopstream_tests::free_port().unwrap();
    let settings = KafkaSettings {
        bootstrap_servers: format!("127.0.0.1:{port}"),
        request_timeout_ms: 2_000,
        ..Default::default()
    };
    let config = backbone::kafka::client_config(&settings, &settings.bootstrap_servers);
    let producer: FutureProducer = config.create().unwrap();
    let started = std::time::Instant::now();
    let result = producer
        .client()
        .fetch_metadata(None, Duration::from_secs(3));
    assert!(result.is_err(), "metadata from a closed port");
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// The fault-injection handle works: with every broker down a produce fails
/// within its timeout, and succeeds once they are back.
#[tokio::test]
async fn mock_cluster_faults_are_injectable() {
    let cluster = mock_cluster(3);
    cluster.create_topic("faults", 2, 3).unwrap();
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("message.timeout.ms", "3000")
        .set("reconnect.backoff.max.ms", "200")
        .create()
        .unwrap();
    produce(&producer, "faults", "k", b"before").await.unwrap();

    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 1000],
    );
    let err = produce(&producer, "faults", "k", b"refused")
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("NotEnoughReplicas") || err.to_string().contains("timed out"),
        "{err}"
    );
    cluster.clear_request_errors(RDKafkaApiKey::Produce);

    for broker in 1..=3 {
        cluster.broker_down(broker).unwrap();
    }
    assert!(produce(&producer, "faults", "k", b"down").await.is_err());
    for broker in 1..=3 {
        cluster.broker_up(broker).unwrap();
    }
    // Delivered once the brokers are back, however long reconnecting takes.
    let mut delivered = false;
    for _ in 0..10 {
        if produce(&producer, "faults", "k", b"after").await.is_ok() {
            delivered = true;
            break;
        }
    }
    assert!(delivered, "produce succeeds after the brokers come back");
    producer.flush(WAIT).unwrap();
}

/// The test runner refuses a bad setting before it builds anything, naming
/// the variable and what it got.
#[test]
fn scripts_run_tests_refuses_bad_settings_naming_them() {
    for (variable, value) in [
        ("TEST_JOBS", "0"),
        ("TEST_JOBS", "two"),
        ("RELIABILITY_TEST_THREADS", "-4"),
    ] {
        let output = std::process::Command::new(repo_root().join("scripts/run-tests"))
            .env(variable, value)
            .output()
            .expect("scripts/run-tests runs (python3)");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(1),
            "{variable}={value}: {stderr}"
        );
        assert!(
            stderr.contains(&format!(
                "scripts/run-tests: {variable} must be a whole number above 0, got '{value}'"
            )),
            "{variable}={value}: {stderr}"
        );
    }
}
