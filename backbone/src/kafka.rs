//! Kafka clients from the shared settings, and the embedded cluster behind
//! `embedded://`: librdkafka's mock cluster, hosted in-process.

use std::sync::mpsc;
use std::thread::JoinHandle;

use rdkafka::error::KafkaError;
use rdkafka::mocking::MockCluster;
use rdkafka::ClientConfig;

use crate::catalog::Catalog;
use crate::config::KafkaSettings;

pub use crate::config::EMBEDDED;

/// librdkafka's mock cluster on a thread of its own (its handle is not
/// `Send`), alive until dropped. It has no admin API, keeps at most about
/// 5 MiB per partition and is meant for development and tests.
#[derive(Debug)]
pub struct EmbeddedCluster {
    bootstrap_servers: String,
    commands: Option<mpsc::Sender<Command>>,
    thread: Option<JoinHandle<()>>,
}

/// What the cluster's thread can be asked to do.
enum Command {
    CreateTopic(EmbeddedTopic, mpsc::Sender<Result<(), KafkaError>>),
}

/// A topic to create on the embedded cluster.
#[derive(Debug, Clone)]
pub struct EmbeddedTopic {
    pub name: String,
    pub partitions: i32,
}

impl EmbeddedCluster {
    /// Starts a cluster of `brokers` brokers with `topics` created on it.
    pub fn start(brokers: i32, topics: Vec<EmbeddedTopic>) -> Result<Self, KafkaError> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (commands, inbox) = mpsc::channel::<Command>();
        let thread = std::thread::Builder::new()
            .name("embedded-kafka".into())
            .spawn(move || {
                let cluster = match MockCluster::new(brokers) {
                    Ok(cluster) => cluster,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                for topic in &topics {
                    if let Err(e) = cluster.create_topic(&topic.name, topic.partitions, 1) {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                }
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                // Ends when the handle is dropped.
                while let Ok(command) = inbox.recv() {
                    match command {
                        Command::CreateTopic(topic, reply) => {
                            let _ =
                                reply.send(cluster.create_topic(&topic.name, topic.partitions, 1));
                        }
                    }
                }
            })
            .map_err(|e| {
                KafkaError::ClientCreation(format!("cannot start the embedded cluster: {e}"))
            })?;
        let bootstrap_servers = ready_rx
            .recv()
            .map_err(|_| KafkaError::ClientCreation("the embedded cluster thread died".into()))??;
        Ok(Self {
            bootstrap_servers,
            commands: Some(commands),
            thread: Some(thread),
        })
    }

    /// Creates a topic through the mock cluster's own call (it has no admin API).
    pub fn create_topic(&self, topic: EmbeddedTopic) -> Result<(), KafkaError> {
        let gone = || KafkaError::ClientCreation("the embedded cluster has stopped".into());
        let (reply, answer) = mpsc::channel();
        self.commands
            .as_ref()
            .ok_or_else(gone)?
            .send(Command::CreateTopic(topic, reply))
            .map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }

    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }
}

impl Drop for EmbeddedCluster {
    fn drop(&mut self) {
        drop(self.commands.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A resolved Kafka endpoint: real bootstrap servers, or an embedded cluster
/// that lives as long as this value.
#[derive(Debug)]
pub struct KafkaConnection {
    bootstrap_servers: String,
    settings: KafkaSettings,
    embedded: Option<EmbeddedCluster>,
}

impl KafkaConnection {
    /// Resolves the settings; for `embedded://` starts the mock cluster with
    /// every topic the catalog wants (event, retry and dead-letter topics).
    pub fn connect(settings: &KafkaSettings, catalog: &Catalog) -> Result<Self, KafkaError> {
        Self::connect_with(settings, Some(catalog))
    }

    /// As [`KafkaConnection::connect`], but an embedded cluster starts empty:
    /// for provisioning, which creates the topics itself.
    pub fn connect_empty(settings: &KafkaSettings) -> Result<Self, KafkaError> {
        Self::connect_with(settings, None)
    }

    fn connect_with(
        settings: &KafkaSettings,
        catalog: Option<&Catalog>,
    ) -> Result<Self, KafkaError> {
        if settings.bootstrap_servers.trim() != EMBEDDED {
            return Ok(Self {
                bootstrap_servers: settings.bootstrap_servers.clone(),
                settings: settings.clone(),
                embedded: None,
            });
        }
        let topics = catalog
            .map(Catalog::desired_topics)
            .unwrap_or_default()
            .into_iter()
            .map(|t| EmbeddedTopic {
                name: t.name,
                partitions: t.partitions,
            })
            .collect::<Vec<_>>();
        let count = topics.len();
        let cluster = EmbeddedCluster::start(1, topics)?;
        tracing::info!(
            bootstrap_servers = cluster.bootstrap_servers(),
            topics = count,
            "Embedded Kafka cluster started in-process; it is gone when this process exits."
        );
        Ok(Self {
            bootstrap_servers: cluster.bootstrap_servers().to_owned(),
            settings: settings.clone(),
            embedded: Some(cluster),
        })
    }

    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// How long a fetch gap must last to be taken as real
    /// (`kafka.gap_confirmation_ms`).
    pub fn gap_confirmation(&self) -> std::time::Duration {
        self.settings.gap_confirmation()
    }

    pub fn is_embedded(&self) -> bool {
        self.embedded.is_some()
    }

    /// The embedded cluster, for provisioning through its own calls.
    pub fn embedded(&self) -> Option<&EmbeddedCluster> {
        self.embedded.as_ref()
    }

    /// A client config with the bootstrap servers, the request timeout and
    /// the pass-through properties set.
    pub fn client_config(&self) -> ClientConfig {
        client_config(&self.settings, &self.bootstrap_servers)
    }
}

/// The one place client configs are built: pass-through properties first,
/// so the settings shopstream owns cannot be overridden by them.
pub fn client_config(settings: &KafkaSettings, bootstrap_servers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (key, value) in &settings.client.0 {
        config.set(key, value);
    }
    let timeout = settings.request_timeout_ms.to_string();
    config
        .set("bootstrap.servers", bootstrap_servers)
        .set("socket.timeout.ms", &timeout)
        .set("socket.connection.setup.timeout.ms", &timeout);
    config
}
