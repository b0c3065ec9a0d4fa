//! Wire formats for events: Avro single-object encoding (the default: no
//! registry needed), JSON, and reading the Confluent wire format. The decoder
//! picks the format from the magic bytes and the `content-type` header, and a
//! record written with any older schema version decodes into today's type.

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::LazyLock;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use serde::{Deserialize, Serialize};

use crate::events::{AnyEvent, ChatMessage, Event, EventType, OrderEvent, SearchQuery, UserEvent};
use crate::schema::{hex, SchemaRegistry, SchemaVersion};

/// `content-type` header values, one per wire format.
pub mod content_type {
    pub const AVRO: &str = "application/vnd.shopstream.avro";
    pub const JSON: &str = "application/json";
    pub const CONFLUENT_AVRO: &str = "application/vnd.confluent.avro";
}

const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xC3, 0x01];
const CONFLUENT_MAGIC: u8 = 0x00;

/// How events are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Avro single-object encoding: magic, schema fingerprint, datum.
    #[default]
    Avro,
    /// The event as a JSON object.
    Json,
}

impl Encoding {
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Avro => content_type::AVRO,
            Self::Json => content_type::JSON,
        }
    }
}

/// Why bytes could not be read as an event. Every variant is permanent: the
/// same bytes will never decode, so a consumer dead-letters them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty payload")]
    Empty,
    #[error("truncated {format} record: {detail}")]
    Truncated {
        format: &'static str,
        detail: String,
    },
    #[error(
        "unknown schema fingerprint {fingerprint}: written with a schema this build does not ship"
    )]
    UnknownFingerprint { fingerprint: String },
    #[error("unknown Confluent schema id {id}: not in the configured schema registry")]
    UnknownSchemaId { id: u32 },
    #[error("not Avro or JSON: payload starts with {first_bytes}{hint}")]
    NotAvroOrJson { first_bytes: String, hint: String },
    #[error("record does not match {event} schema v{version}: {reason}")]
    SchemaMismatch {
        event: EventType,
        version: u32,
        reason: String,
    },
    #[error("JSON is not a valid {event}: {reason}")]
    InvalidJson { event: EventType, reason: String },
    #[error("JSON payload without an event type: set the event-type header or read it from a catalog topic")]
    MissingEventType,
    #[error("expected a {expected} but the record is a {found}")]
    UnexpectedEventType {
        expected: EventType,
        found: EventType,
    },
}

impl DecodeError {
    /// A stable name for the `error-class` dead-letter header and metrics.
    pub fn class(&self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::Truncated { .. } => "truncated",
            Self::UnknownFingerprint { .. } => "unknown_fingerprint",
            Self::UnknownSchemaId { .. } => "unknown_schema_id",
            Self::NotAvroOrJson { .. } => "not_avro_or_json",
            Self::SchemaMismatch { .. } => "schema_mismatch",
            Self::InvalidJson { .. } => "invalid_json",
            Self::MissingEventType => "missing_event_type",
            Self::UnexpectedEventType { .. } => "unexpected_event_type",
        }
    }

    /// Every value [`Self::class`] can take (metrics start each at zero,
    /// so a rate sees the first dead letter).
    pub const CLASSES: [&'static str; 9] = [
        "empty",
        "truncated",
        "unknown_fingerprint",
        "unknown_schema_id",
        "not_avro_or_json",
        "schema_mismatch",
        "invalid_json",
        "missing_event_type",
        "unexpected_event_type",
    ];
}

/// The current schema of each event for `serde_avro_fast`, by
/// `EventType::index`: it writes and reads today's records straight from
/// and into the Rust types, several times faster than apache-avro's serde
/// path (BENCHMARKS.md). Older versions, which need resolving to today's
/// schema, and every record it refuses go through apache-avro.
static FAST: LazyLock<[serde_avro_fast::Schema; 4]> = LazyLock::new(|| {
    let registry = SchemaRegistry::global();
    EventType::ALL.map(|event| {
        registry
            .current(event)
            .source
            .parse()
            .expect("embedded schemas are valid (tested)")
    })
});

