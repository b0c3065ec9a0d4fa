//! The cluster side of provisioning: reading a cluster's live state and
//! carrying out a plan through the Kafka admin API, or through the mock
//! cluster's own calls for `embedded://`, which has no admin API.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{
    AdminClient, AdminOptions, ConfigSource, NewPartitions, NewTopic, OwnedResourceSpecifier,
    ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use serde::Serialize;

use crate::kafka::{EmbeddedCluster, EmbeddedTopic, KafkaConnection};
use crate::provision::{Change, ClusterState, LiveConfig, LivePartition, LiveTopic};

/// An admin request the cluster did not carry out, naming the API and the
/// broker so an operator knows what to look at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{api} on {broker}: {detail}")]
pub struct AdminError {
    pub api: &'static str,
    pub broker: String,
    pub detail: String,
}

/// A cluster to provision.
pub enum ProvisionTarget<'a> {
    /// Any Kafka-compatible cluster, through the admin API.
    Admin {
        client: AdminClient<DefaultClientContext>,
        broker: String,
        timeout: Duration,
    },
    /// The in-process mock cluster.
    Embedded {
        cluster: &'a EmbeddedCluster,
        connection: &'a KafkaConnection,
    },
}

impl std::fmt::Debug for ProvisionTarget<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.broker())
    }
}

/// How one change went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub change: Change,
    /// `None` when done, else why not.
    pub error: Option<String>,
}

impl<'a> ProvisionTarget<'a> {
    /// An admin target for `connection`, or the embedded cluster behind it.
    pub fn new(connection: &'a KafkaConnection, timeout: Duration) -> Result<Self, AdminError> {
        if let Some(cluster) = connection.embedded() {
            return Ok(Self::Embedded {
                cluster,
                connection,
            });
        }
        let broker = connection.bootstrap_servers().to_owned();
        let client = connection
            .client_config()
            .create()
            .map_err(|e| AdminError {
                api: "client",
                broker: broker.clone(),
                detail: e.to_string(),
            })?;
        Ok(Self::Admin {
            client,
            broker,
            timeout,
        })
    }

    pub fn broker(&self) -> &str {
        match self {
            Self::Admin { broker, .. } => broker,
            Self::Embedded { .. } => "the embedded cluster",
        }
    }

    pub fn is_embedded(&self) -> bool {
        matches!(self, Self::Embedded { .. })
    }

    /// Partitions, leaders and (where the broker can describe them) configs
    /// of every topic, plus the cluster id.
    pub async fn fetch_state(&self) -> Result<ClusterState, AdminError> {
        let unreachable = |api: &'static str, e: KafkaError| {
            AdminError {
            api,
            broker: self.broker().to_owned(),
            detail: format!("{e}; is the cluster reachable, and are the bootstrap servers and credentials right?"),
        }
        };
        let (metadata, cluster_id) = match self {
            Self::Admin {
                client, timeout, ..
            } => {
                let metadata = client
                    .inner()
                    .fetch_metadata(None, *timeout)
                    .map_err(|e| unreachable("Metadata", e))?;
                (metadata, client.inner().fetch_cluster_id(*timeout))
            }
            Self::Embedded { connection, .. } => {
                let client: AdminClient<DefaultClientContext> = connection
                    .client_config()
                    .create()
                    .map_err(|e| unreachable("Metadata", e))?;
                let metadata = client
                    .inner()
                    .fetch_metadata(None, Duration::from_secs(10))
                    .map_err(|e| unreachable("Metadata", e))?;
                (metadata, None)
            }
        };
        let mut state = ClusterState {
            cluster_id,
            topics: BTreeMap::new(),
        };
        for topic in metadata.topics() {
            if topic.error().is_some() {
                continue;
            }
            let partitions = topic
                .partitions()
                .iter()
                .map(|p| LivePartition {
                    id: p.id(),
                    leader: p.leader(),
                    replicas: p.replicas().to_vec(),
                })
                .collect();
            state.topics.insert(
                topic.name().to_owned(),
                LiveTopic {
                    partitions,
                    configs: BTreeMap::new(),
                },
            );
        }
        if let Self::Admin {
            client,
            timeout,
            broker,
        } = self
        {
            let names: Vec<String> = state
                .topics
                .keys()
                .filter(|n| !n.starts_with("__"))
                .cloned()
                .collect();
            let specifiers: Vec<ResourceSpecifier> =
                names.iter().map(|n| ResourceSpecifier::Topic(n)).collect();
            if !specifiers.is_empty() {
                let results = client
                    .describe_configs(&specifiers, &options(*timeout))
                    .await
                    .map_err(|e| api_error("DescribeConfigs", broker, e))?;
                for result in results {
                    let resource =
                        result.map_err(|code| api_error("DescribeConfigs", broker, code))?;
                    let OwnedResourceSpecifier::Topic(name) = &resource.specifier else {
                        continue;
                    };
                    let Some(topic) = state.topics.get_mut(name) else {
                        continue;
                    };
                    for entry in resource.entries {
                        let explicit = matches!(entry.source, ConfigSource::DynamicTopic);
                        topic.configs.insert(
                            entry.name,
                            LiveConfig {
                                value: entry.value,
                                explicit,
                            },
                        );
                    }
                }
            }
        }
        Ok(state)
    }

    /// Carries out the changes in order, each independently: a failure is
    /// recorded and the rest still run, so a rerun has less left to do.
    pub async fn apply(&self, changes: &[Change]) -> Vec<Outcome> {
        let mut outcomes = Vec::with_capacity(changes.len());
        for change in changes {
            let result = match self {
                Self::Admin {
                    client,
                    broker,
                    timeout,
                } => apply_admin(client, broker, *timeout, change).await,
                Self::Embedded { cluster, .. } => apply_embedded(cluster, change),
            };
            if let Err(e) = &result {
                tracing::warn!(change = %change.summary(), error = %e, "Change failed.");
            } else {
                tracing::info!(change = %change.summary(), "Change applied.");
            }
            outcomes.push(Outcome {
                change: change.clone(),
                error: result.err().map(|e| e.to_string()),
            });
        }
        outcomes
    }
}

