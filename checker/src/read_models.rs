//! The analytics read models recomputed from the events with plain loops,
//! independent of the job's code, and the same figures read back from
//! ClickHouse's views.

use std::collections::{BTreeMap, BTreeSet};

use backbone::events::{AnyEvent, OrderStatus, UserEventKind};

const MINUTE_MS: i64 = 60_000;
/// Top queries per window the `top_queries_per_minute` view keeps.
const TOP_QUERIES: usize = 10;

/// (window start in seconds, first dimension, second dimension).
pub type Key3 = (u32, String, String);

/// Every read model's figures by window and key.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ReadModels {
    /// orders, items, revenue, unique buyers.
    pub orders: BTreeMap<Key3, (i64, i64, i64, u64)>,
    /// created, paid, shipped, delivered, cancelled, refunded.
    pub funnel: BTreeMap<u32, [i64; 6]>,
    /// unique users, sign-ups, sessions.
    pub users: BTreeMap<Key3, (u64, i64, u64)>,
    /// messages, unique chatters, flagged.
    pub chat: BTreeMap<(u32, String), (i64, u64, i64)>,
    /// searches, zero results, latency sum, p95, mean.
    pub search: BTreeMap<u32, (i64, i64, i64, i32, f64)>,
    /// searches, of which found nothing, per query text.
    pub queries: BTreeMap<(u32, String), (i64, i64)>,
}

/// The start, in seconds, of the `window_ms` window holding `ms`.
fn window_start(ms: i64, window_ms: i64) -> u32 {
    ((ms - ms.rem_euclid(window_ms)) / 1000) as u32
}

/// quantileExact's definition: the element at floor(level * n), sorted.
fn quantile_exact(values: &mut [i32], level: f64) -> i32 {
    values.sort_unstable();
    let at = ((level * values.len() as f64) as usize).min(values.len() - 1);
    values[at]
}

const STAGES: [OrderStatus; 6] = [
    OrderStatus::Created,
    OrderStatus::Paid,
    OrderStatus::Shipped,
    OrderStatus::Delivered,
    OrderStatus::Cancelled,
    OrderStatus::Refunded,
];

