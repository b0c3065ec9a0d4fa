//! Scenario 9: hostile configuration. Every long-running binary refuses a
//! bad topics.yaml or shopstream.yaml at start, naming the file, line,
//! field and what is valid; and a sentinel password set in the file and
//! the environment never appears in any output at trace level, from any
//! binary, while they fail to authenticate against real servers.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shopstream_tests::{bin_dir, clickhouse, mock_cluster, repo_root};

const SENTINEL: &str = "sentinel-Pa55w0rd-5ecret";

/// Runs `binary` with `args` until it exits or `limit` passes (then
/// SIGTERM, and SIGKILL 10 s later); its exit code and all its output.
fn run(
    binary: &str,
    dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    limit: Duration,
) -> (Option<i32>, String) {
    let out = dir.join(format!("{binary}.out"));
    let file = std::fs::File::create(&out).expect("output file");
    let mut child = Command::new(bin_dir().join(binary))
        .args(args)
        .current_dir(dir)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("file"))
        .stderr(file)
        .spawn()
        .expect("starts");
    let started = Instant::now();
    let mut signalled = false;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > limit && !signalled {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            signalled = true;
        }
        if started.elapsed() > limit + Duration::from_secs(10) {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status.code(), std::fs::read_to_string(out).expect("output"))
}

