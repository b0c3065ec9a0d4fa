//! The query API against a real ClickHouse: answers checked against the
//! seeded partials added up here, the OpenAPI document against the handlers,
//! bad and hostile input, caching, ClickHouse down or hung.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{get, seeded, serve, Service, SMALL, START};
use pipelines::store::PartialRow;
use serde_json::Value;

/// Orders, items, revenue and buyers of one window, category and currency.
type Figures = (i64, i64, i64, BTreeSet<String>);

fn seeded_rows() -> Vec<PartialRow> {
    (0..SMALL.minutes)
        .flat_map(|m| (0..SMALL.partitions).flat_map(move |p| SMALL.window(m, p)))
        .collect()
}

fn in_range(row: &PartialRow, model: &str, from: u32, to: u32) -> bool {
    row.model == model && row.window_start >= from && row.window_start < to
}

#[tokio::test]
async fn answers_add_up_the_seeded_partials() {
    let service = seeded(SMALL).await;
    let rows = seeded_rows();
    // Ragged at both ends: the whole hour between comes from the hourly
    // rollup, the edges from the partials.
    let (from, to) = (START + 600, START + 9_000);

    // Revenue per hour and per minute, by category or every category
    // together per currency: sums and distinct buyers (a whole hour's
    // minutes from its compaction too). Also over a range holding no whole
    // hour, so no compacted one (found by schemathesis: such a read took
    // the compactions' numbers from rows that had none).
    for ((from, to), (granularity, seconds), by_category) in [
        (from, to),
        (START + 600, START + 4_200),
        (START, START + 10_800),
    ]
    .into_iter()
    .flat_map(|range| [("hour", 3_600), ("minute", 60)].map(|g| (range, g)))
    .flat_map(|(range, g)| [true, false].map(|by| (range, g, by)))
    {
        assert_revenue(
            &service,
            &rows,
            (from, to),
            (granularity, seconds),
            by_category,
        )
        .await;
    }
    // One category, per minute, all categories added up per currency.
    let one = service
        .json(&format!(
            "/api/v1/revenue?from={from}&to={to}&category=category-03&currency=EUR"
        ))
        .await;
    let want: i64 = rows
        .iter()
        .filter(|r| in_range(r, "orders", from, to) && r.dim1 == "category-03" && r.dim2 == "EUR")
        .map(|r| r.c3)
        .sum();
    let got: i64 = one["points"]
        .as_array()
        .expect("points")
        .iter()
        .map(|p| p["revenue_minor"].as_i64().expect("revenue"))
        .sum();
    assert_eq!(got, want);
    assert_eq!(one["points"].as_array().expect("points").len(), 140);
    let total = service
        .json(&format!(
            "/api/v1/revenue?from={from}&to={to}&group_by=none"
        ))
        .await;
    let first = &total["points"][0];
    assert_eq!(first["category"], Value::Null);
    let want: i64 = rows
        .iter()
        .filter(|r| {
            in_range(r, "orders", from, from + 60)
                && r.dim2 == first["currency"].as_str().unwrap_or("")
        })
        .map(|r| r.c3)
        .sum();
    assert_eq!(first["revenue_minor"], want);

    // Every model over the ragged range (its whole hour from the
    // compaction, the edges from the partials) and over whole hours only
    // (the compactions alone, read straight from their table).
    for (from, to) in [(from, to), (START, START + 10_800)] {
        // The funnel and its rates.
        let mut funnel = [0i64; 6];
        for row in rows.iter().filter(|r| in_range(r, "funnel", from, to)) {
            for (slot, value) in funnel
                .iter_mut()
                .zip([row.c1, row.c2, row.c3, row.c4, row.c5, row.c6])
            {
                *slot += value;
            }
        }
        let answer = service
            .json(&format!("/api/v1/funnel?from={from}&to={to}"))
            .await;
        for (stage, count) in query::seed::STATUSES.iter().zip(funnel) {
            assert_eq!(answer["counts"][stage], count, "{stage}");
        }
        let rate = answer["conversion"]["paid_of_created"]
            .as_f64()
            .expect("rate");
        assert!((rate - funnel[1] as f64 / funnel[0] as f64).abs() < 1e-12);

        // Active users: distinct over countries, platforms and partitions;
        // on one platform (its minutes compacted over every country), in
        // one country (over every platform: from the partials).
        for filter in [
            None,
            Some(("platform", query::seed::PLATFORMS[1])),
            Some(("country", query::seed::COUNTRIES[2])),
        ] {
            assert_users_per_minute(&service, &rows, from, to, filter).await;
        }
        // And per hour: over whole hours each point is one compacted row.
        let mut hours: BTreeMap<u32, (BTreeSet<&str>, i64, BTreeSet<&str>)> = BTreeMap::new();
        for row in rows.iter().filter(|r| in_range(r, "users", from, to)) {
            let hour = hours
                .entry(row.window_start - row.window_start % 3_600)
                .or_default();
            hour.0.extend(row.set1.iter().map(String::as_str));
            hour.1 += row.c1;
            hour.2.extend(row.set2.iter().map(String::as_str));
        }
        let answer = service
            .json(&format!(
                "/api/v1/active-users?from={from}&to={to}&granularity=hour"
            ))
            .await;
        let got: Vec<Value> = answer["points"].as_array().expect("points").clone();
        let want: Vec<Value> = hours
            .iter()
            .map(|(t, (users, sign_ups, sessions))| {
                serde_json::json!({
                    "window_start": t,
                    "unique_users": users.len(),
                    "sign_ups": sign_ups,
                    "sessions": sessions.len(),
                })
            })
            .collect();
        assert_eq!(got, want);

        // Busiest rooms: messages summed, ties by room id, limited.
        assert_busiest_rooms(&service, &rows, from, to).await;

        // Top searches and zero-result searches.
        let mut queries: BTreeMap<&str, i64> = BTreeMap::new();
        for row in rows.iter().filter(|r| in_range(r, "queries", from, to)) {
            *queries.entry(&row.dim1).or_default() += row.c1;
        }
        let mut ranked: Vec<(&str, i64)> = queries.into_iter().collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let answer = service
            .json(&format!("/api/v1/searches/top?from={from}&to={to}"))
            .await;
        assert_eq!(answer["queries"].as_array().expect("queries").len(), 10);
        assert_eq!(answer["queries"][0]["query"], ranked[0].0);
        assert_eq!(answer["queries"][0]["searches"], ranked[0].1);
        // Zero-result searches per query, recomputed from the seeded rows.
        let mut zero: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
        for row in rows.iter().filter(|r| in_range(r, "queries", from, to)) {
            let slot = zero.entry(&row.dim1).or_default();
            slot.0 += row.c2;
            slot.1 += row.c1;
        }
        let mut ranked: Vec<(String, i64, i64)> = zero
            .into_iter()
            .filter(|(_, (z, _))| *z > 0)
            .map(|(q, (z, n))| (q.to_owned(), z, n))
            .collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        ranked.truncate(5);
        let answer = service
            .json(&format!(
                "/api/v1/searches/zero-results/top?from={from}&to={to}&limit=5"
            ))
            .await;
        let got = common::zero_result_queries(&answer);
        assert_eq!(got.len(), 5);
        assert_eq!(got, ranked);
        let (searches, zero): (i64, i64) = rows
            .iter()
            .filter(|r| in_range(r, "search", from, to))
            .fold((0, 0), |(s, z), r| (s + r.c1, z + r.c2));
        let answer = service
            .json(&format!(
                "/api/v1/searches?from={from}&to={to}&granularity=hour"
            ))
            .await;
        assert_eq!(answer["searches"], searches);
        assert_eq!(answer["zero_results"], zero);
    }

    // One order's status.
    let order = SMALL.order(7);
    let answer = service
        .json(&format!("/api/v1/orders/{}", order.order_id))
        .await;
    assert_eq!(answer["status"], order.status.as_str());
    assert_eq!(answer["total_minor"], order.total_minor);
    assert_eq!(answer["updated_at_ms"], order.updated_at_ms);
}

