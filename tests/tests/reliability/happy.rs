//! Scenarios 1 and 7: a run at rate with 1% poison is exact everywhere, the
//! poison (and only it) in the DLQs with its original payload and headers;
//! and the negative control: the checker fails once a record is really
//! dropped or doubled in the end state.

use std::process::Command;
use std::time::Duration;

use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use shopstream_tests::{bin_dir, clickhouse, Broker};

use crate::{soak, Run, System};

on_both_brokers!(
    a_run_at_rate_with_poison_is_exact_and_the_checker_catches_a_drop_or_a_double:
        |broker| run_at_rate(broker)
);

async fn run_at_rate(broker: Broker) {
    let url = clickhouse().await.url();
    let system = System::new(broker, url, url, &[]).await;
    let run = Run::new(71, 6_000 * soak() as usize, 2_000.0, 0.01);
    let expected = run.expected();
    assert!(expected.poisoned.len() >= 30, "1% of the run is poison");
    let (mut worker, mut analytics) = system.consumers().await;
    system.publish_all(&run);

    let report = system
        .converge(&expected, &system.checks(), Duration::from_secs(120))
        .await;
    assert!(report.passed(), "{report}\n{}", system.logs());
    system.stop(&mut [&mut worker, &mut analytics]);
    let mut exact = system.checks();
    exact.exact_raw = true;
    let report = system.check(&expected, &exact).await;
    assert!(report.passed(), "after SIGTERM: {report}");
    assert_eq!(report.events_sent + report.events_poisoned, run.count);
    assert_eq!(
        report.rows.values().sum::<u64>() as usize,
        expected.good.len()
    );
    assert_eq!(
        report.dead_letters,
        2 * expected.poisoned.len(),
        "each poison once per group"
    );

    // The binary agrees, and says so.
    let check = |extra: &[&str]| {
        Command::new(bin_dir().join("shopstream-check"))
            .arg("--config")
            .arg(system.config_path())
            .args(run.flags())
            .args(extra)
            .env("RUST_LOG", "warn")
            .output()
            .expect("shopstream-check runs")
    };
    let passed = check(&[]);
    let stdout = String::from_utf8_lossy(&passed.stdout);
    assert!(
        passed.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&passed.stderr)
    );
    assert!(stdout.trim_end().ends_with("0 findings."), "{stdout}");

    // Negative control: drop one event row, double another, double an
    // analytics partial and a dead letter, and set an order back.
    let c = &system.client;
    let dropped = expected.good[10].event_id().to_string();
    let dropped_table = checker::table_of(&expected.good[10]);
    c.query(&format!(
        "ALTER TABLE {dropped_table} DELETE WHERE event_id = ?"
    ))
    .bind(&dropped)
    .execute()
    .await
    .expect("delete");
    let doubled = expected.good[20].event_id().to_string();
    let doubled_table = checker::table_of(&expected.good[20]);
    let columns: Vec<String> = c
        .query("SELECT name FROM system.columns WHERE database = currentDatabase() AND table = ?")
        .bind(doubled_table)
        .fetch_all()
        .await
        .expect("columns");
    let select = columns
        .iter()
        .map(|n| {
            if n == "kafka_offset" {
                "kafka_offset + 1000000000".to_owned()
            } else {
                n.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    c.query(&format!(
        "INSERT INTO {doubled_table} ({}) SELECT {select} FROM {doubled_table} WHERE event_id = ?",
        columns.join(", ")
    ))
    .bind(&doubled)
    .execute()
    .await
    .expect("double");
    c.query("INSERT INTO analytics_partials SELECT * FROM analytics_partials WHERE model = 'funnel' LIMIT 1")
        .execute()
        .await
        .expect("double a partial");
    let (order_id, version): (String, u64) = c
        .query(
            "SELECT order_id, version FROM order_status_current WHERE status != 'created' LIMIT 1",
        )
        .fetch_one()
        .await
        .expect("an order past created");
    c.query("INSERT INTO order_status SELECT order_id, user_id, 'created', currency, total_minor, items_count, updated_at, updated_at_ms, ? FROM order_status_current WHERE order_id = ?")
        .bind(version + 1)
        .bind(&order_id)
        .execute()
        .await
        .expect("set an order back");
    let dlq = system.topics.catalog.topics[0]
        .dead_letter
        .as_ref()
        .expect("a DLQ")
        .topic
        .clone();
    let letters = consumers::dlq::read_all(&system.topics.connection, &dlq).expect("DLQ");
    let letter = letters.first().expect("a dead letter");
    let mut copied = OwnedHeaders::new();
    for h in letter.headers().expect("headers").iter() {
        copied = copied.insert(Header {
            key: h.key,
            value: h.value,
        });
    }
    let producer: FutureProducer = system
        .topics
        .connection
        .client_config()
        .create()
        .expect("producer");
    producer
        .send(
            FutureRecord::to(&dlq)
                .key(letter.key().unwrap_or_default())
                .payload(letter.payload().unwrap_or_default())
                .headers(copied),
            Duration::from_secs(10),
        )
        .await
        .expect("a doubled dead letter");
    // The delete is a mutation: wait until it is applied.
    let started = std::time::Instant::now();
    while c
        .query(&format!(
            "SELECT count() FROM {dropped_table} WHERE event_id = ?"
        ))
        .bind(&dropped)
        .fetch_one::<u64>()
        .await
        .expect("count")
        > 0
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the delete applies"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let failed = check(&[]);
    let stdout = String::from_utf8_lossy(&failed.stdout);
    assert_eq!(
        failed.status.code(),
        Some(1),
        "{stdout}{}",
        String::from_utf8_lossy(&failed.stderr)
    );
    for needle in [
        format!("lost: event {dropped} is not in {dropped_table}"),
        format!("duplicate: event {doubled} is in {doubled_table} 2 times (visible to queries)"),
        "aggregate: order_funnel_per_minute".to_owned(),
        format!("order violation: order {order_id} is created"),
        "dead letter duplicate:".to_owned(),
    ] {
        assert!(
            stdout.contains(&needle),
            "the checker names {needle:?}:\n{stdout}"
        );
    }
    let json = check(&["--output", "json", "--check", "events"]);
    assert_eq!(json.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON report");
    let kinds: Vec<&str> = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter_map(|f| f["kind"].as_str())
        .collect();
    assert_eq!(
        kinds,
        ["lost", "duplicate"],
        "only the parts asked for: {report}"
    );
}
