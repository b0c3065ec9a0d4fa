//! The delivery contract, proven on a real broker (tansu in scripts/test)
//! and on librdkafka's mock cluster, each scenario as
//! `<name>::on_a_real_broker` and `<name>::on_the_mock_cluster` (fault
//! injection on the mock cluster only): nothing lost, poison dead-lettered
//! once with every header, retries in place then through the tiers, SIGTERM
//! drains, partitions never owned twice, backpressure never stalls.

#[macro_use]
extern crate shopstream_tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backbone::catalog::Catalog;
use backbone::config::{KafkaSettings, WorkerSettings};
use backbone::events::{AnyEvent, OrderEvent};
use backbone::headers;
use backbone::kafka::KafkaConnection;
use backbone::shutdown::Shutdown;
use consumers::handler::{Handler, Outcome, Record};
use consumers::metrics::Metrics;
use consumers::routes::Routes;
use consumers::runtime::{run, WorkerError};
use producers::generator::{Generator, GeneratorConfig};
use producers::publisher::{PublishOptions, Publisher};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use shopstream_tests::{header, mock_cluster, repo_root, unique_name, Broker, TestBroker};
use uuid::Uuid;

/// A handled record: where it was read and which event it was.
type Seen = (String, i32, i64, Uuid);

/// Records what it handles; fails events as told.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<Seen>>,
    /// Event id -> attempts to fail before succeeding (u32::MAX: always).
    failing: Mutex<HashMap<Uuid, u32>>,
    /// Attempts seen per event id.
    attempts: Mutex<HashMap<Uuid, Vec<u32>>>,
    delay: Duration,
    /// Handler calls that found their partition in another worker's hands.
    overlaps: Mutex<u32>,
    worker: usize,
    /// Partitions being handled now, by worker, shared by all workers of a test.
    shared_active: Option<Arc<Mutex<HashMap<i32, usize>>>>,
}

struct Named(Arc<Recorder>);

impl Handler for Named {
    fn name(&self) -> &str {
        "recorder"
    }

    async fn handle(&self, batch: &[Record]) -> Vec<Outcome> {
        let me = &self.0;
        let partition = batch[0].partition;
        let active = me.shared_active.clone().unwrap_or_default();
        {
            let mut active = active.lock().expect("lock");
            if active.get(&partition).is_some_and(|w| *w != me.worker) {
                *me.overlaps.lock().expect("lock") += 1;
            }
            active.insert(partition, me.worker);
        }
        if !me.delay.is_zero() {
            tokio::time::sleep(me.delay).await;
        }
        let mut outcomes = Vec::new();
        for record in batch {
            let id = record.event.event_id();
            me.attempts
                .lock()
                .expect("test setup")
                .entry(id)
                .or_default()
                .push(record.attempts);
            let mut failing = me.failing.lock().expect("lock");
            match failing.get_mut(&id) {
                Some(n) if *n > 0 => {
                    *n = n
                        .saturating_sub(1)
                        .max(if *n == u32::MAX { u32::MAX } else { 0 });
                    outcomes.push(Outcome::retry("the test says not yet"));
                }
                _ => {
                    me.seen.lock().expect("lock").push((
                        record.topic.to_string(),
                        record.partition,
                        record.offset,
                        id,
                    ));
                    outcomes.push(Outcome::Done);
                }
            }
        }
        active.lock().expect("lock").remove(&partition);
        outcomes
    }
}

/// A catalog with one order topic (`partitions`, a 1 s retry tier, a DLQ),
/// its topics created, and a connection to where they are.
struct Setup {
    _dir: tempfile::TempDir,
    catalog: Catalog,
    connection: KafkaConnection,
}

/// The topics on `kafka`: the test's own mock cluster or the real broker.
async fn setup(kafka: &TestBroker, partitions: i32) -> Setup {
    let (dir, catalog) = order_catalog(partitions);
    for topic in catalog.desired_topics() {
        kafka
            .create_topic(&topic.name, topic.partitions)
            .await
            .expect("test setup");
    }
    connect(dir, catalog, kafka.bootstrap_servers())
}

/// The topics on `cluster`, replicated to `replication` of its brokers, for
/// fault injection.
fn setup_replicated(
    cluster: &MockCluster<'static, DefaultProducerContext>,
    partitions: i32,
    replication: i32,
) -> Setup {
    let (dir, catalog) = order_catalog(partitions);
    for topic in catalog.desired_topics() {
        cluster
            .create_topic(&topic.name, topic.partitions, replication)
            .expect("test setup");
    }
    connect(dir, catalog, &cluster.bootstrap_servers())
}

