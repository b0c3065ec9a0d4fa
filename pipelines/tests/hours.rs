//! Closed hours against a real ClickHouse (18.16 here): the hourly views
//! answer the same before and after an hour is compacted, with each hour
//! compacted twice, and after a late partial lands in a
//! compacted hour, before and after it is compacted again.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use backbone::config::ClickHouseSettings;
use pipelines::hours::{compact, Compacted, Idle, Schedule, Unmarked};
use pipelines::store::{mark_windows, PartialRow};
use shopstream_tests::{clickhouse, TestDatabase};

/// 2026-11-29T14:00:00Z.
const HOUR: u32 = 1_795_960_800;
const TIMEOUT: Duration = Duration::from_secs(30);

/// (hour, category, currency).
type Key = (u32, String, String);
/// Key -> (orders, revenue, unique buyers).
type Figures = BTreeMap<Key, (i64, i64, u64)>;

fn order_partial(minute: u32, partition: i32, category: &str, buyers: &[&str]) -> PartialRow {
    PartialRow {
        model: "orders".to_owned(),
        window_start: HOUR + minute * 60,
        dim1: category.to_owned(),
        dim2: "EUR".to_owned(),
        c1: buyers.len() as i64,
        c3: 1_000 * buyers.len() as i64,
        set1: buyers.iter().map(|b| (*b).to_owned()).collect(),
        source_topic: "orders".to_owned(),
        source_partition: partition,
        flushed_at: HOUR + minute * 60 + 60,
        ..PartialRow::default()
    }
}

/// Two hours of two categories from two partitions, buyers repeated across
/// minutes and partitions.
fn partials() -> Vec<PartialRow> {
    let mut rows = Vec::new();
    for minute in [0, 1, 59, 60, 61, 119] {
        for partition in 0..2 {
            rows.push(order_partial(minute, partition, "books", &["u1", "u2"]));
            rows.push(order_partial(
                minute,
                partition,
                "toys",
                &[&format!("u{minute}"), "u1"],
            ));
        }
    }
    rows
}

fn expected(rows: &[PartialRow]) -> Figures {
    let mut sums: BTreeMap<Key, (i64, i64, BTreeSet<&str>)> = BTreeMap::new();
    for row in rows {
        let slot = sums
            .entry((
                row.window_start - row.window_start % 3_600,
                row.dim1.clone(),
                row.dim2.clone(),
            ))
            .or_default();
        slot.0 += row.c1;
        slot.1 += row.c3;
        slot.2.extend(row.set1.iter().map(String::as_str));
    }
    sums.into_iter()
        .map(|(k, (o, r, b))| (k, (o, r, b.len() as u64)))
        .collect()
}

async fn per_hour(db: &TestDatabase) -> Figures {
    db.client
        .query("SELECT toUInt32(hour), category, currency, orders, revenue_minor, unique_buyers FROM orders_per_hour")
        .fetch_all::<(u32, String, String, i64, i64, u64)>()
        .await
        .unwrap()
        .into_iter()
        .map(|(h, c, cur, o, r, b)| ((h, c, cur), (o, r, b)))
        .collect()
}

/// Hours whose compaction covers every flush they have now.
async fn current_compactions(db: &TestDatabase) -> u64 {
    db.client
        .query(
            "SELECT count() FROM (SELECT DISTINCT toUInt32(window_start) AS hour, covered FROM analytics_hours) \
             WHERE (hour, covered) IN (SELECT toUInt32(toStartOfHour(window_start)), count() \
             FROM analytics_partials WHERE model = '_window' GROUP BY toStartOfHour(window_start))",
        )
        .fetch_one::<u64>()
        .await
        .unwrap()
}

/// Active parts of the compacted hours and of their minutes (one day's
/// here).
async fn parts(db: &TestDatabase) -> Vec<(String, u64)> {
    db.client
        .query("SELECT table, count() FROM system.parts WHERE database = currentDatabase() \
                AND table IN ('analytics_hours', 'analytics_minutes') AND active GROUP BY table ORDER BY table")
        .fetch_all::<(String, u64)>()
        .await
        .unwrap()
}

async fn compact_all(db: &TestDatabase, unmarked: &mut Unmarked) -> Compacted {
    compact(
        &db.client,
        HOUR - 3_600,
        Idle {
            hours: u32::MAX,
            minutes: u32::MAX,
        },
        HOUR + 7_200,
        TIMEOUT,
        unmarked,
    )
    .await
    .unwrap()
}

