//! shopstream-worker as deployed: a process with probes and metrics that
//! drains on SIGTERM, on tansu and on a mock cluster hosted over loopback.

#![allow(clippy::unwrap_used)]

#[macro_use]
extern crate shopstream_tests;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use backbone::catalog::Catalog;
use backbone::config::KafkaSettings;
use backbone::events::AnyEvent;
use backbone::kafka::KafkaConnection;
use producers::generator::{Generator, GeneratorConfig};
use producers::publisher::{PublishOptions, Publisher};
use shopstream_tests::{free_port, repo_root, unique_name, Broker, TestBroker};

const BIN: &str = env!("CARGO_BIN_EXE_shopstream-worker");

async fn get(port: u16, path: &str) -> Option<String> {
    bench::scrape::http_get(port, path).await
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

async fn wait_for_metric(port: u16, name: &str, at_least: f64, limit: Duration) -> String {
    let started = Instant::now();
    loop {
        if let Some(text) = get(port, "/metrics").await {
            if metric(&text, name).is_some_and(|v| v >= at_least) {
                return text;
            }
        }
        assert!(
            started.elapsed() < limit,
            "{name} did not reach {at_least} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn worker(catalog: &std::path::Path, brokers: &str, group: &str, port: u16) -> std::process::Child {
    Command::new(BIN)
        .args([
            "--brokers",
            brokers,
            "--handler",
            "noop",
            "--group",
            group,
            "--set",
        ])
        .arg(format!("catalog.path={}", catalog.display()))
        .args([
            "--set",
            &format!("worker.metrics_address=127.0.0.1:{port}"),
            "--set",
            "worker.drain_timeout_ms=5000",
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts")
}

fn sigterm(child: &std::process::Child) {
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs")
        .success());
}

on_both_brokers!(
    the_worker_process_serves_probes_drains_on_sigterm_and_resumes_where_it_stopped:
        |broker| the_worker_process_serves_probes_drains_on_sigterm_and_resumes_where_it_stopped(broker)
);

async fn the_worker_process_serves_probes_drains_on_sigterm_and_resumes_where_it_stopped(
    broker: Broker,
) {
    let kafka = TestBroker::on(broker);
    let dir = tempfile::tempdir().unwrap();
    let name = unique_name("orders");
    let path = dir.path().join("topics.yaml");
    std::fs::write(
        &path,
        format!(
            "defaults: {{partitions: 2, replication_factor: 1}}\ntopics:\n  - name: {name}\n    schema: {}/order_event\n    key: order_id\n",
            repo_root().join("schemas").display()
        ),
    )
    .unwrap();
    let catalog = Catalog::load(&path, None).unwrap();
    for topic in catalog.desired_topics() {
        kafka
            .create_topic(&topic.name, topic.partitions)
            .await
            .unwrap();
    }
    let settings = KafkaSettings {
        bootstrap_servers: kafka.bootstrap_servers().to_owned(),
        ..KafkaSettings::default()
    };
    let connection = KafkaConnection::connect(&settings, &catalog).unwrap();
    let publisher = Publisher::new(&connection, &catalog, &PublishOptions::default()).unwrap();
    let generated: Vec<_> = Generator::new(GeneratorConfig {
        seed: 21,
        mix: "order=1".parse().unwrap(),
        poison_rate: 0.05,
        ..GeneratorConfig::default()
    })
    .filter(|g| matches!(g.event, AnyEvent::Order(_)))
    .take(200)
    .collect();
    for g in &generated {
        publisher
            .enqueue_any(&g.event, g.poison, None)
            .await
            .unwrap()
            .delivered()
            .await
            .unwrap();
    }
    let poisoned = generated.iter().filter(|g| g.poison.is_some()).count() as f64;

    let group = unique_name("g");
    let port = free_port().unwrap();
    let child = worker(&path, kafka.bootstrap_servers(), &group, port);
    let started = Instant::now();
    while !get(port, "/readyz")
        .await
        .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    {
        assert!(started.elapsed() < Duration::from_secs(30), "ready in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(get(port, "/healthz")
        .await
        .unwrap()
        .starts_with("HTTP/1.1 200"));
    let text = wait_for_metric(
        port,
        "shopstream_records_handled_total",
        200.0 - poisoned,
        Duration::from_secs(60),
    )
    .await;
    let dead: f64 = text
        .lines()
        .filter(|l| l.starts_with("shopstream_records_dead_lettered_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(dead, poisoned, "{text}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sigterm(&child);
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    // The records it kept were all let go, so its close left the group.
    assert!(
        !stderr.contains("without leaving the group") && !stderr.contains("group leave"),
        "{stderr}"
    );

    // Same group again: everything was committed, nothing comes back.
    let port = free_port().unwrap();
    let again = worker(&path, kafka.bootstrap_servers(), &group, port);
    let started = Instant::now();
    while !get(port, "/readyz")
        .await
        .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    {
        assert!(started.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    let text = get(port, "/metrics").await.unwrap();
    assert_eq!(
        metric(&text, "shopstream_records_consumed_total"),
        Some(0.0),
        "nothing redelivered: {text}"
    );
    sigterm(&again);
    assert_eq!(again.wait_with_output().unwrap().status.code(), Some(0));
}

#[test]
fn bad_input_is_refused_at_start() {
    let run = |args: &[&str]| {
        let output = Command::new(BIN)
            .args(args)
            .arg("--set")
            .arg(format!(
                "catalog.path={}",
                repo_root().join("topics.yaml").display()
            ))
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, stderr) = run(&["--handler", "bogus"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("unknown handler \"bogus\"; valid: noop, log"),
        "{stderr}"
    );
    let (code, stderr) = run(&[]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("choose at least one handler"), "{stderr}");
    let (code, stderr) = run(&["--handler", "noop", "--topic", "orders.retry.5s"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("--topic: `orders.retry.5s` is not an event topic of the catalog; its event topics: user-events, orders, chat-messages, search-queries"),
        "{stderr}"
    );
    let (code, stderr) = run(&[
        "--handler",
        "noop",
        "--set",
        "worker.topics=[orders, order]",
    ]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("worker.topics: `order` is not an event topic"),
        "{stderr}"
    );
    let (code, stderr) = run(&["--handler", "noop", "--set", "worker.batch_max_records=0"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("worker.batch_max_records: must be from 1 to 100000, got 0"),
        "{stderr}"
    );
}
