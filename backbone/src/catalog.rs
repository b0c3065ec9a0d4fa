//! The topic catalog: `topics.yaml` loaded, checked offline and resolved for
//! one profile. Everything that provisions, publishes or consumes asks the
//! catalog for topic names, keys and retry tiers.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use apache_avro::Schema;
use serde::Deserialize;
use serde_yaml::Value;

use crate::events::EventType;
use crate::schema::SchemaRegistry;
use crate::topic_config;
use crate::yaml::{Problem, Problems, YamlDocument};

/// Kafka's limit on topic name length.
const MAX_TOPIC_NAME: usize = 249;

/// `topics.yaml` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    /// When set, provisioning refuses to touch a cluster with another id.
    #[serde(default)]
    cluster_id: Option<String>,
    /// Topic name prefixes this catalog owns: only topics under them may ever
    /// be deleted, and only when asked to.
    #[serde(default)]
    managed_prefixes: Vec<String>,
    /// Values for every topic that does not set its own.
    #[serde(default)]
    defaults: Overrides,
    topics: Vec<TopicEntry>,
    /// Per-environment overrides, chosen by `--profile`.
    #[serde(default)]
    profiles: BTreeMap<String, ProfileEntry>,
}

/// Settings that defaults, a topic and a profile can each set.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Overrides {
    #[serde(default)]
    partitions: Option<i64>,
    #[serde(default)]
    replication_factor: Option<i64>,
    /// Topic-level Kafka configs, such as `retention.ms`.
    #[serde(default)]
    configs: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicEntry {
    name: String,
    /// Folder of the event's Avro schemas, relative to this file.
    schema: String,
    /// The event field whose value is the Kafka key.
    key: String,
    #[serde(flatten)]
    settings: Overrides,
    #[serde(default)]
    retry: RetryEntry,
    #[serde(default)]
    dead_letter: DeadLetterEntry,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryEntry {
    /// Delays of the retry tier topics, in order, such as `[5s, 1m, 10m]`.
    #[serde(default)]
    tiers: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadLetterEntry {
    #[serde(default = "yes")]
    enabled: bool,
    /// Overrides the derived `<topic>.dlq` name.
    #[serde(default)]
    topic: Option<String>,
    /// Configs for the DLQ topic on top of the source topic's (often a longer retention).
    #[serde(default)]
    configs: BTreeMap<String, Value>,
}

impl Default for DeadLetterEntry {
    fn default() -> Self {
        Self {
            enabled: true,
            topic: None,
            configs: BTreeMap::new(),
        }
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileEntry {
    #[serde(flatten)]
    settings: Overrides,
    /// Overrides for single topics, by name.
    #[serde(default)]
    topics: BTreeMap<String, Overrides>,
}

/// The catalog resolved for one profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Catalog {
    pub path: PathBuf,
    pub profile: Option<String>,
    pub cluster_id: Option<String>,
    pub managed_prefixes: Vec<String>,
    pub topics: Vec<EventTopic>,
}

/// A topic that carries one kind of event.
#[derive(Debug, Clone, PartialEq)]
pub struct EventTopic {
    pub name: String,
    pub event: EventType,
    /// The event field whose value is the Kafka key.
    pub key: String,
    pub partitions: i32,
    pub replication_factor: i16,
    /// Explicitly set topic configs, normalised as Kafka reports them.
    pub configs: BTreeMap<String, String>,
    pub retry_tiers: Vec<RetryTier>,
    pub dead_letter: Option<DeadLetter>,
}

/// A retry tier: records wait `delay` in `topic` before the handler runs again.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryTier {
    pub delay: Duration,
    pub topic: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub topic: String,
    pub configs: BTreeMap<String, String>,
}

/// What a topic on the cluster is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicRole {
    Events,
    Retry,
    DeadLetter,
}

/// A topic the catalog wants on the cluster, events or derived.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredTopic {
    pub name: String,
    pub role: TopicRole,
    /// The event topic this one belongs to.
    pub source: String,
    pub partitions: i32,
    pub replication_factor: i16,
    pub configs: BTreeMap<String, String>,
}

