//! Batched, idempotent inserts into one ClickHouse table, shared by every
//! partition task. Handlers submit a batch's rows and wait; a table's rows go
//! out in one INSERT when the insert period ends, a size limit is reached or
//! every partition task that holds records (up to the runtime's concurrency)
//! is waiting: nothing else can arrive. A
//! batch's offsets are stored only after that INSERT is acknowledged.
//!
//! Idempotence: event rows carry their Kafka position. The positions already
//! in the table are looked up (the sorting key) and left out, so a replay
//! after a crash, or a retry after a response lost on the wire, adds
//! nothing. A lookup also learns that nothing is stored past a partition's
//! rows; the writer's own inserts then keep that knowledge current, so a
//! partition's next rows, past what it knows, need no lookup until a
//! rebalance or a failed insert makes it unsure. One INSERT below a million
//! rows into a table without PARTITION BY is one part: all or nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backbone::telemetry;
use clickhouse::{Client, RowOwned, RowWrite};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::Instrument;

use super::rows::{Malformed, Position};
use crate::metrics::Metrics;

/// How inserts are paced.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub period: Duration,
    pub max_rows: usize,
    pub max_bytes: usize,
    pub timeout: Duration,
}

/// Counts the partition tasks waiting on any table, so that when every one
/// that could still bring rows is waiting the tables flush at once: as many
/// as the runtime lets run, or fewer when fewer partitions hold records
/// (the end of a burst, a quiet topic), rather than waiting out the period.
#[derive(Debug)]
pub struct Pacer {
    waiting: AtomicUsize,
    concurrency: usize,
    metrics: Arc<Metrics>,
    /// Changes whenever a submission starts waiting.
    grew: watch::Sender<()>,
}

impl Pacer {
    pub fn new(concurrency: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            waiting: AtomicUsize::new(0),
            concurrency,
            metrics,
            grew: watch::Sender::new(()),
        })
    }

    fn all_waiting(&self) -> bool {
        let busy = self.metrics.busy_partitions.get();
        self.waiting.load(Ordering::SeqCst) >= self.concurrency.min(busy).max(1)
    }
}

/// Holds a place in the pacer's count until the submission is answered or
/// dropped (abandoned).
#[derive(Debug)]
struct Waiting(Arc<Pacer>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Per row: stored (or already there), or refused by ClickHouse as malformed.
pub type RowResults = Vec<Result<(), Malformed>>;

struct Submission<T> {
    rows: Vec<(Option<Position>, T)>,
    bytes: usize,
    /// The span that submitted the rows (a batch's), when traces are on.
    source: Option<telemetry::SourceSpan>,
    ack: oneshot::Sender<RowResults>,
    _waiting: Waiting,
}

/// A table's insert queue; cloning shares it.
pub struct Table<T> {
    name: &'static str,
    queue: mpsc::UnboundedSender<Submission<T>>,
    pacer: Arc<Pacer>,
}

impl<T> std::fmt::Debug for Table<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table").field("name", &self.name).finish()
    }
}

impl<T> Clone for Table<T> {
    fn clone(&self) -> Self {
        Self {
            name: self.name,
            queue: self.queue.clone(),
            pacer: self.pacer.clone(),
        }
    }
}

/// The table's writer task is gone (the worker is stopping).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the ClickHouse writer stopped")]
pub struct Stopped;

impl<T: RowOwned + RowWrite + Serialize + Send + Sync + 'static> Table<T> {
    /// Starts the table's writer. `guarded` tables have the position columns
    /// and skip rows whose position is already stored.
    pub fn start(
        client: Client,
        name: &'static str,
        guarded: bool,
        limits: Limits,
        pacer: Arc<Pacer>,
    ) -> Self {
        let (queue, inbox) = mpsc::unbounded_channel();
        let writer = Writer {
            client,
            name,
            guarded,
            limits,
            pacer: pacer.clone(),
            known: Mutex::default(),
        };
        tokio::spawn(writer.run(inbox));
        Self { name, queue, pacer }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Queues rows and waits until they are stored: one result per row.
    /// Dropping the future withdraws rows not yet sent.
    pub async fn store(
        &self,
        rows: Vec<(Option<Position>, T)>,
        bytes: usize,
    ) -> Result<RowResults, Stopped> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let (ack, answer) = oneshot::channel();
        self.pacer.waiting.fetch_add(1, Ordering::SeqCst);
        let submission = Submission {
            rows,
            bytes,
            source: telemetry::current_span(),
            ack,
            _waiting: Waiting(self.pacer.clone()),
        };
        self.queue.send(submission).map_err(|_| Stopped)?;
        self.pacer.grew.send_replace(());
        answer.await.map_err(|_| Stopped)
    }
}

