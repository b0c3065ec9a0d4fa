//! shopstream-worker's command line: the shared configuration, the handlers
//! to run, the operations endpoints, and the runtime until SIGTERM; plus the
//! `dlq` tools.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use backbone::catalog::Catalog;
use backbone::config::{Config, ConfigArgs};
use backbone::kafka::KafkaConnection;
use backbone::shutdown::Shutdown;
use clap::{Parser, Subcommand};

use crate::builtin::{Builtin, Chain};
use crate::dlq::Filter;
use crate::metrics::Metrics;
use crate::projection::Projections;
use crate::routes::Routes;

/// Run handlers over the catalog's topics in a consumer group, with batching,
/// retries, retry tiers, dead-lettering and a clean drain on SIGTERM.
#[derive(Debug, Parser)]
#[command(
    name = "shopstream-worker",
    version,
    args_conflicts_with_subcommands = true
)]
pub struct WorkerArgs {
    #[command(subcommand)]
    pub command: Option<WorkerCommand>,
    #[command(flatten)]
    pub config: ConfigArgs,
    /// A handler to run (repeatable): noop, log, events-store, order-status.
    /// Default: worker.handlers.
    #[arg(long = "handler", value_name = "NAME")]
    pub handlers: Vec<String>,
    /// A catalog event topic to consume, with its retry tiers (repeatable).
    /// Default: worker.topics, or every event topic of the catalog.
    #[arg(long = "topic", value_name = "TOPIC")]
    pub topics: Vec<String>,
    /// Consumer group id. Default: worker.group_id.
    #[arg(long)]
    pub group: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum WorkerCommand {
    /// Inspect a dead-letter queue and replay its records.
    #[command(subcommand)]
    Dlq(DlqCommand),
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Records by error class and original topic.
    List(DlqArgs),
    /// Records with their headers and decoded payloads.
    Show {
        #[command(flatten)]
        dlq: DlqArgs,
        /// Records to show at most.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Send records back to their original topic (replay-count + 1).
    Replay {
        #[command(flatten)]
        dlq: DlqArgs,
        /// Count what would be replayed; send nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct DlqArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The dead-letter topic, or a catalog topic whose DLQ is meant.
    #[arg(long)]
    pub topic: String,
    #[command(flatten)]
    pub filter: Filter,
}

fn load(args: &ConfigArgs) -> anyhow::Result<(Config, Catalog)> {
    let (config, catalog, _) = Config::load_with_catalog(args).map_err(anyhow::Error::msg)?;
    Ok((config, catalog))
}

pub async fn run(args: WorkerArgs, shutdown: Shutdown) -> anyhow::Result<()> {
    if let Some(WorkerCommand::Dlq(command)) = args.command {
        return run_dlq(command).await;
    }
    let (mut config, catalog) = load(&args.config)?;
    if let Some(group) = args.group {
        config.worker.group_id = group;
    }
    let names = if args.handlers.is_empty() {
        config.worker.handlers.clone()
    } else {
        args.handlers
    };
    if names.is_empty() {
        anyhow::bail!(
            "choose at least one handler with --handler (or worker.handlers): {}",
            Builtin::NAMES.join(", ")
        );
    }
    let builtins = names
        .iter()
        .map(|n| n.parse::<Builtin>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("--handler: {e}"))?;
    let (topics, setting) = if args.topics.is_empty() {
        (&config.worker.topics, "worker.topics")
    } else {
        (&args.topics, "--topic")
    };
    let routes = Routes::new(&catalog, topics).map_err(|e| anyhow::anyhow!("{setting}: {e}"))?;
    let connection =
        KafkaConnection::connect(&config.kafka, &catalog).context("connecting to Kafka")?;
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    backbone::ops::serve(
        "worker.metrics_address",
        &config.worker.metrics_address,
        ready.clone(),
        metrics.registry(),
        shutdown.clone(),
    )
    .await?;
    let projections: Vec<_> = builtins.iter().filter_map(|b| b.projection()).collect();
    let projections = if projections.is_empty() {
        None
    } else {
        Some(Arc::new(
            Projections::start(
                &config.clickhouse,
                &projections,
                config.worker.concurrency,
                metrics.clone(),
                &shutdown,
            )
            .await?,
        ))
    };
    crate::runtime::run(
        &connection,
        &config.worker,
        routes,
        Chain {
            builtins,
            projections,
        },
        metrics,
        ready,
        shutdown,
    )
    .await?;
    Ok(())
}

async fn run_dlq(command: DlqCommand) -> anyhow::Result<()> {
    let (dlq, limit, replay) = match &command {
        DlqCommand::List(dlq) => (dlq, 0, None),
        DlqCommand::Show { dlq, limit } => (dlq, *limit, None),
        DlqCommand::Replay { dlq, dry_run } => (dlq, 0, Some(*dry_run)),
    };
    let (config, catalog) = load(&dlq.config)?;
    let connection =
        KafkaConnection::connect(&config.kafka, &catalog).context("connecting to Kafka")?;
    let topic = crate::dlq::dead_letter_topic(&catalog, &dlq.topic);
    let records = tokio::task::block_in_place(|| crate::dlq::read_all(&connection, &topic))?;
    let mut out = std::io::stdout().lock();
    match (&command, replay) {
        (DlqCommand::List(_), _) => crate::dlq::list(&records, &dlq.filter, &mut out)?,
        (DlqCommand::Show { .. }, _) => crate::dlq::show(&records, &dlq.filter, limit, &mut out)?,
        (_, dry_run) => {
            let dry_run = dry_run.unwrap_or(false);
            let done = crate::dlq::replay(
                &connection,
                &records,
                &dlq.filter,
                config.worker.max_replays,
                dry_run,
            )
            .await?;
            use std::io::Write;
            writeln!(
                out,
                "{} {} record(s) from {topic}; refused {} already replayed {} times (worker.max_replays); {} without an original-topic header",
                if dry_run { "would replay" } else { "replayed" },
                done.replayed,
                done.refused,
                config.worker.max_replays,
                done.homeless
            )?;
        }
    }
    Ok(())
}
