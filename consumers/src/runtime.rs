//! The consumer-group runtime. Each assigned partition's own fetch queue is
//! read by a reader that hands its records to the partition's task while the
//! partition is below its in-flight bounds (the poll loop serves the
//! rebalance callbacks and whatever reaches the shared queue). The task
//! batches, runs the handler, retries in place with backoff (pausing only
//! its partition), moves what still fails to the
//! retry tiers and then the DLQ, and stores the batch's offset only when every
//! record in it is done or forwarded. Librdkafka commits stored offsets
//! periodically; on revoke and on shutdown we commit ourselves after the
//! partitions' work has finished or been abandoned.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backbone::codec::{DecodeHint, Decoder};
use backbone::config::WorkerSettings;
use backbone::headers;
use backbone::kafka::KafkaConnection;
use backbone::shutdown::Shutdown;
use backbone::telemetry;
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::{mpsc, Notify, Semaphore};
use tracing::Instrument;

use crate::continuity::{self, Continuity};
use crate::fetched::{counted_bytes, Fetched};
use crate::forward::{now_ms, Failure, Forwarder, Ledger};
use crate::handler::{Handler, Outcome, Record};
use crate::metrics::Metrics;
use crate::routes::{Hop, Route, Routes};

type PartitionKey = (Arc<str>, i32);

/// The consumer, as what a kept message must not outlive.
type Client = Arc<dyn std::any::Any + Send + Sync>;

/// A partition's own fetch queue, split from the consumer's at assignment.
/// Its reader takes records only while the partition has room, so
/// backpressure leaves what librdkafka prefetched in place (bounded per
/// partition by `queued.max.messages.kbytes`), where a pause purges it and
/// fetches it again: 5x the no-op worker's throughput on the mock cluster
/// (BENCHMARKS.md, issue 29).
type PartitionQueue = StreamPartitionQueue<WorkerContext>;

/// The most records a partition's reader hands over at once: what it finds
/// fetched already, without waiting (fewer when the partition has less room).
const CHUNK_RECORDS: usize = 512;

/// How long abandoned batches get, all together, to notice and stop.
const ABANDON_GRACE: Duration = Duration::from_secs(2);

/// Why a partition is paused; it resumes when no reason is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum PauseReason {
    /// More records fetched than the in-flight bounds allow.
    Backpressure = 1,
    /// Backing off between handler attempts.
    Retry = 2,
    /// A retry-tier record is not due yet.
    NotDue = 4,
    /// The worker is draining.
    Draining = 8,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot create the Kafka consumer: {0}")]
    Consumer(KafkaError),
    #[error("cannot subscribe to {topics:?}: {error}")]
    Subscribe {
        topics: Vec<String>,
        error: KafkaError,
    },
    #[error("the worker needs tokio's multi-threaded runtime: rebalance callbacks wait for partition tasks")]
    CurrentThreadRuntime,
}

/// A partition's task as the poll loop and the rebalance callback see it.
struct PartitionHandle {
    /// Records go over in chunks (what the reader found fetched at once):
    /// one send and one wake-up per chunk, not per record.
    records: mpsc::UnboundedSender<Vec<Fetched>>,
    /// Stop taking new batches (revoke, shutdown).
    stop: Shutdown,
    /// Give up the batch in hand (its offset is not stored).
    abandon: Shutdown,
    /// Disconnects when the task has exited.
    finished: std::sync::mpsc::Receiver<()>,
    in_flight: Arc<InFlight>,
}

/// A partition's records taken and not yet done, against its bounds.
#[derive(Debug, Default)]
struct InFlight {
    records: AtomicUsize,
    bytes: AtomicUsize,
    /// Told whenever the task has drained to half the bounds, or ended.
    room: Notify,
}

impl InFlight {
    /// Counts records taken; true when they fill the partition.
    fn take(&self, settings: &WorkerSettings, records: usize, bytes: usize) -> bool {
        let records = self.records.fetch_add(records, Ordering::Relaxed) + records;
        let bytes = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        records >= settings.max_in_flight_records || bytes >= settings.max_in_flight_bytes
    }

    /// How many more records and bytes the partition takes before it is
    /// full (at least one record: a reader only reads while there is room).
    fn room(&self, settings: &WorkerSettings) -> Room {
        Room::left(
            settings,
            self.records.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }

    /// Counts a batch done; true (and a waiting reader told) when the
    /// partition has drained to half its bounds.
    fn done(&self, settings: &WorkerSettings, records: usize, bytes: usize) -> bool {
        self.records.fetch_sub(records, Ordering::Relaxed);
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        let drained = self.drained(settings);
        if drained {
            self.room.notify_one();
        }
        drained
    }

    /// Few enough records and bytes in flight for a partition held back to
    /// go on: half its bounds.
    fn drained(&self, settings: &WorkerSettings) -> bool {
        self.records.load(Ordering::Relaxed) < settings.max_in_flight_records / 2
            && self.bytes.load(Ordering::Relaxed) < settings.max_in_flight_bytes / 2
    }

    /// The task has ended: a reader waiting for room takes its next record,
    /// which finds the task gone and starts another.
    fn clear(&self) {
        self.records.store(0, Ordering::Relaxed);
        self.bytes.store(0, Ordering::Relaxed);
        self.room.notify_one();
    }

    /// Returns once the partition has drained to half its bounds (or its
    /// task has ended), or at `stop`.
    async fn wait_for_room(&self, settings: &WorkerSettings, metrics: &Metrics, stop: &Shutdown) {
        metrics.full_partitions.inc();
        metrics.partitions_held_back.inc();
        while !self.drained(settings) {
            tokio::select! {
                _ = self.room.notified() => {}
                _ = stop.cancelled() => break,
            }
        }
        metrics.full_partitions.dec();
    }
}

/// What a reader may hand over next.
#[derive(Debug, Clone, Copy)]
struct Room {
    records: usize,
    bytes: usize,
}

impl Room {
    /// What `records` and `bytes` in flight leave of the bounds, a run at
    /// most, one record at least.
    fn left(settings: &WorkerSettings, records: usize, bytes: usize) -> Room {
        Room {
            records: settings
                .max_in_flight_records
                .saturating_sub(records)
                .clamp(1, CHUNK_RECORDS),
            bytes: settings.max_in_flight_bytes.saturating_sub(bytes),
        }
    }

