//! The reliability checker: recomputes the events a seeded run produced and
//! compares them with the system's end state, the way Jepsen's Kafka checker
//! and Kafka's system tests do. It reports
//! - lost events: a produced event missing from its events-store table
//!   (and, with the event topics read, whether its topic holds it);
//! - duplicates: an event visible more than once to queries (after `FINAL`),
//!   or, when asked, stored more than once in the raw table;
//! - order violations: an order whose current status in `order_status_current`
//!   is not the one its last lifecycle event set;
//! - aggregates that differ from an independent recomputation
//!   ([`read_models::ReadModels`]);
//! - dead letters that are missing, doubled, unexpected, lack a header, or
//!   whose key, payload or headers differ from the original record;
//! - when asked, an event the event topics hold more than once (or, where
//!   the broker is known to, counts those and the ones they lack).
//!
//! [`Expected`] is what the run produced; [`Observed`] is read from
//! ClickHouse and Kafka; [`check`] compares the two into a [`Report`].

pub mod read_models;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use backbone::catalog::Catalog;
use backbone::events::AnyEvent;
use backbone::headers;
use backbone::kafka::KafkaConnection;
use consumers::projection::rows::order_status_name;
use producers::generator::Generated;
use rdkafka::message::{Headers, Message, OwnedMessage};
use serde::Serialize;
use uuid::Uuid;

use crate::read_models::ReadModels;

/// The parts of the system to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checks {
    /// The worker's `events-store` projection.
    pub events: bool,
    /// The worker's `order-status` projection.
    pub order_status: bool,
    /// The analytics job's read models.
    pub analytics: bool,
    /// The consumer groups whose dead letters to check (each dead-letters
    /// every poisoned record once); none skips the DLQs.
    pub dead_letter_groups: Vec<String>,
    /// A raw-table duplicate (one hidden by `FINAL`) is a finding too.
    pub exact_raw: bool,
    /// A dead letter written twice is counted, not a finding: for DLQs
    /// written before the forwarding ledger made them exactly once.
    pub dead_letters_at_least_once: bool,
    /// What an event the event topics hold other than once means.
    pub topic_copies: TopicCopies,
}

/// An event the event topics hold more than once, or not at all though its
/// publisher was acknowledged: each copy is a record of its own, which the
/// consumers, exactly once per record, count once each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicCopies {
    /// Not looked for: the event topics are not read.
    Unchecked,
    /// A copy more is a finding, and a lost event says whether its topic
    /// holds it: a real broker checks an idempotent producer's sequence
    /// numbers, so it stores a retried batch once and refuses a batch
    /// behind a failed one.
    Finding,
    /// Expected once per copy downstream (none for an event absent), and
    /// counted: librdkafka's mock cluster checks the sequence numbers of
    /// transactional producers only. It stores again a retried batch whose
    /// answer was lost, and stores a batch behind one it failed, from which
    /// librdkafka concludes the failed one was stored too
    /// (`producers/tests/idempotence.rs`).
    Counted,
}

/// The events-store tables, by event type.
pub const EVENT_TABLES: [&str; 4] = [
    "user_events",
    "order_events",
    "chat_messages",
    "search_queries",
];

/// The events-store table an event lands in.
pub fn table_of(event: &AnyEvent) -> &'static str {
    match event {
        AnyEvent::User(_) => EVENT_TABLES[0],
        AnyEvent::Order(_) => EVENT_TABLES[1],
        AnyEvent::Chat(_) => EVENT_TABLES[2],
        AnyEvent::Search(_) => EVENT_TABLES[3],
    }
}

/// Headers every dead letter must carry (retry tiers add `retry-tier`).
pub const DEAD_LETTER_HEADERS: [&str; 11] = [
    headers::ERROR_CLASS,
    headers::ERROR_MESSAGE,
    headers::ORIGINAL_TOPIC,
    headers::ORIGINAL_PARTITION,
    headers::ORIGINAL_OFFSET,
    headers::ORIGINAL_TIMESTAMP,
    headers::CONSUMER_GROUP,
    headers::ATTEMPTS,
    headers::FIRST_FAILURE_AT,
    headers::LAST_FAILURE_AT,
    headers::TRACEPARENT,
];

/// What a run produced, recomputed from its seed.
#[derive(Debug, Clone)]
pub struct Expected {
    /// Events sent well-formed, in generation order.
    pub good: Vec<AnyEvent>,
    /// Ids of the events sent deliberately malformed.
    pub poisoned: BTreeSet<Uuid>,
}

impl Expected {
    pub fn new(generated: impl IntoIterator<Item = Generated>) -> Self {
        let mut good = Vec::new();
        let mut poisoned = BTreeSet::new();
        for g in generated {
            if g.poison.is_some() {
                poisoned.insert(g.event.event_id());
            } else {
                good.push(g.event);
            }
        }
        Self { good, poisoned }
    }

