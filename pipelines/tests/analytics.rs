//! shopstream-analytics against a real ClickHouse (18.16 here) and Kafka
//! (each scenario on tansu and on the mock cluster, reached over loopback
//! by the job's process): every read
//! model equals the same aggregates computed here from the produced events,
//! also after the job is SIGKILLed several times mid-run and while ClickHouse
//! goes away and comes back; poison events go to their DLQ once; late and
//! out-of-order events land in their windows, or in the late topic.

#[macro_use]
extern crate shopstream_tests;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use backbone::events::AnyEvent;
use checker::read_models::ReadModels;
use producers::generator::{Generator, GeneratorConfig};
use producers::publisher::{PublishOptions, Publisher};
use shopstream_tests::{
    clickhouse, free_port, terminate, unique_name, Broker, EventTopics, StoppableClickHouse,
    TestDatabase,
};

const BIN: &str = env!("CARGO_BIN_EXE_shopstream-analytics");
const MINUTE: i64 = 60_000;

/// The event topics with a DLQ each, and the late-events topic, on `broker`.
fn setup(broker: Broker) -> EventTopics {
    let setup = EventTopics::on(broker, "");
    setup.create_topic("late-events", 1);
    setup
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

/// The job as its own process, writing to `db`.
fn start_job(setup: &EventTopics, db: &TestDatabase, extra: &[&str]) -> Job {
    let metrics_port = free_port().expect("port");
    let child = Command::new(BIN)
        .args(["--brokers", setup.bootstrap_servers(), "--set"])
        .arg(format!("catalog.path={}", setup.catalog_path().display()))
        .args([
            "--set",
            &format!("clickhouse.url={}", db.url),
            "--set",
            &format!("clickhouse.database={}", db.name),
        ])
        .args([
            "--set",
            // A group per database: on a real broker every test's jobs
            // would otherwise share the default group (and a restart keeps it).
            &format!("analytics.group_id=analytics-{}", db.name),
            "--set",
            "analytics.flush_interval_ms=200",
            // Hours compacted as soon as flushed, over and over while the
            // test writes: every read of an hour meets compactions.
            "--set",
            "analytics.compact_every_ms=300",
            "--set",
            "analytics.compact_after_idle_ms=0",
            "--set",
            "analytics.compact_minutes_after_idle_ms=0",
            // The tests' events are older than the default 48 hours.
            "--set",
            "analytics.compact_lookback_h=1000000",
            "--set",
            &format!("analytics.metrics_address=127.0.0.1:{metrics_port}"),
        ])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("job starts");
    Job {
        child,
        metrics_port,
    }
}

/// The job's process; killed if a failing test leaves it behind.
struct Job {
    child: Child,
    metrics_port: u16,
}

impl Job {
    async fn metric(&self, name: &str) -> f64 {
        bench::scrape::metric(self.metrics_port, name)
            .await
            .unwrap_or_else(|| panic!("{name} in /metrics"))
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn generate(seed: u64, n: usize, start_ms: i64) -> Vec<AnyEvent> {
    Generator::new(GeneratorConfig {
        seed,
        start_ms,
        spacing_ms: 60.0,
        ..GeneratorConfig::default()
    })
    .take(n)
    .map(|g| g.event)
    .collect()
}

async fn stored_offsets(db: &TestDatabase) -> BTreeMap<(String, i32), i64> {
    pipelines::store::stored_offsets(&db.client, Duration::from_secs(30))
        .await
        .unwrap_or_default()
        .into_iter()
        .collect()
}

async fn wait_caught_up(setup: &EventTopics, db: &TestDatabase, limit: Duration) {
    let ends = setup.ends();
    let started = Instant::now();
    loop {
        let stored = stored_offsets(db).await;
        if ends
            .iter()
            .all(|(k, end)| stored.get(k).is_some_and(|s| s >= end))
        {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "the job did not catch up within {limit:?}: stored {stored:?}, ends {ends:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until every hour with partials has a compaction covering all of
/// its flushes (the job compacts every 300 ms in these tests).
async fn wait_compacted(db: &TestDatabase) {
    let started = Instant::now();
    loop {
        let (hours, compacted): (u64, u64) = db
            .client
            .query(
                "SELECT count(), countIf((hour, n) IN (SELECT toUInt32(window_start), covered FROM analytics_hours)) \
                 FROM (SELECT toUInt32(toStartOfHour(window_start)) AS hour, count() AS n FROM analytics_partials \
                 WHERE model = '_window' GROUP BY hour)",
            )
            .fetch_one()
            .await
            .expect("compactions");
        if hours > 0 && compacted == hours {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{compacted} of {hours} hours compacted within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn sigterm(job: &mut Job) {
    assert!(
        terminate(&mut job.child, Duration::from_secs(60), "the analytics job").success(),
        "drains and exits 0"
    );
}

/// The read models recomputed independently (the checker's).
fn expected(events: &[AnyEvent]) -> ReadModels {
    ReadModels::compute(events)
}

async fn actual(db: &TestDatabase, view: &str) -> ReadModels {
    ReadModels::read(&db.client, view)
        .await
        .expect("read models")
}

on_both_brokers!(
    read_models_equal_an_independent_computation_after_repeated_sigkills:
        |broker| read_models_equal_an_independent_computation_after_repeated_sigkills(broker)
);

async fn read_models_equal_an_independent_computation_after_repeated_sigkills(broker: Broker) {
    let setup = setup(broker);
    let db = clickhouse().await.database().await.expect("database");
    let start = 1_763_000_000_000;
    let mut published = Vec::new();
    let mut job = start_job(&setup, &db, &[]);
    for round in 0..3u64 {
        let events = generate(50 + round, 2_500, start + round as i64 * 2_500 * 60);
        publish(&setup, &events).await;
        published.extend(events);
        // Let it store something, then kill it without warning.
        let before = stored_offsets(&db).await;
        let started = Instant::now();
        while stored_offsets(&db).await == before {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no flush within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(100 * round)).await;
        job.child.kill().expect("SIGKILL");
        job.child.wait().expect("reaped");
        job = start_job(&setup, &db, &[]);
    }
    wait_caught_up(&setup, &db, Duration::from_secs(120)).await;
    let want = expected(&published);
    let got = actual(&db, "per_minute").await;
    assert_eq!(got.funnel, want.funnel, "funnel");
    assert_eq!(got.orders, want.orders, "orders per category and currency");
    assert_eq!(got.users, want.users, "active users");
    assert_eq!(got.chat, want.chat, "chat rooms");
    assert_eq!(got.search, want.search, "searches");
    assert_eq!(got.queries, want.queries, "search queries");
    assert!(
        want.funnel.len() >= 5,
        "several windows: {:?}",
        want.funnel.keys()
    );
    let top = checker::read_models::read_top_queries(&db.client)
        .await
        .expect("top queries");
    let want_top = want.top_queries();
    assert_eq!(top, want_top, "top queries per window");
    wait_compacted(&db).await;
    // Counted by whichever run compacted last: this one, or one killed.
    job.metric("shopstream_analytics_hours_compacted_total")
        .await;
    assert_eq!(
        actual(&db, "per_hour").await,
        ReadModels::hourly(&published),
        "hours, from their compaction"
    );

    let report = shopstream_tests::succeeds(
        Command::new(BIN)
            .args(["report", "--since", "0", "--output", "json", "--set"])
            .arg(format!("clickhouse.url={}", db.url))
            .args(["--set", &format!("clickhouse.database={}", db.name)]),
        "report runs",
    );
    let report: pipelines::report::Report =
        serde_json::from_slice(&report.stdout).expect("JSON report");
    assert_eq!(
        report.funnel.created,
        want.funnel.values().map(|f| f[0]).sum::<i64>()
    );
    assert_eq!(
        report.revenue.iter().map(|r| r.revenue_minor).sum::<i64>(),
        want.orders.values().map(|o| o.2).sum::<i64>()
    );
    assert_eq!(
        report.searches.searches,
        want.search.values().map(|s| s.0).sum::<i64>()
    );
    sigterm(&mut job);
}

on_both_brokers!(
    late_and_out_of_order_events_land_in_their_windows_or_the_late_topic:
        |broker| late_and_out_of_order_events_land_in_their_windows_or_the_late_topic(broker)
);

async fn late_and_out_of_order_events_land_in_their_windows_or_the_late_topic(broker: Broker) {
    let setup = setup(broker);
    let db = clickhouse().await.database().await.expect("database");
    let start = 1_763_000_000_000;
    // In order, then a straggler 90 s behind (later than the 30 s allowed),
    // then one 10 s behind (out of order but within the lateness).
    let mut events = generate(70, 200, start + 10 * MINUTE);
    let mut straggler = generate(71, 1, start)[0].clone();
    let mut within = generate(72, 1, start)[0].clone();
    let newest = events
        .iter()
        .map(AnyEvent::occurred_at)
        .max()
        .expect("events");
    set_time(&mut straggler, newest - 90_000);
    set_time(&mut within, newest - 10_000);
    events.push(straggler.clone());
    events.push(within.clone());
    // Every event in one partition's order: one key.
    for e in &mut events {
        set_key(e);
    }
    publish(&setup, &events).await;

    let mut job = start_job(&setup, &db, &[]);
    wait_caught_up(&setup, &db, Duration::from_secs(60)).await;
    assert_eq!(
        actual(&db, "per_minute").await.funnel,
        expected(&events).funnel,
        "added to their own windows"
    );
    sigterm(&mut job);

    // Divert: a fresh database, so the job starts from the beginning again.
    let db = clickhouse().await.database().await.expect("database");
    let late_topic = unique_name("late-events");
    setup.create_topic(&late_topic, 1);
    let mut job = start_job(
        &setup,
        &db,
        &[
            "--set",
            "analytics.late_events=divert",
            "--set",
            &format!("analytics.late_topic={late_topic}"),
        ],
    );
    wait_caught_up(&setup, &db, Duration::from_secs(60)).await;
    let kept: Vec<AnyEvent> = events
        .iter()
        .filter(|e| e.event_id() != straggler.event_id())
        .cloned()
        .collect();
    assert_eq!(
        actual(&db, "per_minute").await.funnel,
        expected(&kept).funnel,
        "the straggler left out"
    );
    let late = shopstream_tests::consume(
        setup.bootstrap_servers(),
        &[&late_topic],
        1,
        Duration::from_secs(30),
    )
    .await
    .expect("late topic");
    assert_eq!(
        shopstream_tests::header(&late[0], backbone::headers::ERROR_CLASS),
        Some("late_event")
    );
    sigterm(&mut job);
}

on_both_brokers!(
    poison_events_go_to_their_dlq_once_and_the_rest_is_counted_exactly:
        |broker| poison_events_go_to_their_dlq_once_and_the_rest_is_counted_exactly(broker)
);

async fn poison_events_go_to_their_dlq_once_and_the_rest_is_counted_exactly(broker: Broker) {
    let setup = setup(broker);
    let db = clickhouse().await.database().await.expect("database");
    let generated: Vec<_> = Generator::new(GeneratorConfig {
        seed: 90,
        start_ms: 1_763_000_000_000,
        spacing_ms: 60.0,
        poison_rate: 0.03,
        ..GeneratorConfig::default()
    })
    .take(2_000)
    .collect();
    Publisher::new(
        &setup.connection,
        &setup.catalog,
        &PublishOptions::default(),
    )
    .expect("publisher")
    .publish_all(generated.iter().map(|g| (&g.event, g.poison)))
    .await
    .expect("delivered");
    let poisoned: BTreeSet<String> = generated
        .iter()
        .filter(|g| g.poison.is_some())
        .map(|g| g.event.event_id().to_string())
        .collect();
    let clean: Vec<AnyEvent> = generated
        .iter()
        .filter(|g| g.poison.is_none())
        .map(|g| g.event.clone())
        .collect();
    assert!(poisoned.len() >= 20, "some poison: {}", poisoned.len());

    let mut job = start_job(&setup, &db, &[]);
    wait_caught_up(&setup, &db, Duration::from_secs(60)).await;
    assert_eq!(actual(&db, "per_minute").await, expected(&clean));
    let mut dead = Vec::new();
    for topic in &setup.catalog.topics {
        let dlq = consumers::dlq::dead_letter_topic(&setup.catalog, &topic.name);
        for record in consumers::dlq::read_all(&setup.connection, &dlq).expect("DLQ") {
            assert_eq!(
                shopstream_tests::header(&record, backbone::headers::ORIGINAL_TOPIC),
                Some(topic.name.as_str())
            );
            assert!(
                shopstream_tests::header(&record, backbone::headers::ERROR_CLASS).is_some(),
                "error class on {record:?}"
            );
            dead.push(record);
        }
    }
    assert_eq!(dead.len(), poisoned.len(), "each poison record once");
    assert_eq!(
        job.metric("shopstream_analytics_dead_lettered_total").await,
        poisoned.len() as f64
    );
    assert_eq!(
        job.metric("shopstream_analytics_events_total").await,
        clean.len() as f64
    );
    sigterm(&mut job);
}

on_both_brokers!(
    clickhouse_down_at_start_and_mid_run_loses_and_doubles_nothing:
        |broker| clickhouse_down_at_start_and_mid_run_loses_and_doubles_nothing(broker)
);

async fn clickhouse_down_at_start_and_mid_run_loses_and_doubles_nothing(broker: Broker) {
    let setup = setup(broker);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = StoppableClickHouse::start(&dir.path().join("clickhouse"));
    server.stop();
    let db = TestDatabase {
        name: "outage".into(),
        url: server.url(),
        client: shopstream_tests::clickhouse_client(&server.url()).with_database("outage"),
    };
    let start = 1_763_000_000_000;
    let mut published = generate(80, 1_000, start);
    publish(&setup, &published).await;
    // Nothing to migrate into yet: the job waits, not ready, and starts
    // once ClickHouse answers.
    let mut job = start_job(&setup, &db, &[]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        job.child.try_wait().expect("status").is_none(),
        "still waiting"
    );
    server.resume();
    server.ready().await;
    wait_caught_up(&setup, &db, Duration::from_secs(90)).await;

    server.stop();
    let during = generate(81, 1_000, start + 1_000 * 60);
    publish(&setup, &during).await;
    published.extend(during);
    // Flushes fail and are retried; the partials stay held meanwhile.
    tokio::time::sleep(Duration::from_secs(4)).await;
    server.resume();
    server.ready().await;
    wait_caught_up(&setup, &db, Duration::from_secs(90)).await;
    assert_eq!(actual(&db, "per_minute").await, expected(&published));
    assert!(
        job.metric("shopstream_analytics_insert_retries_total")
            .await
            >= 1.0
    );
    sigterm(&mut job);
}

on_both_brokers!(
    inserts_outlasting_the_timeout_land_once:
        |broker| inserts_outlasting_the_timeout_land_once(broker)
);

/// Every insert outlasts the job's ClickHouse timeout (a materialized
/// column of the partials sleeps 1.5 s per insert before its rows are
/// written; the timeout is 0.5 s): the job gets no answer, and ClickHouse
/// stores the rows anyway. Made again at once (as the job once did), each
/// would count its events twice; the job waits until the server has
/// finished the attempt and finds it stored.
async fn inserts_outlasting_the_timeout_land_once(broker: Broker) {
    let setup = setup(broker);
    let db = clickhouse().await.database().await.expect("database");
    let mut job = start_job(&setup, &db, &["--set", "clickhouse.timeout_ms=500"]);
    let started = Instant::now();
    while db
        .client
        .query("ALTER TABLE analytics_partials ADD COLUMN slow UInt8 MATERIALIZED sleep(1.5)")
        .execute()
        .await
        .is_err()
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the job did not create analytics_partials"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let published = generate(82, 600, 1_763_000_000_000);
    publish(&setup, &published).await;
    wait_caught_up(&setup, &db, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(actual(&db, "per_minute").await, expected(&published));
    assert!(
        job.metric("shopstream_analytics_inserts_landed_unanswered_total")
            .await
            >= 1.0,
        "the inserts did outlast the timeout and land"
    );
    sigterm(&mut job);
}

fn set_time(event: &mut AnyEvent, t: i64) {
    if let AnyEvent::Order(o) = event {
        o.occurred_at = t;
    }
}

/// Order events all under one key, so they share a partition and its order.
fn set_key(event: &mut AnyEvent) {
    if let AnyEvent::Order(o) = event {
        o.order_id = "o-one".into();
    }
}

/// A deployment from before migration 2, whose hourly rollups (materialized
/// views into AggregatingMergeTree tables) came out wrong after a crash,
/// migrates in place on 18.16: its hours are then the partials' own, the
/// rollups are gone, migration 2 run again changes nothing, and new
/// partials count at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hourly_rollups_migrate_in_place_to_exact_views_over_the_partials() {
    use consumers::projection::{ddl::Target, migrate};
    use pipelines::ddl::{migrations, MIGRATIONS_TABLE};

    let (db, settings) = migration_database().await;
    let events = three_hours_and_a_half();
    let (first, second) = events.split_at(4_000);

    fn before_2(target: &Target) -> Vec<consumers::projection::ddl::Migration> {
        migrations(target).into_iter().take(1).collect()
    }
    assert_eq!(
        migrate(&settings, MIGRATIONS_TABLE, before_2)
            .await
            .expect("v1"),
        [1]
    );
    store_partials(&db, first).await;
    // What a crash mid-insert did: one rollup part stored twice.
    db.client
        .query("INSERT INTO order_funnel_per_hour_state SELECT * FROM order_funnel_per_hour_state")
        .execute()
        .await
        .expect("double a rollup");
    let hourly = |events: &[AnyEvent]| ReadModels::compute(events).hourly_sums();
    assert_ne!(
        actual(&db, "per_hour").await.hourly_sums(),
        hourly(first),
        "the rollups are wrong before the migration"
    );

    assert_eq!(
        migrate(&settings, MIGRATIONS_TABLE, migrations)
            .await
            .expect("v2"),
        [2, 3, 4, 5, 6, 7]
    );
    let per_hour = actual(&db, "per_hour").await;
    assert_eq!(per_hour.hourly_sums(), hourly(first));
    assert!(per_hour.funnel.len() >= 3, "{:?}", per_hour.funnel.keys());
    assert_eq!(actual(&db, "per_minute").await, expected(first));
    let left = rollups_left(&db).await;
    assert!(left.is_empty(), "rollups left: {left:?}");

    // A migration cut short is run again whole: nothing changes.
    let target = Target::new(&db.name, None).expect("target");
    for statement in &migrations(&target)[1].statements {
        db.client.query(statement).execute().await.expect(statement);
    }
    store_partials(&db, second).await;
    assert_eq!(actual(&db, "per_hour").await.hourly_sums(), hourly(&events));
    assert_eq!(actual(&db, "per_minute").await, expected(&events));
}

/// A fresh database and the settings that reach it.
async fn migration_database() -> (TestDatabase, backbone::config::ClickHouseSettings) {
    let db = clickhouse().await.database().await.expect("database");
    let settings = backbone::config::ClickHouseSettings {
        url: db.url.clone(),
        database: db.name.clone(),
        ..backbone::config::ClickHouseSettings::default()
    };
    (db, settings)
}

/// About three hours and a half of generated events.
fn three_hours_and_a_half() -> Vec<AnyEvent> {
    Generator::new(GeneratorConfig {
        seed: 20,
        start_ms: 1_763_000_000_000,
        spacing_ms: 2_000.0,
        ..GeneratorConfig::default()
    })
    .take(6_000)
    .map(|g| g.event)
    .collect()
}

/// Stores `events` as the job's partials, in one insert.
async fn store_partials(db: &TestDatabase, events: &[AnyEvent]) {
    use pipelines::aggregate::{Partial, Windows};
    let mut partial = Partial::default();
    events
        .iter()
        .for_each(|e| partial.add(Windows::new(MINUTE), e));
    let rows = pipelines::store::rows(partial, 0);
    pipelines::store::insert(&db.client, &rows, Duration::from_secs(30))
        .await
        .expect("insert partials");
}

/// Migration 3 on a deployment at version 2: the search-query views gain
/// the zero-result counts the job writes, and every read model stays exact.
#[tokio::test]
async fn zero_result_searches_per_query_migrate_in_place() {
    use consumers::projection::migrate;
    use pipelines::ddl::{migrations, MIGRATIONS_TABLE, PARTIALS_TABLE};

    let (db, settings) = migration_database().await;
    fn before_3(
        target: &consumers::projection::ddl::Target,
    ) -> Vec<consumers::projection::ddl::Migration> {
        migrations(target).into_iter().take(2).collect()
    }
    assert_eq!(
        migrate(&settings, MIGRATIONS_TABLE, before_3)
            .await
            .expect("v2"),
        [1, 2]
    );
    // The views as versions 1 and 2 left them, with no zero-result counts.
    for statement in [
        "DROP TABLE top_queries_per_minute".to_owned(),
        "DROP TABLE search_queries_per_minute".to_owned(),
        format!("CREATE VIEW search_queries_per_minute AS SELECT window_start, dim1 AS query, sum(c1) AS searches FROM {PARTIALS_TABLE} WHERE model = 'queries' GROUP BY window_start, dim1"),
        "CREATE VIEW top_queries_per_minute AS SELECT window_start, query, searches FROM search_queries_per_minute ORDER BY window_start, searches DESC, query LIMIT 10 BY window_start".to_owned(),
    ] {
        db.client.query(&statement).execute().await.expect(&statement);
    }
    let events = three_hours_and_a_half();
    store_partials(&db, &events).await;
    assert!(
        db.client
            .query("SELECT sum(zero_results) FROM search_queries_per_minute")
            .fetch_one::<i64>()
            .await
            .is_err(),
        "no zero-result counts before migration 3"
    );
    assert_eq!(
        migrate(&settings, MIGRATIONS_TABLE, migrations)
            .await
            .expect("v3"),
        [3, 4, 5, 6, 7]
    );
    let want = expected(&events);
    assert!(
        want.queries.values().any(|(_, zero)| *zero > 0),
        "the events have zero-result searches"
    );
    assert_eq!(actual(&db, "per_minute").await, want);
    assert_eq!(actual(&db, "per_hour").await, ReadModels::hourly(&events));
    let top = checker::read_models::read_top_queries(&db.client)
        .await
        .expect("top queries");
    assert_eq!(top.len(), want.top_queries().len());
}

/// Replicas started together on a fresh database migrate it at once: each
/// one starts, and nothing of migration 1's rollups is left behind (one
/// replica could recreate, or fail on, what another's migration 2 had just
/// dropped: "Table ...orders_per_hour_state doesn't exist" in a CI run).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_migrating_a_fresh_database_together_all_start_and_leave_no_rollup() {
    use consumers::projection::migrate_when_reachable;
    use pipelines::ddl::{migrations, MIGRATIONS_TABLE};

    for _ in 0..10 {
        let db = clickhouse().await.database().await.expect("database");
        let settings = backbone::config::ClickHouseSettings {
            url: db.url.clone(),
            database: db.name.clone(),
            ..backbone::config::ClickHouseSettings::default()
        };
        let shutdown = backbone::shutdown::Shutdown::new();
        // Started a moment apart, so one is still in migration 1 while
        // another runs migration 2.
        let replicas: Vec<_> = (0..6u64)
            .map(|n| {
                let (settings, shutdown) = (settings.clone(), shutdown.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(n * 15)).await;
                    migrate_when_reachable(&settings, MIGRATIONS_TABLE, migrations, &shutdown).await
                })
            })
            .collect();
        for replica in replicas {
            replica
                .await
                .expect("joined")
                .expect("every replica migrates");
        }
        let left = rollups_left(&db).await;
        assert!(left.is_empty(), "rollups left: {left:?}");
        assert_eq!(
            actual(&db, "per_hour").await,
            actual(&db, "per_minute").await
        );
    }
}

/// The tables of migration 1's hourly rollups still in `db`.
async fn rollups_left(db: &TestDatabase) -> Vec<String> {
    db.client
        .query("SELECT name FROM system.tables WHERE database = ? AND (name LIKE '%_per_hour_mv' OR name LIKE '%_per_hour_state')")
        .bind(&db.name)
        .fetch_all()
        .await
        .expect("tables")
}

/// ClickHouse 18.16 has no `insert_deduplication_token`: it refuses an
/// insert carrying one, so the job asks the server's version and sends
/// tokens only from 22.2 on, leaving 18.16's partials as they are.
#[tokio::test]
async fn clickhouse_18_gets_no_deduplication_token() {
    use pipelines::store::{deduplicate_retries, insert_before, insert_id};

    let (db, settings) = migration_database().await;
    consumers::projection::migrate(
        &settings,
        pipelines::ddl::MIGRATIONS_TABLE,
        pipelines::ddl::migrations,
    )
    .await
    .expect("migrations");
    let target = consumers::projection::ddl::Target::new(&db.name, None).expect("target");
    let (version, tokens) = deduplicate_retries(&db.client, &target, Duration::from_secs(30))
        .await
        .expect("the version");
    assert!(version.starts_with("18.16."), "{version}");
    assert!(!tokens, "{version}");
    let table: String = db
        .client
        .query("SELECT create_table_query FROM system.tables WHERE database = currentDatabase() AND name = 'analytics_partials'")
        .fetch_one()
        .await
        .expect("the partials");
    assert!(!table.contains("deduplication"), "{table}");
    let row = pipelines::store::offset_row("orders", 0, 10, 0);
    let refused = insert_before(
        &db.client,
        std::slice::from_ref(&row),
        Duration::from_secs(30),
        None,
        &insert_id(),
        Some("orders/0/10"),
    )
    .await
    .expect_err("18.16 refuses the token");
    assert!(
        refused.to_string().contains("insert_deduplicat"),
        "{refused}"
    );
    assert_eq!(stored_offsets(&db).await, BTreeMap::new());
}

/// On ClickHouse 26.9 (chdb, in process) the partials as the migrations
/// create them and the job sets them there (`deduplicating_retries`) keep
/// a partials insert made again once: an unanswered insert that lands
/// after its retry, or after a partition's next owner stored the same
/// offsets, adds nothing. Without the table setting all three inserts
/// below land. The job sends the token as an HTTP setting; chdb has no
/// HTTP server, so here it is the same setting in the statement.
#[test]
fn a_partials_insert_made_again_lands_once_on_clickhouse_26() {
    use pipelines::store::{deduplication_token, takes_deduplication_tokens};

    let target = consumers::projection::ddl::Target::new("shop", None).expect("target");
    let mut statements = migration_sql(&target);
    statements.push(pipelines::ddl::deduplicating_retries(&target));
    let key = |topic: &str, partition| (topic.to_owned(), partition);
    let first = [(key("orders", 0), 200), (key("chat", 3), 50)];
    let made_again = [(key("chat", 3), 50), (key("orders", 0), 200)];
    let next = [(key("orders", 0), 201), (key("chat", 3), 50)];
    for offsets in [&first[..], &made_again, &next] {
        let values: Vec<String> = offsets
            .iter()
            .map(|((topic, partition), last)| {
                format!("('_offset', '{topic}', {partition}, {last})")
            })
            .collect();
        statements.push(format!(
            "INSERT INTO `shop`.`analytics_partials` (model, source_topic, source_partition, last_offset) SETTINGS insert_deduplicate = 1, insert_deduplication_token = '{}' VALUES {}",
            deduplication_token(offsets),
            values.join(", ")
        ));
    }
    statements.push("SELECT version()".into());
    statements.push("SELECT source_topic, source_partition, last_offset FROM `shop`.`analytics_partials` ORDER BY last_offset, source_topic".into());

    let answers = on_clickhouse_26(&statements);
    let version = answers[answers.len() - 2].trim();
    assert!(version.starts_with("26."), "{version}");
    assert!(takes_deduplication_tokens(version), "{version}");
    assert_eq!(
        answers[answers.len() - 1],
        "chat\t3\t50\nchat\t3\t50\norders\t0\t200\norders\t0\t201\n",
        "the first insert and the next, each once"
    );
}

/// The database and every migration's SQL as the job runs them on a new
/// database, each migration's added columns after its statements.
fn migration_sql(target: &consumers::projection::ddl::Target) -> Vec<String> {
    let mut statements = vec![target.create_database()];
    for migration in pipelines::ddl::migrations(target) {
        statements.extend(migration.statements);
        statements.extend(migration.columns.iter().map(|c| target.add_column(c)));
    }
    statements
}

/// Each answer of `statements`, run in order in one ClickHouse 26.9
/// session (chdb, in process), as TabSeparated text.
fn on_clickhouse_26(statements: &[String]) -> Vec<String> {
    let mut python = Command::new("python3")
        .arg(shopstream_tests::repo_root().join("tests/chdb_session.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs (scripts/test installs it with chdb-core)");
    serde_json::to_writer(python.stdin.take().expect("stdin"), statements).expect("statements");
    let output = python.wait_with_output().expect("chdb answers");
    assert!(output.status.success(), "a statement was refused (above)");
    serde_json::from_slice(&output.stdout).expect("JSON")
}

/// On ClickHouse 26.9, the compacted hours' keys (migration 6): a read of
/// two hours, one compacted (its keys, stored with the row) and one from
/// the partials (their ids made keys), counts what the ids count; so does
/// a read of the compacted hour alone, straight from its table.
#[test]
fn the_compacted_hours_keys_count_what_the_ids_count_on_clickhouse_26() {
    use pipelines::ddl::{model_columns, Level, Part, Rows};

    let target = consumers::projection::ddl::Target::new("shop", None).expect("target");
    let mut statements = migration_sql(&target);
    let hour: u32 = 1_795_960_800;
    statements.push(format!(
        "INSERT INTO `shop`.`analytics_hours` (model, level, window_start, dim1, set1, covered, compaction) \
         VALUES ('chat', 0, toDateTime({hour}), 'r1', ['u1', 'u2', 'u3'], 1, 7), \
         ('chat', 0, toDateTime({hour}), 'r2', ['u1'], 1, 7)"
    ));
    statements.push(format!(
        "INSERT INTO `shop`.`analytics_partials` (model, window_start, dim1, set1) \
         VALUES ('chat', toDateTime({}), 'r1', ['u3', 'u4']), ('chat', toDateTime({}), 'r2', ['u2'])",
        hour + 3_660,
        hour + 3_720
    ));
    let chatters = model_columns("chat")
        .expect("chat")
        .measures
        .into_iter()
        .find(|m| m.column == "unique_chatters")
        .expect("chatters");
    for hours in [2, 1] {
        let rows = Rows {
            model: "chat",
            range: Some((hour, hour + hours * 3_600)),
            hours: Some(Level::Key),
            counts: false,
            columns: vec!["dim1", "set1"],
            conditions: String::new(),
            current: Some(vec![(hour, 7)]),
            minutes: Vec::new(),
            part: Part::Whole,
        };
        assert!(rows.measure(&chatters).contains("key1"));
        statements.push(format!(
            "SELECT dim1, {} {} GROUP BY dim1 ORDER BY dim1",
            rows.measure(&chatters),
            rows.from(&target)
        ));
    }
    statements.push("SELECT version()".into());
    let answers = on_clickhouse_26(&statements);
    let n = answers.len();
    assert!(answers[n - 1].starts_with("26."), "{}", answers[n - 1]);
    assert_eq!(answers[n - 3], "r1\t4\nr2\t2\n", "two hours");
    assert_eq!(answers[n - 2], "r1\t3\nr2\t1\n", "the compacted hour");
}