    /// An empty partition's.
    fn all(settings: &WorkerSettings) -> Room {
        Room::left(settings, 0, 0)
    }
}

/// State shared by the poll loop, the rebalance callback and partition tasks.
struct Shared {
    settings: WorkerSettings,
    partitions: Mutex<HashMap<PartitionKey, PartitionHandle>>,
    /// Per assigned partition, the offset the next fetched record must have.
    expected: Mutex<HashMap<PartitionKey, Continuity>>,
    /// `kafka.gap_confirmation_ms`.
    gap_confirmation: Duration,
    pauses: Mutex<HashMap<PartitionKey, u8>>,
    /// Partition queues split at assignment, each with its reader's stop,
    /// for the poll loop to start a reader on.
    split_queues: mpsc::UnboundedSender<(PartitionKey, PartitionQueue, Shutdown)>,
    /// The stop of each partition's reader.
    readers: Mutex<HashMap<PartitionKey, Shutdown>>,
    metrics: Arc<Metrics>,
    forwarder: Arc<Forwarder>,
    /// Set once the consumer exists, so callbacks can pause and resume.
    consumer: std::sync::OnceLock<std::sync::Weak<StreamConsumer<WorkerContext>>>,
}

impl Shared {
    fn consumer(&self) -> Option<Arc<StreamConsumer<WorkerContext>>> {
        self.consumer.get().and_then(std::sync::Weak::upgrade)
    }

    fn set_pause(&self, key: &PartitionKey, reason: PauseReason, on: bool) {
        let mut pauses = self.pauses.lock().expect("pauses lock");
        let before = pauses.get(key).copied().unwrap_or(0);
        let after = if on {
            before | reason as u8
        } else {
            before & !(reason as u8)
        };
        if after == 0 {
            pauses.remove(key);
        } else {
            pauses.insert(key.clone(), after);
        }
        tracing::debug!(
            topic = &*key.0,
            partition = key.1,
            ?reason,
            on,
            before,
            after,
            "Pause reasons changed."
        );
        if (before == 0) == (after == 0) {
            return;
        }
        self.metrics.paused_partitions.set(pauses.len() as i64);
        // The lock is held across the call: a resume racing a pause from
        // another thread must not leave librdkafka paused with no reason left.
        let Some(consumer) = self.consumer() else {
            return;
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&key.0, key.1);
        let result = if after != 0 {
            consumer.pause(&tpl)
        } else {
            consumer.resume(&tpl)
        };
        if let Err(error) = result {
            tracing::debug!(topic = &*key.0, partition = key.1, %error, "Pause or resume not applied (partition not assigned).");
        }
    }

    /// Stops the tasks of `keys`, waits for them to finish their batch within
    /// the drain timeout, then abandons what is left, and gives the forwards
    /// they abandoned up to `land_within` to reach their topics.
    fn stop_partitions(&self, keys: &[PartitionKey], land_within: Duration) {
        let handles: Vec<PartitionHandle> = {
            let mut partitions = self.partitions.lock().expect("partitions lock");
            keys.iter().filter_map(|k| partitions.remove(k)).collect()
        };
        for handle in &handles {
            handle.stop.cancel();
        }
        let drained_by = Instant::now() + Duration::from_millis(self.settings.drain_timeout_ms);
        let unfinished = unfinished_by(drained_by, &handles.iter().collect::<Vec<_>>());
        for handle in &unfinished {
            handle.abandon.cancel();
        }
        // One grace for all of them: during a revoke the group waits for us.
        let still_running = unfinished_by(Instant::now() + ABANDON_GRACE, &unfinished);
        if !still_running.is_empty() {
            tracing::warn!(
                partitions = still_running.len(),
                "Abandoned batches did not stop within {ABANDON_GRACE:?}; going on without them."
            );
        }
        // An abandoned forward may still be on its way: it must be in its
        // topic before the partitions' next owner reads its ledger there.
        if !unfinished.is_empty() {
            self.forwarder.flush_in_flight(land_within);
        }
    }

    /// Resumes again, in librdkafka, every assigned partition that has no
    /// reason to be paused. librdkafka applies a pause later, on its own
    /// thread, but drops a resume at once when the partition is not paused
    /// yet (`rd_kafka_toppar_op_pause_resume`): a partition paused and
    /// resumed in quick succession (tight in-flight bounds) stays paused with
    /// nothing left to resume it. A resume of a partition that is not paused
    /// costs nothing there (no version bump, no refetch), so this runs
    /// periodically; the lock keeps it from racing a pause of ours.
    fn reassert_resumes(&self) {
        let Some(consumer) = self.consumer() else {
            return;
        };
        let pauses = self.pauses.lock().expect("pauses lock");
        let Ok(assignment) = consumer.assignment() else {
            return;
        };
        let mut resume = TopicPartitionList::new();
        for e in assignment.elements() {
            if !pauses.contains_key(&(Arc::from(e.topic()), e.partition())) {
                resume.add_partition(e.topic(), e.partition());
            }
        }
        if resume.count() > 0 {
            if let Err(error) = consumer.resume(&resume) {
                tracing::debug!(%error, "Resuming unpaused partitions again failed.");
            }
        }
    }

    /// Forgets why `keys` were paused and resumes them in librdkafka, which
    /// keeps an application's pause on a partition across revoke and
    /// reassignment: a partition revoked while paused for backpressure would
    /// come back paused with no task left to resume it.
    fn forget_pauses(&self, keys: &[PartitionKey]) {
        let mut pauses = self.pauses.lock().expect("pauses lock");
        let mut resume = TopicPartitionList::new();
        for key in keys {
            if pauses.remove(key).is_some() {
                resume.add_partition(&key.0, key.1);
            }
        }
        self.metrics.paused_partitions.set(pauses.len() as i64);
        if let (true, Some(consumer)) = (resume.count() > 0, self.consumer()) {
            if let Err(error) = consumer.resume(&resume) {
                tracing::warn!(%error, "Resuming revoked partitions failed.");
            }
        }
    }

