//! The platform's events as Rust types. Each matches the current version of its
//! Avro schema in `schemas/<event>/`; `codec` proves it by round-tripping them.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The kinds of event the platform publishes. The name is the folder in
/// `schemas/` and the value of the `event-type` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    User,
    Order,
    Chat,
    Search,
}

impl EventType {
    pub const ALL: [EventType; 4] = [Self::User, Self::Order, Self::Chat, Self::Search];

    /// The schema folder name, also used in headers and table names.
    pub fn name(self) -> &'static str {
        match self {
            Self::User => "user_event",
            Self::Order => "order_event",
            Self::Chat => "chat_message",
            Self::Search => "search_query",
        }
    }

    /// The Avro record's full name, which ties a schema file to this type.
    pub fn avro_full_name(self) -> &'static str {
        match self {
            Self::User => "shopstream.events.UserEvent",
            Self::Order => "shopstream.events.OrderEvent",
            Self::Chat => "shopstream.events.ChatMessage",
            Self::Search => "shopstream.events.SearchQuery",
        }
    }

    /// Position in [`EventType::ALL`], for per-type arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A typed event: what every publisher, codec and handler is generic over.
pub trait Event:
    Serialize + for<'de> Deserialize<'de> + Clone + fmt::Debug + PartialEq + Send + Sync + 'static
{
    const TYPE: EventType;

    fn event_id(&self) -> Uuid;

    /// Event time in UTC milliseconds.
    fn occurred_at(&self) -> i64;

    /// The value of a top-level string field, so the catalog's `key` can name
    /// the field that becomes the Kafka key.
    fn string_field(&self, field: &str) -> Option<&str>;

    fn into_any(self) -> AnyEvent;

    /// The event inside `any` when it is of this type.
    fn from_any(any: AnyEvent) -> Option<Self>;
}

/// Account and session activity. Kafka key: `user_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserEvent {
    #[serde(with = "uuid_string")]
    pub event_id: Uuid,
    pub occurred_at: i64,
    pub kind: UserEventKind,
    pub user_id: String,
    pub session_id: String,
    /// ISO 3166-1 alpha-2.
    pub country: String,
    pub platform: Platform,
    /// The viewed page's path, for `page_viewed`.
    #[serde(default)]
    pub page: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserEventKind {
    SignedUp,
    LoggedIn,
    LoggedOut,
    PageViewed,
    ProfileUpdated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Platform {
    Web,
    Ios,
    Android,
}

/// A step in an order's lifecycle. Kafka key: `order_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderEvent {
    #[serde(with = "uuid_string")]
    pub event_id: Uuid,
    pub occurred_at: i64,
    pub status: OrderStatus,
    pub order_id: String,
    pub user_id: String,
    /// The session the order was placed in, linking it to that session's searches.
    #[serde(default)]
    pub session_id: Option<String>,
    pub items: Vec<LineItem>,
    /// ISO 4217.
    pub currency: String,
    /// Order total in minor units (cents).
    pub total_minor: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    Created,
    Paid,
    Shipped,
    Delivered,
    Cancelled,
    Refunded,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineItem {
    pub sku: String,
    pub category: String,
    pub quantity: i32,
    /// Unit price in minor units (cents).
    pub unit_price_minor: i64,
}

/// A message in a live-shopping room's chat. Kafka key: `room_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    #[serde(with = "uuid_string")]
    pub event_id: Uuid,
    pub occurred_at: i64,
    pub room_id: String,
    pub user_id: String,
    pub text: String,
    /// Set by moderation. Added in schema v2; v1 records read as `false`.
    #[serde(default)]
    pub flagged: bool,
}

/// A product search. Kafka key: `user_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SearchQuery {
    #[serde(with = "uuid_string")]
    pub event_id: Uuid,
    pub occurred_at: i64,
    pub user_id: String,
    pub session_id: String,
    pub query: String,
    /// Facet filters, such as `category` or `max_price`.
    pub filters: BTreeMap<String, String>,
    pub results_count: i32,
    #[serde(default)]
    pub clicked_sku: Option<String>,
    pub latency_ms: i32,
}

/// Any event, as a decoder returns it when the type is known only from the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnyEvent {
    User(UserEvent),
    Order(OrderEvent),
    Chat(ChatMessage),
    Search(SearchQuery),
}

impl AnyEvent {
    pub fn event_type(&self) -> EventType {
        match self {
            Self::User(_) => EventType::User,
            Self::Order(_) => EventType::Order,
            Self::Chat(_) => EventType::Chat,
            Self::Search(_) => EventType::Search,
        }
    }

    pub fn event_id(&self) -> Uuid {
        match self {
            Self::User(e) => e.event_id,
            Self::Order(e) => e.event_id,
            Self::Chat(e) => e.event_id,
            Self::Search(e) => e.event_id,
        }
    }

    pub fn occurred_at(&self) -> i64 {
        match self {
            Self::User(e) => e.occurred_at,
            Self::Order(e) => e.occurred_at,
            Self::Chat(e) => e.occurred_at,
            Self::Search(e) => e.occurred_at,
        }
    }
}

macro_rules! impl_event {
    ($ty:ident, $variant:ident, [$($field:ident),*]) => {
        impl Event for $ty {
            const TYPE: EventType = EventType::$variant;

            fn event_id(&self) -> Uuid {
                self.event_id
            }

            fn occurred_at(&self) -> i64 {
                self.occurred_at
            }

            fn string_field(&self, field: &str) -> Option<&str> {
                match field {
                    $(stringify!($field) => Some(&self.$field),)*
                    _ => None,
                }
            }

            fn into_any(self) -> AnyEvent {
                AnyEvent::$variant(self)
            }

            fn from_any(any: AnyEvent) -> Option<Self> {
                match any {
                    AnyEvent::$variant(event) => Some(event),
                    _ => None,
                }
            }
        }
    };
}

impl_event!(UserEvent, User, [user_id, session_id, country]);
impl_event!(OrderEvent, Order, [order_id, user_id, currency]);
impl_event!(ChatMessage, Chat, [room_id, user_id, text]);
impl_event!(SearchQuery, Search, [user_id, session_id, query]);

/// Event ids travel as hyphenated strings (Avro `uuid` logical type over
/// `string`), whatever the serializer's human-readable setting.
mod uuid_string {
    use serde::de::{Error, Visitor};
    use serde::{Deserializer, Serializer};
    use uuid::Uuid;

    pub fn serialize<S: Serializer>(id: &Uuid, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = Uuid::encode_buffer();
        s.serialize_str(id.hyphenated().encode_lower(&mut buf))
    }

    /// Parses the text where the format has it (serde's `Cow<str>` would
    /// copy it into a `String` first: one allocation per event).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Uuid, D::Error> {
        struct Text;
        impl Visitor<'_> for Text {
            type Value = Uuid;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a UUID string")
            }

            fn visit_str<E: Error>(self, text: &str) -> Result<Uuid, E> {
                Uuid::parse_str(text).map_err(|e| E::custom(format!("event_id: {e}")))
            }
        }
        d.deserialize_str(Text)
    }
}
