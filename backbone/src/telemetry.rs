//! Logging and traces for every binary: human-readable or JSON log lines,
//! filtered by `RUST_LOG` or the configured filter (librdkafka's own log
//! lines arrive through the same subscriber); and, when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set, OTLP spans over `http/protobuf` (the default) or `grpc`
//! (`OTEL_EXPORTER_OTLP_PROTOCOL`), with the standard `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and
//! `OTEL_TRACES_SAMPLER_ARG`. Unset, no span is even created: the code
//! that makes them asks [`traces_on`] first, and a library's spans are
//! disabled (the log lines then name none).

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider,
};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use serde::{Deserialize, Serialize};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{filter_fn, EnvFilter, FilterExt};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::headers::{parse_traceparent, Traceparent};

pub use opentelemetry::trace::SpanContext as SourceSpan;

/// The process's span pipeline, when traces are exported.
static TRACES: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Installs the global subscriber, exporting spans when the OTLP endpoint
/// is set. A second call (as in tests) is a no-op.
pub fn init(settings: &TelemetrySettings) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.log_filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let exported = exported_spans(|name| std::env::var(name).ok()).unwrap_or_else(|error| {
        eprintln!("warning: traces are not exported: {error}");
        None
    });
    // With traces off the log lines keep no span either, so none is made:
    // a library's spans were otherwise kept for them, and the clickhouse
    // crate enters one for each row it reads (the registry's bookkeeping
    // was 12% of the query service's CPU on a 6,000-row answer). With
    // traces on, a line names the spans it happened in.
    let traced = exported.is_some();
    let spans_logged = filter_fn(move |meta| traced || !meta.is_span());
    // Colours only on a terminal: a log file or a collector gets plain text.
    let logs = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let logs = match settings.log_format {
        LogFormat::Pretty => logs.boxed(),
        LogFormat::Json => logs.json().flatten_event(true).boxed(),
    }
    .with_filter(filter.and(spans_logged));
    let logged = tracing_subscriber::registry().with(logs);
    // No span layer at all when traces are off: an absent (`None`) layer
    // would enable every span and event of every library.
    let _ = match exported {
        Some(provider) => {
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("shopstream"))
                // Spans, and the warnings and errors inside them (a
                // retry, a dead letter) as their events.
                .with_filter(filter_fn(|meta| {
                    meta.is_span() || *meta.level() <= tracing::Level::WARN
                }));
            let _ = TRACES.set(provider);
            logged.with(layer).try_init()
        }
        None => logged.try_init(),
    };
}

/// Whether spans are exported. Code that makes spans checks this first, so
/// a process without an OTLP endpoint pays nothing for them.
pub fn traces_on() -> bool {
    TRACES.get().is_some()
}

/// Sends the spans not yet exported and stops the exporter: call before
/// the process exits, or the last second of spans is lost.
pub fn shutdown() {
    if let Some(provider) = TRACES.get() {
        if let Err(error) = provider.shutdown() {
            eprintln!("warning: the last spans may not have been exported: {error}");
        }
    }
}

/// The `traceparent` naming `span`, for the records written under it;
/// `None` when traces are off.
pub fn traceparent(span: &tracing::Span) -> Option<Traceparent> {
    span_context(span).map(|span| {
        Traceparent::new(
            u128::from_be_bytes(span.trace_id().to_bytes()),
            u64::from_be_bytes(span.span_id().to_bytes()),
            span.trace_flags().to_u8(),
        )
    })
}

/// The span a record's `traceparent` names (the span that wrote it), to
/// link or parent a span to.
pub fn remote_span(traceparent: &str) -> Option<SpanContext> {
    let (trace, span, flags) = parse_traceparent(traceparent)?;
    Some(SpanContext::new(
        TraceId::from_bytes(trace.to_be_bytes()),
        SpanId::from_bytes(span.to_be_bytes()),
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    ))
}

/// The trace `span` belongs to, in hex; `None` when traces are off.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    span_context(span).map(|span| span.trace_id().to_string())
}

/// The current span, to continue from elsewhere (another task); `None`
/// when traces are off or no span is current.
pub fn current_span() -> Option<SpanContext> {
    span_context(&tracing::Span::current())
}

/// `span`'s OpenTelemetry identity, when traces are exported and it has one.
fn span_context(span: &tracing::Span) -> Option<SpanContext> {
    if !traces_on() {
        return None;
    }
    let context = span.context();
    let span = context.span().span_context().clone();
    span.is_valid().then_some(span)
}

/// Makes `span` a child of the first of `sources` and links it to every
/// one: work done for many records (a batch, an insert) continues each of
/// their traces, per W3C trace context.
pub fn follow(span: &tracing::Span, sources: impl IntoIterator<Item = SpanContext>) {
    let mut linked = std::collections::HashSet::new();
    for source in sources {
        if linked.is_empty() {
            let parent = opentelemetry::Context::new().with_remote_span_context(source.clone());
            let _ = span.set_parent(parent);
        }
        if linked.insert(source.span_id()) {
            span.add_link(source);
        }
    }
}

