//! Moving a failed record to a retry tier or a dead-letter queue: original
//! key and payload, original headers, plus the failure headers. The write is
//! retried until the broker acknowledges it; only then may the caller store
//! the record's offset.
//!
//! Exactly once: a crash (or a new owner) between a forward and the commit
//! of its source offset redoes the records since that commit. Each
//! assignment of a partition keeps a [`Ledger`]: before its first forward
//! to a topic it reads back what its group wrote there since the
//! partition's first record was written, and a record found there is not
//! written again. No Kafka transaction is needed, so it holds on any broker
//! (the mock cluster does not commit a transaction's offsets, and tansu
//! 0.6.0 shows aborted records to `read_committed` readers).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backbone::headers;
use backbone::shutdown::Shutdown;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;

use crate::fetched::Fetched;
use crate::readback::header;

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
    /// Replaced when librdkafka fails it for good (see [`Forwarder::send`]).
    producer: RwLock<Arc<FutureProducer>>,
    /// Its settings, for a replacement.
    producer_config: ClientConfig,
    /// The connection's settings, for reading back what was written.
    config: ClientConfig,
    /// `kafka.gap_confirmation_ms`, for the read-backs.
    gap_confirmation: Duration,
    group: String,
}

/// Why `producer` can write nothing more, if it cannot: a fatal error,
/// or the broker refusing its producer id or epoch, which it answers to
/// every later write too (tansu 0.6.0's `ProducerFenced` after cut
/// connections; librdkafka does not take that as fatal).
fn failed_for_good(producer: &FutureProducer, error: &KafkaError) -> Option<String> {
    if let Some((code, reason)) = producer.client().fatal_error() {
        return Some(format!("{code}: {reason}"));
    }
    match error {
        KafkaError::MessageProduction(
            RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::InvalidProducerIdMapping
            | RDKafkaErrorCode::UnknownProducerId
            | RDKafkaErrorCode::OutOfOrderSequenceNumber,
        ) => Some(error.to_string()),
        _ => None,
    }
}

/// Why a write was not acknowledged.
enum Unsent {
    Abandoned,
    /// The broker answered with an error: not written.
    Refused(KafkaError),
    /// It may have landed all the same.
    MaybeWritten(KafkaError),
}

/// How long a forward may take before librdkafka fails it.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(15);

/// How far before a partition's first record a [`Ledger`] reads back: the
/// clock skew allowed between the hosts that wrote the record and the
/// forward.
const CLOCK_SKEW_MS: i64 = 5 * 60 * 1_000;

/// Where a forwarded record first came from: topic, partition, offset.
type OriginKey = (String, i32, i64);

/// What a partition's group had already forwarded when the partition was
/// assigned, per destination topic, read back on the first forward there.
#[derive(Debug)]
pub struct Ledger {
    /// Destination topics are read from here on: the first record's
    /// timestamp less the clock skew (everything when unknown).
    since_ms: Option<i64>,
    written: HashMap<String, HashSet<OriginKey>>,
}

impl Ledger {
    /// For a partition whose first record since its assignment was
    /// written at `first_timestamp_ms`: anything it had forwarded before
    /// was written after that.
    pub fn since(first_timestamp_ms: Option<i64>) -> Self {
        Self {
            since_ms: first_timestamp_ms.map(|t| t.min(now_ms()) - CLOCK_SKEW_MS),
            written: HashMap::new(),
        }
    }
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
    /// Writes with `config`'s client settings for `group`; its read-backs
    /// take a gap as real after `gap_confirmation`.
    pub fn new(
        config: &ClientConfig,
        gap_confirmation: Duration,
        group: &str,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        // The read-backs are consumers: given the producer's settings,
        // librdkafka would warn about each at every read.
        let mut producer = config.clone();
        // A consumer's static membership means nothing to a producer
        // (librdkafka warns about it at start).
        producer.remove("group.instance.id");
        producer
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            // A delivery that does not complete is failed and retried (with a
            // warning) rather than awaited for librdkafka's default 5 minutes.
            .set(
                "message.timeout.ms",
                DELIVERY_TIMEOUT.as_millis().to_string(),
            );
        Ok(Self {
            producer: RwLock::new(Arc::new(producer.create()?)),
            producer_config: producer,
            config: config.clone(),
            gap_confirmation,
            group: group.to_owned(),
        })
    }

