//! shopstream-check's command line: what it refuses and how it says so. Its
//! verdicts on real end states are tested in tests/tests/reliability.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_shopstream-check");

fn check(args: &[&str]) -> (Option<i32>, String) {
    let output = Command::new(BIN)
        .args(args)
        .current_dir(shopstream_tests::repo_root())
        .env("RUST_LOG", "warn")
        .output()
        .expect("shopstream-check runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_run_without_its_start_is_refused_with_the_reason() {
    let (code, stderr) = check(&["--count", "10", "--seed", "1"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--start-ms is required: the run's first event time, which shopstream-publish prints in its summary"),
        "{stderr}"
    );
}

#[test]
fn an_unknown_part_is_refused_with_the_valid_ones() {
    let (code, stderr) = check(&[
        "--count",
        "1",
        "--start-ms",
        "0",
        "--check",
        "events,orders",
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("invalid value 'orders' for '--check"),
        "{stderr}"
    );
    assert!(
        stderr.contains("events, order-status, analytics, dead-letters"),
        "{stderr}"
    );
}

#[test]
fn an_unreachable_clickhouse_is_an_error_not_a_finding() {
    let port = shopstream_tests::free_port().expect("port");
    let (code, stderr) = check(&[
        "--count",
        "1",
        "--start-ms",
        "0",
        "--check",
        "events",
        "--set",
        &format!("clickhouse.url=http://127.0.0.1:{port}"),
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("shopstream-check: reading user_events"),
        "{stderr}"
    );
}
