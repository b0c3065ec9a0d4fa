//! The analytics job's arithmetic, free of Kafka and ClickHouse: event-time
//! tumbling windows, the watermark, and partial aggregates for every read
//! model (kept per Kafka partition, merged across partitions at a flush). Partials are additive: counts and sums
//! add, and the distinct-count inputs (buyers, users, sessions, chatters) and
//! search latencies travel as sets and lists that ClickHouse combines at
//! query time (`uniqExactArray`, `quantileExactArray`), so a partial flushed
//! every second, a late event or a second partial for the same window all
//! simply add up.

use std::collections::{BTreeMap, BTreeSet};

use backbone::events::{AnyEvent, OrderStatus, UserEventKind};
use consumers::projection::rows::platform_name;

/// Tumbling event-time windows of a fixed size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    pub size_ms: i64,
}

impl Windows {
    pub fn new(size_ms: i64) -> Self {
        assert!(size_ms > 0, "a window has a positive size");
        Self { size_ms }
    }

    /// The start of the window holding `t` (milliseconds), also for times
    /// before 1970.
    pub fn start(&self, t: i64) -> i64 {
        t - t.rem_euclid(self.size_ms)
    }
}

/// Latest event time seen minus the allowed lateness, per Kafka partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermark {
    lateness_ms: i64,
    latest: Option<i64>,
}

/// Whether an event arrived within the allowed lateness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    OnTime,
    /// Older than the watermark: counted, then added or diverted by policy.
    Late,
}

impl Watermark {
    pub fn new(lateness_ms: i64) -> Self {
        Self {
            lateness_ms,
            latest: None,
        }
    }

    /// The watermark now, if any event was seen.
    pub fn value(&self) -> Option<i64> {
        self.latest.map(|t| t - self.lateness_ms)
    }

    /// Classifies an event against the watermark before it, then advances.
    pub fn observe(&mut self, event_time: i64) -> Arrival {
        let arrival = match self.value() {
            Some(mark) if event_time < mark => Arrival::Late,
            _ => Arrival::OnTime,
        };
        self.latest = Some(self.latest.map_or(event_time, |t| t.max(event_time)));
        arrival
    }
}

/// Orders per window, category and currency (created orders only: an order
/// counts once in each category it has items in).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderFigures {
    pub orders: u64,
    pub items: u64,
    pub revenue_minor: i64,
    pub buyers: BTreeSet<String>,
}

/// Lifecycle events per window, in [`OrderStatus`] order.
pub type Funnel = [u64; 6];

/// Active users per window, country and platform.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserFigures {
    pub users: BTreeSet<String>,
    pub sign_ups: u64,
    pub sessions: BTreeSet<String>,
}

/// Chat per window and room.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChatFigures {
    pub messages: u64,
    pub chatters: BTreeSet<String>,
    pub flagged: u64,
}

/// Searches per window; latencies kept for exact mean and percentiles.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SearchFigures {
    pub searches: u64,
    pub zero_results: u64,
    pub latency_sum_ms: i64,
    pub latencies_ms: Vec<i32>,
}

/// Searches of one query text per window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueryFigures {
    pub searches: u64,
    /// Of those, how many found nothing.
    pub zero_results: u64,
}

/// Everything one Kafka partition (or, merged, a flush) contributed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Partial {
    pub orders: BTreeMap<(i64, String, String), OrderFigures>,
    pub funnel: BTreeMap<i64, Funnel>,
    pub users: BTreeMap<(i64, String, String), UserFigures>,
    pub chat: BTreeMap<(i64, String), ChatFigures>,
    pub search: BTreeMap<i64, SearchFigures>,
    /// Searches per window and query text, for the top queries.
    pub queries: BTreeMap<(i64, String), QueryFigures>,
    /// Events added.
    pub events: u64,
}

fn stage(status: OrderStatus) -> usize {
    match status {
        OrderStatus::Created => 0,
        OrderStatus::Paid => 1,
        OrderStatus::Shipped => 2,
        OrderStatus::Delivered => 3,
        OrderStatus::Cancelled => 4,
        OrderStatus::Refunded => 5,
    }
}