/// Asks for the five busiest rooms over `[from, to)` and checks them
/// against `rows` added up here: messages summed, ties by room id, each
/// room's distinct chatters.
async fn assert_busiest_rooms(service: &Service, rows: &[PartialRow], from: u32, to: u32) {
    let mut rooms: BTreeMap<&str, (i64, BTreeSet<&str>)> = BTreeMap::new();
    for row in rows.iter().filter(|r| in_range(r, "chat", from, to)) {
        let room = rooms.entry(&row.dim1).or_default();
        room.0 += row.c1;
        room.1.extend(row.set1.iter().map(String::as_str));
    }
    let mut ranked: Vec<(String, i64, i64)> = rooms
        .into_iter()
        .map(|(id, (messages, chatters))| (id.to_owned(), messages, chatters.len() as i64))
        .collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked.truncate(5);
    let answer = service
        .json(&format!(
            "/api/v1/chat-rooms/busiest?from={from}&to={to}&limit=5"
        ))
        .await;
    let got = common::rooms(&answer);
    assert_eq!(got, ranked, "{answer}");
}

/// The busiest rooms over 24 closed hours take each room's chatters as
/// counted for that day of compacted hours, not from the hours' keys;
/// after a late flush into one of the hours they are read from the hours
/// (exact at once) until the day is counted again.
#[tokio::test]
async fn the_busiest_rooms_over_a_day_of_compacted_hours_take_its_count() {
    let service = common::seeded_with(SMALL, |q| q.cache_max_age_s = 0).await;
    let mut rows = seeded_rows();
    // The day ending with the seed's last hour.
    let to = START + SMALL.minutes * 60;
    let from = to - pipelines::hours::DAY;
    let from_hours = || logged(&service, "%uniqExactArray(key1) AS unique_chatters%");
    let from_days = || logged(&service, "%FROM `%`.`analytics_days`%");
    assert_busiest_rooms(&service, &rows, from, to).await;
    assert_eq!((from_hours().await, from_days().await), (0, 1));
    // An hour short or late by one: from the hours.
    assert_busiest_rooms(&service, &rows, from + 3_600, to).await;
    assert_busiest_rooms(&service, &rows, from - 60, to - 60).await;
    assert_eq!((from_hours().await, from_days().await), (2, 1));

    let room = rows
        .iter()
        .find(|r| r.model == "chat" && r.window_start == START + 3_660)
        .expect("a chat row")
        .clone();
    let mut late = vec![PartialRow {
        c1: 1_000,
        set1: vec!["a-late-chatter".to_owned()],
        flushed_at: START + 20_000,
        ..room
    }];
    pipelines::store::mark_windows(&mut late, START + 20_000);
    pipelines::store::insert(&service.database.client, &late, Duration::from_secs(30))
        .await
        .expect("late flush");
    rows.extend(late.into_iter().filter(|r| r.model == "chat"));
    assert_busiest_rooms(&service, &rows, from, to).await;
    assert_eq!(
        (from_hours().await, from_days().await),
        (3, 2),
        "the day's count asked, not taken"
    );

    // Compacted again, as the job does: the hour, then its day.
    let now = pipelines::hours::epoch_seconds();
    pipelines::hours::compact(
        &service.database.client,
        START,
        pipelines::hours::Idle {
            hours: now,
            minutes: now,
        },
        now,
        Duration::from_secs(30),
        &mut pipelines::hours::Unmarked::new(),
    )
    .await
    .expect("compacted again");
    assert_busiest_rooms(&service, &rows, from, to).await;
    assert_eq!((from_hours().await, from_days().await), (3, 3));
}

