//! Consume throughput, shopstream-worker (no-op handler, as a separate
//! process) vs a bare rdkafka consumer and kcat, in one run on the same
//! broker and records; plus the worker's peak and steady RSS and CPU per
//! million events. Rounds alternate. The worker is measured twice: on the
//! orders topic alone (`--topic orders`), what the bare consumer and kcat
//! read; and on every topic of the catalog, as deployed by default, where
//! each fetch also carries every other topic's and retry tier's partitions.
//!
//!   cargo build --release -p consumers -p bench
//!   target/release/consume-bench [--events N] [--rounds R] [--clickhouse URL]
//!
//! With BENCH_JSON set, the figures are appended there (see bench-report).

#![allow(clippy::print_stdout)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use backbone::catalog::Catalog;
use backbone::config::KafkaSettings;
use backbone::events::AnyEvent;
use backbone::kafka::KafkaConnection;
use bench::{Goal, Recorder};
use clap::Parser;
use producers::generator::{Generator, GeneratorConfig};
use producers::publisher::{PublishOptions, Publisher};
use rdkafka::consumer::{Consumer, StreamConsumer};

#[derive(Debug, Parser)]
struct Args {
    /// Order events to consume per measurement. The embedded cluster keeps
    /// about 5 MiB per partition (older records vanish): the bench checks.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long, default_value = "topics.yaml")]
    catalog: std::path::PathBuf,
    /// Catalog profile; the base catalog gives orders 24 partitions.
    #[arg(long)]
    profile: Option<String>,
    /// A running cluster with the catalog's topics (shopstream-topics apply);
    /// by default the embedded mock cluster, hosted in this process.
    #[arg(long, default_value = backbone::kafka::EMBEDDED)]
    brokers: String,
    /// Also measure the events-store handler into this ClickHouse (a fresh
    /// database per round).
    #[arg(long)]
    clickhouse: Option<String>,
}

/// What one worker run measured.
struct WorkerRun {
    /// Records per second from the first handled record.
    rate: f64,
    peak_rss_kib: u64,
    /// At the end of the run.
    last_rss_kib: u64,
    /// From the first handled record to the last.
    cpu_seconds: f64,
}

/// Records per block of the one-pass decode measurement at most (5-10 ms);
/// a short run has 20 blocks.
const DECODE_BLOCK: usize = 4_000;

