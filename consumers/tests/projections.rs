//! Kafka (each scenario on tansu and on the mock cluster) ->
//! shopstream-worker -> ClickHouse (18.16 here): the events store
//! and order-status projections are exact after SIGKILL and restart, after
//! ClickHouse goes away and comes back, and with malformed rows, which reach
//! the DLQ and come back through `dlq replay` (with its loop guard).

#[macro_use]
extern crate shopstream_tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backbone::config::{ClickHouseSettings, KafkaSettings, WorkerSettings};
use backbone::events::{AnyEvent, EventType, OrderEvent};
use backbone::headers;
use backbone::kafka::KafkaConnection;
use backbone::shutdown::Shutdown;
use consumers::builtin::Chain;
use consumers::metrics::Metrics;
use consumers::projection::rows::OrderStatusRow;
use consumers::projection::{Projection, Projections};
use consumers::routes::Routes;
use producers::generator::{Generator, GeneratorConfig};
use producers::publisher::{PublishOptions, Publisher};
use shopstream_tests::{
    clickhouse, clickhouse_client, free_port, header, terminate, unique_name, Broker, Children,
    EventTopics, StoppableClickHouse, TestDatabase,
};

const BIN: &str = env!("CARGO_BIN_EXE_shopstream-worker");

/// The event topics with a 1 s retry tier and a DLQ each, on `broker`.
fn setup(broker: Broker) -> EventTopics {
    EventTopics::on(broker, "    retry: {tiers: [1s]}\n")
}

async fn publish(setup: &EventTopics, events: &[AnyEvent]) {
    Publisher::new(
        &setup.connection,
        &setup.catalog,
        &PublishOptions::default(),
    )
    .expect("publisher")
    .publish_all(events.iter().map(|e| (e, None)))
    .await
    .expect("delivered");
}

fn generate(seed: u64, n: usize) -> Vec<AnyEvent> {
    Generator::new(GeneratorConfig {
        seed,
        ..GeneratorConfig::default()
    })
    .take(n)
    .map(|g| g.event)
    .collect()
}

fn clickhouse_settings(url: &str, database: &str) -> ClickHouseSettings {
    ClickHouseSettings {
        url: url.to_owned(),
        database: database.to_owned(),
        insert_period_ms: 200,
        timeout_ms: 5_000,
        ..ClickHouseSettings::default()
    }
}

/// A worker process running both projections (killed when dropped).
fn worker_process(setup: &EventTopics, db: &TestDatabase, group: &str) -> Children {
    let child = Command::new(BIN)
        .args([
            "--brokers",
            setup.bootstrap_servers(),
            "--handler",
            "events-store",
            "--handler",
            "order-status",
            "--group",
            group,
        ])
        .arg("--set")
        .arg(format!("catalog.path={}", setup.catalog_path().display()))
        .args([
            "--set",
            &format!("clickhouse.url={}", db.url),
            "--set",
            &format!("clickhouse.database={}", db.name),
        ])
        .args([
            "--set",
            "clickhouse.insert_period_ms=200",
            "--set",
            "worker.commit_interval_ms=200",
        ])
        .args([
            "--set",
            &format!(
                "worker.metrics_address=127.0.0.1:{}",
                free_port().expect("port")
            ),
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("worker starts");
    Children(vec![child])
}

/// (rows, distinct event ids) per events-store table.
async fn counts(client: &clickhouse::Client) -> BTreeMap<&'static str, (u64, u64)> {
    let mut out = BTreeMap::new();
    for table in [
        "user_events",
        "order_events",
        "chat_messages",
        "search_queries",
    ] {
        let found = client
            .query(&format!(
                "SELECT count(), uniqExact(event_id) FROM `{table}`"
            ))
            .fetch_one::<(u64, u64)>()
            .await
            .unwrap_or((0, 0));
        out.insert(table, found);
    }
    out
}

fn table_of(event: &AnyEvent) -> &'static str {
    match event {
        AnyEvent::User(_) => "user_events",
        AnyEvent::Order(_) => "order_events",
        AnyEvent::Chat(_) => "chat_messages",
        AnyEvent::Search(_) => "search_queries",
    }
}

