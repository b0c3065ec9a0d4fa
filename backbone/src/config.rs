//! One configuration model for every binary: a YAML file, then `SHOPSTREAM_*`
//! environment variables, then command-line flags, each overriding the last.
//! Unknown fields are errors wherever they come from, and every error names
//! its source: file and line, or the variable or flag.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};

pub use crate::telemetry::{LogFormat, TelemetrySettings};
use crate::yaml::{deserialize_value, Problem, Problems, YamlDocument};

/// Prefix of environment overrides; `__` separates nesting levels, as in
/// `SHOPSTREAM_KAFKA__BOOTSTRAP_SERVERS`.
pub const ENV_PREFIX: &str = "SHOPSTREAM_";

/// Settings shared by every shopstream binary.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The Kafka cluster and client settings.
    pub kafka: KafkaSettings,
    /// The ClickHouse server holding the read models.
    pub clickhouse: ClickHouseSettings,
    /// Where the topic catalog is and which profile of it applies.
    pub catalog: CatalogSettings,
    /// Log format and verbosity.
    pub telemetry: TelemetrySettings,
    /// The consumer-group runtime (shopstream-worker).
    pub worker: WorkerSettings,
    /// The windowed aggregation job (shopstream-analytics).
    pub analytics: AnalyticsSettings,
    /// The read-model HTTP API and dashboard (shopstream-query).
    pub query: QuerySettings,
}

/// shopstream-query: the read models over HTTP, and the dashboard.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuerySettings {
    /// Address of the API, the dashboard and /healthz, /readyz, /metrics.
    pub listen_address: String,
    /// A ClickHouse query taking longer is cancelled and answered with 503.
    pub query_timeout_ms: u64,
    /// `Cache-Control: max-age` of successful answers; the dashboard
    /// refreshes at this pace too.
    pub cache_max_age_s: u32,
    /// Who may read: off by default, for local use.
    pub auth: QueryAuthSettings,
}

/// Bearer tokens for shopstream-query's API, OpenAPI document and dashboard.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueryAuthSettings {
    /// Accepted tokens, one per line, or `sha256:` and a token's SHA-256 in
    /// hex; `#` starts a comment. Re-read when it changes. Unset: no auth.
    pub tokens_file: Option<std::path::PathBuf>,
}

impl Default for QuerySettings {
    fn default() -> Self {
        Self {
            listen_address: "127.0.0.1:8080".into(),
            query_timeout_ms: 5_000,
            cache_max_age_s: 5,
            auth: QueryAuthSettings::default(),
        }
    }
}

/// What the analytics job does with an event older than the watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LateEvents {
    /// Add it to its window anyway (windows are additive, so it just adds).
    Add,
    /// Send it to `analytics.late_topic` instead.
    Divert,
}

/// shopstream-analytics: event-time windows into ClickHouse read models.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnalyticsSettings {
    /// Kafka consumer group of the job's replicas.
    pub group_id: String,
    /// Tumbling window size; a whole number of seconds.
    pub window_ms: i64,
    /// The watermark trails the latest event time by this much.
    pub allowed_lateness_ms: i64,
    /// Each Kafka partition's partial aggregates go to ClickHouse this often.
    pub flush_interval_ms: u64,
    /// `add` or `divert`.
    pub late_events: LateEvents,
    /// Where `divert` sends late events.
    pub late_topic: String,
    /// Address of /healthz, /readyz and /metrics.
    pub metrics_address: String,
    /// How often closed hours are compacted for fast day-long reads; 0: never.
    pub compact_every_ms: u64,
    /// An hour is compacted once none of its partials was flushed for this
    /// long. Until then every day-long read takes that hour from its
    /// partials, several times slower; a flush landing after the
    /// compaction costs compacting the hour again.
    pub compact_after_idle_ms: u64,
    /// Each minute of the hour not over yet and of the one before is
    /// compacted on its own once none of its partials was flushed for this
    /// long: the reads per minute of the hour before now take the minutes
    /// since from the partials, a row per flush and key with its sets.
    pub compact_minutes_after_idle_ms: u64,
    /// Between the rounds of `compact_every_ms`, the idle minutes are
    /// compacted this often; 0: only in those rounds.
    pub compact_minutes_every_ms: u64,
    /// Hours starting this long ago or later are compacted; older ones are read
    /// from their partials.
    pub compact_lookback_h: u32,
}

impl Default for AnalyticsSettings {
    fn default() -> Self {
        Self {
            group_id: "shopstream-analytics".into(),
            window_ms: 60_000,
            allowed_lateness_ms: 30_000,
            flush_interval_ms: 1_000,
            late_events: LateEvents::Add,
            late_topic: "late-events".into(),
            metrics_address: "127.0.0.1:9465".into(),
            compact_every_ms: 60_000,
            compact_after_idle_ms: 60_000,
            compact_minutes_after_idle_ms: 10_000,
            compact_minutes_every_ms: 10_000,
            compact_lookback_h: 48,
        }
    }
}

