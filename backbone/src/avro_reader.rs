//! Records written with today's schema of each event, read field by field in
//! the schema's order: no field names matched, no schema walked per record
//! (serde_avro_fast spends most of a decode there). Written for one version
//! of each schema; a record of any other version, or anything this reader
//! does not take exactly as the schema says (a negative block count, a
//! repeated map key, an over-long varint, bytes left over), is left to the
//! general decoders, which accept or refuse it with their errors. So a
//! record this reader takes is one they would decode to the same event
//! (tested on arbitrary bytes and on arbitrary events).

use std::collections::BTreeMap;

use uuid::Uuid;

use crate::events::{
    AnyEvent, ChatMessage, EventType, LineItem, OrderEvent, OrderStatus, Platform, SearchQuery,
    UserEvent, UserEventKind,
};
use crate::schema::{SchemaRegistry, SchemaVersion};

/// The schema version each event's reader below follows, by `EventType::index`.
pub(crate) const WRITTEN_FOR: [u32; 4] = [1, 1, 2, 1];

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
    use UserEventKind::*;
    Some(UserEvent {
        event_id: r.uuid()?,
        occurred_at: r.long()?,
        kind: *[SignedUp, LoggedIn, LoggedOut, PageViewed, ProfileUpdated].get(r.index()?)?,
        user_id: r.string()?,
        session_id: r.string()?,
        country: r.string()?,
        platform: *[Platform::Web, Platform::Ios, Platform::Android].get(r.index()?)?,
        page: r.optional_string()?,
    })
}

fn order(r: &mut Reader<'_>) -> Option<OrderEvent> {
    use OrderStatus::*;
    Some(OrderEvent {
        event_id: r.uuid()?,
        occurred_at: r.long()?,
        status: *[Created, Paid, Shipped, Delivered, Cancelled, Refunded].get(r.index()?)?,
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
                "{event}: a new schema version needs its reader in avro_reader.rs"
            );
        }
    }
}