    /// Gives each newly assigned partition a queue of its own, read by a
    /// reader the poll loop starts. Every assignment splits again: an
    /// `assign` may join the partitions' queues back to the consumer's, and
    /// once split, a partition's records go to no other queue.
    fn split_queues(&self, tpl: &TopicPartitionList) {
        let Some(consumer) = self.consumer() else {
            return;
        };
        let mut readers = self.readers.lock().expect("readers lock");
        for e in tpl.elements() {
            let key: PartitionKey = (Arc::from(e.topic()), e.partition());
            let Some(queue) = consumer.split_partition_queue(e.topic(), e.partition()) else {
                tracing::warn!(topic = e.topic(), partition = e.partition(), "No queue of its own for this partition: its records come through the consumer's queue, paused for backpressure.");
                continue;
            };
            let stop = Shutdown::new();
            if let Some(previous) = readers.insert(key.clone(), stop.clone()) {
                previous.cancel();
            }
            let _ = self.split_queues.send((key, queue, stop));
        }
    }

    /// Stops the readers of `keys` (all, with `None`).
    fn stop_readers(&self, keys: Option<&[PartitionKey]>) {
        let mut readers = self.readers.lock().expect("readers lock");
        match keys {
            Some(keys) => {
                for key in keys {
                    if let Some(stop) = readers.remove(key) {
                        stop.cancel();
                    }
                }
            }
            None => readers.drain().for_each(|(_, stop)| stop.cancel()),
        }
    }

    /// Each newly assigned partition must start at its committed offset
    /// (anywhere, when it has none: `auto.offset.reset` decides).
    fn expect_committed<C: Consumer<WorkerContext>>(&self, consumer: &C, tpl: &TopicPartitionList) {
        let committed = consumer
            .committed_offsets(tpl.clone(), COMMITTED_TIMEOUT)
            .unwrap_or_else(|error| {
                tracing::warn!(%error, "Committed offsets unknown; each assigned partition's first record is taken as its start.");
                TopicPartitionList::new()
            });
        let mut expected = self.expected.lock().expect("expected lock");
        for e in tpl.elements() {
            let start = committed_offset(&committed, e.topic(), e.partition());
            expected.insert(
                (Arc::from(e.topic()), e.partition()),
                Continuity::starting_at(start, self.gap_confirmation),
            );
        }
    }

    /// Forgets where `keys` were expected to go on: their next records are
    /// judged from their next assignment (or taken as their start).
    fn forget_expected(&self, keys: &[PartitionKey]) {
        let mut expected = self.expected.lock().expect("expected lock");
        for key in keys {
            expected.remove(key);
        }
    }

    /// Of the records fetched for `key`, in order, those that are its next
    /// ones; seeks back when records are missing before one. One lock for
    /// the run.
    fn admitted<T>(&self, key: &PartitionKey, run: Vec<T>, offset: impl Fn(&T) -> i64) -> Vec<T> {
        let mut expected = self.expected.lock().expect("expected lock");
        let continuity = match expected.get_mut(key) {
            Some(continuity) => continuity,
            None => expected
                .entry(key.clone())
                .or_insert_with(|| Continuity::starting_at(None, self.gap_confirmation)),
        };
        run.into_iter()
            .filter(|record| {
                continuity.admit(
                    (&key.0, key.1, offset(record)),
                    self.metrics.fetch_gaps.inner(),
                    |from| {
                        self.consumer().map_or(Ok(()), |consumer| {
                            continuity::seek_back(&*consumer, &key.0, key.1, from)
                        })
                    },
                )
            })
            .collect()
    }
}

/// How long an assignment waits for the committed offsets it checks the
/// first records against.
const COMMITTED_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits for `handles`' tasks until `deadline`; returns those still running.
fn unfinished_by<'a>(
    deadline: Instant,
    handles: &[&'a PartitionHandle],
) -> Vec<&'a PartitionHandle> {
    handles
        .iter()
        .filter(|handle| {
            let left = deadline.saturating_duration_since(Instant::now());
            handle.finished.recv_timeout(left) == Err(std::sync::mpsc::RecvTimeoutError::Timeout)
        })
        .copied()
        .collect()
}

/// Hooks the rebalance: revoked partitions' work ends before their offsets are
/// committed and the partitions are given away, unpaused.
pub struct WorkerContext {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for WorkerContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerContext")
            .field("group", &self.shared.settings.group_id)
            .finish()
    }
}

impl ClientContext for WorkerContext {}

impl ConsumerContext for WorkerContext {
    fn pre_rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let keys: Vec<PartitionKey> = tpl
                .elements()
                .iter()
                .map(|e| (Arc::from(e.topic()), e.partition()))
                .collect();
            tracing::info!(
                partitions = keys.len(),
                "Partitions revoked; finishing their work."
            );
            self.shared
                .metrics
                .revoked_partitions
                .inc_by(keys.len() as u64);
            self.shared.stop_readers(Some(&keys));
            // The next owner reads its ledgers once this returns.
            self.shared
                .stop_partitions(&keys, crate::forward::DELIVERY_TIMEOUT);
            self.shared.forget_pauses(&keys);
            self.shared.forget_expected(&keys);
            if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::debug!(%error, "Nothing to commit on revoke.");
            }
        }
    }

    fn post_rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        if let Rebalance::Assign(tpl) = rebalance {
            tracing::info!(partitions = tpl.count(), "Partitions assigned.");
            self.shared.metrics.rebalances.inc();
            self.shared.expect_committed(consumer, tpl);
            self.shared.split_queues(tpl);
        }
        // Asked rather than counted: with a cooperative assignor (settable
        // through `kafka.client`) a revoke takes only some partitions.
        if let Ok(assignment) = consumer.assignment() {
            self.shared
                .metrics
                .assigned_partitions
                .set(assignment.count() as i64);
        }
    }
}