/// The consumer-group runtime: batching, retries, dead-lettering, draining.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSettings {
    /// Kafka consumer group; workers with the same id share the partitions.
    pub group_id: String,
    /// Handlers to run, by name (see the worker's `--handler`).
    pub handlers: Vec<String>,
    /// The catalog's event topics to consume, each with its retry tiers
    /// (see the worker's `--topic`); empty for every one. A worker that
    /// names its topics fetches no others: every fetch request carries every
    /// subscribed partition, empty or not.
    pub topics: Vec<String>,
    /// A batch closes at this many records...
    pub batch_max_records: usize,
    /// ...or this many payload bytes...
    pub batch_max_bytes: usize,
    /// ...or when its first record has waited this long.
    pub batch_linger_ms: u64,
    /// Handler attempts in place (the first included) before a record moves
    /// to the next retry tier, or the DLQ when there is none.
    pub retry_attempts: u32,
    /// First backoff between attempts; doubles each time, with jitter.
    pub retry_base_delay_ms: u64,
    /// Longest backoff between two attempts.
    pub retry_max_delay_ms: u64,
    /// Time budget for in-place retries of one batch, whatever the attempts.
    pub retry_max_elapsed_ms: u64,
    /// Partitions handled at the same time, at most.
    pub concurrency: usize,
    /// Records taken and not yet done, per partition, before it is held back.
    pub max_in_flight_records: usize,
    /// Payload bytes taken and not yet done, per partition, before it is held back.
    pub max_in_flight_bytes: usize,
    /// How long SIGTERM waits for in-flight batches before abandoning them
    /// (uncommitted, so they are redelivered).
    pub drain_timeout_ms: u64,
    /// Kafka commit interval for stored offsets.
    pub commit_interval_ms: u64,
    /// Address of /healthz, /readyz and /metrics.
    pub metrics_address: String,
    /// `dlq replay` refuses records already replayed this many times.
    pub max_replays: u32,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            group_id: "shopstream-worker".into(),
            handlers: Vec::new(),
            topics: Vec::new(),
            batch_max_records: 500,
            batch_max_bytes: 1 << 20,
            batch_linger_ms: 50,
            retry_attempts: 5,
            retry_base_delay_ms: 100,
            retry_max_delay_ms: 10_000,
            retry_max_elapsed_ms: 60_000,
            concurrency: 16,
            max_in_flight_records: 1_000,
            max_in_flight_bytes: 4 << 20,
            drain_timeout_ms: 10_000,
            commit_interval_ms: 1_000,
            metrics_address: "127.0.0.1:9464".into(),
            max_replays: 3,
        }
    }
}

/// The bootstrap value that selects librdkafka's embedded mock cluster.
pub const EMBEDDED: &str = "embedded://";

/// How to reach Kafka.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSettings {
    /// `host:port,...` of any Kafka-compatible cluster, or `embedded://` for
    /// librdkafka's in-process mock cluster with the catalog's topics on it.
    pub bootstrap_servers: String,
    /// Upper bound on any one request to the cluster, so an unreachable
    /// broker is an error rather than a hang.
    pub request_timeout_ms: u64,
    /// How long records missing from a fetch must stay missing before the
    /// gap is taken as real (compaction, transaction markers, retention)
    /// and the partition goes on; until then it is fetched again. tansu
    /// 0.6.0 numbers a record before it stores it, so a fetch in between
    /// skips it. 0 takes a gap seen on two fetches in a row.
    pub gap_confirmation_ms: u64,
    /// Extra librdkafka properties passed through unchanged, such as
    /// `security.protocol`, `sasl.*` and `ssl.*`. Secret values are redacted
    /// from logs and debug output.
    pub client: ClientProperties,
}

impl KafkaSettings {
    /// `gap_confirmation_ms` as a duration.
    pub fn gap_confirmation(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.gap_confirmation_ms)
    }
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            bootstrap_servers: EMBEDDED.to_owned(),
            request_timeout_ms: 10_000,
            gap_confirmation_ms: 2_000,
            client: ClientProperties::default(),
        }
    }
}