/// Runs shopstream-worker until it has handled `args.events` records.
async fn measure_worker(
    worker_bin: &std::path::Path,
    args: &Args,
    brokers: &str,
    group: &str,
    extra: &[&str],
) -> anyhow::Result<WorkerRun> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut child = KillOnDrop(
        Command::new(worker_bin)
            .args(["--brokers", brokers, "--group", group])
            .args(extra)
            .args(args.profile.iter().flat_map(|p| ["--profile", p.as_str()]))
            .args(["--set", &format!("catalog.path={}", args.catalog.display())])
            .args(["--set", &format!("worker.metrics_address=127.0.0.1:{port}")])
            .args(
                std::env::var("BENCH_WORKER_ARGS")
                    .unwrap_or_default()
                    .split_whitespace(),
            )
            .env(
                "RUST_LOG",
                std::env::var("BENCH_WORKER_LOG").unwrap_or_else(|_| "error".into()),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(
                std::env::temp_dir().join("consume-bench-worker.log"),
            )?)
            .spawn()?,
    );
    let pid = child.0.id();
    let spawned = Instant::now();
    let (mut peak_rss, mut first_seen, mut last_rss) = (0u64, None, 0u64);
    // The last moment seen with nothing handled yet (and the CPU spent by
    // then): the start when the first sample that sees work already sees
    // most of it (a fast worker between two samples).
    let mut idle = (spawned, 0.0);
    let done = loop {
        let consumed = bench::scrape::metric(port, "shopstream_records_handled_total")
            .await
            .unwrap_or(0.0) as usize;
        last_rss = bench::procfs::status_kib(pid, "VmRSS:").unwrap_or(last_rss);
        peak_rss = peak_rss.max(last_rss);
        if consumed == 0 {
            idle = (
                Instant::now(),
                bench::procfs::cpu_seconds(pid).unwrap_or(0.0),
            );
        } else if first_seen.is_none() {
            first_seen = Some((
                Instant::now(),
                consumed,
                bench::procfs::cpu_seconds(pid).unwrap_or(0.0),
            ));
        }
        if consumed >= args.events {
            break Instant::now();
        }
        if let Some(status) = child.0.try_wait()? {
            anyhow::bail!(
                "shopstream-worker exited early ({status}) after handling {consumed} records"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Counted from the first sample that saw work, unless that one saw more
    // than half of it done: then from the last sample that saw none (which
    // understates the rate, never overstates it). Counting from the spawn
    // instead added the group join (~3 s) to fast runs.
    let (t0, c0, cpu0) = match first_seen {
        Some(seen @ (_, count, _)) if count <= args.events / 2 => seen,
        _ => (idle.0, 0, idle.1),
    };
    let cpu_seconds = bench::procfs::cpu_seconds(pid).unwrap_or(cpu0) - cpu0;
    let rate = (args.events - c0) as f64 / done.duration_since(t0).as_secs_f64().max(1e-6);
    let hwm = bench::procfs::status_kib(pid, "VmHWM:").unwrap_or(peak_rss);
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    child.0.wait()?;
    Ok(WorkerRun {
        rate,
        peak_rss_kib: hwm,
        last_rss_kib: last_rss,
        cpu_seconds: cpu_seconds * args.events as f64 / (args.events - c0).max(1) as f64,
    })
}

/// kcat reading the topic from the beginning to its end, as a separate
/// process: records per second, start-up included. `None` without kcat.
fn measure_kcat(brokers: &str, events: usize) -> anyhow::Result<Option<f64>> {
    use std::io::{BufRead, BufReader};
    let started = Instant::now();
    let mut child = match Command::new("kcat")
        .args([
            "-C",
            "-b",
            brokers,
            "-t",
            "orders",
            "-o",
            "beginning",
            "-e",
            "-q",
        ])
        .args(["-c", &events.to_string(), "-f", "\\n"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let stdout = child.stdout.take().expect("piped");
    let lines = BufReader::new(stdout).lines().count();
    let status = child.wait()?;
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        status.success() && lines >= events,
        "kcat read {lines} of {events} records ({status})"
    );
    Ok(Some(events as f64 / seconds))
}

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.events >= 20,
        "--events must be at least 20, got {}",
        args.events
    );
    let catalog = Catalog::load(&args.catalog, args.profile.as_deref())
        .map_err(|p| anyhow::anyhow!("{p}"))?;
    let connection = KafkaConnection::connect(
        &KafkaSettings {
            bootstrap_servers: args.brokers.clone(),
            ..KafkaSettings::default()
        },
        &catalog,
    )?;
    let brokers = connection.bootstrap_servers().to_owned();
    let publisher = Publisher::new(&connection, &catalog, &PublishOptions::default())?;
    let mut pending = Vec::new();
    for g in Generator::new(GeneratorConfig {
        mix: "order=1".parse().map_err(anyhow::Error::msg)?,
        ..GeneratorConfig::default()
    })
    .filter(|g| matches!(g.event, AnyEvent::Order(_)))
    .take(args.events)
    {
        pending.push(publisher.enqueue_any(&g.event, None, None).await?);
    }
    for p in pending {
        p.delivered().await?;
    }
    // The mock broker silently drops the oldest data past ~5 MiB a partition.
    let mut kept = 0;
    let metadata = publisher_client_metadata(&connection)?;
    for partition in 0..metadata {
        let probe: rdkafka::consumer::BaseConsumer = connection.client_config().create()?;
        let (low, high) = probe.fetch_watermarks("orders", partition, Duration::from_secs(5))?;
        kept += (high - low) as usize;
    }
    anyhow::ensure!(
        kept >= args.events || !connection.is_embedded(),
        "the embedded broker kept only {kept} of {} records (about 5 MiB per partition); use fewer --events",
        args.events
    );
    let worker_bin = std::env::current_exe()?.with_file_name("shopstream-worker");
    println!(
        "{} order events in topic orders ({} partitions), broker {brokers}, {} rounds",
        args.events, metadata, args.rounds
    );

    let (mut bare_rates, mut worker_rates, mut peaks, mut steadies) =
        (vec![], vec![], vec![], vec![]);
    let (mut decoding_rates, mut sink_rates, mut every_rates) = (vec![], vec![], vec![]);
    let mut consume = Recorder::from_env("consume")?;
    let mut sinks = Recorder::from_env("sink")?;
    let mut resources = Recorder::from_env("resources")?;
    for round in 1..=args.rounds {
        // Bare plus decoding: what any consumer of these events must spend.
        let consumer: StreamConsumer = connection
            .client_config()
            .set(
                "group.id",
                format!("bench-decode-{round}-{}", std::process::id()),
            )
            // As the worker sets it: a consumer slower than the fetches
            // fills librdkafka's queue, which (by default) postpones the
            // partition's next fetch by a whole second.
            .set("fetch.queue.backoff.ms", "10")
            .set("auto.offset.reset", "earliest")
            .create()?;
        consumer.subscribe(&["orders"])?;
        let decoder = backbone::codec::Decoder::default();
        let hint = backbone::codec::DecodeHint {
            content_type: None,
            event_type: Some(backbone::events::EventType::Order),
        };
        let first = consumer.recv().await?;
        decoder.decode(rdkafka::Message::payload(&first).unwrap_or_default(), hint)?;
        drop(first);
        // Blocks of records decoded and only counted alternate in one pass,
        // so a stall of the host (CPU stolen for a second) slows both kinds
        // alike: decoding's cost is the two kinds' times per record apart.
        // Two runs one after the other gave 0.13 and 1.47 µs in one bench.
        let (mut plain, mut decoded) = (Duration::ZERO, Duration::ZERO);
        let (mut plain_records, mut decoded_records) = (0usize, 0usize);
        // The decoding alone, timed around each call, as a cross-check.
        let mut decode_time = Duration::ZERO;
        let (mut read, mut decode) = (1, false);
        let block_records = (args.events / 20).clamp(1, DECODE_BLOCK);
        while read < args.events {
            let records = block_records.min(args.events - read);
            let started = Instant::now();
            for _ in 0..records {
                let message = consumer.recv().await?;
                if decode {
                    let decode_started = Instant::now();
                    decoder.decode(
                        rdkafka::Message::payload(&message).unwrap_or_default(),
                        hint,
                    )?;
                    decode_time += decode_started.elapsed();
                }
            }
            if decode {
                decoded += started.elapsed();
                decoded_records += records;
            } else {
                plain += started.elapsed();
                plain_records += records;
            }
            read += records;
            decode = !decode;
        }
        let decoding = decoded_records as f64 / decoded.as_secs_f64();
        let decode_cost = decoded.as_secs_f64() * 1e6 / decoded_records as f64
            - plain.as_secs_f64() * 1e6 / plain_records as f64;
        let decode_timed = decode_time.as_secs_f64() * 1e6 / decoded_records as f64;
        drop(consumer);

        // Bare: a StreamConsumer counting records, no decoding.
        let consumer: StreamConsumer = connection
            .client_config()
            .set(
                "group.id",
                format!("bench-bare-{round}-{}", std::process::id()),
            )
            .set("fetch.queue.backoff.ms", "10")
            .set("auto.offset.reset", "earliest")
            .create()?;
        consumer.subscribe(&["orders"])?;
        let first = consumer.recv().await?;
        drop(first);
        let started = Instant::now();
        for _ in 1..args.events {
            consumer.recv().await?;
        }
        let bare = args.events as f64 / started.elapsed().as_secs_f64();
        drop(consumer);

        let kcat = measure_kcat(&brokers, args.events)?;

        // shopstream-worker: decode, batch, no-op handler, store offsets,
        // commit; on the bare consumer's topic, then on every topic.
        let group = format!("bench-worker-{round}-{}", std::process::id());
        let run = measure_worker(
            &worker_bin,
            &args,
            &brokers,
            &group,
            &["--handler", "noop", "--topic", "orders"],
        )
        .await?;
        let group = format!("bench-worker-every-{round}-{}", std::process::id());
        let every =
            measure_worker(&worker_bin, &args, &brokers, &group, &["--handler", "noop"]).await?;
        let worker = run.rate;
        let highest = if every.peak_rss_kib > run.peak_rss_kib {
            &every
        } else {
            &run
        };
        let (hwm, last_rss) = (highest.peak_rss_kib, highest.last_rss_kib);
        if let Some(url) = &args.clickhouse {
            let group = format!("bench-sink-{round}-{}", std::process::id());
            let database = format!("consume_bench_{}_{round}", std::process::id());
            let sink = measure_worker(
                &worker_bin,
                &args,
                &brokers,
                &group,
                &[
                    "--handler",
                    "events-store",
                    "--set",
                    &format!("clickhouse.url={url}"),
                    "--set",
                    &format!("clickhouse.database={database}"),
                ],
            )
            .await?
            .rate;
            println!("round {round}: worker (events-store into ClickHouse) {sink:>9.0} rows/s");
            sinks.record(
                "shopstream-worker events-store into ClickHouse",
                "rows/s",
                sink,
                Some(("shopstream-worker, no-op handler, every topic", every.rate)),
                Some(Goal::AtLeast(100_000.0)),
            )?;
            sink_rates.push(sink);
        }
        println!(
            "round {round}: bare {bare:>9.0}/s | bare+decode {decoding:>9.0}/s (decode {decode_cost:.2} µs/event, timed {decode_timed:.2}) | worker (no-op, orders) {worker:>9.0}/s, {:.2} CPU s per million | ratio {:.2} (vs bare+decode {:.2}) | every topic {:>9.0}/s, {:.2} CPU s per million, ratio {:.2} | worker RSS peak {:.1} MB, after the run {:.1} MB",
            run.cpu_seconds * 1e6 / args.events as f64,
            worker / bare,
            worker / decoding,
            every.rate,
            every.cpu_seconds * 1e6 / args.events as f64,
            every.rate / bare,
            hwm as f64 / 1024.0,
            last_rss as f64 / 1024.0
        );
        if let Some(kcat) = kcat {
            println!(
                "round {round}: kcat {kcat:>9.0}/s (start-up included) | worker/kcat {:.2}",
                worker / kcat
            );
            consume.record("kcat -C (start-up included)", "events/s", kcat, None, None)?;
            consume.record(
                "shopstream-worker vs kcat",
                "events/s",
                worker,
                Some(("kcat", kcat)),
                None,
            )?;
        }
        consume.record(
            "bare rdkafka StreamConsumer, counting",
            "events/s",
            bare,
            None,
            None,
        )?;
        consume.record(
            "bare rdkafka, decoding each record (its decoded blocks)",
            "events/s",
            decoding,
            None,
            None,
        )?;
        // What decoding adds per event (above), and the decode calls timed.
        consume.record(
            "Avro decode per event (blocks decoded minus blocks counted, one pass)",
            "µs",
            decode_cost,
            None,
            Some(Goal::AtMost(1.0)),
        )?;
        consume.record(
            "Avro decode per event, decode calls timed",
            "µs",
            decode_timed,
            None,
            Some(Goal::AtMost(1.0)),
        )?;
        consume.record(
            "shopstream-worker, no-op handler, on orders",
            "events/s",
            worker,
            Some(("bare rdkafka consumer", bare)),
            Some(Goal::RatioAtLeast(0.8)),
        )?;
        consume.record(
            "shopstream-worker, no-op handler, on orders (issue 22's goal)",
            "events/s",
            worker,
            Some(("bare rdkafka consumer", bare)),
            Some(Goal::RatioAtLeast(0.5)),
        )?;
        consume.record(
            "shopstream-worker, no-op handler, every topic of the catalog",
            "events/s",
            every.rate,
            Some(("bare rdkafka consumer", bare)),
            None,
        )?;
        consume.record(
            "shopstream-worker vs a bare consumer that decodes",
            "events/s",
            worker,
            Some(("bare rdkafka, decoding", decoding)),
            None,
        )?;
        resources.record(
            "shopstream-worker peak RSS",
            "MB",
            hwm as f64 / 1024.0,
            None,
            Some(Goal::AtMost(100.0)),
        )?;
        resources.record(
            "shopstream-worker RSS after the run",
            "MB",
            last_rss as f64 / 1024.0,
            None,
            None,
        )?;
        resources.record(
            "shopstream-worker CPU per million events (no-op, on orders)",
            "CPU s",
            run.cpu_seconds / args.events as f64 * 1e6,
            None,
            None,
        )?;
        resources.record(
            "shopstream-worker CPU per million events (no-op, every topic)",
            "CPU s",
            every.cpu_seconds / args.events as f64 * 1e6,
            None,
            None,
        )?;
        bare_rates.push(bare);
        decoding_rates.push(decoding);
        worker_rates.push(worker);
        every_rates.push(every.rate);
        peaks.push(hwm as f64 / 1024.0);
        steadies.push(last_rss as f64 / 1024.0);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let (b, bmin, bmax) = median(&mut bare_rates);
    let (w, wmin, wmax) = median(&mut worker_rates);
    let (d, dmin, dmax) = median(&mut decoding_rates);
    let (p, _, pmax) = median(&mut peaks);
    let (s, _, _) = median(&mut steadies);
    let (e, emin, emax) = median(&mut every_rates);
    println!("median: bare {b:.0} (min {bmin:.0}, max {bmax:.0}); bare+decode {d:.0} (min {dmin:.0}, max {dmax:.0}); worker on orders {w:.0} (min {wmin:.0}, max {wmax:.0}); on every topic {e:.0} (min {emin:.0}, max {emax:.0})");
    println!(
        "ratio of medians: worker/bare {:.2}; worker/bare+decode {:.2}",
        w / b,
        w / d
    );
    if !sink_rates.is_empty() {
        let (k, kmin, kmax) = median(&mut sink_rates);
        println!("events-store: median {k:.0} rows/s (min {kmin:.0}, max {kmax:.0}); {:.2} of the no-op worker on every topic", k / e);
    }
    println!("worker RSS: peak median {p:.1} MB (max {pmax:.1}), after the run median {s:.1} MB");
    Ok(())
}

/// The worker child must not outlive a failed bench.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn publisher_client_metadata(connection: &KafkaConnection) -> anyhow::Result<i32> {
    let client: rdkafka::consumer::BaseConsumer = connection.client_config().create()?;
    let metadata = client.fetch_metadata(Some("orders"), Duration::from_secs(5))?;
    Ok(metadata
        .topics()
        .first()
        .map_or(0, |t| t.partitions().len() as i32))
}
