//! The analytics tables. A flush is ONE insert into `analytics_partials`
//! (several only past 500,000 rows): the partial aggregates of every read
//! model for each Kafka partition flushed, plus per partition an `_offset`
//! row naming it and the last offset its rows cover. The table has no
//! PARTITION BY, so the insert is one part, all or nothing: aggregates and
//! offsets land together or not at all. On assignment the job resumes after
//! the stored offset, so nothing is counted twice or missed.
//!
//! The read models are views that add the partials up (sums, and distinct
//! counts and percentiles over the arrays they carry), per window and per
//! hour (`toStartOfHour`, the server's own hours). Nothing else is written:
//! a table fed from the insert (migration 1's hourly rollups, materialized
//! views into AggregatingMergeTree tables) gets its own part, which a
//! ClickHouse crash mid-insert can keep without the partials or lose with
//! them kept, and its hours came out short. Migration 2 drops them.

use consumers::projection::ddl::{AddedColumn, Migration, Target};

pub const MIGRATIONS_TABLE: &str = "analytics_migrations";
pub const PARTIALS_TABLE: &str = "analytics_partials";
/// Closed hours compacted from the partials (`crate::hours`).
pub const HOURS_TABLE: &str = "analytics_hours";
/// The minutes of the compacted hours, of the models read per minute
/// ([`Level::per_minute`]).
pub const MINUTES_TABLE: &str = "analytics_minutes";
/// Each chat room's distinct chatters over 24 compacted hours
/// (`hours::DayRow`), the day ending at each closed hour.
pub const DAYS_TABLE: &str = "analytics_days";
/// The model [`DAYS_TABLE`] keeps: the one read over a range as one number
/// per key from sets (the busiest rooms' chatters); the others' day-long
/// reads add up numbers per hour.
pub const DAY_MODEL: &str = "chat";
/// The columns of [`HOURS_TABLE`] and [`MINUTES_TABLE`] (`hours::HourRow`).
const COMPACTED_COLUMNS: &str =
    "model String, level UInt8, window_start DateTime, dim1 String, dim2 String, \
     c1 Int64, c2 Int64, c3 Int64, c4 Int64, c5 Int64, c6 Int64, d1 UInt64, d2 UInt64, \
     set1 Array(String), set2 Array(String), latencies Array(Int32), \
     covered UInt64, compaction UInt64, compacted_at DateTime";

/// A read model: its per-window view and the hourly rollup.
struct Model {
    /// `model` value in the partials.
    key: &'static str,
    /// View name stem: `<name>_per_minute`, `<name>_per_hour`.
    name: &'static str,
    /// (partials expression, column name) of the grouping dimensions.
    dims: &'static [(&'static str, &'static str)],
    measures: &'static [Measure],
    /// (expression over the measures, column name), for both views.
    derived: &'static [(&'static str, &'static str)],
    /// Whether its compactions also keep each minute of the hour
    /// ([`Level::per_minute`]): the query API reads it per minute.
    minutes: bool,
}

/// A column computed by one aggregate function over a partials column: per
/// window `f(arg)`, in the hourly state `fState(arg)`, read as `fMerge(column)`.
struct Measure {
    column: &'static str,
    function: &'static str,
    /// Parameters, such as `(0.95)` for a quantile.
    params: &'static str,
    argument: &'static str,
    state_type: &'static str,
}

impl Model {
    /// `, partials column AS name` per dimension.
    fn dims_select(&self) -> String {
        self.dims
            .iter()
            .map(|(e, c)| format!(", {e} AS {c}"))
            .collect()
    }

    /// `, name` per dimension.
    fn dims_group(&self) -> String {
        self.dims.iter().map(|(_, c)| format!(", {c}")).collect()
    }

    /// Measures then derived columns, each `expression AS name`.
    fn values(&self) -> String {
        self.values_with(false)
    }

    /// The same over [`Rows`] with `counts` as given.
    fn values_with(&self, counts: bool) -> String {
        let measures = self
            .measures
            .iter()
            .map(|m| format!("{} AS {}", m.value_with(counts), m.column));
        let derived = self.derived.iter().map(|(e, c)| format!("{e} AS {c}"));
        measures.chain(derived).collect::<Vec<_>>().join(", ")
    }

    /// Per measure, its state over the partials, `expr AS column`.
    fn states(&self) -> Vec<String> {
        self.measures
            .iter()
            .map(|m| format!("{} AS {}", m.state(), m.column))
            .collect()
    }

    /// Measures merged from their state columns, then derived columns.
    fn merged(&self) -> String {
        let merges = self
            .measures
            .iter()
            .map(|m| format!("{} AS {}", m.merge(), m.column));
        let derived = self.derived.iter().map(|(e, c)| format!("{e} AS {c}"));
        merges.chain(derived).collect::<Vec<_>>().join(", ")
    }
}

impl Model {
    /// Whether its closed hours are compacted: a model without keys has a
    /// row per flush and window, as many as the window markers that tell
    /// whether a compaction is current, so its hours would read no faster.
    fn compacted(&self) -> bool {
        !self.dims.is_empty()
    }

    /// The partials columns its dimensions and measures read.
    fn columns(&self) -> Vec<&'static str> {
        let mut columns: Vec<&'static str> = self.dims.iter().map(|(c, _)| *c).collect();
        for m in self.measures {
            if !columns.contains(&m.argument) {
                columns.push(m.argument);
            }
        }
        columns
    }
}

/// The column of a compacted hour's row holding the distinct count of the
/// set column `set` (`set1` -> `d1`).
fn count_of(set: &str) -> String {
    set.replace("set", "d")
}

/// The column of a compacted hour's row holding the keys of the set column
/// `set` (`set1` -> `key1`, migration 6): each id's 128-bit SipHash as a
/// UUID. `uniqExact` of a string counts exactly that hash, so counting the
/// keys gives the same number, without hashing every id of every hour read
/// again (ClickHouse 18.16, a day of ten rooms' chatters: 1.8-2.0 times the
/// requests/s of that statement).
pub(crate) fn keys_of(set: &str) -> String {
    set.replace("set", "key")
}

/// The keys (see [`keys_of`]) of the ids in the set column `set`.
fn keys_expression(set: &str) -> String {
    format!("arrayMap(id -> toUUID(UUIDNumToString(sipHash128(id))), {set})")
}

impl Measure {
    fn value(&self) -> String {
        self.over(self.argument)
    }

    /// Its aggregate over `column` in place of its argument.
    fn over(&self, column: &str) -> String {
        format!("{}{}({column})", self.function, self.params)
    }