/// The name of a retry tier's topic: `<topic>.retry.<delay>`.
pub fn retry_topic_name(source: &str, delay: Duration) -> String {
    format!("{source}.retry.{}", format_delay(delay))
}

/// The derived dead-letter topic name: `<topic>.dlq`.
pub fn dead_letter_topic_name(source: &str) -> String {
    format!("{source}.dlq")
}

/// Formats a delay in its largest whole unit: `500ms`, `5s`, `10m`, `2h`.
pub fn format_delay(delay: Duration) -> String {
    let ms = delay.as_millis();
    for (unit, size) in [("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// Parses `500ms`, `5s`, `10m` or `2h`.
pub fn parse_delay(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a delay like 500ms, 5s, 10m or 2h"))?;
    let ms = match unit {
        "ms" => number,
        "s" => number * 1_000,
        "m" => number * 60_000,
        "h" => number * 3_600_000,
        _ => {
            return Err(format!(
                "{text:?} has no unit; use ms, s, m or h (such as 30s)"
            ))
        }
    };
    if ms == 0 {
        return Err("a delay must be longer than zero".into());
    }
    Ok(Duration::from_millis(ms))
}

/// Partitions per topic, at most. Kafka sets no hard limit, but every
/// partition costs each replica broker memory, file handles and recovery
/// time; a topic past ten thousand is a typo, not a plan.
pub const MAX_PARTITIONS: i64 = 10_000;

/// Why a topic name is not legal in Kafka, if it is not.
pub fn topic_name_problem(name: &str) -> Option<String> {
    if name.starts_with('^') {
        return Some(format!(
            "{name:?} looks like a regular expression; the catalog takes literal topic names"
        ));
    }
    if name.is_empty() || name.len() > MAX_TOPIC_NAME {
        return Some(format!(
            "{name:?} must be 1 to {MAX_TOPIC_NAME} characters (has {})",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Some(format!("{name:?} is reserved"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Some(format!(
            "{name:?} has {bad:?}; topic names may use only ASCII letters, digits, '.', '_' and '-'"
        ));
    }
    if name.starts_with("__") {
        return Some(format!("{name:?} is reserved for Kafka's internal topics"));
    }
    None
}

impl Catalog {
    /// Loads and checks `path` for `profile` (the base catalog when `None`).
    pub fn load(path: &Path, profile: Option<&str>) -> Result<Self, Problems> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Problems(vec![Problem {
                origin: path.display().to_string(),
                line: None,
                field: String::new(),
                message: format!("cannot read the topic catalog: {e}"),
            }])
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(path, &text, base, profile)
    }

    /// Checks catalog text; schema folders are looked up under `base`.
    pub fn parse(
        path: &Path,
        text: &str,
        base: &Path,
        profile: Option<&str>,
    ) -> Result<Self, Problems> {
        let doc =
            YamlDocument::parse(path.display().to_string(), text).map_err(|p| Problems(vec![p]))?;
        let file: CatalogFile = doc.deserialize().map_err(|p| Problems(vec![p]))?;
        let mut check = Checker {
            doc: &doc,
            problems: Vec::new(),
        };
        let catalog = check.resolve(path, file, base, profile);
        if check.problems.is_empty() {
            Ok(catalog)
        } else {
            Err(Problems(check.problems))
        }
    }

    pub fn topic(&self, name: &str) -> Option<&EventTopic> {
        self.topics.iter().find(|t| t.name == name)
    }

    /// Every topic the catalog wants: event topics, then their retry tiers and DLQs.
    pub fn desired_topics(&self) -> Vec<DesiredTopic> {
        let mut out = Vec::new();
        for topic in &self.topics {
            let derived = |name: &str, role, configs: &BTreeMap<String, String>| DesiredTopic {
                name: name.to_owned(),
                role,
                source: topic.name.clone(),
                partitions: topic.partitions,
                replication_factor: topic.replication_factor,
                configs: configs.clone(),
            };
            out.push(derived(&topic.name, TopicRole::Events, &topic.configs));
            for tier in &topic.retry_tiers {
                out.push(derived(&tier.topic, TopicRole::Retry, &topic.configs));
            }
            if let Some(dlq) = &topic.dead_letter {
                out.push(derived(&dlq.topic, TopicRole::DeadLetter, &dlq.configs));
            }
        }
        out
    }
}

struct Checker<'a> {
    doc: &'a YamlDocument,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn problem(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.problems.push(self.doc.problem(field, message));
    }

    fn resolve(
        &mut self,
        path: &Path,
        file: CatalogFile,
        base: &Path,
        profile_name: Option<&str>,
    ) -> Catalog {
        let empty = ProfileEntry::default();
        let profile = match profile_name {
            None => &empty,
            Some(name) => match file.profiles.get(name) {
                Some(profile) => profile,
                None => {
                    let known: Vec<&str> = file.profiles.keys().map(String::as_str).collect();
                    self.problems.push(Problem {
                        origin: self.doc.origin.clone(),
                        line: self.doc.line_of("profiles"),
                        field: "profiles".into(),
                        message: format!(
                            "no profile named {name:?}; this catalog defines: {}",
                            if known.is_empty() {
                                "none".to_owned()
                            } else {
                                known.join(", ")
                            }
                        ),
                    });
                    &empty
                }
            },
        };
        if let Some(id) = &file.cluster_id {
            if id.trim().is_empty() {
                self.problem(
                    "cluster_id",
                    "must not be empty; remove it to allow any cluster",
                );
            }
        }
        for (i, prefix) in file.managed_prefixes.iter().enumerate() {
            if let Some(why) = topic_name_problem(prefix) {
                self.problem(format!("managed_prefixes[{i}]"), why);
            }
        }
        for (name, p) in &file.profiles {
            for topic in p.topics.keys() {
                if !file.topics.iter().any(|t| &t.name == topic) {
                    let known: Vec<&str> = file.topics.iter().map(|t| t.name.as_str()).collect();
                    self.problem(
                        format!("profiles.{name}.topics.{topic}"),
                        format!(
                            "no such topic in the catalog; topics are: {}",
                            known.join(", ")
                        ),
                    );
                }
            }
        }
        if file.topics.is_empty() {
            self.problem("topics", "the catalog declares no topics");
        }

        let profile_prefix = profile_name.map(|n| format!("profiles.{n}"));
        let mut topics = Vec::new();
        for (i, entry) in file.topics.iter().enumerate() {
            let at = format!("topics[{i}]");
            let topic_profile = profile.topics.get(&entry.name);
            // Layers, weakest first, with the field path each came from.
            let layers: Vec<(String, &Overrides)> = [
                Some(("defaults".to_owned(), &file.defaults)),
                Some((at.clone(), &entry.settings)),
                profile_prefix.clone().map(|p| (p, &profile.settings)),
                topic_profile
                    .zip(profile_prefix.clone())
                    .map(|(o, p)| (format!("{p}.topics.{}", entry.name), o)),
            ]
            .into_iter()
            .flatten()
            .collect();
            if let Some(topic) = self.resolve_topic(&at, entry, &layers, base) {
                topics.push(topic);
            }
        }
        self.check_names(&file, &topics);
        Catalog {
            path: path.to_owned(),
            profile: profile_name.map(str::to_owned),
            cluster_id: file.cluster_id,
            managed_prefixes: file.managed_prefixes,
            topics,
        }
    }

    fn resolve_topic(
        &mut self,
        at: &str,
        entry: &TopicEntry,
        layers: &[(String, &Overrides)],
        base: &Path,
    ) -> Option<EventTopic> {
        let before = self.problems.len();
        if let Some(why) = topic_name_problem(&entry.name) {
            self.problem(format!("{at}.name"), why);
        }
        let partitions = self.strongest(
            at,
            "partitions",
            layers,
            |o| o.partitions,
            1,
            MAX_PARTITIONS,
        );
        let replication_factor = self.strongest(
            at,
            "replication_factor",
            layers,
            |o| o.replication_factor,
            1,
            i16::MAX as i64,
        );
        let mut configs = BTreeMap::new();
        for (field, layer) in layers {
            self.merge_configs(&format!("{field}.configs"), &layer.configs, &mut configs);
        }
        if let (Some(min_isr), Some(rf)) = (configs.get("min.insync.replicas"), replication_factor)
        {
            if min_isr.parse::<i64>().is_ok_and(|m| m > rf) {
                let field = layers
                    .iter()
                    .rev()
                    .find(|(_, o)| o.configs.contains_key("min.insync.replicas"))
                    .map(|(f, _)| format!("{f}.configs.min.insync.replicas"))
                    .unwrap_or_default();
                self.problem(
                    field,
                    format!(
                        "min.insync.replicas {min_isr} exceeds the replication factor {rf} of {}; producers with acks=all could never write",
                        entry.name
                    ),
                );
            }
        }
        let event = self.check_schema(at, entry, base);
        let mut retry_tiers = Vec::new();
        for (t, text) in entry.retry.tiers.iter().enumerate() {
            match parse_delay(text) {
                Ok(delay) => retry_tiers.push(RetryTier {
                    delay,
                    topic: retry_topic_name(&entry.name, delay),
                }),
                Err(why) => self.problem(format!("{at}.retry.tiers[{t}]"), why),
            }
        }
        let dead_letter = entry.dead_letter.enabled.then(|| {
            let topic = entry
                .dead_letter
                .topic
                .clone()
                .unwrap_or_else(|| dead_letter_topic_name(&entry.name));
            let mut dlq_configs = configs.clone();
            self.merge_configs(
                &format!("{at}.dead_letter.configs"),
                &entry.dead_letter.configs,
                &mut dlq_configs,
            );
            DeadLetter {
                topic,
                configs: dlq_configs,
            }
        });
        if let Some(dlq) = &dead_letter {
            if dlq.topic == entry.name {
                self.problem(
                    format!("{at}.dead_letter.topic"),
                    format!(
                        "the DLQ cannot be its own source topic {:?}; leave it out to get {:?}",
                        entry.name,
                        dead_letter_topic_name(&entry.name)
                    ),
                );
            }
        }
        if self.problems.len() > before {
            return None;
        }
        Some(EventTopic {
            name: entry.name.clone(),
            event: event?,
            key: entry.key.clone(),
            partitions: partitions? as i32,
            replication_factor: replication_factor? as i16,
            configs,
            retry_tiers,
            dead_letter,
        })
    }

    /// The value of the last layer that sets `name`, checked against `min..=max`.
    fn strongest(
        &mut self,
        at: &str,
        name: &str,
        layers: &[(String, &Overrides)],
        get: impl Fn(&Overrides) -> Option<i64>,
        min: i64,
        max: i64,
    ) -> Option<i64> {
        let Some((field, value)) = layers
            .iter()
            .rev()
            .find_map(|(f, o)| get(o).map(|v| (f, v)))
        else {
            self.problem(
                format!("{at}.{name}"),
                format!("{name} is required: set it on the topic or under defaults"),
            );
            return None;
        };
        if !(min..=max).contains(&value) {
            self.problem(
                format!("{field}.{name}"),
                format!("must be from {min} to {max}, got {value}"),
            );
            return None;
        }
        Some(value)
    }

    fn merge_configs(
        &mut self,
        field: &str,
        layer: &BTreeMap<String, Value>,
        into: &mut BTreeMap<String, String>,
    ) {
        for (key, value) in layer {
            let field = format!("{field}.{key}");
            let text = match value {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                Value::Sequence(items) if items.iter().all(|i| i.is_string()) => items
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(","),
                _ => {
                    self.problem(
                        field,
                        "must be a single value (a number, word or true/false)",
                    );
                    continue;
                }
            };
            match topic_config::check(key, &text) {
                Ok(normal) => {
                    into.insert(key.clone(), normal);
                }
                Err(why) => self.problem(field, why),
            }
        }
    }

    /// The schema folder must exist, hold `v<N>.avsc` files, and its newest
    /// version must be one this build can read; the key must be a string field.
    fn check_schema(&mut self, at: &str, entry: &TopicEntry, base: &Path) -> Option<EventType> {
        let field = format!("{at}.schema");
        let dir = base.join(&entry.schema);
        let newest = std::fs::read_dir(&dir)
            .ok()
            .into_iter()
            .flatten()
            .filter_map(|f| {
                let path = f.ok()?.path();
                let version: u32 = path
                    .file_name()?
                    .to_str()?
                    .strip_prefix('v')?
                    .strip_suffix(".avsc")?
                    .parse()
                    .ok()?;
                Some((version, path))
            })
            .max();
        let Some((_, path)) = newest else {
            let known: Vec<String> = EventType::ALL
                .iter()
                .map(|e| format!("schemas/{e}"))
                .collect();
            self.problem(
                field,
                format!(
                    "no schema files (v1.avsc, v2.avsc, ...) in {}; schemas shipped: {}",
                    dir.display(),
                    known.join(", ")
                ),
            );
            return None;
        };
        let schema = match std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|text| Schema::parse_str(&text).map_err(|e| e.to_string()))
        {
            Ok(schema) => schema,
            Err(why) => {
                self.problem(
                    field,
                    format!("{} is not a valid Avro schema: {why}", path.display()),
                );
                return None;
            }
        };
        let known = SchemaRegistry::global().by_fingerprint(&crate::schema::fingerprint(&schema));
        let Some(version) = known else {
            self.problem(
                field,
                format!(
                    "{} is not a schema version this build knows; rebuild with it added to schemas/",
                    path.display()
                ),
            );
            return None;
        };
        let current = &SchemaRegistry::global().current(version.event).schema;
        let string_fields: Vec<&str> = match current {
            Schema::Record(record) => record
                .fields
                .iter()
                .filter(|f| matches!(f.schema, Schema::String))
                .map(|f| f.name.as_str())
                .collect(),
            _ => Vec::new(),
        };
        if !string_fields.contains(&entry.key.as_str()) {
            self.problem(
                format!("{at}.key"),
                format!(
                    "{:?} is not a string field of {}; valid keys: {}",
                    entry.key,
                    version.event,
                    string_fields.join(", ")
                ),
            );
        }
        Some(version.event)
    }

    /// Names must be unique, and must not collide once '.' and '_' are
    /// treated alike (Kafka's metric names cannot tell them apart).
    fn check_names(&mut self, file: &CatalogFile, topics: &[EventTopic]) {
        let mut seen: HashMap<String, (String, String)> = HashMap::new();
        let index_of = |source: &str| file.topics.iter().position(|t| t.name == source);
        let mut names: Vec<(String, String)> = Vec::new();
        for (i, entry) in file.topics.iter().enumerate() {
            names.push((entry.name.clone(), format!("topics[{i}].name")));
        }
        for topic in topics {
            let i = index_of(&topic.name).unwrap_or(0);
            for (t, tier) in topic.retry_tiers.iter().enumerate() {
                names.push((tier.topic.clone(), format!("topics[{i}].retry.tiers[{t}]")));
            }
            if let Some(dlq) = &topic.dead_letter {
                let field = if file.topics[i].dead_letter.topic.is_some() {
                    format!("topics[{i}].dead_letter.topic")
                } else {
                    format!("topics[{i}].name")
                };
                names.push((dlq.topic.clone(), field));
            }
        }
        for (name, field) in names {
            if let Some(why) = topic_name_problem(&name) {
                if !self.problems.iter().any(|p| p.field == field) {
                    self.problem(field.clone(), format!("derived topic {why}"));
                }
                continue;
            }
            let folded = name.replace('.', "_");
            match seen.get(&folded) {
                Some((other, other_field)) if *other == name => {
                    let message =
                        format!("topic {name:?} is declared twice (also at {other_field})");
                    self.problem(field, message);
                }
                Some((other, other_field)) => {
                    let message = format!(
                        "topic {name:?} collides with {other:?} (at {other_field}): Kafka treats '.' and '_' alike in metric names"
                    );
                    self.problem(field, message);
                }
                None => {
                    seen.insert(folded, (name, field));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    fn parse(text: &str, profile: Option<&str>) -> Result<Catalog, Problems> {
        Catalog::parse(Path::new("topics.yaml"), text, &root(), profile)
    }

    /// The problems as `line: field: message` lines.
    fn problems(text: &str) -> Vec<String> {
        parse(text, None)
            .unwrap_err()
            .0
            .iter()
            .map(|p| p.to_string())
            .collect()
    }

    const ONE: &str = "\
defaults:
  partitions: 3
  replication_factor: 1
topics:
  - name: orders
    schema: schemas/order_event
    key: order_id
";

    #[test]
    fn the_shipped_catalog_loads_for_every_profile() {
        for profile in [None, Some("dev"), Some("staging")] {
            let catalog = Catalog::load(&root().join("topics.yaml"), profile).unwrap();
            assert_eq!(catalog.topics.len(), 4);
            let orders = catalog.topic("orders").unwrap();
            assert_eq!(orders.event, EventType::Order);
            assert_eq!(orders.key, "order_id");
            let names: Vec<_> = orders
                .retry_tiers
                .iter()
                .map(|t| t.topic.as_str())
                .collect();
            assert_eq!(
                names,
                ["orders.retry.5s", "orders.retry.1m", "orders.retry.10m"]
            );
            assert_eq!(orders.dead_letter.as_ref().unwrap().topic, "orders.dlq");
            assert_eq!(
                orders.dead_letter.as_ref().unwrap().configs["retention.ms"],
                "7776000000"
            );
        }
        let dev = Catalog::load(&root().join("topics.yaml"), Some("dev")).unwrap();
        let orders = dev.topic("orders").unwrap();
        assert_eq!((orders.partitions, orders.replication_factor), (3, 1));
        assert_eq!(orders.configs["min.insync.replicas"], "1");
        // Production sizing in the base catalog; the profiles stay small.
        let base = Catalog::load(&root().join("topics.yaml"), None).unwrap();
        let partitions = |c: &Catalog, t: &str| c.topic(t).unwrap().partitions;
        assert_eq!(partitions(&base, "orders"), 24);
        assert_eq!(partitions(&base, "user-events"), 20);
        assert_eq!(partitions(&base, "chat-messages"), 100);
        assert_eq!(partitions(&base, "search-queries"), 50);
        for topic in &base.topics {
            assert_eq!(topic.replication_factor, 3, "{}", topic.name);
            assert_eq!(topic.configs["min.insync.replicas"], "2", "{}", topic.name);
        }
        assert_eq!(partitions(&dev, "chat-messages"), 3);
        assert_eq!(base.topic("chat-messages").unwrap().event, EventType::Chat);
        let staging = Catalog::load(&root().join("topics.yaml"), Some("staging")).unwrap();
        for topic in &staging.topics {
            assert_eq!(topic.partitions, 12, "{}", topic.name);
        }
    }

    #[test]
    fn desired_topics_include_retry_tiers_and_dead_letters() {
        let catalog = parse(ONE, None).unwrap();
        let names: Vec<_> = catalog
            .desired_topics()
            .into_iter()
            .map(|t| (t.name, t.role))
            .collect();
        assert_eq!(
            names,
            [
                ("orders".to_owned(), TopicRole::Events),
                ("orders.dlq".to_owned(), TopicRole::DeadLetter)
            ]
        );
        let full = Catalog::load(&root().join("topics.yaml"), None)
            .unwrap()
            .desired_topics();
        assert_eq!(full.len(), 4 + 8 + 4);
        assert!(full
            .iter()
            .all(|t| t.partitions == full.iter().find(|s| s.name == t.source).unwrap().partitions));
    }

    #[test]
    fn delays_format_in_their_largest_unit() {
        for (text, canonical) in [
            ("500ms", "500ms"),
            ("5s", "5s"),
            ("60s", "1m"),
            ("90s", "90s"),
            ("120m", "2h"),
            ("1500ms", "1500ms"),
        ] {
            assert_eq!(format_delay(parse_delay(text).unwrap()), canonical);
        }
        assert!(parse_delay("5").unwrap_err().contains("no unit"));
        assert!(parse_delay("0s").is_err());
        assert!(parse_delay("soon").is_err());
        assert_eq!(
            retry_topic_name("orders", Duration::from_secs(300)),
            "orders.retry.5m"
        );
    }

    #[test]
    fn illegal_topic_names_are_rejected_with_their_line() {
        for (name, expect) in [
            ("\"^orders.*\"", "regular expression"),
            ("\"orders!\"", "'!'"),
            ("\".\"", "reserved"),
            ("\"..\"", "reserved"),
            ("\"__consumer_offsets\"", "internal"),
            ("\"\"", "1 to 249"),
        ] {
            let text = ONE.replace("name: orders", &format!("name: {name}"));
            let found = problems(&text);
            assert!(
                found[0].starts_with("topics.yaml:5: topics[0].name: "),
                "{found:?}"
            );
            assert!(found[0].contains(expect), "{name}: {found:?}");
        }
        let long = "o".repeat(250);
        let found = problems(&ONE.replace("name: orders", &format!("name: {long}")));
        assert!(found[0].contains("1 to 249"), "{found:?}");
        // Legal alone, but the derived DLQ name is too long.
        let edge = "o".repeat(247);
        let found = problems(&ONE.replace("name: orders", &format!("name: {edge}")));
        assert!(found[0].contains("derived topic"), "{found:?}");
    }

    #[test]
    fn numbers_out_of_range_are_rejected() {
        let found = problems(&ONE.replace("partitions: 3", "partitions: 0"));
        assert_eq!(
            found,
            ["topics.yaml:2: defaults.partitions: must be from 1 to 10000, got 0"]
        );
        let text = ONE.replace(
            "    key: order_id",
            "    key: order_id\n    replication_factor: -1",
        );
        let found = problems(&text);
        assert_eq!(
            found,
            ["topics.yaml:8: topics[0].replication_factor: must be from 1 to 32767, got -1"]
        );
        let found = problems(&ONE.replace("partitions: 3", "partitions: many"));
        assert!(
            found[0].starts_with("topics.yaml:2: defaults.partitions: invalid type"),
            "{found:?}"
        );
        let found = problems(&ONE.replace("  partitions: 3\n", ""));
        assert!(
            found[0].contains("topics[0].partitions: partitions is required"),
            "{found:?}"
        );
    }

    #[test]
    fn config_keys_and_values_are_checked() {
        let text = format!("{ONE}    configs:\n      retention.ms: 7d\n      retention.msec: 5\n      cleanup.policy: [compact, delete]\n");
        let found = problems(&text);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0].starts_with(
                "topics.yaml:9: topics[0].configs.retention.ms: must be a whole number"
            ),
            "{found:?}"
        );
        assert!(
            found[1].starts_with(
                "topics.yaml:10: topics[0].configs.retention.msec: unknown topic config key"
            ),
            "{found:?}"
        );
        let ok = parse(
            &format!("{ONE}    configs:\n      cleanup.policy: [compact, delete]\n"),
            None,
        )
        .unwrap();
        assert_eq!(ok.topics[0].configs["cleanup.policy"], "compact,delete");
        let found = problems(&format!(
            "{ONE}    configs:\n      min.insync.replicas: 2\n"
        ));
        assert!(
            found[0].contains("exceeds the replication factor 1"),
            "{found:?}"
        );
    }

    #[test]
    fn schemas_and_keys_must_exist() {
        let found = problems(&ONE.replace("schemas/order_event", "schemas/invoice"));
        assert!(
            found[0].starts_with("topics.yaml:6: topics[0].schema: no schema files"),
            "{found:?}"
        );
        assert!(found[0].contains("schemas/order_event"), "{found:?}");
        let found = problems(&ONE.replace("key: order_id", "key: total_minor"));
        assert!(found[0].starts_with("topics.yaml:7: topics[0].key: \"total_minor\" is not a string field of order_event; valid keys: "), "{found:?}");
    }

    #[test]
    fn an_unknown_schema_version_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("schemas/order_event")).unwrap();
        let v1 = std::fs::read_to_string(root().join("schemas/order_event/v1.avsc")).unwrap();
        std::fs::write(dir.path().join("schemas/order_event/v1.avsc"), &v1).unwrap();
        assert!(Catalog::parse(Path::new("topics.yaml"), ONE, dir.path(), None).is_ok());
        let v2 = v1.replace(r#"{"name": "total_minor", "type": "long", "doc": "Order total in minor units."}"#, r#"{"name": "total_minor", "type": "long"}, {"name": "coupon", "type": ["null", "string"], "default": null}"#);
        std::fs::write(dir.path().join("schemas/order_event/v2.avsc"), v2).unwrap();
        let err = Catalog::parse(Path::new("topics.yaml"), ONE, dir.path(), None).unwrap_err();
        assert!(
            err.to_string()
                .contains("v2.avsc is not a schema version this build knows"),
            "{err}"
        );
        std::fs::write(dir.path().join("schemas/order_event/v2.avsc"), "{not json").unwrap();
        let err = Catalog::parse(Path::new("topics.yaml"), ONE, dir.path(), None).unwrap_err();
        assert!(
            err.to_string().contains("is not a valid Avro schema"),
            "{err}"
        );
    }

    #[test]
    fn duplicates_and_collisions_are_rejected() {
        let twice =
            format!("{ONE}  - name: orders\n    schema: schemas/order_event\n    key: order_id\n");
        let found = problems(&twice);
        assert!(found.iter().any(|p| p.starts_with("topics.yaml:8: topics[1].name: topic \"orders\" is declared twice (also at topics[0].name)")), "{found:?}");
        let collide = format!("{ONE}  - name: orders_dlq\n    schema: schemas/order_event\n    key: order_id\n    dead_letter: {{enabled: false}}\n");
        let found = problems(&collide);
        assert!(
            found
                .iter()
                .any(|p| p.contains("\"orders.dlq\" collides with \"orders_dlq\"")),
            "{found:?}"
        );
        let own = format!("{ONE}    dead_letter:\n      topic: orders\n");
        let found = problems(&own);
        assert!(found.iter().any(|p| p.starts_with("topics.yaml:9: topics[0].dead_letter.topic: the DLQ cannot be its own source topic")), "{found:?}");
        let tiers = format!("{ONE}    retry:\n      tiers: [60s, 1m]\n");
        let found = problems(&tiers);
        assert!(
            found
                .iter()
                .any(|p| p.contains("\"orders.retry.1m\" is declared twice")),
            "{found:?}"
        );
    }

    #[test]
    fn unknown_fields_and_profiles_are_rejected() {
        let found =
            problems(&ONE.replace("    key: order_id", "    key: order_id\n    partitons: 4"));
        assert!(
            found[0].starts_with("topics.yaml:8: topics[0].partitons: unknown field `partitons`"),
            "{found:?}"
        );
        let err = parse(ONE, Some("prod")).unwrap_err().to_string();
        assert!(
            err.contains("no profile named \"prod\"; this catalog defines: none"),
            "{err}"
        );
        let with_profile =
            format!("{ONE}profiles:\n  dev:\n    topics:\n      payments: {{partitions: 1}}\n");
        let found = problems(&with_profile);
        assert!(
            found[0].starts_with("topics.yaml:11: profiles.dev.topics.payments: no such topic"),
            "{found:?}"
        );
        let found = problems(&ONE.replace("topics:\n", "topics:\n  - name: x\n    schema: schemas/order_event\n    key: order_id\n    retry: {tiers: [fast]}\n"));
        assert!(
            found
                .iter()
                .any(|p| p.contains("topics[0].retry.tiers[0]: \"fast\"")),
            "{found:?}"
        );
        let found = problems("topics: []\n");
        assert_eq!(
            found,
            ["topics.yaml:1: topics: the catalog declares no topics"]
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = ONE
            .replace("partitions: 3", "partitions: 0")
            .replace("key: order_id", "key: nope");
        assert_eq!(problems(&text).len(), 2);
    }
}
