//! shopstream-analytics throughput per core and freshness, in one run on the
//! embedded broker (hosted here) and a ClickHouse server:
//!
//!   cargo build --release -p pipelines -p bench
//!   target/release/analytics-bench --clickhouse http://127.0.0.1:8123
//!
//! 1. Throughput: N generated events already in Kafka; the job (a separate
//!    process, fresh database) runs until ClickHouse holds every partition's
//!    last offset. Events per wall second and per CPU second of the job
//!    (all its threads), both from its first counted event.
//! 2. Freshness: the job keeps running while events arrive at a fixed rate;
//!    for a sample of records, the time from the producer's send to the flush
//!    that makes it visible in the read models (its offset stored). Then the
//!    same at rising rates (`--ramp`) until p99 passes 2 s or the bench
//!    cannot send that fast: the highest sustained rate.
//! 3. Against the ClickHouse Kafka engine (what many users pick instead):
//!    order events in JSON in a topic of their own; the job (with a catalog
//!    of just that topic) and then the engine's materialized views compute
//!    the per-minute orders, items, revenue and unique buyers per category
//!    and currency from it. Both results must be equal; the figure is events
//!    per CPU second, ours counting the job and the ClickHouse server during
//!    its run, theirs the ClickHouse server. The server must read from the
//!    earliest offsets (scripts/bench configures it):
//!    `<kafka><auto_offset_reset>smallest</auto_offset_reset></kafka>`.
//!
//! With BENCH_JSON set, the figures are appended there (see bench-report).

#![allow(clippy::print_stdout)]

mod kafka_engine;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use backbone::catalog::Catalog;
use backbone::config::KafkaSettings;
use backbone::kafka::KafkaConnection;
use bench::{procfs, scrape};
use bench::{Goal, Recorder};
use clap::Parser;
use producers::generator::{Generator, GeneratorConfig};
use producers::publisher::{PublishOptions, Publisher};
use rdkafka::consumer::{BaseConsumer, Consumer};

#[derive(Debug, Parser)]
pub(crate) struct Args {
    /// ClickHouse HTTP URL; each run uses a fresh database.
    #[arg(long)]
    pub(crate) clickhouse: String,
    /// Events for the throughput phase. The embedded broker keeps about
    /// 5 MiB per partition and the hottest partitions (busy chat rooms) fill
    /// first: past about 250,000 it drops data, which the bench refuses.
    #[arg(long, default_value_t = 200_000)]
    pub(crate) events: usize,
    /// Events per second in the freshness phase.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) rate: u64,
    /// Seconds of the freshness phase.
    #[arg(long, default_value_t = 20)]
    pub(crate) seconds: u64,
    #[arg(long, default_value = "topics.yaml")]
    pub(crate) catalog: std::path::PathBuf,
    /// Order events for the comparison with the ClickHouse Kafka engine; 0 skips it.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) engine_events: usize,
    /// Rates to try after the fixed one, in order, until the job stops keeping up.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "20000,40000,80000,120000,160000"
    )]
    pub(crate) ramp: Vec<u64>,
    /// Seconds of each ramp step.
    #[arg(long, default_value_t = 4)]
    pub(crate) ramp_seconds: u64,
    /// The clickhouse-server process, for its CPU time (default: the only one running).
    #[arg(long)]
    pub(crate) clickhouse_pid: Option<u32>,
}

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// shopstream-analytics as a separate process; killed when dropped.
pub(crate) struct Job {
    pub(crate) child: std::process::Child,
    /// Where its /metrics are served.
    pub(crate) port: u16,
    /// A client of its database.
    pub(crate) client: clickhouse::Client,
}

