//! Deterministic read-model data for benchmarks and tests: partial rows as
//! the analytics job writes them (several Kafka partitions per window, so
//! the API really adds partials up) and order-status rows as the worker
//! writes them, into tables created by their own migrations.

use backbone::config::ClickHouseSettings;
use consumers::projection::rows::OrderStatusRow;
use pipelines::store::PartialRow;

const CURRENCIES: [&str; 2] = ["EUR", "USD"];
pub const COUNTRIES: [&str; 5] = ["DE", "US", "FR", "GB", "PL"];
pub const PLATFORMS: [&str; 3] = ["web", "ios", "android"];
pub const STATUSES: [&str; 6] = [
    "created",
    "paid",
    "shipped",
    "delivered",
    "cancelled",
    "refunded",
];
/// Distinct search queries per window.
const QUERIES: usize = 30;
const SEARCHES_PER_MINUTE: usize = 20;

/// What to write: `minutes` windows from `start` for `categories` and
/// `rooms`, each window split over `partitions` source partitions.
#[derive(Debug, Clone, Copy)]
pub struct Seed {
    /// Epoch seconds, a whole minute.
    pub start: u32,
    pub minutes: u32,
    pub categories: usize,
    pub rooms: usize,
    pub partitions: i32,
    pub orders: usize,
    /// Flushes per window and partition, each with rows of its own (more
    /// events): the job flushes every second, so a busy minute holds a row
    /// per flush and key, not one.
    pub flushes: u32,
}

/// splitmix64: a well-mixed number per key, no RNG state to thread through.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn pick(seed: u64, below: u64) -> u64 {
    mix(seed) % below
}

fn ids(prefix: &str, seed: u64, n: u64, universe: u64) -> Vec<String> {
    (0..n)
        .map(|i| format!("{prefix}-{}", pick(seed ^ (i << 40), universe)))
        .collect()
}

impl Seed {
    /// The partial rows of one window (`minute` counted from `start`) and
    /// source partition: its first flush's.
    pub fn window(&self, minute: u32, partition: i32) -> Vec<PartialRow> {
        self.flush(minute, partition, 0)
    }

    /// The partial rows of one flush of a window and source partition.
    pub fn flush(&self, minute: u32, partition: i32, flush: u32) -> Vec<PartialRow> {
        let window_start = self.start + minute * 60;
        let key = (u64::from(minute) << 20) ^ (partition as u64) << 8 ^ u64::from(flush) << 56;
        let row = |model: &str| PartialRow {
            model: model.to_owned(),
            window_start,
            source_topic: "seed".to_owned(),
            source_partition: partition,
            flushed_at: window_start + 60,
            ..PartialRow::default()
        };
        let mut out = Vec::new();
        for category in 0..self.categories {
            for (c, currency) in CURRENCIES.iter().enumerate() {
                let k = key ^ ((category as u64) << 32) ^ c as u64;
                let orders = 1 + pick(k, 4);
                out.push(PartialRow {
                    dim1: format!("category-{category:02}"),
                    dim2: (*currency).to_owned(),
                    c1: orders as i64,
                    c2: (orders + pick(k ^ 1, 3)) as i64,
                    c3: (500 + pick(k ^ 2, 20_000)) as i64 * orders as i64,
                    set1: ids("user", k, orders, 5_000),
                    ..row("orders")
                });
            }
        }
        let created = 20 + pick(key ^ 3, 20) as i64;
        out.push(PartialRow {
            c1: created,
            c2: created * 8 / 10,
            c3: created * 6 / 10,
            c4: created / 2,
            c5: created / 10,
            c6: created / 20,
            ..row("funnel")
        });
        for (i, country) in COUNTRIES.iter().enumerate() {
            for (j, platform) in PLATFORMS.iter().enumerate() {
                let k = key ^ ((i as u64) << 36) ^ ((j as u64) << 44);
                out.push(PartialRow {
                    dim1: (*country).to_owned(),
                    dim2: (*platform).to_owned(),
                    c1: pick(k, 3) as i64,
                    set1: ids("user", k, 4, 5_000),
                    set2: ids("session", k ^ 5, 3, 20_000),
                    ..row("users")
                });
            }
        }
        for room in 0..self.rooms {
            let k = key ^ ((room as u64) << 32) ^ 7;
            out.push(PartialRow {
                dim1: format!("room-{room:03}"),
                c1: 1 + pick(k, 30) as i64,
                c2: pick(k ^ 1, 2) as i64,
                set1: ids("user", k, 3, 5_000),
                ..row("chat")
            });
        }
        let latencies: Vec<i32> = (0..SEARCHES_PER_MINUTE as u64)
            .map(|i| 5 + pick(key ^ (i << 50) ^ 11, 300) as i32)
            .collect();
        out.push(PartialRow {
            c1: SEARCHES_PER_MINUTE as i64,
            c2: pick(key ^ 13, 5) as i64,
            c3: latencies.iter().map(|l| i64::from(*l)).sum(),
            latencies,
            ..row("search")
        });
        for q in 0..QUERIES {
            let k = key ^ ((q as u64) << 32);
            let searches = 1 + pick(k ^ 17, 10);
            // A third of the queries find nothing some of the time.
            let zero_results = if q % 3 == 0 {
                pick(k ^ 19, searches + 1)
            } else {
                0
            };
            out.push(PartialRow {
                dim1: format!("query {q}"),
                c1: searches as i64,
                c2: zero_results as i64,
                ..row("queries")
            });
        }
        out
    }

