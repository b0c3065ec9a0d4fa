//! `/healthz`, `/readyz` and `/metrics` for the long-running binaries: a
//! deliberately small HTTP/1.1 responder (GET only, one response per
//! connection) so probes and Prometheus need no framework.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::shutdown::Shutdown;

/// Renders the Prometheus text for `/metrics`.
pub type MetricsText = Arc<dyn Fn() -> String + Send + Sync>;

/// The probes' address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("listening on {setting} {address}: {source}")]
pub struct ServeError {
    setting: String,
    address: String,
    source: std::io::Error,
}

/// Binds `address`, the value of the config field `setting`, now (so a bad
/// address fails at start, naming the field), then serves until `shutdown`.
/// Returns the bound address (useful with port 0).
pub async fn serve(
    setting: &str,
    address: &str,
    ready: Arc<AtomicBool>,
    metrics: MetricsText,
    shutdown: Shutdown,
) -> Result<SocketAddr, ServeError> {
    let fail = |source| ServeError {
        setting: setting.to_owned(),
        address: address.to_owned(),
        source,
    };
    let listener = TcpListener::bind(address).await.map_err(fail)?;
    let bound = listener.local_addr().map_err(fail)?;
    tracing::info!(address = %bound, "Serving /healthz, /readyz and /metrics.");
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(_) => continue,
                },
            };
            let (ready, metrics) = (ready.clone(), metrics.clone());
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let read = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    stream.read(&mut request),
                )
                .await;
                let Ok(Ok(n)) = read else { return };
                let line = String::from_utf8_lossy(&request[..n]);
                let path = line.split_whitespace().nth(1).unwrap_or("/");
                let (status, body, kind) = match path {
                    "/healthz" => ("200 OK", "ok\n".to_owned(), "text/plain"),
                    "/readyz" if ready.load(Ordering::SeqCst) => {
                        ("200 OK", "ready\n".to_owned(), "text/plain")
                    }
                    "/readyz" => (
                        "503 Service Unavailable",
                        "not ready\n".to_owned(),
                        "text/plain",
                    ),
                    "/metrics" => ("200 OK", metrics(), "text/plain; version=0.0.4"),
                    _ => (
                        "404 Not Found",
                        "try /healthz, /readyz or /metrics\n".to_owned(),
                        "text/plain",
                    ),
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(address: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn probes_follow_readiness_and_metrics_render() {
        let ready = Arc::new(AtomicBool::new(false));
        let shutdown = Shutdown::new();
        let address = serve(
            "worker.metrics_address",
            "127.0.0.1:0",
            ready.clone(),
            Arc::new(|| "up 1\n".to_owned()),
            shutdown.clone(),
        )
        .await
        .unwrap();
        assert!(get(address, "/healthz")
            .await
            .starts_with("HTTP/1.1 200 OK"));
        assert!(get(address, "/readyz").await.starts_with("HTTP/1.1 503"));
        ready.store(true, Ordering::SeqCst);
        assert!(get(address, "/readyz").await.starts_with("HTTP/1.1 200 OK"));
        assert!(get(address, "/metrics").await.ends_with("\r\n\r\nup 1\n"));
        assert!(get(address, "/nope").await.starts_with("HTTP/1.1 404"));
        shutdown.cancel();
        let error = serve(
            "analytics.metrics_address",
            "256.0.0.1:1",
            ready,
            Arc::new(String::new),
            Shutdown::new(),
        )
        .await
        .unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("listening on analytics.metrics_address 256.0.0.1:1: "),
            "{error}"
        );
    }
}