/// Runs the worker until `shutdown`, then drains: stops fetching, lets the
/// batches in hand finish within the drain timeout, commits and returns.
/// `ready` is true while the worker is subscribed and not draining.
pub async fn run<H: Handler>(
    connection: &KafkaConnection,
    settings: &WorkerSettings,
    routes: Routes,
    handler: H,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    shutdown: Shutdown,
) -> Result<(), WorkerError> {
    if tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::CurrentThread
    {
        return Err(WorkerError::CurrentThreadRuntime);
    }
    let forwarder = Arc::new(
        Forwarder::new(
            &connection.client_config(),
            connection.gap_confirmation(),
            &settings.group_id,
        )
        .map_err(WorkerError::Consumer)?,
    );
    let (split_queues, mut queues_split) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        settings: settings.clone(),
        partitions: Mutex::new(HashMap::new()),
        expected: Mutex::new(HashMap::new()),
        gap_confirmation: connection.gap_confirmation(),
        pauses: Mutex::new(HashMap::new()),
        split_queues,
        readers: Mutex::new(HashMap::new()),
        metrics: metrics.clone(),
        forwarder: forwarder.clone(),
        consumer: std::sync::OnceLock::new(),
    });
    let mut config = connection.client_config();
    config
        .set("group.id", &settings.group_id)
        .set("enable.auto.commit", "true")
        .set(
            "auto.commit.interval.ms",
            settings.commit_interval_ms.to_string(),
        )
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest");
    // Quick failure detection, a 1 MiB prefetch per partition (each has a
    // queue of its own; librdkafka's default allows 64 MiB) refilled 10 ms
    // after it was found full (librdkafka waits 1 s, which stalled a
    // partition whose handler drains 1 MiB faster: 150k instead of 450k
    // events/s in consume-bench), and
    // cooperative rebalancing: a member joining or leaving
    // moves only the partitions that change hands, and the batches of the
    // others go on (the revoke handles just the partitions it names). Each
    // unless the operator chose otherwise (`kafka.client`; `range` or
    // `roundrobin` is the eager protocol).
    for (key, value) in [
        ("session.timeout.ms", "10000"),
        ("heartbeat.interval.ms", "1000"),
        ("queued.max.messages.kbytes", "1024"),
        ("fetch.queue.backoff.ms", "10"),
        ("partition.assignment.strategy", "cooperative-sticky"),
    ] {
        if config.get(key).is_none() {
            config.set(key, value);
        }
    }
    let consumer: Arc<StreamConsumer<WorkerContext>> = Arc::new(
        config
            .create_with_context(WorkerContext {
                shared: shared.clone(),
            })
            .map_err(WorkerError::Consumer)?,
    );
    let _ = shared.consumer.set(Arc::downgrade(&consumer));
    let topics = routes.topics();
    consumer
        .subscribe(&topics)
        .map_err(|error| WorkerError::Subscribe {
            topics: topics.iter().map(|t| t.to_string()).collect(),
            error,
        })?;
    tracing::info!(group = %settings.group_id, topics = ?topics, handler = handler.name(), "Worker subscribed.");

    let job = Arc::new(Job {
        handler,
        routes,
        decoder: Decoder::default(),
        forwarder,
        shared: shared.clone(),
        concurrency: Semaphore::new(settings.concurrency),
    });
    ready.store(true, Ordering::SeqCst);
    tokio::spawn(measure_lag(
        Arc::downgrade(&consumer),
        metrics.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(reassert_resumes(Arc::downgrade(&shared), shutdown.clone()));

    // Records reach the consumer's own queue only for partitions not split
    // (yet): the poll loop dispatches those, pausing for backpressure, and
    // serves the rebalance callbacks.
    let mut readers = tokio::task::JoinSet::new();
    let client: Client = consumer.clone();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some((key, queue, stop)) = queues_split.recv() => {
                readers.spawn(job.clone().read(key, queue, stop));
            }
            Some(_) = readers.join_next(), if !readers.is_empty() => {}
            message = consumer.recv() => match message {
                Ok(message) => {
                    job.dispatch(message, &client);
                    // Take what is already fetched without waiting again.
                    for _ in 0..1024 {
                        match futures_now(consumer.recv()) {
                            Some(Ok(message)) => job.dispatch(message, &client),
                            _ => break,
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "Consumer error; librdkafka keeps retrying.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }

    // Drain: not ready, no more fetching, finish or abandon, commit.
    ready.store(false, Ordering::SeqCst);
    tracing::info!("Draining: finishing in-flight batches.");
    if let Ok(assignment) = consumer.assignment() {
        let _ = consumer.pause(&assignment);
        for e in assignment.elements() {
            shared.set_pause(
                &(Arc::from(e.topic()), e.partition()),
                PauseReason::Draining,
                true,
            );
        }
    }
    // The readers hold the consumer: they end before it is closed.
    shared.stop_readers(None);
    while readers.join_next().await.is_some() {}
    drop(queues_split);
    let keys: Vec<PartitionKey> = shared
        .partitions
        .lock()
        .expect("partitions lock")
        .keys()
        .cloned()
        .collect();
    let drained_by = Instant::now() + Duration::from_millis(settings.drain_timeout_ms);
    let drain = shared.clone();
    tokio::task::spawn_blocking(move || drain.stop_partitions(&keys, ABANDON_GRACE))
        .await
        .unwrap_or_else(|e| tracing::error!(error = %e, "Drain task failed."));
    drop(client);
    commit_and_close_before(consumer, drained_by).await;
    Ok(())
}

/// The final commit and the consumer's close (it leaves the group, so the
/// partitions move at once), given until `deadline` (at least a second).
/// Both wait for Kafka without end when no broker answers, so they run on a
/// thread of their own that the process may leave behind: offsets not
/// committed are redelivered (the sinks skip what they already stored), and
/// a member that did not leave is dropped by the group after its session
/// timeout.
async fn commit_and_close_before(consumer: Arc<StreamConsumer<WorkerContext>>, deadline: Instant) {
    let until = deadline.max(Instant::now() + Duration::from_secs(1));
    let (committed, commit_result) = tokio::sync::oneshot::channel();
    let (closed, close_result) = tokio::sync::oneshot::channel::<bool>();
    let spawned = std::thread::Builder::new()
        .name("final-commit".into())
        .spawn(move || {
            let _ = committed.send(consumer.commit_consumer_state(CommitMode::Sync));
            // Kept messages hold the consumer (librdkafka wants them gone
            // before it); a batch abandoned in its handler may still have
            // some. The close is the drop of the last hold.
            while Arc::strong_count(&consumer) > 1 && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = closed.send(Arc::into_inner(consumer).is_some());
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "Cannot start the final commit; exiting without it.");
        return;
    }
    let late = |what: &str| {
        tracing::warn!(
            "Kafka did not answer the {what} before the drain timeout; exiting without it. Records since the last commit will be redelivered (the sinks skip what they already stored)."
        );
    };
    match tokio::time::timeout_at(until.into(), commit_result).await {
        Ok(Ok(Ok(()))) => tracing::info!("Offsets committed."),
        Ok(Ok(Err(error))) => tracing::info!(%error, "No new offsets to commit."),
        Ok(Err(_)) => tracing::warn!("The final commit ended without an answer."),
        Err(_) => return late("final commit"),
    }
    match tokio::time::timeout_at(until.into(), close_result).await {
        Ok(Ok(true)) => tracing::info!("Left the group; worker stopped."),
        Ok(_) => tracing::warn!(
            "An abandoned batch still holds records; exiting without leaving the group (it drops this member after its session timeout)."
        ),
        Err(_) => late("group leave"),
    }
}

/// The future's output if it is ready now.
fn futures_now<F: std::future::Future>(future: F) -> Option<F::Output> {
    let waker = std::task::Waker::noop();
    let mut context = std::task::Context::from_waker(waker);
    let mut future = std::pin::pin!(future);
    match future.as_mut().poll(&mut context) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}

/// How often partitions without a pause reason are resumed again (see
/// `Shared::reassert_resumes`): the longest a lost resume stalls one.
const REASSERT_RESUMES_EVERY: Duration = Duration::from_millis(500);

async fn reassert_resumes(shared: std::sync::Weak<Shared>, shutdown: Shutdown) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(REASSERT_RESUMES_EVERY) => {}
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        // librdkafka calls take locks of its own: off the async threads.
        let _ = tokio::task::spawn_blocking(move || shared.reassert_resumes()).await;
    }
}

/// Every few seconds: records between each assigned partition's position and
/// its high watermark, for the `shopstream_consumer_lag` gauge.
async fn measure_lag(
    consumer: std::sync::Weak<StreamConsumer<WorkerContext>>,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        let Some(consumer) = consumer.upgrade() else {
            return;
        };
        let lag = tokio::task::spawn_blocking(move || {
            let mut lag = std::collections::BTreeMap::new();
            let Ok(position) = consumer.position() else {
                return lag;
            };
            // A partition with nothing consumed since its assignment has no
            // position: it is behind from its committed offset, or from its
            // start (`auto.offset.reset=earliest`), and one that never
            // delivers must still show its lag.
            let mut unpositioned = TopicPartitionList::new();
            for e in position.elements() {
                if !matches!(e.offset(), Offset::Offset(_)) {
                    unpositioned.add_partition(e.topic(), e.partition());
                }
            }
            let committed = if unpositioned.count() == 0 {
                TopicPartitionList::new()
            } else {
                consumer
                    .committed_offsets(unpositioned, Duration::from_secs(1))
                    .unwrap_or_default()
            };
            for e in position.elements() {
                let Ok((low, high)) =
                    consumer.fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(1))
                else {
                    continue;
                };
                let at = match e.offset() {
                    Offset::Offset(at) => at,
                    _ => committed_offset(&committed, e.topic(), e.partition()).unwrap_or(low),
                };
                lag.insert((e.topic().to_owned(), e.partition()), (high - at).max(0));
            }
            lag
        })
        .await
        .unwrap_or_default();
        metrics.set_lag(lag);
    }
}

/// The offset `committed` holds for a partition, if a real one.
fn committed_offset(committed: &TopicPartitionList, topic: &str, partition: i32) -> Option<i64> {
    match committed.find_partition(topic, partition)?.offset() {
        Offset::Offset(at) => Some(at),
        _ => None,
    }
}

/// Everything a partition task needs.
struct Job<H> {
    handler: H,
    routes: Routes,
    decoder: Decoder,
    forwarder: Arc<Forwarder>,
    shared: Arc<Shared>,
    concurrency: Semaphore,
}

impl<H: Handler> Job<H> {
    /// Reads a partition's own queue until `stop`, taking records only while
    /// the partition has room.
    async fn read(self: Arc<Self>, key: PartitionKey, queue: PartitionQueue, stop: Shutdown) {
        tracing::debug!(
            topic = &*key.0,
            partition = key.1,
            "Reading the partition's own queue."
        );
        let Some((_, route)) = self.routes.get_key_value(&key.0) else {
            return;
        };
        // A retry tier's records wait out the tier's delay: copied, so as
        // not to keep their fetch responses that long.
        let hold: Option<Client> = match route.tier {
            Some(_) => None,
            None => match self.shared.consumer() {
                Some(consumer) => Some(consumer),
                None => return,
            },
        };
        let mut room = Room::all(&self.shared.settings);
        // One stream for the reader's life: each `recv` registers and
        // unregisters a waker under a lock.
        let mut stream = queue.stream();
        loop {
            let first = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                Some(first) = stream.next() => first,
            };
            let (chunk, bytes, error) =
                self.take_fetched(&key, hold.as_ref(), first, &mut stream, room);
            let taken = chunk.len();
            let full = self.hand_over(&key, route, chunk, bytes, Fetching::Own);
            if let Some(error) = error {
                tracing::warn!(topic = &*key.0, partition = key.1, %error, "Partition queue error; librdkafka keeps retrying.");
                if taken == 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            room = match full {
                Ok(room) => room,
                Err(Some(in_flight)) => {
                    in_flight
                        .wait_for_room(&self.shared.settings, &self.shared.metrics, &stop)
                        .await;
                    in_flight.room(&self.shared.settings)
                }
                Err(None) => Room::all(&self.shared.settings),
            };
        }
    }

    /// `first` and what else is fetched already, up to `room`: the
    /// records admitted, their bytes, and the queue's error if one ended
    /// the run (the records before it are still handed over).
    fn take_fetched<'q>(
        &self,
        key: &PartitionKey,
        hold: Option<&Client>,
        first: rdkafka::error::KafkaResult<rdkafka::message::BorrowedMessage<'q>>,
        stream: &mut rdkafka::consumer::stream_consumer::MessageStream<'q, WorkerContext>,
        room: Room,
    ) -> (Vec<Fetched>, usize, Option<KafkaError>) {
        let mut run = Vec::with_capacity(room.records);
        let (mut taken_bytes, mut error) = (0, None);
        let mut next = Some(first);
        while let Some(message) = next {
            match message {
                Ok(message) => {
                    taken_bytes += counted_bytes(message.key(), message.payload());
                    run.push(message);
                }
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
            if run.len() >= room.records || taken_bytes >= room.bytes {
                break;
            }
            next = futures_now(stream.next()).flatten();
        }
        let (chunk, bytes) = self.admit(key, hold, run);
        (chunk, bytes, error)
    }

    /// The records of `run` that are the partition's next ones (seeking
    /// back when records are missing before one), and their bytes: kept,
    /// with `hold` on the consumer, or else copied.
    fn admit(
        &self,
        key: &PartitionKey,
        hold: Option<&Client>,
        run: Vec<rdkafka::message::BorrowedMessage<'_>>,
    ) -> (Vec<Fetched>, usize) {
        let chunk: Vec<Fetched> = self
            .shared
            .admitted(key, run, |message| message.offset())
            .into_iter()
            .map(|message| match hold {
                Some(client) => Fetched::held(message, key.0.clone(), client.clone()),
                None => Fetched::from_message(&message, key.0.clone()),
            })
            .collect();
        let bytes = chunk.iter().map(Fetched::bytes).sum();
        (chunk, bytes)
    }

    /// Hands a record from the consumer's queue to its partition's task,
    /// pausing the partition when that fills it.
    fn dispatch(self: &Arc<Self>, message: rdkafka::message::BorrowedMessage<'_>, client: &Client) {
        let Some((topic, route)) = self.routes.get_key_value(message.topic()) else {
            return;
        };
        let key: PartitionKey = (topic.clone(), message.partition());
        let hold = route.tier.is_none().then_some(client);
        let (chunk, bytes) = self.admit(&key, hold, vec![message]);
        let _ = self.hand_over(&key, route, chunk, bytes, Fetching::Shared);
    }

    /// Hands fetched records to their partition's task, starting one if
    /// needed. `Ok` with the room left, or `Err` when the partition is full
    /// (or the records were dropped): from the consumer's queue it pauses
    /// the partition; from its own queue it gives what to wait on.
    fn hand_over(
        self: &Arc<Self>,
        key: &PartitionKey,
        route: &Route,
        chunk: Vec<Fetched>,
        bytes: usize,
        fetching: Fetching,
    ) -> Result<Room, Option<Arc<InFlight>>> {
        let settings = &self.shared.settings;
        let mut partitions = self.shared.partitions.lock().expect("partitions lock");
        let Some(first) = chunk.first() else {
            // Every record refused (records missing before them): the
            // partition's room is what it was.
            return Ok(partitions
                .get(key)
                .map_or_else(|| Room::all(settings), |h| h.in_flight.room(settings)));
        };
        let first_timestamp_ms = first.timestamp_ms;
        let count = chunk.len();
        self.shared.metrics.consumed.inc_by(count as u64);
        let handle = partitions
            .entry(key.clone())
            .or_insert_with(|| self.spawn(key.clone(), route.clone(), first_timestamp_ms));
        let full = handle.in_flight.take(settings, count, bytes);
        if handle.records.send(chunk).is_err() {
            // The task has ended (abandoned); the records are refetched later
            // from the last stored offset, and must then be taken again.
            partitions.remove(key);
            drop(partitions);
            self.shared.forget_expected(std::slice::from_ref(key));
            return Err(None);
        }
        if !full {
            return Ok(handle.in_flight.room(settings));
        }
        let in_flight = handle.in_flight.clone();
        if fetching == Fetching::Own {
            return Err(Some(in_flight));
        }
        drop(partitions);
        self.shared.set_pause(key, PauseReason::Backpressure, true);
        // The task may have drained everything (and found nothing paused to
        // resume) before the pause above: look again, or nothing would ever
        // resume the partition.
        if in_flight.drained(settings) {
            self.shared.set_pause(key, PauseReason::Backpressure, false);
        }
        Err(None)
    }

    /// A task for `key`, whose first record was written at `first_timestamp_ms`.
    fn spawn(
        self: &Arc<Self>,
        key: PartitionKey,
        route: Route,
        first_timestamp_ms: Option<i64>,
    ) -> PartitionHandle {
        let (records, inbox) = mpsc::unbounded_channel();
        let (done, finished) = std::sync::mpsc::channel();
        let handle = PartitionHandle {
            records,
            stop: Shutdown::new(),
            abandon: Shutdown::new(),
            finished,
            in_flight: Arc::default(),
        };
        let task = PartitionTask {
            job: self.clone(),
            key,
            route,
            inbox,
            held: VecDeque::new(),
            stop: handle.stop.clone(),
            abandon: handle.abandon.clone(),
            in_flight: handle.in_flight.clone(),
            ledger: Ledger::since(first_timestamp_ms),
        };
        let in_flight = handle.in_flight.clone();
        let metrics = self.shared.metrics.clone();
        metrics.busy_partitions.enter();
        tokio::spawn(async move {
            task.run().await;
            metrics.busy_partitions.leave();
            in_flight.clear();
            drop(done);
        });
        handle
    }
}

/// A partition task not counted busy while this lives: it waits for its
/// next record, or for a retry-tier record to fall due.
struct Idle<'a>(&'a Metrics);