    /// Over compacted hours' rows, several per group (and the partials'
    /// rows as keys beside them): a distinct count over their keys.
    fn value_over_keys(&self) -> String {
        match self.argument {
            set @ ("set1" | "set2") => self.over(&keys_of(set)),
            _ => self.value(),
        }
    }

    /// Over one compacted hour's row of a key, for a read whose every
    /// group is one such row ([`Rows::one_row_per_group`]): the row's own
    /// value, a distinct count the hour's number. A compacted model has
    /// only sums and distinct counts (tested); anything else stays its
    /// aggregate.
    fn value_from_hours(&self) -> String {
        match (self.function, self.argument) {
            (_, set @ ("set1" | "set2")) => count_of(set),
            ("sum", column) => column.to_owned(),
            _ => self.value(),
        }
    }

    /// Over [`Rows`] with `counts`, a distinct count takes the hour's
    /// number where the group's one row is a compacted hour.
    fn value_with(&self, counts: bool) -> String {
        match (counts, self.argument) {
            (true, set @ ("set1" | "set2")) => format!(
                "if(max(grain) = 1, sum({}), {})",
                count_of(set),
                self.value()
            ),
            _ => self.value(),
        }
    }

    fn state(&self) -> String {
        format!("{}State{}({})", self.function, self.params, self.argument)
    }

    fn merge(&self) -> String {
        format!("{}Merge{}({})", self.function, self.params, self.column)
    }
}

const fn sum(column: &'static str, argument: &'static str) -> Measure {
    Measure {
        column,
        function: "sum",
        params: "",
        argument,
        state_type: "AggregateFunction(sum, Int64)",
    }
}

const fn distinct(column: &'static str, argument: &'static str) -> Measure {
    Measure {
        column,
        function: "uniqExactArray",
        params: "",
        argument,
        state_type: "AggregateFunction(uniqExactArray, Array(String))",
    }
}

const MODELS: [Model; 6] = [
    Model {
        key: "orders",
        name: "orders",
        dims: &[("dim1", "category"), ("dim2", "currency")],
        measures: &[
            sum("orders", "c1"),
            sum("items", "c2"),
            sum("revenue_minor", "c3"),
            distinct("unique_buyers", "set1"),
        ],
        derived: &[],
        minutes: true,
    },
    Model {
        key: "funnel",
        name: "order_funnel",
        dims: &[],
        measures: &[
            sum("created", "c1"),
            sum("paid", "c2"),
            sum("shipped", "c3"),
            sum("delivered", "c4"),
            sum("cancelled", "c5"),
            sum("refunded", "c6"),
        ],
        derived: &[],
        minutes: false,
    },
    Model {
        key: "users",
        name: "active_users",
        dims: &[("dim1", "country"), ("dim2", "platform")],
        measures: &[
            distinct("unique_users", "set1"),
            sum("sign_ups", "c1"),
            distinct("sessions", "set2"),
        ],
        derived: &[],
        minutes: true,
    },
    Model {
        key: "chat",
        name: "chat_rooms",
        dims: &[("dim1", "room_id")],
        measures: &[
            sum("messages", "c1"),
            distinct("unique_chatters", "set1"),
            sum("flagged", "c2"),
        ],
        derived: &[],
        minutes: false,
    },
    Model {
        key: "search",
        name: "searches",
        dims: &[],
        measures: &[
            sum("searches", "c1"),
            sum("zero_results", "c2"),
            sum("latency_sum_ms", "c3"),
            Measure {
                column: "p95_latency_ms",
                function: "quantileExactArray",
                params: "(0.95)",
                argument: "latencies",
                state_type: "AggregateFunction(quantileExactArray(0.95), Array(Int32))",
            },
        ],
        derived: &[("latency_sum_ms / searches", "mean_latency_ms")],
        minutes: false,
    },
    Model {
        key: "queries",
        name: "search_queries",
        dims: &[("dim1", "query")],
        // Zero-result searches per query since migration 3 (0 before it).
        measures: &[sum("searches", "c1"), sum("zero_results", "c2")],
        derived: &[],
        minutes: false,
    },
];

/// Queries per window in `top_queries_per_minute`.
pub const TOP_QUERIES: usize = 10;

/// The model keys the job writes, for its rows.
pub const MODEL_KEYS: [&str; 6] = ["orders", "funnel", "users", "chat", "search", "queries"];
/// The `model` of the row carrying a flush's source offset.
pub const OFFSET_MODEL: &str = "_offset";
/// The `model` of the rows marking the windows a flush wrote partials of
/// (`store::mark_windows`).
pub const WINDOW_MARKER: &str = "_window";

/// How the query service reads a model with the views' own expressions:
/// any grouping over any range, from the partials and the hourly rollup.
#[derive(Debug, Clone)]
pub struct ModelColumns {
    /// (partials column, name) of the dimensions.
    pub dims: &'static [(&'static str, &'static str)],
    pub measures: Vec<MeasureSql>,
    /// (expression over the measures, name), valid once every measure is
    /// selected.
    pub derived: &'static [(&'static str, &'static str)],
}

/// One measure's expressions, each without its alias.
#[derive(Debug, Clone)]
pub struct MeasureSql {
    /// Its name in the views and its column in the rollup.
    pub column: &'static str,
    /// Over the partials.
    pub value: String,
    /// Over compacted hours' rows without `counts`, with the partials'
    /// sets as keys (`Rows::union`).
    pub over_keys: String,
    /// Over [`Rows`] with `counts`.
    pub counted: String,
    /// The same when every row is a compacted hour's ([`Rows::only_hours`]),
    /// each group one row: no aggregate.
    pub from_hours: String,
    /// The partials column it aggregates.
    pub argument: &'static str,
}

/// Whether the closed hours of the model `key` are compacted (those with
/// keys, see `Model::compacted`).
pub fn compacted(key: &str) -> bool {
    MODELS.iter().any(|m| m.key == key && m.compacted())
}

/// Whether the compactions of the model `key` keep its minutes too.
pub fn compacted_per_minute(key: &str) -> bool {
    MODELS
        .iter()
        .any(|m| m.key == key && m.compacted() && m.minutes)
}

/// The columns of the model `key` (see [`MODEL_KEYS`]).
pub fn model_columns(key: &str) -> Option<ModelColumns> {
    let model = MODELS.iter().find(|m| m.key == key)?;
    Some(ModelColumns {
        dims: model.dims,
        measures: model
            .measures
            .iter()
            .map(|m| MeasureSql {
                column: m.column,
                value: m.value(),
                over_keys: m.value_over_keys(),
                counted: m.value_with(true),
                from_hours: m.value_from_hours(),
                argument: m.argument,
            })
            .collect(),
        derived: model.derived,
    })
}

