//! Partials as rows of `analytics_partials`, written together with the offset
//! they reach in the same insert, and the stored offsets read back on
//! assignment.

use serde::{Deserialize, Serialize};

use crate::aggregate::Partial;
use crate::ddl::{OFFSET_MODEL, PARTIALS_TABLE, WINDOW_MARKER};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, clickhouse::Row)]
pub struct PartialRow {
    pub model: String,
    pub window_start: u32,
    pub dim1: String,
    pub dim2: String,
    pub c1: i64,
    pub c2: i64,
    pub c3: i64,
    pub c4: i64,
    pub c5: i64,
    pub c6: i64,
    pub set1: Vec<String>,
    pub set2: Vec<String>,
    pub latencies: Vec<i32>,
    pub source_topic: String,
    pub source_partition: i32,
    pub last_offset: i64,
    pub flushed_at: u32,
}

/// Window starts are whole seconds after 1970 (the job refuses other events).
fn seconds(window_ms: i64) -> u32 {
    u32::try_from(window_ms / 1000).unwrap_or_default()
}

/// The row recording that a flush covers `topic`/`partition` up to and
/// including `last_offset`.
pub fn offset_row(topic: &str, partition: i32, last_offset: i64, now: u32) -> PartialRow {
    PartialRow {
        model: OFFSET_MODEL.to_owned(),
        source_topic: topic.to_owned(),
        source_partition: partition,
        last_offset,
        flushed_at: now,
        ..PartialRow::default()
    }
}

/// Appends to a flush's partial rows one marker row per window they touch
/// (`ddl::WINDOW_MARKER`, `c1` the window's partial rows), in the same
/// insert: how many there are of an hour tells whether its compaction
/// (`crate::hours`) still covers every partial of it, without counting
/// the partials themselves.
pub fn mark_windows(rows: &mut Vec<PartialRow>, now: u32) {
    let mut windows = std::collections::BTreeMap::<u32, i64>::new();
    for row in rows.iter() {
        *windows.entry(row.window_start).or_default() += 1;
    }
    rows.extend(
        windows
            .into_iter()
            .map(|(window_start, partials)| PartialRow {
                model: WINDOW_MARKER.to_owned(),
                window_start,
                c1: partials,
                flushed_at: now,
                ..PartialRow::default()
            }),
    );
}

/// A flush's figures (its partitions' partials merged) as rows, its
/// windows marked (see [`mark_windows`]); the offset rows go into the same
/// insert.
pub fn rows(partial: Partial, now: u32) -> Vec<PartialRow> {
    let base = PartialRow {
        flushed_at: now,
        ..PartialRow::default()
    };
    let row = |model: &str, window: i64| PartialRow {
        model: model.to_owned(),
        window_start: seconds(window),
        ..base.clone()
    };
    let mut out = Vec::new();
    for ((window, category, currency), f) in partial.orders {
        out.push(PartialRow {
            dim1: category,
            dim2: currency,
            c1: f.orders as i64,
            c2: f.items as i64,
            c3: f.revenue_minor,
            set1: f.buyers.into_iter().collect(),
            ..row("orders", window)
        });
    }
    for (window, [c1, c2, c3, c4, c5, c6]) in partial.funnel {
        let [c1, c2, c3, c4, c5, c6] = [c1, c2, c3, c4, c5, c6].map(|c| c as i64);
        out.push(PartialRow {
            c1,
            c2,
            c3,
            c4,
            c5,
            c6,
            ..row("funnel", window)
        });
    }
    for ((window, country, platform), f) in partial.users {
        out.push(PartialRow {
            dim1: country,
            dim2: platform,
            c1: f.sign_ups as i64,
            set1: f.users.into_iter().collect(),
            set2: f.sessions.into_iter().collect(),
            ..row("users", window)
        });
    }
    for ((window, room), f) in partial.chat {
        out.push(PartialRow {
            dim1: room,
            c1: f.messages as i64,
            c2: f.flagged as i64,
            set1: f.chatters.into_iter().collect(),
            ..row("chat", window)
        });
    }
    for (window, f) in partial.search {
        out.push(PartialRow {
            c1: f.searches as i64,
            c2: f.zero_results as i64,
            c3: f.latency_sum_ms,
            latencies: f.latencies_ms,
            ..row("search", window)
        });
    }
    for ((window, query), q) in partial.queries {
        out.push(PartialRow {
            dim1: query,
            c1: q.searches as i64,
            c2: q.zero_results as i64,
            ..row("queries", window)
        });
    }
    mark_windows(&mut out, now);
    out
}

