//! The load generator's command line and run loop: paced, bounded in flight,
//! with a progress line and a final summary.

use std::io::IsTerminal;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use backbone::codec::Encoding;
use backbone::config::{Config, ConfigArgs};
use backbone::headers::Traceparent;
use backbone::kafka::KafkaConnection;
use backbone::shutdown::Shutdown;
use backbone::telemetry;
use clap::Parser;
use futures::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::generator::{Generator, GeneratorConfig, Mix};
use crate::publisher::{PublishOptions, Publisher};

/// Generate realistic, referentially consistent e-commerce traffic into Kafka.
#[derive(Debug, Parser)]
#[command(name = "shopstream-publish", version)]
pub struct PublishArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub traffic: Traffic,
    /// Stop after this many events (default 10000 unless --duration is given).
    #[arg(long, conflicts_with = "duration")]
    pub count: Option<u64>,
    /// Stop after this long, such as 90s or 5m.
    #[arg(long, value_parser = duration)]
    pub duration: Option<Duration>,
    #[arg(long, value_enum, default_value_t = Encoding::Avro)]
    pub format: Encoding,
    /// Records handed to Kafka and not yet acknowledged, at most.
    #[arg(long, default_value_t = 50_000)]
    pub max_in_flight: usize,
}

/// What traffic to generate: the same values give the same events, so
/// `shopstream-check` takes these flags too and recomputes a run.
#[derive(Debug, Clone, clap::Args)]
pub struct Traffic {
    /// Events per second, all types together.
    #[arg(long, default_value_t = 1000.0, value_parser = positive_rate, allow_negative_numbers = true)]
    pub rate: f64,
    /// Relative weights per event type: user, order, chat, search.
    #[arg(long, default_value = "user=30,order=15,chat=35,search=20")]
    pub mix: Mix,
    /// Same seed and --start-ms, same events.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Event time of the first event in UTC milliseconds (default: now). The
    /// summary prints it, so a run can be recomputed.
    #[arg(long)]
    pub start_ms: Option<i64>,
    /// Fraction of records sent deliberately malformed, to exercise dead-lettering.
    #[arg(long, default_value_t = 0.0, value_parser = fraction)]
    pub poison_rate: f64,
    /// Distinct users (Zipf-distributed activity).
    #[arg(long, default_value_t = 10_000)]
    pub users: usize,
    /// Distinct live-shopping rooms (Zipf-distributed activity).
    #[arg(long, default_value_t = 200)]
    pub rooms: usize,
}

impl Traffic {
    /// The generator for these flags, starting at `start_ms` (the run's
    /// `--start-ms`, or now).
    pub fn generator(&self, start_ms: i64) -> Generator {
        Generator::new(GeneratorConfig {
            seed: self.seed,
            start_ms,
            spacing_ms: 1000.0 / self.rate,
            users: self.users,
            rooms: self.rooms,
            mix: self.mix,
            poison_rate: self.poison_rate,
            ..GeneratorConfig::default()
        })
    }
}

fn positive_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!(
            "must be a positive number of events per second, got {text:?}"
        )),
    }
}

fn fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("must be a fraction from 0 to 1, got {text:?}")),
    }
}

fn duration(text: &str) -> Result<Duration, String> {
    backbone::catalog::parse_delay(text)
}

/// What a run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub sent: u64,
    pub failed: u64,
    pub poisoned: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub events_per_second: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub seed: u64,
    pub start_ms: i64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Sent {} events ({} deliberately malformed), {} failed, {:.1} MB in {:.1} s: {:.0} events/s; delivery latency p50 {:.1} ms, p99 {:.1} ms. Recompute with --seed {} --start-ms {}.",
            self.sent,
            self.poisoned,
            self.failed,
            self.bytes as f64 / 1e6,
            self.seconds,
            self.events_per_second,
            self.latency_p50_ms,
            self.latency_p99_ms,
            self.seed,
            self.start_ms
        )
    }
}

/// Events per publish span (when traces are exported): each record's
/// `traceparent` names its batch's span.
const PUBLISH_SPAN_EVENTS: u64 = 500;