/// One round of the compactor at `now`, over the hours from `HOUR`, with
/// what was flushed before `idle` taken as idle.
async fn round(db: &TestDatabase, idle: Idle<u32>, now: u32) -> Compacted {
    compact(&db.client, HOUR, idle, now, TIMEOUT, &mut Unmarked::new())
        .await
        .unwrap()
}

/// One flush: the rows and their window markers in one insert.
async fn flush(db: &TestDatabase, rows: &[PartialRow]) {
    let mut rows = rows.to_vec();
    mark_windows(&mut rows, HOUR + 7_200);
    pipelines::store::insert(&db.client, &rows, TIMEOUT)
        .await
        .unwrap();
}

/// A database of its own with the analytics schema.
async fn migrated() -> TestDatabase {
    let db = clickhouse().await.database().await.unwrap();
    let settings = ClickHouseSettings {
        url: db.url.clone(),
        database: db.name.clone(),
        ..ClickHouseSettings::default()
    };
    consumers::projection::migrate(
        &settings,
        pipelines::ddl::MIGRATIONS_TABLE,
        pipelines::ddl::migrations,
    )
    .await
    .unwrap();
    db
}

#[tokio::test]
async fn hours_answer_alike_compacted_or_not_and_a_late_partial_is_never_lost() {
    let db = migrated().await;
    let mut unmarked = Unmarked::new();
    let mut rows = partials();
    flush(&db, &rows).await;
    let want = expected(&rows);
    assert_eq!(want.len(), 4);
    assert_eq!(per_hour(&db).await, want, "from the partials");

    let done = compact_all(&db, &mut unmarked).await;
    // Six windows marked, three in each hour; the second hour is the one
    // before `now`'s, so its three minutes also get their own.
    assert_eq!(
        done,
        Compacted {
            hours: 2,
            flushes: 6,
            unmarked: 0,
            minutes: 3,
            days: 0
        }
    );
    assert_eq!(current_compactions(&db).await, 2);
    assert_eq!(
        parts(&db).await,
        [
            ("analytics_hours".to_owned(), 1),
            ("analytics_minutes".to_owned(), 1)
        ],
        "the day's two compactions merged into one part in each table"
    );
    assert_eq!(per_hour(&db).await, want, "from the compacted hours");
    assert_eq!(
        compact_all(&db, &mut unmarked).await,
        Compacted::default(),
        "nothing left to compact"
    );

    // Two compactions of each hour (two replicas, an insert whose answer
    // was lost and made again): one is read.
    db.client
        .query(
            "INSERT INTO analytics_hours SELECT model, level, window_start, dim1, dim2, c1, c2, c3, c4, c5, c6, \
             d1, d2, set1, set2, latencies, covered, compaction + 1, compacted_at FROM analytics_hours",
        )
        .execute()
        .await
        .unwrap();
    assert_eq!(per_hour(&db).await, want, "an hour compacted twice");

    // A late partial in the first hour: that hour is read from its
    // partials again, the second still from its compaction.
    let late = order_partial(30, 1, "books", &["u9"]);
    flush(&db, std::slice::from_ref(&late)).await;
    rows.push(late);
    let want = expected(&rows);
    assert_eq!(
        want[&(HOUR, "books".to_owned(), "EUR".to_owned())],
        (13, 13_000, 3)
    );
    assert_eq!(current_compactions(&db).await, 1);
    assert_eq!(per_hour(&db).await, want, "after a late partial");
    assert_eq!(
        compact_all(&db, &mut unmarked).await,
        Compacted {
            hours: 1,
            flushes: 4,
            unmarked: 0,
            minutes: 0,
            days: 0
        }
    );
    assert_eq!(current_compactions(&db).await, 2);
    assert_eq!(per_hour(&db).await, want, "compacted again");

    // A third hour, written by an older job that marks no window, then
    // flushed to by this one: its markers do not announce every partial,
    // so it is never compacted, and reads add up its partials.
    let old = order_partial(150, 0, "books", &["u7"]);
    pipelines::store::insert(&db.client, std::slice::from_ref(&old), TIMEOUT)
        .await
        .unwrap();
    let new = order_partial(151, 1, "books", &["u8"]);
    flush(&db, std::slice::from_ref(&new)).await;
    rows.extend([old, new]);
    let want = expected(&rows);
    assert_eq!(
        want[&(HOUR + 7_200, "books".to_owned(), "EUR".to_owned())],
        (2, 2_000, 2)
    );
    assert_eq!(
        compact_all(&db, &mut unmarked).await,
        Compacted {
            hours: 0,
            flushes: 0,
            unmarked: 1,
            minutes: 1,
            days: 0
        }
    );
    assert_eq!(
        unmarked,
        Unmarked::from([(HOUR + 7_200, 1)]),
        "not merged again"
    );
    assert_eq!(compact_all(&db, &mut unmarked).await.unmarked, 1);
    assert_eq!(per_hour(&db).await, want, "an hour of an older job");
}