impl<'a> Idle<'a> {
    fn new(metrics: &'a Metrics) -> Self {
        metrics.busy_partitions.leave();
        Self(metrics)
    }
}

impl Drop for Idle<'_> {
    fn drop(&mut self) {
        self.0.busy_partitions.enter();
    }
}

/// Where a record was fetched from: the consumer's queue, or its
/// partition's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fetching {
    Shared,
    Own,
}

struct PartitionTask<H> {
    job: Arc<Job<H>>,
    key: PartitionKey,
    route: Route,
    inbox: mpsc::UnboundedReceiver<Vec<Fetched>>,
    /// Records taken from the inbox but not yet batched.
    held: VecDeque<Fetched>,
    stop: Shutdown,
    abandon: Shutdown,
    in_flight: Arc<InFlight>,
    /// What the group had forwarded from this partition before this task.
    ledger: Ledger,
}

/// The span of one batch's handling, continuing the traces of the spans
/// that wrote its records (their `traceparent`s); disabled when traces
/// are off.
fn batch_span(key: &PartitionKey, batch: &[Fetched]) -> tracing::Span {
    let span = backbone::traced_span!(
        "handle batch",
        topic = &*key.0,
        partition = key.1,
        records = batch.len() as u64,
        first_offset = batch.first().map_or(-1, |r| r.offset),
        last_offset = batch.last().map_or(-1, |r| r.offset),
    );
    if !span.is_disabled() {
        telemetry::follow(
            &span,
            batch
                .iter()
                .filter_map(|r| r.header(headers::TRACEPARENT))
                .filter_map(telemetry::remote_span),
        );
    }
    span
}

