//! shopstream-check: recompute a seeded run and check the end state.

// The report is the program's output.
#![allow(clippy::print_stdout)]

use std::process::ExitCode;

use anyhow::Context;
use backbone::config::{Config, ConfigArgs};
use backbone::kafka::KafkaConnection;
use checker::{Checks, Expected, Observed, TopicCopies};
use clap::{Parser, ValueEnum};
use producers::cli::Traffic;

/// Check that a `shopstream-publish` run arrived: nothing lost, nothing
/// doubled, order statuses in order, read models equal to a recomputation,
/// dead letters complete. Give it the run's traffic flags (`--seed`,
/// `--start-ms`, `--rate`, ... as the publisher's summary prints them) and the
/// number of events sent. Exits 0 without findings, 1 with findings, 2 when
/// the check could not run.
#[derive(Debug, Parser)]
#[command(name = "shopstream-check", version)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    traffic: Traffic,
    /// Events the run sent (the publisher's summary says).
    #[arg(long)]
    count: usize,
    /// What to check.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "events,order-status,analytics,dead-letters"
    )]
    check: Vec<Part>,
    /// Consumer groups whose dead letters to check (default: the worker's and
    /// the analytics job's groups from the configuration).
    #[arg(long = "group")]
    groups: Vec<String>,
    /// Raw-table duplicates (hidden from queries by FINAL) are findings too.
    #[arg(long)]
    exact_raw: bool,
    /// Dead letters written twice are counted, not findings (DLQs written
    /// by releases before the forwarding ledger).
    #[arg(long)]
    dead_letters_at_least_once: bool,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    Events,
    OrderStatus,
    Analytics,
    DeadLetters,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("shopstream-check: {error:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let start_ms = args.traffic.start_ms.context(
        "--start-ms is required: the run's first event time, which shopstream-publish prints in its summary",
    )?;
    let (config, catalog, _) =
        Config::load_with_catalog(&args.config).map_err(anyhow::Error::msg)?;
    let groups = if args.groups.is_empty() {
        vec![
            config.worker.group_id.clone(),
            config.analytics.group_id.clone(),
        ]
    } else {
        args.groups
    };
    let checks = Checks {
        events: args.check.contains(&Part::Events),
        order_status: args.check.contains(&Part::OrderStatus),
        analytics: args.check.contains(&Part::Analytics),
        dead_letter_groups: if args.check.contains(&Part::DeadLetters) {
            groups
        } else {
            Vec::new()
        },
        exact_raw: args.exact_raw,
        dead_letters_at_least_once: args.dead_letters_at_least_once,
        topic_copies: TopicCopies::Unchecked,
    };
    let expected = Expected::new(args.traffic.generator(start_ms).take(args.count));
    let client = consumers::projection::client(&config.clickhouse, true);
    let connection =
        KafkaConnection::connect(&config.kafka, &catalog).context("connecting to Kafka")?;
    let observed = Observed::read(&checks, &client, &connection, &catalog).await?;
    let report = checker::check(&expected, &observed, &checks);
    match args.output {
        Output::Text => println!("{report}"),
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    Ok(report.passed())
}