    /// Each order's status as its last well-formed lifecycle event left it.
    /// The generator emits an order's events in lifecycle order, so the last
    /// one generated is the current one: no version logic involved.
    pub fn order_status(&self) -> BTreeMap<String, &'static str> {
        let mut out = BTreeMap::new();
        for event in &self.good {
            if let AnyEvent::Order(o) = event {
                out.insert(o.order_id.clone(), order_status_name(o.status));
            }
        }
        out
    }
}

/// A dead letter as the checker needs it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: BTreeMap<String, String>,
}

/// An original record a dead letter names, as it is in its topic.
#[derive(Debug, Clone)]
pub struct Original {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: BTreeMap<String, String>,
}

/// Copies of each event id in one table.
pub type Copies = HashMap<String, u64>;

/// The system's end state.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Per events-store table: copies of each event id, raw and after FINAL.
    pub events: BTreeMap<&'static str, (Copies, Copies)>,
    /// order id -> status in `order_status_current`, with its row count.
    pub order_status: BTreeMap<String, (String, u64)>,
    pub per_minute: ReadModels,
    pub per_hour: ReadModels,
    pub top_queries: Vec<(u32, String, i64)>,
    pub dead_letters: Vec<DeadLetter>,
    /// (topic, partition, offset) -> the record, for every dead letter's origin.
    pub originals: BTreeMap<(String, i32, i64), Original>,
    /// (topic, partition) -> the first offset the broker still keeps, for
    /// each partition holding an origin that was not found: an origin below
    /// it was deleted by retention, not changed.
    pub log_starts: BTreeMap<(String, i32), i64>,
    /// Event id -> its records in the event topics (read unless
    /// `TopicCopies::Unchecked`): a lost event absent from its topic was
    /// lost before any consumer could read it.
    pub in_topics: Option<HashMap<String, usize>>,
}

