//! OpenTelemetry traces end to end: the publisher, the worker, the
//! analytics job and the query service export OTLP spans to a receiver run
//! by this test (the OTLP protobuf messages decoded with the
//! `opentelemetry-proto` types, over HTTP and over gRPC), and the spans of
//! the same events form one trace: publish -> worker batch (a child of the
//! first record's publish span, linked to every record's) -> ClickHouse
//! insert.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use backbone::headers;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use rdkafka::message::{Headers, Message};
use shopstream_tests::{
    bin_dir, clickhouse, free_port, terminate, unique_name, Children, EventTopics,
};

/// A span as received, with the service that sent it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    span: Span,
}

impl Received {
    fn trace(&self) -> String {
        hex(&self.span.trace_id)
    }

    fn id(&self) -> String {
        hex(&self.span.span_id)
    }

    fn parent(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    fn attribute(&self, key: &str) -> Option<String> {
        self.span
            .attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.as_ref()?.value.as_ref())
            .map(|v| match v {
                Value::StringValue(s) => s.clone(),
                Value::IntValue(i) => i.to_string(),
                Value::BoolValue(b) => b.to_string(),
                Value::DoubleValue(d) => d.to_string(),
                other => format!("{other:?}"),
            })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every span any receiver got.
#[derive(Debug, Clone, Default)]
struct Collected(Arc<Mutex<Vec<Received>>>);

impl Collected {
    fn take(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.0.lock().unwrap();
        for resource in request.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push(Received {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
    }

    fn named(&self, service: &str, name: &str) -> Vec<Received> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.service == service && r.span.name == name)
            .cloned()
            .collect()
    }
}

/// OTLP over HTTP: `POST /v1/traces` with an `ExportTraceServiceRequest`.
async fn http_receiver(collected: Collected) -> u16 {
    let port = free_port().unwrap();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| async move {
            let request = ExportTraceServiceRequest::decode(body).expect("an OTLP request");
            collected.take(request);
            (
                [("content-type", "application/x-protobuf")],
                ExportTraceServiceResponse::default().encode_to_vec(),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

/// OTLP over gRPC: the collector's `TraceService`.
#[derive(Debug)]
struct GrpcReceiver(Collected);

#[tonic::async_trait]
impl TraceService for GrpcReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.take(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn grpc_receiver(collected: Collected) -> u16 {
    let port = free_port().unwrap();
    let address: SocketAddr = ([127, 0, 0, 1], port).into();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(GrpcReceiver(collected)))
            .serve(address),
    );
    port
}

/// The trace ids of the exemplars of `family` in `binary`'s OpenMetrics
/// exposition on `port`.
async fn exemplars(binary: &str, port: u16, family: &str) -> BTreeSet<String> {
    let scraped = bench::scrape::http_get_accepting(
        port,
        "/metrics",
        "application/openmetrics-text;version=1.0.0",
    )
    .await
    .unwrap_or_else(|| panic!("{binary} answers /metrics"));
    let (_, body) = scraped.split_once("\r\n\r\n").unwrap();
    shopstream_tests::parse_exposition(binary, "openmetrics", body)
        .iter()
        .filter(|f| f["name"] == family)
        .flat_map(|f| f["samples"].as_array().unwrap().clone())
        .filter_map(|s| Some(s[3]["trace_id"].as_str()?.to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spans_of_the_same_events_form_one_trace_from_publish_to_clickhouse() {
    let collected = Collected::default();
    let http = http_receiver(collected.clone()).await;
    let grpc = grpc_receiver(collected.clone()).await;
    let topics = EventTopics::new("");
    topics.create_topic("late-events", 1);
    let database = clickhouse().await.database().await.unwrap();
    let (events, poison_rate) = (1_200u64, 0.02);
    let catalog = format!("catalog.path={}", topics.catalog_path().display());
    let common = |binary: &str, endpoint: String, protocol: &str| {
        let mut command = Command::new(bin_dir().join(binary));
        command
            .args(["--brokers", topics.bootstrap_servers()])
            .args(["--set", &catalog])
            .args(["--set", &format!("clickhouse.url={}", database.url)])
            .args(["--set", &format!("clickhouse.database={}", database.name)])
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
            .env("OTEL_BSP_SCHEDULE_DELAY", "200")
            // Span events come from warnings whatever the log filter.
            .env("RUST_LOG", "error")
            .stdin(Stdio::null());
        command
    };
    let mut children = Children::default();
    let port = |key: &str| format!("{key}=127.0.0.1:{}", free_port().unwrap());
    let worker_port = free_port().unwrap();
    // The worker over gRPC, the others over HTTP.
    children.0.push(
        common(
            "shopstream-worker",
            format!("http://127.0.0.1:{grpc}"),
            "grpc",
        )
        .args(["--group", &unique_name("traced")])
        .args(["--handler", "events-store"])
        .args([
            "--set",
            &format!("worker.metrics_address=127.0.0.1:{worker_port}"),
        ])
        .args(["--set", "clickhouse.insert_period_ms=200"])
        .spawn()
        .unwrap(),
    );
    children.0.push(
        common(
            "shopstream-analytics",
            format!("http://127.0.0.1:{http}"),
            "http/protobuf",
        )
        .args([
            "--set",
            &format!("analytics.group_id={}", unique_name("traced")),
        ])
        .args(["--set", &port("analytics.metrics_address")])
        .args(["--set", "analytics.flush_interval_ms=200"])
        .spawn()
        .unwrap(),
    );
    let query_port = free_port().unwrap();
    children.0.push(
        common(
            "shopstream-query",
            format!("http://127.0.0.1:{grpc}"),
            "grpc",
        )
        .env("OTEL_SERVICE_NAME", "storefront-api")
        .args([
            "--set",
            &format!("query.listen_address=127.0.0.1:{query_port}"),
        ])
        .spawn()
        .unwrap(),
    );
    let published = common(
        "shopstream-publish",
        format!("http://127.0.0.1:{http}"),
        "http/protobuf",
    )
    .args([
        "--count",
        &events.to_string(),
        "--rate",
        "4000",
        "--seed",
        "9",
    ])
    .args(["--poison-rate", &poison_rate.to_string()])
    .stdout(Stdio::null())
    .status()
    .unwrap();
    assert!(published.success());

    // Every event published is in the events store (the malformed ones in
    // the DLQs), and a query is answered under a caller's trace.
    let client = shopstream_tests::clickhouse_client(&database.url).with_database(&database.name);
    let deadline = Instant::now() + Duration::from_secs(90);
    let poisoned = loop {
        let stored: u64 = futures::future::try_join_all(checker::EVENT_TABLES.map(|table| {
            client
                .query(&format!("SELECT count() FROM {table}"))
                .fetch_one::<u64>()
        }))
        .await
        .map(|counts| counts.iter().sum())
        .unwrap_or(0);
        let dead = collected
            .named("shopstream-worker", "handle batch")
            .iter()
            .flat_map(|s| &s.span.events)
            .filter(|e| e.name.contains("dead-lettered"))
            .count() as u64;
        // The analytics job too has flushed: its group join can take
        // longer than the worker takes to store every event.
        let flushes = collected
            .named("shopstream-analytics", "analytics flush")
            .len();
        if stored + dead == events && stored > 0 && flushes > 0 {
            break dead;
        }
        assert!(
            Instant::now() < deadline,
            "{stored} events stored and {dead} dead-lettered of {events}, {flushes} analytics flushes within 90 s"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(poisoned > 0, "the run has malformed records");
    let caller =
        headers::Traceparent::new(0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7, 1);
    let answer = bench::scrape::http_get_with(
        query_port,
        "/api/v1/funnel",
        &[("traceparent", caller.as_str())],
    )
    .await;
    assert!(answer.is_some(), "the query service answers");
    // The latency histograms name a trace beside their samples
    // (OpenMetrics exemplars, read by the Prometheus Python parser).
    let handler_traces = exemplars(
        "shopstream-worker",
        worker_port,
        "shopstream_handler_seconds",
    )
    .await;
    let query_traces = exemplars("shopstream-query", query_port, "shopstream_query_seconds").await;
    assert!(
        query_traces.contains("4bf92f3577b34da6a3ce929d0e0e4736"),
        "{query_traces:?}"
    );
    // SIGTERM: the binaries send their last spans on the way out.
    for child in &mut children.0 {
        terminate(child, Duration::from_secs(30), "a traced binary");
    }

    // Publish: one span per batch of events, every event counted once.
    let publishes = collected.named("shopstream-publish", "publish");
    let counted: u64 = publishes
        .iter()
        .filter_map(|p| p.attribute("events")?.parse::<u64>().ok())
        .sum();
    assert_eq!(counted, events, "{publishes:?}");
    let publish_ids: BTreeMap<String, String> =
        publishes.iter().map(|p| (p.id(), p.trace())).collect();

    // Each record names its publish span in its traceparent.
    let mut records = 0;
    for topic in topics.catalog.topics.iter().map(|t| t.name.clone()) {
        for record in consumers::dlq::read_all(&topics.connection, &topic).unwrap() {
            records += 1;
            let traceparent = record
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == headers::TRACEPARENT))
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .expect("a traceparent");
            let (trace, span, _) = headers::parse_traceparent(&traceparent).expect("well formed");
            assert_eq!(
                publish_ids.get(&format!("{span:016x}")),
                Some(&format!("{trace:032x}")),
                "{}[{}]@{}: {traceparent} names no publish span",
                record.topic(),
                record.partition(),
                record.offset()
            );
        }
    }
    assert_eq!(records, events);

    // The worker's batches continue those traces: each is a child of a
    // publish span and linked to the publish spans of all its records.
    let batches = collected.named("shopstream-worker", "handle batch");
    assert!(!batches.is_empty());
    let mut handled = 0;
    for batch in &batches {
        assert_eq!(
            publish_ids.get(&batch.parent()),
            Some(&batch.trace()),
            "{batch:?} is the child of a publish span"
        );
        assert!(!batch.span.links.is_empty());
        for link in &batch.span.links {
            assert_eq!(
                publish_ids.get(&hex(&link.span_id)),
                Some(&hex(&link.trace_id)),
                "{batch:?} links only publish spans"
            );
        }
        handled += batch
            .attribute("records")
            .and_then(|r| r.parse::<u64>().ok())
            .unwrap();
    }
    assert!(handled >= events, "{handled} records in batches");
    let batch_traces: BTreeSet<String> = batches.iter().map(Received::trace).collect();
    assert!(
        !handler_traces.is_empty() && handler_traces.is_subset(&batch_traces),
        "the handler latency's exemplars {handler_traces:?} name batches' traces"
    );
    let dead_letter = batches
        .iter()
        .flat_map(|b| &b.span.events)
        .find(|e| e.name.contains("dead-lettered"))
        .expect("a dead letter in a batch's span");
    assert!(
        dead_letter.attributes.iter().any(|a| a.key == "error"),
        "the dead letter carries its error: {dead_letter:?}"
    );

    // ClickHouse inserts: children of the batches whose rows they carry.
    let batch_ids: BTreeSet<(String, String)> =
        batches.iter().map(|b| (b.trace(), b.id())).collect();
    let inserts = collected.named("shopstream-worker", "clickhouse insert");
    assert!(!inserts.is_empty());
    for insert in &inserts {
        assert!(
            batch_ids.contains(&(insert.trace(), insert.parent())),
            "{insert:?} is the child of a batch"
        );
    }
    // One trace holds the publish, the batch and the insert of the same
    // events.
    let insert = &inserts[0];
    assert!(publishes.iter().any(|p| p.trace() == insert.trace()));

    // The analytics job's flushes, each with its ClickHouse insert.
    let flushes = collected.named("shopstream-analytics", "analytics flush");
    assert!(!flushes.is_empty(), "analytics flush spans");
    let flush_ids: BTreeSet<String> = flushes.iter().map(Received::id).collect();
    assert!(collected
        .named("shopstream-analytics", "clickhouse insert")
        .iter()
        .any(|i| flush_ids.contains(&i.parent())));

    // The query service (named by OTEL_SERVICE_NAME) continues the caller's trace.
    let requests = collected.named("storefront-api", "http request");
    let request = requests
        .iter()
        .find(|r| r.attribute("http.route").as_deref() == Some("/api/v1/funnel"))
        .unwrap_or_else(|| panic!("a span for the request: {requests:?}"));
    assert_eq!(request.trace(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(request.parent(), "00f067aa0ba902b7");
    assert_eq!(
        request.attribute("http.response.status_code").as_deref(),
        Some("200")
    );
}
