//! The dashboard in headless Chromium (Debian's, driven by playwright-core
//! from query/e2e): it renders from the API alone, with no request beyond
//! the service, and every number it shows is the API's. Leaves a screenshot
//! in `$ARTIFACTS_DIR` (default: `target/artifacts`).

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use common::{seeded, seeded_with, SMALL, START};
use serde_json::Value;

fn artifacts() -> PathBuf {
    let dir = std::env::var_os("ARTIFACTS_DIR").map_or_else(
        || {
            let exe = std::env::current_exe().expect("test binary");
            // target/<profile>/deps/<test> -> target/artifacts
            exe.ancestors()
                .nth(3)
                .expect("target dir")
                .join("artifacts")
        },
        PathBuf::from,
    );
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir
}

/// "1,234" as the page formats counts.
fn count(text: &Value) -> i64 {
    text.as_str()
        .expect("a shown number")
        .replace(',', "")
        .parse()
        .expect("a number")
}

/// What the page at `url` shows in headless Chromium (query/e2e), signing
/// in with `token` when given; the screenshot goes to `screenshot`.
async fn browse(url: String, screenshot: PathBuf, token: Option<&str>) -> Value {
    let e2e = shopstream_tests::repo_root().join("query/e2e");
    assert!(
        e2e.join("node_modules/playwright-core").exists(),
        "playwright-core is missing: run `npm ci --prefix query/e2e` (scripts/test does)"
    );
    let token = token.map(str::to_owned);
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(e2e.join("dashboard.mjs"))
            .arg(&url)
            .arg(&screenshot)
            .args(token)
            .output()
            .expect("node runs (apt-get install nodejs)")
    })
    .await
    .expect("browser task");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the browser run failed: {stderr}");
    serde_json::from_slice(&output.stdout).expect("the page's figures as JSON")
}

#[tokio::test]
async fn the_dashboard_asks_for_a_token_once_per_session_when_the_service_wants_one() {
    let dir = tempfile::tempdir().expect("dir");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "dashboard-token\n").expect("write");
    let service = seeded_with(SMALL, |q| q.auth.tokens_file = Some(tokens.clone())).await;
    let (from, to) = (START, START + 3_600);
    let url = format!("{}/?from={from}&to={to}", service.base);
    let shown = browse(
        url,
        artifacts().join("dashboard-signed-in.png"),
        Some("dashboard-token"),
    )
    .await;
    assert_eq!(
        shown["outside"],
        Value::Array(vec![]),
        "requests beyond the service"
    );
    assert_eq!(shown["errors"], Value::Array(vec![]), "script errors");
    let auth = &shown["auth"];
    eprintln!("auth flow: {auth}");
    assert_eq!(auth["page_status"], 401, "{auth}");
    assert!(
        auth["asked"]
            .as_str()
            .is_some_and(|s| s.contains("needs a token")),
        "{auth}"
    );
    assert!(
        auth["refused"]
            .as_str()
            .is_some_and(|s| s.contains("refused")),
        "{auth}"
    );
    assert_eq!(auth["reload_status"], 401, "{auth}");
    assert_eq!(
        auth["asked_again"], false,
        "asked again after a reload: {auth}"
    );
    assert_eq!(auth["stored"], true, "{auth}");
    let funnel = service
        .http
        .get(format!(
            "{}/api/v1/funnel?from={from}&to={to}",
            service.base
        ))
        .bearer_auth("dashboard-token")
        .send()
        .await
        .expect("answers")
        .text()
        .await
        .expect("a body");
    let funnel: Value = serde_json::from_str(&funnel).expect("JSON");
    for stage in query::seed::STATUSES {
        assert_eq!(
            count(&shown["funnel"][stage]),
            funnel["counts"][stage],
            "{stage}"
        );
    }
}

