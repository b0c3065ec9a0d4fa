//! A record as fetched: raw bytes and headers, kept so a failed record can be
//! forwarded unchanged, plus where it first came from.

use std::sync::Arc;

use backbone::headers;
use rdkafka::message::{BorrowedMessage, Headers, Message};

/// Where a record first entered the system, carried through retry tiers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub topic: String,
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
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub timestamp_ms: Option<i64>,
    pub origin: Origin,
}

impl Fetched {
    pub fn from_message(message: &BorrowedMessage<'_>, topic: Arc<str>) -> Self {
        let headers: Vec<(String, Option<Vec<u8>>)> = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        let timestamp_ms = message.timestamp().to_millis();
        let mut fetched = Self {
            origin: Origin {
                topic: topic.to_string(),
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
                topic: topic.to_owned(),
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
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    pub fn bytes(&self) -> usize {
        self.payload.as_ref().map_or(0, Vec::len) + self.key.as_ref().map_or(0, Vec::len)
    }
}
