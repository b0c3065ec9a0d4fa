//! The read models as the API serves them, read from ClickHouse.
//!
//! Reads use the views' own expressions (`pipelines::ddl::model_columns`)
//! on the tables under the views, so the range goes into the WHERE before
//! the GROUP BY where the sort keys serve it (ClickHouse 18.16 does not push
//! a WHERE on a view into the view). Values reach SQL only through `bind`,
//! which quotes them; identifiers and numbers come from this code or from
//! the validated database name.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backbone::config::ClickHouseSettings;
use consumers::projection::ddl::Target;
use pipelines::ddl::{
    compacted, compacted_per_minute, model_columns, Level, MeasureSql, ModelColumns, Part, Rows,
    DAYS_TABLE, DAY_MODEL,
};
use schemars::JsonSchema;
use serde::Serialize;

use pipelines::report::{Funnel, Room, TopQuery};

use crate::api::ZeroResultQuery;

use crate::error::ApiError;
use crate::params::{Granularity, RevenueGrouping, TimeRange};

/// ClickHouse and how long it may take.
#[derive(Clone)]
pub struct Store {
    client: clickhouse::Client,
    target: Target,
    url: String,
    timeout: Duration,
    compactions: Arc<Compactions>,
    /// The same of the minutes' own compactions, by minute.
    own_minutes: Arc<Compactions>,
    /// Where the server's time zone starts its hours: seconds past a
    /// multiple of 3,600 since the epoch (0 in UTC, 1,800 in India).
    /// Learned once; were it wrong, reads would only take fewer hours from
    /// their compactions, never answer otherwise.
    hour_phase: Arc<tokio::sync::OnceCell<u32>>,
}

/// Which compaction was current for each hour of a model when last looked
/// up, with the flushes it covers. A read then counts the range's window
/// markers (`Rows::markers_sql`) and takes each hour whose markers still
/// number what its compaction covers from that compaction, exactly as the
/// full lookup would (the partials only grow); any other hour makes it
/// look up again. That is half the lookup's cost on ClickHouse 18.16: no
/// answer is kept, only which rows hold it.
#[derive(Debug, Default)]
struct Compactions(Mutex<HashMap<(Named, u32), Known>>);

/// A model's compactions as a read names them, by the level of their rows
/// that names them (`Level::naming`): a compaction made before the job
/// kept minutes is current for a read per hour, not for one per minute.
type Named = (&'static str, Level);

/// An hour as last looked up: its compaction covering `markers` flushes,
/// or none covering the `markers` it had.
#[derive(Debug, Clone, Copy)]
struct Known {
    markers: u64,
    compaction: Option<u64>,
    at: Instant,
}

impl Known {
    /// When to look the hour up again all the same: the compactor may have
    /// come by an hour without one; a compacted day dropped by hand is
    /// noticed within a minute.
    fn stale(&self) -> bool {
        let after = if self.compaction.is_some() {
            Compactions::RECHECK_COMPACTED
        } else {
            Compactions::RECHECK
        };
        self.at.elapsed() >= after
    }
}

impl Compactions {
    /// How long an hour found without a current compaction is read from
    /// its partials (exact, slower) before it is looked up again.
    const RECHECK: Duration = Duration::from_secs(10);
    const RECHECK_COMPACTED: Duration = Duration::from_secs(60);
    /// Hours remembered at most (of every model); forgotten all at once past it.
    const CAPACITY: usize = 100_000;

    /// The current compactions of the hours with these `markers`, if every
    /// hour is known at its count.
    fn recall(&self, model: Named, markers: &[(u32, u64)]) -> Option<Vec<(u32, u64)>> {
        let known = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut current = Vec::new();
        for &(hour, count) in markers {
            let hour_known = known.get(&(model, hour))?;
            if hour_known.markers != count || hour_known.stale() {
                return None;
            }
            current.extend(hour_known.compaction.map(|c| (hour, c)));
        }
        Some(current)
    }

    /// What a lookup `found` (`(hour, covered, compaction)`) for hours with
    /// these `markers` says.
    fn learn(&self, model: Named, markers: &[(u32, u64)], found: &[(u32, u64, u64)]) {
        let mut known = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if known.len() + markers.len() > Self::CAPACITY {
            known.clear();
        }
        let at = Instant::now();
        let not_current = markers.iter().map(|&(hour, markers)| (hour, markers, None));
        let current = found
            .iter()
            .map(|&(hour, covered, c)| (hour, covered, Some(c)));
        // The current ones last: they replace their hours' entries.
        for (hour, markers, compaction) in not_current.chain(current) {
            let hour_known = Known {
                markers,
                compaction,
                at,
            };
            known.insert((model, hour), hour_known);
        }
    }
}

/// What a read learns before its statements: where the server starts its
/// hours, the current compactions of the hours it may take from them
/// (`None` when it takes none), and of a read per minute the current own
/// compactions of its minutes in no current hour (`Rows::minutes`).
#[derive(Debug, Clone, Default)]
struct Lookup {
    hour_phase: u32,
    /// `(hour, flushes)` of the range's closed hours with flushes.
    markers: Vec<(u32, u64)>,
    current: Option<Vec<(u32, u64)>>,
    minutes: Vec<(u32, u64)>,
}

/// The statements a read asks before its own (see [`Store::lookup`]).
struct LookupSql {
    named: Named,
    /// The current compactions of its hours (`Rows::current_sql`).
    current: String,
    /// Its hours' window markers (`Rows::markers_sql`): per minute, with
    /// each minute's hour, for a read per minute.
    markers: String,
    /// Of a read per minute, its minutes' own compactions
    /// (`Rows::minutes_sql`).
    minutes: Option<String>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("url", &self.url)
            .field("timeout", &self.timeout)
            .finish()
    }
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct RevenuePoint {
    /// Window start, epoch seconds.
    pub window_start: u32,
    /// Null when the point adds up every category (`group_by=none`).
    pub category: Option<Arc<str>>,
    pub currency: Arc<str>,
    /// Orders created with an item in the category. With `group_by=none`
    /// an order with items in two categories counts twice: the funnel's
    /// `created` counts orders once.
    pub orders: i64,
    pub items: i64,
    /// Revenue in minor units (cents) of `currency`.
    pub revenue_minor: i64,
    /// Distinct buyers over the window.
    pub unique_buyers: u64,
}

#[derive(Debug, Serialize, serde::Deserialize, JsonSchema, clickhouse::Row)]
pub struct UsersPoint {
    pub window_start: u32,
    /// Distinct users seen in the window.
    pub unique_users: u64,
    pub sign_ups: i64,
    /// Distinct sessions seen in the window.
    pub sessions: u64,
}

#[derive(Debug, Serialize, serde::Deserialize, JsonSchema, clickhouse::Row)]
pub struct SearchPoint {
    pub window_start: u32,
    pub searches: i64,
    /// Searches that found nothing.
    pub zero_results: i64,
    /// 95th percentile of search latency in the window.
    pub p95_latency_ms: i32,
    pub mean_latency_ms: f64,
}

/// One order's current state, from the order-status projection.
#[derive(Debug, Serialize, JsonSchema, clickhouse::Row, serde::Deserialize)]
pub struct OrderStatus {
    pub order_id: String,
    pub user_id: String,
    /// created, paid, shipped, delivered, cancelled or refunded.
    pub status: String,
    pub currency: String,
    pub total_minor: i64,
    pub items_count: u32,
    /// When the status last changed (event time), epoch milliseconds.
    pub updated_at_ms: i64,
}

/// One read of a model from the partials, per minute, per hour (the
/// server's own hours, as `toStartOfHour` starts them) or over the whole
/// range: exact whatever crashed (see `pipelines::ddl`).
struct Read<'a> {
    model: &'static str,
    range: TimeRange,
    /// None: one row per group over the whole range.
    granularity: Option<Granularity>,
    /// Dimensions (by name) to group by.
    group: &'a [&'static str],
    /// (dimension name, value) to keep.
    filters: Vec<(&'static str, &'a str)>,
    /// Keep only these values of a dimension.
    within: Option<(&'static str, &'a [String])>,
    /// Measures to compute (all, and the derived columns, when None): a
    /// distinct count costs far more than a sum.
    measures: Option<&'a [&'static str]>,
}

