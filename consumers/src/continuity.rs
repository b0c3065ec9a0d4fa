//! No record skipped, whatever the broker: each partition's next expected
//! offset is known, and a fetched record that is not it is refused and the
//! partition fetched again from the expected offset.
//!
//! librdkafka trusts the broker's answer and its own bookkeeping across
//! pause, resume, seek and reassignment; a broker that answers a fetch with
//! a record missing (seen on tansu 0.6.0 at the worker's backpressure
//! resume) would otherwise lose that record silently: the next record's
//! offset is stored and committed past it. A real gap (compaction,
//! transaction markers, records deleted by retention) shows the same first
//! offset again when fetched again `kafka.gap_confirmation_ms` later, and is then
//! accepted. Not sooner: tansu 0.6.0 gives a record its offset before it
//! stores it, so a fetch in between misses it, and a second fetch right
//! after can miss it again while the broker is short of CPU.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::Offset;

/// How long a seek back may take to be applied by librdkafka.
const SEEK_TIMEOUT: Duration = Duration::from_secs(1);

/// What to do with a fetched record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The record expected: take it.
    Take,
    /// Below the expected offset: already taken (or before the assigned
    /// start). Skip it.
    Repeat,
    /// Records are missing before this one: skip it, seek the partition to
    /// `from` and fetch again.
    Refetch { from: i64 },
    /// The gap was still there its confirmation time after it was first
    /// seen: a real one. Take it.
    TakeAfterGap { expected: i64 },
}

/// One partition's expected next offset.
#[derive(Debug, Clone)]
pub struct Continuity {
    /// `None` until the start of the assignment is known or a record seen.
    next: Option<i64>,
    /// The offset that came first instead of `next` at the last refetch,
    /// and when that gap was first seen.
    gap_to: Option<(i64, Instant)>,
    /// How long a gap must last to be real.
    confirmation: Duration,
}

impl Continuity {
    /// Expects the partition to start at `offset` (the committed or stored
    /// position of an assignment), or anywhere when that is unknown; a gap
    /// is real once it has lasted `confirmation`.
    pub fn starting_at(offset: Option<i64>, confirmation: Duration) -> Self {
        Self {
            next: offset,
            gap_to: None,
            confirmation,
        }
    }

    /// The offset the next record must have, when known.
    pub fn next(&self) -> Option<i64> {
        self.next
    }

    /// Judges the record at `offset`, fetched at `now()`; a record taken
    /// moves the expectation on. The clock is read only for a record out of
    /// sequence (read for every record, it was a visible share of the
    /// worker's profile).
    pub fn check(&mut self, offset: i64, now: impl FnOnce() -> Instant) -> Verdict {
        let Some(next) = self.next else {
            self.next = Some(offset + 1);
            return Verdict::Take;
        };
        if offset < next {
            return Verdict::Repeat;
        }
        let verdict = match self.gap_to {
            _ if offset == next => Verdict::Take,
            Some((to, since)) if to == offset => {
                if now().duration_since(since) < self.confirmation {
                    return Verdict::Refetch { from: next };
                }
                Verdict::TakeAfterGap { expected: next }
            }
            _ => {
                self.gap_to = Some((offset, now()));
                return Verdict::Refetch { from: next };
            }
        };
        self.next = Some(offset + 1);
        self.gap_to = None;
        verdict
    }

    /// Whether to take the record at `offset` of `topic`/`partition`. On a
    /// gap it counts it in `gaps` and calls `seek_back` with the expected
    /// offset (see [`seek_back`]), so librdkafka drops what it fetched
    /// after the gap and fetches again. If the seek fails, the records
    /// after the gap keep being refused and each tries again: the
    /// partition stalls rather than skip a record.
    pub fn admit(
        &mut self,
        (topic, partition, offset): (&str, i32, i64),
        gaps: &AtomicU64,
        seek_back: impl FnOnce(i64) -> KafkaResult<()>,
    ) -> bool {
        let seen_before = self.gap_to.is_some_and(|(to, _)| to == offset);
        match self.check(offset, Instant::now) {
            Verdict::Take => true,
            Verdict::Repeat => {
                tracing::debug!(
                    topic,
                    partition,
                    offset,
                    expected = self.next,
                    "Record fetched again; skipped."
                );
                false
            }
            Verdict::Refetch { from } => {
                if seen_before {
                    tracing::debug!(
                        topic,
                        partition,
                        expected = from,
                        received = offset,
                        "Records still missing; fetching again."
                    );
                } else {
                    gaps.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(topic, partition, expected = from, received = offset, "Records missing from the fetch; fetching the partition again from the expected offset.");
                }
                if let Err(error) = seek_back(from) {
                    tracing::error!(topic, partition, %error, "Seeking back to the expected offset failed; the records after the gap are refused until a seek succeeds.");
                }
                false
            }
            Verdict::TakeAfterGap { expected } => {
                tracing::warn!(topic, partition, expected, received = offset, "The same records are still missing after {:?} of fetching again (compaction, transaction markers or retention): going on.", self.confirmation);
                true
            }
        }
    }
}