fn header_map(message: &OwnedMessage) -> BTreeMap<String, String> {
    message
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| {
                    (
                        h.key.to_owned(),
                        h.value
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                            .unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Observed {
    /// The records the event topics hold of event `id`, when they were read.
    pub fn copies_in_topics(&self, id: &str) -> Option<usize> {
        self.in_topics
            .as_ref()
            .map(|copies| copies.get(id).copied().unwrap_or(0))
    }

    /// Whether the event topics hold event `id`, when they were read.
    pub fn in_topic(&self, id: &str) -> Option<bool> {
        self.copies_in_topics(id).map(|n| n > 0)
    }

    /// The events the event topics hold more than once, by id, with their
    /// copies.
    pub fn stored_twice(&self) -> Vec<(&str, usize)> {
        let mut twice: Vec<(&str, usize)> = self
            .in_topics
            .iter()
            .flatten()
            .filter(|(_, n)| **n > 1)
            .map(|(id, n)| (id.as_str(), *n))
            .collect();
        twice.sort_unstable();
        twice
    }

    /// Reads what `checks` needs from ClickHouse (`client`, bound to the
    /// database) and from Kafka (the catalog's DLQs and their origins).
    pub async fn read(
        checks: &Checks,
        client: &clickhouse::Client,
        connection: &KafkaConnection,
        catalog: &Catalog,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        let mut out = Self::default();
        if checks.events {
            for table in EVENT_TABLES {
                let count = |final_: &str| {
                    client.query(&format!(
                        "SELECT event_id, count() FROM `{table}` {final_} GROUP BY event_id"
                    ))
                };
                let raw: Copies = count("")
                    .fetch_all::<(String, u64)>()
                    .await
                    .with_context(|| format!("reading {table}"))?
                    .into_iter()
                    .collect();
                let visible: Copies = count("FINAL")
                    .fetch_all::<(String, u64)>()
                    .await
                    .with_context(|| format!("reading {table} FINAL"))?
                    .into_iter()
                    .collect();
                out.events.insert(table, (raw, visible));
            }
        }
        if checks.order_status {
            out.order_status = client
                .query("SELECT order_id, any(status), count() FROM order_status_current GROUP BY order_id")
                .fetch_all::<(String, String, u64)>()
                .await
                .context("reading order_status_current")?
                .into_iter()
                .map(|(id, status, n)| (id, (status, n)))
                .collect();
        }
        if checks.analytics {
            out.per_minute = ReadModels::read(client, "per_minute")
                .await
                .context("reading the per-minute read models")?;
            out.per_hour = ReadModels::read(client, "per_hour")
                .await
                .context("reading the per-hour read models")?;
            out.top_queries = read_models::read_top_queries(client)
                .await
                .context("reading top_queries_per_minute")?;
        }
        // Origin topic -> the positions of its dead letters' originals.
        let mut wanted: BTreeMap<String, BTreeSet<(i32, i64)>> = BTreeMap::new();
        if !checks.dead_letter_groups.is_empty() {
            for topic in &catalog.topics {
                let Some(dlq) = &topic.dead_letter else {
                    continue;
                };
                for m in consumers::dlq::read_all(connection, &dlq.topic)? {
                    let letter = DeadLetter {
                        topic: dlq.topic.clone(),
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(<[u8]>::to_vec),
                        payload: m.payload().map(<[u8]>::to_vec),
                        headers: header_map(&m),
                    };
                    if let (Some(t), Some(p), Some(o)) = (
                        letter.headers.get(headers::ORIGINAL_TOPIC),
                        letter
                            .headers
                            .get(headers::ORIGINAL_PARTITION)
                            .and_then(|p| p.parse().ok()),
                        letter
                            .headers
                            .get(headers::ORIGINAL_OFFSET)
                            .and_then(|o| o.parse().ok()),
                    ) {
                        wanted.entry(t.clone()).or_default().insert((p, o));
                    }
                    out.dead_letters.push(letter);
                }
            }
        }
        // Each event topic read once: for the originals of its dead letters
        // and, when asked, for the copies it holds of each event.
        let count_copies = checks.topic_copies != TopicCopies::Unchecked;
        let mut copies: HashMap<String, usize> = HashMap::new();
        for topic in &catalog.topics {
            let topic = &topic.name;
            let Some(mut positions) = wanted
                .remove(topic)
                .or_else(|| count_copies.then(BTreeSet::new))
            else {
                continue;
            };
            for m in consumers::dlq::read_all(connection, topic)? {
                let record_headers = header_map(&m);
                if count_copies {
                    if let Some(id) = event_of(&record_headers) {
                        *copies.entry(id.to_string()).or_default() += 1;
                    }
                }
                if positions.remove(&(m.partition(), m.offset())) {
                    out.originals.insert(
                        (topic.clone(), m.partition(), m.offset()),
                        Original {
                            key: m.key().map(<[u8]>::to_vec),
                            payload: m.payload().map(<[u8]>::to_vec),
                            headers: record_headers,
                        },
                    );
                }
            }
            // What is left was not found.
            let unfound: BTreeSet<i32> = positions.iter().map(|&(p, _)| p).collect();
            for (partition, start) in
                consumers::readback::log_starts(&connection.client_config(), topic, &unfound)?
            {
                out.log_starts.insert((topic.clone(), partition), start);
            }
        }
        out.in_topics = count_copies.then_some(copies);
        Ok(out)
    }
}

/// One thing wrong with the end state.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Finding {
    Lost {
        table: String,
        event_id: String,
        /// Whether the event topics hold it, when they were read.
        in_topic: Option<bool>,
    },
    Duplicate {
        table: String,
        event_id: String,
        copies: u64,
        visible: bool,
    },
    Unexpected {
        table: String,
        event_id: String,
    },
    OrderStatus {
        order_id: String,
        expected: String,
        found: String,
    },
    Aggregate {
        model: String,
        key: String,
        expected: String,
        found: String,
    },
    DeadLetterMissing {
        event_id: String,
        group: String,
        /// Whether the event topics hold it, when they were read.
        in_topic: Option<bool>,
    },
    DeadLetterDuplicate {
        event_id: String,
        group: String,
        copies: usize,
    },
    DeadLetterUnexpected {
        at: String,
        event_id: String,
        group: String,
    },
    DeadLetterHeaders {
        at: String,
        missing: Vec<String>,
    },
    DeadLetterChanged {
        at: String,
        what: String,
    },
    StoredTwice {
        event_id: String,
        copies: usize,
    },
}

impl Finding {
    /// The finding's kind, as `--output json` names it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Lost { .. } => "lost",
            Self::Duplicate { .. } => "duplicate",
            Self::Unexpected { .. } => "unexpected",
            Self::OrderStatus { .. } => "order_status",
            Self::Aggregate { .. } => "aggregate",
            Self::DeadLetterMissing { .. } => "dead_letter_missing",
            Self::DeadLetterDuplicate { .. } => "dead_letter_duplicate",
            Self::DeadLetterUnexpected { .. } => "dead_letter_unexpected",
            Self::DeadLetterHeaders { .. } => "dead_letter_headers",
            Self::DeadLetterChanged { .. } => "dead_letter_changed",
            Self::StoredTwice { .. } => "stored_twice",
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Lost { table, event_id, in_topic } => write!(
                f,
                "lost: event {event_id} is not in {table}{}",
                where_lost(*in_topic)
            ),
            Self::Duplicate { table, event_id, copies, visible } => write!(
                f,
                "duplicate: event {event_id} is in {table} {copies} times{}",
                if *visible { " (visible to queries)" } else { " (raw rows, hidden by FINAL)" }
            ),
            Self::Unexpected { table, event_id } => {
                write!(f, "unexpected: {table} has event {event_id}, which the run did not send well-formed")
            }
            Self::OrderStatus { order_id, expected, found } => write!(
                f,
                "order violation: order {order_id} is {found} in order_status_current, its last event made it {expected}"
            ),
            Self::Aggregate { model, key, expected, found } => {
                write!(f, "aggregate: {model} {key} is {found}, recomputed {expected}")
            }
            Self::DeadLetterMissing { event_id, group, in_topic } => write!(
                f,
                "dead letter missing: poisoned event {event_id} is not in a DLQ for group {group}{}",
                where_lost(*in_topic)
            ),
            Self::DeadLetterDuplicate { event_id, group, copies } => {
                write!(f, "dead letter duplicate: event {event_id} is in the DLQ {copies} times for group {group}")
            }
            Self::DeadLetterUnexpected { at, event_id, group } => write!(
                f,
                "dead letter unexpected: {at} (event {event_id}, group {group}) was not sent malformed"
            ),
            Self::DeadLetterHeaders { at, missing } => {
                write!(f, "dead letter headers: {at} lacks {}", missing.join(", "))
            }
            Self::DeadLetterChanged { at, what } => write!(f, "dead letter changed: {at}: {what}"),
            Self::StoredTwice { event_id, copies } => {
                write!(f, "stored twice: event {event_id} is in its topic {copies} times")
            }
        }
    }
}