#[tokio::test]
async fn a_minute_idle_for_its_own_setting_is_compacted_before_its_hour() {
    let db = migrated().await;
    // Three minutes of the second hour, each flushed as it ended.
    for minute in [60, 61, 119] {
        let mut rows = vec![order_partial(minute, 0, "books", &["u1"])];
        mark_windows(&mut rows, HOUR + (minute + 1) * 60);
        pipelines::store::insert(&db.client, &rows, TIMEOUT)
            .await
            .unwrap();
    }
    let now = HOUR + 7_230;
    // An hour must be idle for an hour, a minute for 100 s: every minute
    // was flushed within the hour, the last within 100 s, so only the
    // first two are compacted, on their own.
    let sooner = Idle {
        hours: now - 3_600,
        minutes: now - 100,
    };
    assert_eq!(
        round(&db, sooner, now).await,
        Compacted {
            minutes: 2,
            ..Compacted::default()
        }
    );
    assert_eq!(
        round(&db, sooner, now).await,
        Compacted::default(),
        "nothing new"
    );
    // Idle long enough: the hour, and the last minute on its own.
    let later = Idle {
        hours: now,
        minutes: now,
    };
    assert_eq!(
        round(&db, later, now).await,
        Compacted {
            hours: 1,
            flushes: 3,
            unmarked: 0,
            minutes: 1,
            days: 0
        }
    );
    assert_eq!(current_compactions(&db).await, 1);
}

/// With the job's default settings, the hour just closed is compacted
/// once a minute passed without a flush into it: the day-long reads take
/// it from its compaction one to two minutes after the hour (a round of
/// `compact_every_ms` more), not five to six.
#[tokio::test]
async fn by_default_an_hour_is_compacted_a_minute_after_its_last_flush() {
    let db = migrated().await;
    // Its last minute, flushed as the hour ended.
    let mut rows = vec![order_partial(59, 0, "books", &["u1"])];
    mark_windows(&mut rows, HOUR + 3_600);
    pipelines::store::insert(&db.client, &rows, TIMEOUT)
        .await
        .unwrap();
    let idle = Idle::of(&backbone::config::AnalyticsSettings::default());
    let hours_at = |now: u32| {
        let db = &db;
        async move { round(db, idle.before(now), now).await.hours }
    };
    assert_eq!(hours_at(HOUR + 3_600 + 30).await, 0, "flushed 30 s before");
    assert_eq!(hours_at(HOUR + 3_600 + 90).await, 1, "idle for 90 s");
}

/// Between the whole rounds (`compact_every_ms`, here an hour away) the
/// compactor takes the idle minutes on their own pace
/// (`compact_minutes_every_ms`): a minute flushed a second ago has its own
/// compaction within a few of those rounds, and no hour is compacted.
#[tokio::test]
async fn idle_minutes_are_compacted_between_the_whole_rounds() {
    let db = migrated().await;
    let now = pipelines::hours::epoch_seconds();
    let minute = now - now % 60;
    let mut rows = vec![PartialRow {
        window_start: minute,
        ..order_partial(0, 0, "books", &["u1"])
    }];
    mark_windows(&mut rows, now - 1);
    pipelines::store::insert(&db.client, &rows, TIMEOUT)
        .await
        .unwrap();
    let stop = backbone::shutdown::Shutdown::new();
    let compactor = tokio::spawn(pipelines::hours::compact_every(
        db.client.clone(),
        Schedule {
            every: Duration::from_secs(3_600),
            minutes_every: Duration::from_millis(200),
            after_idle: Idle {
                hours: Duration::ZERO,
                minutes: Duration::ZERO,
            },
            lookback: Duration::from_secs(7_200),
        },
        TIMEOUT,
        backbone::metrics::Counter::default(),
        stop.clone(),
    ));
    let own = || {
        db.client
            .query("SELECT count() FROM analytics_minutes WHERE model = '_window' AND window_start = toDateTime(?)")
            .bind(minute)
            .fetch_one::<u64>()
    };
    let started = std::time::Instant::now();
    while own().await.unwrap() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the minute was not compacted between the whole rounds"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    compactor.await.unwrap();
    let hours: u64 = db
        .client
        .query("SELECT count() FROM analytics_hours")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(hours, 0, "the hours wait for their own round");
}

