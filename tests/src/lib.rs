//! The test environment: hands each test a Kafka and a ClickHouse.
//!
//! Kafka, in order of preference: the cluster in `KAFKA_BOOTSTRAP_SERVERS`;
//! `apache/kafka` through testcontainers when a Docker engine answers;
//! otherwise the embedded mock cluster. ClickHouse likewise: `CLICKHOUSE_URL`;
//! a pinned `clickhouse/clickhouse-server` container; otherwise a private
//! `clickhouse-server` from PATH in a temporary directory on a free port.
//! Each test binary shares one of each; tests stay apart through random topic,
//! group and database names. Tests that inject faults take a mock cluster of
//! their own from [`mock_cluster`].

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use backbone::catalog::Catalog;
use backbone::config::KafkaSettings;
use backbone::events::EventType;
use backbone::kafka::{EmbeddedCluster, EmbeddedTopic, KafkaConnection};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::ClientConfig;
use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage};
use testcontainers_modules::kafka::apache::{Kafka, KAFKA_PORT};
use tokio::sync::OnceCell;

pub mod outage;
pub mod proxy;

/// The ClickHouse image used when Docker is available; pinned so results
/// do not move under us.
pub const CLICKHOUSE_IMAGE: (&str, &str) = ("clickhouse/clickhouse-server", "24.8.14.39");

/// A unique name for a topic, group or database in one test run.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Where the shared Kafka came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KafkaSource {
    /// `KAFKA_BOOTSTRAP_SERVERS`: a real broker process.
    External,
    /// An `apache/kafka` container.
    Container,
    /// librdkafka's mock cluster in this process.
    Embedded,
}

/// The Kafka shared by one test binary.
#[derive(Debug)]
pub struct TestKafka {
    pub source: KafkaSource,
    bootstrap_servers: String,
    embedded: Option<EmbeddedCluster>,
    _container: Option<ContainerAsync<Kafka>>,
}

static KAFKA: OnceCell<TestKafka> = OnceCell::const_new();
static CLICKHOUSE: OnceCell<TestClickHouse> = OnceCell::const_new();

/// The shared Kafka, started on first use.
pub async fn kafka() -> &'static TestKafka {
    KAFKA
        .get_or_init(|| async { TestKafka::start().await.expect("a Kafka for the tests") })
        .await
}

/// The shared ClickHouse, started on first use.
pub async fn clickhouse() -> &'static TestClickHouse {
    CLICKHOUSE
        .get_or_init(|| async {
            TestClickHouse::start()
                .await
                .expect("a ClickHouse for the tests")
        })
        .await
}

/// A mock cluster owned by one test, for fault injection (brokers down,
/// request errors, leader moves). It is not `Send`: keep it in the test body.
pub fn mock_cluster(brokers: i32) -> MockCluster<'static, DefaultProducerContext> {
    MockCluster::new(brokers).expect("librdkafka mock cluster")
}

/// What this test process logs through `tracing`, librdkafka's log
/// included (rdkafka's `tracing` feature).
#[derive(Debug, Clone, Default)]
pub struct CapturedLog(Arc<Mutex<Vec<u8>>>);

impl CapturedLog {
    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log lock")).into_owned()
    }
}

impl Write for CapturedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The process's log from the first call on, at `level` and above: the
/// first call installs the process's subscriber, later ones share it.
pub fn captured_log(level: tracing::Level) -> &'static CapturedLog {
    static LOG: OnceLock<CapturedLog> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = CapturedLog::default();
        let writer = log.clone();
        tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        log
    })
}