/// An example value for each documented parameter.
fn example(name: &str) -> String {
    match name {
        "from" => START.to_string(),
        "to" => (START + 3_600).to_string(),
        "granularity" => "hour".into(),
        "group_by" => "none".into(),
        "category" => "category-01".into(),
        "currency" => "EUR".into(),
        "country" => "DE".into(),
        "platform" => "web".into(),
        "limit" => "5".into(),
        other => panic!("no example for the documented parameter {other:?}: add one here"),
    }
}

#[tokio::test]
async fn the_openapi_document_and_the_handlers_agree() {
    let service = seeded(SMALL).await;
    let document = service.json("/api/v1/openapi.json").await;
    assert_eq!(document["openapi"], "3.1.0");
    let paths = document["paths"].as_object().expect("paths");
    assert_eq!(paths.len(), query::openapi::ENDPOINTS.len());
    for (path, item) in paths {
        let operation = &item["get"];
        let parameters = operation["parameters"].as_array().expect("parameters");
        let mut url = path.replace("{order_id}", "order-000001");
        let query: Vec<String> = parameters
            .iter()
            .filter(|p| p["in"] == "query")
            .map(|p| {
                let name = p["name"].as_str().expect("name");
                format!("{name}={}", example(name))
            })
            .collect();
        url.push('?');
        url.push_str(&query.join("&"));
        // Every documented parameter is accepted, together.
        let (status, headers, body) = service.get(&url).await;
        assert_eq!(status, 200, "GET {url}: {body}");
        assert_eq!(headers["content-type"], "application/json");
        // The answer has exactly the documented properties.
        let answer: Value = serde_json::from_str(&body).expect("JSON");
        let schema = &operation["responses"]["200"]["content"]["application/json"]["schema"];
        let documented: BTreeSet<&str> = schema["properties"]
            .as_object()
            .expect("properties")
            .keys()
            .map(String::as_str)
            .collect();
        let answered: BTreeSet<&str> = answer
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(answered, documented, "{path}");
        // An undocumented parameter is refused, by name.
        let (status, _, body) = service.get(&format!("{url}&bogus=1")).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains("unknown field `bogus`"), "{body}");
        // Every documented error status has the error schema.
        for code in ["400", "503"] {
            assert!(
                operation["responses"][code]["content"]["application/json"]["schema"]["properties"]
                    ["error"]
                    .is_object(),
                "{path} {code}"
            );
        }
    }
}

