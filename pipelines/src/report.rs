//! `shopstream-analytics report`: the read models as a person wants to read
//! them after a run, as text tables or JSON.

use std::fmt::Write as _;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ddl::PARTIALS_TABLE;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clickhouse::Row)]
pub struct CategoryRevenue {
    pub category: String,
    pub currency: String,
    pub orders: i64,
    pub items: i64,
    pub revenue_minor: i64,
    pub unique_buyers: u64,
}

/// Order events per lifecycle stage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clickhouse::Row, JsonSchema)]
pub struct Funnel {
    pub created: i64,
    pub paid: i64,
    pub shipped: i64,
    pub delivered: i64,
    pub cancelled: i64,
    pub refunded: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clickhouse::Row, JsonSchema)]
pub struct Room {
    pub room_id: String,
    pub messages: i64,
    /// Distinct users who wrote in the room over the range.
    pub unique_chatters: u64,
    /// Messages flagged by moderation.
    pub flagged: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clickhouse::Row, JsonSchema)]
pub struct TopQuery {
    pub query: String,
    pub searches: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clickhouse::Row)]
pub struct Searches {
    pub searches: i64,
    pub zero_results: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clickhouse::Row)]
pub struct Users {
    pub unique_users: u64,
    pub sign_ups: i64,
    pub sessions: u64,
}

/// Everything `report` prints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub since: u32,
    pub until: u32,
    pub revenue: Vec<CategoryRevenue>,
    pub funnel: Funnel,
    pub rooms: Vec<Room>,
    pub top_queries: Vec<TopQuery>,
    pub searches: Searches,
    pub users: Users,
}

/// Reads the report for windows starting in `[since, until)` (epoch seconds).
pub async fn read(
    client: &clickhouse::Client,
    since: u32,
    until: u32,
) -> Result<Report, clickhouse::error::Error> {
    let range = "window_start >= toDateTime(?) AND window_start < toDateTime(?)";
    let revenue = client
        .query(&format!("SELECT category, currency, sum(orders), sum(items), sum(revenue_minor), toUInt64(0) FROM orders_per_minute WHERE {range} GROUP BY category, currency ORDER BY sum(revenue_minor) DESC"))
        .bind(since)
        .bind(until)
        .fetch_all::<CategoryRevenue>()
        .await?;
    // Distinct buyers over the whole range come from the partials' sets.
    let buyers: Vec<(String, String, u64)> = client
        .query(&format!("SELECT dim1, dim2, uniqExactArray(set1) FROM `{PARTIALS_TABLE}` WHERE model = 'orders' AND {range} GROUP BY dim1, dim2"))
        .bind(since)
        .bind(until)
        .fetch_all()
        .await?;
    let revenue = revenue
        .into_iter()
        .map(|mut r| {
            r.unique_buyers = buyers
                .iter()
                .find(|b| b.0 == r.category && b.1 == r.currency)
                .map_or(0, |b| b.2);
            r
        })
        .collect();
    let funnel = client
        .query(&format!("SELECT sum(created), sum(paid), sum(shipped), sum(delivered), sum(cancelled), sum(refunded) FROM order_funnel_per_minute WHERE {range}"))
        .bind(since)
        .bind(until)
        .fetch_optional::<Funnel>()
        .await?
        .unwrap_or_default();
    let rooms = client
        .query(&format!("SELECT dim1, sum(c1), uniqExactArray(set1), sum(c2) FROM `{PARTIALS_TABLE}` WHERE model = 'chat' AND {range} GROUP BY dim1 ORDER BY sum(c1) DESC, dim1 LIMIT 10"))
        .bind(since)
        .bind(until)
        .fetch_all::<Room>()
        .await?;
    let top_queries = client
        .query(&format!("SELECT query, sum(searches) AS n FROM search_queries_per_minute WHERE {range} GROUP BY query ORDER BY n DESC, query LIMIT 10"))
        .bind(since)
        .bind(until)
        .fetch_all::<TopQuery>()
        .await?;
    let searches = client
        .query(&format!(
            "SELECT sum(searches), sum(zero_results) FROM searches_per_minute WHERE {range}"
        ))
        .bind(since)
        .bind(until)
        .fetch_optional::<Searches>()
        .await?
        .unwrap_or_default();
    let users = client
        .query(&format!("SELECT uniqExactArray(set1), sum(c1), uniqExactArray(set2) FROM `{PARTIALS_TABLE}` WHERE model = 'users' AND {range}"))
        .bind(since)
        .bind(until)
        .fetch_optional::<Users>()
        .await?
        .unwrap_or_default();
    Ok(Report {
        since,
        until,
        revenue,
        funnel,
        rooms,
        top_queries,
        searches,
        users,
    })
}