impl<'a> Read<'a> {
    /// All of `model`'s measures, no grouping or filter.
    fn new(model: &'static str, range: TimeRange, granularity: Option<Granularity>) -> Self {
        Self {
            model,
            range,
            granularity,
            group: &[],
            filters: Vec::new(),
            within: None,
            measures: None,
        }
    }

    /// Whether an hour starting `hour_phase` seconds past a multiple of
    /// 3,600 lies wholly in the range.
    fn holds_whole_hour(&self, hour_phase: u32) -> bool {
        let TimeRange { from, to } = self.range;
        let first =
            u64::from(from) + u64::from((hour_phase % 3_600 + 3_600 - from % 3_600) % 3_600);
        first + 3_600 <= u64::from(to)
    }

    /// `SELECT {outer} ... {tail}` over the read's columns (`t` when a
    /// series, the grouped dimensions, the model's columns), named in a
    /// WITH so that `outer` and `tail` pick and order them without another
    /// level of SELECT (see `Rows::from`), and its values to bind, in
    /// order. Whole hours of a model with keys come from their compaction
    /// where it is current (`pipelines::ddl::Rows`), except for a series
    /// per minute of a model whose minutes are not kept, or whose groups
    /// span keys.
    fn sql(
        &self,
        target: &Target,
        lookup: Lookup,
        outer: &str,
        tail: &str,
    ) -> (String, Vec<String>) {
        let (rows, values) = self.plan(lookup);
        self.statement(target, &rows, &values, outer, tail)
    }

    /// The read as [`Read::sql`] does, but a series taking windows from
    /// compactions and from partials both as one statement on each
    /// (`Rows::apart`): each window, so each point, comes from one of them.
    fn statements(
        &self,
        target: &Target,
        lookup: Lookup,
        outer: &str,
    ) -> Vec<(String, Vec<String>)> {
        let (rows, values) = self.plan(lookup);
        match rows.apart() {
            Some(parts) if self.granularity.is_some() => parts
                .iter()
                .map(|rows| self.statement(target, rows, &values, outer, ""))
                .collect(),
            _ => vec![self.statement(target, &rows, &values, outer, "")],
        }
    }

    /// `SELECT {outer} ... {tail}` over `rows`, and the `values` of its
    /// conditions as often as they appear.
    fn statement(
        &self,
        target: &Target,
        rows: &Rows,
        values: &[String],
        outer: &str,
        tail: &str,
    ) -> (String, Vec<String>) {
        let (selected, group) = self.shape(rows);
        let values: Vec<String> = (0..rows.sources())
            .flat_map(|_| values.iter().cloned())
            .collect();
        let mut sql = format!(
            "WITH {} SELECT {outer} {}{group}",
            selected.join(", "),
            rows.from(target)
        );
        if !tail.is_empty() {
            sql.push(' ');
            sql.push_str(tail);
        }
        (sql, values)
    }

    /// What this read asks before its own statements, if it may take
    /// hours or minutes from compactions.
    fn lookups(&self, target: &Target, hour_phase: u32) -> Option<LookupSql> {
        let (rows, _) = self.plan(Lookup {
            hour_phase,
            ..Lookup::default()
        });
        rows.hours.map(|level| LookupSql {
            named: (rows.model, level.naming()),
            current: rows.current_sql(target),
            markers: rows.markers_sql(target),
            minutes: level.per_minute().then(|| rows.minutes_sql(target)),
        })
    }

