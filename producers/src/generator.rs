//! Realistic, referentially consistent traffic from a seed: users sign up and
//! log in, search (a share of searches find nothing), chat in live-shopping
//! rooms and order. Orders belong to users who signed up, an order's
//! lifecycle events come in order, and a share of searches lead to an order
//! in the same session. Hot users and rooms follow a Zipf distribution.
//!
//! The same seed and start time give the same events, byte for byte, so a
//! checker can recompute what a run produced.

use std::collections::{BTreeMap, VecDeque};
use std::str::FromStr;

use backbone::events::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Zipf};
use uuid::Uuid;

use crate::publisher::Poison;

/// Relative weights of the event types.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mix {
    pub user: f64,
    pub order: f64,
    pub chat: f64,
    pub search: f64,
}

impl Default for Mix {
    fn default() -> Self {
        Self {
            user: 30.0,
            order: 15.0,
            chat: 35.0,
            search: 20.0,
        }
    }
}

impl FromStr for Mix {
    type Err = String;

    /// `user=30,order=15,chat=35,search=20`; types left out get 0. Schema
    /// names (`order_event`) work too.
    fn from_str(text: &str) -> Result<Self, String> {
        let mut mix = Mix {
            user: 0.0,
            order: 0.0,
            chat: 0.0,
            search: 0.0,
        };
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not TYPE=WEIGHT, such as order=15"))?;
            let weight: f64 = weight
                .trim()
                .parse()
                .ok()
                .filter(|w: &f64| w.is_finite() && *w >= 0.0)
                .ok_or_else(|| format!("weight {weight:?} of {name} must be a number >= 0"))?;
            let slot = match name.trim() {
                "user" | "user_event" => &mut mix.user,
                "order" | "order_event" => &mut mix.order,
                "chat" | "chat_message" => &mut mix.chat,
                "search" | "search_query" => &mut mix.search,
                other => {
                    return Err(format!(
                        "unknown event type {other:?}; valid: user, order, chat, search"
                    ))
                }
            };
            *slot = weight;
        }
        if mix.user + mix.order + mix.chat + mix.search <= 0.0 {
            return Err("the mix must give some event type a weight above 0".into());
        }
        Ok(mix)
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    pub seed: u64,
    /// Event time of the first event, UTC milliseconds.
    pub start_ms: i64,
    /// Event-time gap between consecutive events (1000 / rate).
    pub spacing_ms: f64,
    pub users: usize,
    pub rooms: usize,
    pub mix: Mix,
    /// Share of searches with no results.
    pub zero_result_share: f64,
    /// Share of searches with results that lead to an order in the session.
    pub search_to_order_share: f64,
    /// Share of records deliberately malformed.
    pub poison_rate: f64,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            start_ms: 1_763_000_000_000,
            spacing_ms: 1.0,
            users: 10_000,
            rooms: 200,
            mix: Mix::default(),
            zero_result_share: 0.1,
            search_to_order_share: 0.2,
            poison_rate: 0.0,
        }
    }
}

/// One generated record: the event, and whether to send it malformed.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub event: AnyEvent,
    pub poison: Option<Poison>,
}

struct User {
    id: String,
    signed_up: bool,
    session: Option<String>,
    sessions: u32,
    country: &'static str,
    platform: Platform,
}

/// Who acts next: a user ready for the intended event, or the event that
/// must come first (signing up, logging in).
enum Actor {
    Ready(usize),
    Prerequisite(AnyEvent),
}

struct OpenOrder {
    event: OrderEvent,
}

const COUNTRIES: [(&str, &str); 8] = [
    ("DE", "EUR"),
    ("FR", "EUR"),
    ("ES", "EUR"),
    ("IT", "EUR"),
    ("NL", "EUR"),
    ("GB", "GBP"),
    ("US", "USD"),
    ("PL", "PLN"),
];
const CATEGORIES: [&str; 12] = [
    "shoes",
    "bags",
    "beauty",
    "electronics",
    "home",
    "toys",
    "sports",
    "jewelry",
    "books",
    "fashion",
    "garden",
    "kitchen",
];
const SKUS_PER_CATEGORY: usize = 40;
const PRODUCTS: [&str; 12] = [
    "sneakers",
    "backpack",
    "lipstick",
    "headphones",
    "lamp",
    "puzzle",
    "yoga mat",
    "necklace",
    "novel",
    "jacket",
    "planter",
    "knife set",
];
const ADJECTIVES: [&str; 8] = [
    "red", "cheap", "vegan", "wireless", "vintage", "kids", "large", "organic",
];
const PHRASES: [&str; 10] = [
    "is it waterproof?",
    "how long is shipping?",
    "love this!",
    "does it come in blue?",
    "just ordered two",
    "what size should I take?",
    "discount code please",
    "the last one broke after a week",
    "can you show the back?",
    "wow",
];