/// Which side of the broker lost an event, as far as its topic tells.
fn where_lost(in_topic: Option<bool>) -> &'static str {
    match in_topic {
        Some(true) => " (its topic holds it: lost downstream of the broker)",
        Some(false) => " (its topic does not hold it: the broker acknowledged it and lost it, or it was never acknowledged)",
        None => "",
    }
}

/// What was checked and what was found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub events_sent: usize,
    pub events_poisoned: usize,
    /// Rows read per events-store table (raw).
    pub rows: BTreeMap<String, u64>,
    /// Raw copies hidden by FINAL (not findings unless `exact_raw`).
    pub raw_duplicates: u64,
    pub orders: usize,
    /// Read-model rows compared (per minute).
    pub aggregate_rows: usize,
    pub dead_letters: usize,
    /// Dead letters written more than once, when that is allowed.
    pub dead_letter_duplicates: usize,
    /// Dead letters whose original retention had deleted from its topic:
    /// counted and checked, but not compared with it.
    pub dead_letters_past_retention: usize,
    /// Events the event topics hold more than once, expected once per copy
    /// (`TopicCopies::Counted`).
    pub stored_twice: usize,
    /// Events acknowledged to the publisher that no event topic holds,
    /// expected nowhere downstream (`TopicCopies::Counted`).
    pub absent_from_topics: usize,
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.findings.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Checked {} events ({} sent malformed): {} event rows, {} raw duplicate rows hidden by FINAL, {} orders, {} read-model rows, {} dead letters ({} repeated).",
            self.events_sent + self.events_poisoned,
            self.events_poisoned,
            self.rows.values().sum::<u64>(),
            self.raw_duplicates,
            self.orders,
            self.aggregate_rows,
            self.dead_letters,
            self.dead_letter_duplicates
        )?;
        if self.dead_letters_past_retention > 0 {
            writeln!(
                f,
                "{} dead letters not compared with their originals: retention had deleted them from the source topic.",
                self.dead_letters_past_retention
            )?;
        }
        if self.stored_twice > 0 {
            writeln!(
                f,
                "{} events are in their topics more than once (the broker stored a producer's retry again): each copy is expected downstream.",
                self.stored_twice
            )?;
        }
        if self.absent_from_topics > 0 {
            writeln!(
                f,
                "{} events acknowledged to the publisher are in no topic (the broker stored a batch behind one it failed, and the producer took that for both): none is expected downstream.",
                self.absent_from_topics
            )?;
        }
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for finding in &self.findings {
            *kinds.entry(finding.kind()).or_default() += 1;
        }
        if !kinds.is_empty() {
            let counts: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
            writeln!(f, "Findings by kind: {}.", counts.join(", "))?;
        }
        // The first few of each kind, so a rare kind is not hidden behind
        // a common one.
        const SHOWN: usize = 10;
        for (kind, n) in &kinds {
            for finding in self
                .findings
                .iter()
                .filter(|x| x.kind() == *kind)
                .take(SHOWN)
            {
                writeln!(f, "  {finding}")?;
            }
            if *n > SHOWN {
                writeln!(f, "  ... and {} more {kind} findings", n - SHOWN)?;
            }
        }
        write!(f, "{} findings.", self.findings.len())
    }
}