/// Per category over the compacted hours' rows that `condition` keeps:
/// distinct buyers counted over the ids, and over their keys (migration 6).
async fn buyers_by_ids_and_keys(db: &TestDatabase, condition: &str) -> Vec<(String, u64, u64)> {
    db.client
        .query(&format!(
            "SELECT dim1, uniqExactArray(set1), uniqExactArray(key1) FROM analytics_hours \
             WHERE model = 'orders' AND level = 0{condition} GROUP BY dim1 ORDER BY dim1"
        ))
        .fetch_all()
        .await
        .unwrap()
}

/// Migration 6 on a database with hours compacted before it: the keys of
/// those hours (computed as they are read) and of an hour compacted after
/// it (computed as it is stored) count exactly what the ids count, and the
/// migration runs again, on the columns it added, unharmed.
#[tokio::test]
async fn the_compacted_hours_keys_migrate_in_place_and_count_what_the_ids_count() {
    use consumers::projection::ddl::{Migration, Target};
    use consumers::projection::migrate;
    use pipelines::ddl::{migrations, MIGRATIONS_TABLE};

    let db = clickhouse().await.database().await.unwrap();
    let settings = ClickHouseSettings {
        url: db.url.clone(),
        database: db.name.clone(),
        ..ClickHouseSettings::default()
    };
    fn before_6(target: &Target) -> Vec<Migration> {
        migrations(target).into_iter().take(5).collect()
    }
    let applied = migrate(&settings, MIGRATIONS_TABLE, before_6).await;
    assert_eq!(applied.unwrap(), [1, 2, 3, 4, 5]);
    let mut unmarked = Unmarked::new();
    let rows = partials();
    flush(&db, &rows).await;
    assert_eq!(compact_all(&db, &mut unmarked).await.hours, 2);

    let applied = migrate(&settings, MIGRATIONS_TABLE, migrations).await;
    assert_eq!(applied.unwrap(), [6, 7]);
    // Over both hours, per category (books: u1, u2; toys: u1 and one
    // buyer per minute, 6).
    let distinct = |category: &str| {
        let ids: BTreeSet<&String> = rows
            .iter()
            .filter(|r| r.dim1 == category)
            .flat_map(|r| &r.set1)
            .collect();
        ids.len() as u64
    };
    let want: Vec<(String, u64, u64)> = ["books", "toys"]
        .map(|c| (c.to_owned(), distinct(c), distinct(c)))
        .into();
    assert_eq!(
        buyers_by_ids_and_keys(&db, "").await,
        want,
        "hours compacted before the migration"
    );
    assert_eq!(distinct("toys"), 6);

    // A late partial in the first hour, compacted again after the
    // migration: its keys, computed as its rows were stored, count the
    // same.
    let late = order_partial(30, 1, "books", &["u9"]);
    flush(&db, std::slice::from_ref(&late)).await;
    assert_eq!(compact_all(&db, &mut unmarked).await.hours, 1);
    let current = buyers_by_ids_and_keys(
        &db,
        &format!(" AND window_start = toDateTime({HOUR}) AND covered = 4"),
    )
    .await;
    assert_eq!(current[0], ("books".to_owned(), 3, 3), "compacted after");
    assert_eq!(current.len(), 2);
    assert!(current.iter().all(|(_, ids, keys)| ids == keys));

    // Run again (a replica's migration cut short before it was recorded):
    // the columns are there, so none is added, and it succeeds.
    fn again(target: &Target) -> Vec<Migration> {
        let mut sixth = migrations(target).remove(5);
        sixth.version = 60;
        vec![sixth]
    }
    let applied = migrate(&settings, MIGRATIONS_TABLE, again).await;
    assert_eq!(applied.unwrap(), [60]);
}
