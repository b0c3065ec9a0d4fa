//! Reading a topic back to its real end: the dead-letter tools and the
//! checker read whole DLQs, and a forward first reads what its group already
//! wrote to the destination since a partition was assigned.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// A header of a record read back, as text.
pub fn header(message: &OwnedMessage, key: &str) -> Option<String> {
    backbone::headers::value(message.headers()?, key)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// How long a read waits for records past the high watermarks the broker
/// reported, once it has read up to them.
const BEYOND_THE_END: Duration = Duration::from_millis(300);

/// Every record in `topic` up to its end as of now, in partition order:
/// all of them, or (with `since_ms`) those from the first one stamped at or
/// after `since_ms` in each partition on.
/// Records missing between others are read again until they have stayed
/// missing for `gap_confirmation` (`kafka.gap_confirmation_ms`).
pub fn read_since(
    config: &ClientConfig,
    topic: &str,
    since_ms: Option<i64>,
    gap_confirmation: Duration,
) -> anyhow::Result<Vec<OwnedMessage>> {
    let consumer = reader(config)?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .with_context(|| format!("reading metadata of {topic}"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        bail!("topic {topic} does not exist on the cluster");
    }
    // Every partition is read, even one that looks empty: a broker may
    // report its high watermark low (tansu 0.6.0: by 1-2 records), and a
    // fetch from there still returns what lies beyond.
    let mut bounds = BTreeMap::new();
    for &partition in &partitions {
        bounds.insert(
            partition,
            consumer.fetch_watermarks(topic, partition, timeout)?,
        );
    }
    let Some(since_ms) = since_ms else {
        return read_ranges(&consumer, topic, &bounds, true, gap_confirmation);
    };
    // Backwards from the end in growing windows until each partition shows
    // a record stamped before `since_ms` (or its start): neither broker here
    // answers ListOffsets by time usefully (the mock cluster says "end" for
    // every time, tansu 0.6.0 offset 0 for a time past the end).
    let mut out = Vec::new();
    let mut window = 64;
    let mut ranges: BTreeMap<i32, (i64, i64)> = bounds
        .iter()
        .map(|(&p, &(low, high))| (p, ((high - window).max(low), high)))
        .collect();
    // Only the first window reaches the end; each later one ends where the
    // one before began.
    let mut at_the_end = true;
    while !ranges.is_empty() {
        let read = read_ranges(&consumer, topic, &ranges, at_the_end, gap_confirmation)?;
        at_the_end = false;
        window *= 4;
        let mut next = BTreeMap::new();
        for (&partition, &(start, _)) in &ranges {
            let earliest = read
                .iter()
                .filter(|m| m.partition() == partition)
                .filter_map(|m| m.timestamp().to_millis())
                .min();
            let low = bounds.get(&partition).map_or(0, |b| b.0);
            if start > low && earliest.is_none_or(|t| t >= since_ms) {
                next.insert(partition, ((start - window).max(low), start));
            }
        }
        out.extend(read);
        ranges = next;
    }
    out.sort_by_key(|m| (m.partition(), m.offset()));
    Ok(out)
}

/// The first offset the broker still keeps in each of `partitions` of
/// `topic` (its low watermark): what lies below was deleted by retention.
pub fn log_starts(
    config: &ClientConfig,
    topic: &str,
    partitions: &BTreeSet<i32>,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    if partitions.is_empty() {
        return Ok(BTreeMap::new());
    }
    let consumer = reader(config)?;
    partitions
        .iter()
        .map(|&partition| {
            let (low, _) = consumer
                .fetch_watermarks(topic, partition, Duration::from_secs(10))
                .with_context(|| format!("reading the watermarks of {topic}[{partition}]"))?;
            Ok((partition, low))
        })
        .collect()
}

/// A consumer that joins no group and commits nothing.
fn reader(config: &ClientConfig) -> anyhow::Result<BaseConsumer> {
    let mut config = config.clone();
    // A static member id means nothing to this reader (it joins no group).
    config.remove("group.instance.id");
    config
        .set("group.id", "shopstream-readback")
        .set("fetch.wait.max.ms", "100")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()
        .context("creating the Kafka consumer")
}

/// The records of each partition from its range's start to its end
/// (exclusive); with `to_the_end`, also whatever lies beyond the reported
/// end, which is then the partition's high watermark. A read with records
/// missing between others is read again (a broker may answer before it
/// stores a record it numbered: see [`crate::continuity`]) until the gap
/// has stayed for `gap_confirmation`.
fn read_ranges(
    consumer: &BaseConsumer,
    topic: &str,
    ranges: &BTreeMap<i32, (i64, i64)>,
    to_the_end: bool,
    gap_confirmation: Duration,
) -> anyhow::Result<Vec<OwnedMessage>> {
    let started = Instant::now();
    loop {
        let read = read_ranges_once(consumer, topic, ranges, to_the_end)?;
        match first_gap(&read, ranges) {
            Some((partition, expected, received)) if started.elapsed() < gap_confirmation => {
                tracing::debug!(
                    topic,
                    partition,
                    expected,
                    received,
                    "Records missing from a read back; reading again."
                );
            }
            _ => return Ok(read),
        }
    }
}

/// The first record of `read` (sorted by partition and offset) that is not
/// the one after the record before it, or its range's start: its partition,
/// the offset expected and the one read.
fn first_gap(read: &[OwnedMessage], ranges: &BTreeMap<i32, (i64, i64)>) -> Option<(i32, i64, i64)> {
    let mut next: BTreeMap<i32, i64> = ranges.iter().map(|(&p, &(start, _))| (p, start)).collect();
    for message in read {
        let expected = next.get_mut(&message.partition())?;
        if message.offset() > *expected {
            return Some((message.partition(), *expected, message.offset()));
        }
        *expected = message.offset() + 1;
    }
    None
}

/// A consumer error that only says a broker connection dropped (reported
/// as `AllBrokersDown` with one broker): seen once reading a DLQ under load
/// beside the reliability suite, it failed `shopstream-check`.
fn connection_lost(error: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    matches!(
        error,
        KafkaError::MessageConsumption(
            RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::BrokerTransportFailure
        )
    )
}

fn read_ranges_once(
    consumer: &BaseConsumer,
    topic: &str,
    ranges: &BTreeMap<i32, (i64, i64)>,
    to_the_end: bool,
) -> anyhow::Result<Vec<OwnedMessage>> {
    let timeout = Duration::from_secs(10);
    let mut assignment = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for (&partition, &(start, end)) in ranges {
        if end > start {
            ends.insert(partition, end);
        }
        assignment.add_partition_offset(topic, partition, Offset::Offset(start))?;
    }
    consumer.assign(&assignment)?;
    let wanted = |m: &OwnedMessage| {
        ranges
            .get(&m.partition())
            .is_some_and(|&(start, end)| m.offset() >= start && (to_the_end || m.offset() < end))
    };
    let mut out = Vec::new();
    let mut idle = std::time::Instant::now();
    while !ends.is_empty() {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                idle = std::time::Instant::now();
                let (partition, offset) = (message.partition(), message.offset());
                if ends.get(&partition).is_some_and(|&end| offset + 1 >= end) {
                    ends.remove(&partition);
                }
                let message = message.detach();
                if wanted(&message) {
                    out.push(message);
                }
            }
            // librdkafka reconnects by itself; the idle timeout bounds it.
            Some(Err(error)) if connection_lost(&error) => {
                tracing::debug!(topic, %error, "Reading back: connection lost; librdkafka reconnects.");
            }
            Some(Err(error)) => bail!("reading {topic}: {error}"),
            None if idle.elapsed() > timeout => bail!(
                "reading {topic}: no records for {timeout:?} although partitions {:?} are not at their end",
                ends.keys().collect::<Vec<_>>()
            ),
            None => {}
        }
    }
    if to_the_end {
        // What the fetches brought beyond the reported ends (a low high
        // watermark) is already here or a moment away.
        while let Some(result) = consumer.poll(BEYOND_THE_END) {
            match result {
                Ok(message) => out.push(message.detach()),
                Err(error) if connection_lost(&error) => {}
                Err(error) => bail!("reading {topic}: {error}"),
            }
        }
    }
    out.sort_by_key(|m| (m.partition(), m.offset()));
    Ok(out)
}