impl Job {
    /// Starts the job next to this bench's binary with `catalog`, on the
    /// fresh ClickHouse database `database`.
    pub(crate) fn start(
        brokers: &str,
        catalog: &std::path::Path,
        clickhouse: &str,
        database: &str,
    ) -> anyhow::Result<Self> {
        let settings = backbone::config::ClickHouseSettings {
            url: clickhouse.to_owned(),
            database: database.to_owned(),
            ..Default::default()
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(std::env::current_exe()?.with_file_name("shopstream-analytics"))
            .args(["--brokers", brokers, "--set"])
            .arg(format!("catalog.path={}", catalog.display()))
            .args(["--set", &format!("clickhouse.url={clickhouse}")])
            .args(["--set", &format!("clickhouse.database={database}")])
            .args([
                "--set",
                &format!("analytics.metrics_address=127.0.0.1:{port}"),
            ])
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .spawn()?;
        Ok(Self {
            child,
            port,
            client: consumers::projection::client(&settings, true),
        })
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The freshness goal: produce to visible, p99.
const FRESH_MS: f64 = 2000.0;

/// What one fixed-rate phase measured.
pub(crate) struct Freshness {
    p50: f64,
    p99: f64,
    max: f64,
    samples: usize,
    /// What the bench managed to send.
    sent_per_second: f64,
}

impl std::fmt::Display for Freshness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent {:.0}/s, {} samples, produce -> visible p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            self.sent_per_second, self.samples, self.p50, self.p99, self.max
        )
    }
}

/// Live traffic into a running job.
struct Traffic<'a> {
    publisher: &'a Publisher,
    generator: &'a mut Generator,
    topics: &'a HashMap<backbone::events::EventType, String>,
    client: &'a clickhouse::Client,
}

impl Traffic<'_> {
    /// Sends `rate` events/s for `seconds`; for one record per 10 ms tick,
    /// the time from its send to the flush that makes it visible (its
    /// partition's stored offset reaches it).
    async fn freshness(&mut self, rate: u64, seconds: u64) -> anyhow::Result<Freshness> {
        let per_tick = (rate / 100).max(1) as usize;
        let mut samples: Vec<(String, i32, i64, Instant)> = Vec::new();
        // A sample's acknowledgement is awaited aside, so sending keeps its pace.
        let mut acks: Vec<(String, Instant, tokio::task::JoinHandle<_>)> = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let phase = Instant::now();
        let sending = Duration::from_secs(seconds);
        let (mut latencies, mut sent) = (Vec::new(), 0usize);
        let mut last_check = Instant::now();
        let mut sending_for = Duration::ZERO;
        while phase.elapsed() < sending || !samples.is_empty() || !acks.is_empty() {
            if phase.elapsed() < sending {
                tick.tick().await;
                let at = Instant::now();
                let mut batch = Vec::new();
                for g in self.generator.by_ref().take(per_tick) {
                    let topic = self.topics[&g.event.event_type()].clone();
                    batch.push((
                        topic,
                        self.publisher.enqueue_any(&g.event, None, None).await?,
                    ));
                }
                sent += batch.len();
                if let Some((topic, last)) = batch.pop() {
                    acks.push((topic, at, tokio::spawn(last.delivered())));
                }
                sending_for = phase.elapsed();
            } else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                anyhow::ensure!(
                    phase.elapsed() < sending + Duration::from_secs(60),
                    "records were not visible within 60 s"
                );
            }
            if last_check.elapsed() >= Duration::from_millis(50) {
                last_check = Instant::now();
                let mut waiting = Vec::new();
                for (topic, at, ack) in acks.drain(..) {
                    if ack.is_finished() {
                        let delivered = ack.await??;
                        samples.push((topic, delivered.partition, delivered.offset, at));
                    } else {
                        waiting.push((topic, at, ack));
                    }
                }
                acks = waiting;
                let now = stored(self.client).await;
                samples.retain(|(topic, partition, offset, at)| {
                    if now
                        .get(&(topic.clone(), *partition))
                        .is_some_and(|s| s >= offset)
                    {
                        latencies.push(at.elapsed().as_secs_f64() * 1000.0);
                        false
                    } else {
                        true
                    }
                });
            }
        }
        latencies.sort_by(f64::total_cmp);
        anyhow::ensure!(!latencies.is_empty(), "no sample at {rate} events/s");
        let at =
            |q: f64| latencies[((q * latencies.len() as f64) as usize).min(latencies.len() - 1)];
        Ok(Freshness {
            p50: at(0.5),
            p99: at(0.99),
            max: latencies[latencies.len() - 1],
            samples: latencies.len(),
            sent_per_second: sent as f64 / sending_for.as_secs_f64().max(1e-6),
        })
    }
}

