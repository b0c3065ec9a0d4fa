//! The analytics job: a consumer-group member that decodes events, adds them
//! to per-Kafka-partition partial aggregates and, every flush interval, writes
//! the partials (merged) together with the offset each partition reaches in
//! one ClickHouse insert. ClickHouse, not Kafka, holds the job's position: on
//! assignment each partition resumes right after the offset stored with its
//! last insert, so a crash at any moment neither loses nor double-counts.
//! Undecodable events go to the topic's DLQ (acknowledged before their offset
//! is flushed). Each flush first commits its offsets to Kafka: the group's
//! fence against a replaced replica writing (`Lease`); Kafka's offsets are
//! otherwise unused.
//!
//! The loop runs on a thread of its own with a blocking consumer, so the
//! rebalance callback can wait for ClickHouse before partitions start.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backbone::catalog::Catalog;
use backbone::codec::{DecodeHint, Decoder};
use backbone::config::{AnalyticsSettings, ClickHouseSettings, LateEvents};
use backbone::events::EventType;
use backbone::headers;
use backbone::kafka::KafkaConnection;
use backbone::metrics::{Counter, FloatGauge, Gauge, Registry, Unit};
use backbone::shutdown::Shutdown;
use consumers::continuity::{self, Continuity};
use consumers::fetched::Fetched;
use consumers::forward::{now_ms, Failure, Forwarder, Ledger};
use consumers::projection::rows::{datetime, Malformed};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::aggregate::{Arrival, Partial, Watermark, Windows};
use crate::store;

/// The job's metrics, registered in one registry (see `backbone::metrics`).
#[derive(Debug, Default)]
pub struct JobMetrics {
    pub events: Counter,
    pub late: Counter,
    pub diverted: Counter,
    pub dead_lettered: Counter,
    pub flushes: Counter,
    pub inserts: Counter,
    /// Microseconds spent in acknowledged inserts.
    pub insert_micros: Counter,
    pub insert_retries: Counter,
    /// Inserts whose answer did not come that ClickHouse finished and
    /// stored anyway: found in the stored offsets, not made again.
    pub inserts_landed_unanswered: Counter,
    /// Fetches that skipped records, fetched again from the expected offset.
    pub fetch_gaps: Counter,
    /// Flushes held back because the group coordinator refused this
    /// replica's commit (see `Lease`).
    pub fenced_flushes: Counter,
    /// Partitions the group assigned to this replica.
    pub assigned_partitions: Gauge,
    /// Partitions paused until a record's forward (to its DLQ or the late
    /// topic) is acknowledged.
    pub waiting_on_forwards: Gauge,
    /// Assignments the group gave this replica (one per rebalance it took
    /// part in).
    pub rebalances: Counter,
    /// When the last flush was stored, in Unix seconds: how fresh the read
    /// models are, as `time()` minus it.
    pub last_flush: FloatGauge,
    /// Hours compacted (`crate::hours`).
    pub hours_compacted: Counter,
}

impl JobMetrics {
    /// A registry holding every metric of the job (shared, not copied).
    pub fn registry(&self) -> Registry {
        let mut r = Registry::default();
        for (name, help, counter) in [
            (
                "shopstream_analytics_events",
                "Events added to windows",
                &self.events,
            ),
            (
                "shopstream_analytics_late_events",
                "Events older than the watermark",
                &self.late,
            ),
            (
                "shopstream_analytics_diverted_events",
                "Late events sent to the late topic",
                &self.diverted,
            ),
            (
                "shopstream_analytics_dead_lettered",
                "Undecodable events sent to the DLQ",
                &self.dead_lettered,
            ),
            (
                "shopstream_analytics_flushes",
                "Partition flushes stored in ClickHouse",
                &self.flushes,
            ),
            (
                "shopstream_analytics_inserts",
                "ClickHouse inserts acknowledged",
                &self.inserts,
            ),
            (
                "shopstream_analytics_insert_retries",
                "ClickHouse inserts retried",
                &self.insert_retries,
            ),
            (
                "shopstream_analytics_inserts_landed_unanswered",
                "ClickHouse inserts whose answer did not come, found stored once the server finished them (not made again)",
                &self.inserts_landed_unanswered,
            ),
            (
                "shopstream_analytics_fetch_gaps",
                "Fetches that skipped records, fetched again from the expected offset",
                &self.fetch_gaps,
            ),
            (
                "shopstream_analytics_hours_compacted",
                "Hours compacted from their partials for fast day-long reads",
                &self.hours_compacted,
            ),
            (
                "shopstream_analytics_rebalances",
                "Rebalances that gave this replica an assignment",
                &self.rebalances,
            ),
            (
                "shopstream_analytics_fenced_flushes",
                "Flushes held because Kafka did not take this replica's commit (another generation, a rebalance, or no answer within 2 s)",
                &self.fenced_flushes,
            ),
        ] {
            r.register(name, help, counter.clone());
        }
        r.register_with_unit(
            "shopstream_analytics_insert",
            "Time spent in acknowledged inserts",
            Unit::Other("microseconds".into()),
            self.insert_micros.clone(),
        );
        r.register(
            "shopstream_analytics_assigned_partitions",
            "Partitions the group assigned to this replica",
            self.assigned_partitions.clone(),
        );
        r.register(
            "shopstream_analytics_partitions_waiting_on_forwards",
            "Partitions paused until a record's forward to its DLQ or the late topic is acknowledged (the others go on)",
            self.waiting_on_forwards.clone(),
        );
        r.register_with_unit(
            "shopstream_analytics_last_flush_timestamp",
            "When the last flush was stored in ClickHouse (0 before the first): the read models are as fresh as time() minus this",
            Unit::Seconds,
            self.last_flush.clone(),
        );
        r
    }
}