struct Writer {
    client: Client,
    name: &'static str,
    guarded: bool,
    limits: Limits,
    pacer: Arc<Pacer>,
    known: Mutex<Known>,
}

/// Per partition, the offset from which the table holds none of its rows:
/// learnt by a lookup, moved on by this writer's own inserts. Only another
/// writer could make it wrong, and another writer of a partition means a
/// rebalance (which changes the assignment epoch and empties it) or a
/// replay of offsets below it (which is looked up).
#[derive(Debug, Default)]
struct Known {
    epoch: u64,
    empty_from: HashMap<(String, i32), i64>,
}

/// The lowest and highest offset of each partition among pending rows.
type Ranges<'a> = BTreeMap<(&'a str, i32), (i64, i64)>;

fn ranges<T>(pending: &[Submission<T>]) -> Ranges<'_> {
    let mut ranges = Ranges::new();
    for (position, _) in pending.iter().flat_map(|s| s.rows.iter()) {
        let Some(p) = position else { continue };
        let range = ranges
            .entry((p.kafka_topic.as_str(), p.kafka_partition))
            .or_insert((p.kafka_offset, p.kafka_offset));
        range.0 = range.0.min(p.kafka_offset);
        range.1 = range.1.max(p.kafka_offset);
    }
    ranges
}

impl Writer {
    async fn run<T: RowOwned + RowWrite + Serialize + Send + Sync>(
        self,
        mut inbox: mpsc::UnboundedReceiver<Submission<T>>,
    ) {
        let mut pending: Vec<Submission<T>> = Vec::new();
        let (mut rows, mut bytes) = (0, 0);
        let mut since: Option<Instant> = None;
        let (mut grew, mut fell) = (
            self.pacer.grew.subscribe(),
            self.pacer.metrics.busy_partitions.falls(),
        );
        loop {
            let due = since.map(|t| t + self.limits.period);
            let flush = tokio::select! {
                received = inbox.recv() => match received {
                    Some(submission) => {
                        rows += submission.rows.len();
                        bytes += submission.bytes;
                        pending.push(submission);
                        since.get_or_insert_with(Instant::now);
                        rows >= self.limits.max_rows
                            || bytes >= self.limits.max_bytes
                            || self.pacer.all_waiting()
                    }
                    None => {
                        self.flush(std::mem::take(&mut pending)).await;
                        return;
                    }
                },
                () = sleep_until(due), if due.is_some() => true,
                // Another table's submission, or a partition letting go,
                // may leave nothing more to wait for.
                Ok(()) = grew.changed(), if !pending.is_empty() => self.pacer.all_waiting(),
                Ok(()) = fell.changed(), if !pending.is_empty() => self.pacer.all_waiting(),
            };
            if flush {
                self.flush(std::mem::take(&mut pending)).await;
                (rows, bytes, since) = (0, 0, None);
            }
        }
    }

    /// Stores every pending row, retrying with backoff while ClickHouse is
    /// unavailable; answers each submission. Its span continues the spans
    /// of the batches that submitted the rows.
    async fn flush<T: RowOwned + RowWrite + Serialize + Send + Sync>(
        &self,
        pending: Vec<Submission<T>>,
    ) {
        if pending.is_empty() {
            return;
        }
        let span = backbone::traced_span!(
            "clickhouse insert",
            table = self.name,
            rows = pending.iter().map(|s| s.rows.len() as u64).sum::<u64>(),
            batches = pending.len() as u64,
        );
        if !span.is_disabled() {
            telemetry::follow(&span, pending.iter().filter_map(|s| s.source.clone()));
        }
        self.store_all(pending).instrument(span).await;
    }