/// A span named `name` when traces are exported, else a disabled one that
/// costs nothing: the way every span of the binaries is made.
#[macro_export]
macro_rules! traced_span {
    ($name:expr $(, $($fields:tt)*)?) => {
        if $crate::telemetry::traces_on() {
            ::tracing::info_span!($name $(, $($fields)*)?)
        } else {
            ::tracing::Span::none()
        }
    };
}

/// Adds an event (a retry, say) to the current span when traces are
/// exported; the attributes are formatted only then.
pub fn span_event(name: &'static str, attributes: &[(&'static str, &dyn std::fmt::Display)]) {
    if traces_on() {
        tracing::Span::current().add_event(
            name,
            attributes
                .iter()
                .map(|(key, value)| opentelemetry::KeyValue::new(*key, value.to_string()))
                .collect(),
        );
    }
}

/// The span pipeline the standard variables (read through `var`) ask for,
/// if any.
fn exported_spans(
    var: impl Fn(&str) -> Option<String>,
) -> Result<Option<SdkTracerProvider>, String> {
    let var = |name: &str| var(name).filter(|value| !value.trim().is_empty());
    if var("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
        && var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
    {
        return Ok(None);
    }
    let (protocol_var, protocol) = [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ]
    .into_iter()
    .find_map(|name| Some((name, var(name)?)))
    .unwrap_or(("", "http/protobuf".into()));
    // The exporters' clients need a Tokio reactor, and the SDK exports
    // from a thread of its own: they get a small runtime of their own.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the exporter's runtime: {e}"))?;
    let exporter = {
        let _inside = runtime.enter();
        let builder = opentelemetry_otlp::SpanExporter::builder();
        match protocol.trim() {
            "http/protobuf" => builder.with_http().build(),
            "grpc" => builder.with_tonic().build(),
            other => {
                return Err(format!(
                    "{protocol_var} is {other:?}; valid values: http/protobuf, grpc"
                ))
            }
        }
        .map_err(|e| e.to_string())?
    };
    let service = var("OTEL_SERVICE_NAME").unwrap_or_else(|| {
        std::env::args()
            .next()
            .and_then(|path| {
                std::path::Path::new(&path)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| "shopstream".into())
    });
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(OnItsOwnRuntime { exporter, runtime })
            .with_resource(Resource::builder().with_service_name(service).build())
            .build(),
    ))
}

/// An exporter driven by its own runtime: the SDK's batch thread has none.
#[derive(Debug)]
struct OnItsOwnRuntime {
    exporter: opentelemetry_otlp::SpanExporter,
    runtime: tokio::runtime::Runtime,
}

impl SpanExporter for OnItsOwnRuntime {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        std::future::ready(self.runtime.block_on(self.exporter.export(batch)))
    }

    fn shutdown_with_timeout(&mut self, timeout: Duration) -> OTelSdkResult {
        self.exporter.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.exporter.set_resource(resource);
    }
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    pub log_format: LogFormat,
    /// A tracing filter such as `info` or `info,rdkafka=debug`; `RUST_LOG`
    /// wins when set.
    pub log_filter: String,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Pretty,
            log_filter: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object per line, for log shippers.
    Json,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_an_endpoint_no_span_is_made_and_records_keep_their_own_trace() {
        std::env::remove_var("OTEL_EXPORTER_OTLP_ENDPOINT");
        std::env::remove_var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
        init(&TelemetrySettings::default());
        assert!(!traces_on());
        let span = crate::traced_span!("publish", events = 3);
        assert!(span.is_disabled());
        // A library's span too (the clickhouse crate's, entered per row).
        assert!(tracing::info_span!("query", sql = "SELECT 1").is_disabled());
        assert!(
            tracing::enabled!(tracing::Level::INFO),
            "log lines are kept"
        );
        let _inside = span.enter();
        assert_eq!(traceparent(&span), None);
        assert!(current_span().is_none());
    }

    #[test]
    fn an_unknown_protocol_is_refused_naming_the_variable_and_the_valid_values() {
        let vars = |protocol_var: &'static str| {
            move |name: &str| match name {
                "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://127.0.0.1:4318".to_owned()),
                _ if name == protocol_var => Some("http/json".to_owned()),
                _ => None,
            }
        };
        for name in [
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        ] {
            let error = exported_spans(vars(name)).expect_err("http/json is not supported");
            assert_eq!(
                error,
                format!("{name} is \"http/json\"; valid values: http/protobuf, grpc")
            );
        }
        assert!(exported_spans(|_| None).expect("nothing asked").is_none());
    }

    #[test]
    fn a_traceparent_names_the_span_that_wrote_the_record() {
        let span = remote_span("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("well formed");
        assert_eq!(
            span.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(span.span_id().to_string(), "00f067aa0ba902b7");
        assert!(span.is_sampled() && span.is_remote());
        assert!(remote_span("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7").is_none());
    }
}