fn options(timeout: Duration) -> AdminOptions {
    AdminOptions::new()
        .request_timeout(Some(timeout))
        .operation_timeout(Some(timeout))
}

/// Names the API; adds a hint where the error suggests the broker lacks it.
fn api_error(api: &'static str, broker: &str, error: impl std::fmt::Display) -> AdminError {
    let text = error.to_string();
    let lacking = [
        "UnsupportedVersion",
        "UnsupportedFeature",
        "not supported",
        "InvalidRequest",
        "Invalid request",
        "timed out",
        "TimedOut",
    ];
    let detail = if lacking.iter().any(|w| text.contains(w)) {
        format!("{text} (the broker may not support {api})")
    } else if text.contains("uthoriz") {
        format!("{text} (the configured principal is not allowed to run {api})")
    } else {
        text
    };
    AdminError {
        api,
        broker: broker.to_owned(),
        detail,
    }
}

async fn apply_admin(
    client: &AdminClient<DefaultClientContext>,
    broker: &str,
    timeout: Duration,
    change: &Change,
) -> Result<(), AdminError> {
    let api = change.api();
    let fail = |e: &dyn std::fmt::Display| api_error(api, broker, e);
    let per_topic =
        |results: Vec<Result<String, (String, RDKafkaErrorCode)>>| -> Result<(), AdminError> {
            match results.into_iter().find_map(Result::err) {
                Some((_, code)) => Err(fail(&code)),
                None => Ok(()),
            }
        };
    match change {
        Change::Create {
            topic,
            partitions,
            replication_factor,
            configs,
        } => {
            let mut new = NewTopic::new(
                topic,
                *partitions,
                TopicReplication::Fixed(*replication_factor as i32),
            );
            for (key, value) in configs {
                new = new.set(key, value);
            }
            per_topic(
                client
                    .create_topics([&new], &options(timeout))
                    .await
                    .map_err(|e| fail(&e))?,
            )
        }
        Change::AddPartitions { topic, to, .. } => {
            let new = NewPartitions::new(topic, *to as usize);
            per_topic(
                client
                    .create_partitions([&new], &options(timeout))
                    .await
                    .map_err(|e| fail(&e))?,
            )
        }
        Change::Delete { topic } => per_topic(
            client
                .delete_topics(&[topic.as_str()], &options(timeout))
                .await
                .map_err(|e| fail(&e))?,
        ),
        Change::AlterConfigs { topic, changes } => {
            incremental::alter_topic_configs(client, topic, changes, timeout).map_err(|e| fail(&e))
        }
    }
}

fn apply_embedded(cluster: &EmbeddedCluster, change: &Change) -> Result<(), AdminError> {
    match change {
        Change::Create { topic, partitions, .. } => cluster
            .create_topic(EmbeddedTopic { name: topic.clone(), partitions: *partitions })
            .map_err(|e| AdminError { api: "CreateTopics", broker: "the embedded cluster".into(), detail: e.to_string() }),
        other => Err(AdminError {
            api: other.api(),
            broker: "the embedded cluster".into(),
            detail: "librdkafka's mock cluster has no admin API; only topic creation is possible, through its own call".into(),
        }),
    }
}