    async fn store_all<T: RowOwned + RowWrite + Serialize + Send + Sync>(
        &self,
        mut pending: Vec<Submission<T>>,
    ) {
        let mut delay = Duration::from_millis(100);
        let started = std::time::Instant::now();
        loop {
            pending.retain(|s| !s.ack.is_closed());
            if pending.is_empty() {
                return;
            }
            let attempt = self.try_flush(&pending).await;
            if !matches!(attempt, Ok(Some(_))) {
                // The attempt may have stored some rows: look every
                // partition up again, in the retries and the flushes after.
                self.known.lock().expect("not poisoned").empty_from.clear();
            }
            let failure = match attempt {
                Ok(Some(results)) => {
                    for (submission, results) in pending.into_iter().zip(results) {
                        let _ = submission.ack.send(results);
                    }
                    if started.elapsed() > Duration::from_secs(1) {
                        tracing::info!(table = self.name, after = ?started.elapsed(), "ClickHouse insert succeeded after retries.");
                    }
                    return;
                }
                Ok(None) => "a row was refused and retried alone".to_owned(),
                Err(error) => error.to_string(),
            };
            self.pacer.metrics.clickhouse_insert_failures.inc();
            tracing::warn!(table = self.name, error = %failure, retry_in = ?delay, "ClickHouse insert failed; retrying (offsets wait).");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// One attempt: the rows not yet stored, in one INSERT; when ClickHouse
    /// refuses the data, row by row to find the malformed ones. `Ok(None)`
    /// when a transient error interrupted the row-by-row pass. Partitions
    /// whose rows all lie where the table is known to hold nothing are not
    /// looked up.
    async fn try_flush<T: RowOwned + RowWrite + Serialize + Send + Sync>(
        &self,
        pending: &[Submission<T>],
    ) -> Result<Option<Vec<RowResults>>, clickhouse::error::Error> {
        let epoch = self.pacer.metrics.assignment_epoch();
        // An unguarded table's rows carry no positions: nothing to range
        // or look up.
        let (ranges, (stored, found_past)) = if self.guarded {
            let ranges = ranges(pending);
            let unsure: Ranges<'_> = {
                let mut known = self.known.lock().expect("not poisoned");
                if known.epoch != epoch {
                    *known = Known {
                        epoch,
                        ..Known::default()
                    };
                }
                ranges
                    .iter()
                    .filter(|((topic, partition), (low, _))| {
                        known
                            .empty_from
                            .get(&(topic.to_string(), *partition))
                            .is_none_or(|from| low < from)
                    })
                    .map(|(k, v)| (*k, *v))
                    .collect()
            };
            let found = self.stored_positions(&unsure).await?;
            (ranges, found)
        } else {
            Default::default()
        };
        let fresh = |p: &Option<Position>| p.as_ref().is_none_or(|p| !stored.contains(p));
        let rows: Vec<&T> = pending
            .iter()
            .flat_map(|s| s.rows.iter())
            .filter(|(p, _)| fresh(p))
            .map(|(_, row)| row)
            .collect();
        let ok =
            || -> Vec<RowResults> { pending.iter().map(|s| vec![Ok(()); s.rows.len()]).collect() };
        match self.insert(&rows).await {
            Ok(()) => {
                self.learn(&ranges, &found_past, epoch);
                return Ok(Some(ok()));
            }
            Err(error) if !is_data_error(&error) => return Err(error),
            Err(error) => {
                tracing::warn!(table = self.name, %error, rows = rows.len(), "ClickHouse refused the data; inserting row by row to find the malformed rows.");
            }
        }
        let mut results = ok();
        for (s, submission) in pending.iter().enumerate() {
            for (r, (position, row)) in submission.rows.iter().enumerate() {
                if !fresh(position) {
                    continue;
                }
                match self.insert(&[row]).await {
                    Ok(()) => {}
                    Err(error) if is_data_error(&error) => {
                        results[s][r] = Err(Malformed(error.to_string()));
                    }
                    Err(_) => return Ok(None),
                }
            }
        }
        // The rows refused are not stored either.
        self.learn(&ranges, &found_past, epoch);
        Ok(Some(results))
    }

    /// After every pending row is stored (or refused): the table holds none
    /// of a partition's rows past the highest just written, unless the
    /// lookup found some there (a replay of what an earlier owner wrote).
    fn learn(&self, ranges: &Ranges<'_>, found_past: &HashSet<(String, i32)>, epoch: u64) {
        let mut known = self.known.lock().expect("not poisoned");
        if known.epoch != epoch {
            return;
        }
        for ((topic, partition), (_, high)) in ranges {
            let key = (topic.to_string(), *partition);
            if found_past.contains(&key) {
                known.empty_from.remove(&key);
            } else {
                known.empty_from.insert(key, high + 1);
            }
        }
    }

    async fn insert<T: RowOwned + RowWrite + Serialize + Send + Sync>(
        &self,
        rows: &[&T],
    ) -> Result<(), clickhouse::error::Error> {
        if rows.is_empty() {
            return Ok(());
        }
        let timeout = Some(self.limits.timeout);
        let mut insert = self
            .client
            .insert::<T>(self.name)
            .await?
            .with_timeouts(timeout, timeout);
        for row in rows {
            insert.write(row).await?;
        }
        insert.end().await
    }

    /// Which of the positions in `ranges` the table already holds, and the
    /// partitions it holds rows of past their range (what lets the writer
    /// skip the next lookups): two queries, so that neither returns more
    /// than the pending rows' positions and a row per partition (an earlier
    /// owner may have stored many rows past its last commit).
    async fn stored_positions(
        &self,
        ranges: &Ranges<'_>,
    ) -> Result<(HashSet<Position>, HashSet<(String, i32)>), clickhouse::error::Error> {
        if ranges.is_empty() {
            return Ok(Default::default());
        }
        self.pacer.metrics.position_lookups.inc();
        let stored = self.positions(Asked::Within, ranges).await?;
        let past = self.positions(Asked::Past, ranges).await?;
        Ok((
            stored.into_iter().collect(),
            past.into_iter()
                .map(|p| (p.kafka_topic, p.kafka_partition))
                .collect(),
        ))
    }

    /// The stored positions `asked` of each of `ranges`' partitions.
    async fn positions(
        &self,
        asked: Asked,
        ranges: &Ranges<'_>,
    ) -> Result<Vec<Position>, clickhouse::error::Error> {
        let (offset, prewhere, offsets, group) = match asked {
            Asked::Within => ("kafka_offset", ">=", "BETWEEN ? AND ?", ""),
            Asked::Past => (
                "max(kafka_offset)",
                ">",
                "> ?",
                " GROUP BY kafka_topic, kafka_partition",
            ),
        };
        let condition =
            vec![
                format!("(kafka_topic = ? AND kafka_partition = ? AND kafka_offset {offsets})");
                ranges.len()
            ]
            .join(" OR ");
        // The offsets' bound as a PREWHERE too: the parts written since the
        // last merge are a granule or two each, so the key cannot skip their
        // rows, and reading only the older rows' offsets (not their topics)
        // made the lookup 3 times cheaper on 18.16 (5 ms against 14 over 34
        // parts of 5,880 rows), the sink 7% faster.
        let bound = ranges
            .values()
            .map(|&(low, high)| match asked {
                Asked::Within => low,
                Asked::Past => high,
            })
            .min()
            .unwrap_or(0);
        let mut query = self
            .client
            .query(&format!(
                "SELECT kafka_topic, kafka_partition, {offset} FROM `{}` PREWHERE kafka_offset {prewhere} ? WHERE {condition}{group}",
                self.name
            ))
            .bind(bound);
        for ((topic, partition), (low, high)) in ranges {
            query = query.bind(*topic).bind(*partition);
            query = match asked {
                Asked::Within => query.bind(*low).bind(*high),
                Asked::Past => query.bind(*high),
            };
        }
        tokio::time::timeout(self.limits.timeout, query.fetch_all::<Position>())
            .await
            .map_err(|_| clickhouse::error::Error::TimedOut)?
    }
}

/// What a position query returns of each partition.
#[derive(Debug, Clone, Copy)]
enum Asked {
    /// The stored positions within its pending rows' range.
    Within,
    /// The highest stored offset past that range, if any.
    Past,
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// ClickHouse error codes that blame the data, not the server: the rows are
/// retried one by one and those still refused go to the DLQ.
const DATA_ERROR_CODES: [u32; 14] = [
    6,   // CANNOT_PARSE_TEXT
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    53,  // TYPE_MISMATCH
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    131, // TOO_LARGE_STRING_SIZE
    321, // VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    395, // FUNCTION_THROW_IF_VALUE_IS_NON_ZERO
    469, // VIOLATED_CONSTRAINT
];

/// The `Code: N` of a ClickHouse exception, if the error carries one.
pub fn error_code(error: &clickhouse::error::Error) -> Option<u32> {
    let clickhouse::error::Error::BadResponse(text) = error else {
        return None;
    };
    let rest = &text[text.find("Code: ")? + 6..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn is_data_error(error: &clickhouse::error::Error) -> bool {
    error_code(error).is_some_and(|code| DATA_ERROR_CODES.contains(&code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_read_from_exceptions() {
        let refused = clickhouse::error::Error::BadResponse(
            "Code: 395, e.displayText() = DB::Exception: Value passed to 'throwIf' function is non zero, e.what() = DB::Exception".into(),
        );
        assert_eq!(error_code(&refused), Some(395));
        assert!(is_data_error(&refused));
        let missing = clickhouse::error::Error::BadResponse(
            "Code: 60. DB::Exception: Table x doesn't exist".into(),
        );
        assert_eq!(error_code(&missing), Some(60));
        assert!(
            !is_data_error(&missing),
            "a missing table is the server's problem: retried, never dead-lettered"
        );
        assert!(!is_data_error(&clickhouse::error::Error::TimedOut));
    }
}
