//! shopstream-query: the read-model HTTP API and dashboard.

use std::process::ExitCode;

use backbone::config::{Config, ConfigArgs};
use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Serves the ClickHouse read models as a JSON API under /api/v1 (OpenAPI
/// document at /api/v1/openapi.json) and a live dashboard at /.
#[derive(Debug, Parser)]
#[command(name = "shopstream-query", version)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(problems) => {
            eprintln!("error: invalid configuration:\n{problems}");
            return ExitCode::FAILURE;
        }
    };
    backbone::telemetry::init(&config.telemetry);
    let shutdown = match backbone::shutdown::on_signals() {
        Ok(token) => token,
        Err(e) => {
            eprintln!("error: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match query::run(&config, shutdown, |_| ()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    };
    backbone::telemetry::shutdown();
    code
}
