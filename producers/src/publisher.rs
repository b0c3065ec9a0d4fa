//! Typed publishers: `publisher.send(&order_event)` finds the topic and the
//! key field in the catalog, encodes the event, adds the standard headers and
//! hands it to an idempotent producer. The local queue is bounded: when it is
//! full, sending waits (backpressure); nothing is ever dropped.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backbone::catalog::Catalog;
use backbone::codec::{self, Encoding};
use backbone::events::{AnyEvent, Event, EventType};
use backbone::headers::{self, Traceparent};
use backbone::kafka::KafkaConnection;
use backbone::schema::SchemaRegistry;
use backbone::telemetry;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

/// How a publisher writes.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    pub encoding: Encoding,
    /// librdkafka's local queue bound (`queue.buffering.max.messages`).
    /// Sends wait for room past it.
    pub max_queued: usize,
    /// How long the producer gathers a batch (`linger.ms`).
    pub linger_ms: u64,
}

impl Default for PublishOptions {
    fn default() -> Self {
        Self {
            encoding: Encoding::Avro,
            max_queued: 100_000,
            linger_ms: 5,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the catalog has no topic for {0} events")]
    NoTopic(EventType),
    #[error("{event} has no string field {field:?} to use as the key")]
    NoKey { event: EventType, field: String },
    #[error("cannot create the producer: {0}")]
    Client(KafkaError),
    #[error("cannot reach Kafka at {brokers} within {timeout:?}: {error}")]
    Unreachable {
        brokers: String,
        timeout: Duration,
        error: KafkaError,
    },
    #[error("topic {topic} is not on the cluster at {brokers}; create it with `shopstream-topics apply`")]
    MissingTopic { topic: String, brokers: String },
    #[error("delivery to {topic} failed: {error}")]
    Delivery { topic: String, error: KafkaError },
    #[error("flush: {0}")]
    Flush(KafkaError),
}

/// Where one event type goes.
#[derive(Debug, Clone)]
struct Route {
    topic: Arc<str>,
    key_field: String,
}

/// Publishes every event type of a catalog through one idempotent producer.
pub struct Publisher {
    producer: FutureProducer,
    /// By `EventType::index`; `None` when the catalog has no topic for it.
    routes: [Option<Route>; 4],
    encoding: Encoding,
    brokers: String,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("routes", &self.routes)
            .field("encoding", &self.encoding)
            .finish()
    }
}

/// A record handed to the client, not yet acknowledged.
#[must_use = "a pending record is only delivered once awaited"]
pub struct Pending {
    delivery: DeliveryFuture,
    topic: Arc<str>,
    bytes: usize,
    /// Wall-clock time: the clock read that also stamps the produced-at
    /// header.
    enqueued: SystemTime,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("topic", &self.topic)
            .finish()
    }
}

/// An acknowledged record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    pub partition: i32,
    pub offset: i64,
    /// Payload bytes.
    pub bytes: usize,
    /// From handing the record to the client to the broker's acknowledgement.
    pub latency: Duration,
}

impl Pending {
    /// Waits for the broker's acknowledgement.
    pub async fn delivered(self) -> Result<Delivered, PublishError> {
        let topic = self.topic;
        match self.delivery.await {
            Ok(Ok(delivery)) => Ok(Delivered {
                partition: delivery.partition,
                offset: delivery.offset,
                bytes: self.bytes,
                latency: self.enqueued.elapsed().unwrap_or_default(),
            }),
            Ok(Err((error, _))) => Err(PublishError::Delivery {
                topic: topic.to_string(),
                error,
            }),
            Err(_) => Err(PublishError::Delivery {
                topic: topic.to_string(),
                error: KafkaError::Canceled,
            }),
        }
    }
}

/// A publisher bound to one event type: `publisher.typed::<OrderEvent>().send(&order)`.
#[derive(Debug)]
pub struct TypedPublisher<'a, E> {
    inner: &'a Publisher,
    _event: PhantomData<fn(&E)>,
}

impl<E: Event> TypedPublisher<'_, E> {
    pub async fn send(&self, event: &E) -> Result<Delivered, PublishError> {
        self.inner.send(event).await
    }
}

/// A malformed record, for exercising dead-lettering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Poison {
    /// Bytes that are neither Avro nor JSON.
    Garbage,
    /// A valid record cut in half.
    Truncated,
    /// A valid record under a fingerprint no schema has.
    UnknownFingerprint,
}

impl Publisher {
    /// A publisher for the catalog's topics on `connection`.
    pub fn new(
        connection: &KafkaConnection,
        catalog: &Catalog,
        options: &PublishOptions,
    ) -> Result<Self, PublishError> {
        let mut config = connection.client_config();
        config
            .set("enable.idempotence", "true")
            .set("linger.ms", options.linger_ms.to_string())
            .set(
                "queue.buffering.max.messages",
                options.max_queued.max(1).to_string(),
            );
        let producer: FutureProducer = config.create().map_err(PublishError::Client)?;
        let routes = EventType::ALL.map(|event| {
            catalog
                .topics
                .iter()
                .find(|t| t.event == event)
                .map(|t| Route {
                    topic: t.name.as_str().into(),
                    key_field: t.key.clone(),
                })
        });
        Ok(Self {
            producer,
            routes,
            encoding: options.encoding,
            brokers: connection.bootstrap_servers().to_owned(),
        })
    }

