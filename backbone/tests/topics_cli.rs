//! shopstream-topics as users run it: a process with flags, exit codes and
//! output, against the real broker process (tansu under scripts/test) and the
//! embedded cluster.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use shopstream_tests::{kafka, repo_root, unique_name, KafkaSource};

const BIN: &str = env!("CARGO_BIN_EXE_shopstream-topics");

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

fn topics(catalog: &Path, brokers: &str, args: &[&str]) -> Run {
    let output: Output = Command::new(BIN)
        .args(args)
        .arg("--brokers")
        .arg(brokers)
        .arg("--set")
        .arg(format!("catalog.path={}", catalog.display()))
        .arg("--set")
        .arg("kafka.request_timeout_ms=5000")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("shopstream-topics runs");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A catalog of two event topics under a fresh prefix, written to a temp dir.
struct TestCatalog {
    _dir: tempfile::TempDir,
    path: PathBuf,
    prefix: String,
}

impl TestCatalog {
    fn new(partitions: i32, extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let prefix = unique_name("p");
        let schemas = repo_root().join("schemas");
        let text = format!(
            "managed_prefixes: [{prefix}]\n{extra}defaults:\n  partitions: {partitions}\n  replication_factor: 1\ntopics:\n  - name: {prefix}-orders\n    schema: {s}/order_event\n    key: order_id\n    configs:\n      retention.ms: 86400000\n    retry:\n      tiers: [5s]\n  - name: {prefix}-chat\n    schema: {s}/chat_message\n    key: room_id\n",
            s = schemas.display()
        );
        let path = dir.path().join("topics.yaml");
        std::fs::write(&path, text).expect("writes the catalog");
        Self {
            _dir: dir,
            path,
            prefix,
        }
    }

    fn edit(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(&self.path).expect("reads the catalog");
        assert!(text.contains(from), "{from} in {text}");
        std::fs::write(&self.path, text.replace(from, to)).expect("writes the catalog");
    }

    fn names(&self) -> Vec<String> {
        let p = &self.prefix;
        vec![
            format!("{p}-orders"),
            format!("{p}-orders.retry.5s"),
            format!("{p}-orders.dlq"),
            format!("{p}-chat"),
            format!("{p}-chat.dlq"),
        ]
    }
}

/// The broker process under test; admin tests need a real one.
async fn broker() -> String {
    let kafka = kafka().await;
    assert_ne!(
        kafka.source,
        KafkaSource::Embedded,
        "these tests need a broker with an admin API: run scripts/test, or set KAFKA_BOOTSTRAP_SERVERS"
    );
    kafka.bootstrap_servers().to_owned()
}

#[test]
fn validate_is_offline_and_names_file_line_and_field() {
    let good = TestCatalog::new(3, "");
    let run = topics(&good.path, "127.0.0.1:1", &["validate"]);
    assert_eq!(run.code, 0, "{}", run.all());
    assert!(
        run.stdout
            .contains("valid: 2 event topics, 5 with retry tiers and dead-letter queues"),
        "{}",
        run.all()
    );

    let bad = TestCatalog::new(0, "");
    bad.edit("    key: room_id\n", "    key: room_id\n    colour: red\n");
    let run = topics(&bad.path, "127.0.0.1:1", &["validate"]);
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(
        run.stderr.contains(&format!(
            "{}:16: topics[1].colour: unknown field `colour`",
            bad.path.display()
        )),
        "{}",
        run.all()
    );

    let bad = TestCatalog::new(0, "");
    let run = topics(&bad.path, "127.0.0.1:1", &["validate"]);
    assert!(
        run.stderr.contains(&format!(
            "{}:3: defaults.partitions: must be from 1",
            bad.path.display()
        )),
        "{}",
        run.all()
    );

    let run = topics(
        &repo_root().join("topics.yaml"),
        "127.0.0.1:1",
        &["validate", "--profile", "prod"],
    );
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("no profile named \"prod\"; this catalog defines: dev, staging"),
        "{}",
        run.all()
    );
}