/// Encodes an event in the given format, with the current schema for Avro.
pub fn encode<E: Event>(event: &E, encoding: Encoding) -> Vec<u8> {
    // Room for every generated event (Avro at most 195 bytes, JSON 547):
    // growing the buffer reallocates, and glibc's realloc skips its thread
    // cache; with librdkafka freeing its copies on another thread, the 15%
    // of JSON events past 256 bytes cost the publisher 0.7 µs per event.
    let mut out = Vec::with_capacity(match encoding {
        Encoding::Avro => 256,
        Encoding::Json => 768,
    });
    encode_into(event, encoding, &mut out);
    out
}

/// Like [`encode`], appending to a reusable buffer.
pub fn encode_into<E: Event>(event: &E, encoding: Encoding, out: &mut Vec<u8>) {
    match encoding {
        Encoding::Avro => {
            let schema = SchemaRegistry::global().current(E::TYPE);
            out.extend_from_slice(&schema.single_object_header());
            crate::avro_datum::write(event, out);
        }
        Encoding::Json => crate::json_datum::write(event, out),
    }
}

/// The writer schema of each Confluent schema id, as a schema registry
/// reports it. Empty unless a registry is configured.
#[derive(Debug, Clone, Default)]
pub struct ConfluentSchemaIds {
    ids: HashMap<u32, (EventType, u32)>,
}

impl ConfluentSchemaIds {
    /// Records that registry id `id` is version `version` of `event`'s schema.
    pub fn insert(&mut self, id: u32, event: EventType, version: u32) {
        self.ids.insert(id, (event, version));
    }
}

/// What the consumer knows about a record besides its bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct DecodeHint<'a> {
    /// The `content-type` header, if present.
    pub content_type: Option<&'a str>,
    /// The event type from the `event-type` header or the topic's catalog entry.
    pub event_type: Option<EventType>,
}

impl<'a> DecodeHint<'a> {
    /// The hint for `payload`, whose `content-type` header is looked up
    /// only when its bytes do not name their format: reading a record's
    /// headers costs librdkafka a parse and an allocation per header.
    pub fn lazy(
        payload: &[u8],
        event_type: Option<EventType>,
        content_type: impl FnOnce() -> Option<&'a str>,
    ) -> Self {
        Self {
            content_type: (!Decoder::self_describing(payload))
                .then(content_type)
                .flatten(),
            event_type,
        }
    }
}

/// Reads events in any supported wire format.
#[derive(Debug, Clone, Default)]
pub struct Decoder {
    confluent: ConfluentSchemaIds,
}

impl Decoder {
    pub fn new(confluent: ConfluentSchemaIds) -> Self {
        Self { confluent }
    }

    /// Whether `payload` names its format in its first bytes (Avro single
    /// object, Confluent): then `decode` ignores the hint's content type,
    /// and a caller may leave out the header lookup.
    pub fn self_describing(payload: &[u8]) -> bool {
        matches!(payload, [0xC3, 0x01, ..] | [CONFLUENT_MAGIC, ..])
    }

    /// Decodes a record whose type is known from the bytes or the hint.
    pub fn decode(&self, payload: &[u8], hint: DecodeHint<'_>) -> Result<AnyEvent, DecodeError> {
        let declared_json = hint
            .content_type
            .is_some_and(|ct| ct.eq_ignore_ascii_case(content_type::JSON));
        let event = match payload {
            [] => return Err(DecodeError::Empty),
            [0xC3, 0x01, ..] => decode_single_object(payload)?,
            [CONFLUENT_MAGIC, ..] => self.decode_confluent(payload)?,
            _ if declared_json || looks_like_json(payload) => {
                decode_json(payload, hint.event_type)?
            }
            _ => {
                let hint = match hint.content_type {
                    Some(ct) => format!(" (content-type {ct})"),
                    None => String::new(),
                };
                return Err(DecodeError::NotAvroOrJson {
                    first_bytes: hex(&payload[..payload.len().min(8)]),
                    hint,
                });
            }
        };
        match hint.event_type {
            Some(expected) if expected != event.event_type() => {
                Err(DecodeError::UnexpectedEventType {
                    expected,
                    found: event.event_type(),
                })
            }
            _ => Ok(event),
        }
    }