/// One assigned partition's unflushed work.
struct PartitionState {
    partial: Partial,
    watermark: Watermark,
    /// Last offset taken into `partial` (or forwarded), if any since the flush.
    last_offset: Option<i64>,
    /// The offset the next record must have: right after the stored one.
    continuity: Continuity,
    /// What the group had forwarded from this partition before this
    /// assignment, from its first record on.
    ledger: Option<Ledger>,
    /// A record of this partition could not be forwarded (to its DLQ or
    /// the late topic; only when stopping): nothing after it is taken, so
    /// no flush stores an offset past a dead letter never written.
    held_back: bool,
    /// A forward not acknowledged within `FORWARD_WAIT`: the partition is
    /// paused and takes nothing until it is (see `settle_forwards`).
    forwarding: Option<PendingForward>,
}

/// A record's forward still in flight, and what to count once it lands.
struct PendingForward {
    offset: i64,
    /// Whether it was written, and the partition's ledger back.
    done: tokio::sync::oneshot::Receiver<(bool, Ledger)>,
    counter: Counter,
}

impl PartitionState {
    /// Nothing counted yet; the next record must be `start` (the offset
    /// after the stored one), or anything when nothing is stored.
    fn starting_at(start: Option<i64>, shared: &Shared) -> Self {
        Self {
            partial: Partial::default(),
            watermark: Watermark::new(shared.lateness_ms),
            last_offset: None,
            continuity: Continuity::starting_at(start, shared.gap_confirmation),
            ledger: None,
            held_back: false,
            forwarding: None,
        }
    }

    /// A forward of the record at `offset` ended with `answer` (`None` when
    /// its task ended without one: it panicked): the record is taken when
    /// it was written, and the partition held back otherwise. Whether it
    /// was written.
    fn forwarded(
        &mut self,
        offset: i64,
        answer: Option<(bool, Ledger)>,
        counter: &Counter,
    ) -> bool {
        let Some((written, ledger)) = answer else {
            self.held_back = true;
            return false;
        };
        self.ledger.get_or_insert(ledger);
        if written {
            counter.inc();
            self.last_offset = Some(offset);
        } else {
            self.held_back = true;
        }
        written
    }
}

type Key = (String, i32);

/// Shared with the thread of a commit that may outlive its wait
/// (`Lease::renew`) and the one that leaves the group (`leave_within`).
type JobConsumer = Arc<BaseConsumer<JobContext>>;

/// Assigned partitions by topic, then partition: a record finds its state
/// from its borrowed topic name, without allocating.
type PartitionStates = HashMap<String, HashMap<i32, PartitionState>>;

struct Shared {
    partitions: Mutex<PartitionStates>,
    client: clickhouse::Client,
    /// How long a ClickHouse request may take.
    timeout: Duration,
    runtime: tokio::runtime::Handle,
    lateness_ms: i64,
    /// `kafka.gap_confirmation_ms`.
    gap_confirmation: Duration,
    shutdown: Shutdown,
    metrics: Arc<JobMetrics>,
    /// The server keeps a partials insert made again once, by its token
    /// (`store::deduplication_token`): 22.2 and later.
    deduplicating: bool,
    /// A partition was paused for a forward since the start: each flush
    /// then resumes every partition not waiting on one (see `resume_all`).
    paused_for_forwards: AtomicBool,
}

/// Resumes assigned partitions where ClickHouse says they stopped.
struct JobContext {
    shared: Arc<Shared>,
}

impl ClientContext for JobContext {}

impl ConsumerContext for JobContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let stored = self.stored_offsets();
                let mut partitions = self.shared.partitions.lock().expect("partitions lock");
                let keys: Vec<Key> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                for key in keys {
                    let start = stored.get(&key).map(|o| o + 1);
                    let offset = start.map_or(Offset::Beginning, Offset::Offset);
                    let _ = tpl.set_partition_offset(&key.0, key.1, offset);
                    partitions
                        .entry(key.0)
                        .or_default()
                        .insert(key.1, PartitionState::starting_at(start, &self.shared));
                }
                self.count_assigned(&partitions);
                drop(partitions);
                self.shared.metrics.rebalances.inc();
                tracing::info!(
                    partitions = tpl.count(),
                    "Partitions assigned; resuming after the offsets stored in ClickHouse."
                );
                // Cooperative: the partitions are added to those kept, not
                // put in their place (eager when `kafka.client` says `range`).
                let assigned = match consumer.rebalance_protocol() {
                    RebalanceProtocol::Cooperative => consumer.incremental_assign(tpl),
                    _ => consumer.assign(tpl),
                };
                if let Err(error) = assigned {
                    tracing::error!(%error, "Assigning partitions failed.");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // Unflushed partials are dropped: the next owner starts after
                // the last stored offset and counts those events itself.
                let mut partitions = self.shared.partitions.lock().expect("partitions lock");
                for element in tpl.elements() {
                    let removed = partitions
                        .get_mut(element.topic())
                        .and_then(|topic| topic.remove(&element.partition()));
                    // A dead letter still being written when its partition
                    // moves: given its grace to land before the next owner
                    // reads which were written, or it could write it again.
                    if let Some(pending) = removed.and_then(|state| state.forwarding) {
                        self.shared.metrics.waiting_on_forwards.dec();
                        let landed = self
                            .shared
                            .runtime
                            .block_on(tokio::time::timeout(FORWARD_GRACE, pending.done));
                        if !matches!(landed, Ok(Ok((true, _)))) {
                            tracing::warn!(topic = element.topic(), partition = element.partition(), offset = pending.offset, "A record's forward was not acknowledged before its partition moved; the next owner forwards it again unless it lands first.");
                        }
                    }
                }
                self.count_assigned(&partitions);
                drop(partitions);
                tracing::info!(
                    partitions = tpl.count(),
                    "Partitions revoked; their unflushed partials are left to the next owner."
                );
                let unassigned = match consumer.rebalance_protocol() {
                    RebalanceProtocol::Cooperative => consumer.incremental_unassign(tpl),
                    _ => consumer.unassign(),
                };
                if let Err(error) = unassigned {
                    tracing::error!(%error, "Unassigning partitions failed.");
                }
            }
            other => tracing::error!(error = ?other, "Rebalance error."),
        }
    }
}

