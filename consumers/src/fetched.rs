//! A record as fetched: raw bytes and headers, kept so a failed record can be
//! forwarded unchanged, plus where it first came from.

use std::sync::Arc;

use backbone::headers;
use rdkafka::message::{BorrowedMessage, Headers, Message};

/// Where a record first entered the system, carried through retry tiers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub attempts: u32,
    pub first_failure_at: Option<i64>,
}

#[derive(Debug)]
pub struct Fetched {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub origin: Origin,
    body: Body,
}

/// A record's key, payload and headers.
#[derive(Debug)]
enum Body {
    /// librdkafka's message itself, read in place: no copy, and its headers
    /// parsed only if something asks for them (most records never do).
    Held(HeldMessage),
    Copied {
        key: Option<Vec<u8>>,
        payload: Option<Vec<u8>>,
        headers: RawHeaders,
    },
}

/// A record's headers as fetched, in one buffer: two allocations per record
/// instead of two per header (a published event carries five).
#[derive(Debug, Clone, Default)]
pub struct RawHeaders {
    bytes: Vec<u8>,
    /// Per header: the key's end in `bytes`, then its value's end, if any.
    /// Each starts where the one before ended.
    ends: Vec<(u32, Option<u32>)>,
}

impl RawHeaders {
    fn from_message(message: &BorrowedMessage<'_>) -> Self {
        let Some(headers) = message.headers() else {
            return Self::default();
        };
        let mut raw = Self {
            bytes: Vec::with_capacity(256),
            ends: Vec::with_capacity(headers.count()),
        };
        for header in headers.iter() {
            raw.push(header.key, header.value);
        }
        raw
    }

    pub fn push(&mut self, key: &str, value: Option<&[u8]>) {
        self.bytes.extend_from_slice(key.as_bytes());
        let key_end = self.bytes.len() as u32;
        let value_end = value.map(|v| {
            self.bytes.extend_from_slice(v);
            self.bytes.len() as u32
        });
        self.ends.push((key_end, value_end));
    }

    /// Every header in order: its key and value.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Option<&[u8]>)> {
        let mut start = 0usize;
        self.ends.iter().map(move |&(key_end, value_end)| {
            let key_end = key_end as usize;
            // Keys went in as &str, so they are UTF-8.
            let key = std::str::from_utf8(&self.bytes[start..key_end]).unwrap_or_default();
            start = key_end;
            let value = value_end.map(|end| {
                let value = &self.bytes[key_end..end as usize];
                start = end as usize;
                value
            });
            (key, value)
        })
    }

    /// The value of the first header named `name`, compared as bytes (no
    /// UTF-8 check of every key on the way: this runs for each record).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        let mut start = 0usize;
        for &(key_end, value_end) in &self.ends {
            let key_end = key_end as usize;
            let key = &self.bytes[start..key_end];
            start = value_end.map_or(key_end, |end| end as usize);
            if key == name.as_bytes() {
                return value_end.map(|end| &self.bytes[key_end..end as usize]);
            }
        }
        None
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
}

impl Fetched {
    /// A record made of copies of `message`'s bytes.
    pub fn from_message(message: &BorrowedMessage<'_>, topic: Arc<str>) -> Self {
        let body = Body::Copied {
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers: RawHeaders::from_message(message),
        };
        Self::at(topic, position(message), body).with_origin_from_headers()
    }

    /// A record that keeps `message` itself until it is dropped, and with
    /// it the fetched response its bytes live in; `client` is the consumer
    /// it came from (librdkafka wants its messages gone before the client).
    /// For records handled soon: a retry tier's, which wait out the tier's
    /// delay, are better copied.
    pub fn held(
        message: BorrowedMessage<'_>,
        topic: Arc<str>,
        client: Arc<dyn std::any::Any + Send + Sync>,
    ) -> Self {
        let at = position(&message);
        Self::at(topic, at, Body::Held(HeldMessage::new(message, client)))
    }

    /// A record made by hand.
    pub fn new(
        topic: Arc<str>,
        (partition, offset): (i32, i64),
        key: Option<Vec<u8>>,
        payload: Option<Vec<u8>>,
        headers: RawHeaders,
        timestamp_ms: Option<i64>,
    ) -> Self {
        let body = Body::Copied {
            key,
            payload,
            headers,
        };
        Self::at(topic, (partition, offset, timestamp_ms), body).with_origin_from_headers()
    }

    /// A record at `(partition, offset, timestamp)` of `topic`, first seen there.
    fn at(topic: Arc<str>, (partition, offset, timestamp_ms): Position, body: Body) -> Self {
        Self {
            origin: Origin {
                topic: topic.clone(),
                partition,
                offset,
                timestamp_ms,
                attempts: 0,
                first_failure_at: None,
            },
            topic,
            partition,
            offset,
            timestamp_ms,
            body,
        }
    }

    /// A record from a retry tier names its first home in its headers.
    fn with_origin_from_headers(mut self) -> Self {
        if let Some(topic) = self.header(headers::ORIGINAL_TOPIC) {
            let number = |name| self.header(name).and_then(|v| v.parse::<i64>().ok());
            self.origin = Origin {
                topic: topic.into(),
                partition: number(headers::ORIGINAL_PARTITION).unwrap_or(-1) as i32,
                offset: number(headers::ORIGINAL_OFFSET).unwrap_or(-1),
                timestamp_ms: number(headers::ORIGINAL_TIMESTAMP),
                attempts: number(headers::ATTEMPTS).unwrap_or(0) as u32,
                first_failure_at: number(headers::FIRST_FAILURE_AT),
            };
        }
        self
    }

