//! Closed hours: each hour's partials compacted, per model with keys, into
//! one row per key and one for every key together, in [`HOURS_TABLE`]. A day then
//! reads 24 rows per key instead of a row per flush and key, and its
//! distinct counts are numbers instead of sets. Exact whatever crashed: a
//! compaction is one insert (one part, like a flush) recording how many
//! flushes of the hour it covers (their window markers, `ddl::WINDOW_MARKER`),
//! and a read takes an hour from it only while the hour still has exactly
//! that many (`ddl::Rows`); any other hour is read from the partials, so a
//! compaction only ever makes reads faster.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ddl::{compacted, Level, HOURS_TABLE, OFFSET_MODEL, PARTIALS_TABLE, WINDOW_MARKER};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, clickhouse::Row)]
pub struct HourRow {
    pub model: String,
    /// [`Level`].
    pub level: u8,
    /// The hour's start, as the server's `toStartOfHour` gives it.
    pub window_start: u32,
    pub dim1: String,
    pub dim2: String,
    pub c1: i64,
    pub c2: i64,
    pub c3: i64,
    pub c4: i64,
    pub c5: i64,
    pub c6: i64,
    /// Distinct values of `set1` and `set2`.
    pub d1: u64,
    pub d2: u64,
    pub set1: Vec<String>,
    pub set2: Vec<String>,
    pub latencies: Vec<i32>,
    /// Partials of the model in the hour when it was compacted.
    pub covered: u64,
    /// This compaction's id (random), shared by its rows: of two current
    /// compactions of an hour, reads take one.
    pub compaction: u64,
    pub compacted_at: u32,
}

/// One key's partials in an hour, merged by ClickHouse, sets and latencies
/// sorted so that every server version answers alike. The window markers
/// are a "model" of their own: `partials` counts them, `sums[0]` adds up
/// the partial rows they announce.
#[derive(Debug, Deserialize, clickhouse::Row)]
struct Merged {
    model: String,
    dim1: String,
    dim2: String,
    /// c1 to c6.
    sums: Vec<i64>,
    set1: Vec<String>,
    set2: Vec<String>,
    latencies: Vec<i32>,
    partials: u64,
}

/// What one round of the compactor did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    /// Hours compacted.
    pub hours: usize,
    /// Flushes of them covered (their window markers).
    pub flushes: u64,
    /// Hours left on their partials: rows there that no marker announces
    /// (written before the markers were, by an older job), so a later
    /// flush of the same kind could not be told from the compaction.
    pub unmarked: usize,
}

/// Hours (with their flushes) found to hold partials no marker announces:
/// not merged again while they have as many flushes.
pub type Unmarked = std::collections::HashSet<(u32, u64)>;

/// Compacts every hour starting at or after `since` (an hour start is
/// taken whole) whose flushes no compaction covers and none of which
/// landed at or after `idle_before`: an hour still being written would be
/// compacted again at once.
pub async fn compact(
    client: &clickhouse::Client,
    since: u32,
    idle_before: u32,
    now: u32,
    timeout: Duration,
    unmarked: &mut Unmarked,
) -> Result<Compacted, clickhouse::error::Error> {
    let timeout_s = timeout.as_secs().max(1).to_string();
    // Each hour with its day as the table partitions it (the server's
    // calendar day).
    let stale: Vec<(u32, u64, u32)> = client
        .query(&format!(
            "SELECT toUInt32(toStartOfHour(window_start)) AS hour, count(), \
             toYYYYMMDD(toDateTime(hour)) FROM {PARTIALS_TABLE} \
             WHERE model = '{WINDOW_MARKER}' AND window_start >= toStartOfHour(toDateTime({since})) \
             GROUP BY hour \
             HAVING max(flushed_at) < toDateTime({idle_before}) AND (hour, count()) NOT IN \
             (SELECT toUInt32(window_start), covered FROM {HOURS_TABLE} \
              WHERE window_start >= toStartOfHour(toDateTime({since}))) \
             ORDER BY hour"
        ))
        .with_setting("max_execution_time", timeout_s.clone())
        .fetch_all()
        .await?;
    let mut done = Compacted::default();
    let mut days = BTreeSet::new();
    for (hour, markers, day) in stale {
        if unmarked.contains(&(hour, markers)) {
            done.unmarked += 1;
            continue;
        }
        let merged: Vec<Merged> = client
            .query(&format!(
                "SELECT model, dim1, dim2, [sum(c1), sum(c2), sum(c3), sum(c4), sum(c5), sum(c6)], \
                 arraySort(groupUniqArrayArray(set1)), arraySort(groupUniqArrayArray(set2)), \
                 arraySort(groupArrayArray(latencies)), count() \
                 FROM {PARTIALS_TABLE} WHERE model != '{OFFSET_MODEL}' \
                 AND window_start >= toDateTime({hour}) AND window_start < toDateTime({}) \
                 AND toStartOfHour(window_start) = toDateTime({hour}) GROUP BY model, dim1, dim2",
                u64::from(hour) + 3_600
            ))
            .with_setting("max_execution_time", timeout_s.clone())
            .fetch_all()
            .await?;
        let Some((rows, flushes)) = hour_rows(hour, merged, now) else {
            tracing::debug!(
                hour,
                "An hour with partials no marker announces stays on its partials."
            );
            unmarked.insert((hour, markers));
            done.unmarked += 1;
            continue;
        };
        let mut insert = client
            .insert::<HourRow>(HOURS_TABLE)
            .await?
            .with_timeouts(Some(timeout), Some(timeout));
        for row in &rows {
            insert.write(row).await?;
        }
        insert.end().await?;
        done.hours += 1;
        done.flushes += flushes;
        days.insert(day);
    }
    merge_days(client, &days).await;
    Ok(done)
}

