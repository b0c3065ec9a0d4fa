//! The `/api/v1` handlers and their answer types.

use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use backbone::json_object::Object;
use schemars::JsonSchema;
use serde::Serialize;

use crate::error::ApiError;
use crate::http::{json, written};
use crate::params::{
    self, Granularity, NoParams, RangeParams, RevenueParams, SeriesParams, TopParams, UsersParams,
};
use pipelines::report::{Funnel as FunnelCounts, Room, TopQuery};

use crate::store::{RevenuePoint, SearchPoint, UsersPoint};
use crate::App;

#[derive(Debug, Serialize, JsonSchema)]
pub struct Revenue {
    /// The range served, epoch seconds, `[from, to)`.
    pub from: u32,
    pub to: u32,
    pub granularity: Granularity,
    /// By window, then category, then currency.
    pub points: Vec<RevenuePoint>,
}

impl Revenue {
    /// Appends the bytes `serde_json` writes for it (tested), member by
    /// member: revenue per minute by category is 6,000 points an hour, and
    /// serde_json's escaping of every member's name took 15% of the
    /// service's CPU.
    fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        let mut answer = Object::open(out);
        answer.number("from", self.from);
        answer.number("to", self.to);
        answer.field("granularity");
        serde_json::to_writer(&mut *answer.out, &self.granularity)?;
        answer.objects("points", &self.points, |point, p| {
            point.number("window_start", p.window_start);
            point.optional_string("category", p.category.as_deref());
            point.string("currency", &p.currency);
            point.number("orders", p.orders);
            point.number("items", p.items);
            point.number("revenue_minor", p.revenue_minor);
            point.number("unique_buyers", p.unique_buyers);
        });
        answer.close();
        Ok(())
    }
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Funnel {
    pub from: u32,
    pub to: u32,
    /// Order events per lifecycle stage in the range.
    pub counts: FunnelCounts,
    pub conversion: Conversion,
}