/// One insert: all or nothing (see `ddl`).
pub async fn insert(
    client: &clickhouse::Client,
    rows: &[PartialRow],
    timeout: std::time::Duration,
) -> Result<(), clickhouse::error::Error> {
    insert_before(client, rows, timeout, None, &insert_id(), None).await
}

/// The first ClickHouse release that takes `insert_deduplication_token`.
const TOKENS_SINCE: (u32, u32) = (22, 2);

/// Whether a server answering `version` to `SELECT version()` takes
/// `insert_deduplication_token` (and the partials' deduplication window).
pub fn takes_deduplication_tokens(version: &str) -> bool {
    let mut parts = version.split('.').map(str::parse::<u32>);
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= TOKENS_SINCE,
        _ => false,
    }
}

/// Makes a server that can deduplicate partials inserts by token do so
/// (`ddl::deduplicating_retries`); its version, and whether it does. On a
/// cluster the partials are Replicated, which keep insert tokens already.
/// A server refusing the setting (a user without ALTER rights) is told so
/// in the log and gets no tokens: the job works as on 18.16.
pub async fn deduplicate_retries(
    client: &clickhouse::Client,
    target: &consumers::projection::ddl::Target,
    timeout: std::time::Duration,
) -> Result<(String, bool), clickhouse::error::Error> {
    let asked = async {
        let version = client
            .query("SELECT version()")
            .fetch_one::<String>()
            .await?;
        let tokens = takes_deduplication_tokens(&version);
        if !tokens || target.clustered() {
            return Ok((version, tokens));
        }
        match client
            .query(&crate::ddl::deduplicating_retries(target))
            .execute()
            .await
        {
            Ok(()) => Ok((version, true)),
            Err(clickhouse::error::Error::BadResponse(refused)) => {
                tracing::warn!(%refused, "ClickHouse refused the partials' deduplication window; partials inserts carry no token.");
                Ok((version, false))
            }
            Err(error) => Err(error),
        }
    };
    tokio::time::timeout(timeout, asked)
        .await
        .map_err(|_| clickhouse::error::Error::TimedOut)?
}

/// The deduplication token of a partials insert: the partitions it covers
/// and the last offset each reaches, in order. Two inserts with one token
/// hold records up to the same offsets, and once either has landed every
/// such record is counted (each insert covers its partitions from their
/// stored offsets on), so the server keeping only the first is exact, even
/// when the two come from different replicas.
pub fn deduplication_token(offsets: &[((String, i32), i64)]) -> String {
    let mut reached: Vec<_> = offsets.iter().collect();
    reached.sort();
    reached
        .iter()
        .map(|((topic, partition), last)| format!("{topic}/{partition}/{last}"))
        .collect::<Vec<_>>()
        .join(";")
}

/// How every partials insert's query id begins, so that the inserts still
/// running on the server can be found (`system.processes`).
const INSERT_ID_PREFIX: &str = "shopstream-partials-";

/// A fresh query id for one partials insert attempt.
pub fn insert_id() -> String {
    format!("{INSERT_ID_PREFIX}{}", uuid::Uuid::new_v4().simple())
}

/// The query ids of the partials inserts ClickHouse is running now.
async fn inserts_running(
    client: &clickhouse::Client,
    timeout: std::time::Duration,
) -> Result<Vec<String>, clickhouse::error::Error> {
    let query = client
        .query("SELECT query_id FROM system.processes WHERE query_id LIKE ?")
        .bind(format!("{INSERT_ID_PREFIX}%"))
        .fetch_all::<String>();
    tokio::time::timeout(timeout, query)
        .await
        .map_err(|_| clickhouse::error::Error::TimedOut)?
}

