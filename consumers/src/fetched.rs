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

#[derive(Debug, Clone)]
pub struct Fetched {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: RawHeaders,
    pub timestamp_ms: Option<i64>,
    pub origin: Origin,
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
    pub fn from_message(message: &BorrowedMessage<'_>, topic: Arc<str>) -> Self {
        let headers = RawHeaders::from_message(message);
        let timestamp_ms = message.timestamp().to_millis();
        let mut fetched = Self {
            origin: Origin {
                topic: topic.clone(),
                partition: message.partition(),
                offset: message.offset(),
                timestamp_ms,
                attempts: 0,
                first_failure_at: None,
            },
            topic,
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
            timestamp_ms,
        };
        // A record from a retry tier names its first home in its headers.
        if let Some(topic) = fetched.header(headers::ORIGINAL_TOPIC) {
            let number = |name| fetched.header(name).and_then(|v| v.parse::<i64>().ok());
            fetched.origin = Origin {
                topic: topic.into(),
                partition: number(headers::ORIGINAL_PARTITION).unwrap_or(-1) as i32,
                offset: number(headers::ORIGINAL_OFFSET).unwrap_or(-1),
                timestamp_ms: number(headers::ORIGINAL_TIMESTAMP),
                attempts: number(headers::ATTEMPTS).unwrap_or(0) as u32,
                first_failure_at: number(headers::FIRST_FAILURE_AT),
            };
        }
        fetched
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    pub fn bytes(&self) -> usize {
        self.payload.as_ref().map_or(0, Vec::len) + self.key.as_ref().map_or(0, Vec::len)
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