/// Records published per table (every Kafka record is one row).
fn expected_counts(published: &[AnyEvent]) -> BTreeMap<&'static str, (u64, u64)> {
    let mut rows: BTreeMap<&str, u64> = [
        "user_events",
        "order_events",
        "chat_messages",
        "search_queries",
    ]
    .into_iter()
    .map(|t| (t, 0))
    .collect();
    let mut ids: HashMap<&str, HashSet<uuid::Uuid>> = HashMap::new();
    for event in published {
        *rows.get_mut(table_of(event)).expect("table") += 1;
        ids.entry(table_of(event))
            .or_default()
            .insert(event.event_id());
    }
    rows.into_iter()
        .map(|(t, n)| (t, (n, ids.get(t).map_or(0, |s| s.len() as u64))))
        .collect()
}

/// The order-status read model recomputed from the events: per order, the
/// event with the highest (event time, lifecycle rank).
fn expected_status(published: &[AnyEvent]) -> Vec<OrderStatusRow> {
    let mut latest: BTreeMap<&str, &OrderEvent> = BTreeMap::new();
    for event in published {
        if let AnyEvent::Order(order) = event {
            let slot = latest.entry(&order.order_id).or_insert(order);
            if OrderStatusRow::version(order) > OrderStatusRow::version(slot) {
                *slot = order;
            }
        }
    }
    latest
        .values()
        .map(|o| OrderStatusRow::from_event(o).expect("valid"))
        .collect()
}

async fn actual_status(client: &clickhouse::Client) -> Vec<OrderStatusRow> {
    client
        .query("SELECT ?fields FROM order_status_current ORDER BY order_id")
        .fetch_all::<OrderStatusRow>()
        .await
        .expect("order status query")
}

