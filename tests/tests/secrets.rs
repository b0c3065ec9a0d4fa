//! A sentinel password set everywhere a secret can be set never reaches the
//! logs, at any level, including librdkafka's own configuration dump.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backbone::config::{Config, ConfigArgs};
use rdkafka::producer::{BaseProducer, Producer};

const SENTINEL: &str = "sentinel-Pa55w0rd-c0ffee";

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("capture lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_sentinel_password_never_appears_in_any_log() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .init();

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

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    // The capture works, librdkafka's debug output included.
    assert!(logs.contains("Configuration loaded."), "{logs}");
    assert!(
        logs.contains("librdkafka") || logs.contains("rdkafka"),
        "{logs}"
    );
    assert!(logs.contains("alice"), "non-secret settings are shown");
    assert!(!logs.contains(SENTINEL), "the sentinel leaked:\n{logs}");
}