pub fn migrations(target: &Target) -> Vec<Migration> {
    let partials = target.table(PARTIALS_TABLE);
    let mut views = Vec::new();
    for model in &MODELS {
        let (dims_select, dims_group) = (model.dims_select(), model.dims_group());
        let dims_columns: String = model
            .dims
            .iter()
            .map(|(_, c)| format!(", {c} String"))
            .collect();
        views.push(minute_view(target, model));
        let state_table = format!("{}_per_hour_state", model.name);
        let states: Vec<String> = model
            .measures
            .iter()
            .map(|m| format!("{} {}", m.column, m.state_type))
            .collect();
        views.push(target.create_table(
            &state_table,
            &format!("hour DateTime{dims_columns}, {}", states.join(", ")),
            "AggregatingMergeTree()",
            &format!("(hour{dims_group})"),
        ));
        let state_select = model.states();
        views.push(format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {}{} TO {} AS SELECT toStartOfHour(window_start) AS hour{dims_select}, {} FROM {partials} WHERE model = '{}' GROUP BY hour{dims_group}",
            target.table(&format!("{}_per_hour_mv", model.name)),
            target.on_cluster(),
            target.table(&state_table),
            state_select.join(", "),
            model.key
        ));
        views.push(format!(
            "CREATE VIEW IF NOT EXISTS {}{} AS SELECT hour{dims_group}, {} FROM {} GROUP BY hour{dims_group}",
            target.table(&format!("{}_per_hour", model.name)),
            target.on_cluster(),
            model.merged(),
            target.table(&state_table)
        ));
    }
    views.push(top_queries_view(target));
    let mut first = vec![target.create_table(
        PARTIALS_TABLE,
        "model String, window_start DateTime, dim1 String, dim2 String, \
         c1 Int64, c2 Int64, c3 Int64, c4 Int64, c5 Int64, c6 Int64, \
         set1 Array(String), set2 Array(String), latencies Array(Int32), \
         source_topic String, source_partition Int32, last_offset Int64, flushed_at DateTime",
        "MergeTree()",
        // Granules of 1,024 rows, not 8,192: every read of compacted hours
        // or minutes first counts its window markers here, and a read per
        // minute takes the minutes since the last compaction from here, a
        // few hundred rows of each part (ClickHouse 18.16, each statement
        // alone: 1.2-1.3 times the requests/s for the markers, 1.4-1.6 for
        // the partials). A setting a table is created with: a database
        // made before keeps 8,192 (README: how to rebuild it).
        "(model, window_start, dim1, dim2) SETTINGS index_granularity = 1024",
    )];
    first.extend(views);
    vec![
        Migration {
            version: 1,
            name: "partials, read models and hourly rollups",
            statements: first,
            columns: Vec::new(),
        },
        Migration {
            version: 2,
            name: "hourly views over the partials, no materialized views",
            statements: hourly_views_over_the_partials(target),
            columns: Vec::new(),
        },
        Migration {
            version: 3,
            name: "zero-result searches per query",
            statements: zero_result_searches_per_query(target),
            columns: Vec::new(),
        },
        Migration {
            version: 4,
            name: "closed hours compacted from the partials",
            statements: closed_hours(target),
            columns: Vec::new(),
        },
        Migration {
            version: 5,
            name: "the minutes of the compacted hours",
            statements: vec![target.create_table(
                MINUTES_TABLE,
                COMPACTED_COLUMNS,
                "MergeTree()",
                // Time first: a read per minute takes every key of a few
                // minutes, one run of rows (keys first, an hour of revenue
                // per minute and category read 100 runs: a quarter of the
                // requests per second).
                "(model, level, window_start, dim1, dim2) PARTITION BY toYYYYMMDD(window_start) \
                 SETTINGS index_granularity = 1024",
            )],
            columns: Vec::new(),
        },
        Migration {
            version: 6,
            name: "the compacted hours' sets as keys",
            statements: Vec::new(),
            columns: ["set1", "set2"]
                .map(|set| AddedColumn {
                    table: HOURS_TABLE,
                    name: keys_of(set),
                    definition: format!("Array(UUID) MATERIALIZED {}", keys_expression(set)),
                })
                .into(),
        },
        Migration {
            version: 7,
            name: "the rooms' chatters over each day of compacted hours",
            statements: vec![target.create_table(
                DAYS_TABLE,
                "model String, window_start DateTime, dim1 String, d1 UInt64, \
                 covered UInt64, compacted_at DateTime",
                "MergeTree()",
                "(model, window_start, dim1) PARTITION BY toYYYYMMDD(window_start) \
                 SETTINGS index_granularity = 256",
            )],
            columns: Vec::new(),
        },
    ]
}

/// Migration 4: the table of compacted hours, and the hourly views of the
/// models with keys reading each hour from it while its compaction still
/// covers every flush of the hour (`Rows`). Dropped and created again, so
/// every statement can run again.
fn closed_hours(target: &Target) -> Vec<String> {
    let mut statements = vec![target.create_table(
        HOURS_TABLE,
        COMPACTED_COLUMNS,
        "MergeTree()",
        // A day's partition (an hour's compaction is in one, so one part),
        // its keys in order and small granules: some rooms over a day
        // read their own rows, not every room's sets.
        "(model, level, dim1, dim2, window_start) PARTITION BY toYYYYMMDD(window_start) \
         SETTINGS index_granularity = 64",
    )];
    for model in MODELS.iter().filter(|m| m.compacted()) {
        let view = format!("{}_per_hour", model.name);
        statements.push(drop_table(target, &view));
        let rows = Rows {
            model: model.key,
            range: None,
            hours: Some(Level::Key),
            counts: true,
            columns: model.columns(),
            conditions: String::new(),
            current: None,
            minutes: Vec::new(),
            part: Part::Whole,
        };
        statements.push(format!(
            "CREATE VIEW IF NOT EXISTS {}{} AS SELECT toStartOfHour(window_start) AS hour{}, {} {} GROUP BY hour{}",
            target.table(&view),
            target.on_cluster(),
            model.dims_select(),
            model.values_with(true),
            rows.from(target),
            model.dims_group(),
        ));
    }
    statements
}

/// What [`Level::of_own_minute`] adds to a level.
pub const OWN_MINUTE: u8 = 8;