    /// Flush `flush` of a window (`minute` counted from `start`) from every
    /// source partition, as one insert of the job holds it: its window
    /// marked as flushed at `flushed_at` (epoch seconds).
    pub fn marked_flush(&self, minute: u32, flush: u32, flushed_at: u32) -> Vec<PartialRow> {
        let mut rows: Vec<PartialRow> = (0..self.partitions)
            .flat_map(|p| self.flush(minute, p, flush))
            .collect();
        pipelines::store::mark_windows(&mut rows, flushed_at);
        rows
    }

    /// Order `i` as the order-status projection stores it.
    pub fn order(&self, i: usize) -> OrderStatusRow {
        let k = mix(i as u64 ^ 0x5eed);
        let at = self.start + (k % u64::from(self.minutes.max(1) * 60)) as u32;
        OrderStatusRow {
            order_id: format!("order-{i:06}"),
            user_id: format!("user-{}", k % 5_000),
            status: STATUSES[(k >> 8) as usize % STATUSES.len()].to_owned(),
            currency: CURRENCIES[(k >> 16) as usize % CURRENCIES.len()].to_owned(),
            total_minor: 100 + (k >> 24) as i64 % 50_000,
            items_count: 1 + (k >> 40) as u32 % 5,
            updated_at: at,
            updated_at_ms: i64::from(at) * 1000,
            version: u64::from(at),
        }
    }

    /// Creates the tables (the binaries' own migrations), writes the rows
    /// and compacts the hours as the analytics job would; returns how many partial rows it wrote. `progress` hears the
    /// minutes written so far.
    pub async fn write(
        &self,
        settings: &ClickHouseSettings,
        mut progress: impl FnMut(u32),
    ) -> Result<usize, clickhouse::error::Error> {
        use consumers::projection::{ddl, migrate};
        migrate(settings, ddl::MIGRATIONS_TABLE, ddl::migrations).await?;
        migrate(
            settings,
            pipelines::ddl::MIGRATIONS_TABLE,
            pipelines::ddl::migrations,
        )
        .await?;
        let client = consumers::projection::client(settings, true);
        let timeout = std::time::Duration::from_secs(60);
        let mut written = 0;
        // A day in inserts of an hour: few parts, bounded memory.
        for hour in (0..self.minutes).step_by(60) {
            // Each flush of a minute marked as flushed when the minute
            // ended: the minutes before now are idle at once.
            let rows: Vec<PartialRow> = (hour..(hour + 60).min(self.minutes))
                .flat_map(|m| (0..self.flushes.max(1)).map(move |f| (m, f)))
                .flat_map(|(m, f)| self.marked_flush(m, f, self.start + (m + 1) * 60))
                .collect();
            pipelines::store::insert(&client, &rows, timeout).await?;
            written += rows.len();
            progress((hour + 60).min(self.minutes));
        }
        // As a deployed job with the default settings does: the hours idle
        // for `compact_after_idle_ms` and the minutes idle for
        // `compact_minutes_after_idle_ms` (the minutes flushed since stay on
        // their partials).
        let now = pipelines::hours::epoch_seconds();
        pipelines::hours::compact(
            &client,
            self.start,
            pipelines::hours::Idle::of(&backbone::config::AnalyticsSettings::default()).before(now),
            now,
            timeout,
            &mut pipelines::hours::Unmarked::new(),
        )
        .await?;
        let mut insert = client
            .insert::<OrderStatusRow>("order_status")
            .await?
            .with_timeouts(Some(timeout), Some(timeout));
        for i in 0..self.orders {
            insert.write(&self.order(i)).await?;
        }
        insert.end().await?;
        Ok(written)
    }
}