    pub fn typed<E: Event>(&self) -> TypedPublisher<'_, E> {
        TypedPublisher {
            inner: self,
            _event: PhantomData,
        }
    }

    fn route(&self, event: EventType) -> Result<&Route, PublishError> {
        self.routes[event.index()]
            .as_ref()
            .ok_or(PublishError::NoTopic(event))
    }

    /// The topic `event` goes to.
    pub fn topic(&self, event: EventType) -> Result<&str, PublishError> {
        self.route(event).map(|r| &*r.topic)
    }

    /// Fails unless the cluster answers within `timeout` and has every topic
    /// this publisher writes to. A full metadata request never auto-creates.
    pub fn check_topics(&self, timeout: Duration) -> Result<(), PublishError> {
        let metadata = self
            .producer
            .client()
            .fetch_metadata(None, timeout)
            .map_err(|error| PublishError::Unreachable {
                brokers: self.brokers.clone(),
                timeout,
                error,
            })?;
        let mut wanted: Vec<&Route> = self.routes.iter().flatten().collect();
        wanted.sort_by(|a, b| a.topic.cmp(&b.topic));
        for route in wanted {
            if !metadata
                .topics()
                .iter()
                .any(|t| t.name() == &*route.topic && t.error().is_none())
            {
                return Err(PublishError::MissingTopic {
                    topic: route.topic.to_string(),
                    brokers: self.brokers.clone(),
                });
            }
        }
        Ok(())
    }

    /// Sends one event and waits for its acknowledgement.
    pub async fn send<E: Event>(&self, event: &E) -> Result<Delivered, PublishError> {
        self.enqueue(event, None).await?.delivered().await
    }

    /// Hands one event to the client, waiting while the local queue is full;
    /// await the returned [`Pending`] for the acknowledgement. `traceparent`
    /// continues the caller's trace; without it the event id is the trace id.
    pub async fn enqueue<E: Event>(
        &self,
        event: &E,
        traceparent: Option<&str>,
    ) -> Result<Pending, PublishError> {
        let route = self.route(E::TYPE)?;
        let key = event
            .string_field(&route.key_field)
            .ok_or_else(|| PublishError::NoKey {
                event: E::TYPE,
                field: route.key_field.clone(),
            })?;
        let payload = codec::encode(event, self.encoding);
        let ids = (event.event_id(), event.occurred_at());
        self.enqueue_bytes(&route.topic, key, payload, E::TYPE, ids, traceparent)
            .await
    }

    /// Enqueues every event (each optionally malformed on purpose), then
    /// waits for every acknowledgement: the in-flight window is the whole
    /// slice, so this is for seeding and tests rather than a steady stream.
    pub async fn publish_all<'a>(
        &self,
        events: impl IntoIterator<Item = (&'a AnyEvent, Option<Poison>)>,
    ) -> Result<Vec<Delivered>, PublishError> {
        let span = publish_span();
        let trace = telemetry::traceparent(&span);
        let trace = trace.as_ref().map(Traceparent::as_str);
        let mut pending = Vec::new();
        for (event, poison) in events {
            pending.push(self.enqueue_any(event, poison, trace).await?);
        }
        span.record("events", pending.len() as u64);
        drop(span);
        let mut delivered = Vec::with_capacity(pending.len());
        for p in pending {
            delivered.push(p.delivered().await?);
        }
        Ok(delivered)
    }

    /// Like [`Publisher::enqueue`] for an event of any type, optionally
    /// malformed on purpose (same key and headers, broken payload).
    pub async fn enqueue_any(
        &self,
        event: &AnyEvent,
        poison: Option<Poison>,
        traceparent: Option<&str>,
    ) -> Result<Pending, PublishError> {
        let Some(poison) = poison else {
            return match event {
                AnyEvent::User(e) => self.enqueue(e, traceparent).await,
                AnyEvent::Order(e) => self.enqueue(e, traceparent).await,
                AnyEvent::Chat(e) => self.enqueue(e, traceparent).await,
                AnyEvent::Search(e) => self.enqueue(e, traceparent).await,
            };
        };
        let kind = event.event_type();
        let route = self.route(kind)?;
        let (key, good) = match event {
            AnyEvent::User(e) => (
                e.string_field(&route.key_field),
                codec::encode(e, self.encoding),
            ),
            AnyEvent::Order(e) => (
                e.string_field(&route.key_field),
                codec::encode(e, self.encoding),
            ),
            AnyEvent::Chat(e) => (
                e.string_field(&route.key_field),
                codec::encode(e, self.encoding),
            ),
            AnyEvent::Search(e) => (
                e.string_field(&route.key_field),
                codec::encode(e, self.encoding),
            ),
        };
        let key = key.ok_or_else(|| PublishError::NoKey {
            event: kind,
            field: route.key_field.clone(),
        })?;
        let payload = match poison {
            Poison::Garbage => b"\x89POISON \xff\xfe not an event".to_vec(),
            Poison::Truncated => good[..good.len() / 2].to_vec(),
            Poison::UnknownFingerprint => {
                let mut bytes = good;
                if bytes.len() >= 10 && bytes.starts_with(&[0xC3, 0x01]) {
                    bytes[2..10].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0xde, 0xad, 0xbe, 0xef]);
                } else {
                    bytes.insert(0, b'#');
                }
                bytes
            }
        };
        let ids = (event.event_id(), event.occurred_at());
        self.enqueue_bytes(&route.topic, key, payload, kind, ids, traceparent)
            .await
    }

    /// Hands an encoded record with the standard headers to the client,
    /// waiting while its local queue is full.
    async fn enqueue_bytes(
        &self,
        topic: &Arc<str>,
        key: &str,
        payload: Vec<u8>,
        event: EventType,
        (event_id, occurred_at): (uuid::Uuid, i64),
        traceparent: Option<&str>,
    ) -> Result<Pending, PublishError> {
        // One clock read stamps the produced-at header and starts the
        // delivery latency (read again only after waiting for room).
        let mut enqueued = SystemTime::now();
        let headers = record_headers(
            event,
            self.encoding,
            event_id,
            occurred_at,
            traceparent,
            enqueued,
        );
        let bytes = payload.len();
        let mut record = FutureRecord::to(topic)
            .key(key)
            .payload(&payload)
            .headers(headers);
        let mut wait = Duration::from_micros(200);
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    return Ok(Pending {
                        delivery,
                        topic: topic.clone(),
                        bytes,
                        enqueued,
                    })
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // Backpressure: wait for deliveries to make room, never drop.
                    record = back;
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(20));
                    enqueued = SystemTime::now();
                }
                Err((error, _)) => {
                    return Err(PublishError::Delivery {
                        topic: topic.to_string(),
                        error,
                    })
                }
            }
        }
    }

    /// Waits until every queued record is acknowledged or failed.
    pub fn flush(&self, timeout: Duration) -> Result<(), PublishError> {
        self.producer.flush(timeout).map_err(PublishError::Flush)
    }

    /// Records handed to the client and not yet acknowledged.
    pub fn in_flight(&self) -> i32 {
        self.producer.in_flight_count()
    }
}