/// Whether a Docker engine answers (the client alone is not enough).
pub fn docker_available() -> bool {
    Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl TestKafka {
    async fn start() -> anyhow::Result<Self> {
        if let Ok(servers) = std::env::var("KAFKA_BOOTSTRAP_SERVERS") {
            if !servers.trim().is_empty() {
                return Ok(Self {
                    source: KafkaSource::External,
                    bootstrap_servers: servers,
                    embedded: None,
                    _container: None,
                });
            }
        }
        if docker_available() {
            let container = Kafka::default()
                .start()
                .await
                .context("starting apache/kafka")?;
            let port = container.get_host_port_ipv4(KAFKA_PORT).await?;
            return Ok(Self {
                source: KafkaSource::Container,
                bootstrap_servers: format!("127.0.0.1:{port}"),
                embedded: None,
                _container: Some(container),
            });
        }
        let cluster = EmbeddedCluster::start(1, Vec::new())?;
        Ok(Self {
            source: KafkaSource::Embedded,
            bootstrap_servers: cluster.bootstrap_servers().to_owned(),
            embedded: Some(cluster),
            _container: None,
        })
    }

    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// A client config pointing at this Kafka.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap_servers);
        config
    }

    /// Reads `count` records from `topics` from the beginning with a fresh
    /// group; fails if they do not arrive within `limit`.
    pub async fn consume(
        &self,
        topics: &[&str],
        count: usize,
        limit: Duration,
    ) -> anyhow::Result<Vec<OwnedMessage>> {
        consume(&self.bootstrap_servers, topics, count, limit).await
    }

    /// Creates a topic with a random name under `prefix` and returns the name.
    pub async fn topic(&self, prefix: &str, partitions: i32) -> anyhow::Result<String> {
        let name = unique_name(prefix);
        self.create_topic(&name, partitions).await?;
        Ok(name)
    }

    /// Creates `name` through the admin API, or the mock cluster's own call.
    pub async fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        if let Some(cluster) = &self.embedded {
            cluster.create_topic(EmbeddedTopic {
                name: name.to_owned(),
                partitions,
            })?;
            return Ok(());
        }
        create_topic_through_admin(&self.client_config(), name, partitions).await
    }
}

/// Creates `name` with `partitions` through the admin API of the broker
/// `config` names (CreateTopics: a real broker; the mock cluster has none).
/// An existing topic of that name is kept.
pub async fn create_topic_through_admin(
    config: &ClientConfig,
    name: &str,
    partitions: i32,
) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = config.create()?;
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics([&topic], &options).await? {
        match result {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => bail!("creating topic {topic}: {code}"),
        }
    }
    Ok(())
}

/// Reads `count` records from `topics` on `bootstrap_servers` from the
/// beginning with a fresh group; fails if they do not arrive within `limit`.
/// A record fetched past a gap is refused and its partition read again from
/// the gap: tansu 0.6.0 can answer a fetch before it stores a record it
/// numbered (see `consumers::continuity`), and a reader that went on would
/// never see that record.
pub async fn consume(
    bootstrap_servers: &str,
    topics: &[&str],
    count: usize,
    limit: Duration,
) -> anyhow::Result<Vec<OwnedMessage>> {
    use rdkafka::message::Message;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap_servers)
        .set("group.id", unique_name("group"))
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(topics)?;
    let deadline = Instant::now() + limit;
    let mut out = Vec::with_capacity(count);
    let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
    while out.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = match tokio::time::timeout(left, consumer.recv()).await {
            Ok(message) => message?.detach(),
            Err(_) => bail!(
                "{} of {count} records from {topics:?} within {limit:?}",
                out.len()
            ),
        };
        let at = (message.topic().to_owned(), message.partition());
        match next.get(&at) {
            Some(&expected) if message.offset() < expected => continue,
            Some(&expected) if message.offset() > expected => {
                consumer.seek(
                    &at.0,
                    at.1,
                    rdkafka::Offset::Offset(expected),
                    Duration::from_secs(1),
                )?;
                continue;
            }
            _ => {}
        }
        next.insert(at, message.offset() + 1);
        out.push(message);
    }
    Ok(out)
}

/// A header's value as text, if the record has it.
pub fn header<'a>(message: &'a OwnedMessage, name: &str) -> Option<&'a str> {
    use rdkafka::message::Message;
    backbone::headers::value(message.headers()?, name).and_then(|v| std::str::from_utf8(v).ok())
}

/// The ClickHouse shared by one test binary.
#[derive(Debug)]
pub struct TestClickHouse {
    url: String,
    _server: Option<LocalServer>,
    _container: Option<ContainerAsync<GenericImage>>,
}