    /// The model's columns as `pipelines::ddl` names them.
    fn columns(&self) -> ModelColumns {
        model_columns(self.model)
            .unwrap_or_else(|| panic!("no read model {:?} in pipelines::ddl", self.model))
    }

    /// The partials' column of the dimension `name`.
    fn column_of(&self, columns: &ModelColumns, name: &str) -> &'static str {
        columns
            .dims
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(c, _)| *c)
            .unwrap_or_else(|| panic!("{} has no dimension {name}", self.model))
    }

    /// The measures to compute of `columns`.
    fn measures<'c>(&self, columns: &'c ModelColumns) -> Vec<&'c MeasureSql> {
        columns
            .measures
            .iter()
            .filter(|m| self.measures.is_none_or(|names| names.contains(&m.column)))
            .collect()
    }

    /// The rows to read (given the current compactions, and hours
    /// starting `hour_phase` seconds past a multiple of 3,600 since the
    /// epoch, as `lookup` found them) and the values of their conditions.
    fn plan(&self, lookup: Lookup) -> (Rows, Vec<String>) {
        let Lookup {
            hour_phase,
            current,
            markers: _,
            minutes,
        } = lookup;
        let columns = self.columns();
        let column_of = |name: &str| self.column_of(&columns, name);
        let measures = self.measures(&columns);
        let every_key = !columns.dims.is_empty()
            && self.group.is_empty()
            && self.filters.is_empty()
            && self.within.is_none();
        let per_minute = self.granularity == Some(Granularity::Minute);
        let fixed =
            |name: &str| self.group.contains(&name) || self.filters.iter().any(|(f, _)| *f == name);
        // Every value of the first dimension together, per value of the
        // second (every category per currency).
        let second_only = self.within.is_none()
            && matches!(columns.dims, [(_, first), (_, second)] if !fixed(first) && fixed(second));
        let level = match (every_key, second_only, per_minute) {
            (true, _, false) => Level::All,
            (false, _, false) => Level::Key,
            (true, _, true) => Level::AllMinute,
            (false, true, true) => Level::SecondMinute,
            (false, false, true) => Level::KeyMinute,
        };
        // One row of the level per window and group: each key's dimension
        // is grouped or fixed, or its rows add up the keys.
        let one_row =
            every_key || level == Level::SecondMinute || columns.dims.iter().all(|(_, n)| fixed(n));
        // A minute's compacted rows hold numbers only: read per minute
        // only where each group is one of them. Per hour or over the
        // range, only a whole hour is taken from its compaction: a range
        // holding none (the default, the hour before now) reads the
        // partials without counting any window markers.
        let hours = (compacted(self.model)
            && if per_minute {
                compacted_per_minute(self.model)
                    && one_row
                    && self.range.to.saturating_sub(self.range.from) >= 3_600
            } else {
                self.holds_whole_hour(hour_phase)
            })
        .then_some(level);
        let counts = hours.is_some() && self.granularity.is_some() && one_row;
        let mut read: Vec<&'static str> = Vec::new();
        let used = self
            .group
            .iter()
            .chain(self.filters.iter().map(|(n, _)| n))
            .chain(self.within.iter().map(|(n, _)| n))
            .map(|n| column_of(n))
            .chain(measures.iter().map(|m| m.argument));
        for column in used {
            if !read.contains(&column) {
                read.push(column);
            }
        }
        let mut conditions: String = self
            .filters
            .iter()
            .map(|(n, _)| format!(" AND {} = ?", column_of(n)))
            .collect();
        let mut values: Vec<String> = self.filters.iter().map(|(_, v)| (*v).to_owned()).collect();
        if let Some((name, within)) = self.within {
            conditions.push_str(&format!(
                " AND {} IN ({})",
                column_of(name),
                marks(within.len())
            ));
            values.extend(within.iter().cloned());
        }
        let rows = Rows {
            model: self.model,
            range: Some((self.range.from, self.range.to)),
            hours,
            counts,
            columns: read,
            conditions,
            current,
            minutes,
            part: Part::Whole,
        };
        (rows, values)
    }

    /// The selected columns over `rows` and their GROUP BY.
    fn shape(&self, rows: &Rows) -> (Vec<String>, String) {
        let columns = self.columns();
        let derived: &[(&str, &str)] = if self.measures.is_none() {
            columns.derived
        } else {
            &[]
        };
        let time = self.granularity.map(|g| format!("{} AS t", g.bucket()));
        let selected: Vec<String> = time
            .into_iter()
            .chain(
                self.group
                    .iter()
                    .map(|n| format!("{} AS {n}", self.column_of(&columns, n))),
            )
            .chain(
                self.measures(&columns)
                    .iter()
                    .map(|m| format!("{} AS {}", rows.measure(m), m.column)),
            )
            .chain(derived.iter().map(|(e, c)| format!("{e} AS {c}")))
            .collect();
        let grouped: Vec<&str> = self
            .granularity
            .map(|_| "t")
            .into_iter()
            .chain(self.group.iter().copied())
            .collect();
        // One compacted row per group: nothing to add up.
        let group = if grouped.is_empty() || rows.one_row_per_group() {
            String::new()
        } else {
            format!(" GROUP BY {}", grouped.join(", "))
        };
        (selected, group)
    }
}