#[tokio::test]
async fn bad_input_gets_a_4xx_that_says_what_was_wrong() {
    let service = seeded(SMALL).await;
    let cases: &[(&str, u16, &str, Option<&str>)] = &[
        (
            "/api/v1/funnel?form=1",
            400,
            "unknown field `form`, expected `from` or `to`",
            None,
        ),
        (
            "/api/v1/funnel?from=1&from=2",
            400,
            "duplicate field `from`",
            None,
        ),
        (
            "/api/v1/funnel?from=200&to=100",
            400,
            "must be before to (100): the range is empty or reversed",
            Some("from"),
        ),
        (
            "/api/v1/funnel?from=yesterday",
            400,
            "\"yesterday\" is not a time",
            Some("from"),
        ),
        (
            "/api/v1/funnel?to=2026-13-01T00:00:00Z",
            400,
            "is not a time",
            Some("to"),
        ),
        (
            "/api/v1/searches/top?limit=101",
            400,
            "limit: at most 100, got 101",
            Some("limit"),
        ),
        (
            "/api/v1/searches/top?limit=0",
            400,
            "limit: must be at least 1",
            Some("limit"),
        ),
        ("/api/v1/searches/top?limit=-1", 400, "limit", Some("limit")),
        (
            "/api/v1/searches?granularity=day",
            400,
            "unknown variant `day`, expected `minute` or `hour`",
            Some("granularity"),
        ),
        (
            "/api/v1/revenue?group_by=country",
            400,
            "unknown variant `country`, expected `category` or `none`",
            Some("group_by"),
        ),
        (
            "/api/v1/active-users?from=0&to=864000",
            400,
            "at most 172800 s (2 days)",
            Some("from"),
        ),
        (
            "/api/v1/orders/order-999999",
            404,
            "no order \"order-999999\"",
            None,
        ),
        (
            "/api/v1/orders/order-000001?x=1",
            400,
            "unknown field `x`",
            None,
        ),
        (
            "/api/v1/nothing",
            404,
            "no such endpoint: /api/v1/nothing",
            None,
        ),
    ];
    for (path, status, message, parameter) in cases {
        let (got, headers, body) = service.get(path).await;
        assert_eq!(got, *status, "{path}: {body}");
        assert_eq!(headers["cache-control"], "no-store", "{path}");
        let error: Value = serde_json::from_str(&body).expect("a JSON error");
        assert_eq!(error["error"]["status"], *status);
        let text = error["error"]["message"].as_str().expect("message");
        assert!(text.contains(message), "{path}: {text:?} lacks {message:?}");
        if let Some(parameter) = parameter {
            assert_eq!(error["error"]["parameter"], *parameter, "{path}");
        }
    }
    let long = "x".repeat(129);
    let (status, _, body) = service.get(&format!("/api/v1/orders/{long}")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("order_id: 1 to 128 bytes, got 129"), "{body}");
}

/// Revenue over `[from, to)` per `granularity` (`seconds` long), by
/// category or every category together per currency, as the service
/// answers it, against the seeded `rows` added up.
async fn assert_revenue(
    service: &Service,
    rows: &[PartialRow],
    (from, to): (u32, u32),
    (granularity, seconds): (&str, u32),
    by_category: bool,
) {
    let mut expected: BTreeMap<(u32, Option<String>, String), Figures> = BTreeMap::new();
    for row in rows.iter().filter(|r| in_range(r, "orders", from, to)) {
        let window = row.window_start - row.window_start % seconds;
        let category = by_category.then(|| row.dim1.clone());
        let slot = expected
            .entry((window, category, row.dim2.clone()))
            .or_default();
        slot.0 += row.c1;
        slot.1 += row.c2;
        slot.2 += row.c3;
        slot.3.extend(row.set1.iter().cloned());
    }
    let group_by = if by_category { "category" } else { "none" };
    let revenue = service
        .json(&format!(
            "/api/v1/revenue?from={from}&to={to}&granularity={granularity}&group_by={group_by}"
        ))
        .await;
    let points = revenue["points"].as_array().expect("points");
    assert_eq!(points.len(), expected.len());
    for (point, ((window, category, currency), (orders, items, minor, buyers))) in
        points.iter().zip(&expected)
    {
        assert_eq!(point["window_start"], *window);
        assert_eq!(point["category"], serde_json::json!(category));
        assert_eq!(point["currency"], currency.as_str());
        assert_eq!(point["orders"], *orders);
        assert_eq!(point["items"], *items);
        assert_eq!(point["revenue_minor"], *minor);
        assert_eq!(point["unique_buyers"], buyers.len());
    }
}

/// A late order of category-00 in EUR: revenue 1,000,000, a buyer of its
/// own.
fn late_order(window_start: u32, flushed_at: u32) -> PartialRow {
    PartialRow {
        model: "orders".to_owned(),
        window_start,
        dim1: "category-00".to_owned(),
        dim2: "EUR".to_owned(),
        c1: 1,
        c2: 1,
        c3: 1_000_000,
        set1: vec!["a-late-buyer".to_owned()],
        source_topic: "orders".to_owned(),
        flushed_at,
        ..PartialRow::default()
    }
}

/// Statements this test's service sent that look hours' compactions up
/// in full (not only count the window markers).
async fn lookups(service: &Service) -> u64 {
    logged(service, "%AS hour, covered, min(compaction)%").await
}

/// How many queries the service ran on its database matching `like`.
async fn logged(service: &Service, like: &str) -> u64 {
    shopstream_tests::logged(&service.database.client, like).await
}