/// Generates and publishes until the count or duration is reached or
/// `shutdown` fires; then waits for every in-flight record.
pub async fn run(args: PublishArgs, shutdown: Shutdown) -> anyhow::Result<Summary> {
    let (config, catalog, _) =
        Config::load_with_catalog(&args.config).map_err(anyhow::Error::msg)?;
    let connection =
        KafkaConnection::connect(&config.kafka, &catalog).context("connecting to Kafka")?;
    let options = PublishOptions {
        encoding: args.format,
        ..PublishOptions::default()
    };
    let publisher = Publisher::new(&connection, &catalog, &options)?;
    let check_timeout =
        Duration::from_millis(config.kafka.request_timeout_ms).min(Duration::from_secs(10));
    publisher.check_topics(check_timeout)?;

    let traffic = &args.traffic;
    let start_ms = traffic.start_ms.unwrap_or_else(now_ms);
    let generator = traffic.generator(start_ms);
    let limit = match (args.count, args.duration) {
        (Some(count), _) => Some(count),
        (None, Some(_)) => None,
        (None, None) => Some(10_000),
    };
    let progress = Progress::new(limit);
    let mut summary = Summary {
        seed: traffic.seed,
        start_ms,
        ..Summary::default()
    };
    let mut latency = Histogram::<u64>::new(3).expect("3 significant digits is valid");
    let mut in_flight = FuturesUnordered::new();
    let started = Instant::now();
    let mut record =
        |result: Result<crate::publisher::Delivered, crate::publisher::PublishError>,
         summary: &mut Summary| {
            match result {
                Ok(delivered) => {
                    summary.sent += 1;
                    summary.bytes += delivered.bytes as u64;
                    let _ = latency.record(delivered.latency.as_micros() as u64);
                }
                Err(e) => {
                    if summary.failed == 0 {
                        tracing::error!(error = %e, "Delivery failed.");
                    }
                    summary.failed += 1;
                }
            }
        };

    // One publish span per PUBLISH_SPAN_EVENTS events handed to Kafka.
    let (mut batch, mut in_batch) = (tracing::Span::none(), 0u64);
    // Its traceparent, made once per span rather than per record.
    let mut trace: Option<Traceparent> = None;
    for (i, generated) in generator.enumerate() {
        let i = i as u64;
        if limit.is_some_and(|n| i >= n)
            || args.duration.is_some_and(|d| started.elapsed() >= d)
            || shutdown.is_cancelled()
        {
            break;
        }
        // Pace: event i is due at i / rate seconds.
        let due = started + Duration::from_secs_f64(i as f64 / traffic.rate);
        if let Some(ahead) = due.checked_duration_since(Instant::now()) {
            if ahead > Duration::from_millis(1) {
                tokio::select! {
                    _ = tokio::time::sleep(ahead) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
        while in_flight.len() >= args.max_in_flight.max(1) {
            if let Some(result) = in_flight.next().await {
                record(result, &mut summary);
            }
        }
        summary.poisoned += u64::from(generated.poison.is_some());
        if i.is_multiple_of(PUBLISH_SPAN_EVENTS) {
            batch.record("events", in_batch);
            (batch, in_batch) = (crate::publisher::publish_span(), 0);
            trace = telemetry::traceparent(&batch);
        }
        in_batch += 1;
        let pending = publisher
            .enqueue_any(
                &generated.event,
                generated.poison,
                trace.as_ref().map(Traceparent::as_str),
            )
            .await?;
        in_flight.push(pending.delivered());
        while let Some(Some(result)) = futures::FutureExt::now_or_never(in_flight.next()) {
            record(result, &mut summary);
        }
        progress.update(summary.sent + summary.failed, started);
    }
    batch.record("events", in_batch);
    drop(batch);
    // Drain: everything handed to Kafka is acknowledged or failed before exit.
    while let Some(result) = in_flight.next().await {
        record(result, &mut summary);
    }
    publisher.flush(Duration::from_secs(30))?;
    progress.finish();

    summary.seconds = started.elapsed().as_secs_f64();
    summary.events_per_second = (summary.sent + summary.failed) as f64 / summary.seconds.max(1e-9);
    summary.latency_p50_ms = latency.value_at_quantile(0.5) as f64 / 1000.0;
    summary.latency_p99_ms = latency.value_at_quantile(0.99) as f64 / 1000.0;
    #[allow(clippy::print_stdout)]
    {
        println!("{summary}");
    }
    Ok(summary)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// A progress bar with the live rate on a terminal; plain lines every five
/// seconds otherwise (logs, CI).
struct Progress {
    bar: Option<ProgressBar>,
    last_line: std::cell::Cell<Instant>,
}

impl Progress {
    fn new(limit: Option<u64>) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = limit.map_or_else(ProgressBar::new_spinner, ProgressBar::new);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} events {per_sec}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        });
        Self {
            bar,
            last_line: std::cell::Cell::new(Instant::now()),
        }
    }

    fn update(&self, done: u64, started: Instant) {
        match &self.bar {
            Some(bar) => bar.set_position(done),
            None if self.last_line.get().elapsed() >= Duration::from_secs(5) => {
                self.last_line.set(Instant::now());
                let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-9);
                eprintln!("Published {done} events ({rate:.0}/s).");
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
