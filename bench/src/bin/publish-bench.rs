//! Publish throughput, shopstream vs a bare rdkafka producer, in one run on
//! the same broker: the bare producer sends the same events pre-encoded (same
//! payload sizes, same producer settings, no headers); shopstream encodes,
//! adds headers and tracks every delivery. A third line, the bare producer
//! with the same headers pre-built, separates the cost of the headers' bytes
//! from the cost of our code. Rounds alternate so drift on a noisy machine
//! hits all; a warm-up round is not counted.
//!
//! Then the shopstream-publish binary (generator included) sends the same
//! number of events as a separate process, for its CPU and memory.
//!
//!   cargo run --release -p bench --bin publish-bench -- [--brokers B] [--events N] [--rounds R] [--format json]
//!
//! With BENCH_JSON set, the figures are appended there (see bench-report).

#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use backbone::catalog::Catalog;
use backbone::codec::{encode, Encoding};
use backbone::config::KafkaSettings;
use backbone::events::AnyEvent;
use backbone::kafka::KafkaConnection;
use backbone::schema::SchemaRegistry;
use bench::{Goal, Recorder};
use clap::Parser;
use futures::stream::{FuturesUnordered, StreamExt};
use producers::generator::{Generator, GeneratorConfig};
use producers::publisher::{PublishOptions, Publisher};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

#[derive(Debug, Parser)]
struct Args {
    /// Bootstrap servers, or embedded:// (the in-process mock cluster).
    #[arg(long, default_value = "embedded://")]
    brokers: String,
    /// Events per measurement.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Measurements per contender.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Catalog (topics must exist unless embedded).
    #[arg(long, default_value = "topics.yaml")]
    catalog: std::path::PathBuf,
    #[arg(long, default_value = "dev")]
    profile: String,
    #[arg(long, value_enum, default_value_t = Encoding::Avro)]
    format: Encoding,
}

/// The allocator shopstream-publish ships (C's malloc included), for both
/// contenders alike.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// In flight at most, for both contenders.
const WINDOW: usize = 50_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let catalog =
        Catalog::load(&args.catalog, Some(&args.profile)).map_err(|p| anyhow::anyhow!("{p}"))?;
    let settings = KafkaSettings {
        bootstrap_servers: args.brokers.clone(),
        ..KafkaSettings::default()
    };
    let connection = KafkaConnection::connect(&settings, &catalog)?;
    let options = PublishOptions {
        encoding: args.format,
        ..PublishOptions::default()
    };
    let publisher = Publisher::new(&connection, &catalog, &options)?;
    publisher.check_topics(Duration::from_secs(10))?;

    let events: Vec<AnyEvent> = Generator::new(GeneratorConfig::default())
        .take(args.events)
        .map(|g| g.event)
        .collect();
    let encoded: Vec<(String, String, Vec<u8>)> = events
        .iter()
        .map(|event| {
            let (topic, key, payload) = match event {
                AnyEvent::User(e) => (
                    publisher.topic(event.event_type()),
                    e.user_id.clone(),
                    encode(e, args.format),
                ),
                AnyEvent::Order(e) => (
                    publisher.topic(event.event_type()),
                    e.order_id.clone(),
                    encode(e, args.format),
                ),
                AnyEvent::Chat(e) => (
                    publisher.topic(event.event_type()),
                    e.room_id.clone(),
                    encode(e, args.format),
                ),
                AnyEvent::Search(e) => (
                    publisher.topic(event.event_type()),
                    e.user_id.clone(),
                    encode(e, args.format),
                ),
            };
            Ok((topic?.to_owned(), key, payload))
        })
        .collect::<anyhow::Result<_>>()?;
    let bytes: usize = encoded.iter().map(|(_, _, p)| p.len()).sum();

    let mut bare_config = connection.client_config();
    bare_config
        .set("enable.idempotence", "true")
        .set("linger.ms", options.linger_ms.to_string())
        .set(
            "queue.buffering.max.messages",
            options.max_queued.to_string(),
        );
    let bare: FutureProducer = bare_config.create()?;

    println!(
        "{} events of {:.0} bytes on average ({:?}), {} rounds, broker {}",
        events.len(),
        bytes as f64 / events.len() as f64,
        args.format,
        args.rounds,
        connection.bootstrap_servers()
    );
    let headers: Vec<OwnedHeaders> = events
        .iter()
        .map(|e| {
            let trace = backbone::headers::traceparent_for(e.event_id(), 1);
            let fingerprint = SchemaRegistry::global()
                .current(e.event_type())
                .fingerprint_hex();
            OwnedHeaders::new_with_capacity(5)
                .insert(Header {
                    key: backbone::headers::EVENT_TYPE,
                    value: Some(e.event_type().name()),
                })
                .insert(Header {
                    key: backbone::headers::CONTENT_TYPE,
                    value: Some(args.format.content_type()),
                })
                .insert(Header {
                    key: backbone::headers::SCHEMA_FINGERPRINT,
                    value: Some(fingerprint),
                })
                .insert(Header {
                    key: backbone::headers::TRACEPARENT,
                    value: Some(trace.as_str()),
                })
                .insert(Header {
                    key: backbone::headers::PRODUCED_AT,
                    value: Some("1763000000000"),
                })
        })
        .collect();
    let section = match args.format {
        Encoding::Avro => "publish (Avro)",
        Encoding::Json => "publish (JSON)",
    };
    let mut recorder = Recorder::from_env(section)?;
    let (mut ours, mut theirs, mut with_headers) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..=args.rounds {
        let bare_rate = bare_run(&bare, &encoded, None).await?;
        let headed_rate = bare_run(&bare, &encoded, Some(&headers)).await?;

        let started = Instant::now();
        let mut in_flight = FuturesUnordered::new();
        for event in &events {
            while in_flight.len() >= WINDOW {
                in_flight.next().await;
            }
            in_flight.push(publisher.enqueue_any(event, None, None).await?.delivered());
        }
        while let Some(result) = in_flight.next().await {
            result?;
        }
        publisher.flush(Duration::from_secs(60))?;
        let our_rate = events.len() as f64 / started.elapsed().as_secs_f64();
        if round == 0 {
            println!("warm-up: bare {bare_rate:.0}, bare+headers {headed_rate:.0}, shopstream {our_rate:.0} events/s (not counted)");
            continue;
        }
        let mb = |rate: f64| rate * bytes as f64 / events.len() as f64 / 1e6;
        println!(
            "round {round}: bare {bare_rate:>8.0}/s {:>5.1} MB/s | bare+headers {headed_rate:>8.0}/s | shopstream {our_rate:>8.0}/s {:>5.1} MB/s | ratio {:.2} (vs bare+headers {:.2})",
            mb(bare_rate),
            mb(our_rate),
            our_rate / bare_rate,
            our_rate / headed_rate
        );
        let bare = Some(("bare rdkafka producer", bare_rate));
        recorder.record(
            "bare rdkafka producer, pre-encoded",
            "events/s",
            bare_rate,
            None,
            None,
        )?;
        recorder.record(
            "bare rdkafka producer, pre-encoded",
            "MB/s",
            mb(bare_rate),
            None,
            None,
        )?;
        recorder.record(
            "shopstream Publisher",
            "events/s",
            our_rate,
            bare,
            Some(Goal::RatioAtLeast(0.8)),
        )?;
        recorder.record("shopstream Publisher", "MB/s", mb(our_rate), None, None)?;
        recorder.record(
            "shopstream Publisher vs bare with the same five headers",
            "events/s",
            our_rate,
            Some(("bare rdkafka producer with the headers", headed_rate)),
            Some(Goal::RatioAtLeast(0.9)),
        )?;
        theirs.push(bare_rate);
        with_headers.push(headed_rate);
        ours.push(our_rate);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let (bm, bmin, bmax) = median(&mut theirs);
    let (hm, hmin, hmax) = median(&mut with_headers);
    let (om, omin, omax) = median(&mut ours);
    println!("median: bare {bm:.0} events/s (min {bmin:.0}, max {bmax:.0}); bare+headers {hm:.0} (min {hmin:.0}, max {hmax:.0}); shopstream {om:.0} (min {omin:.0}, max {omax:.0})");
    println!(
        "ratio of medians: shopstream/bare {:.2}; shopstream/bare+headers {:.2}",
        om / bm,
        om / hm
    );
    publish_binary(&args, connection.bootstrap_servers(), &mut recorder).await
}