/// Compares `observed` with `expected` for the parts `checks` names.
pub fn check(expected: &Expected, observed: &Observed, checks: &Checks) -> Report {
    let mut report = Report {
        events_sent: expected.good.len(),
        events_poisoned: expected.poisoned.len(),
        ..Report::default()
    };
    let counted = checks.topic_copies == TopicCopies::Counted;
    // The records the event topics hold of an event: what the consumers,
    // exactly once per record, are expected to show of it.
    let stored = |id: &str| match observed.copies_in_topics(id) {
        Some(copies) if counted => copies,
        _ => 1,
    };
    let stored_twice = observed.stored_twice();
    if counted {
        report.stored_twice = stored_twice.len();
        report.absent_from_topics = expected
            .good
            .iter()
            .map(|e| e.event_id())
            .chain(expected.poisoned.iter().copied())
            .filter(|id| stored(&id.to_string()) == 0)
            .count();
    } else if checks.topic_copies == TopicCopies::Finding {
        for (id, copies) in stored_twice {
            report.findings.push(Finding::StoredTwice {
                event_id: id.to_owned(),
                copies,
            });
        }
    }
    let good: Cow<[AnyEvent]> = if counted && (report.stored_twice + report.absent_from_topics) > 0
    {
        expected
            .good
            .iter()
            .flat_map(|e| std::iter::repeat_n(e, stored(&e.event_id().to_string())))
            .cloned()
            .collect()
    } else {
        Cow::Borrowed(&expected.good)
    };
    let findings = &mut report.findings;
    if checks.events {
        let mut want: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for event in good.iter() {
            want.entry(table_of(event))
                .or_default()
                .insert(event.event_id().to_string());
        }
        for (table, (raw, visible)) in &observed.events {
            let wanted = want.remove(table).unwrap_or_default();
            report
                .rows
                .insert((*table).to_owned(), raw.values().sum::<u64>());
            for id in &wanted {
                if !visible.contains_key(id) {
                    findings.push(Finding::Lost {
                        table: (*table).to_owned(),
                        event_id: id.clone(),
                        in_topic: observed.in_topic(id),
                    });
                }
            }
            let mut ids: Vec<&String> = raw.keys().collect();
            ids.sort();
            for id in ids {
                let (copies, shown) = (raw[id], visible.get(id).copied().unwrap_or(0));
                if !wanted.contains(id) {
                    findings.push(Finding::Unexpected {
                        table: (*table).to_owned(),
                        event_id: id.clone(),
                    });
                } else if shown > stored(id) as u64 {
                    findings.push(Finding::Duplicate {
                        table: (*table).to_owned(),
                        event_id: id.clone(),
                        copies: shown,
                        visible: true,
                    });
                } else if copies > shown {
                    report.raw_duplicates += copies - shown;
                    if checks.exact_raw {
                        findings.push(Finding::Duplicate {
                            table: (*table).to_owned(),
                            event_id: id.clone(),
                            copies,
                            visible: false,
                        });
                    }
                }
            }
        }
    }
    if checks.order_status {
        let want = expected.order_status();
        report.orders = want.len();
        for (order, status) in &want {
            let found = match observed.order_status.get(order) {
                Some((s, 1)) if s == status => continue,
                Some((s, 1)) => s.clone(),
                Some((s, n)) => format!("{s} in {n} rows"),
                None => "absent".to_owned(),
            };
            findings.push(Finding::OrderStatus {
                order_id: order.clone(),
                expected: (*status).to_owned(),
                found,
            });
        }
        for (order, (status, _)) in &observed.order_status {
            if !want.contains_key(order) {
                findings.push(Finding::OrderStatus {
                    order_id: order.clone(),
                    expected: "absent".to_owned(),
                    found: status.clone(),
                });
            }
        }
    }
    if checks.analytics {
        let want = ReadModels::compute(good.iter());
        let got = &observed.per_minute;
        report.aggregate_rows = got.orders.len()
            + got.funnel.len()
            + got.users.len()
            + got.chat.len()
            + got.search.len()
            + got.queries.len();
        compare("orders_per_minute", &want.orders, &got.orders, findings);
        compare(
            "order_funnel_per_minute",
            &want.funnel,
            &got.funnel,
            findings,
        );
        compare("active_users_per_minute", &want.users, &got.users, findings);
        compare("chat_rooms_per_minute", &want.chat, &got.chat, findings);
        compare("searches_per_minute", &want.search, &got.search, findings);
        compare(
            "search_queries_per_minute",
            &want.queries,
            &got.queries,
            findings,
        );
        let mut top = observed.top_queries.clone();
        top.sort_by(|a, b| a.0.cmp(&b.0).then(b.2.cmp(&a.2)).then(a.1.cmp(&b.1)));
        let want_top: BTreeMap<usize, _> = want.top_queries().into_iter().enumerate().collect();
        let got_top: BTreeMap<usize, _> = top.into_iter().enumerate().collect();
        compare(
            "top_queries_per_minute (rank)",
            &want_top,
            &got_top,
            findings,
        );
        // Per hour, distinct counts and percentiles included: whole hours
        // come from their compaction where it is current (pipelines::hours).
        let want = ReadModels::hourly(good.iter());
        let got = &observed.per_hour;
        compare("orders_per_hour", &want.orders, &got.orders, findings);
        compare("order_funnel_per_hour", &want.funnel, &got.funnel, findings);
        compare("active_users_per_hour", &want.users, &got.users, findings);
        compare("chat_rooms_per_hour", &want.chat, &got.chat, findings);
        compare("searches_per_hour", &want.search, &got.search, findings);
        compare(
            "search_queries_per_hour",
            &want.queries,
            &got.queries,
            findings,
        );
    }
    if !checks.dead_letter_groups.is_empty() {
        check_dead_letters(expected, observed, checks, &stored, &mut report);
    }
    report
}