/// The service remembers which compaction covered each hour and only
/// counts the window markers again; a late flush into a compacted hour
/// changes its count, so the next answer reads the hour from its partials
/// at once. An hour not over yet is never looked up.
#[tokio::test]
async fn a_late_flush_into_a_compacted_hour_is_read_at_once() {
    let service = common::seeded_with(SMALL, |q| q.cache_max_age_s = 0).await;
    let path = format!(
        "/api/v1/revenue?from={START}&to={}&granularity=hour&category=category-00&currency=EUR",
        START + 10_800
    );
    let first_hour = |answer: &Value| {
        (
            answer["points"][0]["revenue_minor"].as_i64(),
            answer["points"][0]["unique_buyers"].as_u64(),
        )
    };
    let before = service.json(&path).await;
    assert_eq!(lookups(&service).await, 1);
    assert_eq!(service.json(&path).await, before, "recalled, the same");
    assert_eq!(lookups(&service).await, 1, "the markers alone counted");
    // The second half of that hour and the first of the next per minute
    // (no whole hour: the hour before now, as a dashboard reads it), from
    // the compactions' minutes: looked up once (a compaction without
    // minutes must not be taken).
    let minutes = format!(
        "/api/v1/revenue?from={}&to={}&category=category-00&currency=EUR",
        START + 1_800,
        START + 5_400
    );
    let second_minute = |answer: &Value| answer["points"][1]["revenue_minor"].as_i64();
    let minutes_before = service.json(&minutes).await;
    assert_eq!(service.json(&minutes).await, minutes_before);
    assert_eq!(lookups(&service).await, 2, "the minutes looked up once");
    assert_eq!(
        logged(
            &service,
            "%FROM `%`.`analytics_minutes` WHERE model = 'orders' AND level = 2 %"
        )
        .await,
        2,
        "both reads took the compactions' minutes"
    );

    // Late flushes into the first hour: before the range per minute and
    // in it.
    let mut late = vec![late_order(START + 60, START + 20_000)];
    late.push(PartialRow {
        window_start: START + 1_860,
        ..late[0].clone()
    });
    pipelines::store::mark_windows(&mut late, START + 20_000);
    pipelines::store::insert(&service.database.client, &late, Duration::from_secs(30))
        .await
        .expect("late flush");
    let after = service.json(&path).await;
    let (Some(minor), Some(buyers)) = first_hour(&before) else {
        panic!("no first hour: {before}");
    };
    assert_eq!(
        first_hour(&after),
        (Some(minor + 2_000_000), Some(buyers + 1)),
        "{after}"
    );
    assert_eq!(lookups(&service).await, 3, "looked up again");
    assert_eq!(
        before["points"][1], after["points"][1],
        "the other hours alike"
    );
    let minutes_after = service.json(&minutes).await;
    assert_eq!(minutes_before["points"][1]["window_start"], START + 1_860);
    assert_eq!(
        second_minute(&minutes_after),
        second_minute(&minutes_before).map(|r| r + 1_000_000),
        "{minutes_after}"
    );
    assert_eq!(lookups(&service).await, 4, "the minutes looked up again");

    // An hour not over yet, flushed to again and again, is read from its
    // partials rather than looked up on every request.
    let now = || u32::try_from(consumers::forward::now_ms() / 1000).expect("a time");
    shopstream_tests::within_one_hour(u64::from(now() % 3_600), Duration::from_secs(60)).await;
    let hour = {
        let now = now();
        now - now % 3_600
    };
    let path = format!(
        "/api/v1/revenue?from={hour}&to={}&granularity=hour&category=category-00&currency=EUR",
        hour + 3_600
    );
    // (revenue flushed, the hour's revenue then)
    for (flushed, revenue) in [(5, 5), (7, 12)] {
        let mut live = vec![PartialRow {
            window_start: hour,
            c3: flushed,
            flushed_at: now(),
            ..late[0].clone()
        }];
        pipelines::store::mark_windows(&mut live, now());
        pipelines::store::insert(&service.database.client, &live, Duration::from_secs(30))
            .await
            .expect("a flush of this hour");
        let answer = service.json(&path).await;
        assert_eq!(answer["points"][0]["revenue_minor"], revenue, "{answer}");
    }
    assert_eq!(lookups(&service).await, 4, "never looked up");
}