fn order_catalog(partitions: i32) -> (tempfile::TempDir, Catalog) {
    let dir = tempfile::tempdir().expect("test setup");
    let name = unique_name("orders");
    let text = format!(
        "defaults: {{partitions: {partitions}, replication_factor: 1}}\ntopics:\n  - name: {name}\n    schema: {}/order_event\n    key: order_id\n    retry: {{tiers: [1s]}}\n",
        repo_root().join("schemas").display()
    );
    let path: PathBuf = dir.path().join("topics.yaml");
    std::fs::write(&path, text).expect("test setup");
    let catalog = Catalog::load(&path, None).expect("test setup");
    (dir, catalog)
}

fn connect(dir: tempfile::TempDir, catalog: Catalog, bootstrap_servers: &str) -> Setup {
    let settings = KafkaSettings {
        bootstrap_servers: bootstrap_servers.to_owned(),
        ..KafkaSettings::default()
    };
    let connection = KafkaConnection::connect(&settings, &catalog).expect("test setup");
    Setup {
        _dir: dir,
        catalog,
        connection,
    }
}

/// `kafka.gap_confirmation_ms`'s default.
fn gap_confirmation() -> Duration {
    KafkaSettings::default().gap_confirmation()
}

fn settings(group: &str) -> WorkerSettings {
    WorkerSettings {
        group_id: group.to_owned(),
        batch_linger_ms: 10,
        retry_attempts: 4,
        retry_base_delay_ms: 20,
        retry_max_delay_ms: 100,
        drain_timeout_ms: 5_000,
        commit_interval_ms: 200,
        ..WorkerSettings::default()
    }
}

/// Publishes `n` generated order events (some poisoned) and returns them.
async fn publish(setup: &Setup, n: usize, seed: u64, poison_rate: f64) -> Vec<(AnyEvent, bool)> {
    let publisher = Publisher::new(
        &setup.connection,
        &setup.catalog,
        &PublishOptions::default(),
    )
    .expect("test setup");
    let generated: Vec<_> = Generator::new(GeneratorConfig {
        seed,
        mix: "order=1".parse().expect("test setup"),
        poison_rate,
        ..GeneratorConfig::default()
    })
    .filter(|g| matches!(g.event, AnyEvent::Order(_)))
    .take(n)
    .collect();
    publisher
        .publish_all(generated.iter().map(|g| (&g.event, g.poison)))
        .await
        .expect("test setup");
    generated
        .into_iter()
        .map(|g| (g.event, g.poison.is_some()))
        .collect()
}

struct Running {
    shutdown: Shutdown,
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    task: tokio::task::JoinHandle<Result<(), WorkerError>>,
}

fn start(setup: &Setup, settings: WorkerSettings, recorder: Arc<Recorder>) -> Running {
    let shutdown = Shutdown::new();
    let ready = Arc::new(AtomicBool::new(false));
    let metrics = Arc::new(Metrics::default());
    let connection = KafkaConnection::connect(
        &KafkaSettings {
            bootstrap_servers: setup.connection.bootstrap_servers().to_owned(),
            ..KafkaSettings::default()
        },
        &setup.catalog,
    )
    .expect("test setup");
    let routes = Routes::new(&setup.catalog, &[]).expect("every topic");
    let (s, r, m) = (shutdown.clone(), ready.clone(), metrics.clone());
    let task =
        tokio::spawn(
            async move { run(&connection, &settings, routes, Named(recorder), m, r, s).await },
        );
    Running {
        shutdown,
        ready,
        metrics,
        task,
    }
}

async fn stop(running: Running) {
    running.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), running.task)
        .await
        .expect("drains in time")
        .expect("test setup")
        .expect("test setup");
    assert!(!running.ready.load(Ordering::SeqCst));
}