    /// Decodes a record that must be an `E`.
    pub fn decode_as<E: Event>(
        &self,
        payload: &[u8],
        content_type: Option<&str>,
    ) -> Result<E, DecodeError> {
        let hint = DecodeHint {
            content_type,
            event_type: Some(E::TYPE),
        };
        let event = self.decode(payload, hint)?;
        Ok(E::from_any(event).expect("decode checked the event type"))
    }

    fn decode_confluent(&self, payload: &[u8]) -> Result<AnyEvent, DecodeError> {
        let Some(id_bytes) = payload.get(1..5) else {
            return Err(DecodeError::Truncated {
                format: "Confluent",
                detail: format!("{} bytes, the header needs 5", payload.len()),
            });
        };
        let id = u32::from_be_bytes(id_bytes.try_into().expect("4 bytes"));
        let &(event, version) = self
            .confluent
            .ids
            .get(&id)
            .ok_or(DecodeError::UnknownSchemaId { id })?;
        let schema = SchemaRegistry::global()
            .version(event, version)
            .ok_or(DecodeError::UnknownSchemaId { id })?;
        decode_datum(schema, &payload[5..], "Confluent")
    }
}

fn looks_like_json(payload: &[u8]) -> bool {
    payload
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'{')
}

fn decode_single_object(payload: &[u8]) -> Result<AnyEvent, DecodeError> {
    debug_assert!(payload.starts_with(&SINGLE_OBJECT_MAGIC));
    let Some(fingerprint) = payload.get(2..10) else {
        return Err(DecodeError::Truncated {
            format: "Avro single-object",
            detail: format!("{} bytes, the header needs 10", payload.len()),
        });
    };
    let fingerprint: [u8; 8] = fingerprint.try_into().expect("8 bytes");
    let schema = SchemaRegistry::global()
        .by_fingerprint(&fingerprint)
        .ok_or_else(|| DecodeError::UnknownFingerprint {
            fingerprint: hex(&fingerprint),
        })?;
    decode_datum(schema, &payload[10..], "Avro single-object")
}

/// A reader per schema version, built once (building one resolves every
/// name in the schema): plain for the current versions, resolving to the
/// current version for older ones. In `SchemaRegistry::versions` order.
static READERS: LazyLock<Vec<GenericDatumReader<'static>>> = LazyLock::new(|| {
    let registry = SchemaRegistry::global();
    registry
        .versions()
        .iter()
        .map(|writer| {
            let current = registry.current(writer.event);
            if std::ptr::eq(writer, current) {
                GenericDatumReader::builder(&writer.schema).build()
            } else {
                GenericDatumReader::builder(&writer.schema)
                    .reader_schema(&current.schema)
                    .build()
            }
            .expect("embedded schemas resolve (tested)")
        })
        .collect()
});

/// Decodes one datum written with `writer`, resolving it to the current
/// schema when it is an older version.
fn decode_datum(
    writer: &'static SchemaVersion,
    datum: &[u8],
    format: &'static str,
) -> Result<AnyEvent, DecodeError> {
    match crate::avro_datum::read(writer, datum) {
        Some(event) => Ok(event),
        None => decode_datum_general(writer, datum, format),
    }
}