/// How to reach ClickHouse.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseSettings {
    /// HTTP interface URL.
    pub url: String,
    /// Database holding shopstream's tables.
    pub database: String,
    pub user: String,
    /// Set it through `SHOPSTREAM_CLICKHOUSE__PASSWORD` rather than a file.
    pub password: Secret,
    /// LZ4 over HTTP. Off by default: ClickHouse 18.16 silently returns no
    /// rows to the client's compressed reads.
    pub compression: bool,
    /// A cluster name from the server's `remote_servers`: DDL then runs
    /// `ON CLUSTER` with Replicated engines.
    pub cluster: Option<String>,
    /// An insert into a table closes after this long...
    pub insert_period_ms: u64,
    /// ...or at this many rows...
    pub insert_max_rows: usize,
    /// ...or this many bytes, whichever comes first.
    pub insert_max_bytes: usize,
    /// Upper bound on one request, so a hung server is an error, not a hang.
    pub timeout_ms: u64,
}

impl Default for ClickHouseSettings {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8123".into(),
            database: "shopstream".into(),
            user: "default".into(),
            password: Secret::default(),
            compression: false,
            cluster: None,
            insert_period_ms: 1_000,
            insert_max_rows: 100_000,
            insert_max_bytes: 16 << 20,
            timeout_ms: 30_000,
        }
    }
}

/// Which topic catalog applies.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CatalogSettings {
    /// Path of `topics.yaml`.
    pub path: PathBuf,
    /// Profile applied on top of the base catalog, such as `dev`.
    pub profile: Option<String>,
}

impl Default for CatalogSettings {
    fn default() -> Self {
        Self {
            path: PathBuf::from("topics.yaml"),
            profile: None,
        }
    }
}

/// A value never shown in logs or debug output.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for handing to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "\"<redacted>\""
        })
    }
}

/// librdkafka properties passed through to every client.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct ClientProperties(pub BTreeMap<String, String>);

impl ClientProperties {
    /// Whether a property holds a credential. librdkafka names them all with
    /// one of these words.
    pub fn is_sensitive(key: &str) -> bool {
        [
            "password",
            "secret",
            "jaas",
            "key.pem",
            "token",
            "credential",
        ]
        .iter()
        .any(|word| key.contains(word))
    }
}

impl fmt::Debug for ClientProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| {
                let shown = if Self::is_sensitive(k) {
                    "<redacted>"
                } else {
                    v.as_str()
                };
                (k, shown)
            }))
            .finish()
    }
}

/// Command-line flags every binary accepts; they override file and environment.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArgs {
    /// YAML configuration file.
    #[arg(long, global = true, value_name = "FILE", env = "SHOPSTREAM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Kafka bootstrap servers, or `embedded://`.
    #[arg(long, global = true, value_name = "SERVERS")]
    pub brokers: Option<String>,
    /// Catalog profile, such as `dev`.
    #[arg(long, global = true, value_name = "NAME")]
    pub profile: Option<String>,
    /// Log output format.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Any setting by path, such as `--set clickhouse.database=analytics`.
    #[arg(long = "set", global = true, value_name = "PATH=VALUE")]
    pub overrides: Vec<String>,
}

impl Config {
    /// Loads the file named by `args` (if any), then the process environment,
    /// then the flags.
    pub fn load(args: &ConfigArgs) -> Result<Self, Problems> {
        Self::load_from(args, std::env::vars())
    }