impl Store {
    pub fn new(settings: &ClickHouseSettings, timeout: Duration) -> Result<Self, String> {
        let target = Target::new(&settings.database, None)
            .map_err(|e| format!("clickhouse.database: {e}"))?;
        let client = consumers::projection::client(settings, false)
            // ClickHouse stops the query itself too, not just our wait.
            .with_setting("max_execution_time", timeout.as_secs().max(1).to_string())
            // The reads are small: under concurrent requests a thread each
            // serves more of them than two each (query-bench at 8 clients:
            // up to 1.6 times the requests per second of the day-long reads).
            .with_setting("max_threads", "1")
            // The same few blocks (the markers, the compacted hours) are
            // read by every request: kept decompressed, each statement
            // served 13-50% more requests/s on 18.16. The server's
            // `uncompressed_cache_size` bounds it, and a read of more than
            // `merge_tree_max_rows_to_use_cache` rows bypasses it.
            .with_setting("use_uncompressed_cache", "1")
            // The reads narrow by their tables' sort keys, which leaves a
            // PREWHERE little to skip. Choosing one cost 18.16 two more
            // analyses of each WHERE (`MergeTreeWhereOptimizer`, 6% of its
            // CPU under query-bench); without, its statements served up to
            // 17% more requests/s, none fewer (BENCHMARKS.md).
            .with_setting("optimize_move_to_prewhere", "0");
        Ok(Self {
            client,
            target,
            url: settings.url.clone(),
            timeout,
            compactions: Arc::default(),
            own_minutes: Arc::default(),
            hour_phase: Arc::default(),
        })
    }

