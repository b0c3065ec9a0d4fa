//! Planning: the catalog compared with a cluster's live state, as a list of
//! changes a person can read before anything happens. A pure function, so
//! every kind of drift is unit-tested without a broker.
//!
//! Only configs the catalog declares, and overrides explicitly set on the
//! cluster, are compared: broker defaults never show up as drift.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::catalog::DesiredTopic;

/// A topic as the cluster reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LiveTopic {
    pub partitions: Vec<LivePartition>,
    /// Config entries by key. Brokers that cannot describe configs leave it empty.
    pub configs: BTreeMap<String, LiveConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LivePartition {
    pub id: i32,
    pub leader: i32,
    pub replicas: Vec<i32>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LiveConfig {
    pub value: Option<String>,
    /// Set on this topic, as opposed to inherited from broker defaults.
    pub explicit: bool,
}

impl LiveTopic {
    pub fn replication_factor(&self) -> Option<usize> {
        self.partitions.first().map(|p| p.replicas.len())
    }
}

/// What the cluster has now.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ClusterState {
    pub cluster_id: Option<String>,
    pub topics: BTreeMap<String, LiveTopic>,
}

/// One key's change: `new: None` removes the override (back to the broker default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigChange {
    pub key: String,
    pub old: Option<String>,
    pub new: Option<String>,
}

/// A change the plan would make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Change {
    Create {
        topic: String,
        partitions: i32,
        replication_factor: i16,
        configs: BTreeMap<String, String>,
    },
    AddPartitions {
        topic: String,
        from: i32,
        to: i32,
    },
    AlterConfigs {
        topic: String,
        changes: Vec<ConfigChange>,
    },
    Delete {
        topic: String,
    },
}

impl Change {
    pub fn topic(&self) -> &str {
        match self {
            Self::Create { topic, .. }
            | Self::AddPartitions { topic, .. }
            | Self::AlterConfigs { topic, .. }
            | Self::Delete { topic } => topic,
        }
    }

    /// The Kafka API that carries the change out.
    pub fn api(&self) -> &'static str {
        match self {
            Self::Create { .. } => "CreateTopics",
            Self::AddPartitions { .. } => "CreatePartitions",
            Self::AlterConfigs { .. } => "IncrementalAlterConfigs",
            Self::Delete { .. } => "DeleteTopics",
        }
    }

    /// One line saying what the change does.
    pub fn summary(&self) -> String {
        match self {
            Self::Create {
                topic,
                partitions,
                replication_factor,
                ..
            } => {
                format!("create {topic} ({partitions} partitions, replication factor {replication_factor})")
            }
            Self::AddPartitions { topic, from, to } => {
                format!("{topic}: partitions {from} -> {to}")
            }
            Self::AlterConfigs { topic, changes } => {
                format!("{topic}: {} config change(s)", changes.len())
            }
            Self::Delete { topic } => format!("delete {topic}"),
        }
    }
}

/// Something the catalog asks for that Kafka cannot do in place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    pub topic: String,
    pub reason: String,
}

/// The catalog compared with the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub changes: Vec<Change>,
    pub refusals: Vec<Refusal>,
    /// Topics under a managed prefix that the catalog does not declare; they
    /// are deleted only with `--allow-delete`.
    pub undeclared: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.refusals.is_empty()
    }
}

/// Kafka's own topics and those of its ecosystem are never touched.
pub fn is_internal(topic: &str) -> bool {
    topic.starts_with("__") || topic == "_schemas"
}

/// Whether `topic` belongs to this catalog by one of its prefixes.
pub fn is_managed(topic: &str, managed_prefixes: &[String]) -> bool {
    !is_internal(topic)
        && managed_prefixes
            .iter()
            .any(|p| topic.starts_with(p.as_str()))
}