    /// As [`Config::load`], with the environment given, for tests.
    pub fn load_from(
        args: &ConfigArgs,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, Problems> {
        let mut layers = Layers::default();
        if let Some(path) = &args.config {
            layers.file(path)?;
        }
        let mut env: Vec<_> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        env.sort();
        for (name, value) in env {
            if name == "SHOPSTREAM_CONFIG" {
                continue;
            }
            let path = env_path(&name[ENV_PREFIX.len()..]);
            layers.set(&path, &value, format!("environment variable {name}"))?;
        }
        let flags = [
            ("kafka.bootstrap_servers", args.brokers.clone(), "--brokers"),
            ("catalog.profile", args.profile.clone(), "--profile"),
            (
                "telemetry.log_format",
                args.log_format.map(|f| format!("{f:?}").to_lowercase()),
                "--log-format",
            ),
        ];
        for (path, value, flag) in flags {
            if let Some(value) = value {
                layers.set(path, &value, format!("flag {flag}"))?;
            }
        }
        for item in &args.overrides {
            let Some((path, value)) = item.split_once('=') else {
                return Err(Problems(vec![Problem {
                    origin: format!("flag --set {item}"),
                    line: None,
                    field: String::new(),
                    message: "expected PATH=VALUE, such as clickhouse.database=analytics".into(),
                }]));
            };
            layers.set(path.trim(), value, format!("flag --set {item}"))?;
        }
        layers.build()
    }

    /// The catalog path, resolved against the config file's folder when relative.
    /// What every binary starts from: the configuration, logging set up
    /// from it, and the topic catalog it names (with that catalog's path).
    /// Errors say which of the two is invalid, with every problem.
    pub fn load_with_catalog(
        args: &ConfigArgs,
    ) -> Result<(Self, crate::catalog::Catalog, PathBuf), String> {
        let config = Self::load(args).map_err(|p| format!("invalid configuration:\n{p}"))?;
        crate::telemetry::init(&config.telemetry);
        let path = config.catalog_path(args);
        let catalog = crate::catalog::Catalog::load(&path, config.catalog.profile.as_deref())
            .map_err(|p| format!("invalid topic catalog:\n{p}"))?;
        Ok((config, catalog, path))
    }

    pub fn catalog_path(&self, args: &ConfigArgs) -> PathBuf {
        match (&args.config, self.catalog.path.is_relative()) {
            (Some(file), true) => file
                .parent()
                .unwrap_or(Path::new("."))
                .join(&self.catalog.path),
            _ => self.catalog.path.clone(),
        }
    }
}

/// `KAFKA__CLIENT__SASL_PASSWORD` -> `kafka.client.sasl.password`: librdkafka
/// property names use dots where variable names cannot.
fn env_path(rest: &str) -> String {
    let parts: Vec<String> = rest.split("__").map(str::to_lowercase).collect();
    match parts.as_slice() {
        [kafka, client, property] if kafka == "kafka" && client == "client" => {
            format!("kafka.client.{}", property.replace('_', "."))
        }
        _ => parts.join("."),
    }
}

/// The merged YAML tree, remembering where each overridden value came from.
#[derive(Default)]
struct Layers {
    tree: Mapping,
    file: Option<YamlDocument>,
    origins: Vec<(String, String)>,
}

impl Layers {
    fn file(&mut self, path: &Path) -> Result<(), Problems> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            Problems(vec![Problem {
                origin: origin.clone(),
                line: None,
                field: String::new(),
                message: format!("cannot read the configuration file: {e}"),
            }])
        })?;
        let doc = YamlDocument::parse(origin, &text).map_err(|p| Problems(vec![p]))?;
        match &doc.value {
            Value::Mapping(map) => self.tree = map.clone(),
            _ => {
                return Err(Problems(vec![
                    doc.problem("", "expected a mapping of settings")
                ]))
            }
        }
        self.file = Some(doc);
        Ok(())
    }

    /// Sets a dotted path (the last segment may itself contain dots only
    /// under `kafka.client`) to a value parsed as a YAML scalar, or a flow
    /// sequence such as `[orders, chat-messages]` for a list setting.
    fn set(&mut self, path: &str, raw: &str, origin: String) -> Result<(), Problems> {
        let value = match serde_yaml::from_str::<Value>(raw) {
            Ok(v @ (Value::Bool(_) | Value::Number(_) | Value::String(_) | Value::Sequence(_))) => {
                v
            }
            _ => Value::String(raw.to_owned()),
        };
        let (head, leaf) = match path.strip_prefix("kafka.client.") {
            Some(property) => (vec!["kafka", "client"], property),
            None => {
                let mut parts: Vec<&str> = path.split('.').collect();
                let leaf = parts.pop().unwrap_or_default();
                (parts, leaf)
            }
        };
        let mut node = &mut self.tree;
        for part in head {
            let entry = node
                .entry(Value::String(part.to_owned()))
                .or_insert_with(|| Value::Mapping(Mapping::new()));
            if !entry.is_mapping() {
                *entry = Value::Mapping(Mapping::new());
            }
            node = entry.as_mapping_mut().expect("just made a mapping");
        }
        // `kafka.client` values are strings to librdkafka.
        let value = if path.starts_with("kafka.client.") {
            Value::String(raw.to_owned())
        } else {
            value
        };
        node.insert(Value::String(leaf.to_owned()), value);
        self.origins.push((path.to_owned(), origin));
        Ok(())
    }

    fn build(self) -> Result<Config, Problems> {
        let config: Config =
            deserialize_value(Value::Mapping(self.tree)).map_err(|(field, message)| {
                let overridden = self
                    .origins
                    .iter()
                    .rev()
                    .find(|(path, _)| field == *path || field.starts_with(&format!("{path}.")));
                let problem = match (overridden, &self.file) {
                    (Some((_, origin)), _) => Problem {
                        origin: origin.clone(),
                        line: None,
                        field: field.clone(),
                        message,
                    },
                    (None, Some(doc)) => doc.problem(field, message),
                    (None, None) => Problem {
                        origin: "configuration".into(),
                        line: None,
                        field,
                        message,
                    },
                };
                Problems(vec![problem])
            })?;
        config.check(self.file.as_ref())?;
        Ok(config)
    }
}