/// The stored offsets (see [`stored_offsets`]) once ClickHouse has
/// finished every partials insert it is running now (with `only`, that
/// one), or `TimedOut` when one still runs after `timeout`. An insert
/// whose answer did not come in time (a client timeout, a connection cut
/// after the rows were sent) still lands when the server finishes it; until
/// then the stored offsets do not say whether it landed, and an insert made
/// again, by this job or by a partition's next owner, would count its
/// events twice (seen under the reliability suite's broker faults).
pub async fn settled_offsets(
    client: &clickhouse::Client,
    only: Option<&str>,
    timeout: std::time::Duration,
) -> Result<std::collections::HashMap<(String, i32), i64>, clickhouse::error::Error> {
    let given_up = std::time::Instant::now() + timeout;
    let mut waiting = inserts_running(client, timeout).await?;
    waiting.retain(|id| only.is_none_or(|only| id == only));
    while !waiting.is_empty() {
        if std::time::Instant::now() > given_up {
            return Err(clickhouse::error::Error::TimedOut);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let running = inserts_running(client, timeout).await?;
        waiting.retain(|id| running.contains(id));
    }
    stored_offsets(client, timeout).await
}

/// Like [`insert`], but aborted unfinished (so ClickHouse stores nothing)
/// when `deadline` has passed by the time every row is sent: the analytics
/// job's right to write ends then (`job::Lease`). Reported as `TimedOut`.
/// `query_id` (from [`insert_id`]) names the attempt on the server; `token`
/// ([`deduplication_token`], only for a server that takes it) makes it
/// land once however often it is made.
pub async fn insert_before(
    client: &clickhouse::Client,
    rows: &[PartialRow],
    timeout: std::time::Duration,
    deadline: Option<std::time::Instant>,
    query_id: &str,
    token: Option<&str>,
) -> Result<(), clickhouse::error::Error> {
    let mut insert = client
        .insert::<PartialRow>(PARTIALS_TABLE)
        .await?
        .with_setting("query_id", query_id)
        .with_timeouts(Some(timeout), Some(timeout));
    if let Some(token) = token {
        // Explicit: a user profile may have turned deduplication off.
        insert = insert
            .with_setting("insert_deduplicate", "1")
            .with_setting("insert_deduplication_token", token);
    }
    for row in rows {
        insert.write(row).await?;
    }
    if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
        return Err(clickhouse::error::Error::TimedOut);
    }
    insert.end().await
}

/// The last offset stored per (topic, partition), or `TimedOut` after
/// `timeout`: a server just restarted can take a connection and not answer,
/// and the job must not wait on it for good.
pub async fn stored_offsets(
    client: &clickhouse::Client,
    timeout: std::time::Duration,
) -> Result<std::collections::HashMap<(String, i32), i64>, clickhouse::error::Error> {
    let query = client
        .query(&format!(
            "SELECT source_topic, source_partition, max(last_offset) FROM `{PARTIALS_TABLE}` WHERE model = ? GROUP BY source_topic, source_partition"
        ))
        .bind(OFFSET_MODEL)
        .fetch_all::<(String, i32, i64)>();
    let found = tokio::time::timeout(timeout, query)
        .await
        .map_err(|_| clickhouse::error::Error::TimedOut)??;
    Ok(found.into_iter().map(|(t, p, o)| ((t, p), o)).collect())
}

#[cfg(test)]
mod tests {
    use super::{deduplication_token, takes_deduplication_tokens};

    #[test]
    fn deduplication_tokens_are_taken_from_22_2_on() {
        for (version, takes) in [
            ("18.16.1", false),
            ("21.12.4.1", false),
            ("22.1.3.7", false),
            ("22.2.2.1", true),
            ("24.8.14.39", true),
            ("26.9.2.1", true),
            ("", false),
            ("unknown", false),
        ] {
            assert_eq!(takes_deduplication_tokens(version), takes, "{version}");
        }
    }

    #[test]
    fn a_token_names_the_partitions_and_offsets_in_any_order() {
        let key = |topic: &str, partition| (topic.to_owned(), partition);
        let token = deduplication_token(&[(key("orders", 2), 90), (key("chat", 11), 7)]);
        assert_eq!(token, "chat/11/7;orders/2/90");
        assert_eq!(
            deduplication_token(&[(key("chat", 11), 7), (key("orders", 2), 90)]),
            token
        );
        assert_ne!(
            deduplication_token(&[(key("chat", 11), 8), (key("orders", 2), 90)]),
            token
        );
    }
}