    /// Writes `record` to `topic` with the failure headers, unless `ledger`
    /// shows this group wrote it there already (also after a write whose
    /// fate is unknown); waits for the acknowledgement, retrying with
    /// backoff until `stop` fires.
    pub async fn forward(
        &self,
        topic: &str,
        record: &Fetched,
        failure: &Failure,
        tier: Option<usize>,
        ledger: &mut Ledger,
        stop: &Shutdown,
    ) -> Result<(), Abandoned> {
        let origin = &record.origin;
        let key: OriginKey = (origin.topic.to_string(), origin.partition, origin.offset);
        let mut delay = Duration::from_millis(100);
        loop {
            if !ledger.written.contains_key(topic) {
                let written = self.written_to(topic, ledger.since_ms, stop).await?;
                ledger.written.insert(topic.to_owned(), written);
            }
            if ledger.written.get(topic).is_some_and(|w| w.contains(&key)) {
                tracing::info!(topic, origin = %origin.topic, partition = origin.partition, offset = origin.offset, "Already forwarded before a restart or rebalance; not written again.");
                return Ok(());
            }
            let error = match self.send(topic, record, failure, tier, stop).await {
                Ok(()) => {
                    if let Some(written) = ledger.written.get_mut(topic) {
                        written.insert(key);
                    }
                    return Ok(());
                }
                Err(Unsent::Abandoned) => return Err(Abandoned),
                Err(Unsent::Refused(error)) => error,
                // What the topic holds says whether it landed, before it is
                // written again.
                Err(Unsent::MaybeWritten(error)) => {
                    ledger.written.remove(topic);
                    error
                }
            };
            tracing::warn!(topic, %error, retry_in = ?delay, "Forwarding a failed record failed; retrying.");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => return Err(Abandoned),
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// The producer in use.
    fn producer(&self) -> Arc<FutureProducer> {
        self.producer.read().expect("producer lock").clone()
    }

    /// Puts a new producer (a new producer id) in place of `failed`, unless
    /// another forward did already: see [`failed_for_good`]. Seen on tansu
    /// 0.6.0 after its connections were cut: `ProducerFenced` for every
    /// dead letter after it, and the read models never caught up.
    fn replace(&self, failed: &Arc<FutureProducer>, error: &str) {
        let mut current = self.producer.write().expect("producer lock");
        if !Arc::ptr_eq(&current, failed) {
            return;
        }
        match self.producer_config.create() {
            Ok(producer) => {
                tracing::warn!(%error, "The forwarding producer failed for good; a new one takes over.");
                *current = Arc::new(producer);
            }
            Err(create) => {
                tracing::error!(%error, %create, "The forwarding producer failed for good and a new one cannot be made; retrying.");
            }
        }
    }

    /// Waits up to `timeout` for every forward handed to Kafka, including
    /// those whose caller gave up waiting.
    pub fn flush_in_flight(&self, timeout: Duration) {
        if let Err(error) = self.producer().flush(timeout) {
            tracing::warn!(%error, "Forwards still unacknowledged after {timeout:?}; one may land after the next owner read its ledger and be written twice.");
        }
    }

    /// The origins of the records this group wrote to `topic` since
    /// `since_ms`, read until Kafka answers or `stop` fires.
    async fn written_to(
        &self,
        topic: &str,
        since_ms: Option<i64>,
        stop: &Shutdown,
    ) -> Result<HashSet<OriginKey>, Abandoned> {
        let mut delay = Duration::from_millis(100);
        loop {
            let (config, owned_topic, gap) =
                (self.config.clone(), topic.to_owned(), self.gap_confirmation);
            let read = tokio::task::spawn_blocking(move || {
                crate::readback::read_since(&config, &owned_topic, since_ms, gap)
            });
            let read = tokio::select! {
                read = read => read,
                _ = stop.cancelled() => return Err(Abandoned),
            };
            match read {
                Ok(Ok(records)) => {
                    return Ok(records
                        .iter()
                        .filter(|m| {
                            header(m, headers::CONSUMER_GROUP).as_deref() == Some(&self.group)
                        })
                        .filter_map(|m| {
                            let number = |name| header(m, name)?.parse::<i64>().ok();
                            Some((
                                header(m, headers::ORIGINAL_TOPIC)?,
                                number(headers::ORIGINAL_PARTITION)? as i32,
                                number(headers::ORIGINAL_OFFSET)?,
                            ))
                        })
                        .collect())
                }
                Ok(Err(error)) => {
                    tracing::warn!(topic, error = format!("{error:#}"), retry_in = ?delay, "Reading back what was forwarded failed; retrying.");
                }
                Err(error) => {
                    tracing::warn!(topic, %error, retry_in = ?delay, "Reading back what was forwarded failed; retrying.");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => return Err(Abandoned),
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Writes `record` to `topic` with the failure headers and waits for
    /// the acknowledgement, or until `stop` fires. A write that may have
    /// landed unacknowledged (timed out, or its producer failed for good,
    /// then replaced) is told apart from one the broker refused: the caller
    /// must look before writing it again.
    async fn send(
        &self,
        topic: &str,
        record: &Fetched,
        failure: &Failure,
        tier: Option<usize>,
        stop: &Shutdown,
    ) -> Result<(), Unsent> {
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
        let kept = record.headers();
        let mut out = OwnedHeaders::new_with_capacity(kept.len() + added.len());
        for (key, value) in kept {
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
        if let Some(key) = record.key() {
            message = message.key(key);
        }
        if let Some(payload) = record.payload() {
            message = message.payload(payload);
        }
        tracing::debug!(topic, origin = %origin.topic, partition = origin.partition, offset = origin.offset, "Forwarding a failed record.");
        let producer = self.producer();
        let sent = tokio::select! {
            result = producer.send(message, Duration::from_secs(5)) => result,
            _ = stop.cancelled() => return Err(Unsent::Abandoned),
        };
        let Err((error, _)) = sent else {
            return Ok(());
        };
        if let Some(reason) = failed_for_good(&producer, &error) {
            self.replace(&producer, &reason);
            return Err(Unsent::MaybeWritten(error));
        }
        if matches!(
            error,
            KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut)
        ) {
            return Err(Unsent::MaybeWritten(error));
        }
        Err(Unsent::Refused(error))
    }
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}