/// Order status rows land one flush after the events' rows: wait for them.
async fn assert_status_converges(client: &clickhouse::Client, published: &[AnyEvent]) {
    let expected = expected_status(published);
    let started = Instant::now();
    loop {
        let actual = actual_status(client).await;
        if actual == expected || started.elapsed() > Duration::from_secs(30) {
            assert_eq!(actual.len(), expected.len());
            assert_eq!(actual, expected, "order status equals the recomputation");
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn wait_for_counts(
    client: &clickhouse::Client,
    expected: &BTreeMap<&'static str, (u64, u64)>,
    limit: Duration,
) {
    let started = Instant::now();
    loop {
        let found = counts(client).await;
        if expected
            .iter()
            .all(|(t, (rows, _))| found.get(t).is_some_and(|f| f.0 >= *rows))
        {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "rows did not arrive within {limit:?}: {found:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Lifecycle events again, oldest first: each arrives late and twice.
fn late_repeats(events: &[AnyEvent], n: usize) -> Vec<AnyEvent> {
    events
        .iter()
        .filter(|e| matches!(e, AnyEvent::Order(o) if o.status == backbone::events::OrderStatus::Created))
        .take(n)
        .cloned()
        .collect()
}

on_both_brokers!(
    projections_are_exact_after_sigkill_restart_late_and_repeated_events:
        |broker| projections_are_exact_after_sigkill_restart_late_and_repeated_events(broker)
);

async fn projections_are_exact_after_sigkill_restart_late_and_repeated_events(broker: Broker) {
    let setup = setup(broker);
    let db = clickhouse().await.database().await.expect("database");
    let mut published = generate(11, 3_000);
    publish(&setup, &published).await;
    let group = unique_name("projections");
    let first = worker_process(&setup, &db, &group);
    let started = Instant::now();
    while counts(&db.client).await.values().map(|c| c.0).sum::<u64>() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no rows within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(first); // SIGKILL

    let more = generate(12, 2_000);
    let late = late_repeats(&published, 50);
    publish(&setup, &more).await;
    publish(&setup, &late).await;
    published.extend(more);
    published.extend(late);
    let mut second = worker_process(&setup, &db, &group);
    let expected = expected_counts(&published);
    wait_for_counts(&db.client, &expected, Duration::from_secs(120)).await;
    // A moment for anything that would arrive twice.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        counts(&db.client).await,
        expected,
        "(rows, distinct events) per table: no loss, no duplicate row even in the raw tables"
    );
    assert_status_converges(&db.client, &published).await;
    assert!(terminate(
        &mut second.0[0],
        Duration::from_secs(60),
        "the restarted worker"
    )
    .success());
}

struct InProcess {
    shutdown: Shutdown,
    metrics: Arc<Metrics>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn worker_settings(group: &str) -> WorkerSettings {
    WorkerSettings {
        group_id: group.to_owned(),
        batch_linger_ms: 10,
        retry_attempts: 2,
        retry_base_delay_ms: 20,
        retry_max_delay_ms: 50,
        commit_interval_ms: 200,
        drain_timeout_ms: 5_000,
        ..WorkerSettings::default()
    }
}

async fn start_in_process(
    setup: &EventTopics,
    clickhouse: ClickHouseSettings,
    group: &str,
) -> InProcess {
    let shutdown = Shutdown::new();
    let metrics = Arc::new(Metrics::default());
    let settings = worker_settings(group);
    let connection = KafkaConnection::connect(
        &KafkaSettings {
            bootstrap_servers: setup.bootstrap_servers().to_owned(),
            ..KafkaSettings::default()
        },
        &setup.catalog,
    )
    .expect("connects");
    let routes = Routes::new(&setup.catalog, &[]).expect("every topic");
    let (s, m) = (shutdown.clone(), metrics.clone());
    let task = tokio::spawn(async move {
        let projections = Projections::start(
            &clickhouse,
            &[Projection::EventsStore, Projection::OrderStatus],
            settings.concurrency,
            m.clone(),
            &s,
        )
        .await?;
        let chain = Chain {
            builtins: Vec::new(),
            projections: Some(Arc::new(projections)),
        };
        consumers::runtime::run(
            &connection,
            &settings,
            routes,
            chain,
            m,
            Arc::new(AtomicBool::new(false)),
            s,
        )
        .await?;
        Ok(())
    });
    InProcess {
        shutdown,
        metrics,
        task,
    }
}

impl InProcess {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("drains in time")
            .expect("joins")
            .expect("runs cleanly");
    }
}

on_both_brokers!(
    clickhouse_stopped_then_started_loses_nothing:
        |broker| clickhouse_stopped_then_started_loses_nothing(broker)
);

async fn clickhouse_stopped_then_started_loses_nothing(broker: Broker) {
    let setup = setup(broker);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = StoppableClickHouse::start(&dir.path().join("clickhouse"));
    server.ready().await;
    let settings = clickhouse_settings(&server.url(), "outage");
    let client = clickhouse_client(&server.url()).with_database("outage");
    let worker = start_in_process(&setup, settings, &unique_name("outage")).await;
    let mut published = generate(21, 1_000);
    publish(&setup, &published).await;
    wait_for_counts(
        &client,
        &expected_counts(&published),
        Duration::from_secs(60),
    )
    .await;

    server.stop();
    let during = generate(22, 1_000);
    publish(&setup, &during).await;
    published.extend(during);
    // The worker keeps fetching and retrying; nothing may be committed past
    // what ClickHouse stored. Let it fail for a while.
    tokio::time::sleep(Duration::from_secs(4)).await;
    server.resume();
    server.ready().await;
    let expected = expected_counts(&published);
    wait_for_counts(&client, &expected, Duration::from_secs(90)).await;
    assert_eq!(counts(&client).await, expected);
    assert_status_converges(&client, &published).await;
    assert_eq!(
        worker.metrics.dead_lettered_count("malformed_row"),
        0,
        "an outage is not the data's fault"
    );
    assert!(
        worker.metrics.clickhouse_insert_failures.get() > 0,
        "the failed attempts were counted (what the inserts-failing alert reads)"
    );
    worker.stop().await;
}

on_both_brokers!(
    the_end_of_a_burst_is_stored_at_once_not_after_the_insert_period:
        |broker| the_end_of_a_burst_is_stored_at_once_not_after_the_insert_period(broker)
);

/// The insert period is a ceiling, not a delay: when every partition that
/// holds records waits on the insert (here 12 partitions, fewer than the
/// runtime's 16 slots), nothing more can arrive and the rows go at once.
/// With a ten-minute period only that rule can store them in time.
async fn the_end_of_a_burst_is_stored_at_once_not_after_the_insert_period(broker: Broker) {
    let setup = setup(broker);
    let db = clickhouse().await.database().await.expect("database");
    let settings = ClickHouseSettings {
        insert_period_ms: 600_000,
        ..clickhouse_settings(&db.url, &db.name)
    };
    let worker = start_in_process(&setup, settings, &unique_name("burst")).await;
    let mut published = Vec::new();
    for seed in [61, 62] {
        let burst = generate(seed, 300);
        publish(&setup, &burst).await;
        published.extend(burst);
        wait_for_counts(
            &db.client,
            &expected_counts(&published),
            Duration::from_secs(60),
        )
        .await;
        // Every partition task has handed its records over and waits for
        // more: none is counted busy, or the next burst would wait.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let busy = worker.metrics.busy_partitions.get();
            if busy == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{busy} partition tasks counted busy with nothing to do"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(counts(&db.client).await, expected_counts(&published));
    worker.stop().await;
}

fn dlq_run(setup: &EventTopics, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(BIN)
        .args(["dlq"])
        .args(args)
        .args(["--brokers", setup.bootstrap_servers(), "--set"])
        .arg(format!("catalog.path={}", setup.catalog_path().display()))
        .env("RUST_LOG", "warn")
        .output()
        .expect("runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `dlq replay` of the order topic's DLQ; its summary line.
fn replay(setup: &EventTopics, since: &str, max_replays: u32, dry_run: bool) -> String {
    let topic = setup.topic(EventType::Order).to_owned();
    let max = format!("worker.max_replays={max_replays}");
    let mut args = vec!["replay", "--topic", &topic, "--since", since, "--set", &max];
    if dry_run {
        args.push("--dry-run");
    }
    dlq_cli(setup, &args)
}

fn dlq_cli(setup: &EventTopics, args: &[&str]) -> String {
    let (ok, stdout, stderr) = dlq_run(setup, args);
    assert!(ok, "dlq {args:?} failed: {stdout}{stderr}");
    stdout
}

async fn dead_letters(setup: &EventTopics, count: usize) -> Vec<rdkafka::message::OwnedMessage> {
    let topic = consumers::dlq::dead_letter_topic(&setup.catalog, setup.topic(EventType::Order));
    let started = Instant::now();
    loop {
        let records = consumers::dlq::read_all(&setup.connection, &topic).unwrap_or_default();
        if records.len() >= count {
            return records;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{} of {count} dead letters",
            records.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

on_both_brokers!(
    malformed_rows_go_to_the_dlq_and_replay_brings_them_back_once_fixed:
        |broker| malformed_rows_go_to_the_dlq_and_replay_brings_them_back_once_fixed(broker)
);

async fn malformed_rows_go_to_the_dlq_and_replay_brings_them_back_once_fixed(broker: Broker) {
    let setup = setup(broker);
    let db = clickhouse().await.database().await.expect("database");
    let worker = start_in_process(
        &setup,
        clickhouse_settings(&db.url, &db.name),
        &unique_name("dlq"),
    )
    .await;
    // Wait for the migrations, then make ClickHouse refuse one currency.
    let started = Instant::now();
    while db.client.query("ALTER TABLE order_events ADD COLUMN guard UInt8 MATERIALIZED throwIf(currency = 'XXX')").execute().await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "migrations did not run");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut events: Vec<AnyEvent> = generate(31, 600)
        .into_iter()
        .filter(|e| matches!(e, AnyEvent::Order(_)))
        .collect();
    let mut refused = HashSet::new();
    for event in events.iter_mut().step_by(40) {
        if let AnyEvent::Order(order) = event {
            order.currency = "XXX".into();
            refused.insert(order.event_id);
        }
    }
    publish(&setup, &events).await;
    let dead = dead_letters(&setup, refused.len()).await;
    assert_eq!(
        dead.len(),
        refused.len(),
        "each refused row dead-lettered once"
    );
    for message in &dead {
        assert_eq!(header(message, headers::ERROR_CLASS), Some("malformed_row"));
        assert!(
            header(message, headers::ERROR_MESSAGE).is_some_and(|m| m.contains("throwIf")),
            "{:?}",
            header(message, headers::ERROR_MESSAGE)
        );
        assert_eq!(
            header(message, headers::ORIGINAL_TOPIC),
            Some(setup.topic(EventType::Order))
        );
    }
    let good = (events.len() - refused.len()) as u64;
    wait_for_counts(
        &db.client,
        &BTreeMap::from([("order_events", (good, good))]),
        Duration::from_secs(60),
    )
    .await;

    let order_topic = setup.topic(EventType::Order).to_owned();
    let listed = dlq_cli(&setup, &["list", "--topic", &order_topic]);
    assert!(
        listed.contains("malformed_row") && listed.contains(&format!(" {}\n", refused.len())),
        "{listed}"
    );
    let shown = dlq_cli(&setup, &["show", "--topic", &order_topic, "--limit", "1"]);
    assert!(
        shown.contains("\"currency\":\"XXX\"") && shown.contains("error-class: malformed_row"),
        "{shown}"
    );

    // Replayed while still refused: back in the DLQ with replay-count 1, and
    // the loop guard (max_replays 1) refuses them the next time.
    let before = consumers::forward::now_ms();
    let replayed = dlq_cli(
        &setup,
        &[
            "replay",
            "--topic",
            &order_topic,
            "--set",
            "worker.max_replays=1",
        ],
    );
    assert!(
        replayed.contains(&format!("replayed {} record(s)", refused.len())),
        "{replayed}"
    );
    let dead = dead_letters(&setup, 2 * refused.len()).await;
    assert_eq!(
        dead.iter()
            .filter(|m| header(m, headers::REPLAY_COUNT) == Some("1"))
            .count(),
        refused.len()
    );
    let since = before.to_string();
    let guarded = replay(&setup, &since, 1, false);
    assert!(
        guarded.contains("replayed 0 record(s)")
            && guarded.contains(&format!("refused {}", refused.len())),
        "{guarded}"
    );

    // Fixed: ClickHouse takes the rows now; a replay lands them exactly once.
    db.client
        .query("ALTER TABLE order_events DROP COLUMN guard")
        .execute()
        .await
        .expect("drop guard");
    let dry = replay(&setup, &since, 2, true);
    assert!(
        dry.contains(&format!("would replay {} record(s)", refused.len())),
        "{dry}"
    );
    replay(&setup, &since, 2, false);
    let all = events.len() as u64;
    wait_for_counts(
        &db.client,
        &BTreeMap::from([("order_events", (all, all))]),
        Duration::from_secs(60),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(counts(&db.client).await["order_events"], (all, all));
    worker.stop().await;

    // Bad input: named, with what would be valid.
    let (ok, _, stderr) = dlq_run(&setup, &["list", "--topic", "no-such-topic"]);
    assert!(
        !ok && stderr.contains("topic no-such-topic does not exist on the cluster"),
        "{stderr}"
    );
    let (ok, _, stderr) = dlq_run(
        &setup,
        &["replay", "--topic", &order_topic, "--since", "yesterday"],
    );
    assert!(
        !ok && stderr.contains("neither epoch milliseconds nor an age such as 90s, 30m, 2h or 1d"),
        "{stderr}"
    );
}

/// `n` generated events as the records of partition 0 of `topic`, at
/// offsets 0 to `n - 1`.
fn partition_records(topic: &str, seed: u64, n: usize) -> Vec<consumers::handler::Record> {
    generate(seed, n)
        .into_iter()
        .enumerate()
        .map(|(i, event)| consumers::handler::Record {
            topic: Arc::from(topic),
            partition: 0,
            offset: i as i64,
            key: None,
            event,
            attempts: 0,
        })
        .collect()
}

/// The idempotence the events store relies on, shown directly: the same
/// batch handled twice (a replay after a crash before the commit) adds no
/// row, and a replay that overlaps new records adds only the new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_batch_adds_no_rows() {
    use consumers::handler::{Handler, Outcome};
    let db = clickhouse().await.database().await.expect("database");
    let projections = Projections::start(
        &clickhouse_settings(&db.url, &db.name),
        &[Projection::EventsStore, Projection::OrderStatus],
        1,
        Arc::default(),
        &Shutdown::new(),
    )
    .await
    .expect("starts");
    let records = partition_records("replayed", 41, 300);
    let first = projections.handle(&records[..200]).await;
    assert!(first.iter().all(|o| *o == Outcome::Done), "{first:?}");
    let before = counts(&db.client).await;
    assert_eq!(before.values().map(|c| c.0).sum::<u64>(), 200);
    assert!(projections
        .handle(&records[..200])
        .await
        .iter()
        .all(|o| *o == Outcome::Done));
    assert_eq!(counts(&db.client).await, before, "replay added nothing");
    assert!(projections
        .handle(&records[150..])
        .await
        .iter()
        .all(|o| *o == Outcome::Done));
    let after = counts(&db.client).await;
    assert_eq!(
        after,
        expected_counts(&records.iter().map(|r| r.event.clone()).collect::<Vec<_>>())
    );
    assert_status_converges(
        &db.client,
        &records.iter().map(|r| r.event.clone()).collect::<Vec<_>>(),
    )
    .await;
}

/// A partition's next rows, past what the writer stored itself, are not
/// looked up again; once a rebalance has let another worker write the
/// partition, they are, and what that worker stored is not stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_another_worker_stored_during_a_rebalance_are_not_stored_twice() {
    use consumers::handler::{Handler, Outcome, Record};
    let db = clickhouse().await.database().await.expect("database");
    let start = |metrics: Arc<Metrics>| {
        let settings = clickhouse_settings(&db.url, &db.name);
        async move {
            Projections::start(
                &settings,
                &[Projection::EventsStore],
                1,
                metrics,
                &Shutdown::new(),
            )
            .await
            .expect("starts")
        }
    };
    let ours = Arc::new(Metrics::default());
    let (worker, other) = (start(ours.clone()).await, start(Arc::default()).await);
    let records = partition_records("moved", 43, 400);
    let events = |records: &[Record]| records.iter().map(|r| r.event.clone()).collect::<Vec<_>>();
    let all_done = |outcomes: Vec<Outcome>| outcomes.iter().all(|o| *o == Outcome::Done);
    assert!(all_done(worker.handle(&records[..100]).await));
    let first = ours.position_lookups.get();
    assert!((1..=4).contains(&first), "one per table: {first}");
    for batch in records[100..300].chunks(50) {
        assert!(all_done(worker.handle(batch).await));
    }
    assert_eq!(
        ours.position_lookups.get(),
        first,
        "the partition's later batches were not looked up"
    );
    // The partition moves to the other worker, which stores some rows
    // without committing them, and comes back: its first batch ends before
    // the other worker's rows do.
    ours.revoked_partitions.inc();
    assert!(all_done(other.handle(&records[300..350]).await));
    ours.rebalances.inc();
    for batch in [&records[300..320], &records[320..]] {
        assert!(all_done(worker.handle(batch).await));
    }
    assert!(ours.position_lookups.get() > first, "looked up again");
    assert_eq!(counts(&db.client).await, expected_counts(&events(&records)));
}