/// Which rows of a closed hour stand for it, in [`Level::table`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Level {
    /// One row per key (the model's dimensions).
    Key = 0,
    /// One row for the whole hour, every key together (models with
    /// dimensions only): distinct counts over all keys without their sets.
    All = 1,
    /// One row per key and minute of the hour (models read per minute,
    /// [`compacted_per_minute`]), in [`MINUTES_TABLE`], `window_start` the
    /// minute: sums and distinct counts as numbers, no sets, so only a
    /// read whose every group is one such row takes them (`Rows::counts`).
    /// An hour of revenue per minute then reads numbers, not a row per
    /// flush with its buyers.
    KeyMinute = 2,
    /// One row per minute of the hour, every key together.
    AllMinute = 3,
    /// One row per minute of the hour and value of the second dimension,
    /// every value of the first together (the revenue of every category
    /// per currency).
    SecondMinute = 4,
}

impl Level {
    /// Whether a row stands for a minute of the hour, not the hour.
    pub fn per_minute(self) -> bool {
        matches!(self, Self::KeyMinute | Self::AllMinute | Self::SecondMinute)
    }

    /// The level whose rows name a compaction holding rows of this one:
    /// a compaction made before the minutes were kept has none of them.
    pub fn naming(self) -> Self {
        if self.per_minute() {
            Self::AllMinute
        } else {
            Self::All
        }
    }

    /// The table holding its rows.
    pub fn table(self) -> &'static str {
        if self.per_minute() {
            MINUTES_TABLE
        } else {
            HOURS_TABLE
        }
    }

    /// This level's value in the rows of a minute's own compaction (a
    /// minute of an hour no compaction covers yet, `crate::hours`): apart
    /// from the minutes of an hour's compaction, which reads look up by the
    /// hour.
    pub fn of_own_minute(self) -> u8 {
        self as u8 + OWN_MINUTE
    }

    /// The hour a row of this level stands in.
    fn hour(self) -> &'static str {
        if self.per_minute() {
            "toStartOfHour(window_start)"
        } else {
            "window_start"
        }
    }
}

/// One model's rows shaped as partials (`window_start` first, then
/// `columns`), for an aggregate over them. With `hours`, each whole hour of
/// the range whose compaction in [`HOURS_TABLE`] covers as many flushes of
/// it as there are now comes from there (its sums, distinct sets and
/// latency lists are the partials' merged, so the same aggregates give the
/// same answers); every other hour from the partials. A flush marks each
/// window it writes in the same insert ([`WINDOW_MARKER`]) and the
/// partials only ever grow, so an equal count of an hour's markers means
/// the same partials: a flush landing after the compaction (a late event,
/// a replica's share) makes the hour read from the partials again until it
/// is compacted again. Of several current compactions of an hour (two
/// replicas, an insert whose answer was lost and made again) one is read,
/// by its id.
#[derive(Debug, Clone)]
pub struct Rows {
    pub model: &'static str,
    /// `[from, to)` of window starts, epoch seconds; `None`: every window.
    pub range: Option<(u32, u32)>,
    pub hours: Option<Level>,
    /// Distinct counts as the compaction's numbers (`d1`, `d2` beside empty
    /// sets, and a `grain` column): only when every group of the aggregate
    /// is one hour (one minute, at a minute level) and one row of `hours`'
    /// level.
    pub counts: bool,
    /// Partials columns besides `window_start`.
    pub columns: Vec<&'static str>,
    /// `AND ...` over the partials' columns, applied to both sources; its
    /// `?` marks come once per source (see [`Rows::sources`]).
    pub conditions: String,
    /// The (hour, compaction id) of the current compactions, read
    /// beforehand by [`Rows::current_sql`], so the markers are counted once
    /// (the SQL alone counts them twice). Each hour is then as it was when
    /// they were read.
    pub current: Option<Vec<(u32, u64)>>,
    /// The (minute, compaction id) of the minutes' own compactions
    /// ([`Level::of_own_minute`]) current now, looked up beforehand by
    /// [`Rows::minutes_sql`], none in a current hour: a read per minute takes
    /// them as it takes a compacted hour's minutes.
    pub minutes: Vec<(u32, u64)>,
    /// Which of the rows: see [`Rows::apart`].
    pub part: Part,
}

/// The rows of a read, or one of its two sources alone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Part {
    /// The current compactions' rows and the partials' others together.
    #[default]
    Whole,
    /// The current compactions' rows alone.
    Compacted,
    /// The partials' rows the current compactions do not hold.
    Partials,
}

impl Rows {
    /// The rows as two reads, of the compactions' rows and of the
    /// partials' others, when they come from both: an aggregate whose every
    /// group lies in one hour (a series) then reads each flat and adds up
    /// the two answers, rather than their UNION ALL, which ClickHouse 18.16
    /// analyzes again at each level around it (the hour before now per
    /// minute and category, 10 minutes of it in the partials: 68 requests/s
    /// in one statement, 337 and 213 in two). Only with the compactions
    /// looked up beforehand (`current`): both reads then split the range
    /// alike, whatever lands between them.
    pub fn apart(&self) -> Option<[Rows; 2]> {
        let apart = self.part == Part::Whole
            && self.current.is_some()
            && self.reads_hours()
            && !self.only_hours();
        apart.then(|| {
            [Part::Compacted, Part::Partials].map(|part| Rows {
                part,
                ..self.clone()
            })
        })
    }

    /// Whether every row comes from compacted hours: the current ones,
    /// read beforehand, cover the whole range.
    pub fn only_hours(&self) -> bool {
        if self.part != Part::Whole {
            return self.part == Part::Compacted;
        }
        match (self.hours, &self.current, self.range) {
            (Some(_), Some(_), Some((from, to))) => {
                let spans = self.compacted_spans();
                !spans.is_empty() && gaps(from, to, spans.into_iter()).is_empty()
            }
            _ => false,
        }
    }

    /// `(start, seconds)` of the current compactions' hours and minutes.
    fn compacted_spans(&self) -> Vec<(u32, u32)> {
        let hours = self.current.iter().flatten().map(|(h, _)| (*h, 3_600));
        hours
            .chain(self.minutes.iter().map(|(m, _)| (*m, 60)))
            .collect()
    }

    /// Whether every group of the aggregate is one row: `counts`, and
    /// every row a current compaction's (one per hour and key). Its
    /// measures then need no aggregate (`MeasureSql::from_hours`), nor
    /// the read a GROUP BY: a day of revenue per hour and category (2,400
    /// groups) costs ClickHouse 18.16 about a quarter less so.
    pub fn one_row_per_group(&self) -> bool {
        self.counts && self.only_hours()
    }