#[tokio::test]
async fn plan_apply_plan_on_a_fresh_broker() {
    let brokers = broker().await;
    let catalog = TestCatalog::new(2, "");
    let plan = topics(&catalog.path, &brokers, &["plan"]);
    assert_eq!(plan.code, 2, "{}", plan.all());
    for name in catalog.names() {
        assert!(
            plan.stdout
                .contains(&format!("+ create {name} (2 partitions")),
            "{name}: {}",
            plan.all()
        );
    }
    assert!(
        plan.stdout
            .contains("Plan: 5 to create, 0 to change, 0 to delete, 0 refused."),
        "{}",
        plan.all()
    );

    let json = topics(&catalog.path, &brokers, &["plan", "--output", "json"]);
    assert_eq!(json.code, 2);
    let parsed: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(parsed["plan"]["changes"].as_array().unwrap().len(), 5);

    let apply = topics(&catalog.path, &brokers, &["apply", "--yes"]);
    assert_eq!(apply.code, 0, "{}", apply.all());
    assert!(
        apply.stdout.contains("Applied 5 of 5 change(s)."),
        "{}",
        apply.all()
    );

    let again = topics(&catalog.path, &brokers, &["plan"]);
    assert_eq!(again.code, 0, "{}", again.all());
    assert!(again.stdout.contains("No changes"), "{}", again.all());
    let rerun = topics(&catalog.path, &brokers, &["apply", "--yes"]);
    assert_eq!(rerun.code, 0, "{}", rerun.all());
    assert!(
        !rerun.stdout.contains("Applied"),
        "a second apply does nothing: {}",
        rerun.all()
    );

    let describe = topics(&catalog.path, &brokers, &["describe"]);
    assert_eq!(describe.code, 0, "{}", describe.all());
    assert!(
        describe.stdout.contains("retention.ms=86400000"),
        "{}",
        describe.all()
    );
    let described: serde_json::Value = serde_json::from_str(
        &topics(&catalog.path, &brokers, &["describe", "--output", "json"]).stdout,
    )
    .unwrap();
    for name in catalog.names() {
        assert_eq!(
            described["topics"][&name]["partitions"]
                .as_array()
                .unwrap()
                .len(),
            2,
            "{name}"
        );
    }
}

#[tokio::test]
async fn config_drift_is_shown_key_by_key_and_applied() {
    let brokers = broker().await;
    let catalog = TestCatalog::new(1, "");
    assert_eq!(topics(&catalog.path, &brokers, &["apply", "--yes"]).code, 0);
    catalog.edit(
        "retention.ms: 86400000",
        "retention.ms: 172800000\n      segment.ms: 3600000",
    );
    let plan = topics(&catalog.path, &brokers, &["plan"]);
    assert_eq!(plan.code, 2, "{}", plan.all());
    let orders = format!("~ {}-orders: configs", catalog.prefix);
    assert!(plan.stdout.contains(&orders), "{}", plan.all());
    assert!(
        plan.stdout.contains("retention.ms: 86400000 -> 172800000"),
        "{}",
        plan.all()
    );
    assert!(plan.stdout.contains("segment.ms: "), "{}", plan.all());
    let apply = topics(&catalog.path, &brokers, &["apply", "--yes"]);
    assert_eq!(apply.code, 0, "{}", apply.all());
    let again = topics(&catalog.path, &brokers, &["plan"]);
    assert_eq!(
        again.code,
        0,
        "IncrementalAlterConfigs took effect: {}",
        again.all()
    );
}

