//! The shared shutdown signal. Every binary's `run(config, shutdown)` takes a
//! token; `main` cancels it on SIGTERM or ctrl-c, tests cancel it directly.

pub use tokio_util::sync::CancellationToken as Shutdown;

/// A token cancelled on the first SIGTERM or ctrl-c. The handlers are in
/// place when this returns, so a signal sent afterwards cannot kill the
/// process before it drains. Must be called inside a tokio runtime.
pub fn on_signals() -> std::io::Result<Shutdown> {
    use tokio::signal::unix::{signal, SignalKind};
    let token = Shutdown::new();
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        let which = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        tracing::info!(signal = which, "Shutdown requested; draining.");
        cancel.cancel();
    });
    Ok(token)
}
