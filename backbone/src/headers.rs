//! Kafka header names every published record carries, in one place for
//! publishers, consumers and dead-letter tooling.

/// The event type's schema name, such as `order_event`.
pub const EVENT_TYPE: &str = "event-type";
/// The wire format, one of [`crate::codec::content_type`].
pub const CONTENT_TYPE: &str = "content-type";
/// Hex CRC-64-AVRO fingerprint of the schema the payload follows.
pub const SCHEMA_FINGERPRINT: &str = "schema-fingerprint";
/// W3C trace context, so a record can be followed across services.
pub const TRACEPARENT: &str = "traceparent";
/// When the publisher handed the record to the client, UTC milliseconds.
pub const PRODUCED_AT: &str = "produced-at";

// Added to records moved to a retry tier or a dead-letter queue. The
// `original-*` values always name the record's first home, however many
// tiers it passed through.

/// A stable name for why the record failed, such as `truncated` or `retry_exhausted`.
pub const ERROR_CLASS: &str = "error-class";
/// The last failure's message.
pub const ERROR_MESSAGE: &str = "error-message";
pub const ORIGINAL_TOPIC: &str = "original-topic";
pub const ORIGINAL_PARTITION: &str = "original-partition";
pub const ORIGINAL_OFFSET: &str = "original-offset";
/// The original record's Kafka timestamp, UTC milliseconds.
pub const ORIGINAL_TIMESTAMP: &str = "original-timestamp";
/// The consumer group that gave up on it.
pub const CONSUMER_GROUP: &str = "consumer-group";
/// Handler attempts so far, across tiers.
pub const ATTEMPTS: &str = "attempts";
pub const FIRST_FAILURE_AT: &str = "first-failure-at";
pub const LAST_FAILURE_AT: &str = "last-failure-at";
/// Which retry tier the record is in (0 the first).
pub const RETRY_TIER: &str = "retry-tier";

/// How many times `dlq replay` has sent this record back to its topic. Kept
/// through failures, so the replay loop guard sees it again in the DLQ.
pub const REPLAY_COUNT: &str = "replay-count";

/// Every header the runtime sets on a failed record, so forwarding replaces
/// rather than repeats them.
pub const FAILURE_HEADERS: [&str; 11] = [
    ERROR_CLASS,
    ERROR_MESSAGE,
    ORIGINAL_TOPIC,
    ORIGINAL_PARTITION,
    ORIGINAL_OFFSET,
    ORIGINAL_TIMESTAMP,
    CONSUMER_GROUP,
    ATTEMPTS,
    FIRST_FAILURE_AT,
    LAST_FAILURE_AT,
    RETRY_TIER,
];

/// A W3C `traceparent` for a record with no caller-supplied trace: the trace
/// id is the event id, so the record's trace can be found from the event.
pub fn traceparent_for(event_id: uuid::Uuid, span: u64) -> Traceparent {
    Traceparent::new(event_id.as_u128(), span, 1)
}

/// The value of the first header named `name` (`None` when there is none,
/// or it has no value).
pub fn value<'a, H: rdkafka::message::Headers>(headers: &'a H, name: &str) -> Option<&'a [u8]> {
    headers.iter().find(|h| h.key == name)?.value
}

/// A version-00 `traceparent` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Traceparent([u8; 55]);

impl Traceparent {
    /// `00-<trace id>-<parent span id>-<flags>`, built on the stack: it is
    /// made for every record.
    pub fn new(trace_id: u128, span_id: u64, flags: u8) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        /// Two digits per byte of `value`, most significant first.
        fn hex(out: &mut [u8], value: &[u8]) {
            for (pair, byte) in out.chunks_exact_mut(2).zip(value) {
                pair[0] = HEX[usize::from(byte >> 4)];
                pair[1] = HEX[usize::from(byte & 0xf)];
            }
        }
        let mut bytes = [0u8; 55];
        bytes[..3].copy_from_slice(b"00-");
        hex(&mut bytes[3..35], &trace_id.to_be_bytes());
        bytes[35] = b'-';
        hex(&mut bytes[36..52], &span_id.to_be_bytes());
        bytes[52] = b'-';
        hex(&mut bytes[53..], &[flags]);
        Traceparent(bytes)
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("built from ASCII")
    }
}

/// The trace id, parent span id and flags of a well-formed version-00
/// `traceparent`.
pub fn parse_traceparent(value: &str) -> Option<(u128, u64, u8)> {
    if !is_traceparent(value) {
        return None;
    }
    let trace = u128::from_str_radix(&value[3..35], 16).ok()?;
    let span = u64::from_str_radix(&value[36..52], 16).ok()?;
    let flags = u8::from_str_radix(&value[53..55], 16).ok()?;
    Some((trace, span, flags))
}

/// Whether `value` is a well-formed version-00 `traceparent`.
pub fn is_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && parts[1] != "0".repeat(32)
        && hex(parts[2], 16)
        && parts[2] != "0".repeat(16)
        && hex(parts[3], 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_traceparents_are_well_formed() {
        let id = uuid::Uuid::from_u128(0x0af7651916cd43dd8448eb211c80319c);
        let value = traceparent_for(id, 0xb7ad6b7169203331);
        assert_eq!(
            value.as_str(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        assert!(is_traceparent(value.as_str()));
        assert_eq!(
            traceparent_for(id, 1).as_str(),
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000001-01"
        );
        assert!(!is_traceparent(
            "00-00000000000000000000000000000000-b7ad6b7169203331-01"
        ));
        assert!(!is_traceparent("garbage"));
    }

    #[test]
    fn traceparents_parse_back_to_their_parts() {
        let value = Traceparent::new(0x0af7651916cd43dd8448eb211c80319c, 0xb7ad6b7169203331, 0);
        assert_eq!(
            value.as_str(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
        );
        assert_eq!(
            parse_traceparent(value.as_str()),
            Some((0x0af7651916cd43dd8448eb211c80319c, 0xb7ad6b7169203331, 0))
        );
        assert_eq!(
            parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331"),
            None
        );
        assert_eq!(
            parse_traceparent("00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01"),
            None
        );
    }
}