/// The minutes of an hour no compaction covers (the hour not over yet, or
/// here one a late flush made stale) are read per minute from their own
/// compactions, each while the minute's window markers number what it
/// covers: a late flush into one is read at once, and the minute is taken
/// from its compaction again once compacted anew.
#[tokio::test]
async fn the_minutes_of_an_hour_not_compacted_are_read_from_their_own() {
    let service = common::seeded_with(SMALL, |q| q.cache_max_age_s = 0).await;
    let client = &service.database.client;
    let mut rows = seeded_rows();
    let timeout = Duration::from_secs(30);
    let flush = |rows: &mut Vec<PartialRow>, window_start: u32, flushed_at: u32| {
        let mut late = vec![late_order(window_start, flushed_at)];
        rows.extend(late.iter().cloned());
        pipelines::store::mark_windows(&mut late, flushed_at);
        late
    };
    // The third hour stale: a late flush into its second minute.
    let late = flush(&mut rows, START + 7_260, START + 20_000);
    pipelines::store::insert(client, &late, timeout)
        .await
        .expect("late flush");
    // As at START + 9_000, with everything idle before START + 15_000 but
    // that flush: no hour to compact, every minute of the last two hours
    // but the late flush's.
    let compacted = || async {
        pipelines::hours::compact(
            client,
            START,
            pipelines::hours::Idle {
                hours: START + 15_000,
                minutes: START + 15_000,
            },
            START + 9_000,
            timeout,
            &mut pipelines::hours::Unmarked::new(),
        )
        .await
        .map(|done| (done.hours, done.minutes))
        .expect("compacted")
    };
    assert_eq!(compacted().await, (0, 119));
    let range = (START + 5_400, START + 9_000);
    let check = |rows: Vec<PartialRow>| {
        let service = &service;
        async move {
            for by_category in [true, false] {
                assert_revenue(service, &rows, range, ("minute", 60), by_category).await;
            }
            assert_users_per_minute(service, &rows, range.0, range.1, None).await;
        }
    };
    check(rows.clone()).await;
    // Looked up once per model, then recalled while the minutes' window
    // markers number the same.
    let minute_lookups = || logged(&service, "%AS minute, covered, min(compaction)%");
    assert_eq!(minute_lookups().await, 2);
    let own =
        |levels: &str| format!("%`analytics_minutes` WHERE model = '%' AND level IN ({levels})%");
    for levels in ["2, 10", "4, 12", "3, 11"] {
        assert_eq!(logged(&service, &own(levels)).await, 1, "{levels}");
    }
    // Only the late flush's minute from the partials.
    let partials_of = |from: u32, to: u32| {
        format!("%`analytics_partials` WHERE model = 'orders' AND (window_start >= toDateTime({from}) AND window_start < toDateTime({to}))%")
    };
    let late_minute = partials_of(START + 7_260, START + 7_320);
    assert_eq!(logged(&service, &late_minute).await, 2);

    // A late flush into a minute compacted: read at once, from the
    // partials with the minute before it.
    let late = flush(&mut rows, START + 7_320, START + 10_000);
    pipelines::store::insert(client, &late, timeout)
        .await
        .expect("late flush");
    check(rows.clone()).await;
    assert_eq!(
        logged(&service, &partials_of(START + 7_260, START + 7_380)).await,
        2
    );
    assert_eq!(minute_lookups().await, 4);
    // Compacted anew, it is taken from its compaction again once looked
    // up again: a minute found without one is for 10 s.
    assert_eq!(compacted().await, (0, 1));
    tokio::time::sleep(Duration::from_secs(10)).await;
    check(rows).await;
    assert_eq!(minute_lookups().await, 6);
    assert_eq!(logged(&service, &late_minute).await, 4);
    assert_eq!(logged(&service, &own("2, 10")).await, 3);
}

