//! Moving a failed record to a retry tier or a dead-letter queue: original
//! key and payload, original headers, plus the failure headers. The write is
//! retried until the broker acknowledges it; only then may the caller store
//! the record's offset.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backbone::headers;
use backbone::shutdown::Shutdown;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use crate::fetched::Fetched;

/// Why a record is being moved on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub class: String,
    pub message: String,
    /// Handler attempts including this delivery's.
    pub attempts: u32,
}

/// The forward was given up because the worker is stopping or lost the
/// partition; the offset must not be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("forwarding abandoned: the worker is stopping or lost the partition")]
pub struct Abandoned;

pub struct Forwarder {
    producer: FutureProducer,
    group: String,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("group", &self.group)
            .finish()
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

impl Forwarder {
    pub fn new(config: &ClientConfig, group: &str) -> Result<Self, rdkafka::error::KafkaError> {
        let mut config = config.clone();
        // A consumer's static membership means nothing to a producer
        // (librdkafka warns about it at start).
        config.remove("group.instance.id");
        config
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            // A delivery that does not complete is failed and retried (with a
            // warning) rather than awaited for librdkafka's default 5 minutes.
            .set("message.timeout.ms", "15000");
        Ok(Self {
            producer: config.create()?,
            group: group.to_owned(),
        })
    }

    /// Writes `record` to `topic` with the failure headers; waits for the
    /// acknowledgement, retrying with backoff until `stop` fires.
    pub async fn forward(
        &self,
        topic: &str,
        record: &Fetched,
        failure: &Failure,
        tier: Option<usize>,
        stop: &Shutdown,
    ) -> Result<(), Abandoned> {
        let now = now_ms().to_string();
        let origin = &record.origin;
        let first = origin
            .first_failure_at
            .map_or_else(|| now.clone(), |t| t.to_string());
        let mut added: Vec<(&str, String)> = vec![
            (headers::ERROR_CLASS, failure.class.clone()),
            (headers::ERROR_MESSAGE, truncate(&failure.message, 1_000)),
            (headers::ORIGINAL_TOPIC, origin.topic.to_string()),
            (headers::ORIGINAL_PARTITION, origin.partition.to_string()),
            (headers::ORIGINAL_OFFSET, origin.offset.to_string()),
            (headers::CONSUMER_GROUP, self.group.clone()),
            (headers::ATTEMPTS, failure.attempts.to_string()),
            (headers::FIRST_FAILURE_AT, first),
            (headers::LAST_FAILURE_AT, now),
        ];
        if let Some(ts) = origin.timestamp_ms {
            added.push((headers::ORIGINAL_TIMESTAMP, ts.to_string()));
        }
        if let Some(tier) = tier {
            added.push((headers::RETRY_TIER, tier.to_string()));
        }
        let mut delay = Duration::from_millis(100);
        loop {
            let mut out = OwnedHeaders::new_with_capacity(record.headers.len() + added.len());
            for (key, value) in record.headers.iter() {
                if !headers::FAILURE_HEADERS.contains(&key) {
                    out = out.insert(Header { key, value });
                }
            }
            for (key, value) in &added {
                out = out.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                });
            }
            let mut message = FutureRecord::<[u8], [u8]>::to(topic).headers(out);
            if let Some(key) = &record.key {
                message = message.key(key.as_slice());
            }
            if let Some(payload) = &record.payload {
                message = message.payload(payload.as_slice());
            }
            tracing::debug!(topic, origin = %origin.topic, partition = origin.partition, offset = origin.offset, "Forwarding a failed record.");
            let sent = tokio::select! {
                result = self.producer.send(message, Duration::from_secs(5)) => result,
                _ = stop.cancelled() => return Err(Abandoned),
            };
            match sent {
                Ok(_) => return Ok(()),
                Err((error, _)) => {
                    tracing::warn!(topic, %error, retry_in = ?delay, "Forwarding a failed record failed; retrying.");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.cancelled() => return Err(Abandoned),
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}