impl ReadModels {
    /// The per-minute read models of `events`.
    pub fn compute<'a>(events: impl IntoIterator<Item = &'a AnyEvent>) -> Self {
        Self::compute_per(events, MINUTE_MS)
    }

    /// The read models of `events` per hour (UTC hours, as the test
    /// servers' `toStartOfHour` gives them): distinct counts and
    /// percentiles over the hour, not added up from minutes.
    pub fn hourly<'a>(events: impl IntoIterator<Item = &'a AnyEvent>) -> Self {
        Self::compute_per(events, 3_600_000)
    }

    fn compute_per<'a>(events: impl IntoIterator<Item = &'a AnyEvent>, window_ms: i64) -> Self {
        let window = |ms: i64| window_start(ms, window_ms);
        let mut buyers: BTreeMap<Key3, BTreeSet<&str>> = BTreeMap::new();
        let mut users: BTreeMap<Key3, (BTreeSet<&str>, i64, BTreeSet<&str>)> = BTreeMap::new();
        let mut chatters: BTreeMap<(u32, String), (i64, BTreeSet<&str>, i64)> = BTreeMap::new();
        let mut latencies: BTreeMap<u32, Vec<i32>> = BTreeMap::new();
        let mut out = Self::default();
        for event in events {
            match event {
                AnyEvent::Order(o) => {
                    let m = window(o.occurred_at);
                    let stage = STAGES
                        .iter()
                        .position(|s| *s == o.status)
                        .expect("every status is a stage");
                    out.funnel.entry(m).or_default()[stage] += 1;
                    if o.status == OrderStatus::Created {
                        let categories: BTreeSet<&str> =
                            o.items.iter().map(|i| i.category.as_str()).collect();
                        for category in categories {
                            let key = (m, category.to_owned(), o.currency.clone());
                            let slot = out.orders.entry(key.clone()).or_default();
                            slot.0 += 1;
                            for item in o.items.iter().filter(|i| i.category == category) {
                                slot.1 += i64::from(item.quantity);
                                slot.2 += i64::from(item.quantity) * item.unit_price_minor;
                            }
                            buyers.entry(key).or_default().insert(&o.user_id);
                        }
                    }
                }
                AnyEvent::User(u) => {
                    let platform = serde_json::to_value(u.platform)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default();
                    let slot = users
                        .entry((window(u.occurred_at), u.country.clone(), platform))
                        .or_default();
                    slot.0.insert(&u.user_id);
                    slot.2.insert(&u.session_id);
                    slot.1 += i64::from(u.kind == UserEventKind::SignedUp);
                }
                AnyEvent::Chat(c) => {
                    let slot = chatters
                        .entry((window(c.occurred_at), c.room_id.clone()))
                        .or_default();
                    slot.0 += 1;
                    slot.1.insert(&c.user_id);
                    slot.2 += i64::from(c.flagged);
                }
                AnyEvent::Search(s) => {
                    let m = window(s.occurred_at);
                    let slot = out.search.entry(m).or_default();
                    slot.0 += 1;
                    slot.1 += i64::from(s.results_count == 0);
                    slot.2 += i64::from(s.latency_ms);
                    latencies.entry(m).or_default().push(s.latency_ms);
                    let slot = out.queries.entry((m, s.query.clone())).or_default();
                    slot.0 += 1;
                    slot.1 += i64::from(s.results_count == 0);
                }
            }
        }
        for (key, set) in buyers {
            if let Some(row) = out.orders.get_mut(&key) {
                row.3 = set.len() as u64;
            }
        }
        out.users = users
            .into_iter()
            .map(|(k, (u, s, sessions))| (k, (u.len() as u64, s, sessions.len() as u64)))
            .collect();
        out.chat = chatters
            .into_iter()
            .map(|(k, (m, c, f))| (k, (m, c.len() as u64, f)))
            .collect();
        for (m, mut values) in latencies {
            if let Some(row) = out.search.get_mut(&m) {
                row.3 = quantile_exact(&mut values, 0.95);
                row.4 = row.2 as f64 / row.0 as f64;
            }
        }
        out
    }

    /// The read models as ClickHouse serves them; `view` is `per_minute` or
    /// `per_hour`.
    pub async fn read(client: &clickhouse::Client, view: &str) -> clickhouse::error::Result<Self> {
        let per = |name: &str| format!("{name}_{view}");
        let t = if view == "per_minute" {
            "toUInt32(window_start)"
        } else {
            "toUInt32(hour)"
        };
        let mut out = Self::default();
        for (w, cat, cur, a, b, r, u) in client
            .query(&format!(
                "SELECT {t}, category, currency, orders, items, revenue_minor, unique_buyers FROM {}",
                per("orders")
            ))
            .fetch_all::<(u32, String, String, i64, i64, i64, u64)>()
            .await?
        {
            out.orders.insert((w, cat, cur), (a, b, r, u));
        }
        for (w, a, b, d, e, f, g) in client
            .query(&format!(
                "SELECT {t}, created, paid, shipped, delivered, cancelled, refunded FROM {}",
                per("order_funnel")
            ))
            .fetch_all::<(u32, i64, i64, i64, i64, i64, i64)>()
            .await?
        {
            out.funnel.insert(w, [a, b, d, e, f, g]);
        }
        for (w, country, platform, u, s, sessions) in client
            .query(&format!(
                "SELECT {t}, country, platform, unique_users, sign_ups, sessions FROM {}",
                per("active_users")
            ))
            .fetch_all::<(u32, String, String, u64, i64, u64)>()
            .await?
        {
            out.users.insert((w, country, platform), (u, s, sessions));
        }
        for (w, room, m, u, f) in client
            .query(&format!(
                "SELECT {t}, room_id, messages, unique_chatters, flagged FROM {}",
                per("chat_rooms")
            ))
            .fetch_all::<(u32, String, i64, u64, i64)>()
            .await?
        {
            out.chat.insert((w, room), (m, u, f));
        }
        for (w, n, z, l, p, mean) in client
            .query(&format!(
                "SELECT {t}, searches, zero_results, latency_sum_ms, toInt32(p95_latency_ms), mean_latency_ms FROM {}",
                per("searches")
            ))
            .fetch_all::<(u32, i64, i64, i64, i32, f64)>()
            .await?
        {
            out.search.insert(w, (n, z, l, p, mean));
        }
        for (w, q, n, z) in client
            .query(&format!(
                "SELECT {t}, query, searches, zero_results FROM {}",
                per("search_queries")
            ))
            .fetch_all::<(u32, String, i64, i64)>()
            .await?
        {
            out.queries.insert((w, q), (n, z));
        }
        Ok(out)
    }

    /// The `top_queries_per_minute` view's rows these figures imply: per
    /// window the most searched queries, ties by query text.
    pub fn top_queries(&self) -> Vec<(u32, String, i64)> {
        let mut all: Vec<(u32, String, i64)> = self
            .queries
            .iter()
            .map(|((w, q), (n, _))| (*w, q.clone(), *n))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0).then(b.2.cmp(&a.2)).then(a.1.cmp(&b.1)));
        let mut per_window = BTreeMap::<u32, usize>::new();
        all.retain(|(w, _, _)| {
            let seen = per_window.entry(*w).or_default();
            *seen += 1;
            *seen <= TOP_QUERIES
        });
        all
    }

    /// Per-minute figures folded into hours, for checking the rollups: sums
    /// only (distinct counts and percentiles do not add up across minutes).
    pub fn hourly_sums(&self) -> BTreeMap<(u32, String), i64> {
        let hour = |w: u32| w - w % 3600;
        let mut out = BTreeMap::new();
        for ((w, cat, cur), (a, b, r, _)) in &self.orders {
            *out.entry((hour(*w), format!("orders {cat} {cur}")))
                .or_default() += a + 1000 * b + 1_000_000 * r;
        }
        for (w, counts) in &self.funnel {
            *out.entry((hour(*w), "funnel".to_owned())).or_default() += counts
                .iter()
                .enumerate()
                .map(|(i, c)| c << (8 * i))
                .sum::<i64>();
        }
        for (w, (n, z, l, _, _)) in &self.search {
            *out.entry((hour(*w), "search".to_owned())).or_default() +=
                n + 1000 * z + 1_000_000 * l;
        }
        for ((w, query), (n, z)) in &self.queries {
            *out.entry((hour(*w), format!("query {query}"))).or_default() += n + 1000 * z;
        }
        for ((w, room), (m, _, f)) in &self.chat {
            *out.entry((hour(*w), format!("chat {room}"))).or_default() += m + 1000 * f;
        }
        out
    }
}

/// Reads the `top_queries_per_minute` view.
pub async fn read_top_queries(
    client: &clickhouse::Client,
) -> clickhouse::error::Result<Vec<(u32, String, i64)>> {
    client
        .query("SELECT toUInt32(window_start), query, searches FROM top_queries_per_minute")
        .fetch_all()
        .await
}