/// IncrementalAlterConfigs (KIP-339) through librdkafka's C API: it sets and
/// deletes single keys. The older AlterConfigs that rdkafka wraps replaces
/// a topic's whole config set, which could silently drop overrides.
#[allow(unsafe_code)]
mod incremental {
    use std::ffi::{CStr, CString};
    use std::time::Duration;

    use rdkafka::admin::AdminClient;
    use rdkafka::client::DefaultClientContext;
    use rdkafka_sys as sys;

    use crate::provision::ConfigChange;

    pub fn alter_topic_configs(
        client: &AdminClient<DefaultClientContext>,
        topic: &str,
        changes: &[ConfigChange],
        timeout: Duration,
    ) -> Result<(), String> {
        let rk = client.inner().native_ptr();
        let name = CString::new(topic).map_err(|e| e.to_string())?;
        // SAFETY: every pointer comes from librdkafka and is destroyed once,
        // below; strings outlive the calls that read them.
        unsafe {
            let resource = sys::rd_kafka_ConfigResource_new(
                sys::rd_kafka_ResourceType_t::RD_KAFKA_RESOURCE_TOPIC,
                name.as_ptr(),
            );
            for change in changes {
                let key = CString::new(change.key.as_str()).map_err(|e| e.to_string())?;
                let value = CString::new(change.new.clone().unwrap_or_default())
                    .map_err(|e| e.to_string())?;
                let op = match change.new {
                    Some(_) => sys::rd_kafka_AlterConfigOpType_t::RD_KAFKA_ALTER_CONFIG_OP_TYPE_SET,
                    None => sys::rd_kafka_AlterConfigOpType_t::RD_KAFKA_ALTER_CONFIG_OP_TYPE_DELETE,
                };
                let value_ptr = if change.new.is_some() {
                    value.as_ptr()
                } else {
                    std::ptr::null()
                };
                let error = sys::rd_kafka_ConfigResource_add_incremental_config(
                    resource,
                    key.as_ptr(),
                    op,
                    value_ptr,
                );
                if !error.is_null() {
                    let text = CStr::from_ptr(sys::rd_kafka_error_string(error))
                        .to_string_lossy()
                        .into_owned();
                    sys::rd_kafka_error_destroy(error);
                    sys::rd_kafka_ConfigResource_destroy(resource);
                    return Err(text);
                }
            }
            let options = sys::rd_kafka_AdminOptions_new(
                rk,
                sys::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_INCREMENTALALTERCONFIGS,
            );
            let mut errstr = [0 as std::os::raw::c_char; 512];
            sys::rd_kafka_AdminOptions_set_request_timeout(
                options,
                timeout.as_millis() as i32,
                errstr.as_mut_ptr(),
                errstr.len(),
            );
            let queue = sys::rd_kafka_queue_new(rk);
            let mut resources = [resource];
            sys::rd_kafka_IncrementalAlterConfigs(rk, resources.as_mut_ptr(), 1, options, queue);
            // The request itself is bounded by the request timeout; wait a little longer.
            let event =
                sys::rd_kafka_queue_poll(queue, (timeout.as_millis() as i32).saturating_add(5_000));
            let result = if event.is_null() {
                Err(format!("no answer within {timeout:?}"))
            } else if sys::rd_kafka_event_error(event)
                != sys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
            {
                Err(CStr::from_ptr(sys::rd_kafka_event_error_string(event))
                    .to_string_lossy()
                    .into_owned())
            } else {
                let answer = sys::rd_kafka_event_IncrementalAlterConfigs_result(event);
                let mut count = 0usize;
                let answered =
                    sys::rd_kafka_IncrementalAlterConfigs_result_resources(answer, &mut count);
                let mut outcome = Ok(());
                for i in 0..count {
                    let r = *answered.add(i);
                    if sys::rd_kafka_ConfigResource_error(r)
                        != sys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
                    {
                        let message = sys::rd_kafka_ConfigResource_error_string(r);
                        let code = sys::rd_kafka_ConfigResource_error(r);
                        let text = if message.is_null() {
                            format!("{:?}", rdkafka::types::RDKafkaErrorCode::from(code))
                        } else {
                            CStr::from_ptr(message).to_string_lossy().into_owned()
                        };
                        outcome = Err(text);
                    }
                }
                outcome
            };
            if !event.is_null() {
                sys::rd_kafka_event_destroy(event);
            }
            sys::rd_kafka_queue_destroy(queue);
            sys::rd_kafka_AdminOptions_destroy(options);
            sys::rd_kafka_ConfigResource_destroy(resource);
            result
        }
    }
}
