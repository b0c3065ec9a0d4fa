//! Closed hours: each hour's partials compacted, per model with keys, into
//! one row per key and one for every key together, in [`HOURS_TABLE`]. A day then
//! reads 24 rows per key instead of a row per flush and key, and its
//! distinct counts are numbers instead of sets. Exact whatever crashed: a
//! compaction is one insert (one part, like a flush) recording how many
//! flushes of the hour it covers (their window markers, `ddl::WINDOW_MARKER`),
//! and a read takes an hour from it only while the hour still has exactly
//! that many (`ddl::Rows`); any other hour is read from the partials, so a
//! compaction only ever makes reads faster. The rooms' distinct chatters
//! over each 24 compacted hours are counted once more, in `DAYS_TABLE`,
//! by the same rule.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ddl::{
    compacted, compacted_per_minute, Level, DAYS_TABLE, DAY_MODEL, HOURS_TABLE, MINUTES_TABLE,
    MODEL_KEYS, OFFSET_MODEL, OWN_MINUTE, PARTIALS_TABLE, WINDOW_MARKER,
};

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

/// One key's distinct count over the 24 hours from `window_start`, counted
/// over their compactions ([`compact_days`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, clickhouse::Row)]
pub struct DayRow {
    pub model: String,
    pub window_start: u32,
    pub dim1: String,
    /// Distinct values of the key's `set1` over the day.
    pub d1: u64,
    /// Flushes of the day (its hours' window markers) the compactions
    /// counted covered: a read takes the row while the day has exactly
    /// that many, as it takes an hour's compaction.
    pub covered: u64,
    pub compacted_at: u32,
}

/// A day's length, in seconds.
pub const DAY: u32 = 86_400;

/// One key's partials in an hour or a minute of it, merged by ClickHouse,
/// sets and latencies sorted so that every server version answers alike.
/// The window markers are a "model" of their own: `partials` counts them,
/// `sums[0]` adds up the partial rows they announce.
#[derive(Debug, Deserialize, clickhouse::Row)]
struct Merged {
    model: String,
    /// The hour, or the minute.
    window_start: u32,
    dim1: String,
    dim2: String,
    /// c1 to c6.
    sums: Vec<i64>,
    set1: Vec<String>,
    set2: Vec<String>,
    latencies: Vec<i32>,
    partials: u64,
}

/// The SELECT merging the partials of `hour` that `models` (a condition)
/// keeps, per key and `window` (an expression grouped by: the hour or the
/// minute), as [`Merged`] rows.
fn merge_sql(hour: u32, window: &str, models: &str) -> String {
    merge_select(
        window,
        &format!(
            "{models} AND window_start >= toDateTime({hour}) AND window_start < toDateTime({}) \
             AND toStartOfHour(window_start) = toDateTime({hour})",
            u64::from(hour) + 3_600
        ),
    )
}

/// The SELECT merging the partials `rows` (a condition) keeps, per model,
/// key and `window`, as [`Merged`] rows.
fn merge_select(window: &str, rows: &str) -> String {
    format!(
        "SELECT model, {window} AS grain_start, dim1, dim2, \
         [sum(c1), sum(c2), sum(c3), sum(c4), sum(c5), sum(c6)], \
         arraySort(groupUniqArrayArray(set1)), arraySort(groupUniqArrayArray(set2)), \
         arraySort(groupArrayArray(latencies)), count() \
         FROM {PARTIALS_TABLE} WHERE {rows} GROUP BY model, grain_start, dim1, dim2"
    )
}

/// The rows of one compaction of an hour, per table.
#[derive(Debug, Default)]
struct Compaction {
    /// [`HOURS_TABLE`]'s.
    hours: Vec<HourRow>,
    /// [`MINUTES_TABLE`]'s.
    minutes: Vec<HourRow>,
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
    /// Minutes of hours not compacted yet given a compaction of their own
    /// ([`compact_minutes`]).
    pub minutes: usize,
    /// Days of compacted hours counted ([`compact_days`]).
    pub days: usize,
}

/// Hours (with their flushes) found to hold partials no marker announces:
/// not merged again while they have as many flushes.
pub type Unmarked = std::collections::HashSet<(u32, u64)>;

/// How long an hour, and a minute compacted on its own, goes without a
/// flush before it is compacted: as durations, or as the instant (epoch
/// seconds) its last flush must have landed before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Idle<T> {
    pub hours: T,
    pub minutes: T,
}