impl Partial {
    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    /// Adds one event to its window.
    pub fn add(&mut self, windows: Windows, event: &AnyEvent) {
        self.events += 1;
        match event {
            AnyEvent::Order(order) => {
                let window = windows.start(order.occurred_at);
                self.funnel.entry(window).or_default()[stage(order.status)] += 1;
                if order.status != OrderStatus::Created {
                    return;
                }
                let mut by_category: BTreeMap<&str, (u64, i64)> = BTreeMap::new();
                for item in &order.items {
                    let slot = by_category.entry(&item.category).or_default();
                    let quantity = i64::from(item.quantity.max(0));
                    slot.0 += quantity as u64;
                    slot.1 += quantity * item.unit_price_minor;
                }
                for (category, (items, revenue)) in by_category {
                    let figures = self
                        .orders
                        .entry((window, category.to_owned(), order.currency.clone()))
                        .or_default();
                    figures.orders += 1;
                    figures.items += items;
                    figures.revenue_minor += revenue;
                    figures.buyers.insert(order.user_id.clone());
                }
            }
            AnyEvent::User(user) => {
                let window = windows.start(user.occurred_at);
                let figures = self
                    .users
                    .entry((
                        window,
                        user.country.clone(),
                        platform_name(user.platform).to_owned(),
                    ))
                    .or_default();
                figures.users.insert(user.user_id.clone());
                figures.sessions.insert(user.session_id.clone());
                if user.kind == UserEventKind::SignedUp {
                    figures.sign_ups += 1;
                }
            }
            AnyEvent::Chat(chat) => {
                let window = windows.start(chat.occurred_at);
                let figures = self.chat.entry((window, chat.room_id.clone())).or_default();
                figures.messages += 1;
                figures.chatters.insert(chat.user_id.clone());
                figures.flagged += u64::from(chat.flagged);
            }
            AnyEvent::Search(search) => {
                let window = windows.start(search.occurred_at);
                let figures = self.search.entry(window).or_default();
                figures.searches += 1;
                figures.zero_results += u64::from(search.results_count == 0);
                figures.latency_sum_ms += i64::from(search.latency_ms);
                figures.latencies_ms.push(search.latency_ms);
                let query = self
                    .queries
                    .entry((window, search.query.clone()))
                    .or_default();
                query.searches += 1;
                query.zero_results += u64::from(search.results_count == 0);
            }
        }
    }

    /// The rows this partial becomes in ClickHouse.
    pub fn row_count(&self) -> usize {
        self.orders.len()
            + self.funnel.len()
            + self.users.len()
            + self.chat.len()
            + self.search.len()
            + self.queries.len()
    }

    /// Folds `other` in, as ClickHouse does when it sums partial rows.
    pub fn merge(&mut self, mut other: Partial) {
        // The smaller one is walked, the larger kept.
        if other.row_count() > self.row_count() {
            std::mem::swap(self, &mut other);
        }
        self.events += other.events;
        for (key, o) in other.orders {
            let figures = self.orders.entry(key).or_default();
            figures.orders += o.orders;
            figures.items += o.items;
            figures.revenue_minor += o.revenue_minor;
            figures.buyers.extend(o.buyers);
        }
        for (key, counts) in other.funnel {
            let slot = self.funnel.entry(key).or_default();
            for (a, b) in slot.iter_mut().zip(counts) {
                *a += b;
            }
        }
        for (key, u) in other.users {
            let figures = self.users.entry(key).or_default();
            figures.users.extend(u.users);
            figures.sessions.extend(u.sessions);
            figures.sign_ups += u.sign_ups;
        }
        for (key, c) in other.chat {
            let figures = self.chat.entry(key).or_default();
            figures.messages += c.messages;
            figures.chatters.extend(c.chatters);
            figures.flagged += c.flagged;
        }
        for (key, s) in other.search {
            let figures = self.search.entry(key).or_default();
            figures.searches += s.searches;
            figures.zero_results += s.zero_results;
            figures.latency_sum_ms += s.latency_sum_ms;
            figures.latencies_ms.extend(s.latencies_ms);
        }
        for (key, q) in other.queries {
            let figures = self.queries.entry(key).or_default();
            figures.searches += q.searches;
            figures.zero_results += q.zero_results;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: i64 = 60_000;

    /// Deterministic mixed events without the producers crate: every type,
    /// spread over a few minutes.
    fn events(seed: u64, n: usize) -> Vec<AnyEvent> {
        use backbone::events::{
            ChatMessage, LineItem, OrderEvent, Platform, SearchQuery, UserEvent,
        };
        let mut out = Vec::new();
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = |m: u64| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) % m
        };
        for i in 0..n {
            let t = 1_763_000_000_000 + (next(4 * MINUTE as u64) as i64);
            let id = uuid::Uuid::from_u128(u128::from(seed) << 64 | i as u128);
            let user = format!("u-{}", next(20));
            out.push(match i % 4 {
                0 => AnyEvent::Order(OrderEvent {
                    event_id: id,
                    occurred_at: t,
                    status: [
                        OrderStatus::Created,
                        OrderStatus::Paid,
                        OrderStatus::Refunded,
                    ][next(3) as usize],
                    order_id: format!("o-{i}"),
                    user_id: user,
                    session_id: None,
                    items: (0..=next(2))
                        .map(|k| LineItem {
                            sku: format!("s-{k}"),
                            category: ["shoes", "books", "toys"][next(3) as usize].into(),
                            quantity: 1 + next(3) as i32,
                            unit_price_minor: 100 * (1 + next(50) as i64),
                        })
                        .collect(),
                    currency: ["EUR", "USD"][next(2) as usize].into(),
                    total_minor: 0,
                }),
                1 => AnyEvent::User(UserEvent {
                    event_id: id,
                    occurred_at: t,
                    kind: [UserEventKind::SignedUp, UserEventKind::LoggedIn][next(2) as usize],
                    user_id: user,
                    session_id: format!("s-{}", next(30)),
                    country: ["DE", "PL"][next(2) as usize].into(),
                    platform: [Platform::Web, Platform::Ios][next(2) as usize],
                    page: None,
                }),
                2 => AnyEvent::Chat(ChatMessage {
                    event_id: id,
                    occurred_at: t,
                    room_id: format!("r-{}", next(3)),
                    user_id: user,
                    text: "hi".into(),
                    flagged: next(10) == 0,
                }),
                _ => AnyEvent::Search(SearchQuery {
                    event_id: id,
                    occurred_at: t,
                    user_id: user,
                    session_id: "s".into(),
                    query: ["red shoes", "lego", "novel"][next(3) as usize].into(),
                    filters: BTreeMap::new(),
                    results_count: next(3) as i32,
                    clicked_sku: None,
                    latency_ms: 5 + next(100) as i32,
                }),
            });
        }
        out
    }

