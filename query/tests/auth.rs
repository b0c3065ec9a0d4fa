//! `query.auth.tokens_file`: the API, its document and the dashboard want a
//! bearer token from the file (or one whose SHA-256 it holds); the probes
//! and /metrics do not; the file is re-read when it changes.

mod common;

use std::time::{Duration, Instant};

use common::{seeded_with, Service, SMALL, START};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// (status, WWW-Authenticate, body) of a GET with `token`, if any.
async fn get(service: &Service, path: &str, token: Option<&str>) -> (u16, String, String) {
    let mut request = service.http.get(format!("{}{path}", service.base));
    if let Some(token) = token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let response = request.send().await.expect("the service answers");
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().expect("ASCII").to_owned())
        .unwrap_or_default();
    (status, challenge, response.text().await.expect("a body"))
}

fn error_code(body: &str) -> String {
    let body: Value = serde_json::from_str(body).expect("a JSON error body");
    body["error"]["code"].as_str().expect("a code").to_owned()
}

#[tokio::test]
async fn bearer_tokens_guard_the_api_its_document_and_the_dashboard_but_not_the_probes() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("tokens");
    let beta: String = Sha256::digest(b"beta-token")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(&file, format!("# readers\nalpha-token\nsha256:{beta}\n")).expect("write");
    let service = seeded_with(SMALL, |q| q.auth.tokens_file = Some(file.clone())).await;
    let range = format!("from={START}&to={}", START + 3_600);
    let funnel = format!("/api/v1/funnel?{range}");

    for path in [funnel.as_str(), "/api/v1/openapi.json", "/api/v1/no-such"] {
        let (status, challenge, body) = get(&service, path, None).await;
        assert_eq!(status, 401, "{path}: {body}");
        assert!(challenge.starts_with("Bearer "), "{path}: {challenge}");
        assert!(challenge.contains("missing_token"), "{path}: {challenge}");
        assert_eq!(error_code(&body), "unauthorized", "{path}");
        let (status, challenge, body) = get(&service, path, Some("wrong-token")).await;
        assert_eq!(status, 401, "{path}: {body}");
        assert!(challenge.contains("invalid_token"), "{path}: {challenge}");
        assert!(!body.contains("wrong-token"), "the token echoed: {body}");
    }
    // The dashboard's 401 is its page, which asks for the token.
    let (status, challenge, page) = get(&service, "/", None).await;
    assert_eq!(status, 401);
    assert!(challenge.starts_with("Bearer "), "{challenge}");
    assert!(page.contains("data-testid=\"sign-in\""), "{page}");

    for token in ["alpha-token", "beta-token"] {
        let (status, _, body) = get(&service, &funnel, Some(token)).await;
        assert_eq!(status, 200, "{token}: {body}");
        assert_eq!(get(&service, "/", Some(token)).await.0, 200, "{token}");
        assert_eq!(
            get(&service, "/api/v1/no-such", Some(token)).await.0,
            404,
            "{token}"
        );
    }
    let (_, _, document) = get(&service, "/api/v1/openapi.json", Some("alpha-token")).await;
    let document: Value = serde_json::from_str(&document).expect("JSON");
    assert_eq!(
        document["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert_eq!(document["security"], serde_json::json!([{"bearer": []}]));
    assert!(document["paths"]["/api/v1/funnel"]["get"]["responses"]["401"].is_object());

    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(get(&service, path, None).await.0, 200, "{path}");
    }

    // Rotation: the new file is in force within seconds, without a restart.
    std::fs::write(&file, "gamma-token\n").expect("rewrite");
    let started = Instant::now();
    while get(&service, &funnel, Some("gamma-token")).await.0 != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the rotated token was not taken"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(get(&service, &funnel, Some("alpha-token")).await.0, 401);
    // A file emptied by mistake keeps the tokens read before.
    std::fs::write(&file, "# nobody\n").expect("empty");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(get(&service, &funnel, Some("gamma-token")).await.0, 200);
}

#[tokio::test]
async fn without_a_tokens_file_nothing_asks_for_one() {
    let service = seeded_with(SMALL, |_| ()).await;
    let (_, _, document) = get(&service, "/api/v1/openapi.json", None).await;
    let document: Value = serde_json::from_str(&document).expect("JSON");
    assert!(document.get("security").is_none());
    assert_eq!(get(&service, "/", None).await.0, 200);
}

#[test]
fn a_tokens_file_that_cannot_be_used_stops_the_service_by_name() {
    let dir = tempfile::tempdir().expect("dir");
    let mut config = common::config("http://127.0.0.1:1", "db");
    for (content, expected) in [
        (None, "query.auth.tokens_file"),
        (
            Some("sha256:12ab\n"),
            "line 1: sha256: must be followed by 64 hex digits",
        ),
        (Some("# only a comment\n"), "holds no token"),
    ] {
        let file = dir.path().join("tokens");
        let _ = std::fs::remove_file(&file);
        if let Some(content) = content {
            std::fs::write(&file, content).expect("write");
        }
        config.query.auth.tokens_file = Some(file.clone());
        let error = query::App::new(&config).expect_err("refused").to_string();
        assert!(error.contains(expected), "{error}");
        assert!(error.contains(&file.display().to_string()), "{error}");
    }
}