impl Idle<Duration> {
    /// The job's settings (`compact_after_idle_ms`,
    /// `compact_minutes_after_idle_ms`).
    pub fn of(settings: &backbone::config::AnalyticsSettings) -> Self {
        Self {
            hours: Duration::from_millis(settings.compact_after_idle_ms),
            minutes: Duration::from_millis(settings.compact_minutes_after_idle_ms),
        }
    }

    /// The instants before which the last flushes must have landed at
    /// `now` (epoch seconds).
    pub fn before(self, now: u32) -> Idle<u32> {
        Idle {
            hours: seconds_before(now, self.hours),
            minutes: seconds_before(now, self.minutes),
        }
    }
}

/// The time now in epoch seconds (`consumers::forward::now_ms`), as the
/// compactor and the reads take it.
pub fn epoch_seconds() -> u32 {
    u32::try_from(consumers::forward::now_ms() / 1000).unwrap_or(u32::MAX)
}

/// `now` (epoch seconds) less `ago`, not before the epoch.
fn seconds_before(now: u32, ago: Duration) -> u32 {
    now.saturating_sub(u32::try_from(ago.as_secs()).unwrap_or(u32::MAX))
}

/// Compacts every hour starting at or after `since` (an hour start is
/// taken whole) whose flushes no compaction covers and none of which
/// landed at or after `idle_before.hours`: an hour still being written
/// would be compacted again at once. Then the minutes idle before
/// `idle_before.minutes` ([`compact_minutes`]), and the days of compacted
/// hours not counted yet ([`compact_days`]).
pub async fn compact(
    client: &clickhouse::Client,
    since: u32,
    idle_before: Idle<u32>,
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
             HAVING max(flushed_at) < toDateTime({}) AND (hour, count()) NOT IN \
             (SELECT toUInt32(window_start), covered FROM {HOURS_TABLE} \
              WHERE window_start >= toStartOfHour(toDateTime({since}))) \
             ORDER BY hour",
            idle_before.hours
        ))
        .with_setting("max_execution_time", timeout_s.clone())
        .fetch_all()
        .await?;
    let mut done = Compacted::default();
    let mut days = BTreeSet::new();
    let per_minute: Vec<String> = MODEL_KEYS
        .iter()
        .filter(|m| compacted_per_minute(m))
        .chain([&WINDOW_MARKER])
        .map(|m| format!("'{m}'"))
        .collect();
    let per_minute = format!("model IN ({})", per_minute.join(", "));
    for (hour, markers, day) in stale {
        if unmarked.contains(&(hour, markers)) {
            done.unmarked += 1;
            continue;
        }
        let merged: Vec<Merged> = client
            .query(&merge_sql(
                hour,
                &format!("toUInt32({hour})"),
                &format!("model != '{OFFSET_MODEL}'"),
            ))
            .with_setting("max_execution_time", timeout_s.clone())
            .fetch_all()
            .await?;
        // The minutes of the models read per minute, with the markers: a
        // SELECT of its own, so it must have seen as many flushes.
        let minutes: Vec<Merged> = client
            .query(&merge_sql(hour, "toUInt32(window_start)", &per_minute))
            .with_setting("max_execution_time", timeout_s.clone())
            .fetch_all()
            .await?;
        let minute_flushes: u64 = minutes
            .iter()
            .filter(|m| m.model == WINDOW_MARKER)
            .map(|m| m.partials)
            .sum();
        let Some((rows, flushes)) = hour_rows(merged, minutes, now) else {
            tracing::debug!(
                hour,
                "An hour with partials no marker announces stays on its partials."
            );
            unmarked.insert((hour, markers));
            done.unmarked += 1;
            continue;
        };
        if minute_flushes != flushes {
            tracing::debug!(
                hour,
                "A flush landed while the hour was merged; it is compacted once idle again."
            );
            continue;
        }
        // The minutes first: an hour stored is not compacted again, so its
        // minutes must be there already (each table's insert is one part,
        // and a read takes each table's compactions by that table's rows).
        for (table, rows) in [(MINUTES_TABLE, &rows.minutes), (HOURS_TABLE, &rows.hours)] {
            insert_rows(client, table, rows, timeout).await?;
        }
        done.hours += 1;
        done.flushes += flushes;
        days.extend([(HOURS_TABLE, day), (MINUTES_TABLE, day)]);
    }
    // The days written to are merged whatever became of the minutes.
    let minutes = compact_minutes(client, since, idle_before.minutes, now, timeout).await;
    // A day not counted is read from its hours: slower, as exact.
    done.days = compact_days(client, since, now, timeout, &mut days)
        .await
        .unwrap_or_else(|error| {
            tracing::warn!(%error, "Counting days of compacted hours failed; they are read from their hours until the next round.");
            0
        });
    merge_days(client, &days).await;
    done.minutes = minutes?;
    Ok(done)
}