/// Waits until the group has given each of `workers` some of `partitions`
/// and all of them are taken.
async fn assigned_between(workers: &[&Running], partitions: usize) {
    let assigned = || {
        workers
            .iter()
            .map(|w| w.metrics.assigned_partitions.get())
            .collect::<Vec<_>>()
    };
    let started = Instant::now();
    loop {
        let now = assigned();
        if now.iter().all(|n| *n > 0) && now.iter().sum::<i64>() == partitions as i64 {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the group did not share the {partitions} partitions within 60 s: each member holds {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `recorders` handled `n` records between them, then until
/// `group` committed past every record handled (a rebalance then repeats
/// none). The commit is awaited, not slept on: under load a commit can take
/// longer than a few commit intervals.
async fn handled_and_committed(setup: &Setup, group: &str, recorders: &[Arc<Recorder>], n: usize) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    wait_until("every record handled", Duration::from_secs(60), || {
        recorders
            .iter()
            .map(|r| r.seen.lock().expect("lock").len())
            .sum::<usize>()
            >= n
    })
    .await;
    let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for (topic, partition, offset, _) in recorders
        .iter()
        .flat_map(|r| r.seen.lock().expect("lock").clone())
    {
        let at = next.entry((topic, partition)).or_default();
        *at = (*at).max(offset + 1);
    }
    let mut wanted = TopicPartitionList::new();
    for (topic, partition) in next.keys() {
        wanted.add_partition(topic, *partition);
    }
    let reader: BaseConsumer = setup
        .connection
        .client_config()
        .set("group.id", group)
        .create()
        .expect("test setup");
    wait_until(
        "the group to commit past every record handled",
        Duration::from_secs(60),
        || {
            let committed = reader
                .committed_offsets(wanted.clone(), Duration::from_secs(5))
                .unwrap_or_default();
            next.iter().all(|((topic, partition), at)| {
                let done = committed
                    .find_partition(topic, *partition)
                    .map(|p| p.offset());
                matches!(done, Some(Offset::Offset(o)) if o >= *at)
            })
        },
    )
    .await;
}

async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn handled_ids(recorder: &Recorder) -> Vec<Uuid> {
    recorder
        .seen
        .lock()
        .expect("lock")
        .iter()
        .map(|s| s.3)
        .collect()
}

on_both_brokers!(
    poison_goes_to_the_dlq_once_with_every_header_and_the_rest_is_handled:
        |broker| poison_goes_to_the_dlq_once_with_every_header_and_the_rest_is_handled(broker)
);

async fn poison_goes_to_the_dlq_once_with_every_header_and_the_rest_is_handled(broker: Broker) {
    let kafka = TestBroker::on(broker);
    let setup = setup(&kafka, 3).await;
    let events = publish(&setup, 300, 3, 0.05).await;
    let poisoned: HashSet<Uuid> = events
        .iter()
        .filter(|(_, p)| *p)
        .map(|(e, _)| e.event_id())
        .collect();
    assert!(poisoned.len() >= 5, "{}", poisoned.len());
    let recorder = Arc::new(Recorder::default());
    let worker = start(&setup, settings(&unique_name("g")), recorder.clone());
    let good = events.len() - poisoned.len();
    wait_until("every good record handled", Duration::from_secs(60), || {
        recorder.seen.lock().expect("lock").len() >= good
    })
    .await;
    assert!(worker.ready.load(Ordering::SeqCst));
    let topic = &setup.catalog.topics[0];
    let dlq = topic
        .dead_letter
        .as_ref()
        .expect("test setup")
        .topic
        .clone();
    let dead = shopstream_tests::consume(
        setup.connection.bootstrap_servers(),
        &[&dlq],
        poisoned.len(),
        Duration::from_secs(30),
    )
    .await
    .expect("test setup");
    let text = backbone::metrics::encode(&worker.metrics.registry(), false);
    stop(worker).await;

    let handled = handled_ids(&recorder);
    assert_eq!(handled.len(), good, "each good record handled once");
    assert_eq!(handled.iter().collect::<HashSet<_>>().len(), good);
    assert!(handled.iter().all(|id| !poisoned.contains(id)));
    // Exactly the poison, once each, with key, payload and every header.
    let originals = shopstream_tests::consume(
        setup.connection.bootstrap_servers(),
        &[&topic.name],
        events.len(),
        Duration::from_secs(30),
    )
    .await
    .expect("test setup");
    let by_offset: HashMap<(i32, i64), &rdkafka::message::OwnedMessage> = originals
        .iter()
        .map(|m| ((m.partition(), m.offset()), m))
        .collect();
    let mut seen_offsets = HashSet::new();
    for record in &dead {
        let partition: i32 = header(record, headers::ORIGINAL_PARTITION)
            .expect("test setup")
            .parse()
            .expect("test setup");
        let offset: i64 = header(record, headers::ORIGINAL_OFFSET)
            .expect("test setup")
            .parse()
            .expect("test setup");
        assert!(
            seen_offsets.insert((partition, offset)),
            "dead-lettered once"
        );
        let original = by_offset[&(partition, offset)];
        assert_eq!(record.key(), original.key());
        assert_eq!(record.payload(), original.payload());
        assert_eq!(
            header(record, headers::ORIGINAL_TOPIC),
            Some(topic.name.as_str())
        );
        assert_eq!(
            header(record, headers::ORIGINAL_TIMESTAMP)
                .expect("test setup")
                .parse::<i64>()
                .ok(),
            original.timestamp().to_millis()
        );
        assert!(["truncated", "not_avro_or_json", "unknown_fingerprint"]
            .contains(&header(record, headers::ERROR_CLASS).expect("test setup")));
        assert!(!header(record, headers::ERROR_MESSAGE)
            .expect("test setup")
            .is_empty());
        assert!(header(record, headers::CONSUMER_GROUP)
            .expect("test setup")
            .starts_with("g-"));
        assert_eq!(header(record, headers::ATTEMPTS), Some("0"));
        assert!(
            header(record, headers::FIRST_FAILURE_AT).is_some()
                && header(record, headers::LAST_FAILURE_AT).is_some()
        );
        assert_eq!(
            header(record, headers::TRACEPARENT),
            header(original, headers::TRACEPARENT)
        );
    }
    assert_eq!(dead.len(), poisoned.len());
    let counted: f64 = text
        .lines()
        .filter(|l| l.starts_with("shopstream_records_dead_lettered_total{error_class="))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(counted, poisoned.len() as f64, "{text}");
}

on_both_brokers!(
    transient_failures_retry_in_place_and_exhausted_ones_walk_the_tiers_to_the_dlq:
        |broker| transient_failures_retry_in_place_and_exhausted_ones_walk_the_tiers_to_the_dlq(broker)
);

async fn transient_failures_retry_in_place_and_exhausted_ones_walk_the_tiers_to_the_dlq(
    broker: Broker,
) {
    let kafka = TestBroker::on(broker);
    let setup = setup(&kafka, 3).await;
    let events = publish(&setup, 200, 4, 0.0).await;
    let ids: Vec<Uuid> = events.iter().map(|(e, _)| e.event_id()).collect();
    let (flaky, doomed) = (ids[10], ids[20]);
    let recorder = Arc::new(Recorder::default());
    recorder
        .failing
        .lock()
        .expect("test setup")
        .extend([(flaky, 2), (doomed, u32::MAX)]);
    let worker = start(&setup, settings(&unique_name("g")), recorder.clone());
    let topic = &setup.catalog.topics[0];
    let dlq = topic
        .dead_letter
        .as_ref()
        .expect("test setup")
        .topic
        .clone();
    let dead = shopstream_tests::consume(
        setup.connection.bootstrap_servers(),
        &[&dlq],
        1,
        Duration::from_secs(60),
    )
    .await
    .expect("test setup");
    // Everything else flowed while the doomed record retried.
    let handled = handled_ids(&recorder);
    let text = backbone::metrics::encode(&worker.metrics.registry(), false);
    stop(worker).await;
    assert_eq!(
        handled.len(),
        199,
        "all but the doomed record were handled first"
    );
    assert!(handled.contains(&flaky) && !handled.contains(&doomed));
    let attempts = recorder.attempts.lock().expect("lock").clone();
    assert_eq!(
        attempts[&flaky],
        [0, 1, 2],
        "succeeded in place on the third attempt"
    );
    // Four attempts in place, one from the 1 s tier.
    assert_eq!(attempts[&doomed], [0, 1, 2, 3, 4]);
    let record = &dead[0];
    assert_eq!(
        header(record, headers::ERROR_CLASS),
        Some("retry_exhausted")
    );
    assert_eq!(
        header(record, headers::ERROR_MESSAGE),
        Some("the test says not yet")
    );
    assert_eq!(header(record, headers::ATTEMPTS), Some("5"));
    assert_eq!(
        header(record, headers::ORIGINAL_TOPIC),
        Some(topic.name.as_str())
    );
    let first: i64 = header(record, headers::FIRST_FAILURE_AT)
        .expect("test setup")
        .parse()
        .expect("test setup");
    let last: i64 = header(record, headers::LAST_FAILURE_AT)
        .expect("test setup")
        .parse()
        .expect("test setup");
    assert!(
        last - first >= 1_000,
        "the tier's delay passed between failures: {first} {last}"
    );
    assert!(
        text.contains("shopstream_records_tiered_total{tier=\"0\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("shopstream_retries_total{tier=\"in_place\"}"),
        "{text}"
    );
}

on_both_brokers!(
    sigterm_mid_batch_then_restart_loses_nothing_and_handles_nothing_twice:
        |broker| sigterm_mid_batch_then_restart_loses_nothing_and_handles_nothing_twice(broker)
);

async fn sigterm_mid_batch_then_restart_loses_nothing_and_handles_nothing_twice(broker: Broker) {
    let kafka = TestBroker::on(broker);
    let setup = setup(&kafka, 3).await;
    let events = publish(&setup, 1500, 5, 0.0).await;
    let group = unique_name("g");
    let recorder = Arc::new(Recorder {
        delay: Duration::from_millis(40),
        ..Recorder::default()
    });
    let mut small = settings(&group);
    small.batch_max_records = 20;
    let first = start(&setup, small.clone(), recorder.clone());
    wait_until("some records handled", Duration::from_secs(60), || {
        recorder.seen.lock().expect("lock").len() >= 200
    })
    .await;
    // SIGTERM lands while batches are in the handler.
    stop(first).await;
    let after_first = recorder.seen.lock().expect("lock").len();
    assert!(after_first < events.len(), "stopped mid-run");
    let second = start(&setup, small, recorder.clone());
    wait_until("every record handled", Duration::from_secs(90), || {
        recorder.seen.lock().expect("lock").len() >= events.len()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop(second).await;
    let seen = recorder.seen.lock().expect("lock").clone();
    let unique: HashSet<(i32, i64)> = seen.iter().map(|s| (s.1, s.2)).collect();
    assert_eq!(unique.len(), events.len(), "nothing lost");
    assert_eq!(seen.len(), events.len(), "nothing handled twice");
}

on_both_brokers!(
    workers_joining_and_leaving_share_partitions_without_overlap_or_loss:
        |broker| workers_joining_and_leaving_share_partitions_without_overlap_or_loss(broker)
);

/// Members join one by one and the first leaves, each rebalance with the
/// group idle and its offsets committed: three on the mock cluster, two on
/// tansu, whose group coordinator left 4 of 12 partitions unassigned for
/// good after one of three members left (1 of 4 runs beside the reliability
/// suite: see the README's Compatibility section).
async fn workers_joining_and_leaving_share_partitions_without_overlap_or_loss(broker: Broker) {
    let kafka = TestBroker::on(broker);
    let setup = setup(&kafka, 6).await;
    let group = unique_name("g");
    let active = Arc::new(Mutex::new(HashMap::new()));
    let members = if broker == Broker::Mock { 3 } else { 2 };
    let recorders: Vec<Arc<Recorder>> = (0..members)
        .map(|worker| {
            Arc::new(Recorder {
                worker,
                delay: Duration::from_millis(5),
                shared_active: Some(active.clone()),
                ..Recorder::default()
            })
        })
        .collect();
    // Every rebalance happens with the group idle and its offsets committed:
    // the mock cluster refuses OffsetCommit while a group is joining (a real
    // broker takes it), so a revoke under load repeats the uncommitted tail
    // there. Rebalances under load are the reliability suite's storm, which
    // counts those repeats.
    let partitions = 12; // 6 partitions of the topic and of its retry tier
    let mut events = Vec::new();
    let mut running: Vec<Running> = Vec::new();
    for (seed, recorder) in (6..).zip(&recorders) {
        running.push(start(&setup, settings(&group), recorder.clone()));
        assigned_between(&running.iter().collect::<Vec<_>>(), partitions).await;
        events.extend(publish(&setup, 400, seed, 0.0).await);
        handled_and_committed(&setup, &group, &recorders, events.len()).await;
    }
    stop(running.remove(0)).await;
    assigned_between(&running.iter().collect::<Vec<_>>(), partitions).await;
    events.extend(publish(&setup, 400, 9, 0.0).await);
    handled_and_committed(&setup, &group, &recorders, events.len()).await;
    for member in running {
        stop(member).await;
    }
    let mut all: Vec<Seen> = recorders
        .iter()
        .flat_map(|r| r.seen.lock().expect("lock").clone())
        .collect();
    all.sort();
    let unique: HashSet<(i32, i64)> = all.iter().map(|s| (s.1, s.2)).collect();
    assert_eq!(unique.len(), events.len(), "every record handled");
    assert_eq!(
        all.len(),
        events.len(),
        "none handled twice across the rebalances"
    );
    let overlaps: u32 = recorders
        .iter()
        .map(|r| *r.overlaps.lock().expect("lock"))
        .sum();
    assert_eq!(
        overlaps, 0,
        "no partition was handled by two workers at once"
    );
    let per_worker: BTreeMap<usize, usize> = recorders
        .iter()
        .map(|r| (r.worker, r.seen.lock().expect("lock").len()))
        .collect();
    // Shared by more than one; not necessarily by all three: the assignor
    // balances the 12 partitions by count, and a member can hold only the
    // retry tier's (empty) ones (seen once: {0: 400, 1: 1200, 2: 0}).
    assert!(
        per_worker.values().filter(|n| **n > 0).count() >= 2,
        "the work was shared: {per_worker:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_is_lost_under_request_errors_and_a_broker_going_down() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let cluster = mock_cluster(3);
    let setup = setup_replicated(&cluster, 3, 3);
    let mut events = publish(&setup, 450, 10, 0.05).await;
    events.extend(publish(&setup, 450, 11, 0.05).await);
    // Slow enough that the faults below land while records are in flight.
    let recorder = Arc::new(Recorder {
        delay: Duration::from_millis(100),
        ..Recorder::default()
    });
    let mut slow = settings(&unique_name("g"));
    slow.batch_max_records = 10;
    let worker = start(&setup, slow, recorder.clone());
    wait_until("some records handled", Duration::from_secs(60), || {
        !recorder.seen.lock().expect("lock").is_empty()
    })
    .await;
    // Faults on every path the worker uses: fetching, committing, and the
    // DLQ producer; then a broker goes down and comes back.
    cluster.request_errors(
        RDKafkaApiKey::Fetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 5],
    );
    cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT; 5],
    );
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 5],
    );
    cluster.broker_down(2).expect("test setup");
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.broker_up(2).expect("test setup");
    assert!(
        recorder.seen.lock().expect("lock").len() < events.len(),
        "the faults hit a run in progress"
    );
    let good: HashSet<Uuid> = events
        .iter()
        .filter(|(_, p)| !*p)
        .map(|(e, _)| e.event_id())
        .collect();
    let poisoned = events.len() - good.len();
    wait_until(
        "every good record handled",
        Duration::from_secs(120),
        || recorder.seen.lock().expect("lock").len() >= good.len(),
    )
    .await;
    let dlq = setup.catalog.topics[0]
        .dead_letter
        .as_ref()
        .expect("test setup")
        .topic
        .clone();
    let dead = shopstream_tests::consume(
        setup.connection.bootstrap_servers(),
        &[&dlq],
        poisoned,
        Duration::from_secs(60),
    )
    .await
    .expect("test setup");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop(worker).await;
    let handled = handled_ids(&recorder);
    assert_eq!(
        handled.iter().copied().collect::<HashSet<_>>(),
        good,
        "no good record lost"
    );
    assert_eq!(handled.len(), good.len(), "none handled twice");
    let dead_ids: HashSet<(String, String)> = dead
        .iter()
        .map(|m| {
            (
                header(m, headers::ORIGINAL_PARTITION)
                    .expect("test setup")
                    .to_owned(),
                header(m, headers::ORIGINAL_OFFSET)
                    .expect("test setup")
                    .to_owned(),
            )
        })
        .collect();
    assert_eq!(
        dead_ids.len(),
        poisoned,
        "each poison record dead-lettered, no duplicates"
    );
    // And nothing more arrives in the DLQ later.
    let more = shopstream_tests::consume(
        setup.connection.bootstrap_servers(),
        &[&dlq],
        poisoned + 1,
        Duration::from_secs(3),
    )
    .await;
    assert!(more.is_err(), "no duplicate dead letters");
}

on_both_brokers!(
    a_slow_handler_holds_its_partitions_back_instead_of_buffering_without_bound:
        |broker| a_slow_handler_holds_its_partitions_back_instead_of_buffering_without_bound(broker)
);

async fn a_slow_handler_holds_its_partitions_back_instead_of_buffering_without_bound(
    broker: Broker,
) {
    let kafka = TestBroker::on(broker);
    let setup = setup(&kafka, 2).await;
    let events = publish(&setup, 600, 13, 0.0).await;
    let recorder = Arc::new(Recorder {
        delay: Duration::from_millis(30),
        ..Recorder::default()
    });
    let mut tight = settings(&unique_name("g"));
    tight.max_in_flight_records = 20;
    tight.batch_max_records = 10;
    let worker = start(&setup, tight, recorder.clone());
    let metrics = worker.metrics.clone();
    let mut full_seen = 0;
    wait_until("every record handled", Duration::from_secs(120), || {
        full_seen = full_seen.max(metrics.full_partitions.get());
        recorder.seen.lock().expect("lock").len() >= events.len()
    })
    .await;
    stop(worker).await;
    assert!(full_seen >= 1, "the in-flight bound held a partition back");
    assert_eq!(recorder.seen.lock().expect("lock").len(), events.len());
}

on_both_brokers!(
    a_partition_held_back_by_backpressure_always_goes_on:
        |broker| a_partition_held_back_by_backpressure_always_goes_on(broker)
);

/// A partition is held back when its in-flight bound fills and goes on when
/// its task drains. With a fast handler the task may drain before its reader
/// starts waiting; the partition must not stay held with nothing in flight.
async fn a_partition_held_back_by_backpressure_always_goes_on(broker: Broker) {
    let kafka = TestBroker::on(broker);
    let setup = setup(&kafka, 4).await;
    let events = publish(&setup, 2000, 17, 0.0).await;
    let recorder = Arc::new(Recorder::default());
    let mut tight = settings(&unique_name("g"));
    tight.max_in_flight_records = 2;
    tight.batch_max_records = 2;
    tight.batch_linger_ms = 0;
    let worker = start(&setup, tight, recorder.clone());
    let metrics = worker.metrics.clone();
    // Slow by design (a fetch round trip every two records); a stall is no
    // progress at all.
    handled_without_stalling(events.len(), Duration::from_secs(10), &metrics, || {
        recorder.seen.lock().expect("lock").len()
    })
    .await;
    stop(worker).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_current_thread_runtime_is_refused() {
    let cluster = mock_cluster(1);
    let setup = setup_replicated(&cluster, 1, 1);
    let result = run(
        &setup.connection,
        &settings("g"),
        Routes::new(&setup.catalog, &[]).expect("every topic"),
        Named(Arc::new(Recorder::default())),
        Arc::new(Metrics::default()),
        Arc::new(AtomicBool::new(false)),
        Shutdown::new(),
    )
    .await;
    assert!(matches!(result, Err(WorkerError::CurrentThreadRuntime)));
}

#[allow(dead_code)]
fn order(event: &AnyEvent) -> Option<&OrderEvent> {
    match event {
        AnyEvent::Order(o) => Some(o),
        _ => None,
    }
}

on_both_brokers!(
    a_partition_revoked_while_held_back_by_backpressure_resumes_when_it_comes_back:
        |broker| a_partition_revoked_while_held_back_by_backpressure_resumes_when_it_comes_back(broker)
);

async fn a_partition_revoked_while_held_back_by_backpressure_resumes_when_it_comes_back(
    broker: Broker,
) {
    let kafka = TestBroker::on(broker);
    let setup = setup(&kafka, 2).await;
    let group = unique_name("g");
    // 30 s of handling for one worker (batches of 2 every 200 ms per
    // partition): still held back when the second one is assigned, however
    // slow the machine makes the rebalance.
    let events = publish(&setup, 600, 19, 0.0).await;
    let recorder = Arc::new(Recorder {
        delay: Duration::from_millis(200),
        ..Recorder::default()
    });
    let mut tight = settings(&group);
    tight.max_in_flight_records = 8;
    tight.batch_max_records = 2;
    let a = start(&setup, tight.clone(), recorder.clone());
    wait_until(
        "the first worker is held back by backpressure",
        Duration::from_secs(30),
        || a.metrics.full_partitions.get() > 0,
    )
    .await;
    // A second member joins and leaves: the first one's partitions are
    // revoked while held back and come back to it.
    let other = Arc::new(Recorder {
        delay: Duration::from_millis(200),
        ..Recorder::default()
    });
    let b = start(&setup, tight, other.clone());
    // The rebalance waits for the first worker's revoke, which waits for
    // its batches in flight: beside the reliability suite it once took
    // longer than 30 s (the first worker may then have handled everything
    // before the revoke; the scenario still must not stall).
    wait_until(
        "the second worker takes a partition",
        Duration::from_secs(90),
        || b.metrics.assigned_partitions.get() > 0,
    )
    .await;
    assert!(
        a.metrics.revoked_partitions.get() > 0,
        "the first worker gave a partition up"
    );
    stop(b).await;
    handled_without_stalling(events.len(), Duration::from_secs(60), &a.metrics, || {
        recorder.seen.lock().expect("lock").len() + other.seen.lock().expect("lock").len()
    })
    .await;
    stop(a).await;
}

/// Waits until `handled()` reaches `total`, failing when it stays put for
/// `patience` (a stall, not slowness).
async fn handled_without_stalling(
    total: usize,
    patience: Duration,
    metrics: &Metrics,
    handled: impl Fn() -> usize,
) {
    let (mut last, mut progressed) = (0, Instant::now());
    loop {
        let now = handled();
        if now >= total {
            return;
        }
        if now > last {
            (last, progressed) = (now, Instant::now());
        }
        assert!(
            progressed.elapsed() < patience,
            "stalled at {now} of {total} records with {} partition(s) paused, {} full",
            metrics.paused_partitions.get(),
            metrics.full_partitions.get()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

on_both_brokers!(
    a_forward_its_group_already_wrote_is_not_written_again:
        |broker| a_forward_its_group_already_wrote_is_not_written_again(broker)
);

/// A forward its group already wrote (a restarted worker, or a new owner,
/// redoing the records since the last commit) is not written again; a new
/// record is, and so is another group's forward of the same record.
async fn a_forward_its_group_already_wrote_is_not_written_again(broker: Broker) {
    use consumers::fetched::Fetched;
    use consumers::forward::{now_ms, Failure, Forwarder, Ledger};
    let kafka = TestBroker::on(broker);
    let dlq = unique_name("orders-dlq");
    kafka.create_topic(&dlq, 2).await.expect("topic");
    let mut config = rdkafka::ClientConfig::new();
    config.set("bootstrap.servers", kafka.bootstrap_servers());
    let record = |offset: i64| {
        Fetched::new(
            "orders".into(),
            (1, offset),
            Some(b"order-1".to_vec()),
            Some(b"not avro".to_vec()),
            Default::default(),
            Some(now_ms()),
        )
    };
    let failure = Failure {
        class: "malformed".into(),
        message: "bad bytes".into(),
        attempts: 1,
    };
    let stop = Shutdown::new();
    let forward = |group: &'static str, offsets: Vec<i64>| {
        let (config, stop, failure, dlq) =
            (config.clone(), stop.clone(), failure.clone(), dlq.clone());
        async move {
            let forwarder = Forwarder::new(&config, gap_confirmation(), group).expect("forwarder");
            let mut ledger = Ledger::since(record(offsets[0]).timestamp_ms);
            for offset in offsets {
                forwarder
                    .forward(&dlq, &record(offset), &failure, None, &mut ledger, &stop)
                    .await
                    .expect("forwarded");
            }
        }
    };
    forward("workers", vec![42]).await;
    // Restarted: the same record again, then the next one.
    forward("workers", vec![42, 43]).await;
    forward("auditors", vec![42]).await;
    let written = tokio::task::spawn_blocking(move || {
        consumers::readback::read_since(&config, &dlq, None, gap_confirmation()).expect("read")
    })
    .await
    .expect("read task");
    let mut seen: Vec<(String, String)> = written
        .iter()
        .map(|m| {
            (
                header(m, headers::CONSUMER_GROUP)
                    .unwrap_or_default()
                    .to_owned(),
                header(m, headers::ORIGINAL_OFFSET)
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect();
    seen.sort();
    let expected: Vec<(String, String)> =
        [("auditors", "42"), ("workers", "42"), ("workers", "43")]
            .iter()
            .map(|(g, o)| (g.to_string(), o.to_string()))
            .collect();
    assert_eq!(seen, expected);
}