/// An endless, seeded stream of events.
pub struct Generator {
    config: GeneratorConfig,
    rng: ChaCha8Rng,
    users: Vec<User>,
    user_rank: Zipf<f64>,
    room_rank: Zipf<f64>,
    open_orders: Vec<OpenOrder>,
    /// Sessions whose search found something and will lead to an order.
    intents: VecDeque<(usize, String)>,
    weights: [f64; 4],
    count: u64,
    orders_created: u64,
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator")
            .field("config", &self.config)
            .field("count", &self.count)
            .finish()
    }
}

impl Generator {
    pub fn new(config: GeneratorConfig) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let users = (0..config.users.max(1))
            .map(|i| User {
                id: format!("u-{i:06}"),
                signed_up: false,
                session: None,
                sessions: 0,
                country: COUNTRIES[rng.random_range(0..COUNTRIES.len())].0,
                platform: [Platform::Web, Platform::Ios, Platform::Android][rng.random_range(0..3)],
            })
            .collect();
        let zipf = |n: usize| Zipf::new(n.max(1) as f64, 1.07).expect("n >= 1 and s > 0");
        let mix = config.mix;
        Self {
            user_rank: zipf(config.users),
            room_rank: zipf(config.rooms),
            weights: [mix.user, mix.order, mix.chat, mix.search],
            rng,
            users,
            open_orders: Vec::new(),
            intents: VecDeque::new(),
            count: 0,
            orders_created: 0,
            config,
        }
    }

    fn now(&self) -> i64 {
        self.config.start_ms + (self.count as f64 * self.config.spacing_ms) as i64
    }

    fn uuid(&mut self) -> Uuid {
        uuid::Builder::from_random_bytes(self.rng.random()).into_uuid()
    }

    fn pick_user(&mut self) -> usize {
        self.user_rank.sample(&mut self.rng) as usize - 1
    }

    /// A user ready to act, picked by popularity. One who has not signed up
    /// or has no session does that first: the sign-up or log-in is emitted
    /// instead of the intended event.
    fn active_user(&mut self) -> Actor {
        let u = self.pick_user();
        if !self.users[u].signed_up {
            self.users[u].signed_up = true;
            return Actor::Prerequisite(self.user_event(u, UserEventKind::SignedUp));
        }
        if self.users[u].session.is_none() {
            self.users[u].sessions += 1;
            let session = format!("{}-s{}", self.users[u].id, self.users[u].sessions);
            self.users[u].session = Some(session);
            return Actor::Prerequisite(self.user_event(u, UserEventKind::LoggedIn));
        }
        Actor::Ready(u)
    }

    fn user_event(&mut self, u: usize, kind: UserEventKind) -> AnyEvent {
        let page = (kind == UserEventKind::PageViewed).then(|| {
            let c = self.rng.random_range(0..CATEGORIES.len());
            format!(
                "/c/{}/sku-{:04}",
                CATEGORIES[c],
                c * SKUS_PER_CATEGORY + self.rng.random_range(0..SKUS_PER_CATEGORY)
            )
        });
        let event_id = self.uuid();
        let occurred_at = self.now();
        let user = &self.users[u];
        AnyEvent::User(UserEvent {
            event_id,
            occurred_at,
            kind,
            user_id: user.id.clone(),
            session_id: user.session.clone().unwrap_or_default(),
            country: user.country.to_owned(),
            platform: user.platform,
            page,
        })
    }

    fn next_user_event(&mut self) -> AnyEvent {
        let u = match self.active_user() {
            Actor::Ready(u) => u,
            Actor::Prerequisite(event) => return event,
        };
        let roll: f64 = self.rng.random();
        if roll < 0.08 {
            let event = self.user_event(u, UserEventKind::LoggedOut);
            self.users[u].session = None;
            event
        } else if roll < 0.12 {
            self.user_event(u, UserEventKind::ProfileUpdated)
        } else {
            self.user_event(u, UserEventKind::PageViewed)
        }
    }

    fn next_search(&mut self) -> AnyEvent {
        let u = match self.active_user() {
            Actor::Ready(u) => u,
            Actor::Prerequisite(event) => return event,
        };
        let product = self.rng.random_range(0..PRODUCTS.len());
        let zero = self
            .rng
            .random_bool(self.config.zero_result_share.clamp(0.0, 1.0));
        let query = if zero {
            // Misspelt or out of range: nothing matches.
            format!(
                "{}x{}",
                &PRODUCTS[product][..3],
                self.rng.random_range(0..1000)
            )
        } else if self.rng.random_bool(0.5) {
            format!(
                "{} {}",
                ADJECTIVES[self.rng.random_range(0..ADJECTIVES.len())],
                PRODUCTS[product]
            )
        } else {
            PRODUCTS[product].to_owned()
        };
        let mut filters = BTreeMap::new();
        if self.rng.random_bool(0.3) {
            filters.insert("category".to_owned(), CATEGORIES[product].to_owned());
        }
        if self.rng.random_bool(0.15) {
            filters.insert(
                "max_price".to_owned(),
                (self.rng.random_range(1..50) * 1000).to_string(),
            );
        }
        let results_count = if zero {
            0
        } else {
            self.rng.random_range(1..200)
        };
        let clicked_sku = (results_count > 0 && self.rng.random_bool(0.4)).then(|| {
            format!(
                "sku-{:04}",
                product * SKUS_PER_CATEGORY + self.rng.random_range(0..SKUS_PER_CATEGORY)
            )
        });
        // Mostly fast, with a long tail.
        let latency_ms = (8.0 + self.rng.random::<f64>().powi(4) * 400.0) as i32;
        let session_id = self.users[u].session.clone().unwrap_or_default();
        if results_count > 0
            && self
                .rng
                .random_bool(self.config.search_to_order_share.clamp(0.0, 1.0))
        {
            self.intents.push_back((u, session_id.clone()));
        }
        AnyEvent::Search(SearchQuery {
            event_id: self.uuid(),
            occurred_at: self.now(),
            user_id: self.users[u].id.clone(),
            session_id,
            query,
            filters,
            results_count,
            clicked_sku,
            latency_ms,
        })
    }

    fn next_chat(&mut self) -> AnyEvent {
        let u = match self.active_user() {
            Actor::Ready(u) => u,
            Actor::Prerequisite(event) => return event,
        };
        let room = self.room_rank.sample(&mut self.rng) as usize - 1;
        AnyEvent::Chat(ChatMessage {
            event_id: self.uuid(),
            occurred_at: self.now(),
            room_id: format!("room-{room:04}"),
            user_id: self.users[u].id.clone(),
            text: PHRASES[self.rng.random_range(0..PHRASES.len())].to_owned(),
            flagged: self.rng.random_bool(0.02),
        })
    }

    fn next_order(&mut self) -> AnyEvent {
        if !self.open_orders.is_empty() && self.rng.random_bool(0.6) {
            return self.advance_order();
        }
        let (u, session_id) = match self.intents.pop_front() {
            Some((u, session)) => (u, Some(session)),
            None => match self.active_user() {
                Actor::Ready(u) => (u, self.users[u].session.clone()),
                Actor::Prerequisite(event) => return event,
            },
        };
        let currency = COUNTRIES
            .iter()
            .find(|(c, _)| *c == self.users[u].country)
            .map_or("EUR", |(_, cur)| cur);
        let items: Vec<LineItem> = (0..self.rng.random_range(1..=4))
            .map(|_| {
                let c = self.rng.random_range(0..CATEGORIES.len());
                let s = c * SKUS_PER_CATEGORY + self.rng.random_range(0..SKUS_PER_CATEGORY);
                LineItem {
                    sku: format!("sku-{s:04}"),
                    category: CATEGORIES[c].to_owned(),
                    quantity: self.rng.random_range(1..=3),
                    // A stable price per SKU.
                    unit_price_minor: 499 + (s as i64 * 7919) % 24_500,
                }
            })
            .collect();
        let total_minor = items
            .iter()
            .map(|i| i.unit_price_minor * i.quantity as i64)
            .sum();
        self.orders_created += 1;
        let event = OrderEvent {
            event_id: self.uuid(),
            occurred_at: self.now(),
            status: OrderStatus::Created,
            order_id: format!("o-{:08}", self.orders_created),
            user_id: self.users[u].id.clone(),
            session_id,
            items,
            currency: currency.to_owned(),
            total_minor,
        };
        self.open_orders.push(OpenOrder {
            event: event.clone(),
        });
        AnyEvent::Order(event)
    }

    /// Moves a random open order one step: created -> paid | cancelled,
    /// paid -> shipped | refunded, shipped -> delivered, delivered -> refunded | done.
    fn advance_order(&mut self) -> AnyEvent {
        let i = self.rng.random_range(0..self.open_orders.len());
        let roll: f64 = self.rng.random();
        let next = match self.open_orders[i].event.status {
            OrderStatus::Created if roll < 0.9 => OrderStatus::Paid,
            OrderStatus::Created => OrderStatus::Cancelled,
            OrderStatus::Paid if roll < 0.95 => OrderStatus::Shipped,
            OrderStatus::Paid => OrderStatus::Refunded,
            OrderStatus::Shipped => OrderStatus::Delivered,
            _ => OrderStatus::Refunded,
        };
        let finished = matches!(next, OrderStatus::Cancelled | OrderStatus::Refunded)
            || (next == OrderStatus::Delivered && self.rng.random_bool(0.97));
        let event = OrderEvent {
            event_id: self.uuid(),
            occurred_at: self.now(),
            status: next,
            ..self.open_orders[i].event.clone()
        };
        if finished {
            self.open_orders.swap_remove(i);
        } else {
            self.open_orders[i].event = event.clone();
        }
        AnyEvent::Order(event)
    }
}