fn compare<K: Ord + fmt::Debug, V: PartialEq + fmt::Debug>(
    model: &str,
    want: &BTreeMap<K, V>,
    got: &BTreeMap<K, V>,
    findings: &mut Vec<Finding>,
) {
    let show = |v: Option<&V>| v.map_or_else(|| "absent".to_owned(), |v| format!("{v:?}"));
    for key in want
        .keys()
        .chain(got.keys().filter(|k| !want.contains_key(k)))
    {
        let (w, g) = (want.get(key), got.get(key));
        if w != g {
            findings.push(Finding::Aggregate {
                model: model.to_owned(),
                key: format!("{key:?}"),
                expected: show(w),
                found: show(g),
            });
        }
    }
}

/// The event id in a `traceparent` whose trace id is the event id.
fn event_of(record_headers: &BTreeMap<String, String>) -> Option<Uuid> {
    let trace = record_headers
        .get(headers::TRACEPARENT)?
        .split('-')
        .nth(1)?;
    Uuid::try_parse(trace).ok()
}

fn check_dead_letters(
    expected: &Expected,
    observed: &Observed,
    checks: &Checks,
    stored: &dyn Fn(&str) -> usize,
    report: &mut Report,
) {
    let mut findings = Vec::new();
    let mut copies: BTreeMap<(Uuid, &str), usize> = BTreeMap::new();
    for letter in &observed.dead_letters {
        let at = format!("{}[{}]@{}", letter.topic, letter.partition, letter.offset);
        let missing: Vec<String> = DEAD_LETTER_HEADERS
            .iter()
            .filter(|h| !letter.headers.contains_key(**h))
            .map(|h| (*h).to_owned())
            .collect();
        if !missing.is_empty() {
            findings.push(Finding::DeadLetterHeaders {
                at: at.clone(),
                missing,
            });
        }
        let group = letter
            .headers
            .get(headers::CONSUMER_GROUP)
            .map_or("", String::as_str);
        if !checks.dead_letter_groups.iter().any(|g| g == group) {
            continue;
        }
        report.dead_letters += 1;
        let id = event_of(&letter.headers);
        match id {
            Some(id) if expected.poisoned.contains(&id) => {
                *copies.entry((id, group)).or_default() += 1;
            }
            _ => findings.push(Finding::DeadLetterUnexpected {
                at: at.clone(),
                event_id: id.map_or_else(|| "unknown".to_owned(), |i| i.to_string()),
                group: group.to_owned(),
            }),
        }
        let origin = (
            letter
                .headers
                .get(headers::ORIGINAL_TOPIC)
                .cloned()
                .unwrap_or_default(),
            letter
                .headers
                .get(headers::ORIGINAL_PARTITION)
                .and_then(|p| p.parse().ok())
                .unwrap_or(-1),
            letter
                .headers
                .get(headers::ORIGINAL_OFFSET)
                .and_then(|o| o.parse().ok())
                .unwrap_or(-1),
        );
        let Some(original) = observed.originals.get(&origin) else {
            let log_start = observed.log_starts.get(&(origin.0.clone(), origin.1));
            if log_start.is_some_and(|&start| origin.2 < start) {
                report.dead_letters_past_retention += 1;
                continue;
            }
            findings.push(Finding::DeadLetterChanged {
                at,
                what: format!(
                    "its original {}[{}]@{} was not found",
                    origin.0, origin.1, origin.2
                ),
            });
            continue;
        };
        let mut changed = Vec::new();
        if original.key != letter.key {
            changed.push("key".to_owned());
        }
        if original.payload != letter.payload {
            changed.push("payload".to_owned());
        }
        for (name, value) in &original.headers {
            if !headers::FAILURE_HEADERS.contains(&name.as_str())
                && letter.headers.get(name) != Some(value)
            {
                changed.push(format!("header {name}"));
            }
        }
        if !changed.is_empty() {
            findings.push(Finding::DeadLetterChanged {
                at,
                what: format!("{} differ from the original", changed.join(", ")),
            });
        }
    }
    for group in &checks.dead_letter_groups {
        for id in &expected.poisoned {
            // One dead letter per record the event topics hold of it.
            let want = stored(&id.to_string());
            match copies.get(&(*id, group.as_str())).copied().unwrap_or(0) {
                n if n == want => {}
                n if n > want && checks.dead_letters_at_least_once => {
                    report.dead_letter_duplicates += n - want;
                }
                n if n < want => findings.push(Finding::DeadLetterMissing {
                    event_id: id.to_string(),
                    group: group.clone(),
                    in_topic: observed.in_topic(&id.to_string()),
                }),
                n => findings.push(Finding::DeadLetterDuplicate {
                    event_id: id.to_string(),
                    group: group.clone(),
                    copies: n,
                }),
            }
        }
    }
    report.findings.extend(findings);
}

#[cfg(test)]
mod tests {
    use super::*;
    use producers::generator::{Generator, GeneratorConfig};

    fn run() -> Expected {
        Expected::new(Generator::new(GeneratorConfig::default()).take(200))
    }