/// Merges the parts of each day (the table's partition) the round wrote
/// to: each compaction is a part of its own, and ClickHouse 18.16 pays
/// for every part in every read (a day's lookup and read ran 1.5-1.6 times
/// as many requests/s on one part as on five, BENCHMARKS.md). Only reads
/// are slower when it fails, so a failure is logged, not returned. A day
/// already in one part is not rewritten.
async fn merge_days(client: &clickhouse::Client, days: &BTreeSet<u32>) {
    for day in days {
        if let Err(error) = client
            .query(&format!("OPTIMIZE TABLE {HOURS_TABLE} PARTITION {day}"))
            .execute()
            .await
        {
            tracing::warn!(%error, "Merging a day of compacted hours failed; its reads are slower until ClickHouse merges it.");
        }
    }
}

/// Compacts closed hours every `every` until `shutdown` (the job runs it
/// beside its consumer loop). Every replica may: of two compactions of an
/// hour, reads take one. A failed round (ClickHouse away) leaves the hours
/// read from their partials and is tried again next time.
/// `lookback` bounds the hours it looks at: an older hour changed by a
/// late event is read from its partials (exact, slower).
pub async fn compact_every(
    client: clickhouse::Client,
    every: Duration,
    after_idle: Duration,
    lookback: Duration,
    timeout: Duration,
    compacted: backbone::metrics::Counter,
    shutdown: backbone::shutdown::Shutdown,
) {
    let (mut unmarked, mut unmarked_seen) = (Unmarked::new(), 0);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX));
        let seconds = |d: Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
        match compact(
            &client,
            now.saturating_sub(seconds(lookback)),
            now.saturating_sub(seconds(after_idle)),
            now,
            timeout,
            &mut unmarked,
        )
        .await
        {
            Ok(done) => {
                if done.hours > 0 {
                    compacted.inc_by(done.hours as u64);
                    tracing::info!(
                        hours = done.hours,
                        flushes = done.flushes,
                        "Compacted closed hours."
                    );
                }
                if done.unmarked != unmarked_seen {
                    unmarked_seen = done.unmarked;
                    tracing::info!(
                        hours = done.unmarked,
                        "Hours with partials of an older job (no window markers) stay read from their partials."
                    );
                }
            }
            Err(error) => tracing::warn!(
                %error,
                "Compacting closed hours failed; they are read from their partials until the next round."
            ),
        }
    }
}