/// Seeks `topic`/`partition` of `consumer` to `offset`, waiting (at most a
/// second) for librdkafka, not the broker, to apply it.
pub fn seek_back<X: ConsumerContext, C: Consumer<X>>(
    consumer: &C,
    topic: &str,
    partition: i32,
    offset: i64,
) -> KafkaResult<()> {
    consumer.seek(topic, partition, Offset::Offset(offset), SEEK_TIMEOUT)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{Continuity, Verdict};

    /// `kafka.gap_confirmation_ms`'s default.
    const GAP_CONFIRMATION: Duration = Duration::from_secs(2);

    #[test]
    fn consecutive_records_are_taken_and_repeats_skipped() {
        let now = Instant::now();
        let mut c = Continuity::starting_at(Some(10), GAP_CONFIRMATION);
        assert_eq!(c.check(10, || now), Verdict::Take);
        assert_eq!(c.check(11, || now), Verdict::Take);
        assert_eq!(c.check(11, || now), Verdict::Repeat);
        assert_eq!(c.check(3, || now), Verdict::Repeat);
        assert_eq!(c.next(), Some(12));
    }

    #[test]
    fn an_unknown_start_takes_the_first_record() {
        let now = Instant::now();
        let mut c = Continuity::starting_at(None, GAP_CONFIRMATION);
        assert_eq!(c.check(500, || now), Verdict::Take);
        assert_eq!(c.check(502, || now), Verdict::Refetch { from: 501 });
    }

    #[test]
    fn a_missing_record_is_fetched_again_and_found() {
        let now = Instant::now();
        let mut c = Continuity::starting_at(Some(1000), GAP_CONFIRMATION);
        assert_eq!(c.check(1001, || now), Verdict::Refetch { from: 1000 });
        // Records of the answer that had the gap may still arrive.
        assert_eq!(c.check(1002, || now), Verdict::Refetch { from: 1000 });
        assert_eq!(c.check(1000, || now), Verdict::Take);
        assert_eq!(c.check(1001, || now), Verdict::Take);
        // A later gap is judged afresh.
        assert_eq!(c.check(1003, || now), Verdict::Refetch { from: 1002 });
    }

    #[test]
    fn a_gap_still_there_after_the_confirmation_time_is_real_and_taken() {
        let now = Instant::now();
        let mut c = Continuity::starting_at(Some(7), GAP_CONFIRMATION);
        assert_eq!(c.check(9, || now), Verdict::Refetch { from: 7 });
        // Seen again at once (a broker that numbered record 7 but has not
        // stored it yet): fetched again, not taken.
        assert_eq!(
            c.check(9, || now + Duration::from_millis(50)),
            Verdict::Refetch { from: 7 }
        );
        assert_eq!(
            c.check(9, || now + GAP_CONFIRMATION - Duration::from_millis(1)),
            Verdict::Refetch { from: 7 }
        );
        assert_eq!(
            c.check(9, || now + GAP_CONFIRMATION),
            Verdict::TakeAfterGap { expected: 7 }
        );
        assert_eq!(c.next(), Some(10));
        assert_eq!(c.check(10, || now), Verdict::Take);
    }

    #[test]
    fn without_a_confirmation_time_a_gap_seen_twice_is_taken() {
        let now = Instant::now();
        let mut c = Continuity::starting_at(Some(7), Duration::ZERO);
        assert_eq!(c.check(9, || now), Verdict::Refetch { from: 7 });
        assert_eq!(c.check(9, || now), Verdict::TakeAfterGap { expected: 7 });
    }

    #[test]
    fn a_record_stored_late_is_taken_once_it_arrives() {
        let now = Instant::now();
        let mut c = Continuity::starting_at(Some(7), GAP_CONFIRMATION);
        assert_eq!(c.check(8, || now), Verdict::Refetch { from: 7 });
        assert_eq!(
            c.check(8, || now + Duration::from_millis(10)),
            Verdict::Refetch { from: 7 }
        );
        assert_eq!(
            c.check(7, || now + Duration::from_millis(20)),
            Verdict::Take
        );
        assert_eq!(
            c.check(8, || now + Duration::from_millis(20)),
            Verdict::Take
        );
    }
}
