//! Events as ClickHouse rows (RowBinary through the clickhouse crate), one
//! struct per table in `ddl`.

use backbone::events::{AnyEvent, OrderEvent, OrderStatus, Platform, UserEventKind};
use serde::Serialize;

use crate::handler::Record;

/// Where a row came from in Kafka: the record's original topic, partition and
/// offset (kept through retry tiers), so a replay is recognised.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, clickhouse::Row, serde::Deserialize)]
pub struct Position {
    pub kafka_topic: String,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
}

/// A value ClickHouse cannot store; the record goes to the DLQ.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed row: {0}")]
pub struct Malformed(pub String);

/// Milliseconds to ClickHouse `DateTime` seconds (UInt32 since 1970).
pub fn datetime(field: &str, ms: i64) -> Result<u32, Malformed> {
    u32::try_from(ms.div_euclid(1000)).map_err(|_| {
        Malformed(format!(
            "{field} {ms} ms is outside ClickHouse DateTime (1970 to 2106)"
        ))
    })
}

pub fn order_status_name(status: OrderStatus) -> &'static str {
    match status {
        OrderStatus::Created => "created",
        OrderStatus::Paid => "paid",
        OrderStatus::Shipped => "shipped",
        OrderStatus::Delivered => "delivered",
        OrderStatus::Cancelled => "cancelled",
        OrderStatus::Refunded => "refunded",
    }
}

fn kind_name(kind: UserEventKind) -> &'static str {
    match kind {
        UserEventKind::SignedUp => "signed_up",
        UserEventKind::LoggedIn => "logged_in",
        UserEventKind::LoggedOut => "logged_out",
        UserEventKind::PageViewed => "page_viewed",
        UserEventKind::ProfileUpdated => "profile_updated",
    }
}

/// The platform as the read models and tables name it.
pub fn platform_name(platform: Platform) -> &'static str {
    match platform {
        Platform::Web => "web",
        Platform::Ios => "ios",
        Platform::Android => "android",
    }
}

#[derive(Debug, Clone, Serialize, clickhouse::Row)]
pub struct UserRow {
    event_id: String,
    occurred_at: u32,
    occurred_at_ms: i64,
    kind: &'static str,
    user_id: String,
    session_id: String,
    country: String,
    platform: &'static str,
    page: Option<String>,
    kafka_topic: String,
    kafka_partition: i32,
    kafka_offset: i64,
    ingested_at: u32,
}

#[derive(Debug, Clone, Serialize, clickhouse::Row)]
pub struct OrderRow {
    event_id: String,
    occurred_at: u32,
    occurred_at_ms: i64,
    status: &'static str,
    order_id: String,
    user_id: String,
    session_id: Option<String>,
    item_skus: Vec<String>,
    item_categories: Vec<String>,
    item_quantities: Vec<i32>,
    item_unit_prices_minor: Vec<i64>,
    currency: String,
    total_minor: i64,
    kafka_topic: String,
    kafka_partition: i32,
    kafka_offset: i64,
    ingested_at: u32,
}

#[derive(Debug, Clone, Serialize, clickhouse::Row)]
pub struct ChatRow {
    event_id: String,
    occurred_at: u32,
    occurred_at_ms: i64,
    room_id: String,
    user_id: String,
    text: String,
    flagged: u8,
    kafka_topic: String,
    kafka_partition: i32,
    kafka_offset: i64,
    ingested_at: u32,
}

#[derive(Debug, Clone, Serialize, clickhouse::Row)]
pub struct SearchRow {
    event_id: String,
    occurred_at: u32,
    occurred_at_ms: i64,
    user_id: String,
    session_id: String,
    query: String,
    filter_keys: Vec<String>,
    filter_values: Vec<String>,
    results_count: i32,
    clicked_sku: Option<String>,
    latency_ms: i32,
    kafka_topic: String,
    kafka_partition: i32,
    kafka_offset: i64,
    ingested_at: u32,
}

/// The current state of one order; the highest `version` wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, clickhouse::Row)]
pub struct OrderStatusRow {
    pub order_id: String,
    pub user_id: String,
    pub status: String,
    pub currency: String,
    pub total_minor: i64,
    pub items_count: u32,
    pub updated_at: u32,
    pub updated_at_ms: i64,
    pub version: u64,
}

/// A row for the events store, by event type.
#[derive(Debug, Clone)]
pub enum EventRow {
    User(UserRow),
    Order(OrderRow),
    Chat(ChatRow),
    Search(SearchRow),
}