/// Compactions made before the job kept minutes (here: their minutes
/// deleted) still serve reads per hour; per minute they are not read, the
/// partials are.
#[tokio::test]
async fn a_compaction_without_minutes_is_not_read_per_minute() {
    let service = common::seeded_with(SMALL, |q| q.cache_max_age_s = 0).await;
    let client = &service.database.client;
    client
        .query("ALTER TABLE analytics_minutes DELETE WHERE level >= 2")
        .execute()
        .await
        .expect("minutes deleted");
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .query("SELECT count() FROM analytics_minutes WHERE level >= 2")
        .fetch_one::<u64>()
        .await
        .expect("count")
        > 0
    {
        assert!(Instant::now() < deadline, "the mutation never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_users_per_minute(&service, &seeded_rows(), START, START + 10_800, None).await;
}

/// Active users per minute over `[from, to)` as the service answers them,
/// with a `country` or `platform` filter if given, against the distinct
/// users of the seeded rows.
async fn assert_users_per_minute(
    service: &Service,
    rows: &[PartialRow],
    from: u32,
    to: u32,
    filter: Option<(&str, &str)>,
) {
    let kept = |row: &PartialRow| match filter {
        Some(("country", value)) => row.dim1 == value,
        Some(("platform", value)) => row.dim2 == value,
        Some((name, _)) => panic!("no filter {name}"),
        None => true,
    };
    let mut users: BTreeMap<u32, BTreeSet<&str>> = BTreeMap::new();
    for row in rows
        .iter()
        .filter(|r| in_range(r, "users", from, to) && kept(r))
    {
        users
            .entry(row.window_start)
            .or_default()
            .extend(row.set1.iter().map(String::as_str));
    }
    let filter = filter.map_or(String::new(), |(name, value)| format!("&{name}={value}"));
    let answer = service
        .json(&format!("/api/v1/active-users?from={from}&to={to}{filter}"))
        .await;
    let got: Vec<(u64, u64)> = answer["points"]
        .as_array()
        .expect("points")
        .iter()
        .map(|p| {
            (
                p["window_start"].as_u64().expect("t"),
                p["unique_users"].as_u64().expect("n"),
            )
        })
        .collect();
    let want: Vec<(u64, u64)> = users
        .iter()
        .map(|(t, set)| (u64::from(*t), set.len() as u64))
        .collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn hostile_input_reaches_clickhouse_only_as_values() {
    let service = seeded(SMALL).await;
    // A category whose name is an injection attempt, stored for real: the
    // API must find exactly it, proving the value was bound, not spliced.
    let hostile = "x' OR 1=1) UNION ALL SELECT 1 -- \\' ; DROP TABLE analytics_partials; ? \u{0}é";
    let row = PartialRow {
        model: "orders".into(),
        window_start: START,
        dim1: hostile.into(),
        dim2: "EUR".into(),
        c1: 1,
        c3: 4_242,
        ..PartialRow::default()
    };
    pipelines::store::insert(&service.database.client, &[row], Duration::from_secs(30))
        .await
        .expect("insert");
    let count = || async {
        service
            .database
            .client
            .query("SELECT count() FROM analytics_partials")
            .fetch_one::<u64>()
            .await
            .expect("count")
    };
    let before = count().await;
    let encode = |s: &str| -> String { s.bytes().map(|b| format!("%{b:02X}")).collect() };
    let answer = service
        .json(&format!(
            "/api/v1/revenue?from={START}&to={}&category={}",
            START + 60,
            encode(hostile)
        ))
        .await;
    let points = answer["points"].as_array().expect("points");
    assert_eq!(points.len(), 1, "{answer}");
    assert_eq!(points[0]["category"], hostile);
    assert_eq!(points[0]["revenue_minor"], 4_242);
    for attempt in [
        "' OR ''='",
        "order-000001' --",
        "order-000001'; DROP TABLE order_status; --",
        "\\",
        "?",
        "' UNION SELECT name, name, name, name, 0, 0, 0 FROM system.tables --",
    ] {
        let (status, _, body) = service
            .get(&format!("/api/v1/orders/{}", encode(attempt)))
            .await;
        assert_eq!(status, 404, "{attempt}: {body}");
        for (name, value) in [("country", attempt), ("platform", attempt)] {
            let answer = service
                .json(&format!(
                    "/api/v1/active-users?from={START}&to={}&{name}={}",
                    START + 600,
                    encode(value)
                ))
                .await;
            assert_eq!(answer["points"], Value::Array(vec![]), "{name}={attempt}");
        }
    }
    assert_eq!(count().await, before, "nothing was written or dropped");
    let status: u64 = service
        .database
        .client
        .query("SELECT count() FROM order_status")
        .fetch_one()
        .await
        .expect("order_status is still there");
    assert_eq!(status, SMALL.orders as u64);
}

#[tokio::test]
async fn answers_carry_cache_control_and_an_etag_that_revalidates() {
    let service = seeded(SMALL).await;
    let url = format!(
        "{}/api/v1/funnel?from={START}&to={}",
        service.base,
        START + 3_600
    );
    let (status, headers, body) = get(&service.http, &url).await;
    assert_eq!(status, 200);
    assert_eq!(headers["cache-control"], "public, max-age=5");
    let etag = headers["etag"].to_str().expect("etag").to_owned();
    assert!(etag.starts_with('"') && etag.len() == 18, "{etag}");
    let again = service
        .http
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .expect("answer");
    assert_eq!(again.status().as_u16(), 304);
    assert_eq!(again.headers()["etag"], etag.as_str());
    assert!(again.text().await.expect("body").is_empty());
    let stale = service
        .http
        .get(&url)
        .header("if-none-match", "\"0000000000000000\"")
        .send()
        .await
        .expect("answer");
    assert_eq!(stale.status().as_u16(), 200);
    assert_eq!(stale.text().await.expect("body"), body);
}

#[tokio::test]
async fn answers_are_reused_while_fresh_and_requeried_after() {
    let service = common::seeded_with(SMALL, |q| q.cache_max_age_s = 2).await;
    let path = format!("/api/v1/funnel?from={START}&to={}", START + 3_600);
    let created = |answer: &Value| answer["counts"]["created"].as_i64().expect("created");
    let before = created(&service.json(&path).await);
    let more = PartialRow {
        model: "funnel".into(),
        window_start: START,
        c1: 1_000,
        ..PartialRow::default()
    };
    // As a flush writes it: with its window's marker.
    let mut more = vec![more];
    pipelines::store::mark_windows(&mut more, START + 3_600);
    pipelines::store::insert(&service.database.client, &more, Duration::from_secs(30))
        .await
        .expect("insert");
    let started = Instant::now();
    let reused = created(&service.json(&path).await);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(reused, before, "the fresh answer is reused");
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    assert_eq!(
        created(&service.json(&path).await),
        before + 1_000,
        "then requeried"
    );

    let uncached = common::seeded_with(SMALL, |q| q.cache_max_age_s = 0).await;
    let before = created(&uncached.json(&path).await);
    let more = PartialRow {
        model: "funnel".into(),
        window_start: START,
        c1: 7,
        ..PartialRow::default()
    };
    let mut more = vec![more];
    pipelines::store::mark_windows(&mut more, START + 3_600);
    pipelines::store::insert(&uncached.database.client, &more, Duration::from_secs(30))
        .await
        .expect("insert");
    let (_, headers, body) = uncached.get(&path).await;
    assert_eq!(headers["cache-control"], "public, max-age=0");
    let answer: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(created(&answer), before + 7, "max-age 0 reuses nothing");
}

#[tokio::test]
async fn concurrent_requests_for_an_expired_answer_share_one_query() {
    let service = seeded(SMALL).await;
    let proxy = shopstream_tests::proxy::ClickHouseProxy::start(&service.database.url)
        .await
        .expect("proxy");
    let (base, _shutdown) = serve(common::config(&proxy.url(), &service.database.name)).await;
    let url = format!(
        "{base}/api/v1/chat-rooms/busiest?from={START}&to={}",
        START + 10_800
    );
    let answers = futures_join(&service.http, &url, 16).await;
    assert!(
        answers.iter().all(|a| a == &answers[0]),
        "one answer for all"
    );
    // Busiest rooms is two reads (sums, then the top rooms' chatters),
    // after counting the window markers and, the first time, asking where
    // the server's hours start and which of their hours are compacted.
    assert_eq!(proxy.requests(), 5, "16 requests, one set of queries");
}

async fn futures_join(http: &reqwest::Client, url: &str, n: usize) -> Vec<String> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (http, url) = (http.clone(), url.to_owned());
            tokio::spawn(async move {
                let (status, _, body) = get(&http, &url).await;
                assert_eq!(status, 200, "{body}");
                body
            })
        })
        .collect();
    let mut bodies = Vec::new();
    for task in tasks {
        bodies.push(task.await.expect("request task"));
    }
    bodies
}