#[test]
fn hostile_catalogs_and_settings_are_refused_at_start_by_every_binary() {
    let shipped = std::fs::read_to_string(repo_root().join("topics.yaml")).expect("topics.yaml");
    let base = "kafka:\n  bootstrap_servers: 127.0.0.1:1\nclickhouse:\n  url: http://127.0.0.1:1\n";
    // (what, catalog edit, extra settings, what the error must say)
    let cases: [(&str, (&str, &str), &str, &str); 9] = [
        ("illegal topic name", ("  - name: orders\n", "  - name: \"orders/../x\"\n"), "",
         "topics.yaml:27: topics[1].name: \"orders/../x\" has '/'; topic names may use only ASCII letters, digits, '.', '_' and '-'"),
        ("regular expression as a name", ("  - name: orders\n", "  - name: \"^orders.*\"\n"), "",
         "topics.yaml:27: topics[1].name: \"^orders.*\" looks like a regular expression; the catalog takes literal topic names"),
        ("SQL in a topic name", ("  - name: orders\n", "  - name: \"orders'; DROP TABLE order_events; --\"\n"), "",
         "topics.yaml:27: topics[1].name: \"orders'; DROP TABLE order_events; --\" has '\\''; topic names may use only"),
        ("duplicate topic", ("  - name: chat-messages\n", "  - name: orders\n"), "",
         "topics.yaml:39: topics[2].name: topic \"orders\" is declared twice (also at topics[1].name)"),
        ("duplicate key", ("    partitions: 24\n", "    partitions: 24\n    partitions: 12\n"), "",
         "topics.yaml:31: topics[1].partitions: appears twice; each key may appear once"),
        ("absurd partitions", ("    partitions: 24\n", "    partitions: 100000000\n"), "",
         "topics.yaml:30: topics[1].partitions: must be from 1 to 10000, got 100000000"),
        ("SQL in the database name", ("", ""), "  database: \"shop`; DROP DATABASE system; --\"\n",
         "shopstream.yaml:5: clickhouse.database: \"shop`; DROP DATABASE system; --\" is not a valid identifier: use letters, digits and '_'"),
        ("absurd batch size", ("", ""), "worker:\n  batch_max_records: 1000000000000\n",
         "shopstream.yaml:6: worker.batch_max_records: must be from 1 to 100000, got 1000000000000"),
        ("absurd flush interval", ("", ""), "analytics:\n  flush_interval_ms: 0\n",
         "shopstream.yaml:6: analytics.flush_interval_ms: must be from 10 to 600000, got 0"),
    ];
    let dir = tempfile::tempdir().expect("dir");
    std::os::unix::fs::symlink(repo_root().join("schemas"), dir.path().join("schemas"))
        .expect("schemas");
    for (what, (from, to), settings, message) in cases {
        assert!(
            shipped.contains(from),
            "{what}: the shipped catalog has {from:?}"
        );
        std::fs::write(
            dir.path().join("topics.yaml"),
            shipped.replacen(from, to, 1),
        )
        .expect("catalog");
        std::fs::write(
            dir.path().join("shopstream.yaml"),
            format!("{base}{settings}"),
        )
        .expect("settings");
        for binary in [
            "shopstream-worker",
            "shopstream-analytics",
            "shopstream-publish",
            "shopstream-topics",
        ] {
            let args: &[&str] = match binary {
                "shopstream-topics" => &["--config", "shopstream.yaml", "validate"],
                _ => &["--config", "shopstream.yaml"],
            };
            let (code, output) = run(binary, dir.path(), args, &[], Duration::from_secs(20));
            assert!(
                code.is_some_and(|c| c != 0),
                "{what}: {binary} must refuse at start, exited {code:?}:\n{output}"
            );
            // The topics command checks only the catalog.
            if binary == "shopstream-topics"
                && !settings.is_empty()
                && !message.contains("database")
            {
                continue;
            }
            assert!(
                output.contains(message),
                "{what}: {binary} says {message:?}; it said:\n{output}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_password_never_appears_in_any_output_at_trace_level() {
    let cluster = mock_cluster(1);
    let url = clickhouse().await.url();
    let dir = tempfile::tempdir().expect("dir");
    std::os::unix::fs::symlink(repo_root().join("schemas"), dir.path().join("schemas"))
        .expect("schemas");
    std::fs::copy(
        repo_root().join("topics.yaml"),
        dir.path().join("topics.yaml"),
    )
    .expect("catalog");
    // ClickHouse refuses the password (its default user has none); the
    // broker is asked for SASL it does not speak.
    for (name, kafka) in [
        ("plain", String::new()),
        ("sasl", "  client:\n    security.protocol: SASL_PLAINTEXT\n    sasl.mechanism: PLAIN\n    sasl.username: alice\n".to_owned()),
    ] {
        std::fs::write(
            dir.path().join("shopstream.yaml"),
            format!(
                "kafka:\n  bootstrap_servers: {}\n  request_timeout_ms: 2000\n{kafka}clickhouse:\n  url: {url}\n  password: {SENTINEL}\ncatalog:\n  profile: dev\nworker:\n  handlers: [events-store]\n",
                cluster.bootstrap_servers()
            ),
        )
        .expect("settings");
        let env = [
            ("RUST_LOG", "trace"),
            ("SHOPSTREAM_KAFKA__CLIENT__SASL_PASSWORD", SENTINEL),
            ("SHOPSTREAM_CLICKHOUSE__PASSWORD", SENTINEL),
        ];
        for (binary, args) in [
            ("shopstream-worker", vec!["--config", "shopstream.yaml"]),
            ("shopstream-analytics", vec!["--config", "shopstream.yaml"]),
            ("shopstream-publish", vec!["--config", "shopstream.yaml", "--count", "10"]),
            ("shopstream-topics", vec!["--config", "shopstream.yaml", "plan"]),
            ("shopstream-check", vec!["--config", "shopstream.yaml", "--start-ms", "0", "--count", "10"]),
        ] {
            let (_, output) = run(binary, dir.path(), &args, &env, Duration::from_secs(6));
            assert!(
                output.lines().count() > 5,
                "{name}: {binary} logged at trace level:\n{output}"
            );
            assert!(!output.contains(SENTINEL), "{name}: {binary} leaked the password:\n{output}");
            if name == "plain" && ["shopstream-worker", "shopstream-analytics", "shopstream-check"].contains(&binary) {
                // The password really reached ClickHouse, which refused it.
                assert!(output.contains("Wrong password"), "{binary}:\n{output}");
            }
        }
    }
}
