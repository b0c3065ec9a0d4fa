//! A sentinel password set everywhere a secret can be set never reaches the
//! logs, at any level, including librdkafka's own configuration dump.

use std::time::Duration;

use backbone::config::{Config, ConfigArgs};
use rdkafka::producer::{BaseProducer, Producer};

const SENTINEL: &str = "sentinel-Pa55w0rd-c0ffee";

#[test]
fn a_sentinel_password_never_appears_in_any_log() {
    let captured = shopstream_tests::captured_log(tracing::Level::TRACE);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shopstream.yaml");
    std::fs::write(
        &file,
        format!(
            "kafka:\n  bootstrap_servers: 127.0.0.1:{}\n  request_timeout_ms: 1000\n  client:\n    security.protocol: SASL_PLAINTEXT\n    sasl.mechanism: PLAIN\n    sasl.username: alice\n    debug: all\nclickhouse:\n  password: {SENTINEL}\n",
            shopstream_tests::free_port().unwrap()
        ),
    )
    .unwrap();
    let args = ConfigArgs {
        config: Some(file),
        ..Default::default()
    };
    let env = vec![(
        "SHOPSTREAM_KAFKA__CLIENT__SASL_PASSWORD".to_owned(),
        SENTINEL.to_owned(),
    )];
    let config = Config::load_from(&args, env).unwrap();
    tracing::trace!(?config, "Configuration loaded.");
    tracing::info!(kafka = ?config.kafka, clickhouse = ?config.clickhouse, "Settings.");

    let client_config =
        backbone::kafka::client_config(&config.kafka, &config.kafka.bootstrap_servers);
    let producer: BaseProducer = client_config.create().unwrap();
    let _ = producer
        .client()
        .fetch_metadata(None, Duration::from_secs(2));
    drop(producer);

    let logs = captured.text();
    // The capture works, librdkafka's debug output included.
    assert!(logs.contains("Configuration loaded."), "{logs}");
    assert!(
        logs.contains("librdkafka") || logs.contains("rdkafka"),
        "{logs}"
    );
    assert!(logs.contains("alice"), "non-secret settings are shown");
    assert!(!logs.contains(SENTINEL), "the sentinel leaked:\n{logs}");
}