    /// The end state of a perfect run: every event once in its table.
    fn perfect(expected: &Expected) -> Observed {
        let mut observed = Observed::default();
        for table in EVENT_TABLES {
            observed
                .events
                .insert(table, (Copies::new(), Copies::new()));
        }
        for event in &expected.good {
            let (raw, visible) = observed.events.get_mut(table_of(event)).expect("table");
            raw.insert(event.event_id().to_string(), 1);
            visible.insert(event.event_id().to_string(), 1);
        }
        observed.order_status = expected
            .order_status()
            .into_iter()
            .map(|(order, status)| (order, (status.to_owned(), 1)))
            .collect();
        observed
    }

    /// The event topics holding every event of the run once but `absent`.
    fn in_topics_but(expected: &Expected, absent: &str) -> HashMap<String, usize> {
        expected
            .good
            .iter()
            .map(|e| e.event_id().to_string())
            .filter(|id| id != absent)
            .map(|id| (id, 1))
            .collect()
    }

    /// [`checks`] where the broker's own copies are counted.
    fn counted() -> Checks {
        Checks {
            topic_copies: TopicCopies::Counted,
            ..checks()
        }
    }

    fn checks() -> Checks {
        Checks {
            events: true,
            order_status: true,
            analytics: false,
            dead_letter_groups: Vec::new(),
            exact_raw: false,
            dead_letters_at_least_once: false,
            topic_copies: TopicCopies::Finding,
        }
    }

    #[test]
    fn a_perfect_end_state_has_no_findings() {
        let expected = run();
        let report = check(&expected, &perfect(&expected), &checks());
        assert!(report.passed(), "{report}");
        assert_eq!(
            report.rows.values().sum::<u64>() as usize,
            expected.good.len()
        );
    }

    #[test]
    fn a_dropped_or_doubled_record_is_found() {
        let expected = run();
        let mut observed = perfect(&expected);
        let (dropped, doubled) = (&expected.good[3], &expected.good[7]);
        let (raw, visible) = observed.events.get_mut(table_of(dropped)).expect("table");
        raw.remove(&dropped.event_id().to_string());
        visible.remove(&dropped.event_id().to_string());
        let (raw, visible) = observed.events.get_mut(table_of(doubled)).expect("table");
        *raw.get_mut(&doubled.event_id().to_string()).expect("row") = 2;
        *visible
            .get_mut(&doubled.event_id().to_string())
            .expect("row") = 2;
        let report = check(&expected, &observed, &checks());
        let kinds: Vec<&str> = report.findings.iter().map(Finding::kind).collect();
        assert_eq!(kinds, ["lost", "duplicate"], "{report}");
        // With the topics read, the finding says which side lost it.
        let dropped_id = dropped.event_id().to_string();
        for in_topic in [true, false] {
            let absent = if in_topic { "" } else { dropped_id.as_str() };
            observed.in_topics = Some(in_topics_but(&expected, absent));
            let report = check(&expected, &observed, &checks());
            assert_eq!(
                report.findings[0],
                Finding::Lost {
                    table: table_of(dropped).to_owned(),
                    event_id: dropped_id.clone(),
                    in_topic: Some(in_topic),
                },
                "{report}"
            );
        }
    }

