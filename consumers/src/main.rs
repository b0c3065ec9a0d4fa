//! shopstream-worker: the consumer-group runtime as a deployable process.

use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let args = consumers::worker::WorkerArgs::parse();
    let shutdown = match backbone::shutdown::on_signals() {
        Ok(token) => token,
        Err(e) => {
            eprintln!("error: cannot install signal handlers: {e}");
            std::process::exit(1);
        }
    };
    let code = match consumers::worker::run(args, shutdown).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    // Not through the runtime's drop: it waits for every blocking task, and
    // one may be stuck in librdkafka on an unreachable cluster that the
    // drain already gave up on.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    backbone::telemetry::shutdown();
    std::process::exit(code)
}
