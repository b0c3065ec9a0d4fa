//! A whole deployment as processes: the catalog's topics on a mock cluster
//! this test hosts (reached over loopback), a ClickHouse database, and the
//! worker (events-store and order-status), the analytics job and the
//! publisher as the binaries users run, all reading one shopstream.yaml.
//! The checker compares the end state with the recomputed run.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use backbone::events::EventType;
use checker::{Checks, Expected, Observed, Report, TopicCopies};
use producers::cli::Traffic;
use producers::generator::Mix;
use shopstream_tests::{
    bin_dir, clickhouse_client, free_port, unique_name, Broker, Children, EventTopics,
};

/// How much longer and heavier the scenarios run: `RELIABILITY_SOAK=10`
/// multiplies events, kills and faults by ten (see the README). Not under
/// `SHOPSTREAM_`: the binaries refuse unknown variables there.
pub fn soak() -> u32 {
    std::env::var("RELIABILITY_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|f| *f >= 1)
        .unwrap_or(1)
}

/// The catalog line giving each topic 3 partitions per soak factor, so a
/// partition holds as much in a soak as in a normal run: the mock cluster
/// keeps 5 MiB per partition and silently drops what is older.
pub fn partitions() -> String {
    format!("    partitions: {}\n", 3 * soak())
}

/// One seeded publisher run: what the publisher is given and the checker
/// recomputes.
#[derive(Debug, Clone)]
pub struct Run {
    pub traffic: Traffic,
    pub count: usize,
}

impl Run {
    /// How long its publisher may take: the sending time at its rate, plus
    /// three minutes for the brokers or ClickHouse being away.
    pub fn publisher_limit(&self) -> Duration {
        Duration::from_secs_f64(self.count as f64 / self.traffic.rate + 180.0)
    }

    /// `count` events at `rate` per second from `seed`, `poison_rate` of
    /// them malformed, starting now.
    pub fn new(seed: u64, count: usize, rate: f64, poison_rate: f64) -> Self {
        Self {
            traffic: Traffic {
                rate,
                mix: Mix::default(),
                seed,
                start_ms: Some(consumers::forward::now_ms()),
                poison_rate,
                users: 2_000,
                rooms: 50,
            },
            count,
        }
    }

    /// The flags `shopstream-publish` and `shopstream-check` both take.
    pub fn flags(&self) -> Vec<String> {
        let t = &self.traffic;
        vec![
            format!("--rate={}", t.rate),
            format!("--seed={}", t.seed),
            format!("--start-ms={}", t.start_ms.expect("a start")),
            format!("--poison-rate={}", t.poison_rate),
            format!("--users={}", t.users),
            format!("--rooms={}", t.rooms),
            format!("--count={}", self.count),
        ]
    }

    pub fn expected(&self) -> Expected {
        Expected::new(
            self.traffic
                .generator(self.traffic.start_ms.expect("a start"))
                .take(self.count),
        )
    }
}

/// A running binary, with its log in the system's directory. Killed if a
/// failing test leaves it behind.
#[derive(Debug)]
pub struct Service {
    pub name: String,
    pub metrics_port: u16,
    child: Child,
}

impl Service {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no drain, no commit.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status within `limit`.
    pub fn terminate(&mut self, limit: Duration) -> ExitStatus {
        self.terminate_within(limit)
            .unwrap_or_else(|| panic!("{} did not exit within {limit:?} of SIGTERM", self.name))
    }

    /// SIGTERM, then the exit status, if it exits within `limit`.
    pub fn terminate_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        shopstream_tests::terminate_within(&mut self.child, limit)
    }

    /// SIGSTOP (`true`) or SIGCONT: a process frozen whole, heartbeats
    /// included, as a long pause or a VM suspended would leave it.
    pub fn freeze(&self, on: bool) {
        let signal = if on { "-STOP" } else { "-CONT" };
        Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill runs");
    }

    pub fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        shopstream_tests::exit_within(&mut self.child, limit)
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }

    /// Whether the process has exited (and waits to be reaped).
    pub fn exited(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).map_or(true, |stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
    }

    /// The sum of `name`'s samples on /metrics (0 when it has none).
    pub async fn metric(&self, name: &str) -> u64 {
        let text = bench::scrape::http_get(self.metrics_port, "/metrics")
            .await
            .unwrap_or_default();
        text.lines()
            .filter(|l| l.split([' ', '{']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// The gauge of the partitions this process holds.
    pub fn assigned_metric(&self) -> &'static str {
        if self.name.starts_with("shopstream-analytics") {
            "shopstream_analytics_assigned_partitions"
        } else {
            "shopstream_assigned_partitions"
        }
    }

    /// Whether /readyz answers 200.
    pub async fn ready(&self) -> bool {
        bench::scrape::http_get(self.metrics_port, "/readyz")
            .await
            .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The topics, the database and the configuration every process reads.
pub struct System {
    pub topics: EventTopics,
    pub database: String,
    /// Straight to the server (not through a proxy the test may cut), bound
    /// to the database.
    pub client: clickhouse::Client,
    pub worker_group: String,
    pub analytics_group: String,
    config: PathBuf,
    started: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for System {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("System")
            .field("topics", &self.topics)
            .field("database", &self.database)
            .finish()
    }
}

impl System {
    /// A fresh database on `server_url` and fresh topics on `broker`; the services reach ClickHouse at
    /// `service_url` (the same, or a proxy in front of it). `settings` are
    /// extra YAML lines under each section, such as
    /// `("worker", "max_in_flight_records: 2")`.
    pub async fn new(
        broker: Broker,
        server_url: &str,
        service_url: &str,
        settings: &[(&str, &str)],
    ) -> Self {
        Self::on(
            EventTopics::on(broker, &partitions()),
            server_url,
            service_url,
            settings,
        )
        .await
    }

    /// Like [`System::new`] on topics the test set up itself.
    pub async fn on(
        topics: EventTopics,
        server_url: &str,
        service_url: &str,
        settings: &[(&str, &str)],
    ) -> Self {
        topics.create_topic("late-events", 1);
        let database = unique_name("reliability").replace('-', "_");
        let worker_group = unique_name("worker");
        let analytics_group = unique_name("analytics");
        let bootstrap = topics.bootstrap_servers().to_owned();
        let catalog = topics.catalog_path().display().to_string();
        let sections: [(&str, Vec<String>); 6] = [
            ("telemetry", vec!["log_filter: warn".into()]),
            ("kafka", vec![format!("bootstrap_servers: {bootstrap}")]),
            ("catalog", vec![format!("path: {catalog}")]),
            (
                "clickhouse",
                vec![
                    format!("url: {service_url}"),
                    format!("database: {database}"),
                    "insert_period_ms: 200".into(),
                    "timeout_ms: 5000".into(),
                ],
            ),
            (
                "worker",
                vec![
                    format!("group_id: {worker_group}"),
                    "handlers: [events-store, order-status]".into(),
                    "commit_interval_ms: 200".into(),
                ],
            ),
            (
                "analytics",
                vec![
                    format!("group_id: {analytics_group}"),
                    "flush_interval_ms: 200".into(),
                    // Hours compacted as soon as flushed, again and again
                    // under load and crashes: the checker's hours meet them.
                    "compact_every_ms: 500".into(),
                    "compact_after_idle_ms: 0".into(),
                    "compact_minutes_after_idle_ms: 0".into(),
                    "compact_lookback_h: 1000000".into(),
                ],
            ),
        ];
        let mut yaml = String::new();
        for (section, base) in sections {
            let extra: Vec<&str> = settings
                .iter()
                .filter(|(s, _)| *s == section)
                .map(|(_, line)| *line)
                .collect();
            let key = |line: &str| line.split(':').next().unwrap_or_default().to_owned();
            yaml.push_str(&format!("{section}:\n"));
            // A test's line replaces the base line with the same key.
            for line in base
                .iter()
                .filter(|b| extra.iter().all(|e| key(e) != key(b)))
            {
                yaml.push_str(&format!("  {line}\n"));
            }
            for line in extra {
                yaml.push_str(&format!("  {line}\n"));
            }
        }
        let config = topics.dir.path().join("shopstream.yaml");
        std::fs::write(&config, yaml).expect("shopstream.yaml");
        let client = clickhouse_client(server_url);
        client
            .query(&format!("CREATE DATABASE `{database}`"))
            .execute()
            .await
            .expect("database");
        Self {
            client: client.with_database(&database),
            topics,
            database,
            worker_group,
            analytics_group,
            config,
            started: Default::default(),
        }
    }

    pub fn config_path(&self) -> &std::path::Path {
        &self.config
    }

    /// `shopstream-query` on this system's config, every answer read from
    /// ClickHouse, once it answers (30 s at most), killed when dropped;
    /// its port.
    pub async fn query_service(&self) -> (Children, u16) {
        let port = free_port().expect("port");
        let query = Command::new(bin_dir().join("shopstream-query"))
            .arg("--config")
            .arg(self.config_path())
            .args(["--set", &format!("query.listen_address=127.0.0.1:{port}")])
            .args(["--set", "query.cache_max_age_s=0"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("shopstream-query starts");
        let query = Children(vec![query]);
        for _ in 0..300 {
            if bench::scrape::http_get(port, "/readyz").await.is_some() {
                return (query, port);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the query service did not answer within 30 s");
    }

    /// The query API's reads per minute over the run's minutes (revenue
    /// by category and over every category, active users) against the
    /// per-minute view and the partials the checker found exact: the
    /// compactions they take (of hours, and of single minutes of the hour
    /// not over yet), made while the job was killed, answer the same.
    /// Returns how many of the reads took minutes' own compactions.
    pub async fn assert_reads_per_minute_exact(&self) -> u64 {
        let (first, last): (u32, u32) = self
            .client
            .query(
                "SELECT toUInt32(min(window_start)), toUInt32(max(window_start)) \
                 FROM analytics_partials WHERE model = 'orders'",
            )
            .fetch_one()
            .await
            .expect("the run's minutes");
        // Reads per minute take compactions over an hour or more.
        let to = last + 60;
        let from = first.min(to - 3_600);
        let range =
            format!("window_start >= toDateTime({from}) AND window_start < toDateTime({to})");
        type Revenue = (u32, String, String, i64, i64, i64, u64);
        let by_category: Vec<Revenue> = self
            .rows(&format!(
                "SELECT toUInt32(window_start), category, currency, orders, items, revenue_minor, \
                 unique_buyers FROM orders_per_minute WHERE {range} ORDER BY window_start, category, currency"
            ))
            .await;
        let every_category: Vec<Revenue> = self
            .rows(&format!(
                "SELECT toUInt32(window_start) AS t, '', dim2, sum(c1), sum(c2), sum(c3), \
                 uniqExactArray(set1) FROM analytics_partials WHERE model = 'orders' AND {range} \
                 GROUP BY t, dim2 ORDER BY t, dim2"
            ))
            .await;
        let users: Vec<(u32, u64, i64, u64)> = self
            .rows(&format!(
                "SELECT toUInt32(window_start) AS t, uniqExactArray(set1), sum(c1), uniqExactArray(set2) \
                 FROM analytics_partials WHERE model = 'users' AND {range} GROUP BY t ORDER BY t"
            ))
            .await;
        assert!(
            !by_category.is_empty() && !users.is_empty(),
            "the run wrote no orders or users"
        );

        let (query, port) = self.query_service().await;
        let points = |path: String| async move {
            let response = bench::scrape::http_get(port, &path)
                .await
                .unwrap_or_default();
            let (head, body) = response.split_once("\r\n\r\n").unwrap_or_default();
            assert!(head.starts_with("HTTP/1.1 200"), "{path}: {response}");
            let answer: serde_json::Value = serde_json::from_str(body).expect("JSON");
            answer["points"].as_array().expect("points").clone()
        };
        let revenue = |points: Vec<serde_json::Value>| -> Vec<Revenue> {
            points
                .iter()
                .map(|p| {
                    (
                        p["window_start"].as_u64().unwrap_or_default() as u32,
                        p["category"].as_str().unwrap_or_default().to_owned(),
                        p["currency"].as_str().unwrap_or_default().to_owned(),
                        p["orders"].as_i64().unwrap_or_default(),
                        p["items"].as_i64().unwrap_or_default(),
                        p["revenue_minor"].as_i64().unwrap_or_default(),
                        p["unique_buyers"].as_u64().unwrap_or_default(),
                    )
                })
                .collect()
        };
        let path =
            |endpoint: &str, extra: &str| format!("/api/v1/{endpoint}?from={from}&to={to}{extra}");
        assert_eq!(
            revenue(points(path("revenue", "")).await),
            by_category,
            "revenue per minute by category"
        );
        assert_eq!(
            revenue(points(path("revenue", "&group_by=none")).await),
            every_category,
            "revenue per minute over every category"
        );
        let answered: Vec<(u32, u64, i64, u64)> = points(path("active-users", ""))
            .await
            .iter()
            .map(|p| {
                (
                    p["window_start"].as_u64().unwrap_or_default() as u32,
                    p["unique_users"].as_u64().unwrap_or_default(),
                    p["sign_ups"].as_i64().unwrap_or_default(),
                    p["sessions"].as_u64().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(answered, users, "active users per minute");
        drop(query);

        // Not vacuous: the reads took compacted minutes.
        let compacted = self
            .logged_reads("%`analytics_minutes` WHERE model = %compaction IN (%")
            .await;
        assert!(compacted > 0, "no read took compacted minutes");
        self.own_minute_reads().await
    }

    /// How many reads of this run took minutes' own compactions (both
    /// levels of a read per minute, `level IN (..)`).
    pub async fn own_minute_reads(&self) -> u64 {
        self.logged_reads("%`analytics_minutes` WHERE model = %level IN (%")
            .await
    }

    /// How many finished statements on the run's database ClickHouse's
    /// query log holds `LIKE like`.
    async fn logged_reads(&self, like: &str) -> u64 {
        shopstream_tests::logged(&self.client, like).await
    }

    /// Every row of `sql`.
    async fn rows<T>(&self, sql: &str) -> Vec<T>
    where
        T: clickhouse::Row + for<'b> clickhouse::RowRead<Value<'b> = T> + Send + 'static,
    {
        self.client.query(sql).fetch_all::<T>().await.expect(sql)
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.topics.dir.path().join(format!("{name}.log")))
            .expect("log file")
    }

    fn spawn(&self, binary: &str, args: &[String]) -> Service {
        let n = self
            .started
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let name = format!("{binary}-{n}");
        let metrics_port = free_port().expect("port");
        let section = if binary == "shopstream-analytics" {
            "analytics"
        } else {
            "worker"
        };
        let child = Command::new(bin_dir().join(binary))
            .arg("--config")
            .arg(&self.config)
            .args([
                "--set",
                &format!("{section}.metrics_address=127.0.0.1:{metrics_port}"),
            ])
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(self.log(&name))
            .stderr(self.log(&name))
            .spawn()
            .unwrap_or_else(|e| panic!("{binary} starts: {e}"));
        Service {
            name,
            metrics_port,
            child,
        }
    }

    pub fn worker(&self) -> Service {
        self.spawn("shopstream-worker", &[])
    }

    /// A worker that is a static member of its group (`group.instance.id`),
    /// with a 30 s session and request timeout: tansu beside the whole
    /// suite once left a member's requests unanswered for 10 s, and the
    /// group then dropped it, which is not what a static member's test is
    /// about.
    pub fn static_worker(&self, instance: &str) -> Service {
        self.spawn(
            "shopstream-worker",
            &[
                "--set".into(),
                format!("kafka.client.group.instance.id={instance}"),
                "--set".into(),
                "kafka.client.session.timeout.ms=30000".into(),
                "--set".into(),
                "kafka.request_timeout_ms=30000".into(),
            ],
        )
    }

    pub fn analytics(&self) -> Service {
        self.spawn("shopstream-analytics", &[])
    }

    /// An analytics replica with `settings` (`section.key=value`) over the
    /// configuration file's.
    pub fn analytics_with(&self, settings: &[&str]) -> Service {
        let args: Vec<String> = settings
            .iter()
            .flat_map(|s| ["--set".to_owned(), (*s).to_owned()])
            .collect();
        self.spawn("shopstream-analytics", &args)
    }

    /// `shopstream-publish` for `run`, in the background.
    pub fn publish(&self, run: &Run) -> Service {
        self.spawn("shopstream-publish", &run.flags())
    }

    /// A worker and an analytics job, both ready and holding their
    /// partitions, so a publisher started next meets them for its whole
    /// run: on tansu, beside the suite, the consumers once stored nothing
    /// until about 35 s of a 40 s run had passed.
    pub async fn consumers(&self) -> (Service, Service) {
        let (worker, analytics) = (self.worker(), self.analytics());
        self.ready(&[&worker, &analytics]).await;
        self.sharing(&[&worker, &analytics]).await;
        (worker, analytics)
    }

    /// Runs the publisher for `run` to its end; it must succeed.
    pub fn publish_all(&self, run: &Run) {
        self.finish(&mut self.publish(run), run);
    }

    /// Waits for `publisher` of `run` to end; it must succeed.
    pub fn finish(&self, publisher: &mut Service, run: &Run) {
        let status = publisher
            .wait(run.publisher_limit())
            .expect("the publisher finishes");
        assert!(
            status.success(),
            "the publisher failed: {status}\n{}",
            self.logs()
        );
    }

    /// SIGTERMs each service; each must drain and exit 0 within 60 s.
    pub fn stop(&self, services: &mut [&mut Service]) {
        for service in services {
            let status = service
                .terminate_within(Duration::from_secs(60))
                .unwrap_or_else(|| {
                    panic!(
                        "{} did not exit within 60 s of SIGTERM\n{}",
                        service.name,
                        self.logs()
                    )
                });
            assert!(
                status.success(),
                "{} exited {status}\n{}",
                service.name,
                self.logs()
            );
        }
    }

    /// Waits until both consumers have stored something: the worker rows,
    /// the analytics job its first offsets (ready only means subscribed;
    /// the partitions come a moment later).
    pub async fn consuming(&self) {
        let started = Instant::now();
        loop {
            let count = |sql: &'static str| async move {
                self.client.query(sql).fetch_one::<u64>().await.unwrap_or(0)
            };
            if count("SELECT count() FROM user_events").await > 0
                && count("SELECT count() FROM analytics_partials WHERE model = '_offset'").await > 0
            {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "nothing stored within 60 s:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for `services` to answer /readyz.
    pub async fn ready(&self, services: &[&Service]) {
        let started = Instant::now();
        for service in services {
            while !service.ready().await {
                assert!(
                    !service.exited(),
                    "{} exited before it was ready:\n{}",
                    service.name,
                    self.logs()
                );
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "{} not ready within 60 s:\n{}",
                    service.name,
                    self.logs()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Waits until every one of `members` (workers or analytics replicas)
    /// holds partitions of its group.
    pub async fn sharing(&self, members: &[&Service]) {
        let started = Instant::now();
        loop {
            let mut assigned = Vec::new();
            for member in members {
                assigned.push(member.metric(member.assigned_metric()).await);
            }
            if assigned.iter().all(|n| *n > 0) {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the group did not share the partitions within 60 s: {assigned:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// What `services` report on /metrics about lag and pauses, for a
    /// failing assertion.
    pub async fn progress(&self, services: &[&Service]) -> String {
        let mut out = String::new();
        for service in services {
            let text = bench::scrape::http_get(service.metrics_port, "/metrics")
                .await
                .unwrap_or_default();
            out.push_str(&format!("--- {} /metrics\n", service.name));
            for line in text.lines().filter(|l| {
                !l.starts_with('#')
                    && (l.contains("paused")
                        || l.contains("assigned")
                        || l.contains("fetch_gaps")
                        || (l.contains("_lag{") && !l.ends_with(" 0")))
            }) {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Every process's log, by file, in name order.
    fn log_files(&self) -> Vec<(PathBuf, String)> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(self.topics.dir.path())
            .expect("dir")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        paths.sort();
        paths
            .into_iter()
            .map(|p| {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                (p, text)
            })
            .collect()
    }

    /// Every process's whole log, one after the other.
    pub fn logs_in_full(&self) -> String {
        self.log_files().into_iter().map(|(_, text)| text).collect()
    }

    /// The end of every process's log, for a failing assertion, after
    /// every line where a consumer found records missing from a fetch (a
    /// lost record's likeliest trail, and long gone from the end).
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (path, text) in self.log_files() {
            let mut lines: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("consumers::continuity"))
                .collect();
            if !lines.is_empty() {
                lines.push("...");
            }
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            lines.extend(tail.iter().rev());
            out.push_str(&format!("--- {}\n", path.display()));
            for line in lines {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// The checks for a system that runs both consumers.
    pub fn checks(&self) -> Checks {
        Checks {
            events: true,
            order_status: true,
            analytics: true,
            dead_letter_groups: vec![self.worker_group.clone(), self.analytics_group.clone()],
            exact_raw: false,
            dead_letters_at_least_once: false,
            topic_copies: self.topic_copies(),
        }
    }

    /// What an event its topic holds twice, or not at all, means here: on
    /// the mock cluster, which checks no sequence numbers, the broker's own
    /// doing, expected downstream copy for copy (see
    /// [`TopicCopies::Counted`]); a finding on a real broker.
    pub fn topic_copies(&self) -> TopicCopies {
        if self.topics.on_mock_cluster() {
            TopicCopies::Counted
        } else {
            TopicCopies::Finding
        }
    }

    /// Checks the end state once.
    pub async fn check(&self, expected: &Expected, checks: &Checks) -> Report {
        let observed = Observed::read(
            checks,
            &self.client,
            &self.topics.connection,
            &self.topics.catalog,
        )
        .await
        .expect("the end state reads");
        checker::check(expected, &observed, checks)
    }

    /// Checks until nothing is found or `limit` passes; the last report.
    pub async fn converge(&self, expected: &Expected, checks: &Checks, limit: Duration) -> Report {
        let started = Instant::now();
        loop {
            let report = self.check(expected, checks).await;
            if report.passed() || started.elapsed() > limit {
                return report;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// The topic carrying `event`.
    pub fn topic(&self, event: EventType) -> &str {
        self.topics.topic(event)
    }
}
