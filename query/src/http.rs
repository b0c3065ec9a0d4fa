//! What every answer shares: caching headers with an ETag (a repeated poll
//! with `If-None-Match` gets a bodiless 304), answers reused while fresh,
//! request metrics, the probes and the dashboard page.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::body::Bytes;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use backbone::config::QuerySettings;
use backbone::metrics::{Counter, EncodeLabelSet, Family, Registry, TracedHistogram, Unit};
use backbone::telemetry;
use serde::Serialize;
use tracing::Instrument;
use twox_hash::XxHash3_64;

use crate::App;

/// Upper bounds of the request latency histogram, in seconds.
const LATENCY_BUCKETS: [f64; 9] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// A JSON answer with `Cache-Control` and a strong ETag over its bytes.
pub fn json<T: Serialize>(app: &App, body: &T) -> Response {
    written(app, |out| serde_json::to_writer(out, body))
}

/// Answers kept at most this long in a thread's buffer between answers.
const BUFFER_KEPT: usize = 8 << 20;

/// [`json`] of the bytes `write` appends: written into the thread's own
/// buffer, which keeps its capacity between answers, then copied once. A
/// long series grown from empty was copied at every doubling (a seventh
/// of the service's CPU on 6,000 points of revenue).
pub fn written(app: &App, write: impl FnOnce(&mut Vec<u8>) -> serde_json::Result<()>) -> Response {
    thread_local! {
        static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let bytes = BUFFER.with_borrow_mut(|buffer| {
        buffer.clear();
        let written = write(buffer).map(|()| Bytes::copy_from_slice(buffer));
        if buffer.capacity() > BUFFER_KEPT {
            *buffer = Vec::new();
        }
        written
    });
    let bytes = match bytes {
        Ok(bytes) => bytes,
        Err(error) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response();
        }
    };
    let etag = etag(&bytes);
    let mut response = Response::new(Body::from(bytes));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(value) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, value);
    }
    if let Ok(value) =
        HeaderValue::from_str(&format!("public, max-age={}", app.settings.cache_max_age_s))
    {
        headers.insert(header::CACHE_CONTROL, value);
    }
    response
}

/// Answers kept for `cache_max_age_s`, by request URI: what a client may
/// reuse for that long, every client may, so a wall of dashboards costs
/// ClickHouse one query per endpoint and period. moka's `try_get_with`
/// runs one query per URI when an answer is missing or expired, and the
/// requests arriving meanwhile wait for it instead of running their own.
#[derive(Debug, Clone)]
pub struct AnswerCache {
    /// `None` when `cache_max_age_s` is 0: nothing is reused.
    answers: Option<moka::future::Cache<String, Answer>>,
}

/// Distinct URIs kept at once; past it the least used go first.
const CACHE_ENTRIES: u64 = 4_096;

/// A whole answer, shareable: the one a query produced, handed to every
/// request that waited for it (kept when it is a successful answer with an
/// ETag, shared but not kept when not).
#[derive(Debug, Clone)]
struct Answer(Arc<(axum::http::response::Parts, Bytes)>);

impl Answer {
    async fn read(response: Response) -> Self {
        let (parts, body) = response.into_parts();
        match axum::body::to_bytes(body, usize::MAX).await {
            Ok(bytes) => Self(Arc::new((parts, bytes))),
            Err(error) => {
                let (parts, _) = (StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
                    .into_response()
                    .into_parts();
                Self(Arc::new((parts, Bytes::from(error.to_string()))))
            }
        }
    }

    fn keepable(&self) -> bool {
        self.0 .0.status == StatusCode::OK && self.0 .0.headers.contains_key(header::ETAG)
    }

    fn response(&self) -> Response {
        let (parts, bytes) = &*self.0;
        Response::from_parts(parts.clone(), Body::from(bytes.clone()))
    }
}

impl AnswerCache {
    pub fn new(max_age: Duration) -> Self {
        Self {
            answers: (!max_age.is_zero()).then(|| {
                moka::future::Cache::builder()
                    .max_capacity(CACHE_ENTRIES)
                    .time_to_live(max_age)
                    .build()
            }),
        }
    }
}

/// Serves a kept answer while it is fresh, keeps new successful ones, and
/// turns an answer whose ETag the client already has into a bodiless 304.
pub async fn reuse(State(app): State<App>, request: Request, next: Next) -> Response {
    let key = request.uri().to_string();
    let has: Vec<String> = request
        .headers()
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|tag| tag.trim().trim_start_matches("W/").to_owned())
        .collect();
    let response = match &app.cache.answers {
        None => next.run(request).await,
        Some(answers) => {
            // An answer that is not kept reaches the requests that waited
            // for it as the error, and the next request queries again.
            let answer = answers
                .try_get_with(key, async move {
                    let answer = Answer::read(next.run(request).await).await;
                    if answer.keepable() {
                        Ok(answer)
                    } else {
                        Err(answer)
                    }
                })
                .await;
            match answer {
                Ok(kept) => kept.response(),
                Err(unkept) => unkept.response(),
            }
        }
    };
    let current = response
        .headers()
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok());
    match current {
        Some(etag) if has.iter().any(|tag| tag == "*" || tag == etag) => {
            let mut not_modified = StatusCode::NOT_MODIFIED.into_response();
            for name in [header::ETAG, header::CACHE_CONTROL] {
                if let Some(value) = response.headers().get(&name) {
                    not_modified.headers_mut().insert(name, value.clone());
                }
            }
            not_modified
        }
        _ => response,
    }
}