/// [`decode_datum`] for every record: what the schema-specialised reader
/// leaves, or refuses, goes here.
fn decode_datum_general(
    writer: &'static SchemaVersion,
    datum: &[u8],
    format: &'static str,
) -> Result<AnyEvent, DecodeError> {
    let registry = SchemaRegistry::global();
    let current = registry.current(writer.event);
    let mismatch = |reason: String| DecodeError::SchemaMismatch {
        event: writer.event,
        version: writer.version,
        reason,
    };
    let mut cursor = Cursor::new(datum);
    let index = registry
        .versions()
        .iter()
        .position(|v| std::ptr::eq(v, writer))
        .expect("writer comes from the registry");
    let reader = &READERS[index];
    if std::ptr::eq(writer, current) {
        if let Some(event) = decode_current_fast(writer.event, datum) {
            return Ok(event);
        }
        // Today's schema: straight into the Rust type, no intermediate tree.
        let decoded = match writer.event {
            EventType::User => reader
                .read_deser::<UserEvent>(&mut cursor)
                .map(AnyEvent::User),
            EventType::Order => reader
                .read_deser::<OrderEvent>(&mut cursor)
                .map(AnyEvent::Order),
            EventType::Chat => reader
                .read_deser::<ChatMessage>(&mut cursor)
                .map(AnyEvent::Chat),
            EventType::Search => reader
                .read_deser::<SearchQuery>(&mut cursor)
                .map(AnyEvent::Search),
        };
        let event = decoded.map_err(|e| {
            if cursor.position() as usize >= datum.len() {
                DecodeError::Truncated {
                    format,
                    detail: format!("the record ends after {} datum bytes: {e}", datum.len()),
                }
            } else {
                mismatch(e.to_string())
            }
        })?;
        let trailing = datum.len() - cursor.position() as usize;
        if trailing > 0 {
            return Err(mismatch(format!("{trailing} bytes left after the record")));
        }
        return Ok(event);
    }
    // A failure with every byte consumed means the record was cut short.
    let failed = |cursor: &Cursor<&[u8]>, reason: String| {
        if cursor.position() as usize >= datum.len() {
            DecodeError::Truncated {
                format,
                detail: format!(
                    "the record ends after {} datum bytes: {reason}",
                    datum.len()
                ),
            }
        } else {
            mismatch(reason)
        }
    };
    let value = reader
        .read_value(&mut cursor)
        .map_err(|e| failed(&cursor, e.to_string()))?;
    let event = value_to_event(writer.event, &value).map_err(|e| failed(&cursor, e.to_string()))?;
    let trailing = datum.len() - cursor.position() as usize;
    if trailing > 0 {
        return Err(mismatch(format!("{trailing} bytes left after the record")));
    }
    Ok(event)
}

/// Today's schema through `serde_avro_fast`: `None` unless the whole datum
/// reads as one record, so that apache-avro, run on what this refuses,
/// names the error exactly as it always has.
fn decode_current_fast(event: EventType, datum: &[u8]) -> Option<AnyEvent> {
    use serde::de::Deserialize as _;
    use std::io::BufRead as _;
    // Read straight from the slice: strings come borrowed from it, and a
    // length prefix past its end is an error, never an allocation.
    let mut state = serde_avro_fast::de::DeserializerState::from_slice(datum, &FAST[event.index()]);
    let decoded = match event {
        EventType::User => UserEvent::deserialize(state.deserializer()).map(AnyEvent::User),
        EventType::Order => OrderEvent::deserialize(state.deserializer()).map(AnyEvent::Order),
        EventType::Chat => ChatMessage::deserialize(state.deserializer()).map(AnyEvent::Chat),
        EventType::Search => SearchQuery::deserialize(state.deserializer()).map(AnyEvent::Search),
    }
    .ok()?;
    let rest = state.into_reader().fill_buf().ok()?.len();
    (rest == 0).then_some(decoded)
}

fn value_to_event(event: EventType, value: &Value) -> Result<AnyEvent, apache_avro::Error> {
    use apache_avro::from_value;
    Ok(match event {
        EventType::User => AnyEvent::User(from_value::<UserEvent>(value)?),
        EventType::Order => AnyEvent::Order(from_value::<OrderEvent>(value)?),
        EventType::Chat => AnyEvent::Chat(from_value::<ChatMessage>(value)?),
        EventType::Search => AnyEvent::Search(from_value::<SearchQuery>(value)?),
    })
}

