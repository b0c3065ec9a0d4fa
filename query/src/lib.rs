//! shopstream-query: the read models over a versioned JSON API (`/api/v1`,
//! described at `/api/v1/openapi.json`), a live dashboard at `/`, and the
//! probes and metrics every shopstream service has.

pub mod api;
pub mod auth;
pub mod error;
pub mod http;
pub mod openapi;
pub mod params;
pub mod seed;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use backbone::config::{Config, QuerySettings};
use backbone::shutdown::Shutdown;

use crate::auth::Tokens;
use crate::http::{AnswerCache, RequestMetrics};
use crate::store::Store;

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct App {
    pub store: Store,
    pub settings: Arc<QuerySettings>,
    pub metrics: Arc<RequestMetrics>,
    pub cache: Arc<AnswerCache>,
    /// `None` when `query.auth.tokens_file` is unset: no auth.
    pub tokens: Option<Arc<Tokens>>,
}

/// The service could not start.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{0}")]
    Config(String),
    #[error("listening on query.listen_address {address}: {source}")]
    Listen {
        address: String,
        source: std::io::Error,
    },
    #[error("serving HTTP: {0}")]
    Serve(std::io::Error),
}

impl App {
    pub fn new(config: &Config) -> Result<Self, QueryError> {
        let timeout = Duration::from_millis(config.query.query_timeout_ms);
        let tokens = match &config.query.auth.tokens_file {
            Some(path) => Some(Arc::new(
                Tokens::load(path).map_err(|e| QueryError::Config(e.to_string()))?,
            )),
            None => None,
        };
        Ok(Self {
            tokens,
            store: Store::new(&config.clickhouse, timeout).map_err(QueryError::Config)?,
            settings: Arc::new(config.query.clone()),
            metrics: Arc::new(RequestMetrics::default()),
            cache: Arc::new(AnswerCache::new(Duration::from_secs(u64::from(
                config.query.cache_max_age_s,
            )))),
        })
    }

    /// Every route: the API from [`openapi::ENDPOINTS`], its document, the
    /// dashboard and the probes.
    pub fn router(self) -> Router {
        let document =
            serde_json::to_vec(&openapi::document(self.tokens.is_some())).unwrap_or_default();
        let api = openapi::ENDPOINTS
            .iter()
            .fold(Router::new(), |router, endpoint| {
                router.route(endpoint.path, (endpoint.handler)())
            })
            .route_layer(axum::middleware::from_fn_with_state(
                self.clone(),
                http::reuse,
            ))
            .route(
                "/openapi.json",
                http::fixed("application/json", None, document),
            );
        // Everything but the probes and /metrics needs a token, when set.
        let guarded = Router::new()
            .nest(openapi::PREFIX, api)
            .route(
                "/",
                http::fixed(
                    "text/html; charset=utf-8",
                    Some("no-cache"),
                    http::dashboard_page(&self.settings),
                ),
            )
            .route_layer(axum::middleware::from_fn_with_state(
                self.clone(),
                auth::require_token,
            ));
        Router::new()
            .merge(guarded)
            .route("/healthz", get(http::healthz))
            .route("/readyz", get(http::readyz))
            .route("/metrics", get(http::metrics))
            .fallback(http::not_found)
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                http::measure,
            ))
            .with_state(self)
    }
}

/// Binds `query.listen_address` now (a bad or taken address fails at start,
/// naming the setting) and serves until `shutdown`, then finishes the
/// requests in flight. `bound` learns the address (useful with port 0).
pub async fn run(
    config: &Config,
    shutdown: Shutdown,
    bound: impl FnOnce(SocketAddr),
) -> Result<(), QueryError> {
    let app = App::new(config)?;
    if let Some(tokens) = &app.tokens {
        tokens.clone().watch();
    }
    let address = &config.query.listen_address;
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| QueryError::Listen {
            address: address.clone(),
            source,
        })?;
    let local = listener.local_addr().map_err(QueryError::Serve)?;
    if app.tokens.is_none() && !local.ip().is_loopback() {
        tracing::warn!(address = %local, "Serving the read models to the network without auth: anyone who can reach this address reads them. Set query.auth.tokens_file.");
    }
    tracing::info!(address = %local, clickhouse = %config.clickhouse.url, "Serving the query API at /api/v1 and the dashboard at /.");
    bound(local);
    axum::serve(listener, app.router())
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(QueryError::Serve)
}