/// A span for one batch of events handed to Kafka (`events` is recorded
/// at its end); none when traces are off.
pub fn publish_span() -> tracing::Span {
    backbone::traced_span!("publish", events = tracing::field::Empty)
}

/// The standard headers: event type, content type, schema fingerprint,
/// traceparent (the caller's, such as its publish span's, or one whose
/// trace id is the event id) and produced-at. Formatted on the stack: this runs for every record.
fn record_headers(
    event: EventType,
    encoding: Encoding,
    event_id: uuid::Uuid,
    occurred_at: i64,
    traceparent: Option<&str>,
    produced_at: SystemTime,
) -> OwnedHeaders {
    let fingerprint = SchemaRegistry::global().current(event).fingerprint_hex();
    let produced_at = produced_at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default();
    let mut millis = [0u8; 20];
    let millis = decimal(&mut millis, produced_at);
    let derived = headers::traceparent_for(event_id, occurred_at as u64 | 1);
    let trace = traceparent.unwrap_or(derived.as_str());
    OwnedHeaders::new_with_capacity(5)
        .insert(Header {
            key: headers::EVENT_TYPE,
            value: Some(event.name()),
        })
        .insert(Header {
            key: headers::CONTENT_TYPE,
            value: Some(encoding.content_type()),
        })
        .insert(Header {
            key: headers::SCHEMA_FINGERPRINT,
            value: Some(fingerprint),
        })
        .insert(Header {
            key: headers::TRACEPARENT,
            value: Some(trace),
        })
        .insert(Header {
            key: headers::PRODUCED_AT,
            value: Some(millis),
        })
}

/// `value` in decimal, written into `buffer` without allocating (or the
/// formatting machinery); returns the digits.
fn decimal(buffer: &mut [u8; 20], mut value: u64) -> &[u8] {
    let mut start = buffer.len();
    loop {
        start -= 1;
        buffer[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            return &buffer[start..];
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn decimal_writes_every_digit() {
        let mut buffer = [0u8; 20];
        for value in [0, 7, 10, 1_733_400_000_123, u64::MAX] {
            assert_eq!(
                super::decimal(&mut buffer, value),
                value.to_string().as_bytes()
            );
        }
    }
}