    /// Whether any row may come from compacted hours: with `counts`, the
    /// aggregate then takes their numbers (else the partials' sets).
    /// Rows of a minute are numbers only, read with `counts` and only of
    /// the compactions looked up beforehand (`current`).
    pub fn reads_hours(&self) -> bool {
        self.part != Part::Partials
            && self
                .hours
                .is_some_and(|l| !l.per_minute() || (self.counts && self.current.is_some()))
            && (self.current.as_ref().is_none_or(|c| !c.is_empty()) || !self.minutes.is_empty())
    }

    /// How many times `conditions` appears in [`Rows::sql`].
    pub fn sources(&self) -> usize {
        if !self.reads_hours() || self.only_hours() {
            1
        } else {
            2
        }
    }

    /// `(range, whole hours of the range)` conditions on `window_start`.
    fn ranges(&self) -> (String, String) {
        match self.range {
            Some((from, to)) => (
                format!(
                    " AND window_start >= toDateTime({from}) AND window_start < toDateTime({to})"
                ),
                self.whole_hours("window_start"),
            ),
            None => (String::new(), String::new()),
        }
    }

    /// Whether the read takes each closed hour it overlaps from its
    /// compaction, not only the hours lying wholly in its range: a read per
    /// minute takes the compaction's minutes in the range, so the hour
    /// before now (a "last 60 minutes" dashboard) reads the end of the
    /// previous hour compacted.
    fn by_minute(&self) -> bool {
        self.hours.is_some_and(Level::per_minute)
    }

    /// The window markers' condition on `window_start`: over every hour the
    /// read may take from a compaction, whole (a compaction covers every
    /// flush of its hour), so the hours overlapped by a read by minute.
    fn markers_range(&self) -> String {
        match self.range {
            Some((from, to)) if self.by_minute() => format!(
                " AND window_start >= toStartOfHour(toDateTime({from})) AND window_start < toStartOfHour(toDateTime({})) + 3600",
                to.saturating_sub(1)
            ),
            _ => self.ranges().0,
        }
    }

    /// `AND ...` keeping the hours `column` starts that lie wholly in the
    /// range.
    fn whole_hours(&self, column: &str) -> String {
        self.range.map_or(String::new(), |(from, to)| {
            format!(
                " AND {column} >= toDateTime({from}) AND {column} <= toDateTime({})",
                to.saturating_sub(3_600)
            )
        })
    }

    /// One compaction per whole hour of the range that covers every flush
    /// of its hour now, as `(hour, flushes covered, compaction id)` rows;
    /// for [`Rows::current`]. Each compaction of a model has one row of
    /// every key together ([`Level::All`]): it alone names the compaction,
    /// not the model's every key (200 rooms an hour for the chat).
    /// A read per minute looks up the compactions holding its minutes.
    pub fn current_sql(&self, target: &Target) -> String {
        let naming = self.hours.map_or(Level::All, Level::naming);
        format!(
            "SELECT toUInt32({}) AS hour, covered, min(compaction) {} GROUP BY hour, covered",
            naming.hour(),
            self.current_compactions(target, Some(naming))
        )
    }

    /// The window markers of each hour the read may take from a compaction
    /// (see [`Rows::markers_range`]) now, as `(hour, markers)` rows: a
    /// compaction of the hour is current while it covers that many flushes.
    /// Half the cost of [`Rows::current_sql`] on 18.16, for a reader that
    /// remembers which compaction covered each hour. A read per minute
    /// counts them per minute, as `(hour, minute, markers)` rows: the
    /// minutes' own compactions ([`Rows::minutes_sql`]) are current by them.
    pub fn markers_sql(&self, target: &Target) -> String {
        if self.by_minute() {
            return format!(
                "SELECT toUInt32(toStartOfHour(window_start)) AS hour, toUInt32(window_start) AS minute, count() FROM {} WHERE model = '{WINDOW_MARKER}'{} GROUP BY window_start",
                target.table(PARTIALS_TABLE),
                self.markers_range()
            );
        }
        let whole = self.whole_hours("hour");
        match whole.strip_prefix(" AND ") {
            Some(whole) => format!("{} HAVING {whole}", self.markers_per_hour(target)),
            None => self.markers_per_hour(target),
        }
    }

    /// The minutes' own compactions of the model in the range, as `(minute,
    /// flushes covered, compaction id)` rows, one per minute and count: one
    /// is current while it covers as many flushes as the minute has window
    /// markers (counted per minute by [`Rows::markers_sql`]). Each names its
    /// minute by the row of every key together, as an hour's compaction
    /// does ([`Level::naming`]).
    pub fn minutes_sql(&self, target: &Target) -> String {
        format!(
            "SELECT toUInt32(window_start) AS minute, covered, min(compaction) FROM {} WHERE model = '{}' AND level = {}{} GROUP BY minute, covered",
            target.table(MINUTES_TABLE),
            self.model,
            Level::AllMinute.of_own_minute(),
            self.ranges().0
        )
    }

    /// The SELECT of `(hour, window markers)` of the range's hours.
    fn markers_per_hour(&self, target: &Target) -> String {
        let range = self.markers_range();
        format!(
            "SELECT toStartOfHour(window_start) AS hour, count() FROM {} WHERE model = '{WINDOW_MARKER}'{range} GROUP BY hour",
            target.table(PARTIALS_TABLE)
        )
    }

    /// `FROM ... WHERE ...` of the compactions (their rows of `level`, or
    /// all) of the hours the read may take from one whose flush count is
    /// the hour's window markers now.
    fn current_compactions(&self, target: &Target, level: Option<Level>) -> String {
        let range = if self.by_minute() {
            self.markers_range()
        } else {
            self.rows_range(level.unwrap_or(Level::Key))
        };
        let hour = level.map_or("window_start", Level::hour);
        let table = level.map_or(HOURS_TABLE, Level::table);
        let level = level.map_or(String::new(), |l| format!(" AND level = {}", l as u8));
        format!(
            "FROM {} WHERE model = '{}'{level}{range} AND ({hour}, covered) IN ({})",
            target.table(table),
            self.model,
            self.markers_per_hour(target),
        )
    }

    /// `AND ...` keeping the rows of `level` that stand in the range's
    /// whole hours (its minutes, at a minute level: the compactions' ids
    /// pick their hours).
    fn rows_range(&self, level: Level) -> String {
        let (range, hour_range) = self.ranges();
        if level.per_minute() {
            range
        } else {
            hour_range
        }
    }