    #[test]
    fn windows_start_at_multiples_of_their_size() {
        let w = Windows::new(MINUTE);
        assert_eq!(w.start(0), 0);
        assert_eq!(w.start(MINUTE - 1), 0);
        assert_eq!(w.start(MINUTE), MINUTE);
        assert_eq!(w.start(-1), -MINUTE, "before 1970 too");
    }

    #[test]
    fn the_watermark_trails_the_latest_event_by_the_lateness() {
        let mut mark = Watermark::new(5_000);
        assert_eq!(mark.observe(100_000), Arrival::OnTime);
        assert_eq!(mark.value(), Some(95_000));
        assert_eq!(
            mark.observe(96_000),
            Arrival::OnTime,
            "out of order, within lateness"
        );
        assert_eq!(mark.observe(94_999), Arrival::Late);
        assert_eq!(
            mark.value(),
            Some(95_000),
            "a late event does not move it back"
        );
        assert_eq!(mark.observe(200_000), Arrival::OnTime);
        assert_eq!(mark.value(), Some(195_000));
    }

    #[test]
    fn partials_split_anyhow_merge_to_the_same_result_in_any_order() {
        let w = Windows::new(MINUTE);
        let all = events(7, 2_000);
        let mut whole = Partial::default();
        for e in &all {
            whole.add(w, e);
        }
        // Flushed in pieces (as every second per Kafka partition), merged backwards.
        let mut pieces: Vec<Partial> = all
            .chunks(137)
            .map(|chunk| {
                let mut p = Partial::default();
                chunk.iter().for_each(|e| p.add(w, e));
                p
            })
            .collect();
        pieces.reverse();
        let mut merged = Partial::default();
        for p in pieces {
            merged.merge(p);
        }
        for figures in merged.search.values_mut().chain(whole.search.values_mut()) {
            figures.latencies_ms.sort_unstable();
        }
        assert_eq!(merged, whole);
        assert_eq!(whole.events, 2_000);
        assert!(
            whole.orders.len() > 3
                && whole.users.len() > 3
                && whole.chat.len() > 3
                && whole.queries.len() > 3
        );
    }

    #[test]
    fn an_order_counts_once_per_category_with_its_items_and_revenue() {
        use backbone::events::{LineItem, OrderEvent};
        let item = |category: &str, quantity, price| LineItem {
            sku: "s".into(),
            category: category.into(),
            quantity,
            unit_price_minor: price,
        };
        let order = |status| {
            AnyEvent::Order(OrderEvent {
                event_id: uuid::Uuid::nil(),
                occurred_at: 90_000,
                status,
                order_id: "o-1".into(),
                user_id: "u-1".into(),
                session_id: None,
                items: vec![
                    item("books", 2, 500),
                    item("books", 1, 700),
                    item("toys", 3, 100),
                ],
                currency: "EUR".into(),
                total_minor: 2_000,
            })
        };
        let mut p = Partial::default();
        p.add(Windows::new(MINUTE), &order(OrderStatus::Created));
        p.add(Windows::new(MINUTE), &order(OrderStatus::Paid));
        let books = &p.orders[&(MINUTE, "books".to_owned(), "EUR".to_owned())];
        assert_eq!(
            (books.orders, books.items, books.revenue_minor),
            (1, 3, 1_700)
        );
        let toys = &p.orders[&(MINUTE, "toys".to_owned(), "EUR".to_owned())];
        assert_eq!((toys.orders, toys.items, toys.revenue_minor), (1, 3, 300));
        assert_eq!(
            p.funnel[&MINUTE],
            [1, 1, 0, 0, 0, 0],
            "paid counts in the funnel only"
        );
    }
}
