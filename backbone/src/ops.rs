//! `/healthz`, `/readyz` and `/metrics` for the long-running binaries,
//! served by axum (the query API's stack) with a request timeout and
//! request tracing from tower-http.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::metrics::{self, Gauge, Registry};
use crate::shutdown::Shutdown;

/// The probes' address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("listening on {setting} {address}: {source}")]
pub struct ServeError {
    setting: String,
    address: String,
    source: std::io::Error,
}

/// The probes and the metrics: readiness as `ready` says, the metrics of
/// `registry` (see [`crate::metrics`]) with `shopstream_ready` added (what
/// `/readyz` answers, for alerting on it).
pub fn router(ready: Arc<AtomicBool>, mut registry: Registry) -> Router {
    let ready_gauge = Gauge::<i64>::default();
    registry.register(
        "shopstream_ready",
        "1 while /readyz answers 200 (started, subscribed, not draining)",
        ready_gauge.clone(),
    );
    let registry = Arc::new(registry);
    let probe = ready.clone();
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || async move {
                if probe.load(Ordering::SeqCst) {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }),
        )
        .route(
            "/metrics",
            get(move |headers: HeaderMap| async move {
                ready_gauge.set(i64::from(ready.load(Ordering::SeqCst)));
                metrics::exposition(&registry, &headers)
            }),
        )
        .fallback(|| async { (StatusCode::NOT_FOUND, "try /healthz, /readyz or /metrics\n") })
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(5),
        ))
        .layer(TraceLayer::new_for_http())
}

/// Binds `address`, the value of the config field `setting`, now (so a bad
/// address fails at start, naming the field), then serves until `shutdown`.
/// Returns the bound address (useful with port 0).
pub async fn serve(
    setting: &str,
    address: &str,
    ready: Arc<AtomicBool>,
    registry: Registry,
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
    let app = router(ready, registry);
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::warn!(%error, "The probes server stopped.");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(address: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let mut response = String::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            stream.read_to_string(&mut response),
        )
        .await
        .expect("the server closes the connection (connection: close)")
        .unwrap();
        response
    }

    #[tokio::test]
    async fn probes_follow_readiness_and_metrics_render() {
        let ready = Arc::new(AtomicBool::new(false));
        let shutdown = Shutdown::new();
        let mut registry = Registry::default();
        let up = Gauge::<i64>::default();
        registry.register("up", "Up", up.clone());
        up.set(1);
        let address = serve(
            "worker.metrics_address",
            "127.0.0.1:0",
            ready.clone(),
            registry,
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
        let text = get(address, "/metrics").await;
        assert!(text.contains("\nup 1\n# HELP shopstream_ready "), "{text}");
        assert!(text.ends_with("\nshopstream_ready 1\n"), "{text}");
        assert!(get(address, "/nope").await.starts_with("HTTP/1.1 404"));
        shutdown.cancel();
        let error = serve(
            "analytics.metrics_address",
            "256.0.0.1:1",
            ready,
            Registry::default(),
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