    /// Runs `query` within the timeout, turning failures into 503s that say
    /// what happened.
    async fn run<T>(
        &self,
        what: &str,
        query: impl std::future::Future<Output = clickhouse::error::Result<T>>,
    ) -> Result<T, ApiError> {
        match tokio::time::timeout(self.timeout, query).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(error)) => Err(self.failure(what, &error)),
            Err(_) => Err(ApiError::unavailable(
                "clickhouse_timeout",
                format!(
                    "ClickHouse at {} did not answer the {what} query within {} ms",
                    self.url,
                    self.timeout.as_millis()
                ),
            )),
        }
    }

    fn failure(&self, what: &str, error: &clickhouse::error::Error) -> ApiError {
        tracing::warn!(%error, what, "ClickHouse query failed.");
        match error {
            clickhouse::error::Error::Network(_) => ApiError::unavailable(
                "clickhouse_unavailable",
                format!("ClickHouse at {} is unreachable: {error}", self.url),
            ),
            clickhouse::error::Error::BadResponse(text) if text.contains("Code: 60") => {
                ApiError::unavailable(
                    "clickhouse_error",
                    format!(
                        "the read models are not in ClickHouse yet (start shopstream-analytics and shopstream-worker once to create them): {text}"
                    ),
                )
            }
            _ => ApiError::unavailable(
                "clickhouse_error",
                format!("ClickHouse could not answer the {what} query: {error}"),
            ),
        }
    }

    /// `read` as `SELECT {outer} ... {tail}` (see `Read::sql`), values
    /// bound; `tail` comes after the GROUP BY.
    async fn query(
        &self,
        read: &Read<'_>,
        outer: &str,
        tail: &str,
    ) -> Result<clickhouse::query::Query, ApiError> {
        let lookup = self.lookup(read).await?;
        Ok(self.bound(read, lookup, outer, tail))
    }

    /// Where the server starts its hours (asked once), and the current
    /// compactions of the hours `read` may take from them: recalled while
    /// their hours' window markers number what they cover
    /// ([`Compactions`]), else looked up.
    async fn lookup(&self, read: &Read<'_>) -> Result<Lookup, ApiError> {
        let hour_phase = *self
            .hour_phase
            .get_or_try_init(|| {
                self.run(
                    "time zone",
                    self.client
                        .query("SELECT toUInt32(toUInt32(toStartOfHour(now())) % 3600)")
                        .fetch_one::<u32>(),
                )
            })
            .await?;
        let Some(asked) = read.lookups(&self.target, hour_phase) else {
            return Ok(Lookup {
                hour_phase,
                ..Lookup::default()
            });
        };
        let counting = self.client.query(&asked.markers);
        let (mut markers, per_minute) = if asked.minutes.is_some() {
            let per_minute = self
                .run("window markers", counting.fetch_all::<(u32, u32, u64)>())
                .await?;
            let mut hours: BTreeMap<u32, u64> = BTreeMap::new();
            for (hour, _, count) in &per_minute {
                *hours.entry(*hour).or_default() += count;
            }
            (hours.into_iter().collect(), per_minute)
        } else {
            let per_hour = self
                .run("window markers", counting.fetch_all::<(u32, u64)>())
                .await?;
            (per_hour, Vec::new())
        };
        // An hour not over yet is still flushed to, its markers change from
        // one request to the next: it is read from its partials (or its
        // minutes' own compactions) instead of looked up every time
        // ("today" per hour).
        let now = consumers::forward::now_ms() / 1000;
        markers.retain(|&(hour, _)| i64::from(hour) + 3_600 <= now);
        let current = match self.compactions.recall(asked.named, &markers) {
            Some(recalled) => recalled,
            None => {
                let found = self
                    .run(
                        "compacted hours",
                        self.client
                            .query(&asked.current)
                            .fetch_all::<(u32, u64, u64)>(),
                    )
                    .await?;
                self.compactions.learn(asked.named, &markers, &found);
                found.into_iter().map(|(h, _, c)| (h, c)).collect()
            }
        };
        let minutes = match asked.minutes {
            Some(sql) => {
                self.own_minutes(asked.named, read.range, &current, &per_minute, &sql)
                    .await?
            }
            None => Vec::new(),
        };
        Ok(Lookup {
            hour_phase,
            markers,
            current: Some(current),
            minutes,
        })
    }

    /// The current own compactions (`(minute, id)`) of the minutes of
    /// `range` in no `current` hour, each covering as many flushes as the
    /// minute's window `markers` (`(hour, minute, count)`) count now: the
    /// partials only grow, so the same count means the same partials.
    /// Recalled while every such minute's count is what it was when last
    /// looked up by `sql` ([`Compactions`]); not asked when every minute is
    /// in a current hour.
    async fn own_minutes(
        &self,
        named: Named,
        range: TimeRange,
        current: &[(u32, u64)],
        markers: &[(u32, u32, u64)],
        sql: &str,
    ) -> Result<Vec<(u32, u64)>, ApiError> {
        // `(minute, markers)`, in order: one row per minute.
        let mut wanted: Vec<(u32, u64)> = markers
            .iter()
            .filter(|(hour, minute, _)| {
                (range.from..range.to).contains(minute) && current.iter().all(|(h, _)| h != hour)
            })
            .map(|(_, minute, count)| (*minute, *count))
            .collect();
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        wanted.sort_unstable();
        if let Some(recalled) = self.own_minutes.recall(named, &wanted) {
            return Ok(recalled);
        }
        let found = self
            .run(
                "compacted minutes",
                self.client.query(sql).fetch_all::<(u32, u64, u64)>(),
            )
            .await?;
        // One row per minute and count: at most one matches the markers.
        let mut found: Vec<(u32, u64, u64)> = found
            .into_iter()
            .filter(|(minute, covered, _)| wanted.binary_search(&(*minute, *covered)).is_ok())
            .collect();
        found.sort_unstable();
        self.own_minutes.learn(named, &wanted, &found);
        Ok(found.into_iter().map(|(m, _, c)| (m, c)).collect())
    }

    /// [`Store::query`] given its `lookup`.
    fn bound(
        &self,
        read: &Read<'_>,
        lookup: Lookup,
        outer: &str,
        tail: &str,
    ) -> clickhouse::query::Query {
        let (sql, binds) = read.sql(&self.target, lookup, outer, tail);
        self.prepared(&sql, &binds)
    }

    /// A series' points (see [`Read::statements`]): from one statement, or
    /// from one on the compactions and one on the partials, in no order.
    async fn series<T>(&self, what: &str, read: &Read<'_>, outer: &str) -> Result<Vec<T>, ApiError>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead + Send,
    {
        let mut points = Vec::new();
        self.each_row::<T>(what, read, outer, |point| points.push(point))
            .await?;
        Ok(points)
    }

    /// [`Store::series`], each row handed to `each` as it is decoded: a
    /// row type borrowing its strings from the response allocates none.
    async fn each_row<T>(
        &self,
        what: &str,
        read: &Read<'_>,
        outer: &str,
        mut each: impl for<'r> FnMut(T::Value<'r>) + Send,
    ) -> Result<(), ApiError>
    where
        T: clickhouse::RowRead + Send + 'static,
    {
        let lookup = self.lookup(read).await?;
        for (sql, binds) in read.statements(&self.target, lookup, outer) {
            let query = self.prepared(&sql, &binds);
            self.run(what, async {
                let mut rows = query.fetch::<T>()?;
                while let Some(row) = rows.next().await? {
                    each(row);
                }
                Ok(())
            })
            .await?;
        }
        Ok(())
    }

    /// `sql` with its values bound.
    fn prepared(&self, sql: &str, binds: &[String]) -> clickhouse::query::Query {
        binds
            .iter()
            .fold(self.client.query(sql), |query, value| query.bind(value))
    }

    /// Answers `SELECT 1`: whether ClickHouse is there.
    pub async fn ping(&self) -> Result<(), ApiError> {
        self.run("readiness", self.client.query("SELECT 1").fetch_one::<u8>())
            .await
            .map(|_| ())
    }

    pub async fn revenue(
        &self,
        range: TimeRange,
        granularity: Granularity,
        grouping: RevenueGrouping,
        category: Option<&str>,
        currency: Option<&str>,
    ) -> Result<Vec<RevenuePoint>, ApiError> {
        let (group, category_column): (&[&str], &str) = match grouping {
            RevenueGrouping::Category => (&["category", "currency"], "category"),
            RevenueGrouping::None => (&["currency"], "'' AS category"),
        };
        let read = Read {
            group,
            filters: [("category", category), ("currency", currency)]
                .into_iter()
                .filter_map(|(n, v)| v.map(|v| (n, v)))
                .collect(),
            ..Read::new("orders", range, Some(granularity))
        };
        let by_category = grouping == RevenueGrouping::Category;
        let mut names = Names::default();
        let mut points = Vec::new();
        self.each_row::<RevenueRow<'static>>(
            "revenue",
            &read,
            &format!("t, {category_column}, currency, orders, items, revenue_minor, unique_buyers"),
            |row| {
                points.push(RevenuePoint {
                    window_start: row.t,
                    category: by_category.then(|| names.get(row.category)),
                    currency: names.get(row.currency),
                    orders: row.orders,
                    items: row.items,
                    revenue_minor: row.revenue_minor,
                    unique_buyers: row.unique_buyers,
                })
            },
        )
        .await?;
        Ok(in_order(points, |a, b| {
            (a.window_start, &a.category, &a.currency).cmp(&(
                b.window_start,
                &b.category,
                &b.currency,
            ))
        }))
    }

    pub async fn funnel(&self, range: TimeRange) -> Result<Funnel, ApiError> {
        let read = Read::new("funnel", range, None);
        let query = self
            .query(
                &read,
                "created, paid, shipped, delivered, cancelled, refunded",
                "",
            )
            .await?;
        self.run("funnel", query.fetch_one::<Funnel>()).await
    }

    pub async fn active_users(
        &self,
        range: TimeRange,
        granularity: Granularity,
        country: Option<&str>,
        platform: Option<&str>,
    ) -> Result<Vec<UsersPoint>, ApiError> {
        let read = Read {
            filters: [("country", country), ("platform", platform)]
                .into_iter()
                .filter_map(|(n, v)| v.map(|v| (n, v)))
                .collect(),
            ..Read::new("users", range, Some(granularity))
        };
        let points: Vec<UsersPoint> = self
            .series("active users", &read, "t, unique_users, sign_ups, sessions")
            .await?;
        Ok(in_order(points, |a, b| a.window_start.cmp(&b.window_start)))
    }

    /// In two reads: the top rooms by messages (sums only), then their
    /// distinct chatters; over a day of 200 rooms the distinct counts of
    /// every room cost more than ten times as much. Both read the same
    /// compacted hours, looked up once.
    pub async fn busiest_rooms(&self, range: TimeRange, limit: u32) -> Result<Vec<Room>, ApiError> {
        let sums = Read {
            group: &["room_id"],
            measures: Some(&["messages", "flagged"]),
            ..Read::new("chat", range, None)
        };
        let lookup = self.lookup(&sums).await?;
        let query = self
            .bound(
                &sums,
                lookup.clone(),
                "room_id, messages, flagged",
                "ORDER BY messages DESC, room_id LIMIT ?",
            )
            .bind(limit);
        let top = self
            .run("busiest rooms", query.fetch_all::<(String, i64, i64)>())
            .await?;
        if top.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = top.iter().map(|(id, _, _)| id.clone()).collect();
        let chatters = match self.day_chatters(range, &lookup, &ids).await? {
            Some(counted) => counted,
            None => {
                let distinct = Read {
                    group: &["room_id"],
                    within: Some(("room_id", &ids)),
                    measures: Some(&["unique_chatters"]),
                    ..Read::new("chat", range, None)
                };
                let query = self.bound(&distinct, lookup, "room_id, unique_chatters", "");
                self.run(
                    "busiest rooms' chatters",
                    query.fetch_all::<(String, u64)>(),
                )
                .await?
                .into_iter()
                .collect()
            }
        };
        Ok(top
            .into_iter()
            .map(|(room_id, messages, flagged)| Room {
                unique_chatters: chatters.get(&room_id).copied().unwrap_or(0),
                room_id,
                messages,
                flagged,
            })
            .collect())
    }

    /// The distinct chatters of `rooms` over `range` as counted for that
    /// day of compacted hours ([`pipelines::hours::DayRow`]), when `range`
    /// is 24 closed hours and the count covers every flush they have now
    /// (they only grow, so the same count is the same partials); `None`
    /// when any room has no such row, and the rooms are read otherwise.
    async fn day_chatters(
        &self,
        range: TimeRange,
        lookup: &Lookup,
        rooms: &[String],
    ) -> Result<Option<HashMap<String, u64>>, ApiError> {
        let now = consumers::forward::now_ms() / 1000;
        if range.to - range.from != pipelines::hours::DAY
            || range.from % 3_600 != lookup.hour_phase % 3_600
            || i64::from(range.to) > now
        {
            return Ok(None);
        }
        let covered: u64 = lookup
            .markers
            .iter()
            .filter(|(hour, _)| (range.from..range.to).contains(hour))
            .map(|(_, flushes)| flushes)
            .sum();
        let sql = format!(
            "SELECT dim1, any(d1) FROM {} WHERE model = '{DAY_MODEL}' \
             AND window_start = toDateTime(?) AND covered = ? AND dim1 IN ({}) GROUP BY dim1",
            self.target.table(DAYS_TABLE),
            marks(rooms.len())
        );
        let query = rooms.iter().fold(
            self.client.query(&sql).bind(range.from).bind(covered),
            |query, room| query.bind(room),
        );
        let counted: HashMap<String, u64> = self
            .run(
                "busiest rooms' chatters",
                query.fetch_all::<(String, u64)>(),
            )
            .await?
            .into_iter()
            .collect();
        Ok((counted.len() == rooms.len()).then_some(counted))
    }

    pub async fn top_queries(
        &self,
        range: TimeRange,
        limit: u32,
    ) -> Result<Vec<TopQuery>, ApiError> {
        self.queries_by_text(
            "top searches",
            range,
            limit,
            "query, searches",
            "ORDER BY searches DESC, query LIMIT ?",
        )
        .await
    }

    /// The queries that found nothing most often over `range`.
    pub async fn top_zero_result_queries(
        &self,
        range: TimeRange,
        limit: u32,
    ) -> Result<Vec<ZeroResultQuery>, ApiError> {
        self.queries_by_text(
            "top zero-result searches",
            range,
            limit,
            "query, zero_results, searches",
            "HAVING zero_results > 0 ORDER BY zero_results DESC, query LIMIT ?",
        )
        .await
    }

    /// `limit` rows of the search-query model over `range`, by query text.
    async fn queries_by_text<T>(
        &self,
        what: &'static str,
        range: TimeRange,
        limit: u32,
        outer: &str,
        tail: &str,
    ) -> Result<Vec<T>, ApiError>
    where
        T: clickhouse::Row + for<'b> clickhouse::RowRead<Value<'b> = T> + Send + 'static,
    {
        let read = Read {
            group: &["query"],
            ..Read::new("queries", range, None)
        };
        let query = self.query(&read, outer, tail).await?.bind(limit);
        self.run(what, query.fetch_all::<T>()).await
    }

    pub async fn searches(
        &self,
        range: TimeRange,
        granularity: Granularity,
    ) -> Result<Vec<SearchPoint>, ApiError> {
        let read = Read::new("search", range, Some(granularity));
        let points: Vec<SearchPoint> = self
            .series(
                "searches",
                &read,
                "t, searches, zero_results, toInt32(p95_latency_ms), toFloat64(mean_latency_ms)",
            )
            .await?;
        Ok(in_order(points, |a, b| a.window_start.cmp(&b.window_start)))
    }

    pub async fn order(&self, order_id: &str) -> Result<Option<OrderStatus>, ApiError> {
        let sql = format!(
            "SELECT order_id, user_id, status, currency, total_minor, items_count, updated_at_ms \
             FROM {} FINAL WHERE order_id = ? LIMIT 1",
            self.target.table("order_status")
        );
        let query = self.client.query(&sql).bind(order_id);
        self.run("order status", query.fetch_optional::<OrderStatus>())
            .await
    }
}