impl Iterator for Generator {
    type Item = Generated;

    fn next(&mut self) -> Option<Generated> {
        let total: f64 = self.weights.iter().sum();
        let mut roll = self.rng.random::<f64>() * total;
        let mut kind = 3;
        for (i, w) in self.weights.iter().enumerate() {
            if roll < *w {
                kind = i;
                break;
            }
            roll -= w;
        }
        let event = match kind {
            0 => self.next_user_event(),
            1 => self.next_order(),
            2 => self.next_chat(),
            _ => self.next_search(),
        };
        let poison = self
            .rng
            .random_bool(self.config.poison_rate.clamp(0.0, 1.0))
            .then(|| {
                [
                    Poison::Garbage,
                    Poison::Truncated,
                    Poison::UnknownFingerprint,
                ][self.rng.random_range(0..3)]
            });
        self.count += 1;
        Some(Generated { event, poison })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    fn run(config: GeneratorConfig, n: usize) -> Vec<Generated> {
        Generator::new(config).take(n).collect()
    }

    #[test]
    fn the_same_seed_gives_the_same_events() {
        let a = run(GeneratorConfig::default(), 2000);
        assert_eq!(a, run(GeneratorConfig::default(), 2000));
        let b = run(
            GeneratorConfig {
                seed: 2,
                ..GeneratorConfig::default()
            },
            2000,
        );
        assert_ne!(a, b);
        let ids: HashSet<Uuid> = a.iter().map(|g| g.event.event_id()).collect();
        assert_eq!(ids.len(), a.len(), "event ids are unique");
        let times: Vec<i64> = a.iter().map(|g| g.event.occurred_at()).collect();
        assert!(
            times.windows(2).all(|w| w[0] <= w[1]),
            "event time never goes back"
        );
        assert_eq!(times[0], GeneratorConfig::default().start_ms);
    }

    #[test]
    fn traffic_is_referentially_consistent() {
        let events = run(
            GeneratorConfig {
                users: 500,
                ..GeneratorConfig::default()
            },
            20_000,
        );
        let mut signed_up = HashSet::new();
        let mut sessions: HashMap<String, String> = HashMap::new();
        let mut order_status: HashMap<String, OrderStatus> = HashMap::new();
        let mut searched_sessions = HashSet::new();
        let (mut orders_from_search, mut orders_created) = (0, 0);
        for g in &events {
            match &g.event {
                AnyEvent::User(e) => {
                    if e.kind == UserEventKind::SignedUp {
                        assert!(
                            signed_up.insert(e.user_id.clone()),
                            "signs up once: {}",
                            e.user_id
                        );
                    } else {
                        assert!(signed_up.contains(&e.user_id));
                    }
                    if e.kind == UserEventKind::LoggedIn {
                        sessions.insert(e.user_id.clone(), e.session_id.clone());
                    }
                }
                AnyEvent::Search(e) => {
                    assert!(signed_up.contains(&e.user_id));
                    assert_eq!(
                        sessions.get(&e.user_id),
                        Some(&e.session_id),
                        "searches happen in the user's session"
                    );
                    if e.results_count > 0 {
                        searched_sessions.insert(e.session_id.clone());
                    }
                }
                AnyEvent::Chat(e) => assert!(signed_up.contains(&e.user_id)),
                AnyEvent::Order(e) => {
                    assert!(
                        signed_up.contains(&e.user_id),
                        "orders belong to existing users"
                    );
                    assert_eq!(
                        e.total_minor,
                        e.items
                            .iter()
                            .map(|i| i.unit_price_minor * i.quantity as i64)
                            .sum::<i64>()
                    );
                    let before = order_status.insert(e.order_id.clone(), e.status);
                    let valid = matches!(
                        (before, e.status),
                        (None, OrderStatus::Created)
                            | (
                                Some(OrderStatus::Created),
                                OrderStatus::Paid | OrderStatus::Cancelled
                            )
                            | (
                                Some(OrderStatus::Paid),
                                OrderStatus::Shipped | OrderStatus::Refunded
                            )
                            | (Some(OrderStatus::Shipped), OrderStatus::Delivered)
                            | (Some(OrderStatus::Delivered), OrderStatus::Refunded)
                    );
                    assert!(valid, "{}: {before:?} -> {:?}", e.order_id, e.status);
                    if e.status == OrderStatus::Created {
                        orders_created += 1;
                        if e.session_id
                            .as_ref()
                            .is_some_and(|s| searched_sessions.contains(s))
                        {
                            orders_from_search += 1;
                        }
                    }
                }
            }
        }
        assert!(orders_created > 500, "{orders_created}");
        assert!(
            orders_from_search > orders_created / 5,
            "a share of searches lead to orders: {orders_from_search}/{orders_created}"
        );
        assert!(order_status.values().any(|s| *s == OrderStatus::Delivered));
        assert!(order_status.values().any(|s| *s == OrderStatus::Refunded));
    }

    #[test]
    fn shares_follow_the_configuration() {
        let config = GeneratorConfig {
            mix: "order=0,chat=0,search=1".parse().unwrap(),
            poison_rate: 0.1,
            ..GeneratorConfig::default()
        };
        let events = run(config, 20_000);
        let searches: Vec<&SearchQuery> = events
            .iter()
            .filter_map(|g| match &g.event {
                AnyEvent::Search(s) => Some(s),
                _ => None,
            })
            .collect();
        assert!(
            searches.len() > 12_000,
            "mostly searches once users have signed up: {}",
            searches.len()
        );
        let zero =
            searches.iter().filter(|s| s.results_count == 0).count() as f64 / searches.len() as f64;
        assert!((0.08..0.12).contains(&zero), "zero-result share {zero}");
        let poisoned =
            events.iter().filter(|g| g.poison.is_some()).count() as f64 / events.len() as f64;
        assert!((0.09..0.11).contains(&poisoned), "poison share {poisoned}");
        assert!(!events
            .iter()
            .any(|g| matches!(g.event, AnyEvent::Chat(_) | AnyEvent::Order(_))));
    }

    #[test]
    fn hot_users_and_rooms_are_zipf_distributed() {
        let events = run(
            GeneratorConfig {
                mix: "chat=1".parse().unwrap(),
                ..GeneratorConfig::default()
            },
            30_000,
        );
        let mut per_room: HashMap<String, usize> = HashMap::new();
        for g in &events {
            if let AnyEvent::Chat(c) = &g.event {
                *per_room.entry(c.room_id.clone()).or_default() += 1;
            }
        }
        let mut counts: Vec<usize> = per_room.values().copied().collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let median = counts[counts.len() / 2];
        assert!(
            counts[0] > 20 * median,
            "hottest room {} vs median {median}",
            counts[0]
        );
        assert_eq!(
            per_room
                .keys()
                .max_by_key(|r| per_room[*r])
                .map(String::as_str),
            Some("room-0000")
        );
    }

    #[test]
    fn bad_mixes_are_rejected_with_the_valid_types() {
        assert_eq!(
            "order_event=2, chat=1".parse::<Mix>().unwrap(),
            Mix {
                user: 0.0,
                order: 2.0,
                chat: 1.0,
                search: 0.0
            }
        );
        let err = "user=1,spam=2".parse::<Mix>().unwrap_err();
        assert_eq!(
            err,
            "unknown event type \"spam\"; valid: user, order, chat, search"
        );
        assert!("user=-1".parse::<Mix>().unwrap_err().contains(">= 0"));
        assert!("user".parse::<Mix>().unwrap_err().contains("TYPE=WEIGHT"));
        assert!("user=0".parse::<Mix>().unwrap_err().contains("above 0"));
    }
}