impl Config {
    /// Cross-field checks that types alone cannot express.
    fn check(&self, file: Option<&YamlDocument>) -> Result<(), Problems> {
        let mut problems = Vec::new();
        let mut problem = |field: &str, message: String| {
            problems.push(match file {
                Some(doc) => doc.problem(field, message),
                None => Problem {
                    origin: "configuration".into(),
                    line: None,
                    field: field.into(),
                    message,
                },
            })
        };
        if self.kafka.bootstrap_servers.trim().is_empty() {
            problem(
                "kafka.bootstrap_servers",
                "must name host:port pairs, or embedded:// for the in-process cluster".into(),
            );
        }
        if self.kafka.request_timeout_ms == 0 {
            problem("kafka.request_timeout_ms", "must be more than 0".into());
        }
        for key in self.kafka.client.0.keys() {
            let owned = [
                "bootstrap.servers",
                "group.id",
                "enable.auto.commit",
                "enable.auto.offset.store",
            ];
            if owned.contains(&key.as_str()) {
                problem(
                    &format!("kafka.client.{key}"),
                    format!("{key} is managed by shopstream; use kafka.bootstrap_servers or the binary's own settings"),
                );
            }
        }
        if !(self.clickhouse.url.starts_with("http://")
            || self.clickhouse.url.starts_with("https://"))
        {
            problem(
                "clickhouse.url",
                format!(
                    "must be an http:// or https:// URL, got {:?}",
                    self.clickhouse.url
                ),
            );
        }
        if let Err(why) = crate::sql::check_identifier(&self.clickhouse.database) {
            problem("clickhouse.database", why);
        }
        if let Some(Err(why)) = self
            .clickhouse
            .cluster
            .as_deref()
            .map(crate::sql::check_identifier)
        {
            problem("clickhouse.cluster", why);
        }
        let c = &self.clickhouse;
        for (field, value, min, max) in [
            (
                "clickhouse.insert_period_ms",
                c.insert_period_ms,
                10,
                600_000,
            ),
            (
                "clickhouse.insert_max_rows",
                c.insert_max_rows as u64,
                1,
                1_000_000,
            ),
            (
                "clickhouse.insert_max_bytes",
                c.insert_max_bytes as u64,
                1_024,
                1 << 30,
            ),
            ("clickhouse.timeout_ms", c.timeout_ms, 100, 3_600_000),
        ] {
            if !(min..=max).contains(&value) {
                problem(field, format!("must be from {min} to {max}, got {value}"));
            }
        }
        let w = &self.worker;
        if w.group_id.trim().is_empty() {
            problem("worker.group_id", "must not be empty".into());
        }
        for (field, value, min, max) in [
            (
                "worker.batch_max_records",
                w.batch_max_records as u64,
                1,
                100_000,
            ),
            (
                "worker.batch_max_bytes",
                w.batch_max_bytes as u64,
                1_024,
                256 << 20,
            ),
            (
                "worker.retry_attempts",
                u64::from(w.retry_attempts),
                1,
                1_000,
            ),
            ("worker.concurrency", w.concurrency as u64, 1, 4_096),
            (
                "worker.max_in_flight_records",
                w.max_in_flight_records as u64,
                1,
                10_000_000,
            ),
            (
                "worker.max_in_flight_bytes",
                w.max_in_flight_bytes as u64,
                1_024,
                4 << 30,
            ),
            (
                "worker.commit_interval_ms",
                w.commit_interval_ms,
                10,
                3_600_000,
            ),
        ] {
            if !(min..=max).contains(&value) {
                problem(field, format!("must be from {min} to {max}, got {value}"));
            }
        }
        if w.retry_base_delay_ms > w.retry_max_delay_ms {
            problem(
                "worker.retry_base_delay_ms",
                format!(
                    "{} is above retry_max_delay_ms {}",
                    w.retry_base_delay_ms, w.retry_max_delay_ms
                ),
            );
        }
        let a = &self.analytics;
        if a.window_ms < 1_000 || a.window_ms % 1_000 != 0 || a.window_ms > 86_400_000 {
            problem(
                "analytics.window_ms",
                format!(
                    "must be whole seconds from 1000 to 86400000, got {}",
                    a.window_ms
                ),
            );
        }
        if a.allowed_lateness_ms < 0 {
            problem(
                "analytics.allowed_lateness_ms",
                format!("must not be negative, got {}", a.allowed_lateness_ms),
            );
        }
        if !(10..=600_000).contains(&a.flush_interval_ms) {
            problem(
                "analytics.flush_interval_ms",
                format!("must be from 10 to 600000, got {}", a.flush_interval_ms),
            );
        }
        for (field, every, zero) in [
            ("analytics.compact_every_ms", a.compact_every_ms, "never"),
            (
                "analytics.compact_minutes_every_ms",
                a.compact_minutes_every_ms,
                "with the hours only",
            ),
        ] {
            if every != 0 && !(100..=86_400_000).contains(&every) {
                problem(
                    field,
                    format!("must be 0 ({zero}) or from 100 to 86400000, got {every}"),
                );
            }
        }
        for (field, idle) in [
            ("analytics.compact_after_idle_ms", a.compact_after_idle_ms),
            (
                "analytics.compact_minutes_after_idle_ms",
                a.compact_minutes_after_idle_ms,
            ),
        ] {
            if idle > 86_400_000 {
                problem(
                    field,
                    format!("must be at most 86400000 (a day), got {idle}"),
                );
            }
        }
        if !(1..=1_000_000).contains(&a.compact_lookback_h) {
            problem(
                "analytics.compact_lookback_h",
                format!("must be from 1 to 1000000, got {}", a.compact_lookback_h),
            );
        }
        if a.metrics_address.parse::<std::net::SocketAddr>().is_err() {
            problem(
                "analytics.metrics_address",
                format!(
                    "must be host:port such as 0.0.0.0:9465, got {:?}",
                    a.metrics_address
                ),
            );
        }
        if w.metrics_address.parse::<std::net::SocketAddr>().is_err() {
            problem(
                "worker.metrics_address",
                format!(
                    "must be host:port such as 0.0.0.0:9464, got {:?}",
                    w.metrics_address
                ),
            );
        }
        let q = &self.query;
        if q.listen_address.parse::<std::net::SocketAddr>().is_err() {
            problem(
                "query.listen_address",
                format!(
                    "must be host:port such as 0.0.0.0:8080, got {:?}",
                    q.listen_address
                ),
            );
        }
        if !(100..=600_000).contains(&q.query_timeout_ms) {
            problem(
                "query.query_timeout_ms",
                format!("must be from 100 to 600000, got {}", q.query_timeout_ms),
            );
        }
        if q.cache_max_age_s > 86_400 {
            problem(
                "query.cache_max_age_s",
                format!("must be at most 86400 (a day), got {}", q.cache_max_age_s),
            );
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Problems(problems))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn with_file(text: &str) -> (tempfile::TempDir, ConfigArgs) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shopstream.yaml");
        std::fs::write(&path, text).unwrap();
        let args = ConfigArgs {
            config: Some(path),
            ..Default::default()
        };
        (dir, args)
    }

