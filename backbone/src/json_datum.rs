//! Events as JSON, written field by field: the bytes `serde_json` writes
//! (tested on arbitrary events), without its serializer's per-field and
//! per-string calls through `io::Write`, which cost the publisher a fifth
//! of its thread.

use std::any::Any;

use uuid::Uuid;

use crate::avro_datum::{symbol_index, ORDER_STATUSES, PLATFORMS, USER_KINDS};
use crate::events::{ChatMessage, Event, OrderEvent, SearchQuery, UserEvent};

/// Appends `event` as a JSON object to `out`.
pub(crate) fn write<E: Event>(event: &E, out: &mut Vec<u8>) {
    let event: &dyn Any = event;
    let mut o = Object::open(out);
    if let Some(e) = event.downcast_ref::<UserEvent>() {
        o.head(e.event_id, e.occurred_at);
        o.symbol("kind", USER_KINDS[symbol_index(&USER_KINDS, e.kind)].1);
        o.string("user_id", &e.user_id);
        o.string("session_id", &e.session_id);
        o.string("country", &e.country);
        o.symbol(
            "platform",
            PLATFORMS[symbol_index(&PLATFORMS, e.platform)].1,
        );
        o.optional_string("page", e.page.as_deref());
    } else if let Some(e) = event.downcast_ref::<OrderEvent>() {
        o.head(e.event_id, e.occurred_at);
        o.symbol(
            "status",
            ORDER_STATUSES[symbol_index(&ORDER_STATUSES, e.status)].1,
        );
        o.string("order_id", &e.order_id);
        o.string("user_id", &e.user_id);
        o.optional_string("session_id", e.session_id.as_deref());
        o.field("items");
        o.out.push(b'[');
        for (i, item) in e.items.iter().enumerate() {
            if i > 0 {
                o.out.push(b',');
            }
            let mut line = Object::open(o.out);
            line.string("sku", &item.sku);
            line.string("category", &item.category);
            line.number("quantity", i64::from(item.quantity));
            line.number("unit_price_minor", item.unit_price_minor);
            line.out.push(b'}');
        }
        o.out.push(b']');
        o.string("currency", &e.currency);
        o.number("total_minor", e.total_minor);
    } else if let Some(e) = event.downcast_ref::<ChatMessage>() {
        o.head(e.event_id, e.occurred_at);
        o.string("room_id", &e.room_id);
        o.string("user_id", &e.user_id);
        o.string("text", &e.text);
        o.field("flagged");
        o.out
            .extend_from_slice(if e.flagged { b"true" } else { b"false" });
    } else if let Some(e) = event.downcast_ref::<SearchQuery>() {
        o.head(e.event_id, e.occurred_at);
        o.string("user_id", &e.user_id);
        o.string("session_id", &e.session_id);
        o.string("query", &e.query);
        o.field("filters");
        let mut filters = Object::open(o.out);
        for (key, value) in &e.filters {
            filters.key(key);
            text(filters.out, value);
        }
        filters.out.push(b'}');
        o.number("results_count", i64::from(e.results_count));
        o.optional_string("clicked_sku", e.clicked_sku.as_deref());
        o.number("latency_ms", i64::from(e.latency_ms));
    } else {
        unreachable!("{}: an event type without a JSON writer", E::TYPE)
    }
    o.out.push(b'}');
}

/// An object being written: its members so far, and where they go.
struct Object<'a> {
    out: &'a mut Vec<u8>,
    empty: bool,
}

impl<'a> Object<'a> {
    fn open(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Object { out, empty: true }
    }

    /// The comma before every member but the first.
    #[inline(always)]
    fn member(&mut self) {
        if !std::mem::take(&mut self.empty) {
            self.out.push(b',');
        }
    }

    /// A member's key from the data (a map's), escaped.
    fn key(&mut self, key: &str) {
        self.member();
        text(self.out, key);
        self.out.push(b':');
    }

    /// A field's name: ours, with nothing to escape, so written as it is.
    #[inline(always)]
    fn field(&mut self, name: &'static str) {
        self.member();
        plain(self.out, name);
        self.out.push(b':');
    }

    #[inline(always)]
    fn string(&mut self, name: &'static str, value: &str) {
        self.field(name);
        text(self.out, value);
    }

    /// A string of ours with nothing to escape (an enum symbol, an id).
    #[inline(always)]
    fn symbol(&mut self, name: &'static str, value: &str) {
        self.field(name);
        plain(self.out, value);
    }

    #[inline(always)]
    fn optional_string(&mut self, name: &'static str, value: Option<&str>) {
        match value {
            Some(value) => self.string(name, value),
            None => {
                self.field(name);
                self.out.extend_from_slice(b"null");
            }
        }
    }

    #[inline(always)]
    fn number(&mut self, name: &'static str, value: i64) {
        self.field(name);
        self.out
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }

    /// Every event's first two members: its id and its time.
    fn head(&mut self, event_id: Uuid, occurred_at: i64) {
        let mut id = Uuid::encode_buffer();
        self.symbol("event_id", event_id.hyphenated().encode_lower(&mut id));
        self.number("occurred_at", occurred_at);
    }
}

/// `value` as a JSON string, nothing in it escaped.
#[inline(always)]
fn plain(out: &mut Vec<u8>, value: &str) {
    out.reserve(value.len() + 2);
    out.push(b'"');
    out.extend_from_slice(value.as_bytes());
    out.push(b'"');
}

/// `value` as a JSON string, escaped as serde_json escapes: quote, backslash
/// and the control characters, the rest as it is.
fn text(out: &mut Vec<u8>, value: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = value.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    // Most text has nothing to escape: one pass over it without branches
    // decides, and then it is copied whole.
    let mut escapes = 0u8;
    for &b in bytes {
        escapes |= u8::from(b < 0x20) | u8::from(b == b'"') | u8::from(b == b'\\');
    }
    if escapes == 0 {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut plain = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            0x09 => b"\\t",
            0x0a => b"\\n",
            0x0c => b"\\f",
            0x0d => b"\\r",
            0x00..=0x1f => &[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ],
            _ => continue,
        };
        out.extend_from_slice(&bytes[plain..i]);
        out.extend_from_slice(short);
        plain = i + 1;
    }
    out.extend_from_slice(&bytes[plain..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use crate::events::ChatMessage;

    #[test]
    fn every_character_serde_json_escapes_is_escaped_alike() {
        let text: String = (0u8..0x80)
            .map(char::from)
            .chain("é€😀\u{2028}".chars())
            .collect();
        let message = ChatMessage {
            event_id: uuid::Uuid::from_u128(7),
            occurred_at: -1,
            room_id: text.clone(),
            user_id: String::new(),
            text,
            flagged: true,
        };
        let mut out = Vec::new();
        super::write(&message, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            serde_json::to_string(&message).unwrap()
        );
    }
}