fn decode_json(payload: &[u8], event: Option<EventType>) -> Result<AnyEvent, DecodeError> {
    let event = event.ok_or(DecodeError::MissingEventType)?;
    let invalid = |e: serde_json::Error| DecodeError::InvalidJson {
        event,
        reason: e.to_string(),
    };
    Ok(match event {
        EventType::User => AnyEvent::User(serde_json::from_slice(payload).map_err(invalid)?),
        EventType::Order => AnyEvent::Order(serde_json::from_slice(payload).map_err(invalid)?),
        EventType::Chat => AnyEvent::Chat(serde_json::from_slice(payload).map_err(invalid)?),
        EventType::Search => AnyEvent::Search(serde_json::from_slice(payload).map_err(invalid)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::*;
    use apache_avro::writer::datum::GenericDatumWriter;
    use proptest::prelude::*;
    use uuid::Uuid;

    fn text() -> impl Strategy<Value = String> {
        // Any Unicode, including the empty string and characters JSON escapes.
        any::<String>()
    }

    prop_compose! {
        fn head()(id in any::<u128>(), at in any::<i64>()) -> (Uuid, i64) {
            (Uuid::from_u128(id), at)
        }
    }

    fn user_event() -> impl Strategy<Value = UserEvent> {
        (
            head(),
            prop_oneof![
                Just(UserEventKind::SignedUp),
                Just(UserEventKind::LoggedIn),
                Just(UserEventKind::LoggedOut),
                Just(UserEventKind::PageViewed),
                Just(UserEventKind::ProfileUpdated)
            ],
            (text(), text(), text()),
            prop_oneof![
                Just(Platform::Web),
                Just(Platform::Ios),
                Just(Platform::Android)
            ],
            proptest::option::of(text()),
        )
            .prop_map(
                |(
                    (event_id, occurred_at),
                    kind,
                    (user_id, session_id, country),
                    platform,
                    page,
                )| {
                    UserEvent {
                        event_id,
                        occurred_at,
                        kind,
                        user_id,
                        session_id,
                        country,
                        platform,
                        page,
                    }
                },
            )
    }

    fn order_event() -> impl Strategy<Value = OrderEvent> {
        let item = (text(), text(), any::<i32>(), any::<i64>()).prop_map(
            |(sku, category, quantity, unit_price_minor)| LineItem {
                sku,
                category,
                quantity,
                unit_price_minor,
            },
        );
        (
            head(),
            prop_oneof![
                Just(OrderStatus::Created),
                Just(OrderStatus::Paid),
                Just(OrderStatus::Shipped),
                Just(OrderStatus::Delivered),
                Just(OrderStatus::Cancelled),
                Just(OrderStatus::Refunded)
            ],
            (text(), text(), proptest::option::of(text())),
            proptest::collection::vec(item, 0..5),
            (text(), any::<i64>()),
        )
            .prop_map(
                |(
                    (event_id, occurred_at),
                    status,
                    (order_id, user_id, session_id),
                    items,
                    (currency, total_minor),
                )| {
                    OrderEvent {
                        event_id,
                        occurred_at,
                        status,
                        order_id,
                        user_id,
                        session_id,
                        items,
                        currency,
                        total_minor,
                    }
                },
            )
    }

    fn chat_message() -> impl Strategy<Value = ChatMessage> {
        (head(), text(), text(), text(), any::<bool>()).prop_map(
            |((event_id, occurred_at), room_id, user_id, text, flagged)| ChatMessage {
                event_id,
                occurred_at,
                room_id,
                user_id,
                text,
                flagged,
            },
        )
    }

    fn search_query() -> impl Strategy<Value = SearchQuery> {
        (
            head(),
            (text(), text(), text()),
            proptest::collection::btree_map(text(), text(), 0..4),
            (any::<i32>(), proptest::option::of(text()), any::<i32>()),
        )
            .prop_map(
                |(
                    (event_id, occurred_at),
                    (user_id, session_id, query),
                    filters,
                    (results_count, clicked_sku, latency_ms),
                )| {
                    SearchQuery {
                        event_id,
                        occurred_at,
                        user_id,
                        session_id,
                        query,
                        filters,
                        results_count,
                        clicked_sku,
                        latency_ms,
                    }
                },
            )
    }

    /// Encodes in both formats and checks the event survives, with the Avro
    /// bytes also readable by the schema alone (no serde on the way back).
    fn round_trips<E: Event>(event: E) {
        let decoder = Decoder::default();
        for encoding in [Encoding::Avro, Encoding::Json] {
            let bytes = encode(&event, encoding);
            let back: E = decoder
                .decode_as(&bytes, Some(encoding.content_type()))
                .unwrap();
            assert_eq!(back, event, "{encoding:?}");
            // Without headers the magic bytes alone decide (JSON needs the type).
            let hint = DecodeHint {
                content_type: None,
                event_type: Some(E::TYPE),
            };
            assert_eq!(
                decoder.decode(&bytes, hint).unwrap(),
                event.clone().into_any()
            );
        }
        assert_eq!(
            encode(&event, Encoding::Json),
            serde_json::to_vec(&event).unwrap(),
            "the JSON writer writes what serde_json writes"
        );
        let bytes = encode(&event, Encoding::Avro);
        let schema = &SchemaRegistry::global().current(E::TYPE).schema;
        let value = GenericDatumReader::builder(schema)
            .build()
            .unwrap()
            .read_value(&mut &bytes[10..])
            .unwrap();
        assert!(value.validate(schema));
        // The schema-specialised writer writes exactly what apache-avro
        // writes, and the two read it back the same.
        let mut apache = Vec::new();
        GenericDatumWriter::builder(schema)
            .build()
            .unwrap()
            .write_ser(&mut apache, &event)
            .unwrap();
        assert_eq!(&bytes[10..], &apache[..], "the same Avro bytes");
        let slow: E = GenericDatumReader::builder(schema)
            .build()
            .unwrap()
            .read_deser(&mut &bytes[10..])
            .unwrap();
        assert_eq!(slow, event);
        assert_eq!(
            decode_current_fast(E::TYPE, &bytes[10..]),
            Some(event.clone().into_any()),
            "the fast path reads every valid record"
        );
        assert_eq!(
            crate::avro_datum::read(SchemaRegistry::global().current(E::TYPE), &bytes[10..]),
            Some(event.into_any()),
            "the schema-specialised reader reads every valid record"
        );
    }

    fn any_event() -> impl Strategy<Value = AnyEvent> {
        prop_oneof![
            user_event().prop_map(AnyEvent::User),
            order_event().prop_map(AnyEvent::Order),
            chat_message().prop_map(AnyEvent::Chat),
            search_query().prop_map(AnyEvent::Search),
        ]
    }

    /// What the schema-specialised reader takes (as any event type), the
    /// general decoders decode to the same event.
    fn read_alike(datum: &[u8]) -> Result<(), TestCaseError> {
        let registry = SchemaRegistry::global();
        for event in EventType::ALL {
            let writer = registry.current(event);
            if let Some(read) = crate::avro_datum::read(writer, datum) {
                let general = decode_datum_general(writer, datum, "Avro single-object");
                prop_assert_eq!(general.ok(), Some(read), "{:02x?}", datum);
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn user_events_round_trip(event in user_event()) { round_trips(event) }
        #[test]
        fn order_events_round_trip(event in order_event()) { round_trips(event) }
        #[test]
        fn chat_messages_round_trip(event in chat_message()) { round_trips(event) }
        #[test]
        fn search_queries_round_trip(event in search_query()) { round_trips(event) }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), json in any::<bool>()) {
            let content_type = json.then_some(content_type::JSON);
            for event_type in [None, Some(EventType::Order)] {
                let _ = Decoder::default().decode(&bytes, DecodeHint { content_type, event_type });
            }
        }

        #[test]
        fn the_specialised_reader_takes_only_what_the_general_decoders_decode_alike(
            event in any_event(),
            cut in any::<prop::sample::Index>(),
            flip in any::<(prop::sample::Index, u8)>(),
            insert in any::<(prop::sample::Index, u8)>(),
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let encoded = match &event {
                AnyEvent::User(e) => encode(e, Encoding::Avro),
                AnyEvent::Order(e) => encode(e, Encoding::Avro),
                AnyEvent::Chat(e) => encode(e, Encoding::Avro),
                AnyEvent::Search(e) => encode(e, Encoding::Avro),
            };
            let datum = &encoded[10..];
            read_alike(datum)?;
            read_alike(&datum[..cut.index(datum.len() + 1)])?;
            let mut flipped = datum.to_vec();
            if !flipped.is_empty() {
                let at = flip.0.index(flipped.len());
                flipped[at] ^= flip.1 | 1;
                read_alike(&flipped)?;
            }
            let mut inserted = datum.to_vec();
            inserted.insert(insert.0.index(datum.len() + 1), insert.1);
            read_alike(&inserted)?;
            let mut appended = datum.to_vec();
            appended.extend_from_slice(&bytes);
            read_alike(&appended)?;
            read_alike(&bytes)?;
        }

        #[test]
        fn corrupted_records_never_panic(event in order_event(), cut in any::<prop::sample::Index>(), flip in any::<(prop::sample::Index, u8)>()) {
            let bytes = encode(&event, Encoding::Avro);
            let decoder = Decoder::default();
            let _ = decoder.decode(&bytes[..cut.index(bytes.len())], DecodeHint::default());
            let mut flipped = bytes.clone();
            let at = flip.0.index(flipped.len());
            flipped[at] ^= flip.1 | 1;
            let _ = decoder.decode(&flipped, DecodeHint::default());
        }
    }

    fn chat() -> ChatMessage {
        ChatMessage {
            event_id: Uuid::from_u128(7),
            occurred_at: 1_700_000_000_000,
            room_id: "room-1".into(),
            user_id: "user-1".into(),
            text: "is it waterproof?".into(),
            flagged: true,
        }
    }

    #[test]
    fn a_v1_chat_message_decodes_into_todays_type() {
        let registry = SchemaRegistry::global();
        let v1 = registry.version(EventType::Chat, 1).unwrap();
        assert_eq!(registry.current(EventType::Chat).version, 2);
        // Written by an old producer that knew nothing of moderation.
        let writer = GenericDatumWriter::builder(&v1.schema).build().unwrap();
        let mut bytes = v1.single_object_header().to_vec();
        #[derive(Serialize)]
        struct ChatV1<'a> {
            event_id: &'a str,
            occurred_at: i64,
            room_id: &'a str,
            user_id: &'a str,
            text: &'a str,
        }
        let id = chat().event_id.to_string();
        writer
            .write_ser(
                &mut bytes,
                &ChatV1 {
                    event_id: &id,
                    occurred_at: 1_700_000_000_000,
                    room_id: "room-1",
                    user_id: "user-1",
                    text: "is it waterproof?",
                },
            )
            .unwrap();
        let decoded: ChatMessage = Decoder::default().decode_as(&bytes, None).unwrap();
        assert_eq!(
            decoded,
            ChatMessage {
                flagged: false,
                ..chat()
            }
        );
    }

    #[test]
    fn confluent_wire_format_decodes_with_a_known_schema_id() {
        let event = chat();
        let avro = encode(&event, Encoding::Avro);
        let mut confluent = vec![0u8, 0, 0, 0, 42];
        confluent.extend_from_slice(&avro[10..]);
        let mut ids = ConfluentSchemaIds::default();
        ids.insert(42, EventType::Chat, 2);
        let decoded: ChatMessage = Decoder::new(ids)
            .decode_as(&confluent, Some(content_type::CONFLUENT_AVRO))
            .unwrap();
        assert_eq!(decoded, event);
        let err = Decoder::default()
            .decode(&confluent, DecodeHint::default())
            .unwrap_err();
        assert_eq!(err, DecodeError::UnknownSchemaId { id: 42 });
        let err = Decoder::default()
            .decode(&[0, 0, 1], DecodeHint::default())
            .unwrap_err();
        assert_eq!(err.class(), "truncated");
    }

    /// The worker skips the header lookup for self-describing bytes, so
    /// the header must not change how they decode.
    #[test]
    fn self_describing_bytes_decode_whatever_the_content_type_says() {
        let decoder = Decoder::default();
        let avro = encode(&chat(), Encoding::Avro);
        let json = encode(&chat(), Encoding::Json);
        assert!(Decoder::self_describing(&avro));
        assert!(!Decoder::self_describing(&json));
        let declared_json = DecodeHint {
            content_type: Some(Encoding::Json.content_type()),
            event_type: Some(EventType::Chat),
        };
        assert_eq!(
            decoder.decode(&avro, declared_json).unwrap(),
            decoder.decode(&avro, DecodeHint::default()).unwrap()
        );
        // Bytes that do not say what they are still go by the header.
        let err = decoder.decode(b"not json", declared_json).unwrap_err();
        assert_eq!(err.class(), "invalid_json", "{err}");
    }

    #[test]
    fn bad_bytes_get_typed_errors() {
        let decoder = Decoder::default();
        let none = DecodeHint::default();
        let avro = encode(&chat(), Encoding::Avro);

        assert_eq!(decoder.decode(&[], none).unwrap_err(), DecodeError::Empty);

        let err = decoder.decode(&avro[..6], none).unwrap_err();
        assert_eq!(err.class(), "truncated", "{err}");
        let err = decoder.decode(&avro[..avro.len() - 3], none).unwrap_err();
        assert_eq!(err.class(), "truncated", "{err}");

        let mut unknown = avro.clone();
        unknown[2..10].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let err = decoder.decode(&unknown, none).unwrap_err();
        assert_eq!(
            err,
            DecodeError::UnknownFingerprint {
                fingerprint: "0102030405060708".into()
            }
        );

        let err = decoder.decode(b"\x89PNG\r\n", none).unwrap_err();
        assert_eq!(err.class(), "not_avro_or_json");
        assert!(err.to_string().contains("89504e47"), "{err}");

        // An order's bytes under the chat fingerprint: the datum does not fit.
        let order = OrderEvent {
            event_id: Uuid::from_u128(1),
            occurred_at: 5,
            status: OrderStatus::Paid,
            order_id: "o".into(),
            user_id: "u".into(),
            session_id: None,
            items: vec![],
            currency: "EUR".into(),
            total_minor: 100,
        };
        let mut mixed = avro[..10].to_vec();
        mixed.extend_from_slice(&encode(&order, Encoding::Avro)[10..]);
        let err = decoder.decode(&mixed, none).unwrap_err();
        assert!(
            matches!(err.class(), "schema_mismatch" | "truncated"),
            "{err}"
        );

        let mut trailing = avro.clone();
        trailing.push(0);
        assert_eq!(
            decoder.decode(&trailing, none).unwrap_err().class(),
            "schema_mismatch"
        );

        let json = br#"{"event_id": "not-a-uuid"}"#;
        assert_eq!(
            decoder.decode(json, none).unwrap_err(),
            DecodeError::MissingEventType
        );
        let hint = DecodeHint {
            content_type: None,
            event_type: Some(EventType::Chat),
        };
        assert_eq!(
            decoder.decode(json, hint).unwrap_err().class(),
            "invalid_json"
        );
        let wrong_type = serde_json::to_vec(&serde_json::json!({
            "event_id": Uuid::nil(), "occurred_at": "yesterday", "room_id": "r", "user_id": "u", "text": "t"
        })).unwrap();
        let err = decoder.decode(&wrong_type, hint).unwrap_err();
        assert!(
            err.to_string().contains("occurred_at") || err.to_string().contains("invalid type"),
            "{err}"
        );

        let err = decoder.decode_as::<OrderEvent>(&avro, None).unwrap_err();
        assert_eq!(
            err,
            DecodeError::UnexpectedEventType {
                expected: EventType::Order,
                found: EventType::Chat
            }
        );
    }

    #[test]
    fn a_huge_length_prefix_is_refused_not_allocated() {
        // Fingerprint of chat v2, then a uuid string claiming ~4 GiB.
        let mut bytes = SchemaRegistry::global()
            .current(EventType::Chat)
            .single_object_header()
            .to_vec();
        bytes.extend_from_slice(&[0xfe, 0xff, 0xff, 0xff, 0x1f]);
        let err = Decoder::default()
            .decode(&bytes, DecodeHint::default())
            .unwrap_err();
        assert!(
            matches!(err.class(), "schema_mismatch" | "truncated"),
            "{err}"
        );
    }
}
