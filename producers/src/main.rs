//! shopstream-publish: generate realistic traffic into Kafka.

use std::process::ExitCode;

use clap::Parser;

/// jemalloc for Rust and C alike: the publishing thread allocates every
/// message and header librdkafka frees on its own threads, and glibc's
/// malloc serialises those on one arena lock (half the CPU per event).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let args = producers::cli::PublishArgs::parse();
    let shutdown = match backbone::shutdown::on_signals() {
        Ok(token) => token,
        Err(e) => {
            eprintln!("error: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match producers::cli::run(args, shutdown).await {
        Ok(summary) if summary.failed == 0 => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    backbone::telemetry::shutdown();
    code
}