#[tokio::test]
async fn the_dashboard_shows_what_the_api_answers() {
    let service = seeded(SMALL).await;
    let (from, to) = (START, START + 3_600);
    let screenshot = artifacts().join("dashboard.png");
    let url = format!("{}/?from={from}&to={to}", service.base);
    let shown = browse(url, screenshot.clone(), None).await;

    assert_eq!(
        shown["outside"],
        Value::Array(vec![]),
        "requests beyond the service"
    );
    assert_eq!(shown["errors"], Value::Array(vec![]), "script errors");
    assert_eq!(
        (shown["from"].as_u64(), shown["to"].as_u64()),
        (Some(u64::from(from)), Some(u64::from(to)))
    );

    let range = format!("from={from}&to={to}");
    let funnel = service.json(&format!("/api/v1/funnel?{range}")).await;
    for stage in query::seed::STATUSES {
        assert_eq!(
            count(&shown["funnel"][stage]),
            funnel["counts"][stage],
            "{stage}"
        );
    }

    let users = service.json(&format!("/api/v1/active-users?{range}")).await;
    let last = users["points"]
        .as_array()
        .and_then(|p| p.last())
        .expect("a minute");
    assert_eq!(count(&shown["active_users"]), last["unique_users"]);
    assert_eq!(shown["active_users_window"], last["window_start"]);

    let rooms = service
        .json(&format!("/api/v1/chat-rooms/busiest?{range}&limit=10"))
        .await;
    let want = common::rooms(&rooms);
    let got: Vec<(String, i64, i64)> = shown["rooms"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r[0].as_str().expect("id").to_owned(),
                count(&r[1]),
                count(&r[2]),
            )
        })
        .collect();
    assert_eq!(got, want);
    assert_eq!(got.len(), 10);

    let top = service
        .json(&format!("/api/v1/searches/top?{range}&limit=10"))
        .await;
    let want = common::named_counts(&top, "queries", "query", "searches");
    let got: Vec<(String, i64)> = shown["queries"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| (r[0].as_str().expect("q").to_owned(), count(&r[1])))
        .collect();
    assert_eq!(got, want);

    let zero = service
        .json(&format!(
            "/api/v1/searches/zero-results/top?{range}&limit=10"
        ))
        .await;
    let want = common::zero_result_queries(&zero);
    let got: Vec<(String, i64, i64)> = shown["zero_queries"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r[0].as_str().expect("q").to_owned(),
                count(&r[1]),
                count(&r[2]),
            )
        })
        .collect();
    assert!(!want.is_empty(), "the seed has zero-result queries");
    assert_eq!(got, want);

    let searches = service.json(&format!("/api/v1/searches?{range}")).await;
    assert_eq!(count(&shown["searches"]), searches["searches"]);
    assert_eq!(count(&shown["zero_results"]), searches["zero_results"]);

    let revenue = service
        .json(&format!("/api/v1/revenue?{range}&group_by=none"))
        .await;
    let mut by_currency: BTreeMap<String, (i64, u64)> = BTreeMap::new();
    for point in revenue["points"].as_array().expect("points") {
        let slot = by_currency
            .entry(point["currency"].as_str().expect("currency").to_owned())
            .or_default();
        slot.0 += point["revenue_minor"].as_i64().expect("revenue");
        slot.1 += 1;
    }
    assert_eq!(by_currency.len(), 2);
    for (currency, (minor, points)) in &by_currency {
        let text = shown["revenue_totals"][currency].as_str().expect("a total");
        let amount = text
            .trim_end_matches(currency.as_str())
            .trim()
            .replace(',', "");
        let shown_minor = (amount.parse::<f64>().expect("an amount") * 100.0).round() as i64;
        assert_eq!(shown_minor, *minor, "{currency}: {text}");
        assert_eq!(shown["revenue_lines"][currency], *points, "{currency} line");
    }

    let png = std::fs::read(&screenshot).expect("the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
    eprintln!("screenshot: {}", screenshot.display());
}