    /// A measure's expression over these rows: the partials' sets when no
    /// compacted hour is read; without `counts`, the hours' keys beside the
    /// partials' ids made keys; with them, the hours' own values when only
    /// they are read ([`Rows::one_row_per_group`]), either per group
    /// otherwise.
    pub fn measure<'a>(&self, m: &'a MeasureSql) -> &'a str {
        if !self.reads_hours() {
            &m.value
        } else if !self.counts {
            &m.over_keys
        } else if self.one_row_per_group() {
            &m.from_hours
        } else {
            &m.counted
        }
    }

    /// The rows as the `FROM` of an aggregate over them: straight from the
    /// table when one source holds them all, else from their union.
    /// ClickHouse 18.16 analyzes a nested SELECT again for each level
    /// around it: a flat read of a day's compacted hours costs it about a
    /// third less.
    pub fn from(&self, target: &Target) -> String {
        let partials = target.table(PARTIALS_TABLE);
        let model = self.model;
        let (range, _) = self.ranges();
        if let (Part::Partials, Some(level)) = (self.part, self.hours) {
            return self.each_source(target, level).1;
        }
        let Some(level) = self.hours.filter(|_| self.reads_hours()) else {
            return format!(
                "FROM {partials} WHERE model = '{model}'{range}{}",
                self.conditions
            );
        };
        let (compacted, partials) = self.each_source(target, level);
        if self.only_hours() {
            return compacted;
        }
        format!("FROM ({})", self.union(&compacted, &partials))
    }

    /// `FROM ... WHERE ...` of the hours' rows of the current compactions
    /// (`current`, else chosen by a subquery), and of the partials' other
    /// rows: the range less the compacted hours, as ranges the sort key
    /// serves (a condition on the hour alone would read every partial of
    /// the range), and, when those ranges do not already, a condition
    /// leaving the compacted hours out; both with the read's `conditions`.
    fn each_source(&self, target: &Target, level: Level) -> (String, String) {
        let rows_range = self.rows_range(level);
        // A compaction's id is its hour's (or minute's) alone (random, one
        // per compaction): a set of numbers costs ClickHouse 18.16 less than
        // one of pairs.
        let by_id = |current: &Vec<(u32, u64)>| {
            let ids: Vec<String> = current
                .iter()
                .chain(&self.minutes)
                .map(|(_, c)| c.to_string())
                .collect();
            format!("compaction IN ({})", ids.join(", "))
        };
        let (chosen, partials_range, not_compacted) = match (&self.current, self.range) {
            (Some(current), Some((from, to))) => {
                let gaps: Vec<String> = gaps(from, to, self.compacted_spans().into_iter())
                    .into_iter()
                    .map(|(a, b)| {
                        format!(
                            "window_start >= toDateTime({a}) AND window_start < toDateTime({b})"
                        )
                    })
                    .collect();
                let partials_range = format!(" AND ({})", gaps.join(" OR "));
                (by_id(current), partials_range, String::new())
            }
            (Some(current), None) => {
                let starts: Vec<String> = current.iter().map(|(h, _)| h.to_string()).collect();
                let not_compacted = format!(
                    " AND toUInt32(toStartOfHour(window_start)) NOT IN ({})",
                    starts.join(", ")
                );
                (by_id(current), String::new(), not_compacted)
            }
            (None, _) => {
                let current = self.current_compactions(target, None);
                (
                    format!("(window_start, compaction) IN (SELECT window_start, min(compaction) {current} GROUP BY window_start)"),
                    self.ranges().0,
                    format!(" AND toStartOfHour(window_start) NOT IN (SELECT window_start {current})"),
                )
            }
        };
        let model = self.model;
        let conditions = &self.conditions;
        let levels = if self.minutes.is_empty() {
            format!("level = {}", level as u8)
        } else {
            format!("level IN ({}, {})", level as u8, level.of_own_minute())
        };
        let compacted = format!(
            "FROM {} WHERE model = '{model}' AND {levels}{rows_range} AND {chosen}{conditions}",
            target.table(level.table()),
        );
        let partials = format!(
            "FROM {} WHERE model = '{model}'{partials_range}{conditions}{not_compacted}",
            target.table(PARTIALS_TABLE)
        );
        (compacted, partials)
    }

    /// The compacted hours' rows and the partials' other rows (see
    /// [`Rows::each_source`]), each as `window_start` and `columns`, in one
    /// UNION ALL: a set column as the hours' numbers with `counts`, else as
    /// keys ([`keys_of`]).
    fn union(&self, compacted: &str, partials: &str) -> String {
        let (mut from_hours, mut from_partials) = (Vec::new(), Vec::new());
        for column in &self.columns {
            match (self.counts, *column) {
                (true, "set1" | "set2") => {
                    let count = count_of(column);
                    from_hours.push(format!("emptyArrayString() AS {column}, {count}"));
                    from_partials.push(format!("{column}, toUInt64(0) AS {count}"));
                }
                (false, "set1" | "set2") => {
                    let keys = keys_of(column);
                    from_hours.push(keys.clone());
                    from_partials.push(format!("{} AS {keys}", keys_expression(column)));
                }
                (_, column) => {
                    from_hours.push(column.to_owned());
                    from_partials.push(column.to_owned());
                }
            }
        }
        if self.counts {
            from_hours.push("toUInt8(1) AS grain".to_owned());
            from_partials.push("toUInt8(0) AS grain".to_owned());
        }
        format!(
            "SELECT window_start, {} {compacted} UNION ALL SELECT window_start, {} {partials}",
            from_hours.join(", "),
            from_partials.join(", "),
        )
    }
}

/// `[from, to)` less the `spans` (`(start, seconds)`: hours, minutes), as
/// ranges in order.
fn gaps(from: u32, to: u32, spans: impl Iterator<Item = (u32, u32)>) -> Vec<(u32, u32)> {
    let mut spans: Vec<(u32, u32)> = spans.collect();
    spans.sort_unstable();
    let mut out = Vec::new();
    let mut at = from;
    for (start, seconds) in spans {
        if start > at {
            out.push((at, start.min(to)));
        }
        at = at.max(start.saturating_add(seconds));
    }
    if at < to {
        out.push((at, to));
    }
    out
}

/// How many recent partials inserts a server keeps the tokens of (see
/// [`deduplicating_retries`]): minutes of flushes for many replicas, far
/// longer than an insert can stay unanswered.
pub const DEDUPLICATION_WINDOW: u32 = 10_000;