/// Compares what the catalog wants with what the cluster has.
pub fn plan(
    desired: &[DesiredTopic],
    managed_prefixes: &[String],
    live: &ClusterState,
    allow_delete: bool,
) -> Plan {
    let mut plan = Plan::default();
    for want in desired {
        let Some(have) = live.topics.get(&want.name) else {
            plan.changes.push(Change::Create {
                topic: want.name.clone(),
                partitions: want.partitions,
                replication_factor: want.replication_factor,
                configs: want.configs.clone(),
            });
            continue;
        };
        let partitions = have.partitions.len() as i32;
        if partitions < want.partitions {
            plan.changes.push(Change::AddPartitions {
                topic: want.name.clone(),
                from: partitions,
                to: want.partitions,
            });
        } else if partitions > want.partitions {
            plan.refusals.push(Refusal {
                topic: want.name.clone(),
                reason: format!(
                    "has {partitions} partitions but the catalog asks for {}: Kafka cannot remove partitions. Raise the catalog to {partitions}, or recreate the topic (losing its data)",
                    want.partitions
                ),
            });
        }
        if let Some(rf) = have.replication_factor() {
            if rf != want.replication_factor as usize {
                plan.refusals.push(Refusal {
                    topic: want.name.clone(),
                    reason: format!(
                        "has replication factor {rf} but the catalog asks for {}: changing it needs a partition reassignment (kafka-reassign-partitions.sh), which shopstream-topics does not do",
                        want.replication_factor
                    ),
                });
            }
        }
        let changes = config_changes(&want.configs, &have.configs);
        if !changes.is_empty() {
            plan.changes.push(Change::AlterConfigs {
                topic: want.name.clone(),
                changes,
            });
        }
    }
    for name in live.topics.keys() {
        if desired.iter().any(|d| &d.name == name) || !is_managed(name, managed_prefixes) {
            continue;
        }
        if allow_delete {
            plan.changes.push(Change::Delete {
                topic: name.clone(),
            });
        } else {
            plan.undeclared.push(name.clone());
        }
    }
    plan
}

fn config_changes(
    want: &BTreeMap<String, String>,
    have: &BTreeMap<String, LiveConfig>,
) -> Vec<ConfigChange> {
    let mut changes = Vec::new();
    for (key, value) in want {
        let old = have.get(key).and_then(|c| c.value.clone());
        if !old.as_deref().is_some_and(|old| same_value(old, value)) {
            changes.push(ConfigChange {
                key: key.clone(),
                old,
                new: Some(value.clone()),
            });
        }
    }
    for (key, config) in have {
        if config.explicit && !want.contains_key(key) {
            changes.push(ConfigChange {
                key: key.clone(),
                old: config.value.clone(),
                new: None,
            });
        }
    }
    changes
}

/// Equal, or the same comma-separated items in another order
/// (`cleanup.policy` may come back as `delete,compact`).
fn same_value(a: &str, b: &str) -> bool {
    fn items(s: &str) -> Vec<&str> {
        let mut v: Vec<&str> = s.split(',').map(str::trim).collect();
        v.sort_unstable();
        v
    }
    a == b || items(a) == items(b)
}