/// Counts [`DAY_MODEL`]'s distinct values per key over each 24 hours
/// ending at a closed hour from `since` on whose every hour with flushes
/// has a compaction covering them all, unless counted so already: one
/// [`DayRow`] per key, in one insert. A read of the busiest rooms over
/// such a day (the last 24 hours to the hour, a calendar day) then takes
/// ten numbers instead of hashing 24 hours of each room's chatters. The
/// count is the one a read over the hours' keys gives, from the same
/// compactions. Adds the partitions written to `days`.
async fn compact_days(
    client: &clickhouse::Client,
    since: u32,
    now: u32,
    timeout: Duration,
    days: &mut BTreeSet<(&'static str, u32)>,
) -> Result<usize, clickhouse::error::Error> {
    let timeout_s = timeout.as_secs().max(1).to_string();
    let first = format!("toStartOfHour(toDateTime({since})) - {}", DAY - 3_600);
    // (hour, flushes) of every hour with flushes a day before `since` on,
    // with the partition of the day ending at the hour.
    let hours: Vec<(u32, u64, u32)> = client
        .query(&format!(
            "SELECT toUInt32(toStartOfHour(window_start)) AS hour, count(), \
             toYYYYMMDD(toDateTime(hour - {})) FROM {PARTIALS_TABLE} \
             WHERE model = '{WINDOW_MARKER}' AND window_start >= {first} GROUP BY hour",
            DAY - 3_600
        ))
        .with_setting("max_execution_time", timeout_s.clone())
        .fetch_all()
        .await?;
    if hours.is_empty() {
        return Ok(0);
    }
    let partitions: BTreeMap<u32, u32> = hours.iter().map(|(h, _, p)| (*h, *p)).collect();
    let markers: BTreeMap<u32, u64> = hours.into_iter().map(|(h, n, _)| (h, n)).collect();
    // (hour, flushes covered) -> a compaction of it, and whether it holds
    // the model's rows.
    let compactions: BTreeMap<(u32, u64), (u64, bool)> = client
        .query(&format!(
            "SELECT toUInt32(window_start), covered, min(compaction), countIf(model = '{DAY_MODEL}') > 0 \
             FROM {HOURS_TABLE} WHERE window_start >= {first} GROUP BY window_start, covered"
        ))
        .with_setting("max_execution_time", timeout_s.clone())
        .fetch_all::<(u32, u64, u64, bool)>()
        .await?
        .into_iter()
        .map(|(hour, covered, id, held)| ((hour, covered), (id, held)))
        .collect();
    let counted: BTreeSet<(u32, u64)> = client
        .query(&format!(
            "SELECT toUInt32(window_start), covered FROM {DAYS_TABLE} \
             WHERE model = '{DAY_MODEL}' AND window_start >= {first} GROUP BY window_start, covered"
        ))
        .with_setting("max_execution_time", timeout_s.clone())
        .fetch_all::<(u32, u64)>()
        .await?
        .into_iter()
        .collect();
    // (day start, flushes covered, a compaction of each hour with flushes)
    // of each day to count: ending at a closed hour, every hour with
    // flushes compacted, some with the model's rows, not counted so yet.
    let mut wanted: Vec<(u32, u64, Vec<u64>)> = Vec::new();
    for (&end, _) in markers.range(since..) {
        let start = end + 3_600 - DAY;
        if end + 3_600 > now {
            continue;
        }
        let hours: Vec<(u32, u64)> = markers.range(start..=end).map(|(h, n)| (*h, *n)).collect();
        let covered: u64 = hours.iter().map(|(_, n)| n).sum();
        let Some(held) = hours
            .iter()
            .map(|hour| compactions.get(hour).copied())
            .collect::<Option<Vec<(u64, bool)>>>()
        else {
            continue;
        };
        if held.iter().any(|(_, chat)| *chat) && !counted.contains(&(start, covered)) {
            wanted.push((start, covered, held.into_iter().map(|(id, _)| id).collect()));
        }
    }
    // Hours of those days without flushes (marked ones, that is) but with
    // the model's partials: an older job's, read from there, so their days
    // are not counted. Usually no hour is asked about.
    let unmarked: BTreeSet<u32> = wanted
        .iter()
        .flat_map(|(start, ..)| (*start..start + DAY).step_by(3_600))
        .filter(|hour| !markers.contains_key(hour))
        .collect();
    let unannounced: Vec<u32> = if unmarked.is_empty() {
        Vec::new()
    } else {
        // Runs of hours, each one range of the sort key.
        let mut runs: Vec<(u32, u32)> = Vec::new();
        for &hour in &unmarked {
            match runs.last_mut() {
                Some((_, end)) if *end == hour => *end += 3_600,
                _ => runs.push((hour, hour + 3_600)),
            }
        }
        let hours: Vec<String> = runs
            .iter()
            .map(|(from, to)| {
                format!("(window_start >= toDateTime({from}) AND window_start < toDateTime({to}))")
            })
            .collect();
        client
            .query(&format!(
                "SELECT DISTINCT toUInt32(toStartOfHour(window_start)) FROM {PARTIALS_TABLE} \
                 WHERE model = '{DAY_MODEL}' AND ({})",
                hours.join(" OR ")
            ))
            .with_setting("max_execution_time", timeout_s.clone())
            .fetch_all()
            .await?
    };
    let mut rows = Vec::new();
    for (start, covered, ids) in wanted {
        if unannounced.iter().any(|h| (start..start + DAY).contains(h)) {
            continue;
        }
        let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
        let keys: Vec<(String, u64)> = client
            .query(&format!(
                "SELECT dim1, uniqExactArray({}) FROM {HOURS_TABLE} \
                 WHERE model = '{DAY_MODEL}' AND level = {} AND window_start >= toDateTime({start}) \
                 AND window_start < toDateTime({}) AND compaction IN ({}) GROUP BY dim1",
                crate::ddl::keys_of("set1"),
                Level::Key as u8,
                start + DAY,
                ids.join(", ")
            ))
            .with_setting("max_execution_time", timeout_s.clone())
            .fetch_all()
            .await?;
        days.insert((DAYS_TABLE, partitions[&(start + DAY - 3_600)]));
        rows.extend(keys.into_iter().map(|(dim1, d1)| DayRow {
            model: DAY_MODEL.to_owned(),
            window_start: start,
            dim1,
            d1,
            covered,
            compacted_at: now,
        }));
    }
    insert_rows(client, DAYS_TABLE, &rows, timeout).await?;
    Ok(rows
        .iter()
        .map(|r| r.window_start)
        .collect::<BTreeSet<_>>()
        .len())
}

/// Writes `rows` into `table` in one insert (one part), if any.
async fn insert_rows<T>(
    client: &clickhouse::Client,
    table: &str,
    rows: &[T],
    timeout: Duration,
) -> Result<(), clickhouse::error::Error>
where
    T: clickhouse::RowOwned + clickhouse::RowWrite,
{
    if rows.is_empty() {
        return Ok(());
    }
    let mut insert = client
        .insert::<T>(table)
        .await?
        .with_timeouts(Some(timeout), Some(timeout));
    for row in rows {
        insert.write(row).await?;
    }
    insert.end().await
}

/// Compacts each minute of the hour not over yet at `now` and of the hour
/// before (reads take neither from an hour's compaction yet: the one
/// before until it is idle and compacted), from `since` on, whose flushes
/// none of its own compactions covers and none of which landed at or after
/// `idle_before`. Each such minute gets a compaction of its own of the
/// models read per minute ([`minute_rows`]), all in one insert; a read of
/// the hour before now per minute then takes its idle minutes as numbers,
/// not as a row per flush and key with its sets. Returns how many minutes.
async fn compact_minutes(
    client: &clickhouse::Client,
    since: u32,
    idle_before: u32,
    now: u32,
    timeout: Duration,
) -> Result<usize, clickhouse::error::Error> {
    let timeout_s = timeout.as_secs().max(1).to_string();
    let from = format!("greatest(toDateTime({since}), toStartOfHour(toDateTime({now})) - 3600)");
    let stale: Vec<u32> = client
        .query(&format!(
            "SELECT toUInt32(window_start) AS minute FROM {PARTIALS_TABLE} \
             WHERE model = '{WINDOW_MARKER}' AND window_start >= {from} \
             GROUP BY minute \
             HAVING max(flushed_at) < toDateTime({idle_before}) AND (minute, count()) NOT IN \
             (SELECT toUInt32(window_start), covered FROM {MINUTES_TABLE} \
              WHERE model = '{WINDOW_MARKER}' AND level = {} AND window_start >= {from}) \
             ORDER BY minute",
            Level::AllMinute.of_own_minute()
        ))
        .with_setting("max_execution_time", timeout_s.clone())
        .fetch_all()
        .await?;
    let (Some(first), Some(last)) = (stale.first(), stale.last()) else {
        return Ok(0);
    };
    let listed: Vec<String> = stale.iter().map(u32::to_string).collect();
    // Every model's partials of those minutes, with their markers: one
    // snapshot, so each minute's markers count the partials merged.
    let merged: Vec<Merged> = client
        .query(&merge_select(
            "toUInt32(window_start)",
            &format!(
                "model != '{OFFSET_MODEL}' AND window_start >= toDateTime({first}) \
                 AND window_start <= toDateTime({last}) AND toUInt32(window_start) IN ({})",
                listed.join(", ")
            ),
        ))
        .with_setting("max_execution_time", timeout_s)
        .fetch_all()
        .await?;
    let (rows, minutes) = minute_rows(merged, now);
    insert_rows(client, MINUTES_TABLE, &rows, timeout).await?;
    Ok(minutes)
}

/// Merges the parts of each day (a table's partition) the round wrote
/// to: each compaction is a part of its own, and ClickHouse 18.16 pays
/// for every part in every read (a day's lookup and read ran 1.5-1.6 times
/// as many requests/s on one part as on five, BENCHMARKS.md). Only reads
/// are slower when it fails, so a failure is logged, not returned. A day
/// already in one part is not rewritten.
async fn merge_days(client: &clickhouse::Client, days: &BTreeSet<(&'static str, u32)>) {
    for (table, day) in days {
        if let Err(error) = client
            .query(&format!("OPTIMIZE TABLE {table} PARTITION {day}"))
            .execute()
            .await
        {
            tracing::warn!(%error, "Merging a day of compacted hours failed; its reads are slower until ClickHouse merges it.");
        }
    }
}

/// When the compactor runs and what it takes (the job's settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// A whole round (hours, minutes, days) this often.
    pub every: Duration,
    /// Between them, a round of the minutes alone this often (zero: none):
    /// each minute a read per minute takes from its partials is a row per
    /// flush and key with its sets until its own compaction.
    pub minutes_every: Duration,
    pub after_idle: Idle<Duration>,
    /// Hours starting this long ago or later are looked at; an older hour
    /// changed by a late event is read from its partials (exact, slower).
    pub lookback: Duration,
}

impl Schedule {
    /// `compact_every_ms`, `compact_minutes_every_ms`, the idles and
    /// `compact_lookback_h`.
    pub fn of(settings: &backbone::config::AnalyticsSettings) -> Self {
        Self {
            every: Duration::from_millis(settings.compact_every_ms),
            minutes_every: Duration::from_millis(settings.compact_minutes_every_ms),
            after_idle: Idle::of(settings),
            lookback: Duration::from_secs(u64::from(settings.compact_lookback_h) * 3_600),
        }
    }
}

/// Compacts closed hours, and minutes between, on `schedule` until
/// `shutdown` (the job runs it beside its consumer loop). Every replica
/// may: of two compactions of an hour or a minute, reads take one. A
/// failed round (ClickHouse away) leaves them read from their partials and
/// is tried again next time.
pub async fn compact_every(
    client: clickhouse::Client,
    schedule: Schedule,
    timeout: Duration,
    compacted: backbone::metrics::Counter,
    shutdown: backbone::shutdown::Shutdown,
) {
    let (mut unmarked, mut unmarked_seen) = (Unmarked::new(), 0);
    let pace = |every: Duration| {
        let mut pace = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        pace
    };
    let mut whole = pace(schedule.every);
    let minutes_too = !schedule.minutes_every.is_zero();
    let mut minutes = pace(if minutes_too {
        schedule.minutes_every
    } else {
        schedule.every
    });
    loop {
        let whole_round = tokio::select! {
            () = shutdown.cancelled() => return,
            _ = whole.tick() => true,
            _ = minutes.tick(), if minutes_too => false,
        };
        let now = epoch_seconds();
        let since = seconds_before(now, schedule.lookback);
        let idle_before = schedule.after_idle.before(now);
        if !whole_round {
            match compact_minutes(&client, since, idle_before.minutes, now, timeout).await {
                Ok(0) => {}
                Ok(minutes) => tracing::debug!(
                    minutes,
                    "Compacted idle minutes of hours not compacted yet."
                ),
                // Said by the next whole round if it lasts.
                Err(error) => {
                    tracing::debug!(%error, "Compacting idle minutes failed; they are read from their partials until a later round.")
                }
            }
            continue;
        }
        match compact(&client, since, idle_before, now, timeout, &mut unmarked).await {
            Ok(done) => {
                if done.hours > 0 {
                    compacted.inc_by(done.hours as u64);
                    tracing::info!(
                        hours = done.hours,
                        flushes = done.flushes,
                        "Compacted closed hours."
                    );
                }
                if done.minutes > 0 {
                    tracing::debug!(
                        minutes = done.minutes,
                        "Compacted idle minutes of hours not compacted yet."
                    );
                }
                if done.days > 0 {
                    tracing::debug!(
                        days = done.days,
                        "Counted the rooms' chatters over days of compacted hours."
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
/// its `minutes` (of the models kept per minute), and how many flushes
/// they cover; `None` when the markers do not announce every partial row.
fn hour_rows(merged: Vec<Merged>, minutes: Vec<Merged>, now: u32) -> Option<(Compaction, u64)> {
    let (markers, merged): (Vec<Merged>, Vec<Merged>) =
        merged.into_iter().partition(|m| m.model == WINDOW_MARKER);
    let flushes = flushes_announcing(&markers, &merged)?;
    let compaction = uuid::Uuid::new_v4().as_u64_pair().0;
    let mut out = Compaction::default();
    // Per model and hour, then per model and minute: each key's row and
    // one of every key together. A minute's rows keep their counts only.
    let groups = |rows: Vec<Merged>| per_model_and_window(rows, compacted);
    let hour = (Level::Key, Level::All, None);
    let minute = (
        Level::KeyMinute,
        Level::AllMinute,
        Some(Level::SecondMinute),
    );
    for (levels, groups) in [(hour, groups(merged)), (minute, groups(minutes))] {
        let per_minute = levels.0.per_minute();
        let out = if per_minute {
            &mut out.minutes
        } else {
            &mut out.hours
        };
        for ((model, window_start), keys) in groups {
            let at = out.len();
            out.extend(key_rows(&model, window_start, keys, levels));
            stamp(&mut out[at..], flushes, compaction, now, per_minute);
        }
    }
    Some((out, flushes))
}

/// The `rows` of the models `kept`, per model and window.
fn per_model_and_window(
    rows: Vec<Merged>,
    kept: fn(&str) -> bool,
) -> BTreeMap<(String, u32), Vec<Merged>> {
    let mut groups: BTreeMap<(String, u32), Vec<Merged>> = BTreeMap::new();
    for m in rows.into_iter().filter(|m| kept(&m.model)) {
        groups
            .entry((m.model.clone(), m.window_start))
            .or_default()
            .push(m);
    }
    groups
}

/// How many flushes `markers` (an hour's or a minute's) count, if they
/// announce every one of the `partials` merged with them: partials no
/// marker announces (written by an older job) could not be told from a
/// later flush of the same kind.
fn flushes_announcing(markers: &[Merged], partials: &[Merged]) -> Option<u64> {
    let flushes: u64 = markers.iter().map(|m| m.partials).sum();
    let announced: i64 = markers
        .iter()
        .map(|m| m.sums.first().copied().unwrap_or(0))
        .sum();
    let merged: u64 = partials.iter().map(|m| m.partials).sum();
    (flushes > 0 && u64::try_from(announced).ok() == Some(merged)).then_some(flushes)
}

/// Marks `rows` as one compaction's covering `flushes`; rows of a minute
/// keep their counts only.
fn stamp(rows: &mut [HourRow], flushes: u64, compaction: u64, now: u32, per_minute: bool) {
    for row in rows {
        row.covered = flushes;
        row.compaction = compaction;
        row.compacted_at = now;
        if per_minute {
            row.set1.clear();
            row.set2.clear();
        }
    }
}

/// The rows of each minute's own compaction ([`compact_minutes`]), from
/// every model's partials merged per minute with their markers, and how
/// many minutes they hold. A minute whose markers announce every partial
/// row of it gets, under an id of its own, the models read per minute at
/// the minute levels made its own ([`Level::of_own_minute`]) and a
/// marker's row naming it, all covering its flushes.
fn minute_rows(merged: Vec<Merged>, now: u32) -> (Vec<HourRow>, usize) {
    let mut per_minute: BTreeMap<u32, Vec<Merged>> = BTreeMap::new();
    for m in merged {
        per_minute.entry(m.window_start).or_default().push(m);
    }
    let (mut out, mut minutes) = (Vec::new(), 0);
    let levels = (
        Level::KeyMinute,
        Level::AllMinute,
        Some(Level::SecondMinute),
    );
    for (minute, rows) in per_minute {
        let (markers, rows): (Vec<Merged>, Vec<Merged>) =
            rows.into_iter().partition(|m| m.model == WINDOW_MARKER);
        let Some(flushes) = flushes_announcing(&markers, &rows) else {
            tracing::debug!(
                minute,
                "A minute with partials no marker announces stays on its partials."
            );
            continue;
        };
        let at = out.len();
        for ((model, _), keys) in per_model_and_window(rows, compacted_per_minute) {
            out.extend(key_rows(&model, minute, keys, levels));
        }
        out.push(HourRow {
            model: WINDOW_MARKER.to_owned(),
            level: Level::AllMinute as u8,
            window_start: minute,
            ..HourRow::default()
        });
        for row in &mut out[at..] {
            row.level += OWN_MINUTE;
        }
        let compaction = uuid::Uuid::new_v4().as_u64_pair().0;
        stamp(&mut out[at..], flushes, compaction, now, true);
        minutes += 1;
    }
    (out, minutes)
}

/// The levels of a compaction's rows at one grain: per key, every key
/// together, and per value of the second dimension (every value of the
/// first together).
type Levels = (Level, Level, Option<Level>);

/// Rows added together: sums added, sets merged, latencies kept.
#[derive(Default)]
struct Together {
    sums: [i64; 6],
    set1: BTreeSet<String>,
    set2: BTreeSet<String>,
    latencies: Vec<i32>,
}

impl Together {
    fn add(&mut self, m: &Merged) {
        for (total, sum) in self.sums.iter_mut().zip(&m.sums) {
            *total += sum;
        }
        self.set1.extend(m.set1.iter().cloned());
        self.set2.extend(m.set2.iter().cloned());
        self.latencies.extend_from_slice(&m.latencies);
    }
}

/// One model's rows at `window_start` (an hour or a minute), at `levels`:
/// one per key, one per value of the second dimension if asked, then one
/// of every key together, each with its distinct counts.
fn key_rows(model: &str, window_start: u32, keys: Vec<Merged>, levels: Levels) -> Vec<HourRow> {
    let row =
        |level: Level, dims: (String, String), sums: &[i64], sets: [Vec<String>; 2], latencies| {
            let mut c = [0; 6];
            for (slot, sum) in c.iter_mut().zip(sums) {
                *slot = *sum;
            }
            let [c1, c2, c3, c4, c5, c6] = c;
            let [set1, set2] = sets;
            HourRow {
                model: model.to_owned(),
                level: level as u8,
                window_start,
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
                ..HourRow::default()
            }
        };
    let together = |level: Level, dim2: String, mut t: Together| {
        t.latencies.sort_unstable();
        let sets = [t.set1.into_iter().collect(), t.set2.into_iter().collect()];
        row(level, (String::new(), dim2), &t.sums, sets, t.latencies)
    };
    let (key, all, second) = levels;
    let mut out = Vec::new();
    let mut every = Together::default();
    let mut per_second: BTreeMap<String, Together> = BTreeMap::new();
    for m in keys {
        every.add(&m);
        if second.is_some() {
            per_second.entry(m.dim2.clone()).or_default().add(&m);
        }
        // Its sets and latencies come sorted (`arraySort`).
        out.push(row(
            key,
            (m.dim1, m.dim2),
            &m.sums,
            [m.set1, m.set2],
            m.latencies,
        ));
    }
    if let Some(level) = second {
        for (dim2, t) in per_second {
            out.push(together(level, dim2, t));
        }
    }
    out.push(together(all, String::new(), every));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merged(model: &str, dim1: &str, c1: i64, set1: &[&str], partials: u64) -> Merged {
        Merged {
            model: model.to_owned(),
            window_start: 7_200,
            dim1: dim1.to_owned(),
            dim2: if dim1.is_empty() { "" } else { "EUR" }.to_owned(),
            sums: vec![c1, 0, 0, 0, 0, 0],
            set1: set1.iter().map(|s| (*s).to_owned()).collect(),
            set2: Vec::new(),
            latencies: Vec::new(),
            partials,
        }
    }

    fn minute(at: u32, merged: Merged) -> Merged {
        Merged {
            window_start: at,
            ..merged
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
        let minutes = vec![
            minute(7_200, merged("orders", "books", 1, &["u1"], 1)),
            minute(7_200, merged("orders", "games", 2, &["u2"], 1)),
            minute(
                7_200,
                Merged {
                    dim2: "USD".to_owned(),
                    ..merged("orders", "toys", 2, &["u2", "u3"], 2)
                },
            ),
            minute(7_260, merged("orders", "books", 2, &["u1", "u2"], 2)),
            minute(7_260, merged(WINDOW_MARKER, "", 11, &[], 3)),
        ];
        let (compaction, flushes) = hour_rows(hour, minutes, 9_000).unwrap();
        assert!(compaction.hours.iter().all(|r| r.level < 2));
        let rows: Vec<HourRow> = [compaction.hours, compaction.minutes].concat();
        assert_eq!(flushes, 3);
        assert!(rows.iter().all(|r| r.covered == 3
            && r.compacted_at == 9_000
            && r.compaction == rows[0].compaction));
        // Orders, a row per key and the hour's; the funnel (no keys) none.
        // Then per minute a row per key, per currency and the minute's,
        // counts only.
        let shape: Vec<(u8, u32, &str, &str, i64, u64)> = rows
            .iter()
            .filter(|r| r.model == "orders")
            .map(|r| {
                (
                    r.level,
                    r.window_start,
                    r.dim1.as_str(),
                    r.dim2.as_str(),
                    r.c1,
                    r.d1,
                )
            })
            .collect();
        assert_eq!(rows.len(), shape.len());
        assert_eq!(
            shape,
            [
                (0, 7_200, "books", "EUR", 3, 2),
                (0, 7_200, "toys", "EUR", 2, 2),
                (1, 7_200, "", "", 5, 3),
                (2, 7_200, "books", "EUR", 1, 1),
                (2, 7_200, "games", "EUR", 2, 1),
                (2, 7_200, "toys", "USD", 2, 2),
                (4, 7_200, "", "EUR", 3, 2),
                (4, 7_200, "", "USD", 2, 2),
                (3, 7_200, "", "", 5, 3),
                (2, 7_260, "books", "EUR", 2, 2),
                (4, 7_260, "", "EUR", 2, 2),
                (3, 7_260, "", "", 2, 2),
            ]
        );
        assert_eq!(rows[0].set1, ["u1", "u2"]);
        assert_eq!(rows[2].set1, ["u1", "u2", "u3"]);
        assert!(rows[3..].iter().all(|r| r.set1.is_empty()));
    }

    #[test]
    fn each_idle_minute_is_a_compaction_of_its_own_covering_its_flushes() {
        let merged = vec![
            minute(7_200, merged("orders", "books", 1, &["u1"], 1)),
            minute(7_200, merged("orders", "toys", 2, &["u1", "u2"], 2)),
            // Counted, not kept: rooms are not read per minute.
            minute(7_200, merged("chat", "room-1", 4, &["u3"], 1)),
            minute(7_200, merged(WINDOW_MARKER, "", 4, &[], 2)),
            minute(7_260, merged("orders", "books", 3, &["u4"], 1)),
            minute(7_260, merged(WINDOW_MARKER, "", 1, &[], 1)),
            // A partial no marker announces: the minute stays on them.
            minute(7_320, merged("orders", "books", 3, &["u4"], 2)),
            minute(7_320, merged(WINDOW_MARKER, "", 1, &[], 1)),
        ];
        let (rows, minutes) = minute_rows(merged, 9_000);
        assert_eq!(minutes, 2);
        let shape: Vec<(u8, u32, &str, &str, i64, u64, u64)> = rows
            .iter()
            .map(|r| {
                (
                    r.level,
                    r.window_start,
                    r.model.as_str(),
                    r.dim1.as_str(),
                    r.c1,
                    r.d1,
                    r.covered,
                )
            })
            .collect();
        assert_eq!(
            shape,
            [
                (10, 7_200, "orders", "books", 1, 1, 2),
                (10, 7_200, "orders", "toys", 2, 2, 2),
                (12, 7_200, "orders", "", 3, 2, 2),
                (11, 7_200, "orders", "", 3, 2, 2),
                (11, 7_200, WINDOW_MARKER, "", 0, 0, 2),
                (10, 7_260, "orders", "books", 3, 1, 1),
                (12, 7_260, "orders", "", 3, 1, 1),
                (11, 7_260, "orders", "", 3, 1, 1),
                (11, 7_260, WINDOW_MARKER, "", 0, 0, 1),
            ]
        );
        // An id per minute, shared by its rows; counts only, no sets.
        assert!(rows[..5].iter().all(|r| r.compaction == rows[0].compaction));
        assert!(rows[5..].iter().all(|r| r.compaction == rows[5].compaction));
        assert_ne!(rows[0].compaction, rows[5].compaction);
        assert!(rows
            .iter()
            .all(|r| r.set1.is_empty() && r.compacted_at == 9_000));
    }

    #[test]
    fn an_hour_with_partials_no_marker_announces_is_not_compacted() {
        let unmarked = vec![
            merged("orders", "books", 3, &["u1"], 4),
            merged(WINDOW_MARKER, "", 3, &[], 1),
        ];
        assert!(hour_rows(unmarked, Vec::new(), 9_000).is_none());
        assert!(hour_rows(
            vec![merged("orders", "books", 3, &["u1"], 4)],
            Vec::new(),
            9_000
        )
        .is_none());
    }
}