impl<H: Handler> PartitionTask<H> {
    async fn run(mut self) {
        let settings = self.job.shared.settings.clone();
        while let Some(batch) = self.next_batch().await {
            let last = batch.last().map(|r| r.offset);
            let (count, bytes) = (batch.len(), batch.iter().map(Fetched::bytes).sum::<usize>());
            let span = batch_span(&self.key, &batch);
            let outcome = self.process(batch).instrument(span).await;
            if self.in_flight.done(&settings, count, bytes) {
                self.job
                    .shared
                    .set_pause(&self.key, PauseReason::Backpressure, false);
            }
            if outcome.is_err() {
                tracing::info!(
                    topic = &*self.key.0,
                    partition = self.key.1,
                    "Batch abandoned; it will be redelivered."
                );
                break;
            }
            if let (Some(offset), Some(consumer)) = (last, self.job.shared.consumer()) {
                let mut tpl = TopicPartitionList::new();
                let _ =
                    tpl.add_partition_offset(&self.key.0, self.key.1, Offset::Offset(offset + 1));
                if let Err(error) = consumer.store_offsets(&tpl) {
                    tracing::debug!(%error, "Offset not stored (partition no longer assigned).");
                }
            }
        }
    }

    /// Waits for a record, then gathers more until a batch limit or the linger
    /// time. Retry-tier records are released only when due, waiting with the
    /// partition paused. `None` when the task should end.
    async fn next_batch(&mut self) -> Option<Vec<Fetched>> {
        let settings = &self.job.shared.settings;
        let (linger_ms, max_records, max_bytes) = (
            settings.batch_linger_ms,
            settings.batch_max_records,
            settings.batch_max_bytes,
        );
        loop {
            // Stopping: what is queued and not yet batched stays unhandled
            // (and uncommitted), as when the task waits below.
            if self.stop.is_cancelled() {
                return None;
            }
            if !self.held.is_empty() {
                break;
            }
            let first = match self.inbox.try_recv() {
                Ok(chunk) => chunk,
                Err(_) => {
                    let _idle = Idle::new(&self.job.shared.metrics);
                    tokio::select! {
                        biased;
                        _ = self.stop.cancelled() => return None,
                        chunk = self.inbox.recv() => chunk?,
                    }
                }
            };
            self.held.extend(first);
        }
        if self.route.tier.is_some() {
            let due = self.due_at(&self.held[0]);
            let wait = due - now_ms();
            if wait > 0 {
                let _idle = Idle::new(&self.job.shared.metrics);
                self.job
                    .shared
                    .set_pause(&self.key, PauseReason::NotDue, true);
                let waited = tokio::select! {
                    biased;
                    _ = self.stop.cancelled() => false,
                    _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => true,
                };
                self.job
                    .shared
                    .set_pause(&self.key, PauseReason::NotDue, false);
                if !waited {
                    return None;
                }
            }
        }
        let linger = tokio::time::sleep(Duration::from_millis(linger_ms));
        tokio::pin!(linger);
        let mut batch = Vec::new();
        let mut bytes = 0;
        loop {
            while let Some(record) = self.held.pop_front() {
                if self.route.tier.is_some() && self.due_at(&record) > now_ms() {
                    self.held.push_front(record);
                    return Some(batch);
                }
                bytes += record.bytes();
                batch.push(record);
                if batch.len() >= max_records || bytes >= max_bytes {
                    return Some(batch);
                }
            }
            match self.inbox.try_recv() {
                Ok(chunk) => self.held.extend(chunk),
                Err(_) => {
                    tokio::select! {
                        biased;
                        chunk = self.inbox.recv() => match chunk {
                            Some(chunk) => self.held.extend(chunk),
                            None => return Some(batch),
                        },
                        _ = &mut linger => return Some(batch),
                        _ = self.stop.cancelled() => return Some(batch),
                    }
                }
            }
        }
    }