/// Stage-to-stage rates from 0 to 1; null when the earlier stage is 0.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Conversion {
    pub paid_of_created: Option<f64>,
    pub shipped_of_paid: Option<f64>,
    pub delivered_of_shipped: Option<f64>,
    pub delivered_of_created: Option<f64>,
    pub cancelled_of_created: Option<f64>,
    pub refunded_of_delivered: Option<f64>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ActiveUsers {
    pub from: u32,
    pub to: u32,
    pub granularity: Granularity,
    pub points: Vec<UsersPoint>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct BusiestRooms {
    pub from: u32,
    pub to: u32,
    /// Most messages first.
    pub rooms: Vec<Room>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct TopSearches {
    pub from: u32,
    pub to: u32,
    /// Most searched first.
    pub queries: Vec<TopQuery>,
}

/// A query that found nothing, and how often.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, clickhouse::Row, JsonSchema)]
pub struct ZeroResultQuery {
    pub query: String,
    /// Searches for it that found nothing.
    pub zero_results: i64,
    /// Searches for it in all.
    pub searches: i64,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct TopZeroResultSearches {
    pub from: u32,
    pub to: u32,
    /// Most zero-result searches first; only queries that found nothing at
    /// least once. Counted since the analytics schema's migration 3.
    pub queries: Vec<ZeroResultQuery>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Searches {
    pub from: u32,
    pub to: u32,
    pub granularity: Granularity,
    /// Over the whole range.
    pub searches: i64,
    pub zero_results: i64,
    /// zero_results / searches; null without searches.
    pub zero_result_rate: Option<f64>,
    pub points: Vec<SearchPoint>,
}

fn rate(part: i64, whole: i64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

pub async fn revenue(
    State(app): State<App>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let p: RevenueParams = params::parse(query.as_deref())?;
    let range = p.granularity.range(p.from.as_deref(), p.to.as_deref())?;
    let category = params::filter("category", p.category)?;
    let currency = params::filter("currency", p.currency)?;
    let points = app
        .store
        .revenue(
            range,
            p.granularity,
            p.group_by,
            category.as_deref(),
            currency.as_deref(),
        )
        .await?;
    let answer = Revenue {
        from: range.from,
        to: range.to,
        granularity: p.granularity,
        points,
    };
    Ok(written(&app, |out| answer.write_json(out)))
}

pub async fn funnel(
    State(app): State<App>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let p: RangeParams = params::parse(query.as_deref())?;
    let range = p.range()?;
    let counts = app.store.funnel(range).await?;
    let conversion = Conversion {
        paid_of_created: rate(counts.paid, counts.created),
        shipped_of_paid: rate(counts.shipped, counts.paid),
        delivered_of_shipped: rate(counts.delivered, counts.shipped),
        delivered_of_created: rate(counts.delivered, counts.created),
        cancelled_of_created: rate(counts.cancelled, counts.created),
        refunded_of_delivered: rate(counts.refunded, counts.delivered),
    };
    Ok(json(
        &app,
        &Funnel {
            from: range.from,
            to: range.to,
            counts,
            conversion,
        },
    ))
}

pub async fn order(
    State(app): State<App>,
    Path(order_id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let NoParams {} = params::parse(query.as_deref())?;
    if order_id.is_empty() || order_id.len() > params::MAX_ORDER_ID_LEN {
        return Err(ApiError::bad_request(
            Some("order_id"),
            format!(
                "order_id: 1 to {} bytes, got {}",
                params::MAX_ORDER_ID_LEN,
                order_id.len()
            ),
        ));
    }
    match app.store.order(&order_id).await? {
        Some(status) => Ok(json(&app, &status)),
        None => Err(ApiError::not_found(format!("no order {order_id:?}"))),
    }
}

pub async fn active_users(
    State(app): State<App>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let p: UsersParams = params::parse(query.as_deref())?;
    let range = p.granularity.range(p.from.as_deref(), p.to.as_deref())?;
    let country = params::filter("country", p.country)?;
    let platform = params::filter("platform", p.platform)?;
    let points = app
        .store
        .active_users(
            range,
            p.granularity,
            country.as_deref(),
            platform.as_deref(),
        )
        .await?;
    Ok(json(
        &app,
        &ActiveUsers {
            from: range.from,
            to: range.to,
            granularity: p.granularity,
            points,
        },
    ))
}

pub async fn busiest_rooms(
    State(app): State<App>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let (range, limit) = params::parse::<TopParams>(query.as_deref())?.resolve()?;
    let rooms = app.store.busiest_rooms(range, limit).await?;
    Ok(json(
        &app,
        &BusiestRooms {
            from: range.from,
            to: range.to,
            rooms,
        },
    ))
}

pub async fn top_searches(
    State(app): State<App>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let (range, limit) = params::parse::<TopParams>(query.as_deref())?.resolve()?;
    let queries = app.store.top_queries(range, limit).await?;
    Ok(json(
        &app,
        &TopSearches {
            from: range.from,
            to: range.to,
            queries,
        },
    ))
}

pub async fn top_zero_result_searches(
    State(app): State<App>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let (range, limit) = params::parse::<TopParams>(query.as_deref())?.resolve()?;
    let queries = app.store.top_zero_result_queries(range, limit).await?;
    Ok(json(
        &app,
        &TopZeroResultSearches {
            from: range.from,
            to: range.to,
            queries,
        },
    ))
}

pub async fn searches(
    State(app): State<App>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let p: SeriesParams = params::parse(query.as_deref())?;
    let range = p.range()?;
    let points = app.store.searches(range, p.granularity).await?;
    let searches = points.iter().map(|p| p.searches).sum();
    let zero_results = points.iter().map(|p| p.zero_results).sum();
    Ok(json(
        &app,
        &Searches {
            from: range.from,
            to: range.to,
            granularity: p.granularity,
            searches,
            zero_results,
            zero_result_rate: rate(zero_results, searches),
            points,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revenue_is_written_as_serde_json_writes_it() {
        // Every character serde_json escapes is escaped alike (the
        // events' test, `backbone::json_datum`): these show that the
        // strings are escaped at all.
        let text: std::sync::Arc<str> = "q\"uo\\te\n\u{1}é".into();
        let point =
            |category: Option<std::sync::Arc<str>>, currency: std::sync::Arc<str>| RevenuePoint {
                window_start: u32::MAX,
                category,
                currency,
                orders: i64::MIN,
                items: -1,
                revenue_minor: i64::MAX,
                unique_buyers: u64::MAX,
            };
        for granularity in [Granularity::Minute, Granularity::Hour] {
            for points in [
                Vec::new(),
                vec![
                    point(Some(text.clone()), "EUR".into()),
                    point(None, text.clone()),
                    point(Some("".into()), "".into()),
                ],
            ] {
                let answer = Revenue {
                    from: 0,
                    to: 60,
                    granularity,
                    points,
                };
                let mut out = b"kept".to_vec();
                answer.write_json(&mut out).unwrap();
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    format!("kept{}", serde_json::to_string(&answer).unwrap())
                );
            }
        }
    }
}