    pub fn key(&self) -> Option<&[u8]> {
        match &self.body {
            Body::Held(held) => held.message().key(),
            Body::Copied { key, .. } => key.as_deref(),
        }
    }

    pub fn payload(&self) -> Option<&[u8]> {
        match &self.body {
            Body::Held(held) => held.message().payload(),
            Body::Copied { payload, .. } => payload.as_deref(),
        }
    }

    /// The value of the first header named `name`, if it is UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        let value = match &self.body {
            Body::Held(held) => held.headers().and_then(|hs| headers::value(hs, name)),
            Body::Copied { headers, .. } => headers.get(name),
        };
        value.and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Every header in order: its key and value.
    pub fn headers(&self) -> Vec<(&str, Option<&[u8]>)> {
        match &self.body {
            Body::Held(held) => held
                .headers()
                .map(|hs| hs.iter().map(|h| (h.key, h.value)).collect())
                .unwrap_or_default(),
            Body::Copied { headers, .. } => headers.iter().collect(),
        }
    }

    pub fn bytes(&self) -> usize {
        counted_bytes(self.key(), self.payload())
    }
}

/// What a record counts for against the in-flight byte bound: its key and
/// payload (the same before it is taken as after).
pub fn counted_bytes(key: Option<&[u8]>, payload: Option<&[u8]>) -> usize {
    payload.map_or(0, <[u8]>::len) + key.map_or(0, <[u8]>::len)
}

/// A message's partition, offset and timestamp.
type Position = (i32, i64, Option<i64>);

fn position(message: &BorrowedMessage<'_>) -> Position {
    (
        message.partition(),
        message.offset(),
        message.timestamp().to_millis(),
    )
}

use held::HeldMessage;

/// The one place that holds a librdkafka message past its borrow.
#[allow(unsafe_code)]
mod held {
    use std::any::Any;
    use std::sync::{Arc, Once};

    use rdkafka::message::{BorrowedHeaders, BorrowedMessage, Message};

    /// A fetched message kept beyond the poll that returned it.
    pub struct HeldMessage {
        /// Declared first, so dropped before `_client`.
        message: BorrowedMessage<'static>,
        /// librdkafka parses a message's headers on first access and caches
        /// them in the message: that first access happens once, here.
        headers_parsed: Once,
        _client: Arc<dyn Any + Send + Sync>,
    }

    impl std::fmt::Debug for HeldMessage {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("HeldMessage")
                .field("partition", &self.message.partition())
                .field("offset", &self.message.offset())
                .finish()
        }
    }

    // SAFETY: the message is librdkafka's own (an event of its own, freed
    // when dropped, from any thread); once handed out, its key, payload and
    // fields are only read; the one write, the header parse, runs once
    // under `headers_parsed`, and after it librdkafka only reads the cache.
    unsafe impl Send for HeldMessage {}
    unsafe impl Sync for HeldMessage {}

    impl HeldMessage {
        /// Takes over `message`. `client` must be (or keep alive) the
        /// client it came from: it outlives the message here.
        pub fn new<'a>(message: BorrowedMessage<'a>, client: Arc<dyn Any + Send + Sync>) -> Self {
            // SAFETY: only the lifetime changes. What the message borrowed
            // is the client, which `_client` keeps alive until after it.
            let message = unsafe {
                std::mem::transmute::<BorrowedMessage<'a>, BorrowedMessage<'static>>(message)
            };
            Self {
                message,
                headers_parsed: Once::new(),
                _client: client,
            }
        }

        pub fn message(&self) -> &BorrowedMessage<'_> {
            &self.message
        }

        pub fn headers(&self) -> Option<&BorrowedHeaders> {
            self.headers_parsed.call_once(|| {
                let _ = self.message.headers();
            });
            self.message.headers()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RawHeaders;

    #[test]
    fn headers_come_back_in_order_with_their_values() {
        let mut raw = RawHeaders::default();
        assert!(raw.is_empty());
        raw.push("event-type", Some(b"order_event"));
        raw.push("empty", Some(b""));
        raw.push("none", None);
        raw.push("", Some(b"\x00\xff"));
        raw.push("traceparent", Some(b"00-abc-def-01"));
        let seen: Vec<(&str, Option<&[u8]>)> = raw.iter().collect();
        assert_eq!(
            seen,
            vec![
                ("event-type", Some(&b"order_event"[..])),
                ("empty", Some(&b""[..])),
                ("none", None),
                ("", Some(&b"\x00\xff"[..])),
                ("traceparent", Some(&b"00-abc-def-01"[..])),
            ]
        );
        assert_eq!(raw.len(), 5);
        assert_eq!(raw.get("empty"), Some(&b""[..]));
        assert_eq!(raw.get("none"), None);
        assert_eq!(raw.get("traceparent"), Some(&b"00-abc-def-01"[..]));
        assert_eq!(raw.get("absent"), None);
    }
}
