//! The ClickHouse users run today (issue 21): every statement a run sends
//! ClickHouse 18.16 runs on ClickHouse 26.9 (chdb) exactly as sent, and
//! every query gets the same answer there over the same rows. The
//! statements are not listed here: they are what the binaries sent, taken
//! from the query log of a private 18.16 server that served only this run
//! (the worker's projections, the analytics job with its migrations, the
//! checker, the report and every endpoint of the query API).

use std::process::{Command, Stdio};
use std::time::Duration;

use shopstream_tests::{bin_dir, repo_root, Broker, StoppableClickHouse};

use crate::{Run, System};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_statement_a_run_sends_runs_on_clickhouse_26_with_the_same_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = StoppableClickHouse::start(dir.path());
    server.ready().await;
    let url = server.url();
    let system = System::new(Broker::Mock, &url, &url, &[]).await;
    within_one_hour(&system).await;
    let run = Run::new(81, 3_000, 3_000.0, 0.01);
    let expected = run.expected();
    let (mut worker, mut analytics) = system.consumers().await;
    system.publish_all(&run);
    let report = system
        .converge(&expected, &system.checks(), Duration::from_secs(120))
        .await;
    assert!(report.passed(), "{report}\n{}", system.logs());
    system.stop(&mut [&mut worker, &mut analytics]);

    let succeeds = |command: &mut Command| {
        shopstream_tests::succeeds(command.env("RUST_LOG", "warn"), "the binary runs");
    };
    succeeds(
        Command::new(bin_dir().join("shopstream-check"))
            .arg("--config")
            .arg(system.config_path())
            .args(run.flags()),
    );
    succeeds(
        Command::new(bin_dir().join("shopstream-analytics"))
            .arg("report")
            .arg("--config")
            .arg(system.config_path())
            .args(["--since", "30d", "--output", "json"]),
    );
    query_every_endpoint(&system).await;
    // Not vacuous for the hour not over yet either: its minutes were read
    // per minute from their own compactions.
    assert!(
        system.own_minute_reads().await > 0,
        "no read of minutes' own compactions (did the run outlast {RUN_AND_READS} s?)"
    );

    let output = Command::new("python3")
        .arg(repo_root().join("tests/clickhouse_replay.py"))
        .args([&url, &system.database])
        .stderr(Stdio::inherit())
        .output()
        .expect("python3 runs (scripts/test installs it with chdb-core)");
    assert!(output.status.success(), "the replay failed");
    let replay: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    println!(
        "ClickHouse {}: {} statements sent and {} queries replayed, {} rows moved, {} answer lines equal",
        replay["version"], replay["sent"], replay["queries"], replay["rows"], replay["lines"]
    );
    assert!(
        replay["version"].as_str().unwrap_or("").starts_with("26."),
        "{replay}"
    );
    // Not vacuous: the migrations, the projections and the queries of every
    // binary were there, over the run's rows.
    assert!(replay["sent"].as_u64().unwrap_or(0) >= 30, "{replay}");
    assert!(replay["queries"].as_u64().unwrap_or(0) >= 30, "{replay}");
    assert!(replay["rows"].as_u64().unwrap_or(0) >= 3_000, "{replay}");
    assert!(replay["lines"].as_u64().unwrap_or(0) >= 1_000, "{replay}");
    assert_eq!(
        replay["refused"],
        serde_json::json!([]),
        "statements 26.9 refused"
    );
    assert_eq!(
        replay["differ"],
        serde_json::json!([]),
        "queries answered differently by 18.16 and 26.9 (query, 18.16, 26.9)"
    );
}

/// How long the run, the checker, the report and the queries below take at
/// most: the convergence's 120 s and the rest under a loaded suite.
const RUN_AND_READS: u64 = 300;

/// Waits for the server's next hour when this one ends before the run and
/// its reads would: the reads take the run's minutes from their own
/// compactions only while its hour is not over (after, from the hour's
/// compaction), and those statements must be among the ones replayed.
async fn within_one_hour(system: &System) {
    let into_hour: u64 = system
        .client
        .query("SELECT toUInt64(toUInt32(now()) - toUInt32(toStartOfHour(now())))")
        .fetch_one()
        .await
        .expect("the server's time");
    shopstream_tests::within_one_hour(into_hour, Duration::from_secs(RUN_AND_READS)).await;
}

/// Asks every endpoint of the query service's OpenAPI document once, with
/// its default parameters (an order of the run for the order endpoint),
/// the answer cache off.
async fn query_every_endpoint(system: &System) {
    let (_query, port) = system.query_service().await;
    let response = bench::scrape::http_get(port, "/api/v1/openapi.json")
        .await
        .unwrap_or_default();
    let document = response
        .split_once("\r\n\r\n")
        .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(body).ok())
        .expect("the OpenAPI document");
    let order: String = system
        .client
        .query("SELECT min(order_id) FROM order_status")
        .fetch_one()
        .await
        .expect("an order of the run");
    let paths = document["paths"].as_object().expect("paths");
    assert!(paths.len() >= 8, "{document}");
    for path in paths.keys() {
        let path = path.replace("{order_id}", &order);
        let response = bench::scrape::http_get(port, &path)
            .await
            .unwrap_or_default();
        assert!(response.starts_with("HTTP/1.1 200"), "{path}: {response}");
    }
}