#[tokio::test]
async fn what_kafka_cannot_do_in_place_is_refused_and_missing_apis_are_named() {
    let brokers = broker().await;
    let catalog = TestCatalog::new(2, "");
    assert_eq!(topics(&catalog.path, &brokers, &["apply", "--yes"]).code, 0);

    catalog.edit("partitions: 2", "partitions: 1");
    let plan = topics(&catalog.path, &brokers, &["plan"]);
    assert_eq!(plan.code, 1, "{}", plan.all());
    assert!(
        plan.stdout.contains(
            "has 2 partitions but the catalog asks for 1: Kafka cannot remove partitions"
        ),
        "{}",
        plan.all()
    );
    assert_eq!(topics(&catalog.path, &brokers, &["apply", "--yes"]).code, 1);

    catalog.edit("replication_factor: 1", "replication_factor: 2");
    let plan = topics(&catalog.path, &brokers, &["plan"]);
    assert!(
        plan.stdout
            .contains("replication factor 1 but the catalog asks for 2"),
        "{}",
        plan.all()
    );

    catalog.edit("partitions: 1", "partitions: 4");
    catalog.edit("replication_factor: 2", "replication_factor: 1");
    let apply = topics(&catalog.path, &brokers, &["apply", "--yes"]);
    if apply.code == 0 {
        // A broker with CreatePartitions: the partitions are there now.
        assert_eq!(
            topics(&catalog.path, &brokers, &["plan"]).code,
            0,
            "{}",
            apply.all()
        );
    } else {
        // tansu 0.6 lacks CreatePartitions: the error names the API and the broker,
        // and the report says what was done and what failed.
        assert_eq!(apply.code, 1);
        assert!(
            apply.stdout.contains(&format!(
                "FAILED  {}-orders: partitions 2 -> 4: CreatePartitions on {brokers}",
                catalog.prefix
            )),
            "{}",
            apply.all()
        );
        assert!(
            apply.stdout.contains("Applied 0 of 5 change(s)."),
            "{}",
            apply.all()
        );
        assert!(apply.stdout.contains("run apply again"), "{}", apply.all());
    }
}

#[tokio::test]
async fn deletion_needs_the_flag_and_stays_under_managed_prefixes() {
    let brokers = broker().await;
    let kafka = kafka().await;
    let catalog = TestCatalog::new(1, "");
    assert_eq!(topics(&catalog.path, &brokers, &["apply", "--yes"]).code, 0);
    let stray = format!("{}-orders.retry.30s", catalog.prefix);
    kafka.create_topic(&stray, 1).await.unwrap();
    let outsider = unique_name("outsider");
    kafka.create_topic(&outsider, 1).await.unwrap();

    let plan = topics(&catalog.path, &brokers, &["plan"]);
    assert_eq!(plan.code, 0, "{}", plan.all());
    assert!(
        plan.stdout.contains(&format!(
            "? {stray}: under a managed prefix but not in the catalog; kept"
        )),
        "{}",
        plan.all()
    );
    assert!(!plan.stdout.contains(&outsider));

    let plan = topics(&catalog.path, &brokers, &["plan", "--allow-delete"]);
    assert_eq!(plan.code, 2, "{}", plan.all());
    assert!(
        plan.stdout.contains(&format!("- delete {stray}")),
        "{}",
        plan.all()
    );
    assert!(
        !plan.stdout.contains(&outsider) && !plan.stdout.contains("__"),
        "{}",
        plan.all()
    );

    let apply = topics(
        &catalog.path,
        &brokers,
        &["apply", "--yes", "--allow-delete"],
    );
    assert_eq!(apply.code, 0, "{}", apply.all());
    let after = topics(&catalog.path, &brokers, &["plan", "--allow-delete"]);
    assert_eq!(after.code, 0, "{}", after.all());
    let describe = topics(&catalog.path, &brokers, &["describe", "--output", "json"]);
    assert!(!describe.stdout.contains(&stray), "{}", describe.all());
}

#[tokio::test]
async fn a_pinned_cluster_id_refuses_other_clusters() {
    let brokers = broker().await;
    let catalog = TestCatalog::new(1, "cluster_id: prod-eu-1\n");
    let run = topics(&catalog.path, &brokers, &["apply", "--yes"]);
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(
        run.stderr
            .contains("the catalog is pinned to cluster \"prod-eu-1\""),
        "{}",
        run.all()
    );
    assert!(run.stderr.contains("refusing to touch it"), "{}", run.all());
}