/// `n` placeholders for values bound, as a list.
fn marks(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// A revenue row as ClickHouse sends it, its names borrowed from the
/// response: an hour per minute by category is 6,000 rows, and two
/// strings allocated for each were a tenth of the service's CPU.
#[derive(clickhouse::Row, serde::Deserialize)]
struct RevenueRow<'a> {
    t: u32,
    category: &'a str,
    currency: &'a str,
    orders: i64,
    items: i64,
    revenue_minor: i64,
    unique_buyers: u64,
}

/// The distinct names of an answer (its categories and currencies), each
/// allocated once and shared by its points.
#[derive(Default)]
struct Names(foldhash::HashSet<Arc<str>>);

impl Names {
    fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(known) = self.0.get(name) {
            return Arc::clone(known);
        }
        let name: Arc<str> = name.into();
        self.0.insert(Arc::clone(&name));
        name
    }
}

/// A series' points in window order (then by their keys), sorted here
/// rather than by ClickHouse: 18.16 spent a quarter of a day's revenue per
/// hour and category sorting 2,400 rows (351 -> 475 requests/s without the
/// ORDER BY, BENCHMARKS.md). A stable sort, as it takes runs already in
/// order in one pass: the compacted minutes come in their table's order,
/// which is this one, and only the partials' few groups are out of it.
fn in_order<T>(mut points: Vec<T>, by: impl FnMut(&T, &T) -> std::cmp::Ordering) -> Vec<T> {
    points.sort_by(by);
    points
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_allocated_once_per_answer() {
        let mut names = Names::default();
        let first = names.get("EUR");
        assert!(Arc::ptr_eq(&first, &names.get("EUR")));
        assert_eq!(&*names.get("USD"), "USD");
        assert_eq!(names.0.len(), 2);
    }

    #[test]
    fn compactions_are_recalled_while_their_markers_match() {
        const ORDERS: Named = ("orders", Level::All);
        let known = Compactions::default();
        let markers = [(3_600, 3), (7_200, 5)];
        assert_eq!(known.recall(ORDERS, &markers), None, "nothing known");
        // The lookup found the first hour compacted, not the second.
        known.learn(ORDERS, &markers, &[(3_600, 3, 42)]);
        assert_eq!(known.recall(ORDERS, &markers), Some(vec![(3_600, 42)]));
        assert_eq!(
            known.recall(("chat", Level::All), &markers),
            None,
            "per model"
        );
        let minutes = ("orders", Level::AllMinute);
        assert_eq!(known.recall(minutes, &markers), None, "per level");
        // A late flush into either hour, or an hour never looked up.
        assert_eq!(known.recall(ORDERS, &[(3_600, 4), (7_200, 5)]), None);
        assert_eq!(known.recall(ORDERS, &[(3_600, 3), (7_200, 6)]), None);
        assert_eq!(known.recall(ORDERS, &[(3_600, 3), (10_800, 1)]), None);
        assert_eq!(known.recall(ORDERS, &[]), Some(Vec::new()));
        // Each hour is looked up again in a while all the same: sooner
        // without a compaction.
        let ago = |d| {
            std::time::Instant::now()
                .checked_sub(d)
                .expect("an instant")
        };
        let second = |compaction, at| {
            let hour = Known {
                markers: 5,
                compaction,
                at,
            };
            known.0.lock().expect("lock").insert((ORDERS, 7_200), hour);
        };
        second(None, ago(Compactions::RECHECK));
        assert_eq!(known.recall(ORDERS, &markers), None);
        second(Some(43), ago(Compactions::RECHECK));
        assert_eq!(
            known.recall(ORDERS, &markers),
            Some(vec![(3_600, 42), (7_200, 43)])
        );
        second(Some(43), ago(Compactions::RECHECK_COMPACTED));
        assert_eq!(known.recall(ORDERS, &markers), None);
    }

    #[test]
    fn only_a_range_holding_a_whole_hour_of_the_server_counts_window_markers() {
        let target = Target::new("shop", None).unwrap();
        let hour = 1_795_996_800;
        let read = |from: u32, to: u32, granularity| {
            Read::new("chat", TimeRange { from, to }, granularity)
        };
        // The hour before now, ragged, holds no whole hour in UTC: no
        // markers counted, the partials read straight.
        let ragged = read(hour + 600, hour + 4_200, None);
        assert!(ragged.lookups(&target, 0).is_none());
        let (sql, _) = ragged.sql(&target, Lookup::default(), "*", "");
        assert!(
            !sql.contains("UNION") && !sql.contains("compaction"),
            "{sql}"
        );
        // In a time zone whose hours start at ten past, it does.
        assert!(ragged.lookups(&target, 600).is_some());
        assert!(read(hour, hour + 3_600, None).lookups(&target, 0).is_some());
        assert!(read(hour + 1, hour + 3_601, None)
            .lookups(&target, 0)
            .is_none());
        assert!(read(hour - 1, hour + 3_600, None)
            .lookups(&target, 0)
            .is_some());
        // Per hour alike; per minute the minutes of every hour the range
        // overlaps may come from a compaction.
        let per_hour = read(hour + 600, hour + 4_200, Some(Granularity::Hour));
        assert!(per_hour.lookups(&target, 0).is_none());
        let users = Read::new(
            "users",
            TimeRange {
                from: hour + 600,
                to: hour + 4_200,
            },
            Some(Granularity::Minute),
        );
        let asked = users.lookups(&target, 0).expect("minutes looked up");
        assert!(asked.minutes.is_some());
        let markers = asked.markers;
        assert!(
            markers.contains("window_start >= toStartOfHour(toDateTime(1795997400)) AND window_start < toStartOfHour(toDateTime(1796000999)) + 3600"),
            "{markers}"
        );
    }

    #[test]
    fn a_read_filters_the_range_before_grouping_and_takes_whole_hours_from_their_compaction() {
        let target = Target::new("shop", None).unwrap();
        let range = TimeRange {
            from: 1_795_996_800,
            to: 1_795_996_800 + 3 * 3_600,
        };
        let range_sql =
            "window_start >= toDateTime(1795996800) AND window_start < toDateTime(1796007600)";
        let hours_sql =
            "window_start >= toDateTime(1795996800) AND window_start <= toDateTime(1796004000)";
        let sql_of = |read: &Read, current| {
            let lookup = Lookup {
                current,
                ..Lookup::default()
            };
            read.sql(&target, lookup, "*", "")
        };
        // Per minute: the partials only.
        let (sql, values) = Read::new("funnel", range, Some(Granularity::Minute)).sql(
            &target,
            Lookup::default(),
            "t, created, paid",
            "ORDER BY t",
        );
        assert_eq!(sql, format!("WITH toUInt32(window_start) AS t, sum(c1) AS created, sum(c2) AS paid, sum(c3) AS shipped, sum(c4) AS delivered, sum(c5) AS cancelled, sum(c6) AS refunded SELECT t, created, paid FROM `shop`.`analytics_partials` WHERE model = 'funnel' AND {range_sql} GROUP BY t ORDER BY t"));
        assert!(values.is_empty());
        // Per hour, every key grouped: one compacted row per group, its
        // distinct counts as numbers.
        let read = Read {
            group: &["category", "currency"],
            ..Read::new("orders", range, Some(Granularity::Hour))
        };
        let (sql, _) = sql_of(&read, None);
        assert!(
            sql.contains("if(max(grain) = 1, sum(d1), uniqExactArray(set1)) AS unique_buyers"),
            "{sql}"
        );
        // Every hour compacted: the numbers alone.
        let every = (0..3).map(|h| (1_795_996_800 + h * 3_600, 7)).collect();
        let (numbers, _) = sql_of(&read, Some(every));
        // One compacted row per group: its values, no aggregate.
        assert!(numbers.contains("c3 AS revenue_minor, d1 AS unique_buyers SELECT * FROM `shop`.`analytics_hours` WHERE model = 'orders' AND level = 0"), "{numbers}");
        assert!(
            !numbers.contains("GROUP BY") && !numbers.contains("sum("),
            "{numbers}"
        );
        assert!(!numbers.contains("UNION"), "{numbers}");
        // No compacted hour (the default range, the hour before now): the
        // partials' sets, no compaction's numbers.
        let (sets, _) = sql_of(&read, Some(Vec::new()));
        assert!(sets.contains("uniqExactArray(set1) AS unique_buyers SELECT * FROM `shop`.`analytics_partials` WHERE model = 'orders'"), "{sets}");
        assert!(!sets.contains("grain") && !sets.contains("d1"), "{sets}");
        assert!(sql.contains(&format!("FROM `shop`.`analytics_hours` WHERE model = 'orders' AND {hours_sql} AND (window_start, covered) IN (SELECT toStartOfHour(window_start) AS hour, count() FROM `shop`.`analytics_partials` WHERE model = '_window' AND {range_sql} GROUP BY hour)")), "{sql}");
        // No dimension kept: the hours' rows for every key together.
        let (sql, _) = sql_of(&Read::new("users", range, Some(Granularity::Hour)), None);
        assert!(sql.contains("model = 'users' AND level = 1"), "{sql}");
        // Over the whole range, some rooms: the sets, the values bound in
        // both sources.
        let rooms = ["r-1".to_owned(), "r-2".to_owned()];
        let read = Read {
            group: &["room_id"],
            within: Some(("room_id", &rooms)),
            measures: Some(&["unique_chatters"]),
            ..Read::new("chat", range, None)
        };
        let (sql, values) = sql_of(&read, None);
        // The hours' keys, and the partials' ids made keys beside them.
        assert!(sql.starts_with("WITH dim1 AS room_id, uniqExactArray(key1) AS unique_chatters SELECT * FROM (SELECT window_start, dim1, key1 FROM `shop`.`analytics_hours` WHERE model = 'chat' AND level = 0"), "{sql}");
        assert!(sql.contains("UNION ALL SELECT window_start, dim1, arrayMap(id -> toUUID(UUIDNumToString(sipHash128(id))), set1) AS key1 FROM `shop`.`analytics_partials`"), "{sql}");
        assert_eq!(sql.matches(" AND dim1 IN (?, ?)").count(), 2, "{sql}");
        assert!(sql.ends_with("GROUP BY room_id"), "{sql}");
        assert_eq!(values, [rooms.clone(), rooms.clone()].concat());
        // The current compactions read beforehand: named, not counted again.
        assert!(read.lookups(&target, 0).is_some_and(|asked| asked
            .current
            .contains("WHERE model = 'chat' AND level = 1 AND")
            && asked.minutes.is_none()));
        let (sql, values) = sql_of(&read, Some(vec![(1_795_996_800, 12)]));
        assert!(sql.contains("AND level = 0 AND window_start >= toDateTime(1795996800) AND window_start <= toDateTime(1796004000) AND compaction IN (12) AND dim1 IN (?, ?)"), "{sql}");
        // The partials' ranges leave the compacted hour out: no condition
        // on each row's hour.
        assert!(sql.contains("WHERE model = 'chat' AND (window_start >= toDateTime(1796000400) AND window_start < toDateTime(1796007600)) AND dim1 IN (?, ?))"), "{sql}");
        assert!(!sql.contains("NOT IN"), "{sql}");
        // Every hour compacted: the compactions alone.
        let all = vec![
            (1_795_996_800, 1),
            (1_796_000_400, 2),
            (1_796_003_600, 3),
            (1_796_007_200, 4),
        ];
        let (only, bound) = sql_of(&read, Some(all));
        assert!(
            !only.contains("analytics_partials") && !only.contains("UNION"),
            "{only}"
        );
        assert_eq!(bound, rooms);
        assert!(!sql.contains("count()"), "{sql}");
        assert_eq!(values.len(), 4);
        // None current: the partials alone.
        let (sql, values) = sql_of(&read, Some(Vec::new()));
        assert!(!sql.contains("analytics_hours"), "{sql}");
        assert_eq!(values, rooms);
        assert!(Read::new("funnel", range, Some(Granularity::Minute))
            .lookups(&target, 0)
            .is_none());
    }
}