    /// An event its topic holds twice is shown twice by the consumers (once
    /// per record): expected where the broker stores retries again, a
    /// finding where it should not.
    #[test]
    fn an_event_stored_twice_is_expected_twice_only_where_counted() {
        let expected = run();
        let mut observed = perfect(&expected);
        let event = expected.good[9].event_id().to_string();
        let table = table_of(&expected.good[9]);
        let (raw, visible) = observed.events.get_mut(table).expect("table");
        *raw.get_mut(&event).expect("row") = 2;
        *visible.get_mut(&event).expect("row") = 2;
        let mut in_topics = in_topics_but(&expected, "");
        in_topics.insert(event.clone(), 2);
        observed.in_topics = Some(in_topics);
        let counted = counted();
        let report = check(&expected, &observed, &counted);
        assert!(report.passed(), "{report}");
        assert_eq!(report.stored_twice, 1);
        let kinds = |report: &Report| -> Vec<&'static str> {
            report.findings.iter().map(Finding::kind).collect()
        };
        let report = check(&expected, &observed, &checks());
        assert_eq!(kinds(&report), ["stored_twice", "duplicate"], "{report}");
        // Counted, a third row is still a duplicate.
        let (raw, visible) = observed.events.get_mut(table).expect("table");
        *raw.get_mut(&event).expect("row") = 3;
        *visible.get_mut(&event).expect("row") = 3;
        let report = check(&expected, &observed, &counted);
        assert_eq!(kinds(&report), ["duplicate"], "{report}");
    }

    /// An acknowledged event no topic holds is expected nowhere downstream
    /// where the broker is known to lose such batches, and lost elsewhere.
    #[test]
    fn an_event_absent_from_its_topic_is_expected_nowhere_only_where_counted() {
        let expected = run();
        let mut observed = perfect(&expected);
        let event = &expected.good[4];
        let id = event.event_id().to_string();
        let (raw, visible) = observed.events.get_mut(table_of(event)).expect("table");
        raw.remove(&id);
        visible.remove(&id);
        observed.in_topics = Some(in_topics_but(&expected, &id));
        let counted = counted();
        let report = check(&expected, &observed, &counted);
        assert!(report.passed(), "{report}");
        assert_eq!(report.absent_from_topics, 1);
        let report = check(&expected, &observed, &checks());
        assert_eq!(
            report.findings,
            [Finding::Lost {
                table: table_of(event).to_owned(),
                event_id: id.clone(),
                in_topic: Some(false),
            }],
            "{report}"
        );
        // Counted, a row of it downstream came from nowhere.
        let (raw, visible) = observed.events.get_mut(table_of(event)).expect("table");
        raw.insert(id.clone(), 1);
        visible.insert(id.clone(), 1);
        let report = check(&expected, &observed, &counted);
        let kinds: Vec<&str> = report.findings.iter().map(Finding::kind).collect();
        assert_eq!(kinds, ["unexpected"], "{report}");
    }

    #[test]
    fn a_raw_duplicate_counts_and_is_a_finding_only_when_asked() {
        let expected = run();
        let mut observed = perfect(&expected);
        let event = &expected.good[5];
        let (raw, _) = observed.events.get_mut(table_of(event)).expect("table");
        *raw.get_mut(&event.event_id().to_string()).expect("row") = 2;
        let report = check(&expected, &observed, &checks());
        assert!(report.passed(), "{report}");
        assert_eq!(report.raw_duplicates, 1);
        let exact = Checks {
            exact_raw: true,
            ..checks()
        };
        assert!(!check(&expected, &observed, &exact).passed());
    }

    /// A missing dead letter says whether its original's topic holds it;
    /// where the broker is known to lose acknowledged records, one whose
    /// original is in no topic is expected nowhere.
    #[test]
    fn a_missing_dead_letter_says_whether_its_topic_holds_the_original() {
        let poisoned = Uuid::new_v4();
        let expected = Expected {
            good: Vec::new(),
            poisoned: BTreeSet::from([poisoned]),
        };
        let checks = Checks {
            events: false,
            order_status: false,
            dead_letter_groups: vec!["g".into()],
            ..checks()
        };
        let mut observed = Observed {
            in_topics: Some(HashMap::from([(poisoned.to_string(), 1)])),
            ..Observed::default()
        };
        let missing = |in_topic| Finding::DeadLetterMissing {
            event_id: poisoned.to_string(),
            group: "g".into(),
            in_topic,
        };
        let report = check(&expected, &observed, &checks);
        assert_eq!(report.findings, [missing(Some(true))], "{report}");
        observed.in_topics = Some(HashMap::new());
        let report = check(&expected, &observed, &checks);
        assert_eq!(report.findings, [missing(Some(false))], "{report}");
        let counted = Checks {
            topic_copies: TopicCopies::Counted,
            ..checks
        };
        let report = check(&expected, &observed, &counted);
        assert!(report.passed(), "{report}");
        assert_eq!(report.absent_from_topics, 1);
    }

    /// A dead letter whose original is gone from its topic is a finding,
    /// unless the partition's log now starts past it (retention deleted it).
    #[test]
    fn a_dead_letter_whose_original_retention_deleted_is_counted_not_flagged() {
        let poisoned = Uuid::new_v4();
        let expected = Expected {
            good: Vec::new(),
            poisoned: BTreeSet::from([poisoned]),
        };
        let mut headers: BTreeMap<String, String> = DEAD_LETTER_HEADERS
            .iter()
            .map(|h| ((*h).to_owned(), "x".to_owned()))
            .collect();
        headers.insert(headers::CONSUMER_GROUP.into(), "g".into());
        headers.insert(headers::ORIGINAL_TOPIC.into(), "orders".into());
        headers.insert(headers::ORIGINAL_PARTITION.into(), "2".into());
        headers.insert(headers::ORIGINAL_OFFSET.into(), "5".into());
        headers.insert(
            headers::TRACEPARENT.into(),
            format!("00-{}-0000000000000001-01", poisoned.simple()),
        );
        let mut observed = Observed {
            dead_letters: vec![DeadLetter {
                topic: "orders.dlq".into(),
                partition: 0,
                offset: 0,
                key: None,
                payload: None,
                headers,
            }],
            ..Observed::default()
        };
        let checks = Checks {
            events: false,
            order_status: false,
            dead_letter_groups: vec!["g".into()],
            ..checks()
        };
        for (log_start, past_retention, kinds) in [
            (None, 0, vec!["dead_letter_changed"]),
            (Some(5), 0, vec!["dead_letter_changed"]),
            (Some(6), 1, vec![]),
        ] {
            observed.log_starts.clear();
            observed
                .log_starts
                .extend(log_start.map(|s| (("orders".to_owned(), 2), s)));
            let report = check(&expected, &observed, &checks);
            let found: Vec<&str> = report.findings.iter().map(Finding::kind).collect();
            assert_eq!(found, kinds, "log start {log_start:?}: {report}");
            assert_eq!(report.dead_letters, 1);
            assert_eq!(report.dead_letters_past_retention, past_retention);
        }
    }
}