/// The rows standing for an hour's partials, merged by one SELECT (one
/// snapshot: the markers counted are those of the partials merged), and
/// how many flushes they cover; `None` when the markers do not announce
/// every partial row.
fn hour_rows(hour: u32, merged: Vec<Merged>, now: u32) -> Option<(Vec<HourRow>, u64)> {
    let (markers, merged): (Vec<Merged>, Vec<Merged>) =
        merged.into_iter().partition(|m| m.model == WINDOW_MARKER);
    let flushes: u64 = markers.iter().map(|m| m.partials).sum();
    let announced: i64 = markers
        .iter()
        .map(|m| m.sums.first().copied().unwrap_or(0))
        .sum();
    let partials: u64 = merged.iter().map(|m| m.partials).sum();
    if flushes == 0 || u64::try_from(announced).ok() != Some(partials) {
        return None;
    }
    let compaction = uuid::Uuid::new_v4().as_u64_pair().0;
    // One row of the compaction: `sums` are c1 to c6, the sets sorted.
    let row = |model: &str,
               level: Level,
               dims: (String, String),
               sums: &[i64],
               sets: [Vec<String>; 2],
               latencies: Vec<i32>| {
        let mut c = [0; 6];
        for (slot, sum) in c.iter_mut().zip(sums) {
            *slot = *sum;
        }
        let [c1, c2, c3, c4, c5, c6] = c;
        let [set1, set2] = sets;
        HourRow {
            model: model.to_owned(),
            level: level as u8,
            window_start: hour,
            dim1: dims.0,
            dim2: dims.1,
            c1,
            c2,
            c3,
            c4,
            c5,
            c6,
            d1: set1.len() as u64,
            d2: set2.len() as u64,
            set1,
            set2,
            latencies,
            covered: flushes,
            compaction,
            compacted_at: now,
        }
    };
    let mut by_model: BTreeMap<String, Vec<Merged>> = BTreeMap::new();
    for m in merged {
        by_model.entry(m.model.clone()).or_default().push(m);
    }
    let mut out = Vec::new();
    for (model, keys) in by_model.into_iter().filter(|(m, _)| compacted(m)) {
        // The hour over every key: sums added, sets merged, latencies kept.
        let mut sums = [0; 6];
        let (mut set1, mut set2) = (BTreeSet::new(), BTreeSet::new());
        let mut latencies = Vec::new();
        for m in keys {
            for (total, sum) in sums.iter_mut().zip(&m.sums) {
                *total += sum;
            }
            set1.extend(m.set1.iter().cloned());
            set2.extend(m.set2.iter().cloned());
            latencies.extend_from_slice(&m.latencies);
            // Its sets and latencies come sorted (`arraySort`).
            out.push(row(
                &model,
                Level::Key,
                (m.dim1, m.dim2),
                &m.sums,
                [m.set1, m.set2],
                m.latencies,
            ));
        }
        latencies.sort_unstable();
        let sets = [set1.into_iter().collect(), set2.into_iter().collect()];
        out.push(row(
            &model,
            Level::All,
            Default::default(),
            &sums,
            sets,
            latencies,
        ));
    }
    Some((out, flushes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merged(model: &str, dim1: &str, c1: i64, set1: &[&str], partials: u64) -> Merged {
        Merged {
            model: model.to_owned(),
            dim1: dim1.to_owned(),
            dim2: if dim1.is_empty() { "" } else { "EUR" }.to_owned(),
            sums: vec![c1, 0, 0, 0, 0, 0],
            set1: set1.iter().map(|s| (*s).to_owned()).collect(),
            set2: Vec::new(),
            latencies: Vec::new(),
            partials,
        }
    }

    #[test]
    fn an_hour_has_a_row_per_key_and_one_for_every_key_all_covering_its_flushes() {
        let hour = vec![
            merged("orders", "books", 3, &["u1", "u2"], 4),
            merged("orders", "toys", 2, &["u2", "u3"], 2),
            merged("funnel", "", 9, &[], 5),
            // Three flushes announcing the 11 partial rows above.
            merged(WINDOW_MARKER, "", 11, &[], 3),
        ];
        let (rows, flushes) = hour_rows(7_200, hour, 9_000).unwrap();
        assert_eq!(flushes, 3);
        assert!(rows.iter().all(|r| r.covered == 3
            && r.window_start == 7_200
            && r.compaction == rows[0].compaction));
        // Orders, a row per key and the hour's; the funnel (no keys) none.
        let shape: Vec<(&str, u8, &str, i64, u64)> = rows
            .iter()
            .map(|r| (r.model.as_str(), r.level, r.dim1.as_str(), r.c1, r.d1))
            .collect();
        assert_eq!(
            shape,
            [
                ("orders", 0, "books", 3, 2),
                ("orders", 0, "toys", 2, 2),
                ("orders", 1, "", 5, 3)
            ]
        );
        assert_eq!(rows[0].set1, ["u1", "u2"]);
    }

    #[test]
    fn an_hour_with_partials_no_marker_announces_is_not_compacted() {
        let unmarked = vec![
            merged("orders", "books", 3, &["u1"], 4),
            merged(WINDOW_MARKER, "", 3, &[], 1),
        ];
        assert!(hour_rows(7_200, unmarked, 9_000).is_none());
        assert!(hour_rows(7_200, vec![merged("orders", "books", 3, &["u1"], 4)], 9_000).is_none());
    }
}
