//! Metrics: one `prometheus-client` registry per process, exposed at
//! `/metrics` in the format the scraper asks for: OpenMetrics when its
//! `Accept` names `application/openmetrics-text` (what Prometheus asks for
//! first), else the Prometheus text format 0.0.4.
//!
//! The library appends the period to each help text and the unit to each
//! name, and a counter's samples get `_total`: register `shopstream_x` with
//! help "Records fetched" to expose `shopstream_x_total`.

use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
pub use prometheus_client::encoding::EncodeLabelSet;
pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::metrics::exemplar::HistogramWithExemplars;
pub use prometheus_client::metrics::family::Family;
pub use prometheus_client::metrics::gauge::Gauge;
pub use prometheus_client::metrics::histogram::Histogram;
pub use prometheus_client::registry::{Registry, Unit};

/// The media type of OpenMetrics text, as a scraper puts it in `Accept`.
pub const OPENMETRICS: &str = "application/openmetrics-text";

/// A gauge of seconds (or another fractional quantity).
pub type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// An exemplar: the trace a sample was measured in. OpenMetrics shows it
/// beside the sample's bucket; the Prometheus text format leaves it out.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceExemplar {
    pub trace_id: String,
}

/// A latency histogram whose samples name their trace when traces are
/// exported (see [`observe_in`]).
pub type TracedHistogram = HistogramWithExemplars<TraceExemplar>;

/// Observes `value` in `histogram`, with the trace of `span` as its
/// exemplar when traces are exported.
pub fn observe_in(histogram: &TracedHistogram, value: f64, span: &tracing::Span) {
    let exemplar = crate::telemetry::trace_id(span).map(|trace_id| TraceExemplar { trace_id });
    histogram.observe(value, exemplar, None);
}

/// The exposition of `registry` for a request with `headers`.
pub fn exposition(registry: &Registry, headers: &HeaderMap) -> Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|accept| accept.contains(OPENMETRICS));
    let content_type = if openmetrics {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        prometheus_client::encoding::prometheus_text::CONTENT_TYPE
    };
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        encode(registry, openmetrics),
    )
        .into_response()
}

/// `registry` in OpenMetrics text (ending in `# EOF`), or else in the
/// Prometheus text format 0.0.4.
pub fn encode(registry: &Registry, openmetrics: bool) -> String {
    let mut text = String::new();
    let encoded = if openmetrics {
        prometheus_client::encoding::text::encode(&mut text, registry)
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut text, registry)
    };
    encoded.expect("writing to a String does not fail");
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_each_format_as_asked() {
        let mut registry = Registry::default();
        let consumed = Counter::<u64>::default();
        registry.register("shopstream_x", "Records fetched", consumed.clone());
        consumed.inc_by(3);
        let mut headers = HeaderMap::new();
        let classic = exposition(&registry, &headers);
        assert_eq!(
            classic.headers()[header::CONTENT_TYPE],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static(
                "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
            ),
        );
        let open = exposition(&registry, &headers);
        assert!(open.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with(OPENMETRICS));
    }
}