    fn error(args: &ConfigArgs, vars: &[(&str, &str)]) -> String {
        Config::load_from(args, env(vars)).unwrap_err().to_string()
    }

    #[test]
    fn defaults_need_no_file() {
        let config = Config::load_from(&ConfigArgs::default(), env(&[("PATH", "/bin")])).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.kafka.bootstrap_servers, "embedded://");
        assert!(!config.clickhouse.compression);
        assert_eq!(config.kafka.gap_confirmation_ms, 2_000);
    }

    #[test]
    fn the_gap_confirmation_is_set_like_any_setting_and_must_be_a_number() {
        let args = ConfigArgs {
            overrides: vec!["kafka.gap_confirmation_ms=0".into()],
            ..ConfigArgs::default()
        };
        let config = Config::load_from(&args, env(&[])).unwrap();
        assert_eq!(config.kafka.gap_confirmation_ms, 0);
        let args = ConfigArgs {
            overrides: vec!["kafka.gap_confirmation_ms=soon".into()],
            ..ConfigArgs::default()
        };
        let err = Config::load_from(&args, env(&[])).unwrap_err().to_string();
        assert!(err.contains("kafka.gap_confirmation_ms"), "{err}");
    }

    #[test]
    fn flags_beat_environment_beats_file() {
        let (_dir, mut args) = with_file("kafka:\n  bootstrap_servers: file:9092\n  request_timeout_ms: 5000\nclickhouse:\n  database: from_file\n");
        let config = Config::load_from(&args, env(&[])).unwrap();
        assert_eq!(config.kafka.bootstrap_servers, "file:9092");
        assert_eq!(config.kafka.request_timeout_ms, 5000);
        let vars = [
            ("SHOPSTREAM_KAFKA__BOOTSTRAP_SERVERS", "env:9092"),
            ("SHOPSTREAM_KAFKA__REQUEST_TIMEOUT_MS", "2500"),
            ("SHOPSTREAM_CLICKHOUSE__COMPRESSION", "true"),
        ];
        let config = Config::load_from(&args, env(&vars)).unwrap();
        assert_eq!(
            (
                config.kafka.bootstrap_servers.as_str(),
                config.kafka.request_timeout_ms
            ),
            ("env:9092", 2500)
        );
        assert!(config.clickhouse.compression);
        assert_eq!(config.clickhouse.database, "from_file");
        args.brokers = Some("flag:9092".into());
        args.log_format = Some(LogFormat::Json);
        args.overrides = vec!["clickhouse.database=from_flag".into()];
        let config = Config::load_from(&args, env(&vars)).unwrap();
        assert_eq!(config.kafka.bootstrap_servers, "flag:9092");
        assert_eq!(config.telemetry.log_format, LogFormat::Json);
        assert_eq!(config.clickhouse.database, "from_flag");
    }

    #[test]
    fn a_list_setting_takes_a_flow_sequence_from_a_flag_or_the_environment() {
        let (_dir, mut args) = with_file("worker:\n  topics: [orders]\n");
        let config = Config::load_from(&args, env(&[])).unwrap();
        assert_eq!(config.worker.topics, ["orders"]);
        let vars = [("SHOPSTREAM_WORKER__TOPICS", "[chat-messages]")];
        let config = Config::load_from(&args, env(&vars)).unwrap();
        assert_eq!(config.worker.topics, ["chat-messages"]);
        args.overrides = vec!["worker.topics=[orders, search-queries]".into()];
        let config = Config::load_from(&args, env(&vars)).unwrap();
        assert_eq!(config.worker.topics, ["orders", "search-queries"]);
        args.overrides = vec!["worker.topics=orders".into()];
        let problem = error(&args, &[]);
        assert!(
            problem.contains("flag --set worker.topics=orders")
                && problem.contains("expected a sequence"),
            "{problem}"
        );
    }

    #[test]
    fn client_properties_pass_through_from_file_and_environment() {
        let (_dir, args) = with_file(
            "kafka:\n  client:\n    security.protocol: SASL_SSL\n    sasl.mechanism: PLAIN\n",
        );
        let config = Config::load_from(
            &args,
            env(&[
                ("SHOPSTREAM_KAFKA__CLIENT__SASL_USERNAME", "svc"),
                ("SHOPSTREAM_KAFKA__CLIENT__SASL_PASSWORD", "12345"),
            ]),
        )
        .unwrap();
        let props = &config.kafka.client.0;
        assert_eq!(props["security.protocol"], "SASL_SSL");
        assert_eq!(props["sasl.username"], "svc");
        // Kept as text even when it looks like a number.
        assert_eq!(props["sasl.password"], "12345");
    }

    #[test]
    fn unknown_fields_name_file_line_and_field() {
        let (_dir, args) = with_file("kafka:\n  bootstrap_servers: a:1\n  bootstrap_server: b:2\n");
        let err = error(&args, &[]);
        assert!(err.ends_with("shopstream.yaml:3: kafka.bootstrap_server: unknown field `bootstrap_server`, expected one of `bootstrap_servers`, `request_timeout_ms`, `gap_confirmation_ms`, `client`"), "{err}");
        let (_dir, args) = with_file("telemetry:\n  log_format: xml\n");
        let err = error(&args, &[]);
        assert!(err.contains("shopstream.yaml:2: telemetry.log_format: unknown variant `xml`, expected `pretty` or `json`"), "{err}");
    }

    #[test]
    fn environment_errors_name_the_variable() {
        let err = error(
            &ConfigArgs::default(),
            &[("SHOPSTREAM_KAFKA__BOOTSTRAP", "x")],
        );
        assert!(
            err.starts_with(
                "environment variable SHOPSTREAM_KAFKA__BOOTSTRAP: kafka.bootstrap: unknown field"
            ),
            "{err}"
        );
        let err = error(
            &ConfigArgs::default(),
            &[("SHOPSTREAM_KAFKA__REQUEST_TIMEOUT_MS", "soon")],
        );
        assert!(err.starts_with("environment variable SHOPSTREAM_KAFKA__REQUEST_TIMEOUT_MS: kafka.request_timeout_ms: invalid type"), "{err}");
        let args = ConfigArgs {
            overrides: vec!["kafka.bootstrap_servers".into()],
            ..Default::default()
        };
        assert!(error(&args, &[]).contains("expected PATH=VALUE"));
    }

    #[test]
    fn cross_field_checks_catch_what_types_cannot() {
        let (_dir, args) = with_file("kafka:\n  bootstrap_servers: ' '\n  client:\n    group.id: mine\nclickhouse:\n  url: localhost:8123\n  database: 'x; DROP DATABASE y'\nworker:\n  batch_max_records: 0\n  metrics_address: nowhere\n");
        let err = error(&args, &[]);
        assert!(
            err.contains("shopstream.yaml:2: kafka.bootstrap_servers: must name host:port"),
            "{err}"
        );
        assert!(
            err.contains(
                "shopstream.yaml:4: kafka.client.group.id: group.id is managed by shopstream"
            ),
            "{err}"
        );
        assert!(
            err.contains("shopstream.yaml:6: clickhouse.url: must be an http://"),
            "{err}"
        );
        assert!(err.contains("shopstream.yaml:7: clickhouse.database: \"x; DROP DATABASE y\" is not a valid identifier"), "{err}");
        assert!(
            err.contains(
                "shopstream.yaml:9: worker.batch_max_records: must be from 1 to 100000, got 0"
            ),
            "{err}"
        );
        assert!(
            err.contains("shopstream.yaml:10: worker.metrics_address: must be host:port"),
            "{err}"
        );
        let (_dir, args) = with_file("analytics:\n  window_ms: 1500\n  allowed_lateness_ms: -1\n  flush_interval_ms: 0\n  metrics_address: nowhere\n  compact_every_ms: 5\n  compact_after_idle_ms: 90000000\n  compact_lookback_h: 0\n  compact_minutes_after_idle_ms: 86400001\n  compact_minutes_every_ms: 99\n");
        let err = error(&args, &[]);
        for expected in [
            "shopstream.yaml:2: analytics.window_ms: must be whole seconds from 1000 to 86400000, got 1500",
            "shopstream.yaml:3: analytics.allowed_lateness_ms: must not be negative, got -1",
            "shopstream.yaml:4: analytics.flush_interval_ms: must be from 10 to 600000, got 0",
            "shopstream.yaml:5: analytics.metrics_address: must be host:port",
            "shopstream.yaml:6: analytics.compact_every_ms: must be 0 (never) or from 100 to 86400000, got 5",
            "shopstream.yaml:7: analytics.compact_after_idle_ms: must be at most 86400000 (a day), got 90000000",
            "shopstream.yaml:8: analytics.compact_lookback_h: must be from 1 to 1000000, got 0",
            "shopstream.yaml:9: analytics.compact_minutes_after_idle_ms: must be at most 86400000 (a day), got 86400001",
            "shopstream.yaml:10: analytics.compact_minutes_every_ms: must be 0 (with the hours only) or from 100 to 86400000, got 99",
        ] {
            assert!(err.contains(expected), "{expected} in {err}");
        }
        let (_dir, args) = with_file(
            "query:\n  listen_address: everywhere\n  query_timeout_ms: 0\n  cache_max_age_s: 100000\n",
        );
        let err = error(&args, &[]);
        for expected in [
            "shopstream.yaml:2: query.listen_address: must be host:port such as 0.0.0.0:8080, got \"everywhere\"",
            "shopstream.yaml:3: query.query_timeout_ms: must be from 100 to 600000, got 0",
            "shopstream.yaml:4: query.cache_max_age_s: must be at most 86400 (a day), got 100000",
        ] {
            assert!(err.contains(expected), "{expected} in {err}");
        }
        let (_dir, args) = with_file("analytics:\n  late_events: drop\n");
        let err = error(&args, &[]);
        assert!(
            err.contains("analytics.late_events") && err.contains("add") && err.contains("divert"),
            "{err}"
        );
        let err = error(
            &ConfigArgs {
                config: Some("/nonexistent/shopstream.yaml".into()),
                ..Default::default()
            },
            &[],
        );
        assert!(
            err.starts_with("/nonexistent/shopstream.yaml: cannot read the configuration file"),
            "{err}"
        );
    }

    #[test]
    fn secrets_never_appear_in_debug_output() {
        const SENTINEL: &str = "sentinel-Pa55w0rd-7f3a";
        let (_dir, args) = with_file(&format!("clickhouse:\n  password: {SENTINEL}\nkafka:\n  client:\n    sasl.password: {SENTINEL}\n    sasl.jaas.config: {SENTINEL}\n    ssl.key.password: {SENTINEL}\n    sasl.username: alice\n"));
        let config = Config::load_from(&args, env(&[])).unwrap();
        assert_eq!(config.clickhouse.password.expose(), SENTINEL);
        let shown = format!("{config:?} {config:#?}");
        assert!(!shown.contains(SENTINEL), "{shown}");
        assert!(
            shown.contains("alice") && shown.contains("<redacted>"),
            "{shown}"
        );
    }

    #[test]
    fn relative_catalog_paths_follow_the_config_file() {
        let (dir, args) = with_file("catalog:\n  path: cat/topics.yaml\n  profile: dev\n");
        let config = Config::load_from(&args, env(&[])).unwrap();
        assert_eq!(
            config.catalog_path(&args),
            dir.path().join("cat/topics.yaml")
        );
        assert_eq!(config.catalog.profile.as_deref(), Some("dev"));
        assert_eq!(
            Config::default().catalog_path(&ConfigArgs::default()),
            PathBuf::from("topics.yaml")
        );
    }
}