/// XXH3 of the answer: a specified hash, so every build and replica tags an
/// answer alike, at memory speed (FNV-1a, byte by byte, was a fifth of the
/// service's CPU on a day's revenue per hour).
fn etag(body: &[u8]) -> String {
    format!("\"{:016x}\"", XxHash3_64::oneshot(body))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

type LatencyFamily = Family<RouteLabel, TracedHistogram, fn() -> TracedHistogram>;

/// Requests and their latency by route and status, in the service's
/// registry (see `backbone::metrics`).
#[derive(Debug)]
pub struct RequestMetrics {
    requests: Family<RouteStatus, Counter>,
    latency: LatencyFamily,
    pub registry: Registry,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        let requests = Family::default();
        let latency: LatencyFamily =
            Family::new_with_constructor(|| TracedHistogram::new(LATENCY_BUCKETS.into_iter()));
        let mut registry = Registry::default();
        registry.register(
            "shopstream_query_requests",
            "Requests answered, by route and status",
            requests.clone(),
        );
        registry.register_with_unit(
            "shopstream_query",
            "Time to answer, by route",
            Unit::Seconds,
            latency.clone(),
        );
        Self {
            requests,
            latency,
            registry,
        }
    }
}

impl RequestMetrics {
    /// One answered request; `span`'s trace is the latency's exemplar.
    fn observe(&self, route: String, status: u16, seconds: f64, span: &tracing::Span) {
        backbone::metrics::observe_in(
            &self.latency.get_or_create(&RouteLabel {
                route: route.clone(),
            }),
            seconds,
            span,
        );
        self.requests
            .get_or_create(&RouteStatus { route, status })
            .inc();
    }
}

/// Counts and times every request by its route template (never the raw
/// path: order ids would make a label per order), in a span of its own
/// when traces are exported (continuing the caller's `traceparent`).
pub async fn measure(State(app): State<App>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let span = backbone::traced_span!(
        "http request",
        http.request.method = %request.method(),
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
    );
    if !span.is_disabled() {
        let caller = request
            .headers()
            .get(backbone::headers::TRACEPARENT)
            .and_then(|value| value.to_str().ok())
            .and_then(telemetry::remote_span);
        telemetry::follow(&span, caller);
    }
    let started = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    app.metrics.observe(
        route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
        &span,
    );
    response
}

pub async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready when ClickHouse answers.
pub async fn readyz(State(app): State<App>) -> Response {
    match app.store.ping().await {
        Ok(()) => "ready\n".into_response(),
        Err(error) => error.into_response(),
    }
}

pub async fn metrics(State(app): State<App>, headers: HeaderMap) -> Response {
    backbone::metrics::exposition(&app.metrics.registry, &headers)
}

/// The dashboard: one self-contained page (its script and styles inline,
/// no fonts or libraries from elsewhere), so it works with no internet.
pub fn dashboard_page(settings: &QuerySettings) -> String {
    include_str!("dashboard.html").replace(
        "__REFRESH_S__",
        &settings.cache_max_age_s.max(1).to_string(),
    )
}

/// A `GET` answering the same bytes every time, made once.
pub fn fixed(
    content_type: &'static str,
    cache_control: Option<&'static str>,
    body: impl Into<Bytes>,
) -> MethodRouter<App> {
    let body: Bytes = body.into();
    get(move || {
        let body = body.clone();
        async move {
            let mut response = Response::new(Body::from(body));
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            if let Some(value) = cache_control {
                headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(value));
            }
            response
        }
    })
}

/// Unknown paths answer in JSON too (under the API, only to a request
/// with a token, when tokens are set).
pub async fn not_found(State(app): State<App>, request: Request) -> Response {
    if request.uri().path().starts_with("/api") {
        if let Some(refused) = crate::auth::refusal(&app, &request) {
            return refused;
        }
    }
    crate::error::ApiError::not_found(format!(
        "no such endpoint: {}; the API is described at /api/v1/openapi.json",
        request.uri().path()
    ))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_are_xxh3_of_the_body() {
        // As the reference implementation (Python's xxhash) gives them.
        assert_eq!(etag(b""), "\"2d06800538d394c2\"");
        assert_eq!(etag(b"a"), "\"e6c632b61e964e1f\"");
    }
}
