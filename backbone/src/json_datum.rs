//! Events as JSON, written field by field ([`crate::json_object`]): the
//! bytes `serde_json` writes (tested on arbitrary events), without its
//! serializer's per-field and per-string calls through `io::Write`, which
//! cost the publisher a fifth of its thread.

use std::any::Any;

use uuid::Uuid;

use crate::avro_datum::{symbol_index, ORDER_STATUSES, PLATFORMS, USER_KINDS};
use crate::events::{ChatMessage, Event, OrderEvent, SearchQuery, UserEvent};
use crate::json_object::{text, Object};

/// Appends `event` as a JSON object to `out`.
pub(crate) fn write<E: Event>(event: &E, out: &mut Vec<u8>) {
    let event: &dyn Any = event;
    let mut o = Object::open(out);
    if let Some(e) = event.downcast_ref::<UserEvent>() {
        head(&mut o, e.event_id, e.occurred_at);
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
        head(&mut o, e.event_id, e.occurred_at);
        o.symbol(
            "status",
            ORDER_STATUSES[symbol_index(&ORDER_STATUSES, e.status)].1,
        );
        o.string("order_id", &e.order_id);
        o.string("user_id", &e.user_id);
        o.optional_string("session_id", e.session_id.as_deref());
        o.objects("items", &e.items, |line, item| {
            line.string("sku", &item.sku);
            line.string("category", &item.category);
            line.number("quantity", i64::from(item.quantity));
            line.number("unit_price_minor", item.unit_price_minor);
        });
        o.string("currency", &e.currency);
        o.number("total_minor", e.total_minor);
    } else if let Some(e) = event.downcast_ref::<ChatMessage>() {
        head(&mut o, e.event_id, e.occurred_at);
        o.string("room_id", &e.room_id);
        o.string("user_id", &e.user_id);
        o.string("text", &e.text);
        o.field("flagged");
        o.out
            .extend_from_slice(if e.flagged { b"true" } else { b"false" });
    } else if let Some(e) = event.downcast_ref::<SearchQuery>() {
        head(&mut o, e.event_id, e.occurred_at);
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

/// Every event's first two members: its id and its time.
fn head(o: &mut Object<'_>, event_id: Uuid, occurred_at: i64) {
    let mut id = Uuid::encode_buffer();
    o.symbol("event_id", event_id.hyphenated().encode_lower(&mut id));
    o.number("occurred_at", occurred_at);
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