/// A database created for one test, with a client bound to it.
#[derive(Clone)]
pub struct TestDatabase {
    pub name: String,
    pub url: String,
    pub client: clickhouse::Client,
}

impl std::fmt::Debug for TestDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestDatabase")
            .field("name", &self.name)
            .field("url", &self.url)
            .finish()
    }
}

/// A client as shopstream uses it against any server version: no
/// compression (18.16 returns no rows to compressed reads) and no schema
/// validation (18.16 lacks RowBinaryWithNamesAndTypes).
pub fn clickhouse_client(url: &str) -> clickhouse::Client {
    clickhouse::Client::default()
        .with_url(url)
        .with_compression(clickhouse::Compression::None)
        .with_validation(false)
}

impl TestClickHouse {
    async fn start() -> anyhow::Result<Self> {
        if let Ok(url) = std::env::var("CLICKHOUSE_URL") {
            if !url.trim().is_empty() {
                wait_for_ping(&url, Duration::from_secs(30)).await?;
                return Ok(Self {
                    url,
                    _server: None,
                    _container: None,
                });
            }
        }
        if docker_available() {
            let (image, tag) = CLICKHOUSE_IMAGE;
            let container = GenericImage::new(image, tag)
                .with_exposed_port(8123.tcp())
                .with_wait_for(WaitFor::Nothing)
                .start()
                .await
                .context("starting the ClickHouse container")?;
            let port = container.get_host_port_ipv4(8123).await?;
            let url = format!("http://127.0.0.1:{port}");
            wait_for_ping(&url, Duration::from_secs(60)).await?;
            return Ok(Self {
                url,
                _server: None,
                _container: Some(container),
            });
        }
        let server = LocalServer::start()?;
        let url = format!("http://127.0.0.1:{}", server.http_port);
        wait_for_ping(&url, Duration::from_secs(60))
            .await
            .with_context(|| {
                format!(
                    "clickhouse-server did not answer; its log is in {}",
                    server.dir.display()
                )
            })?;
        Ok(Self {
            url,
            _server: Some(server),
            _container: None,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Creates a fresh database for one test.
    pub async fn database(&self) -> anyhow::Result<TestDatabase> {
        let name = unique_name("test").replace('-', "_");
        let client = clickhouse_client(&self.url);
        client
            .query(&format!("CREATE DATABASE `{name}`"))
            .execute()
            .await?;
        Ok(TestDatabase {
            client: client.with_database(&name),
            url: self.url.clone(),
            name,
        })
    }
}

async fn wait_for_ping(url: &str, limit: Duration) -> anyhow::Result<()> {
    let client = clickhouse_client(url);
    let start = Instant::now();
    loop {
        match client.query("SELECT 1").fetch_one::<u8>().await {
            Ok(_) => return Ok(()),
            Err(e) if start.elapsed() > limit => {
                bail!("ClickHouse at {url} did not answer within {limit:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// A private clickhouse-server started by `scripts/clickhouse-local`, which
/// stops it and removes its directory when this test process exits.
#[derive(Debug)]
struct LocalServer {
    dir: PathBuf,
    http_port: u16,
    _watcher: Child,
}

impl LocalServer {
    fn start() -> anyhow::Result<Self> {
        let script = repo_root().join("scripts/clickhouse-local");
        let dir = std::env::temp_dir().join(unique_name("shopstream-clickhouse"));
        let (http_port, tcp_port) = (free_port()?, free_port()?);
        let watcher = Command::new(&script)
            .arg(&dir)
            .arg(http_port.to_string())
            .arg(tcp_port.to_string())
            .arg(std::process::id().to_string())
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("running {}", script.display()))?;
        Ok(Self {
            dir,
            http_port,
            _watcher: watcher,
        })
    }
}

/// The four event topics (3 partitions each, every topic's DLQ, plus what
/// `topic_extra` adds to each catalog entry, such as retry tiers) in a
/// catalog file, on a mock cluster of their own that other processes reach
/// over loopback, or on a real broker.
pub struct EventTopics {
    pub dir: tempfile::TempDir,
    /// The mock cluster holding the topics; `None` on a real broker.
    mock: Option<MockCluster<'static, DefaultProducerContext>>,
    bootstrap_servers: String,
    pub catalog: Catalog,
    pub connection: KafkaConnection,
}

impl std::fmt::Debug for EventTopics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventTopics")
            .field("catalog", &self.catalog_path())
            .field("bootstrap_servers", &self.bootstrap_servers)
            .finish()
    }
}

/// A scenario run on each broker, as `$name::on_the_mock_cluster` and
/// `$name::on_a_real_broker` (tansu in scripts/test): `$scenario` with
/// `$broker` bound to the one in hand.
#[macro_export]
macro_rules! on_both_brokers {
    ($(#[$doc:meta])* $name:ident: |$broker:ident| $scenario:expr) => {
        $(#[$doc])*
        mod $name {
            use super::*;

            #[test]
            fn on_the_mock_cluster() {
                let $broker = $crate::Broker::Mock;
                $crate::run_scenario($scenario);
            }

            #[test]
            fn on_a_real_broker() {
                let $broker = $crate::Broker::Real;
                $crate::run_scenario($scenario);
            }
        }
    };
}

/// Runs a scenario on a runtime of its own (four worker threads), then
/// gives the runtime ten seconds to stop. `#[tokio::test]` would wait
/// without end for what the scenario left running: a worker's Kafka
/// consumer dropped mid-rebalance, or a blocking task on a broker gone,
/// turned a failed assertion into a test binary that never ended.
pub fn run_scenario(scenario: impl std::future::Future<Output = ()>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let outcome =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runtime.block_on(scenario)));
    runtime.shutdown_timeout(Duration::from_secs(10));
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// The broker of one test, as it chose: a mock cluster of its own, hosted
/// over loopback so processes reach it too, or the real broker.
#[derive(Debug)]
pub struct TestBroker {
    bootstrap_servers: String,
    mock: Option<EmbeddedCluster>,
}

impl TestBroker {
    pub fn on(broker: Broker) -> Self {
        match broker {
            Broker::Real => Self {
                bootstrap_servers: Broker::real_bootstrap_servers(),
                mock: None,
            },
            Broker::Mock => {
                let cluster = EmbeddedCluster::start(1, Vec::new()).expect("mock cluster");
                Self {
                    bootstrap_servers: cluster.bootstrap_servers().to_owned(),
                    mock: Some(cluster),
                }
            }
        }
    }

    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// Creates `name`: the mock cluster's own call, or the admin API.
    pub async fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        match &self.mock {
            Some(cluster) => Ok(cluster.create_topic(EmbeddedTopic {
                name: name.to_owned(),
                partitions,
            })?),
            None => {
                let mut config = ClientConfig::new();
                config.set("bootstrap.servers", &self.bootstrap_servers);
                create_topic_through_admin(&config, name, partitions).await
            }
        }
    }
}

/// Which broker a test's topics live on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    /// A mock cluster of the test's own.
    Mock,
    /// The real broker in `KAFKA_BOOTSTRAP_SERVERS` (tansu in scripts/test).
    Real,
}

impl Broker {
    /// The real broker's bootstrap servers; a test that must run on one
    /// fails without it rather than pass on the mock cluster alone.
    pub fn real_bootstrap_servers() -> String {
        std::env::var("KAFKA_BOOTSTRAP_SERVERS")
            .ok()
            .filter(|s| !s.trim().is_empty())
            .expect("KAFKA_BOOTSTRAP_SERVERS names a real broker (scripts/test starts tansu)")
    }
}

impl EventTopics {
    pub fn new(topic_extra: &str) -> Self {
        Self::with_brokers(1, topic_extra)
    }

    /// On `brokers` brokers, every partition replicated to each of them, so
    /// a broker can go down and leaders can move.
    pub fn with_brokers(brokers: i32, topic_extra: &str) -> Self {
        let cluster = mock_cluster(brokers);
        let (dir, catalog) = Self::catalog(topic_extra);
        for topic in catalog.desired_topics() {
            cluster
                .create_topic(&topic.name, topic.partitions, brokers)
                .expect("topic");
        }
        Self::connect(dir, catalog, cluster.bootstrap_servers(), Some(cluster))
    }

    /// On `broker`: a mock cluster of their own, or the real broker (topics
    /// created through its admin API).
    pub fn on(broker: Broker, topic_extra: &str) -> Self {
        match broker {
            Broker::Mock => Self::new(topic_extra),
            Broker::Real => Self::at(Broker::real_bootstrap_servers(), topic_extra),
        }
    }

    /// On the real broker at `bootstrap_servers` (topics created through
    /// its admin API).
    pub fn at(bootstrap_servers: String, topic_extra: &str) -> Self {
        let (dir, catalog) = Self::catalog(topic_extra);
        let topics = Self::connect(dir, catalog, bootstrap_servers, None);
        for topic in topics.catalog.desired_topics() {
            topics.create_topic(&topic.name, topic.partitions);
        }
        topics
    }

    /// The catalog file, with fresh topic names.
    fn catalog(topic_extra: &str) -> (tempfile::TempDir, Catalog) {
        let dir = tempfile::tempdir().expect("tempdir");
        let schemas = repo_root().join("schemas");
        let mut text = String::from("defaults: {partitions: 3, replication_factor: 1}\ntopics:\n");
        for (event, key) in [
            ("user_event", "user_id"),
            ("order_event", "order_id"),
            ("chat_message", "room_id"),
            ("search_query", "user_id"),
        ] {
            text.push_str(&format!(
                "  - name: {}\n    schema: {}/{event}\n    key: {key}\n{topic_extra}",
                unique_name(event).replace('_', "-"),
                schemas.display()
            ));
        }
        let path = dir.path().join("topics.yaml");
        std::fs::write(&path, text).expect("catalog");
        let catalog = Catalog::load(&path, None).expect("catalog loads");
        (dir, catalog)
    }

    fn connect(
        dir: tempfile::TempDir,
        catalog: Catalog,
        bootstrap_servers: String,
        mock: Option<MockCluster<'static, DefaultProducerContext>>,
    ) -> Self {
        let connection = KafkaConnection::connect(
            &KafkaSettings {
                bootstrap_servers: bootstrap_servers.clone(),
                ..KafkaSettings::default()
            },
            &catalog,
        )
        .expect("connects");
        Self {
            dir,
            mock,
            bootstrap_servers,
            catalog,
            connection,
        }
    }

    /// The mock cluster, for fault injection; the topics must be on one.
    pub fn cluster(&self) -> &MockCluster<'static, DefaultProducerContext> {
        self.mock
            .as_ref()
            .expect("fault injection needs the topics on a mock cluster")
    }

    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// Whether the topics are on a mock cluster rather than a real broker.
    pub fn on_mock_cluster(&self) -> bool {
        self.mock.is_some()
    }

    /// Creates `name` beside the event topics (an existing one is kept).
    pub fn create_topic(&self, name: &str, partitions: i32) {
        if let Some(cluster) = &self.mock {
            cluster.create_topic(name, partitions, 1).expect("topic");
            return;
        }
        futures::executor::block_on(create_topic_through_admin(
            &self.connection.client_config(),
            name,
            partitions,
        ))
        .expect("topic created");
    }

    pub fn catalog_path(&self) -> PathBuf {
        self.dir.path().join("topics.yaml")
    }

    /// The catalog topic carrying `event`.
    pub fn topic(&self, event: EventType) -> &str {
        &self
            .catalog
            .topics
            .iter()
            .find(|t| t.event == event)
            .expect("topic")
            .name
    }

    /// Every non-empty partition's last offset, for knowing when a consumer
    /// has caught up. On a real broker the records just past each high
    /// watermark are read too: tansu 0.6.0 reports them 1-2 records low.
    pub fn ends(&self) -> BTreeMap<(String, i32), i64> {
        use rdkafka::message::Message;
        let probe: BaseConsumer = self
            .connection
            .client_config()
            .set("group.id", unique_name("ends"))
            .set("enable.auto.commit", "false")
            .create()
            .expect("probe");
        let mut out = BTreeMap::new();
        let mut past_the_watermarks = rdkafka::TopicPartitionList::new();
        for topic in &self.catalog.topics {
            for partition in 0..topic.partitions {
                let (low, high) = probe
                    .fetch_watermarks(&topic.name, partition, Duration::from_secs(5))
                    .expect("watermarks");
                if high > 0 {
                    out.insert((topic.name.clone(), partition), high - 1);
                }
                past_the_watermarks
                    .add_partition_offset(
                        &topic.name,
                        partition,
                        rdkafka::Offset::Offset(high.max(low)),
                    )
                    .expect("partition list");
            }
        }
        if self.mock.is_some() {
            return out;
        }
        probe.assign(&past_the_watermarks).expect("assign");
        // Long enough for the first fetch of every partition on a loaded
        // machine; the records are stored already (the publisher has its acks).
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < Duration::from_millis(1500) {
            match probe.poll(Duration::from_millis(100)) {
                Some(Ok(record)) => {
                    quiet_since = Instant::now();
                    let end = out
                        .entry((record.topic().to_owned(), record.partition()))
                        .or_default();
                    *end = (*end).max(record.offset());
                }
                Some(Err(error)) => panic!("reading past the high watermarks: {error}"),
                None => {}
            }
        }
        out
    }
}

/// A private clickhouse-server a test stops and starts (same data, same
/// port), for outage tests.
#[derive(Debug)]
pub struct StoppableClickHouse {
    dir: PathBuf,
    ports: (u16, u16),
    server: Option<Child>,
}

impl StoppableClickHouse {
    pub fn start(dir: &Path) -> Self {
        let mut server = Self {
            dir: dir.to_owned(),
            ports: (free_port().expect("port"), free_port().expect("port")),
            server: None,
        };
        server.resume();
        server
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.0)
    }

    pub fn resume(&mut self) {
        self.server = Some(
            Command::new(repo_root().join("scripts/clickhouse-local"))
                .arg(&self.dir)
                .args([self.ports.0.to_string(), self.ports.1.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("clickhouse-server starts"),
        );
    }

    /// SIGTERM, and SIGKILL when the server has not stopped two minutes later
    /// (a graceful stop waits for open connections; what it acknowledged is
    /// on disk either way).
    pub fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            if terminate_within(&mut server, Duration::from_secs(120)).is_none() {
                let _ = server.kill();
                let _ = server.wait();
            }
        }
    }

    /// SIGKILL: gone at once, as in a crash or an OOM kill (a graceful stop
    /// waits for open connections and can take most of a minute).
    pub fn crash(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
    }

    pub async fn ready(&self) {
        let client = clickhouse_client(&self.url());
        let started = Instant::now();
        while client.query("SELECT 1").fetch_one::<u8>().await.is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "ClickHouse did not start"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for StoppableClickHouse {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port nothing listens on right now, for a service the test starts
/// (or restarts) on it a moment later. It lies below the kernel's ephemeral
/// range: a port from that range (what binding port 0 gives) can be taken
/// in the meantime as the source port of any outgoing connection, which
/// made a worker or analytics job fail to start with "Address already in
/// use". Each call in a process tries the next port of the range from an
/// offset of its own, so two tests never get the same one.
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOWEST: u32 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral.saturating_sub(LOWEST).max(1_000);
    let offset = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let port = LOWEST + (offset + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = u16::try_from(port).context("port range")?;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port between {LOWEST} and {}", LOWEST + span)
}

/// The directory `cargo test --workspace` (or `cargo build --bins`) built
/// every binary into: `target/<profile>`, beside this test binary's `deps`.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .to_path_buf();
    for bin in [
        "shopstream-topics",
        "shopstream-worker",
        "shopstream-analytics",
        "shopstream-publish",
        "shopstream-check",
        "shopstream-query",
    ] {
        assert!(
            dir.join(bin).exists(),
            "{} is missing: build every binary first (cargo test --workspace or cargo build --bins)",
            dir.join(bin).display()
        );
    }
    dir
}

/// Child processes killed however a test ends: one left running keeps the
/// test runner's output open.
#[derive(Debug, Default)]
pub struct Children(pub Vec<std::process::Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A `/metrics` exposition (`format`: `prometheus` or `openmetrics`) as
/// the Prometheus project's own Python parser reads it
/// (`tests/metrics_parse.py`): one object per family, each sample as
/// `[name, labels, value, exemplar labels or null]`. Panics, naming
/// `binary`, when it does not parse.
pub fn parse_exposition(binary: &str, format: &str, body: &str) -> Vec<serde_json::Value> {
    let file = tempfile::NamedTempFile::new().expect("a temporary file");
    std::fs::write(file.path(), body).expect("the exposition written");
    let output = succeeds(
        std::process::Command::new("python3")
            .arg(repo_root().join("tests/metrics_parse.py"))
            .arg(format)
            .arg(file.path()),
        &format!("{binary}'s {format} exposition parses (scripts/test installs prometheus-client):\n{body}"),
    );
    serde_json::from_slice(&output.stdout).expect("the parser's JSON")
}

/// Runs `command` to its end and returns its output; panics with `what`
/// and the command's stderr unless it succeeded.
pub fn succeeds(command: &mut std::process::Command, what: &str) -> std::process::Output {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("{what}: {command:?} does not start: {error}"));
    assert!(
        output.status.success(),
        "{what}: {command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// `child`'s exit status once it exits, waiting at most `limit` (None:
/// still running then). A test waits on a process through this, never
/// through `Child::wait` alone: a process that does not exit fails the test
/// instead of hanging the whole run.
pub fn exit_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("waiting on a child process") {
            return Some(status);
        }
        if started.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How many finished statements on `client`'s database ClickHouse's
/// query log holds `LIKE like`, once it holds every statement finished
/// before the call. 18.16 logs from a queue a thread of its own empties,
/// and `SYSTEM FLUSH LOGS` writes only what that thread took from it: on
/// a fresh server a count came out one short. So a statement of ours is
/// sent first, and the log flushed until it holds it (the queue is in
/// order: every earlier statement is there too).
pub async fn logged(client: &clickhouse::Client, like: &str) -> u64 {
    let sentinel = format!("logged up to {}", uuid::Uuid::new_v4());
    client
        .query(&format!("SELECT '{sentinel}'"))
        .fetch_one::<String>()
        .await
        .expect("a statement to wait for");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        client
            .query("SYSTEM FLUSH LOGS")
            .execute()
            .await
            .expect("logs flushed");
        let seen = client
            .query(
                "SELECT count() FROM system.query_log WHERE type = 2 AND query LIKE ? \
                 AND query NOT LIKE '%system.query_log%'",
            )
            .bind(format!("%{sentinel}%"))
            .fetch_one::<u64>()
            .await
            .expect("query log");
        if seen > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ClickHouse's query log never held {sentinel:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client
        .query(
            "SELECT count() FROM system.query_log WHERE type = 2 AND query LIKE ? \
             AND query LIKE concat('%`', currentDatabase(), '`%')",
        )
        .bind(like)
        .fetch_one::<u64>()
        .await
        .expect("query log")
}

/// Waits for the next hour when fewer than `needed` are left in this one
/// (`into_hour` seconds past its start): for a test whose reads must fall
/// in the hour its data was written in, as an hour not over yet is read
/// otherwise than a closed one.
pub async fn within_one_hour(into_hour: u64, needed: Duration) {
    let left = 3_600u64.saturating_sub(into_hour);
    if left < needed.as_secs() {
        eprintln!("{left} s left in the hour: waiting for the next one");
        tokio::time::sleep(Duration::from_secs(left + 2)).await;
    }
}

/// SIGTERM to `child`, then its exit status if it exits within `limit`.
pub fn terminate_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    // A process that has already exited refuses the signal; its status is
    // what counts.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    exit_within(child, limit)
}

/// SIGTERM to `child`, then its exit status; a process still running
/// `limit` later is SIGKILLed and fails the test, naming `what`.
pub fn terminate(child: &mut Child, limit: Duration, what: &str) -> std::process::ExitStatus {
    terminate_within(child, limit).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{what} still running {limit:?} after SIGTERM (SIGKILLed)")
    })
}

/// The repository root, for scripts and `topics.yaml`.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}