/// The shopstream-publish binary, as users run it, sending `args.events`
/// as fast as it can: its rate, CPU seconds per million events and peak RSS.
async fn publish_binary(args: &Args, brokers: &str, recorder: &mut Recorder) -> anyhow::Result<()> {
    let format = match args.format {
        Encoding::Avro => "avro",
        Encoding::Json => "json",
    };
    let mut child =
        std::process::Command::new(std::env::current_exe()?.with_file_name("shopstream-publish"))
            .args([
                "--brokers",
                brokers,
                "--profile",
                &args.profile,
                "--format",
                format,
            ])
            .args(["--count", &args.events.to_string(), "--rate", "100000000"])
            .arg("--set")
            .arg(format!("catalog.path={}", args.catalog.display()))
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
    let usage = tokio::task::spawn_blocking(move || bench::procfs::measure(&mut child)).await??;
    anyhow::ensure!(usage.success, "shopstream-publish failed");
    let rate = args.events as f64 / usage.wall_seconds;
    let cpu_per_million = usage.cpu_seconds / args.events as f64 * 1e6;
    let peak_mb = usage.peak_rss_kib as f64 / 1024.0;
    println!(
        "shopstream-publish binary: {rate:.0} events/s (generator included), {cpu_per_million:.1} CPU s per million events, peak RSS {peak_mb:.1} MB"
    );
    recorder.record(
        "shopstream-publish binary, generator included",
        "events/s",
        rate,
        None,
        None,
    )?;
    let mut resources = Recorder::from_env("resources")?;
    let label = match args.format {
        Encoding::Avro => "Avro",
        Encoding::Json => "JSON",
    };
    resources.record(
        &format!("shopstream-publish CPU per million events ({label})"),
        "CPU s",
        cpu_per_million,
        None,
        None,
    )?;
    resources.record(
        &format!("shopstream-publish peak RSS ({label})"),
        "MB",
        peak_mb,
        None,
        None,
    )?;
    Ok(())
}

/// Sends every pre-encoded record with the bare producer; events per second.
async fn bare_run(
    producer: &FutureProducer,
    encoded: &[(String, String, Vec<u8>)],
    headers: Option<&[OwnedHeaders]>,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    for (i, (topic, key, payload)) in encoded.iter().enumerate() {
        while in_flight.len() >= WINDOW {
            in_flight.next().await;
        }
        let mut record = FutureRecord::to(topic).key(key).payload(payload);
        if let Some(headers) = headers {
            record = record.headers(headers[i].clone());
        }
        loop {
            match producer.send_result(record) {
                Ok(delivery) => break in_flight.push(delivery),
                Err((_, back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
            }
        }
    }
    while let Some(result) = in_flight.next().await {
        result?.map_err(|(e, _)| e)?;
    }
    producer.flush(Duration::from_secs(60))?;
    Ok(encoded.len() as f64 / started.elapsed().as_secs_f64())
}