/// The plan as a person reads it.
pub fn render(plan: &Plan) -> String {
    let mut out = String::new();
    if plan.is_empty() && plan.undeclared.is_empty() {
        out.push_str("No changes: the cluster matches the catalog.\n");
        return out;
    }
    for change in &plan.changes {
        match change {
            Change::Create { configs, .. } => {
                let _ = writeln!(out, "  + {}", change.summary());
                for (key, value) in configs {
                    let _ = writeln!(out, "        {key} = {value}");
                }
            }
            Change::AddPartitions { .. } => {
                let _ = writeln!(out, "  ~ {}", change.summary());
            }
            Change::AlterConfigs { topic, changes } => {
                let _ = writeln!(out, "  ~ {topic}: configs");
                for c in changes {
                    let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(default)".into());
                    let _ = writeln!(
                        out,
                        "        {}: {} -> {}",
                        c.key,
                        show(&c.old),
                        show(&c.new)
                    );
                }
            }
            Change::Delete { .. } => {
                let _ = writeln!(out, "  - {}", change.summary());
            }
        }
    }
    for refusal in &plan.refusals {
        let _ = writeln!(out, "  ! {}: refused: {}", refusal.topic, refusal.reason);
    }
    for topic in &plan.undeclared {
        let _ = writeln!(
            out,
            "  ? {topic}: under a managed prefix but not in the catalog; kept (run with --allow-delete to delete it)"
        );
    }
    let count = |f: fn(&Change) -> bool| plan.changes.iter().filter(|c| f(c)).count();
    let _ = writeln!(
        out,
        "Plan: {} to create, {} to change, {} to delete, {} refused.",
        count(|c| matches!(c, Change::Create { .. })),
        count(|c| matches!(
            c,
            Change::AddPartitions { .. } | Change::AlterConfigs { .. }
        )),
        count(|c| matches!(c, Change::Delete { .. })),
        plan.refusals.len()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::TopicRole;

    fn desired(name: &str, partitions: i32, configs: &[(&str, &str)]) -> DesiredTopic {
        DesiredTopic {
            name: name.into(),
            role: TopicRole::Events,
            source: name.into(),
            partitions,
            replication_factor: 1,
            configs: configs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn live(partitions: i32, replicas: usize, configs: &[(&str, &str, bool)]) -> LiveTopic {
        LiveTopic {
            partitions: (0..partitions)
                .map(|id| LivePartition {
                    id,
                    leader: 1,
                    replicas: (1..=replicas as i32).collect(),
                })
                .collect(),
            configs: configs
                .iter()
                .map(|(k, v, explicit)| {
                    (
                        k.to_string(),
                        LiveConfig {
                            value: Some(v.to_string()),
                            explicit: *explicit,
                        },
                    )
                })
                .collect(),
        }
    }

    fn state(topics: Vec<(&str, LiveTopic)>) -> ClusterState {
        ClusterState {
            cluster_id: None,
            topics: topics
                .into_iter()
                .map(|(n, t)| (n.to_string(), t))
                .collect(),
        }
    }

    fn managed() -> Vec<String> {
        vec!["orders".into()]
    }

    #[test]
    fn missing_topics_are_created_with_their_configs() {
        let want = [desired("orders", 3, &[("retention.ms", "1000")])];
        let plan = plan(&want, &managed(), &ClusterState::default(), false);
        assert_eq!(
            plan.changes,
            [Change::Create {
                topic: "orders".into(),
                partitions: 3,
                replication_factor: 1,
                configs: [("retention.ms".to_string(), "1000".to_string())].into(),
            }]
        );
        let text = render(&plan);
        assert!(
            text.contains("+ create orders (3 partitions, replication factor 1)"),
            "{text}"
        );
        assert!(text.contains("retention.ms = 1000"), "{text}");
        assert!(
            text.contains("Plan: 1 to create, 0 to change, 0 to delete, 0 refused."),
            "{text}"
        );
    }

    #[test]
    fn a_matching_cluster_needs_nothing_and_broker_defaults_are_not_drift() {
        let want = [desired(
            "orders",
            3,
            &[
                ("retention.ms", "1000"),
                ("cleanup.policy", "compact,delete"),
            ],
        )];
        let have = state(vec![(
            "orders",
            live(
                3,
                1,
                &[
                    ("retention.ms", "1000", true),
                    ("cleanup.policy", "delete,compact", true),
                    // Defaults the catalog does not mention are not compared.
                    ("segment.ms", "604800000", false),
                    ("max.message.bytes", "1048588", false),
                ],
            ),
        )]);
        let plan = plan(&want, &managed(), &have, false);
        assert!(plan.is_empty(), "{plan:?}");
        assert_eq!(
            render(&plan),
            "No changes: the cluster matches the catalog.\n"
        );
    }

    #[test]
    fn a_declared_value_equal_to_the_default_is_no_drift() {
        // Brokers like tansu report every entry as a default: compare by value.
        let want = [desired("orders", 3, &[("retention.ms", "604800000")])];
        let have = state(vec![(
            "orders",
            live(3, 1, &[("retention.ms", "604800000", false)]),
        )]);
        assert!(plan(&want, &managed(), &have, false).is_empty());
    }

    #[test]
    fn config_drift_shows_old_and_new_per_key() {
        let want = [desired(
            "orders",
            3,
            &[("retention.ms", "2000"), ("min.insync.replicas", "1")],
        )];
        let have = state(vec![(
            "orders",
            live(
                3,
                1,
                &[
                    ("retention.ms", "1000", true),
                    ("segment.ms", "3600000", true),
                ],
            ),
        )]);
        let plan = plan(&want, &managed(), &have, false);
        assert_eq!(
            plan.changes,
            [Change::AlterConfigs {
                topic: "orders".into(),
                changes: vec![
                    ConfigChange {
                        key: "min.insync.replicas".into(),
                        old: None,
                        new: Some("1".into())
                    },
                    ConfigChange {
                        key: "retention.ms".into(),
                        old: Some("1000".into()),
                        new: Some("2000".into())
                    },
                    ConfigChange {
                        key: "segment.ms".into(),
                        old: Some("3600000".into()),
                        new: None
                    },
                ]
            }]
        );
        let text = render(&plan);
        assert!(text.contains("retention.ms: 1000 -> 2000"), "{text}");
        assert!(
            text.contains("min.insync.replicas: (default) -> 1"),
            "{text}"
        );
        assert!(text.contains("segment.ms: 3600000 -> (default)"), "{text}");
    }

    #[test]
    fn more_partitions_are_added_and_fewer_are_refused() {
        let have = state(vec![("orders", live(3, 1, &[]))]);
        let grow = plan(&[desired("orders", 6, &[])], &managed(), &have, false);
        assert_eq!(
            grow.changes,
            [Change::AddPartitions {
                topic: "orders".into(),
                from: 3,
                to: 6
            }]
        );
        assert!(render(&grow).contains("~ orders: partitions 3 -> 6"));
        let shrink = plan(&[desired("orders", 2, &[])], &managed(), &have, false);
        assert!(shrink.changes.is_empty());
        assert!(
            shrink.refusals[0]
                .reason
                .contains("Kafka cannot remove partitions"),
            "{shrink:?}"
        );
        assert!(render(&shrink).contains("! orders: refused:"));
    }

    #[test]
    fn a_replication_factor_change_is_refused() {
        let have = state(vec![("orders", live(3, 3, &[]))]);
        let plan = plan(&[desired("orders", 3, &[])], &managed(), &have, false);
        assert!(plan.changes.is_empty());
        assert!(
            plan.refusals[0]
                .reason
                .contains("replication factor 3 but the catalog asks for 1"),
            "{plan:?}"
        );
    }

    #[test]
    fn deletion_needs_the_flag_and_a_managed_prefix_and_never_touches_internals() {
        let have = state(vec![
            ("orders", live(3, 1, &[])),
            ("orders.retry.30s", live(3, 1, &[])),
            ("payments", live(3, 1, &[])),
            ("__consumer_offsets", live(50, 1, &[])),
        ]);
        let mut prefixes = managed();
        prefixes.push("__".into());
        let kept = plan(&[desired("orders", 3, &[])], &prefixes, &have, false);
        assert!(kept.changes.is_empty());
        assert_eq!(kept.undeclared, ["orders.retry.30s"]);
        assert!(render(&kept).contains("? orders.retry.30s: under a managed prefix but not in the catalog; kept (run with --allow-delete"));
        let deleted = plan(&[desired("orders", 3, &[])], &prefixes, &have, true);
        assert_eq!(
            deleted.changes,
            [Change::Delete {
                topic: "orders.retry.30s".into()
            }]
        );
        assert!(render(&deleted).contains("- delete orders.retry.30s"));
    }

    #[test]
    fn changes_name_the_api_that_carries_them_out() {
        let apis: Vec<_> = [
            Change::Create {
                topic: "t".into(),
                partitions: 1,
                replication_factor: 1,
                configs: BTreeMap::new(),
            },
            Change::AddPartitions {
                topic: "t".into(),
                from: 1,
                to: 2,
            },
            Change::AlterConfigs {
                topic: "t".into(),
                changes: vec![],
            },
            Change::Delete { topic: "t".into() },
        ]
        .iter()
        .map(Change::api)
        .collect();
        assert_eq!(
            apis,
            [
                "CreateTopics",
                "CreatePartitions",
                "IncrementalAlterConfigs",
                "DeleteTopics"
            ]
        );
    }

    #[test]
    fn plans_serialise_for_machines() {
        let plan = plan(
            &[desired("orders", 3, &[])],
            &managed(),
            &ClusterState::default(),
            false,
        );
        let json = serde_json::to_value(&plan).unwrap();
        assert_eq!(json["changes"][0]["action"], "create");
        assert_eq!(json["changes"][0]["topic"], "orders");
    }
}