pub(crate) async fn stored(client: &clickhouse::Client) -> HashMap<(String, i32), i64> {
    pipelines::store::stored_offsets(client, std::time::Duration::from_secs(30))
        .await
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let catalog = Catalog::load(&args.catalog, None).map_err(|p| anyhow::anyhow!("{p}"))?;
    let connection = KafkaConnection::connect(&KafkaSettings::default(), &catalog)?;
    let publisher = Publisher::new(&connection, &catalog, &PublishOptions::default())?;
    let mut generator = Generator::new(GeneratorConfig {
        spacing_ms: 10.0,
        ..GeneratorConfig::default()
    });
    let mut pending = Vec::new();
    for g in generator.by_ref().take(args.events) {
        pending.push(publisher.enqueue_any(&g.event, None, None).await?);
    }
    for p in pending {
        p.delivered().await?;
    }
    let probe: BaseConsumer = connection.client_config().create()?;
    let mut ends = HashMap::new();
    let mut kept = 0;
    for topic in &catalog.topics {
        for partition in 0..topic.partitions {
            let (low, high) =
                probe.fetch_watermarks(&topic.name, partition, Duration::from_secs(5))?;
            kept += high - low;
            if high > 0 {
                ends.insert((topic.name.clone(), partition), high - 1);
            }
        }
    }
    anyhow::ensure!(
        kept as usize >= args.events,
        "the embedded broker kept only {kept} of {} events; use fewer --events",
        args.events
    );

    let database = format!("analytics_bench_{}", std::process::id());
    let job = Job::start(
        connection.bootstrap_servers(),
        &args.catalog,
        &args.clickhouse,
        &database,
    )?;
    let (client, port) = (job.client.clone(), job.port);
    let pid = job.child.id();
    println!(
        "{} events in {} partitions, embedded broker {}, ClickHouse {}",
        args.events,
        ends.len(),
        connection.bootstrap_servers(),
        args.clickhouse
    );

    // Throughput: from the job's first counted event (after start-up, group
    // join and migrations) until ClickHouse holds every partition's last
    // offset, so the last flush is inside the figure.
    let mut peak_rss = 0u64;
    let started = Instant::now();
    let (t0, cpu0, events0) = loop {
        let events = scrape::metric(port, "shopstream_analytics_events_total")
            .await
            .unwrap_or(0.0);
        if events > 0.0 {
            break (
                Instant::now(),
                procfs::cpu_seconds(pid).unwrap_or(0.0),
                events,
            );
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "the job counted no event within 2 minutes"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    loop {
        let now = stored(&client).await;
        peak_rss = peak_rss.max(procfs::status_kib(pid, "VmRSS:").unwrap_or(0));
        if ends
            .iter()
            .all(|(k, end)| now.get(k).is_some_and(|s| s >= end))
        {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the job did not catch up within 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let events = scrape::metric(port, "shopstream_analytics_events_total")
        .await
        .unwrap_or(0.0)
        - events0;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = procfs::cpu_seconds(pid).unwrap_or(0.0) - cpu0;
    println!(
        "throughput: {events:.0} events in {wall:.2} s = {:.0} events/s; job CPU {cpu:.2} s = {:.0} events per CPU second (per core); peak RSS {:.1} MB",
        events / wall,
        events / cpu.max(1e-6),
        peak_rss as f64 / 1024.0
    );
    let mut figures = Recorder::from_env("analytics")?;
    let mut resources = Recorder::from_env("resources")?;
    figures.record(
        "shopstream-analytics, per CPU second of the job (per core)",
        "events/s",
        events / cpu.max(1e-6),
        None,
        Some(Goal::AtLeast(150_000.0)),
    )?;
    figures.record(
        "shopstream-analytics, per wall second",
        "events/s",
        events / wall,
        None,
        None,
    )?;
    resources.record(
        "shopstream-analytics CPU per million events",
        "CPU s",
        cpu / events.max(1.0) * 1e6,
        None,
        None,
    )?;

    let topics: HashMap<_, _> = catalog
        .topics
        .iter()
        .map(|t| (t.event, t.name.clone()))
        .collect();
    let mut traffic = Traffic {
        publisher: &publisher,
        generator: &mut generator,
        topics: &topics,
        client: &client,
    };
    let at_rate = traffic.freshness(args.rate, args.seconds).await?;
    let inserts = scrape::metric(port, "shopstream_analytics_inserts_total")
        .await
        .unwrap_or(0.0);
    let insert_micros = scrape::metric(port, "shopstream_analytics_insert_microseconds_total")
        .await
        .unwrap_or(0.0);
    println!(
        "inserts over the whole run: {inserts:.0}, mean {:.0} ms each",
        insert_micros / 1000.0 / inserts.max(1.0)
    );
    println!(
        "freshness at {} events/s for {} s: {at_rate}; RSS now {:.1} MB",
        args.rate,
        args.seconds,
        procfs::status_kib(pid, "VmRSS:").unwrap_or(0) as f64 / 1024.0
    );
    figures.record(
        &format!(
            "freshness p50 at {} events/s, produce to visible",
            args.rate
        ),
        "ms",
        at_rate.p50,
        None,
        None,
    )?;
    figures.record(
        &format!(
            "freshness p99 at {} events/s, produce to visible",
            args.rate
        ),
        "ms",
        at_rate.p99,
        None,
        Some(Goal::AtMost(FRESH_MS)),
    )?;

    // Then faster, until the job no longer keeps up (or the bench cannot send
    // faster): the highest rate tried with p99 within the goal.
    let mut sustained: Option<(u64, Freshness)> = None;
    for rate in &args.ramp {
        let f = traffic.freshness(*rate, args.ramp_seconds).await?;
        let kept_up = f.p99 <= FRESH_MS && f.sent_per_second >= 0.95 * *rate as f64;
        println!(
            "ramp: {rate} events/s for {} s: {f}; {}",
            args.ramp_seconds,
            if kept_up {
                "sustained"
            } else {
                "not sustained"
            }
        );
        if !kept_up {
            break;
        }
        sustained = Some((*rate, f));
    }
    if let Some((rate, f)) = sustained {
        figures.record(
            "highest sustained rate tried (p99 within 2 s)",
            "events/s",
            rate as f64,
            None,
            None,
        )?;
        figures.record(
            "freshness p50 at the highest sustained rate",
            "ms",
            f.p50,
            None,
            None,
        )?;
        figures.record(
            "freshness p99 at the highest sustained rate",
            "ms",
            f.p99,
            None,
            Some(Goal::AtMost(FRESH_MS)),
        )?;
    }
    figures.record(
        "mean insert",
        "ms",
        insert_micros / 1000.0 / inserts.max(1.0),
        None,
        None,
    )?;
    let hwm = procfs::status_kib(pid, "VmHWM:").unwrap_or(peak_rss) as f64 / 1024.0;
    let steady = procfs::status_kib(pid, "VmRSS:").unwrap_or(0) as f64 / 1024.0;
    resources.record(
        "shopstream-analytics peak RSS",
        "MB",
        hwm,
        None,
        Some(Goal::AtMost(100.0)),
    )?;
    resources.record(
        "shopstream-analytics RSS after the run",
        "MB",
        steady,
        None,
        None,
    )?;
    drop(job);
    let _ = client
        .query(&format!("DROP DATABASE IF EXISTS `{database}`"))
        .execute()
        .await;
    if args.engine_events > 0 {
        kafka_engine::compare(&args, &connection).await?;
    }
    Ok(())
}
