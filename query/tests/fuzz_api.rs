//! Schemathesis (PyPI) generates requests from the OpenAPI document, valid
//! and not, and checks every answer: never a 5xx, and statuses, content
//! types and bodies as documented.

mod common;

use std::process::Command;

use common::{seeded, SMALL};

/// Requests per endpoint; `QUERY_FUZZ_EXAMPLES` raises it for a soak.
fn examples() -> String {
    std::env::var("QUERY_FUZZ_EXAMPLES").unwrap_or_else(|_| "150".into())
}

#[tokio::test]
async fn generated_requests_never_get_a_5xx_and_answers_match_the_document() {
    let service = seeded(SMALL).await;
    let document = format!("{}/api/v1/openapi.json", service.base);
    let output = tokio::task::spawn_blocking(move || {
        Command::new("st")
            .args(["run", &document])
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            ])
            .args(["--max-examples", &examples()])
            .args(["--generation-deterministic", "--request-timeout", "10"])
            .env("NO_COLOR", "1")
            .output()
            .expect("schemathesis' `st` runs: pip install schemathesis (scripts/test does)")
    })
    .await
    .expect("schemathesis task");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "schemathesis found failures:\n{stdout}\n{stderr}"
    );
    // It really ran every operation.
    let tested = format!("Tested: {}", query::openapi::ENDPOINTS.len());
    assert!(
        stdout.contains(&tested),
        "not every operation was exercised:\n{stdout}"
    );
    eprintln!("{stdout}");
}
