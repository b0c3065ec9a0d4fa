//! scripts/bench in smoke mode (tiny sizes, one round, the test build's
//! binaries): every contender runs, every figure is recorded with its
//! baseline, the report and JSON are written, and nothing is left running.
//! Its figures mean nothing; `scripts/bench` without --smoke measures.
//! Here, in the bench crate, so `cargo test` builds the binaries it runs.

use std::process::Command;

use shopstream_tests::{bin_dir, repo_root};

#[test]
fn the_bench_harness_runs_every_contender_and_writes_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = bin_dir();
    let out = dir.path().join("out");
    let output = Command::new(repo_root().join("scripts/bench"))
        .args(["--smoke", "--out"])
        .arg(&out)
        .env("BENCH_BIN_DIR", &bin_dir)
        .env("TMPDIR", dir.path())
        // Its own ClickHouse: the Kafka engine comparison configures it.
        .env_remove("CLICKHOUSE_URL")
        .env_remove("BENCH_JSON")
        .output()
        .expect("scripts/bench runs");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{log}");

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("benchmarks.json")).unwrap())
            .unwrap();
    let figures = json["figures"].as_array().unwrap();
    let find = |section: &str, figure: &str| {
        figures
            .iter()
            .find(|f| f["section"] == section && f["figure"] == figure)
            .unwrap_or_else(|| panic!("no {section} / {figure} in {json:#}"))
    };
    for (section, figure, baseline) in [
        (
            "publish (Avro)",
            "shopstream Publisher",
            Some("bare rdkafka producer"),
        ),
        (
            "publish (JSON)",
            "shopstream Publisher",
            Some("bare rdkafka producer"),
        ),
        (
            "consume",
            "shopstream-worker, no-op handler, on orders (issue 22's goal)",
            Some("bare rdkafka consumer"),
        ),
        (
            "consume",
            "shopstream-worker, no-op handler, every topic of the catalog",
            Some("bare rdkafka consumer"),
        ),
        ("consume", "Avro decode per event, decode calls timed", None),
        ("consume", "shopstream-worker vs kcat", Some("kcat")),
        (
            "sink",
            "shopstream-worker events-store into ClickHouse",
            Some("shopstream-worker, no-op handler, every topic"),
        ),
        (
            "analytics",
            "shopstream-analytics, per CPU second of the job (per core)",
            None,
        ),
        (
            "analytics",
            "freshness p99 at 1000 events/s, produce to visible",
            None,
        ),
        (
            "analytics vs the ClickHouse Kafka engine (JSON orders)",
            "shopstream-analytics, per CPU second of the job and ClickHouse",
            Some("ClickHouse Kafka engine + materialized views"),
        ),
        ("resources", "shopstream-worker peak RSS", None),
        (
            "resources",
            "shopstream-publish CPU per million events (Avro)",
            None,
        ),
        ("resources", "shopstream-publish peak RSS (JSON)", None),
        ("resources", "shopstream-analytics peak RSS", None),
        (
            "query, every request to ClickHouse",
            "order status by id, 1 connection(s), p99",
            None,
        ),
        (
            "query, every request to ClickHouse",
            "revenue, default range per minute, by category, while the job writes, 1 connection(s), p99",
            None,
        ),
    ] {
        let f = find(section, figure);
        let median = f["value"]["median"].as_f64().unwrap();
        assert!(
            median.is_finite() && median > 0.0,
            "{section} / {figure}: {f}"
        );
        assert_eq!(f["baseline"].as_str(), baseline, "{section} / {figure}");
        if baseline.is_some() {
            let ratio = f["ratio"]["median"].as_f64().unwrap();
            assert!(
                ratio.is_finite() && ratio > 0.0,
                "{section} / {figure}: {f}"
            );
        }
    }
    for key in ["cpu", "cores", "memory", "os", "kernel"] {
        assert!(json["machine"][key].is_string(), "machine.{key}: {json:#}");
    }
    for key in ["librdkafka", "clickhouse", "kcat", "rustc", "shopstream"] {
        assert!(
            json["versions"][key].is_string(),
            "versions.{key}: {json:#}"
        );
    }

    let markdown = std::fs::read_to_string(out.join("BENCHMARKS.md")).unwrap();
    assert!(
        markdown.contains("## Side by side (`scripts/bench --smoke`)"),
        "{markdown}"
    );
    assert!(
        markdown.contains("    publish-bench --events 5000 --rounds 1 --format avro"),
        "{markdown}"
    );
    assert!(markdown.contains("<!-- generated by scripts/bench: end -->"));

    // No process of the harness outlives it.
    let needle = dir.path().to_string_lossy().into_owned();
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .filter(|line| line.contains(&needle))
        .collect();
    assert_eq!(left, Vec::<String>::new());
}

#[test]
fn bad_arguments_are_refused_with_the_valid_ones() {
    for (args, message) in [
        (
            &["--rounds", "0"][..],
            "--rounds takes a whole number above 0, got '0'",
        ),
        (
            &["--frobnicate"][..],
            "unknown argument '--frobnicate' (valid: --rounds N, --out DIR, --smoke)",
        ),
    ] {
        let output = Command::new(repo_root().join("scripts/bench"))
            .args(args)
            .output()
            .expect("scripts/bench runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(message), "{stderr}");
    }
}