/// On servers that take `insert_deduplication_token` (22.2 and later, see
/// `store::takes_deduplication_tokens`): the partials keep the tokens of
/// their recent inserts, so an insert made again after an unanswered one
/// lands once however late the first lands. Not a migration: it is chosen
/// by the server's version at each start (18.16 has neither setting), and
/// running it again changes nothing. One server only: Replicated partials
/// on a cluster keep their inserts' tokens already.
pub fn deduplicating_retries(target: &Target) -> String {
    format!(
        "ALTER TABLE {} MODIFY SETTING non_replicated_deduplication_window = {DEDUPLICATION_WINDOW}",
        target.table(PARTIALS_TABLE),
    )
}

/// Migration 3: the search-query views gain `zero_results` (the job writes
/// it in `c2` of the query rows; older rows hold 0 there). Dropped and
/// created again, so every statement can run again.
fn zero_result_searches_per_query(target: &Target) -> Vec<String> {
    let model = MODELS
        .iter()
        .find(|m| m.key == "queries")
        .expect("the queries model");
    vec![
        drop_table(target, "top_queries_per_minute"),
        drop_table(target, "search_queries_per_minute"),
        drop_table(target, "search_queries_per_hour"),
        minute_view(target, model),
        hour_view(target, model),
        top_queries_view(target),
    ]
}

/// The most searched queries of each minute.
fn top_queries_view(target: &Target) -> String {
    format!(
        "CREATE VIEW IF NOT EXISTS {}{} AS SELECT window_start, query, searches FROM {} ORDER BY window_start, searches DESC, query LIMIT {TOP_QUERIES} BY window_start",
        target.table("top_queries_per_minute"),
        target.on_cluster(),
        target.table("search_queries_per_minute"),
    )
}

/// Migration 2: the materialized views and their rollup tables (possibly
/// short after a crash) dropped, the hourly views read the partials. Every
/// statement can run again, so a migration cut short is simply repeated.
fn hourly_views_over_the_partials(target: &Target) -> Vec<String> {
    let mut statements = Vec::new();
    for model in &MODELS {
        let view = format!("{}_per_hour", model.name);
        statements.push(drop_table(target, &format!("{view}_mv")));
        statements.push(drop_table(target, &view));
        statements.push(hour_view(target, model));
        statements.push(drop_table(target, &format!("{view}_state")));
    }
    statements
}

fn drop_table(target: &Target, table: &str) -> String {
    format!(
        "DROP TABLE IF EXISTS {}{}",
        target.table(table),
        target.on_cluster()
    )
}

/// A model's figures per minute: its partials added up.
fn minute_view(target: &Target, model: &Model) -> String {
    grain_view(target, model, "per_minute", "window_start", "window_start")
}

/// A model's figures per hour: its partials added up by hour.
fn hour_view(target: &Target, model: &Model) -> String {
    grain_view(
        target,
        model,
        "per_hour",
        "toStartOfHour(window_start) AS hour",
        "hour",
    )
}

