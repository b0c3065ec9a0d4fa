//! Records of today's schema of each event, read and written field by field
//! in the schema's order: no field names matched, no schema walked per record
//! (serde_avro_fast spends most of a decode, and most of an encode, there).
//! Written for one version of each schema; a record of any other version,
//! or anything this reader does not take exactly as the schema says (a
//! negative block count, a repeated map key, an over-long varint, bytes
//! left over), is left to the general decoders, which accept or refuse it
//! with their errors. So a record this reader takes is one they would
//! decode to the same event (tested on arbitrary bytes and on arbitrary
//! events), and the writer writes the bytes apache-avro writes (tested on
//! arbitrary events).

use std::any::Any;
use std::collections::BTreeMap;

use uuid::Uuid;

use crate::events::{
    AnyEvent, ChatMessage, Event, EventType, LineItem, OrderEvent, OrderStatus, Platform,
    SearchQuery, UserEvent, UserEventKind,
};
use crate::schema::{SchemaRegistry, SchemaVersion};

/// The schema version each event's reader and writer below follow, by
/// `EventType::index`.
pub(crate) const WRITTEN_FOR: [u32; 4] = [1, 1, 2, 1];

/// The enums' symbols in their schemas' order, with their names (JSON's).
pub(crate) const USER_KINDS: [(UserEventKind, &str); 5] = [
    (UserEventKind::SignedUp, "signed_up"),
    (UserEventKind::LoggedIn, "logged_in"),
    (UserEventKind::LoggedOut, "logged_out"),
    (UserEventKind::PageViewed, "page_viewed"),
    (UserEventKind::ProfileUpdated, "profile_updated"),
];
pub(crate) const PLATFORMS: [(Platform, &str); 3] = [
    (Platform::Web, "web"),
    (Platform::Ios, "ios"),
    (Platform::Android, "android"),
];
pub(crate) const ORDER_STATUSES: [(OrderStatus, &str); 6] = [
    (OrderStatus::Created, "created"),
    (OrderStatus::Paid, "paid"),
    (OrderStatus::Shipped, "shipped"),
    (OrderStatus::Delivered, "delivered"),
    (OrderStatus::Cancelled, "cancelled"),
    (OrderStatus::Refunded, "refunded"),
];

/// `symbol`'s place among `symbols`.
pub(crate) fn symbol_index<T: PartialEq + Copy>(symbols: &[(T, &str)], symbol: T) -> usize {
    symbols
        .iter()
        .position(|(s, _)| *s == symbol)
        .expect("every variant is among its schema's symbols")
}

/// The event in `datum`, written with `writer`; `None` when this reader
/// does not cover it (see the module's comment).
pub(crate) fn read(writer: &SchemaVersion, datum: &[u8]) -> Option<AnyEvent> {
    let current = SchemaRegistry::global().current(writer.event);
    if WRITTEN_FOR[writer.event.index()] != writer.version || !std::ptr::eq(writer, current) {
        return None;
    }
    let mut r = Reader(datum);
    let event = match writer.event {
        EventType::User => AnyEvent::User(user(&mut r)?),
        EventType::Order => AnyEvent::Order(order(&mut r)?),
        EventType::Chat => AnyEvent::Chat(chat(&mut r)?),
        EventType::Search => AnyEvent::Search(search(&mut r)?),
    };
    r.0.is_empty().then_some(event)
}

fn user(r: &mut Reader<'_>) -> Option<UserEvent> {
    Some(UserEvent {
        event_id: r.uuid()?,
        occurred_at: r.long()?,
        kind: USER_KINDS.get(r.index()?)?.0,
        user_id: r.string()?,
        session_id: r.string()?,
        country: r.string()?,
        platform: PLATFORMS.get(r.index()?)?.0,
        page: r.optional_string()?,
    })
}

fn order(r: &mut Reader<'_>) -> Option<OrderEvent> {
    Some(OrderEvent {
        event_id: r.uuid()?,
        occurred_at: r.long()?,
        status: ORDER_STATUSES.get(r.index()?)?.0,
        order_id: r.string()?,
        user_id: r.string()?,
        session_id: r.optional_string()?,
        items: {
            let mut items = Vec::new();
            while let Some(count) = r.block()? {
                items.reserve(count);
                for _ in 0..count {
                    items.push(LineItem {
                        sku: r.string()?,
                        category: r.string()?,
                        quantity: r.int()?,
                        unit_price_minor: r.long()?,
                    });
                }
            }
            items
        },
        currency: r.string()?,
        total_minor: r.long()?,
    })
}

fn chat(r: &mut Reader<'_>) -> Option<ChatMessage> {
    Some(ChatMessage {
        event_id: r.uuid()?,
        occurred_at: r.long()?,
        room_id: r.string()?,
        user_id: r.string()?,
        text: r.string()?,
        flagged: match r.byte()? {
            0 => false,
            1 => true,
            _ => return None,
        },
    })
}

fn search(r: &mut Reader<'_>) -> Option<SearchQuery> {
    Some(SearchQuery {
        event_id: r.uuid()?,
        occurred_at: r.long()?,
        user_id: r.string()?,
        session_id: r.string()?,
        query: r.string()?,
        filters: {
            let mut filters = BTreeMap::new();
            while let Some(count) = r.block()? {
                for _ in 0..count {
                    let key = r.string()?;
                    if filters.insert(key, r.string()?).is_some() {
                        return None;
                    }
                }
            }
            filters
        },
        results_count: r.int()?,
        clicked_sku: r.optional_string()?,
        latency_ms: r.int()?,
    })
}

