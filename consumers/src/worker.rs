//! shopstream-worker's command line: the shared configuration, the handlers
//! to run, the operations endpoints, and the runtime until SIGTERM.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use backbone::catalog::Catalog;
use backbone::config::{Config, ConfigArgs};
use backbone::kafka::KafkaConnection;
use backbone::shutdown::Shutdown;
use clap::Parser;

use crate::builtin::{Builtin, Chain};
use crate::metrics::Metrics;
use crate::routes::Routes;

/// Run handlers over the catalog's topics in a consumer group, with batching,
/// retries, retry tiers, dead-lettering and a clean drain on SIGTERM.
#[derive(Debug, Parser)]
#[command(name = "shopstream-worker", version)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// A handler to run (repeatable): noop, log. Default: worker.handlers.
    #[arg(long = "handler", value_name = "NAME")]
    pub handlers: Vec<String>,
    /// Consumer group id. Default: worker.group_id.
    #[arg(long)]
    pub group: Option<String>,
}

pub async fn run(args: WorkerArgs, shutdown: Shutdown) -> anyhow::Result<()> {
    let mut config =
        Config::load(&args.config).map_err(|p| anyhow::anyhow!("invalid configuration:\n{p}"))?;
    backbone::telemetry::init(&config.telemetry);
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
    let handlers = names
        .iter()
        .map(|n| n.parse::<Builtin>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("--handler: {e}"))?;
    let path = config.catalog_path(&args.config);
    let catalog = Catalog::load(&path, config.catalog.profile.as_deref())
        .map_err(|p| anyhow::anyhow!("invalid topic catalog:\n{p}"))?;
    let connection =
        KafkaConnection::connect(&config.kafka, &catalog).context("connecting to Kafka")?;
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let render = metrics.clone();
    backbone::ops::serve(
        &config.worker.metrics_address,
        ready.clone(),
        Arc::new(move || render.render()),
        shutdown.clone(),
    )
    .await
    .with_context(|| {
        format!(
            "listening on worker.metrics_address {}",
            config.worker.metrics_address
        )
    })?;
    let routes = Routes::new(&catalog, None);
    crate::runtime::run(
        &connection,
        &config.worker,
        routes,
        Chain(handlers),
        metrics,
        ready,
        shutdown,
    )
    .await?;
    Ok(())
}