#[test]
fn an_unreachable_broker_fails_within_the_timeout() {
    let catalog = TestCatalog::new(1, "");
    let port = shopstream_tests::free_port().unwrap();
    let started = Instant::now();
    let run = topics(&catalog.path, &format!("127.0.0.1:{port}"), &["plan"]);
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(
        run.stderr
            .contains(&format!("Metadata on 127.0.0.1:{port}")),
        "{}",
        run.all()
    );
    assert!(
        run.stderr.contains("is the cluster reachable"),
        "{}",
        run.all()
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn apply_without_yes_off_a_terminal_changes_nothing() {
    let brokers = broker().await;
    let catalog = TestCatalog::new(1, "");
    let run = topics(&catalog.path, &brokers, &["apply"]);
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.stderr.contains("pass --yes"), "{}", run.all());
    assert_eq!(
        topics(&catalog.path, &brokers, &["plan"]).code,
        2,
        "nothing was created"
    );
}

#[test]
fn the_embedded_cluster_is_provisioned_through_its_own_calls() {
    let catalog = TestCatalog::new(2, "");
    let plan = topics(&catalog.path, "embedded://", &["plan"]);
    assert_eq!(plan.code, 2, "{}", plan.all());
    assert!(
        plan.stderr
            .contains("embedded:// is an in-process mock cluster without an admin API"),
        "{}",
        plan.all()
    );
    let apply = topics(&catalog.path, "embedded://", &["apply", "--yes"]);
    assert_eq!(apply.code, 0, "{}", apply.all());
    assert!(
        apply.stdout.contains("Applied 5 of 5 change(s)."),
        "{}",
        apply.all()
    );
}

#[test]
fn serve_hosts_the_provisioned_catalog_for_other_processes_until_sigterm() {
    use rdkafka::consumer::{BaseConsumer, Consumer};

    let catalog = TestCatalog::new(2, "");
    let dir = tempfile::tempdir().expect("temp dir");
    let address_file = dir.path().join("kafka.address");
    let mut child = Command::new(BIN)
        .args(["serve", "--address-file"])
        .arg(&address_file)
        .arg("--set")
        .arg(format!("catalog.path={}", catalog.path.display()))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("shopstream-topics serve runs");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !address_file.exists() {
        assert!(Instant::now() < deadline, "no address file within 30 s");
        assert!(child.try_wait().unwrap().is_none(), "serve exited early");
        std::thread::sleep(Duration::from_millis(50));
    }
    let address = std::fs::read_to_string(&address_file).unwrap();
    let address = address.trim();
    assert!(address.starts_with("127.0.0.1:"), "{address}");

    // Another process sees every catalog topic with its partitions.
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", address)
        .set("group.id", "serve-test")
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata from the served cluster");
    let mut seen: Vec<(String, usize)> = metadata
        .topics()
        .iter()
        .map(|t| (t.name().to_owned(), t.partitions().len()))
        .collect();
    seen.sort();
    let mut expected: Vec<(String, usize)> = catalog.names().into_iter().map(|n| (n, 2)).collect();
    expected.sort();
    assert_eq!(seen, expected);

    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let output = child.wait_with_output().expect("serve exits");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{:?}: {stdout}", output.status);
    assert!(stdout.contains("Applied 5 of 5 change(s)."), "{stdout}");
    assert!(
        stdout.contains(&format!("Embedded Kafka serving at {address}")),
        "{stdout}"
    );
    assert!(stdout.contains("Embedded Kafka stopped."), "{stdout}");
}

#[test]
fn serve_refuses_a_real_cluster() {
    let catalog = TestCatalog::new(1, "");
    let run = topics(&catalog.path, "127.0.0.1:9092", &["serve"]);
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(
        run.stderr.contains(
            "serve hosts the embedded cluster; kafka.bootstrap_servers is \"127.0.0.1:9092\""
        ),
        "{}",
        run.all()
    );
}