/// Appends `event`'s datum in today's schema to `out` (a new version of a
/// schema fails this module's test until the writer follows it).
pub(crate) fn write<E: Event>(event: &E, out: &mut Vec<u8>) {
    let mut w = Writer(out);
    let event: &dyn Any = event;
    if let Some(e) = event.downcast_ref::<UserEvent>() {
        w.head(e.event_id, e.occurred_at);
        w.index(&USER_KINDS, e.kind);
        w.string(&e.user_id);
        w.string(&e.session_id);
        w.string(&e.country);
        w.index(&PLATFORMS, e.platform);
        w.optional_string(e.page.as_deref());
    } else if let Some(e) = event.downcast_ref::<OrderEvent>() {
        w.head(e.event_id, e.occurred_at);
        w.index(&ORDER_STATUSES, e.status);
        w.string(&e.order_id);
        w.string(&e.user_id);
        w.optional_string(e.session_id.as_deref());
        w.block(e.items.len());
        for item in &e.items {
            w.string(&item.sku);
            w.string(&item.category);
            w.long(i64::from(item.quantity));
            w.long(item.unit_price_minor);
        }
        w.long(0);
        w.string(&e.currency);
        w.long(e.total_minor);
    } else if let Some(e) = event.downcast_ref::<ChatMessage>() {
        w.head(e.event_id, e.occurred_at);
        w.string(&e.room_id);
        w.string(&e.user_id);
        w.string(&e.text);
        w.0.push(u8::from(e.flagged));
    } else if let Some(e) = event.downcast_ref::<SearchQuery>() {
        w.head(e.event_id, e.occurred_at);
        w.string(&e.user_id);
        w.string(&e.session_id);
        w.string(&e.query);
        w.block(e.filters.len());
        for (key, value) in &e.filters {
            w.string(key);
            w.string(value);
        }
        w.long(0);
        w.long(i64::from(e.results_count));
        w.optional_string(e.clicked_sku.as_deref());
        w.long(i64::from(e.latency_ms));
    } else {
        unreachable!("{}: an event type without a writer", E::TYPE)
    }
}

/// The datum written so far.
struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    /// A zigzag varint (an `int` is written as the `long` of its value).
    fn long(&mut self, value: i64) {
        let mut zigzag = ((value << 1) ^ (value >> 63)) as u64;
        while zigzag >= 0x80 {
            self.0.push(zigzag as u8 | 0x80);
            zigzag >>= 7;
        }
        self.0.push(zigzag as u8);
    }

    fn string(&mut self, text: &str) {
        self.long(text.len() as i64);
        self.0.extend_from_slice(text.as_bytes());
    }

    /// Every event's first two fields: its id as text, and its time.
    fn head(&mut self, event_id: Uuid, occurred_at: i64) {
        let mut text = Uuid::encode_buffer();
        self.string(event_id.hyphenated().encode_lower(&mut text));
        self.long(occurred_at);
    }

    /// An enum's symbol, by its place among `symbols`.
    fn index<T: PartialEq + Copy>(&mut self, symbols: &[(T, &str)], symbol: T) {
        self.long(symbol_index(symbols, symbol) as i64);
    }

    /// A `["null", "string"]` union.
    fn optional_string(&mut self, text: Option<&str>) {
        match text {
            None => self.long(0),
            Some(text) => {
                self.long(1);
                self.string(text);
            }
        }
    }

    /// An array's or a map's items go in one block: its count (none when
    /// there are no items), the items, then the empty block that ends them.
    fn block(&mut self, len: usize) {
        if len > 0 {
            self.long(len as i64);
        }
    }
}

/// The bytes of a datum not read yet.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(first)
    }

    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(taken)
    }

    /// A zigzag varint of at most `max_bytes` bytes, none of whose bits
    /// fall past 64.
    fn varint(&mut self, max_bytes: u32) -> Option<i64> {
        let mut value = 0u64;
        for i in 0..max_bytes {
            let b = self.byte()?;
            if i == 9 && b > 1 {
                return None;
            }
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Some((value >> 1) as i64 ^ -((value & 1) as i64));
            }
        }
        None
    }

    fn long(&mut self) -> Option<i64> {
        self.varint(10)
    }

    fn int(&mut self) -> Option<i32> {
        i32::try_from(self.varint(5)?).ok()
    }

    /// An enum symbol's or a union branch's index.
    fn index(&mut self) -> Option<usize> {
        usize::try_from(self.int()?).ok()
    }

    fn str(&mut self) -> Option<&'a str> {
        let len = usize::try_from(self.long()?).ok()?;
        std::str::from_utf8(self.bytes(len)?).ok()
    }

    fn string(&mut self) -> Option<String> {
        self.str().map(str::to_owned)
    }

    /// A `["null", "string"]` union.
    fn optional_string(&mut self) -> Option<Option<String>> {
        match self.index()? {
            0 => Some(None),
            1 => self.string().map(Some),
            _ => None,
        }
    }

    fn uuid(&mut self) -> Option<Uuid> {
        Uuid::parse_str(self.str()?).ok()
    }

    /// The item count of an array's or a map's next block; `Some(None)` at
    /// the end. A negative count (a block with its size in bytes) is left
    /// to the general decoders.
    fn block(&mut self) -> Option<Option<usize>> {
        match self.long()? {
            0 => Some(None),
            count if count > 0 && count as u64 <= self.0.len() as u64 => Some(Some(count as usize)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_reader_follows_the_current_version_of_its_schema() {
        let registry = SchemaRegistry::global();
        for event in EventType::ALL {
            assert_eq!(
                registry.current(event).version,
                WRITTEN_FOR[event.index()],
                "{event}: a new schema version needs its reader and writer in avro_datum.rs"
            );
        }
    }
}