#[tokio::test]
async fn probes_metrics_and_a_self_contained_dashboard() {
    let service = seeded(SMALL).await;
    assert_eq!(service.get("/healthz").await.0, 200);
    assert_eq!(service.get("/readyz").await.0, 200);
    service.json(&format!("/api/v1/funnel?from={START}")).await;
    let (status, _, metrics) = service.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics
            .contains("shopstream_query_requests_total{route=\"/api/v1/funnel\",status=\"200\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("shopstream_query_seconds_count{route=\"/api/v1/funnel\"} 1"));
    let (status, headers, page) = service.get("/").await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    for outside in ["<script src", "<link", "url(", "@import", "https://"] {
        assert!(!page.contains(outside), "the dashboard loads {outside}");
    }
    assert!(page.contains("const REFRESH_S = 5;"));
}

/// A server that accepts connections and never answers.
async fn hung_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    format!("http://{address}")
}

#[tokio::test]
async fn clickhouse_down_or_hung_is_a_503_that_says_so_never_a_hang() {
    let http = reqwest::Client::new();
    let closed = format!(
        "http://127.0.0.1:{}",
        shopstream_tests::free_port().expect("port")
    );
    let hung = hung_server().await;
    for (url, code, words) in [
        (closed.as_str(), "clickhouse_unavailable", "is unreachable"),
        (hung.as_str(), "clickhouse_timeout", "query within 500 ms"),
    ] {
        let mut config = common::config(url, "shopstream");
        config.query.query_timeout_ms = 500;
        let (base, shutdown) = serve(config).await;
        let started = Instant::now();
        let (status, headers, body) = get(&http, &format!("{base}/api/v1/funnel")).await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(status, 503, "{body}");
        assert_eq!(headers["retry-after"], "5");
        let error: Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(error["error"]["code"], code);
        let message = error["error"]["message"].as_str().expect("message");
        assert!(
            message.contains(words) && message.contains(url),
            "{message}"
        );
        let (status, _, _) = get(&http, &format!("{base}/readyz")).await;
        assert_eq!(status, 503);
        assert_eq!(get(&http, &format!("{base}/healthz")).await.0, 200);
        shutdown.cancel();
    }
}

#[tokio::test]
async fn read_models_not_created_yet_are_a_503_that_says_what_to_do() {
    let clickhouse = shopstream_tests::clickhouse().await;
    let database = clickhouse.database().await.expect("database");
    let (base, _shutdown) = serve(common::config(clickhouse.url(), &database.name)).await;
    let service = Service {
        base,
        database,
        shutdown: _shutdown.clone(),
        http: reqwest::Client::new(),
    };
    let (status, _, body) = service.get("/api/v1/searches").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not in ClickHouse yet"), "{body}");
}