fn grain_view(target: &Target, model: &Model, suffix: &str, select: &str, group: &str) -> String {
    format!(
        "CREATE VIEW IF NOT EXISTS {}{} AS SELECT {select}{}, {} FROM {} WHERE model = '{}' GROUP BY {group}{}",
        target.table(&format!("{}_{suffix}", model.name)),
        target.on_cluster(),
        model.dims_select(),
        model.values(),
        target.table(PARTIALS_TABLE),
        model.key,
        model.dims_group(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_model_has_a_window_view_an_hourly_rollup_and_a_reader() {
        let target = Target::new("shop", None).unwrap();
        let all = migrations(&target);
        let statements = &all[0].statements;
        assert_eq!(statements.len(), 1 + 4 * MODELS.len() + 1);
        assert!(
            statements[0].contains("`shop`.`analytics_partials`")
                && !statements[0].contains("PARTITION BY")
        );
        let orders: Vec<&String> = statements
            .iter()
            .filter(|s| s.contains("`orders_per_"))
            .collect();
        assert_eq!(orders.len(), 4, "{orders:#?}");
        assert!(orders[0].ends_with("FROM `shop`.`analytics_partials` WHERE model = 'orders' GROUP BY window_start, category, currency"), "{}", orders[0]);
        assert!(orders[2].contains("TO `shop`.`orders_per_hour_state` AS SELECT toStartOfHour(window_start) AS hour, dim1 AS category"), "{}", orders[2]);
        let searches: Vec<&String> = statements
            .iter()
            .filter(|s| s.contains("`searches_per_minute`") || s.contains("`searches_per_hour`"))
            .collect();
        assert!(searches
            .iter()
            .all(|s| s.contains("latency_sum_ms / searches AS mean_latency_ms")));
        for key in MODEL_KEYS {
            assert!(MODELS.iter().any(|m| m.key == key));
        }
    }

    #[test]
    fn a_compacted_model_has_only_sums_and_distinct_counts() {
        // A read of compacted rows, one per group, takes each measure's
        // row form (`value_from_hours`) with no GROUP BY.
        for model in MODELS.iter().filter(|m| m.compacted()) {
            for m in model.measures {
                assert!(
                    m.function == "sum" || m.function == "uniqExactArray",
                    "{}.{}",
                    model.key,
                    m.column
                );
                assert!(!m.value_from_hours().contains('('), "{}", m.column);
            }
        }
    }

    #[test]
    fn migration_2_reads_hours_from_the_partials_and_drops_the_rollups() {
        let target = Target::new("shop", Some("prod")).unwrap();
        let all = migrations(&target);
        assert_eq!(
            all.iter().map(|m| m.version).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5, 6, 7]
        );
        let statements = &all[1].statements;
        // Per model: its materialized view dropped, its hourly view dropped
        // and created again, its rollup table dropped.
        assert_eq!(statements.len(), 4 * MODELS.len());
        assert_eq!(
            statements[..4],
            [
                "DROP TABLE IF EXISTS `shop`.`orders_per_hour_mv` ON CLUSTER `prod`",
                "DROP TABLE IF EXISTS `shop`.`orders_per_hour` ON CLUSTER `prod`",
                "CREATE VIEW IF NOT EXISTS `shop`.`orders_per_hour` ON CLUSTER `prod` AS SELECT toStartOfHour(window_start) AS hour, dim1 AS category, dim2 AS currency, sum(c1) AS orders, sum(c2) AS items, sum(c3) AS revenue_minor, uniqExactArray(set1) AS unique_buyers FROM `shop`.`analytics_partials` WHERE model = 'orders' GROUP BY hour, category, currency",
                "DROP TABLE IF EXISTS `shop`.`orders_per_hour_state` ON CLUSTER `prod`",
            ]
        );
        assert!(!statements.iter().any(|s| s.contains("MATERIALIZED")));
    }

    #[test]
    fn the_partials_are_read_around_the_compacted_hours_and_minutes() {
        let hours = |starts: &[u32]| starts.iter().map(|h| (*h, 3_600)).collect::<Vec<_>>();
        assert_eq!(
            gaps(600, 11_000, hours(&[3_600, 7_200]).into_iter()),
            [(600, 3_600), (10_800, 11_000)]
        );
        assert_eq!(
            gaps(3_600, 10_800, hours(&[7_200, 3_600]).into_iter()),
            Vec::<(u32, u32)>::new()
        );
        assert_eq!(
            gaps(0, 10_800, hours(&[3_600]).into_iter()),
            [(0, 3_600), (7_200, 10_800)]
        );
        assert_eq!(gaps(0, 100, std::iter::empty()), [(0, 100)]);
        // Minutes of their own beside an hour.
        assert_eq!(
            gaps(
                3_000,
                7_300,
                [(3_600, 3_600), (3_120, 60), (3_000, 60), (7_200, 60)].into_iter()
            ),
            [(3_060, 3_120), (3_180, 3_600), (7_260, 7_300)]
        );
    }

    #[test]
    fn a_compacted_minute_is_read_only_as_counts_of_compactions_looked_up() {
        let target = Target::new("shop", None).unwrap();
        let rows = |counts, current: Option<Vec<(u32, u64)>>| Rows {
            model: "orders",
            range: Some((3_600, 10_800)),
            hours: Some(Level::KeyMinute),
            counts,
            columns: vec!["dim1", "set1"],
            conditions: String::new(),
            current,
            minutes: Vec::new(),
            part: Part::Whole,
        };
        let whole = rows(true, Some(vec![(3_600, 41), (7_200, 42)]));
        assert!(whole.reads_hours() && whole.one_row_per_group());
        assert!(whole
            .from(&target)
            .starts_with("FROM `shop`.`analytics_minutes` WHERE model = 'orders' AND level = 2"));
        // Minutes hold no sets, and no lookup in SQL names their compactions.
        for partials in [rows(false, whole.current.clone()), rows(true, None)] {
            assert!(!partials.reads_hours());
            assert!(partials
                .from(&target)
                .starts_with("FROM `shop`.`analytics_partials`"));
        }
        // Their compactions are looked up by the minutes' own rows.
        assert!(whole.current_sql(&target).starts_with(
            "SELECT toUInt32(toStartOfHour(window_start)) AS hour, covered, min(compaction) \
             FROM `shop`.`analytics_minutes` WHERE model = 'orders' AND level = 3"
        ));
        // An hour and two minutes of their own compactions: both levels,
        // every compaction by id, the rest of the range from the partials.
        let minutes = Rows {
            range: Some((3_600, 7_320)),
            minutes: vec![(7_200, 51), (7_260, 52)],
            ..rows(true, Some(vec![(3_600, 41)]))
        };
        assert!(minutes.one_row_per_group());
        assert_eq!(
            minutes.from(&target),
            "FROM `shop`.`analytics_minutes` WHERE model = 'orders' AND level IN (2, 10) \
             AND window_start >= toDateTime(3600) AND window_start < toDateTime(7320) \
             AND compaction IN (41, 51, 52)"
        );
        assert_eq!(
            minutes.minutes_sql(&target),
            "SELECT toUInt32(window_start) AS minute, covered, min(compaction) \
             FROM `shop`.`analytics_minutes` WHERE model = 'orders' AND level = 11 \
             AND window_start >= toDateTime(3600) AND window_start < toDateTime(7320) \
             GROUP BY minute, covered"
        );
        let [_, partials] = Rows {
            minutes: vec![(7_200, 51)],
            ..minutes
        }
        .apart()
        .expect("from both");
        assert!(partials
            .from(&target)
            .ends_with("WHERE model = 'orders' AND (window_start >= toDateTime(7260) AND window_start < toDateTime(7320))"));
    }

    #[test]
    fn migration_4_reads_each_hour_from_its_compaction_while_it_covers_every_flush() {
        let target = Target::new("shop", None).unwrap();
        let statements = &migrations(&target)[3].statements;
        assert!(statements[0].starts_with("CREATE TABLE IF NOT EXISTS `shop`.`analytics_hours`"));
        // Partitioned by day: an hour's compaction is in one partition, one part.
        assert!(statements[0].contains(
            "ORDER BY (model, level, dim1, dim2, window_start) PARTITION BY toYYYYMMDD(window_start)"
        ));
        // The views of the models with keys (not the funnel's, the searches').
        assert_eq!(statements.len(), 1 + 2 * 4);
        assert_eq!(
            statements[1],
            "DROP TABLE IF EXISTS `shop`.`orders_per_hour`"
        );
        let orders = &statements[2];
        assert_eq!(
            orders,
            "CREATE VIEW IF NOT EXISTS `shop`.`orders_per_hour` AS SELECT toStartOfHour(window_start) AS hour, dim1 AS category, dim2 AS currency, \
             sum(c1) AS orders, sum(c2) AS items, sum(c3) AS revenue_minor, if(max(grain) = 1, sum(d1), uniqExactArray(set1)) AS unique_buyers \
             FROM (SELECT window_start, dim1, dim2, c1, c2, c3, emptyArrayString() AS set1, d1, toUInt8(1) AS grain \
             FROM `shop`.`analytics_hours` WHERE model = 'orders' AND level = 0 AND (window_start, compaction) IN \
             (SELECT window_start, min(compaction) FROM `shop`.`analytics_hours` WHERE model = 'orders' AND (window_start, covered) IN \
             (SELECT toStartOfHour(window_start) AS hour, count() FROM `shop`.`analytics_partials` WHERE model = '_window' GROUP BY hour) GROUP BY window_start) \
             UNION ALL SELECT window_start, dim1, dim2, c1, c2, c3, set1, toUInt64(0) AS d1, toUInt8(0) AS grain FROM `shop`.`analytics_partials` WHERE model = 'orders' \
             AND toStartOfHour(window_start) NOT IN (SELECT window_start FROM `shop`.`analytics_hours` WHERE model = 'orders' AND (window_start, covered) IN \
             (SELECT toStartOfHour(window_start) AS hour, count() FROM `shop`.`analytics_partials` WHERE model = '_window' GROUP BY hour))) \
             GROUP BY hour, category, currency"
        );
    }
}
