//! shopstream-analytics: the windowed aggregation job, and its report.

#![allow(clippy::print_stdout)]

use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use backbone::catalog::Catalog;
use backbone::config::{Config, ConfigArgs};
use backbone::kafka::KafkaConnection;
use backbone::shutdown::Shutdown;
use clap::{Parser, Subcommand, ValueEnum};
use pipelines::job::JobMetrics;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Event-time windowed aggregates from Kafka into ClickHouse read models,
/// exactly once across crashes.
#[derive(Debug, Parser)]
#[command(
    name = "shopstream-analytics",
    version,
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the read models for a time range.
    Report {
        #[command(flatten)]
        config: ConfigArgs,
        /// Start of the range: epoch seconds, or an age such as 2h or 1d.
        #[arg(long, value_parser = parse_time, default_value = "7d")]
        since: i64,
        /// End of the range (exclusive): epoch seconds or an age; default now.
        #[arg(long, value_parser = parse_time)]
        until: Option<i64>,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

/// Epoch seconds, or an age before now (`90s`, `30m`, `2h`, `1d`).
fn parse_time(text: &str) -> Result<i64, String> {
    text.parse::<i64>()
        .or_else(|_| consumers::dlq::parse_since(text).map(|ms| ms / 1000))
        .map_err(|_| {
            format!("{text:?} is neither epoch seconds nor an age such as 90s, 30m, 2h or 1d")
        })
}

fn load(args: &ConfigArgs) -> anyhow::Result<(Config, Catalog)> {
    let (config, catalog, _) = Config::load_with_catalog(args).map_err(anyhow::Error::msg)?;
    Ok((config, catalog))
}

async fn run(args: Args, shutdown: Shutdown) -> anyhow::Result<()> {
    if let Some(Command::Report {
        config,
        since,
        until,
        output,
    }) = args.command
    {
        // The report reads ClickHouse only: no topic catalog needed.
        let config =
            Config::load(&config).map_err(|p| anyhow::anyhow!("invalid configuration:\n{p}"))?;
        backbone::telemetry::init(&config.telemetry);
        let client = consumers::projection::client(&config.clickhouse, true);
        let until = until.unwrap_or_else(|| consumers::forward::now_ms() / 1000 + 1);
        let clamp = |t: i64| u32::try_from(t.max(0)).unwrap_or(u32::MAX);
        let report = pipelines::report::read(&client, clamp(since), clamp(until))
            .await
            .with_context(|| {
                format!(
                    "reading the read models from {} database {}",
                    config.clickhouse.url, config.clickhouse.database
                )
            })?;
        match output {
            Output::Text => print!("{}", pipelines::report::text(&report)),
            Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        }
        return Ok(());
    }
    let (config, catalog) = load(&args.config)?;
    consumers::projection::migrate_when_reachable(
        &config.clickhouse,
        pipelines::ddl::MIGRATIONS_TABLE,
        pipelines::ddl::migrations,
        &shutdown,
    )
    .await?;
    let connection =
        KafkaConnection::connect(&config.kafka, &catalog).context("connecting to Kafka")?;
    let metrics = Arc::new(JobMetrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    backbone::ops::serve(
        "analytics.metrics_address",
        &config.analytics.metrics_address,
        ready.clone(),
        metrics.registry(),
        shutdown.clone(),
    )
    .await?;
    tokio::task::spawn_blocking(move || {
        pipelines::job::run(
            &connection,
            &catalog,
            &config.analytics,
            &config.clickhouse,
            metrics,
            ready,
            shutdown,
        )
    })
    .await
    .context("the job thread failed")?
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let shutdown = match backbone::shutdown::on_signals() {
        Ok(token) => token,
        Err(e) => {
            eprintln!("error: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match run(args, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    backbone::telemetry::shutdown();
    code
}