/// Minor units as the currency writes them: ISO 4217 gives most currencies
/// two decimals, some none (JPY, KRW) and some three (KWD, BHD).
fn major_units(minor: i64, currency: &str) -> String {
    let decimals = match currency {
        "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX"
        | "VND" | "VUV" | "XAF" | "XOF" | "XPF" => 0,
        "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
        _ => 2,
    };
    let scale = 10i64.pow(decimals);
    if decimals == 0 {
        return minor.to_string();
    }
    let sign = if minor < 0 { "-" } else { "" };
    let (whole, fraction) = (
        minor.unsigned_abs() / scale as u64,
        minor.unsigned_abs() % scale as u64,
    );
    format!(
        "{sign}{whole}.{fraction:0width$}",
        width = decimals as usize
    )
}

fn rate(part: i64, whole: i64) -> String {
    if whole == 0 {
        "-".into()
    } else {
        format!("{:.1}%", 100.0 * part as f64 / whole as f64)
    }
}

/// The report as text tables.
pub fn text(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Revenue and orders by category");
    let _ = writeln!(
        out,
        "  {:<16} {:<8} {:>8} {:>8} {:>14} {:>8}",
        "CATEGORY", "CURRENCY", "ORDERS", "ITEMS", "REVENUE", "BUYERS"
    );
    for r in &report.revenue {
        let _ = writeln!(
            out,
            "  {:<16} {:<8} {:>8} {:>8} {:>14} {:>8}",
            r.category,
            r.currency,
            r.orders,
            r.items,
            major_units(r.revenue_minor, &r.currency),
            r.unique_buyers
        );
    }
    let f = &report.funnel;
    let _ = writeln!(out, "\nOrder funnel");
    let _ = writeln!(out, "  created {:>8}", f.created);
    let _ = writeln!(
        out,
        "  paid    {:>8}  {} of created",
        f.paid,
        rate(f.paid, f.created)
    );
    let _ = writeln!(
        out,
        "  shipped {:>8}  {} of paid",
        f.shipped,
        rate(f.shipped, f.paid)
    );
    let _ = writeln!(
        out,
        "  delivered {:>6}  {} of shipped",
        f.delivered,
        rate(f.delivered, f.shipped)
    );
    let _ = writeln!(
        out,
        "  cancelled {:>6}  refunded {}",
        f.cancelled, f.refunded
    );
    let _ = writeln!(out, "\nBusiest chat rooms");
    for r in &report.rooms {
        let _ = writeln!(
            out,
            "  {:<16} {:>8} messages {:>6} chatters {:>5} flagged",
            r.room_id, r.messages, r.unique_chatters, r.flagged
        );
    }
    let _ = writeln!(
        out,
        "\nSearches: {} ({} zero results, {})",
        report.searches.searches,
        report.searches.zero_results,
        rate(report.searches.zero_results, report.searches.searches)
    );
    for q in &report.top_queries {
        let _ = writeln!(out, "  {:<24} {:>8}", q.query, q.searches);
    }
    let u = &report.users;
    let _ = writeln!(
        out,
        "\nActive users: {} unique, {} sessions, {} sign-ups",
        u.unique_users, u.sessions, u.sign_ups
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_shows_money_in_major_units_and_conversion_rates() {
        let report = Report {
            revenue: vec![CategoryRevenue {
                category: "shoes".into(),
                currency: "EUR".into(),
                orders: 4,
                items: 6,
                revenue_minor: 123_456,
                unique_buyers: 3,
            }],
            funnel: Funnel {
                created: 200,
                paid: 150,
                shipped: 0,
                ..Funnel::default()
            },
            searches: Searches {
                searches: 8,
                zero_results: 2,
            },
            ..Report::default()
        };
        let text = text(&report);
        assert!(
            text.contains("shoes            EUR             4        6        1234.56        3"),
            "{text}"
        );
        assert!(
            text.contains("paid         150  75.0% of created"),
            "{text}"
        );
        assert!(text.contains("delivered      0  - of shipped"), "{text}");
        assert!(
            text.contains("Searches: 8 (2 zero results, 25.0%)"),
            "{text}"
        );
    }
}