impl JobContext {
    fn count_assigned(&self, partitions: &PartitionStates) {
        let assigned = partitions.values().map(|p| p.len() as i64).sum();
        self.shared.metrics.assigned_partitions.set(assigned);
    }

    /// Waits (with backoff) until ClickHouse answers: starting a partition
    /// anywhere but after its stored offset would count events twice.
    fn stored_offsets(&self) -> HashMap<Key, i64> {
        let mut delay = Duration::from_millis(200);
        loop {
            // After the inserts running now: one a replica gave up on
            // before these partitions came here may still land.
            match self.shared.runtime.block_on(store::settled_offsets(
                &self.shared.client,
                None,
                self.shared.timeout,
            )) {
                Ok(offsets) => return offsets,
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?delay, "Reading the stored offsets from ClickHouse failed; retrying.");
                    if self.shared.shutdown.is_cancelled() {
                        return HashMap::new();
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// How long a dead letter in flight at shutdown may still take.
const FORWARD_GRACE: Duration = Duration::from_secs(10);

/// Runs the job until `shutdown`; flushes what it holds before returning.
/// Call it from `spawn_blocking`.
pub fn run(
    connection: &KafkaConnection,
    catalog: &Catalog,
    settings: &AnalyticsSettings,
    clickhouse: &ClickHouseSettings,
    metrics: Arc<JobMetrics>,
    ready: Arc<AtomicBool>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    // Called on a blocking thread of the runtime, which may block on it.
    let runtime = tokio::runtime::Handle::current();
    let client = consumers::projection::client(clickhouse, true);
    let timeout = Duration::from_millis(clickhouse.timeout_ms);
    let target = consumers::projection::ddl::Target::new(
        &clickhouse.database,
        clickhouse.cluster.as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    let Some(deduplicating) = runtime.block_on(deduplicating(&client, &target, timeout, &shutdown))
    else {
        return Ok(());
    };
    if settings.compact_every_ms > 0 {
        runtime.spawn(crate::hours::compact_every(
            client.clone(),
            crate::hours::Schedule::of(settings),
            timeout,
            metrics.hours_compacted.clone(),
            shutdown.clone(),
        ));
    }
    let shared = Arc::new(Shared {
        partitions: Mutex::new(HashMap::new()),
        client,
        timeout,
        runtime: runtime.clone(),
        lateness_ms: settings.allowed_lateness_ms,
        gap_confirmation: connection.gap_confirmation(),
        shutdown: shutdown.clone(),
        metrics,
        deduplicating,
        paused_for_forwards: AtomicBool::new(false),
    });
    let mut config = connection.client_config();
    config
        .set("group.id", &settings.group_id)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
    // Unless the user's client properties say otherwise: quick failover,
    // bounded prefetch, fetches that return within 100 ms (librdkafka
    // waits up to 500 ms by default, half the freshness budget on a broker
    // that holds fetches), and cooperative rebalancing: a replica joining
    // or leaving moves only the partitions changing hands, and the others'
    // partials are kept. A prefetch that filled while the job flushed
    // postpones the partition's next fetch by 10 ms, not librdkafka's 1 s.
    // 4 MiB of prefetch keeps a backlogged job under 100 MB (16 MiB peaked
    // at 123-130 MB in analytics-bench); it absorbs less of a flush's
    // pause, so the highest rate sustained in the bench's ramp fell from
    // 120k to 80k events/s (BENCHMARKS.md, issue 22).
    for (key, value) in [
        ("session.timeout.ms", "10000"),
        ("heartbeat.interval.ms", "1000"),
        ("queued.max.messages.kbytes", "4096"),
        ("fetch.queue.backoff.ms", "10"),
        ("fetch.wait.max.ms", "100"),
        ("partition.assignment.strategy", "cooperative-sticky"),
    ] {
        if config.get(key).is_none() {
            config.set(key, value);
        }
    }
    let mut lease = Lease::new(&config).map_err(anyhow::Error::msg)?;
    let consumer: JobConsumer = Arc::new(config.create_with_context(JobContext {
        shared: shared.clone(),
    })?);
    let topics: Vec<&str> = catalog.topics.iter().map(|t| t.name.as_str()).collect();
    consumer.subscribe(&topics)?;
    let forwarder = Arc::new(Forwarder::new(
        &connection.client_config(),
        connection.gap_confirmation(),
        &settings.group_id,
    )?);
    // A dead letter being written when the shutdown comes is finished (and
    // its offset flushed with the rest), or a restart would write it again;
    // given up only when Kafka cannot take it within the grace.
    let forward_stop = Shutdown::new();
    {
        let (shutdown, stop) = (shutdown.clone(), forward_stop.clone());
        runtime.spawn(async move {
            shutdown.cancelled().await;
            tokio::time::sleep(FORWARD_GRACE).await;
            stop.cancel();
        });
    }
    // Per topic: its event type and DLQ.
    let routes: HashMap<&str, (EventType, Option<&str>)> = catalog
        .topics
        .iter()
        .map(|t| {
            (
                t.name.as_str(),
                (t.event, t.dead_letter.as_ref().map(|d| d.topic.as_str())),
            )
        })
        .collect();
    let forwards = Forwards {
        forwarder,
        stop: forward_stop,
    };
    let windows = Windows::new(settings.window_ms);
    let decoder = Decoder::default();
    let flush_every = Duration::from_millis(settings.flush_interval_ms);
    let mut next_flush = Instant::now() + flush_every;
    ready.store(true, Ordering::SeqCst);
    tracing::info!(group = %settings.group_id, topics = ?topics, "Analytics job subscribed.");
    let handle = |result: KafkaResult<BorrowedMessage<'_>>| match result {
        Ok(message) => {
            // Only subscribed topics arrive.
            let Some(&(event_type, dlq)) = routes.get(message.topic()) else {
                return;
            };
            if !admit(&shared, &consumer, &message) {
                return;
            }
            take(
                &shared,
                &consumer,
                &message,
                (event_type, dlq),
                &decoder,
                windows,
                settings,
                &forwards,
            );
        }
        Err(error) => tracing::warn!(%error, "Consumer error; librdkafka keeps retrying."),
    };
    while !shutdown.is_cancelled() {
        if let Some(result) = consumer.poll(Duration::from_millis(50)) {
            handle(result);
        }
        settle_forwards(&shared, &consumer, None);
        if Instant::now() >= next_flush {
            // Everything fetched meanwhile goes into this flush: after a
            // flush that outlasted the interval (a slow ClickHouse), the
            // next would otherwise carry one record, and a backlog would
            // drain at one record per insert.
            for _ in 0..MAX_TAKEN_BEFORE_A_FLUSH {
                if shutdown.is_cancelled() {
                    break;
                }
                match consumer.poll(Duration::ZERO) {
                    Some(result) => handle(result),
                    None => break,
                }
            }
            resume_all(&shared, &consumer);
            if let Err(abandoned) = flush_all(&shared, &consumer, &mut lease) {
                if shutdown.is_cancelled() {
                    break;
                }
                return Err(abandoned.into());
            }
            // On a fixed cadence, so an insert's own time does not stretch
            // the interval (and freshness) unless it outlasts it.
            next_flush = (next_flush + flush_every).max(Instant::now());
        }
    }
    ready.store(false, Ordering::SeqCst);
    // The forwards in flight land or are given up (`FORWARD_GRACE`) first,
    // so the flush below includes the dead letters written.
    settle_forwards(&shared, &consumer, Some(FORWARD_GRACE + CLOSE_GRACE));
    tracing::info!("Stopping: flushing the partials held.");
    // If ClickHouse is away, what is held is counted again by the next run.
    let _ = flush_all(&shared, &consumer, &mut lease);
    leave_within(consumer, CLOSE_GRACE);
    Ok(())
}

/// Whether the server deduplicates partials inserts by token (made so when
/// it can, see `store::deduplicate_retries`), asking until it answers;
/// `None` when stopped first.
async fn deduplicating(
    client: &clickhouse::Client,
    target: &consumers::projection::ddl::Target,
    timeout: Duration,
    shutdown: &Shutdown,
) -> Option<bool> {
    loop {
        match store::deduplicate_retries(client, target, timeout).await {
            Ok((version, true)) => {
                tracing::info!(%version, "ClickHouse deduplicates a partials insert made again by its token.");
                return Some(true);
            }
            Ok((version, false)) => {
                tracing::info!(%version, "ClickHouse predates insert_deduplication_token (22.2): an unanswered partials insert is waited out in system.processes before it is made again.");
                return Some(false);
            }
            Err(error) => {
                tracing::warn!(%error, "Cannot ask ClickHouse for its version; asking again.");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

/// How long leaving the group may take at shutdown.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// Closes the consumer (leaving the group) on a thread of its own, waiting
/// at most `grace`: librdkafka's close waited without end in a rebalance
/// storm after the group refused a commit. Exiting without it loses
/// nothing: ClickHouse holds the position, and the group drops a member
/// that did not leave after its session timeout.
fn leave_within(consumer: JobConsumer, grace: Duration) {
    let (left, done) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("group-leave".into())
        .spawn(move || {
            drop(consumer);
            let _ = left.send(());
        });
    if spawned.is_err() || done.recv_timeout(grace).is_err() {
        tracing::warn!(
            ?grace,
            "Kafka did not confirm leaving the group in time; exiting without it (the group drops this replica after its session timeout)."
        );
    }
}

/// Whether `message` is the next record of its partition (seeking back when
/// records are missing before it); records of partitions not assigned are
/// left to `take`, which ignores them.
fn admit(
    shared: &Shared,
    consumer: &BaseConsumer<JobContext>,
    message: &BorrowedMessage<'_>,
) -> bool {
    let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
    let mut partitions = shared.partitions.lock().expect("partitions lock");
    let Some(state) = partitions
        .get_mut(topic)
        .and_then(|t| t.get_mut(&partition))
    else {
        return true;
    };
    state.continuity.admit(
        (topic, partition, offset),
        shared.metrics.fetch_gaps.inner(),
        |from| continuity::seek_back(consumer, topic, partition, from),
    )
}

/// What forwarding a record to its DLQ or the late topic needs.
struct Forwards {
    forwarder: Arc<Forwarder>,
    /// Fires `FORWARD_GRACE` after the shutdown.
    stop: Shutdown,
}

/// How long the job waits for a forward before it pauses the partition
/// and goes on with the others: most are acknowledged within milliseconds,
/// and a pause costs the partition a fetch again.
const FORWARD_WAIT: Duration = Duration::from_secs(1);

#[allow(clippy::too_many_arguments)]
fn take(
    shared: &Shared,
    consumer: &JobConsumer,
    message: &BorrowedMessage<'_>,
    (event_type, dlq): (EventType, Option<&str>),
    decoder: &Decoder,
    windows: Windows,
    settings: &AnalyticsSettings,
    forwards: &Forwards,
) {
    let (topic, partition) = (message.topic(), message.partition());
    let metrics = &shared.metrics;
    let timestamp_ms = message.timestamp().to_millis();
    let payload = message.payload().unwrap_or_default();
    let hint = DecodeHint::lazy(payload, Some(event_type), || {
        headers::value(message.headers()?, headers::CONTENT_TYPE)
            .and_then(|v| std::str::from_utf8(v).ok())
    });
    let decoded = decoder
        .decode(payload, hint)
        .map_err(|e| (e.class().to_owned(), e.to_string()))
        .and_then(|event| match datetime("occurred_at", event.occurred_at()) {
            Ok(_) => Ok(event),
            Err(Malformed(reason)) => Err(("out_of_range".to_owned(), reason)),
        });
    // Where the record goes instead of its window, if anywhere, and what
    // counts it there.
    let (to, class, reason, counter) = match decoded {
        Ok(event) => {
            let mut partitions = shared.partitions.lock().expect("partitions lock");
            let Some(state) = partitions
                .get_mut(topic)
                .and_then(|t| t.get_mut(&partition))
            else {
                return;
            };
            if state.held_back || state.forwarding.is_some() {
                return;
            }
            state
                .ledger
                .get_or_insert_with(|| Ledger::since(timestamp_ms));
            let late = state.watermark.observe(event.occurred_at()) == Arrival::Late;
            if late {
                metrics.late.inc();
            }
            if !(late && settings.late_events == LateEvents::Divert) {
                state.partial.add(windows, &event);
                state.last_offset = Some(message.offset());
                metrics.events.inc();
                return;
            }
            (
                settings.late_topic.as_str(),
                "late_event".to_owned(),
                format!(
                    "older than the watermark by more than {} ms",
                    settings.allowed_lateness_ms
                ),
                &metrics.diverted,
            )
        }
        Err((class, reason)) => {
            let Some(dlq) = dlq else {
                tracing::warn!(%topic, partition, offset = message.offset(), %reason, "Undecodable event and no DLQ: skipped.");
                return;
            };
            (dlq, class, reason, &metrics.dead_lettered)
        }
    };
    // Acknowledged before the offset can be flushed; the lock is not held
    // meanwhile, so a flush is never kept waiting on Kafka.
    let Some(ledger) = shared
        .partitions
        .lock()
        .expect("partitions lock")
        .get_mut(topic)
        .and_then(|t| t.get_mut(&partition))
        .filter(|state| !state.held_back && state.forwarding.is_none())
        .map(|state| {
            state
                .ledger
                .take()
                .unwrap_or_else(|| Ledger::since(timestamp_ms))
        })
    else {
        return;
    };
    let fetched = Fetched::from_message(message, Arc::from(topic));
    let failure = Failure {
        class,
        message: reason,
        attempts: 1,
    };
    let (answer, mut done) = tokio::sync::oneshot::channel();
    let (forwarder, stop, to) = (
        forwards.forwarder.clone(),
        forwards.stop.clone(),
        to.to_owned(),
    );
    shared.runtime.spawn(async move {
        let mut ledger = ledger;
        let written = forwarder
            .forward(&to, &fetched, &failure, None, &mut ledger, &stop)
            .await
            .is_ok();
        let _ = answer.send((written, ledger));
    });
    let answered = shared
        .runtime
        .block_on(tokio::time::timeout(FORWARD_WAIT, &mut done));
    let offset = message.offset();
    let mut partitions = shared.partitions.lock().expect("partitions lock");
    // Only a poll revokes partitions, and this thread is the one polling.
    let Some(state) = partitions
        .get_mut(topic)
        .and_then(|t| t.get_mut(&partition))
    else {
        return;
    };
    match answered {
        Ok(answer) => {
            state.forwarded(offset, answer.ok(), counter);
        }
        Err(_) => {
            tracing::warn!(%topic, partition, offset, "A record's forward is not acknowledged yet; its partition waits for it, the others go on.");
            state.forwarding = Some(PendingForward {
                offset,
                done,
                counter: counter.clone(),
            });
            shared.metrics.waiting_on_forwards.inc();
            shared.paused_for_forwards.store(true, Ordering::SeqCst);
            let mut paused = TopicPartitionList::new();
            paused.add_partition(topic, partition);
            if let Err(error) = consumer.pause(&paused) {
                tracing::warn!(%error, %topic, partition, "Pausing the partition failed; what it fetches meanwhile is fetched again.");
            }
        }
    }
}

/// Takes the records whose forwards have ended (waiting for every one up
/// to `wait`, if given): written, the partition goes on right after the
/// record, fetching again what it skipped meanwhile; given up, it stays
/// held back.
fn settle_forwards(shared: &Shared, consumer: &JobConsumer, wait: Option<Duration>) {
    if shared.metrics.waiting_on_forwards.get() == 0 {
        return;
    }
    let given_up = wait.map(|wait| Instant::now() + wait);
    let mut resumed = TopicPartitionList::new();
    let mut partitions = shared.partitions.lock().expect("partitions lock");
    for (topic, states) in partitions.iter_mut() {
        for (partition, state) in states.iter_mut() {
            let Some(pending) = &mut state.forwarding else {
                continue;
            };
            // `None` while in flight; `Some(None)` when the forward's task
            // ended without an answer (it panicked).
            let answer = match given_up {
                Some(at) => shared
                    .runtime
                    .block_on(tokio::time::timeout(
                        at.saturating_duration_since(Instant::now()),
                        &mut pending.done,
                    ))
                    .ok()
                    .map(Result::ok),
                None => match pending.done.try_recv() {
                    Err(tokio::sync::oneshot::error::TryRecvError::Empty) => None,
                    answer => Some(answer.ok()),
                },
            };
            let Some(answer) = answer else {
                continue;
            };
            let pending = state.forwarding.take().expect("a pending forward");
            shared.metrics.waiting_on_forwards.dec();
            if state.forwarded(pending.offset, answer, &pending.counter) {
                // Whatever was fetched after it was skipped: fetched again.
                let next = pending.offset + 1;
                state.continuity = Continuity::starting_at(Some(next), shared.gap_confirmation);
                let _ = resumed.add_partition_offset(topic, *partition, Offset::Offset(next));
            }
        }
    }
    drop(partitions);
    for element in resumed.elements() {
        if let Offset::Offset(next) = element.offset() {
            if let Err(error) =
                continuity::seek_back(&**consumer, element.topic(), element.partition(), next)
            {
                tracing::debug!(%error, "Seeking after a forward failed; the continuity check seeks again.");
            }
        }
    }
    if resumed.count() > 0 {
        if let Err(error) = consumer.resume(&resumed) {
            tracing::warn!(%error, "Resuming partitions after their forwards failed; the next flush resumes them.");
        }
    }
}

/// Resumes every assigned partition not waiting on a forward, once any was
/// paused for one: librdkafka applies a pause on its own thread but drops
/// a resume that comes before it, leaving the partition paused (see the
/// worker's `reassert_resumes`); resuming one not paused costs nothing.
fn resume_all(shared: &Shared, consumer: &JobConsumer) {
    if !shared.paused_for_forwards.load(Ordering::SeqCst) {
        return;
    }
    let mut running = TopicPartitionList::new();
    for (topic, states) in shared.partitions.lock().expect("partitions lock").iter() {
        for (partition, state) in states {
            if state.forwarding.is_none() {
                running.add_partition(topic, *partition);
            }
        }
    }
    if running.count() > 0 {
        if let Err(error) = consumer.resume(&running) {
            tracing::debug!(%error, "Resuming the partitions failed; tried again at the next flush.");
        }
    }
}

/// Stores every partition's partials with its offset, retrying until
/// ClickHouse takes them, while the group still recognises this replica as
/// their owner (`Lease`).
fn flush_all(shared: &Shared, consumer: &JobConsumer, lease: &mut Lease) -> Result<(), Abandoned> {
    let reach = {
        let partitions = shared.partitions.lock().expect("partitions lock");
        reaching(partitions.iter().flat_map(|(topic, states)| {
            states.iter().filter_map(|(partition, state)| {
                Some((topic.as_str(), *partition, state.last_offset?))
            })
        }))
    };
    if reach.count() == 0 {
        return Ok(());
    }
    let span = backbone::traced_span!("analytics flush", partitions = reach.count());
    let _in_span = span.enter();
    // Refused: held, and flushed next time for the partitions the rebalance
    // that follows leaves here.
    if lease.renew(consumer, &reach, &shared.metrics).is_none() {
        return Ok(());
    }
    let work: Vec<(Key, Partial, i64)> = {
        let mut partitions = shared.partitions.lock().expect("partitions lock");
        partitions
            .iter_mut()
            .flat_map(|(topic, states)| {
                states.iter_mut().filter_map(|(partition, state)| {
                    let last_offset = state.last_offset.take()?;
                    Some((
                        (topic.clone(), *partition),
                        std::mem::take(&mut state.partial),
                        last_offset,
                    ))
                })
            })
            .collect()
    };
    let now = u32::try_from(now_ms() / 1000).unwrap_or_default();
    // Every partition's partials merged and stored with their offsets in as
    // few inserts as possible (one under normal load): an insert is one
    // part, so whole partitions land or none do, ClickHouse gets about one
    // insert per flush interval, and a window's figures from many partitions
    // become one row.
    let mut batches: Vec<Batch> = vec![Batch::default()];
    for ((topic, partition), partial, last_offset) in work {
        // Its rows, at most as many window markers, and its offset row.
        let rows = 2 * partial.row_count();
        let current = batches.last_mut().expect("a batch");
        if current.rows > 0 && current.rows + rows > MAX_INSERT_ROWS {
            batches.push(Batch::default());
        }
        let current = batches.last_mut().expect("a batch");
        current.partial.merge(partial);
        current.rows += rows + 1;
        current.offsets.push(((topic, partition), last_offset));
    }
    let mut batches = batches.into_iter();
    while let Some(Batch {
        partial, offsets, ..
    }) = batches.next()
    {
        let mut rows = store::rows(partial, now);
        rows.extend(
            offsets
                .iter()
                .map(|((topic, partition), last)| store::offset_row(topic, *partition, *last, now)),
        );
        match store_batch(shared, consumer, lease, &rows, &offsets) {
            Ok(()) => {}
            Err(Unstored::Fenced) => {
                let unstored = offsets
                    .into_iter()
                    .chain(batches.flat_map(|b| b.offsets))
                    .map(|(key, _)| key);
                rewind(shared, consumer, unstored.collect());
                return Ok(());
            }
            Err(Unstored::Abandoned) => return Err(Abandoned),
        }
        shared.metrics.flushes.inc_by(offsets.len() as u64);
        shared.metrics.last_flush.set(now_ms() as f64 / 1000.0);
    }
    Ok(())
}

/// How long a commit the group coordinator accepted keeps this replica's
/// right to write its partitions' partials to ClickHouse.
///
/// The coordinator takes a commit only from a member of the group's current
/// generation. A replica frozen or cut off from Kafka for longer than
/// `session.timeout.ms` has been replaced, and its partitions' next owner
/// resumes after the offsets stored in ClickHouse: anything the old one
/// wrote after that would be counted twice. So a flush first commits the
/// offsets it reaches (synchronously; ClickHouse, not Kafka, still holds the
/// position), and its inserts must end within
/// `(session.timeout.ms - heartbeat.interval.ms) / 2` of that commit: a
/// member that heartbeats cannot be replaced sooner. An insert that would end
/// later is aborted and the commit asked for again. Not covered: a replica
/// frozen for a whole session in the instant between that check and
/// ClickHouse taking the insert's last bytes.
struct Lease {
    length: Duration,
    until: Option<Instant>,
}

impl Lease {
    /// Refused when `heartbeat.interval.ms` is not below
    /// `session.timeout.ms`: no insert could ever be made in time.
    fn new(config: &rdkafka::ClientConfig) -> Result<Self, String> {
        let ms = |key: &str, default: u64| {
            config
                .get(key)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(default)
        };
        let (session, heartbeat) = (
            ms("session.timeout.ms", 45_000),
            ms("heartbeat.interval.ms", 3_000),
        );
        if heartbeat >= session {
            return Err(format!(
                "kafka.client.heartbeat.interval.ms ({heartbeat}) must be below kafka.client.session.timeout.ms ({session}): the analytics job writes only within half their difference of a commit the group took"
            ));
        }
        Ok(Self {
            length: Duration::from_millis((session - heartbeat) / 2),
            until: None,
        })
    }

    /// When the right to write ends, if it has not.
    fn deadline(&self) -> Option<Instant> {
        self.until.filter(|until| Instant::now() < *until)
    }

    /// Commits `reach` to Kafka; the new deadline if the coordinator took it within
    /// `COMMIT_WAIT`. The commit runs on a thread of its own: librdkafka
    /// holds a commit while the group looks for its coordinator (8 s seen
    /// in a rebalance storm), and the job must not stop polling that long.
    /// A commit answered later counts as refused here.
    fn renew(
        &mut self,
        consumer: &JobConsumer,
        reach: &TopicPartitionList,
        metrics: &JobMetrics,
    ) -> Option<Instant> {
        let asked = Instant::now();
        let (answer, answered) = std::sync::mpsc::channel();
        let (committing, reach) = (consumer.clone(), reach.clone());
        let spawned = std::thread::Builder::new()
            .name("fence-commit".into())
            .spawn(move || {
                let _ = answer.send(committing.commit(&reach, CommitMode::Sync));
            });
        let refused = match spawned.map(|_| answered.recv_timeout(COMMIT_WAIT)) {
            Ok(Ok(Ok(()))) => None,
            Ok(Ok(Err(error))) => Some(error.to_string()),
            Ok(Err(_)) => Some(format!("no answer within {COMMIT_WAIT:?}")),
            Err(error) => Some(format!("cannot start the commit: {error}")),
        };
        match refused {
            None => {
                self.until = Some(asked + self.length);
                self.until
            }
            Some(error) => {
                self.until = None;
                metrics.fenced_flushes.inc();
                tracing::warn!(%error, "The group did not take this replica's commit (replaced, or a rebalance under way): its partials are not written; the partitions it keeps count again from the offsets stored in ClickHouse.");
                None
            }
        }
    }
}

/// The offsets to commit for partitions whose last offset taken is given:
/// the next one each.
fn reaching<'a>(last_offsets: impl Iterator<Item = (&'a str, i32, i64)>) -> TopicPartitionList {
    let mut reach = TopicPartitionList::new();
    for (topic, partition, last) in last_offsets {
        let _ = reach.add_partition_offset(topic, partition, Offset::Offset(last + 1));
    }
    reach
}

/// How long a flush waits for Kafka to take its commit (`Lease::renew`).
const COMMIT_WAIT: Duration = Duration::from_secs(2);

/// Puts `keys` back after the offsets stored in ClickHouse and drops what
/// was counted since: an insert this replica could no longer prove its right
/// to make is counted again, here if the partitions stay, else by their next
/// owner (the rebalance that follows removes them).
fn rewind(shared: &Shared, consumer: &BaseConsumer<JobContext>, keys: Vec<Key>) {
    if shared.shutdown.is_cancelled() {
        return;
    }
    let stored = consumer.context().stored_offsets();
    let mut partitions = shared.partitions.lock().expect("partitions lock");
    for key in keys {
        let Some(state) = partitions.get_mut(&key.0).and_then(|t| t.get_mut(&key.1)) else {
            continue;
        };
        let start = stored.get(&key).map(|o| o + 1);
        *state = PartitionState::starting_at(start, shared);
        let offset = start.map_or(Offset::Beginning, Offset::Offset);
        if let Err(error) = consumer.seek(&key.0, key.1, offset, Duration::from_secs(1)) {
            tracing::debug!(topic = %key.0, partition = key.1, %error, "Seeking back not applied (partition no longer assigned).");
        }
    }
}

/// One insert's merged partials, and the partitions and last offsets they
/// cover.
#[derive(Default)]
struct Batch {
    partial: Partial,
    /// Rows it becomes at most (merging only lowers it).
    rows: usize,
    offsets: Vec<(Key, i64)>,
}

/// Rows per insert at most: below ClickHouse's `max_insert_block_size`
/// (1,048,576), so an insert is never split into several parts.
const MAX_INSERT_ROWS: usize = 500_000;

/// Why a flush's insert was not made.
enum Unstored {
    /// The group refused this replica's commit: not its to write now.
    Fenced,
    /// ClickHouse refused it for too long, or the job is stopping.
    Abandoned,
}

/// One insert, retried until it lands, each attempt within the lease.
/// After a failure the stored offsets tell whether it landed anyway (an
/// answer lost on the wire): the insert is atomic, so either all its
/// partitions' offsets are there or none.
fn store_batch(
    shared: &Shared,
    consumer: &JobConsumer,
    lease: &mut Lease,
    rows: &[store::PartialRow],
    offsets: &[(Key, i64)],
) -> Result<(), Unstored> {
    let metrics = &shared.metrics;
    let reach = reaching(
        offsets
            .iter()
            .map(|((topic, partition), last)| (topic.as_str(), *partition, *last)),
    );
    let token = shared
        .deduplicating
        .then(|| store::deduplication_token(offsets));
    let mut delay = Duration::from_millis(100);
    let failing_since = Instant::now();
    loop {
        let deadline = lease
            .deadline()
            .or_else(|| lease.renew(consumer, &reach, metrics))
            .ok_or(Unstored::Fenced)?;
        let attempt = Instant::now();
        let query_id = store::insert_id();
        let span = backbone::traced_span!(
            "clickhouse insert",
            rows = rows.len() as u64,
            partitions = offsets.len() as u64
        );
        let _in_span = span.enter();
        let error = match shared.runtime.block_on(store::insert_before(
            &shared.client,
            rows,
            shared.timeout,
            Some(deadline),
            &query_id,
            token.as_deref(),
        )) {
            Ok(()) => {
                metrics.inserts.inc();
                metrics
                    .insert_micros
                    .inc_by(u64::try_from(attempt.elapsed().as_micros()).unwrap_or(u64::MAX));
                return Ok(());
            }
            Err(error) => error,
        };
        metrics.insert_retries.inc();
        tracing::warn!(%error, partitions = offsets.len(), retry_in = ?delay, "Storing partials failed; retrying once ClickHouse shows whether it landed.");
        // The attempt's fate before anything else: made again while the
        // server still runs it, the insert would land twice.
        loop {
            if shared.shutdown.is_cancelled() || failing_since.elapsed() > MAX_OUTAGE {
                tracing::error!(%error, "Giving up on ClickHouse; the unstored events are counted again after the stored offsets by the next run.");
                return Err(Unstored::Abandoned);
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(5));
            match shared.runtime.block_on(store::settled_offsets(
                &shared.client,
                Some(&query_id),
                shared.timeout,
            )) {
                Ok(stored)
                    if offsets
                        .iter()
                        .all(|(key, last)| stored.get(key).is_some_and(|s| s >= last)) =>
                {
                    metrics.inserts_landed_unanswered.inc();
                    return Ok(());
                }
                Ok(_) => break,
                Err(error) => {
                    tracing::warn!(%error, "ClickHouse does not say yet whether the partials landed; asking again.")
                }
            }
        }
    }
}

/// At most this many records already fetched are taken just before a
/// flush (the rest wait for the next one): a bound on one flush's size.
const MAX_TAKEN_BEFORE_A_FLUSH: usize = 100_000;

/// How long a flush may keep failing before the job gives up and exits. It
/// must stay well under librdkafka's `max.poll.interval.ms` (5 minutes): past
/// that the group gives this job's partitions away while it still holds
/// their partials, and a late successful insert would count them twice.
const MAX_OUTAGE: Duration = Duration::from_secs(120);

/// ClickHouse did not take a flush in time, or the job is stopping.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("ClickHouse refused inserts for longer than 120 s; exiting so that a restart resumes after the offsets stored in ClickHouse")]
pub struct Abandoned;

#[cfg(test)]
mod tests {
    use super::Lease;
    use std::time::Duration;

    #[test]
    fn a_lease_lasts_half_a_session_less_one_heartbeat() {
        let mut config = rdkafka::ClientConfig::new();
        assert_eq!(
            Lease::new(&config).expect("defaults").length,
            Duration::from_millis(21_000)
        );
        config
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000");
        let lease = Lease::new(&config).expect("a lease");
        assert_eq!(lease.length, Duration::from_millis(4_500));
        assert_eq!(lease.deadline(), None, "no right to write before a commit");
    }

    #[test]
    fn a_heartbeat_not_below_the_session_is_refused_by_name() {
        let mut config = rdkafka::ClientConfig::new();
        config
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "6000");
        let error = Lease::new(&config).err().expect("refused");
        assert!(
            error.starts_with("kafka.client.heartbeat.interval.ms (6000) must be below kafka.client.session.timeout.ms (6000)"),
            "{error}"
        );
    }
}