    /// When a record in a retry tier may run again: its write time plus the tier's delay.
    fn due_at(&self, record: &Fetched) -> i64 {
        record.timestamp_ms.unwrap_or_else(now_ms) + self.route.delay.as_millis() as i64
    }

    /// Runs the batch to completion: every record done or forwarded. `Err`
    /// when abandoned, in which case nothing may be stored.
    async fn process(&mut self, batch: Vec<Fetched>) -> Result<(), crate::forward::Abandoned> {
        let job = self.job.clone();
        let shared = &job.shared;
        let settings = &shared.settings;
        let metrics = &shared.metrics;
        metrics.observe_batch(batch.len());
        // Undecodable records never reach the handler.
        let mut records: Vec<Record> = Vec::with_capacity(batch.len());
        // Per record: its index in `batch` and its attempts before this delivery.
        let mut meta: Vec<(usize, u32)> = Vec::with_capacity(batch.len());
        for (i, fetched) in batch.iter().enumerate() {
            let payload = fetched.payload().unwrap_or_default();
            let hint = DecodeHint::lazy(payload, Some(self.route.event), || {
                fetched.header(headers::CONTENT_TYPE)
            });
            match job.decoder.decode(payload, hint) {
                Ok(event) => {
                    meta.push((i, fetched.origin.attempts));
                    records.push(Record {
                        topic: self.route.source.clone(),
                        partition: fetched.origin.partition,
                        offset: fetched.origin.offset,
                        key: fetched.key().map(<[u8]>::to_vec),
                        event,
                        attempts: fetched.origin.attempts,
                    });
                }
                Err(error) => {
                    let failure = Failure {
                        class: error.class().to_owned(),
                        message: error.to_string(),
                        attempts: fetched.origin.attempts,
                    };
                    self.give_up(fetched, &failure, true).await?;
                }
            }
        }
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(settings.retry_base_delay_ms))
            .with_max_delay(Duration::from_millis(settings.retry_max_delay_ms))
            .with_jitter()
            .without_max_times()
            .build();
        let started = Instant::now();
        let budget = if self.route.tier.is_some() {
            1
        } else {
            settings.retry_attempts
        };
        let mut attempt = 0u32;
        let mut paused = false;
        let result = loop {
            if records.is_empty() {
                break Ok(());
            }
            attempt += 1;
            for (record, (_, before)) in records.iter_mut().zip(&meta) {
                record.attempts = before + attempt - 1;
            }
            let handled = Instant::now();
            let outcomes = {
                let _permit = job.concurrency.acquire().await.expect("semaphore open");
                tokio::select! {
                    biased;
                    _ = self.abandon.cancelled() => break Err(crate::forward::Abandoned),
                    outcomes = job.handler.handle(&records) => outcomes,
                }
            };
            metrics.observe_handler(handled.elapsed());
            let (mut again, mut again_meta) = (Vec::new(), Vec::new());
            let mut last_reason = String::new();
            for (n, (record, (i, before))) in records.into_iter().zip(meta).enumerate() {
                let outcome = outcomes.get(n).cloned();
                match outcome.unwrap_or_else(|| Outcome::retry("the handler returned no outcome")) {
                    Outcome::Done => {
                        metrics.handled.inc();
                    }
                    Outcome::Fatal { class, reason } => {
                        let failure = Failure {
                            class,
                            message: reason,
                            attempts: before + attempt,
                        };
                        self.give_up(&batch[i], &failure, true).await?;
                    }
                    Outcome::Retry { reason } => {
                        last_reason = reason;
                        again.push(record);
                        again_meta.push((i, before));
                    }
                }
            }
            (records, meta) = (again, again_meta);
            if records.is_empty() {
                break Ok(());
            }
            let exhausted = attempt >= budget
                || started.elapsed() >= Duration::from_millis(settings.retry_max_elapsed_ms);
            if exhausted && !matches!(self.route.next_hop(), Hop::Nowhere) {
                for (i, before) in &meta {
                    let failure = Failure {
                        class: "retry_exhausted".into(),
                        message: last_reason.clone(),
                        attempts: before + attempt,
                    };
                    self.give_up(&batch[*i], &failure, false).await?;
                }
                break Ok(());
            }
            metrics.retry(self.route.tier);
            telemetry::span_event(
                "retry",
                &[
                    ("attempt", &attempt),
                    ("records", &records.len()),
                    ("error", &last_reason),
                ],
            );
            if !paused {
                shared.set_pause(&self.key, PauseReason::Retry, true);
                paused = true;
            }
            let delay = backoff
                .next()
                .unwrap_or(Duration::from_millis(settings.retry_max_delay_ms));
            tracing::debug!(topic = &*self.key.0, partition = self.key.1, records = records.len(), attempt, ?delay, reason = %last_reason, "Retrying in place.");
            tokio::select! {
                biased;
                _ = self.abandon.cancelled() => break Err(crate::forward::Abandoned),
                _ = tokio::time::sleep(delay) => {}
            }
        };
        if paused {
            shared.set_pause(&self.key, PauseReason::Retry, false);
        }
        result
    }

    /// Moves a record on: fatal errors straight to the DLQ, exhausted retries
    /// to the next tier (or the DLQ after the last one). Waits for the ack.
    async fn give_up(
        &mut self,
        record: &Fetched,
        failure: &Failure,
        fatal: bool,
    ) -> Result<(), crate::forward::Abandoned> {
        let hop = if fatal {
            match &self.route.dead_letter {
                Some(topic) => Hop::DeadLetter(topic.clone()),
                None => Hop::Nowhere,
            }
        } else {
            self.route.next_hop()
        };
        let metrics = &self.job.shared.metrics;
        let ledger = &mut self.ledger;
        match hop {
            Hop::Tier(tier, topic) => {
                self.job
                    .forwarder
                    .forward(&topic, record, failure, Some(tier), ledger, &self.abandon)
                    .await?;
                metrics.tiered(tier);
            }
            Hop::DeadLetter(topic) => {
                self.job
                    .forwarder
                    .forward(&topic, record, failure, None, ledger, &self.abandon)
                    .await?;
                metrics.dead_lettered(&failure.class);
                tracing::warn!(topic = &*record.topic, partition = record.partition, offset = record.offset, class = %failure.class, error = %failure.message, "Record dead-lettered.");
            }
            Hop::Nowhere => {
                // No DLQ: never drop; hold the partition until stopped.
                tracing::error!(topic = &*record.topic, partition = record.partition, offset = record.offset, class = %failure.class, "Record failed and the topic has no dead-letter queue; the partition is blocked.");
                self.abandon.cancelled().await;
                return Err(crate::forward::Abandoned);
            }
        }
        Ok(())
    }
}