impl EventRow {
    pub fn from_record(record: &Record, ingested_at: u32) -> Result<Self, Malformed> {
        let (kafka_topic, kafka_partition, kafka_offset) =
            (record.topic.to_string(), record.partition, record.offset);
        Ok(match &record.event {
            AnyEvent::User(e) => Self::User(UserRow {
                event_id: e.event_id.to_string(),
                occurred_at: datetime("occurred_at", e.occurred_at)?,
                occurred_at_ms: e.occurred_at,
                kind: kind_name(e.kind),
                user_id: e.user_id.clone(),
                session_id: e.session_id.clone(),
                country: e.country.clone(),
                platform: platform_name(e.platform),
                page: e.page.clone(),
                kafka_topic,
                kafka_partition,
                kafka_offset,
                ingested_at,
            }),
            AnyEvent::Order(e) => Self::Order(OrderRow {
                event_id: e.event_id.to_string(),
                occurred_at: datetime("occurred_at", e.occurred_at)?,
                occurred_at_ms: e.occurred_at,
                status: order_status_name(e.status),
                order_id: e.order_id.clone(),
                user_id: e.user_id.clone(),
                session_id: e.session_id.clone(),
                item_skus: e.items.iter().map(|i| i.sku.clone()).collect(),
                item_categories: e.items.iter().map(|i| i.category.clone()).collect(),
                item_quantities: e.items.iter().map(|i| i.quantity).collect(),
                item_unit_prices_minor: e.items.iter().map(|i| i.unit_price_minor).collect(),
                currency: e.currency.clone(),
                total_minor: e.total_minor,
                kafka_topic,
                kafka_partition,
                kafka_offset,
                ingested_at,
            }),
            AnyEvent::Chat(e) => Self::Chat(ChatRow {
                event_id: e.event_id.to_string(),
                occurred_at: datetime("occurred_at", e.occurred_at)?,
                occurred_at_ms: e.occurred_at,
                room_id: e.room_id.clone(),
                user_id: e.user_id.clone(),
                text: e.text.clone(),
                flagged: u8::from(e.flagged),
                kafka_topic,
                kafka_partition,
                kafka_offset,
                ingested_at,
            }),
            AnyEvent::Search(e) => Self::Search(SearchRow {
                event_id: e.event_id.to_string(),
                occurred_at: datetime("occurred_at", e.occurred_at)?,
                occurred_at_ms: e.occurred_at,
                user_id: e.user_id.clone(),
                session_id: e.session_id.clone(),
                query: e.query.clone(),
                filter_keys: e.filters.keys().cloned().collect(),
                filter_values: e.filters.values().cloned().collect(),
                results_count: e.results_count,
                clicked_sku: e.clicked_sku.clone(),
                latency_ms: e.latency_ms,
                kafka_topic,
                kafka_partition,
                kafka_offset,
                ingested_at,
            }),
        })
    }
}

impl OrderStatusRow {
    /// Event time first, then the lifecycle rank (created < paid < shipped <
    /// delivered < cancelled < refunded) for events in the same millisecond.
    pub fn version(event: &OrderEvent) -> u64 {
        (event.occurred_at.max(0) as u64) * 8 + event.status as u64
    }

    pub fn from_event(event: &OrderEvent) -> Result<Self, Malformed> {
        Ok(Self {
            order_id: event.order_id.clone(),
            user_id: event.user_id.clone(),
            status: order_status_name(event.status).to_owned(),
            currency: event.currency.clone(),
            total_minor: event.total_minor,
            items_count: event.items.iter().map(|i| i.quantity.max(0) as u32).sum(),
            updated_at: datetime("occurred_at", event.occurred_at)?,
            updated_at_ms: event.occurred_at,
            version: Self::version(event),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backbone::events::LineItem;

    fn order(occurred_at: i64, status: OrderStatus) -> OrderEvent {
        OrderEvent {
            event_id: uuid::Uuid::nil(),
            occurred_at,
            status,
            order_id: "o-1".into(),
            user_id: "u-1".into(),
            session_id: None,
            items: vec![LineItem {
                sku: "s".into(),
                category: "c".into(),
                quantity: 3,
                unit_price_minor: 100,
            }],
            currency: "EUR".into(),
            total_minor: 300,
        }
    }

    #[test]
    fn later_events_and_later_stages_win() {
        let created = OrderStatusRow::version(&order(1_000, OrderStatus::Created));
        let paid_same_ms = OrderStatusRow::version(&order(1_000, OrderStatus::Paid));
        let created_later = OrderStatusRow::version(&order(1_001, OrderStatus::Created));
        assert!(created < paid_same_ms && paid_same_ms < created_later);
        let row = OrderStatusRow::from_event(&order(1_763_000_000_123, OrderStatus::Paid)).unwrap();
        assert_eq!(
            (row.status.as_str(), row.items_count, row.updated_at),
            ("paid", 3, 1_763_000_000)
        );
    }

    #[test]
    fn times_outside_datetime_are_malformed_rows() {
        for bad in [-1, (i64::from(u32::MAX) + 1) * 1000] {
            let err = OrderStatusRow::from_event(&order(bad, OrderStatus::Created)).unwrap_err();
            assert!(err.0.contains("outside ClickHouse DateTime"), "{err}");
        }
    }
}
