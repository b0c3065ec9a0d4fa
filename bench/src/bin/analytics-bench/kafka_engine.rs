//! shopstream-analytics against the ClickHouse Kafka engine, on the same
//! JSON order events: the same per-minute aggregates, compared row by row,
//! and the CPU each side spends on them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use backbone::catalog::Catalog;
use backbone::codec::Encoding;
use backbone::events::AnyEvent;
use backbone::kafka::{EmbeddedTopic, KafkaConnection};
use bench::{procfs, scrape};
use bench::{Goal, Recorder};
use producers::generator::{Generator, GeneratorConfig};
use producers::publisher::{PublishOptions, Publisher};

use crate::{Args, Job};

const TOPIC: &str = "bench-orders-json";
const PARTITIONS: i32 = 24;

/// The per-minute order aggregates, as both sides are read.
type Row = (u32, String, String, u64, u64, i64, u64);

/// The ClickHouse Kafka engine's version of `orders_per_minute` for a
/// ClickHouse 18.16 server: the message as one TSV string (JSONEachRow cannot
/// read an array of objects there), fields by `visitParam*` and `extractAll`,
/// one row per category of an order by ARRAY JOIN, straight from the Kafka
/// table (18.16 refuses a subquery there: "There is no query").
fn engine_ddl(brokers: &str, group: &str) -> Vec<String> {
    let categories = r#"extractAll(raw, '"category":"([^"]*)"')"#;
    let quantities = r#"extractAll(raw, '"quantity":([0-9]+)')"#;
    let prices = r#"extractAll(raw, '"unit_price_minor":([0-9]+)')"#;
    vec![
        format!("CREATE TABLE queue (raw String) ENGINE = Kafka SETTINGS kafka_broker_list = '{brokers}', kafka_topic_list = '{TOPIC}', kafka_group_name = '{group}', kafka_format = 'TSV', kafka_row_delimiter = '\\n'"),
        "CREATE TABLE consumed (n UInt64) ENGINE = SummingMergeTree ORDER BY tuple()".into(),
        "CREATE TABLE orders_state (window DateTime, category String, currency String, orders AggregateFunction(count), items AggregateFunction(sum, UInt64), revenue_minor AggregateFunction(sum, Int64), buyers AggregateFunction(uniqExact, String)) ENGINE = AggregatingMergeTree ORDER BY (window, category, currency)".into(),
        format!("CREATE MATERIALIZED VIEW orders_mv TO orders_state AS SELECT toStartOfMinute(toDateTime(intDiv(visitParamExtractUInt(raw, 'occurred_at'), 1000))) AS window, category, visitParamExtractString(raw, 'currency') AS currency, countState() AS orders, sumState(arraySum(arrayMap((q, c) -> if(c = category, toUInt64(q), 0), {quantities}, {categories}))) AS items, sumState(arraySum(arrayMap((q, p, c) -> if(c = category, toInt64(q) * toInt64(p), 0), {quantities}, {prices}, {categories}))) AS revenue_minor, uniqExactState(visitParamExtractString(raw, 'user_id')) AS buyers FROM queue ARRAY JOIN arrayDistinct({categories}) AS category WHERE visitParamExtractString(raw, 'status') = 'created' GROUP BY window, category, currency"),
        "CREATE MATERIALIZED VIEW consumed_mv TO consumed AS SELECT count() AS n FROM queue".into(),
    ]
}

const ENGINE_RESULT: &str = "SELECT toUInt32(window), category, currency, countMerge(orders), sumMerge(items), sumMerge(revenue_minor), uniqExactMerge(buyers) FROM orders_state GROUP BY window, category, currency";
const OUR_RESULT: &str = "SELECT toUInt32(window_start), category, currency, toUInt64(orders), toUInt64(items), toInt64(revenue_minor), toUInt64(unique_buyers) FROM orders_per_minute";

/// A side's result in one order (18.16 has no positional ORDER BY).
async fn result(client: &clickhouse::Client, query: &str) -> clickhouse::error::Result<Vec<Row>> {
    let mut rows: Vec<Row> = client.query(query).fetch_all().await?;
    rows.sort();
    Ok(rows)
}

/// The clickhouse-server process: the one given, or the only one running.
fn server_pid(given: Option<u32>) -> anyhow::Result<u32> {
    if let Some(pid) = given {
        return Ok(pid);
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim().starts_with("clickhouse-serv") {
            found.push(pid);
        }
    }
    match found.as_slice() {
        [pid] => Ok(*pid),
        [] => bail!("no clickhouse-server process here to measure; pass --clickhouse-pid, or --engine-events 0 to skip the comparison"),
        _ => bail!("several clickhouse-server processes ({found:?}); pass --clickhouse-pid"),
    }
}

/// The job's catalog lives as long as the comparison.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn cpu(pid: u32) -> anyhow::Result<f64> {
    procfs::cpu_seconds(pid).with_context(|| format!("CPU time of process {pid}"))
}

async fn wait_until<F, Fut>(what: &str, limit: Duration, mut done: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !done().await {
        ensure!(started.elapsed() < limit, "{what} within {limit:?}");
        // Each poll is a query the server's CPU figure includes, for both sides.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// What failed, and whether ClickHouse was still running then: a request
/// cut off ("SendRequest") is a server that went away or closed the
/// connection.
fn alive(server: u32, what: &str) -> String {
    let state = if std::path::Path::new(&format!("/proc/{server}")).exists() {
        "still running"
    } else {
        "no longer running"
    };
    format!("{what} (ClickHouse, pid {server}, {state})")
}

pub async fn compare(args: &Args, connection: &KafkaConnection) -> anyhow::Result<()> {
    let server = server_pid(args.clickhouse_pid)?;
    // Beside the catalog, as topics.yaml's schema folders are.
    let schemas = std::fs::canonicalize(&args.catalog)
        .with_context(|| format!("{}", args.catalog.display()))?
        .with_file_name("schemas");
    let catalog_path =
        std::env::temp_dir().join(format!("analytics-bench-{}.yaml", std::process::id()));
    std::fs::write(
        &catalog_path,
        format!(
            "managed_prefixes: [{TOPIC}]\ndefaults:\n  partitions: {PARTITIONS}\n  replication_factor: 1\ntopics:\n  - name: {TOPIC}\n    schema: {}/order_event\n    key: order_id\n",
            schemas.display()
        ),
    )?;
    let _remove = RemoveOnDrop(catalog_path.clone());
    let catalog = Catalog::load(&catalog_path, None).map_err(|p| anyhow::anyhow!("{p}"))?;
    connection
        .embedded()
        .context("the comparison runs on the embedded broker")?
        .create_topic(EmbeddedTopic {
            name: TOPIC.into(),
            partitions: PARTITIONS,
        })?;
    let publisher = Publisher::new(
        connection,
        &catalog,
        &PublishOptions {
            encoding: Encoding::Json,
            ..PublishOptions::default()
        },
    )?;
    let mut pending = Vec::new();
    let mut sent = 0;
    for g in Generator::new(GeneratorConfig {
        mix: "order=1".parse().map_err(anyhow::Error::msg)?,
        spacing_ms: 10.0,
        ..GeneratorConfig::default()
    })
    .filter(|g| matches!(g.event, AnyEvent::Order(_)))
    .take(args.engine_events)
    {
        pending.push(publisher.enqueue_any(&g.event, None, None).await?);
        sent += 1;
    }
    let mut ends = HashMap::new();
    for p in pending {
        let delivered = p.delivered().await?;
        let end = ends.entry(delivered.partition).or_insert(delivered.offset);
        *end = (*end).max(delivered.offset);
    }
    println!("{sent} order events in JSON in {TOPIC} ({PARTITIONS} partitions); ClickHouse server pid {server}");

    // Ours: the job with a catalog of that topic alone.
    let database = format!("analytics_bench_json_{}", std::process::id());
    let job = Job::start(
        connection.bootstrap_servers(),
        &catalog_path,
        &args.clickhouse,
        &database,
    )?;
    let (ours, port) = (job.client.clone(), job.port);
    let job_pid = job.child.id();
    wait_until(
        "the job counted no event",
        Duration::from_secs(120),
        || async {
            scrape::metric(port, "shopstream_analytics_events_total")
                .await
                .is_some_and(|n| n > 0.0)
        },
    )
    .await?;
    let (job0, server0, t0) = (cpu(job_pid)?, cpu(server)?, Instant::now());
    wait_until(
        "the job did not store every offset",
        Duration::from_secs(600),
        || async {
            let stored = crate::stored(&ours).await;
            ends.iter().all(|(p, end)| {
                stored
                    .get(&(TOPIC.to_owned(), *p))
                    .is_some_and(|s| s >= end)
            })
        },
    )
    .await?;
    let (job_cpu, our_server_cpu, our_wall) = (
        cpu(job_pid)? - job0,
        cpu(server)? - server0,
        t0.elapsed().as_secs_f64(),
    );
    drop(job);
    let our_rows = result(&ours, OUR_RESULT)
        .await
        .with_context(|| alive(server, "reading the job's result"))?;

    // Theirs: the Kafka engine and its materialized views, in a database of its own.
    let engine_db = format!("analytics_bench_engine_{}", std::process::id());
    let root = consumers::projection::client(
        &backbone::config::ClickHouseSettings {
            url: args.clickhouse.clone(),
            ..Default::default()
        },
        false,
    );
    root.query(&format!("CREATE DATABASE `{engine_db}`"))
        .execute()
        .await
        .with_context(|| alive(server, "creating the Kafka engine's database"))?;
    let engine = root.clone().with_database(&engine_db);
    let (server0, t0) = (cpu(server)?, Instant::now());
    for statement in engine_ddl(
        connection.bootstrap_servers(),
        &format!("engine-{}", std::process::id()),
    ) {
        engine
            .query(&statement)
            .execute()
            .await
            .with_context(|| alive(server, &statement))?;
    }
    let consumed = || async {
        engine
            .query("SELECT sum(n) FROM consumed")
            .fetch_one::<u64>()
            .await
            .unwrap_or(0)
    };
    let first = wait_until("the Kafka engine read nothing (is auto_offset_reset smallest in the server's <kafka> config?)", Duration::from_secs(120), || async {
        consumed().await > 0
    })
    .await;
    // Every event read, then the aggregates complete: ClickHouse may push a
    // block to the counting view before the aggregating one.
    let done = match first {
        Ok(()) => {
            wait_until(
                "the Kafka engine did not read every event",
                Duration::from_secs(600),
                || async { consumed().await >= sent as u64 },
            )
            .await
        }
        Err(e) => Err(e),
    };
    let done = match done {
        Ok(()) => {
            wait_until(
                "the Kafka engine's aggregates did not reach ours",
                Duration::from_secs(60),
                || async {
                    result(&engine, ENGINE_RESULT)
                        .await
                        .is_ok_and(|rows| rows == our_rows)
                },
            )
            .await
        }
        Err(e) => Err(e),
    };
    let (engine_cpu, engine_wall) = (cpu(server)? - server0, t0.elapsed().as_secs_f64());
    let engine_rows = result(&engine, ENGINE_RESULT)
        .await
        .with_context(|| alive(server, "reading the Kafka engine's result"))?;
    // The Kafka table keeps consuming until dropped. Its views go first, so
    // its streaming has stopped when it is dropped: ClickHouse 18.16
    // aborted (SIGABRT) once dropping the database with it still streaming.
    for table in ["orders_mv", "consumed_mv", "queue"] {
        root.query(&format!("DROP TABLE IF EXISTS `{engine_db}`.`{table}`"))
            .execute()
            .await
            .with_context(|| alive(server, &format!("dropping {engine_db}.{table}")))?;
    }
    for db in [&engine_db, &database] {
        root.query(&format!("DROP DATABASE IF EXISTS `{db}`"))
            .execute()
            .await
            .with_context(|| alive(server, &format!("dropping {db}")))?;
    }
    if our_rows != engine_rows {
        let differ: Vec<String> = our_rows
            .iter()
            .zip(&engine_rows)
            .filter(|(a, b)| a != b)
            .take(3)
            .map(|(a, b)| format!("ours {a:?} vs engine {b:?}"))
            .collect();
        bail!(
            "the two sides disagree: {} rows vs {}; first differences: {differ:?}",
            our_rows.len(),
            engine_rows.len()
        );
    }
    done?;

    let ours_rate = sent as f64 / (job_cpu + our_server_cpu).max(1e-6);
    let engine_rate = sent as f64 / engine_cpu.max(1e-6);
    println!(
        "same {} result rows. shopstream-analytics: job {job_cpu:.2} + ClickHouse {our_server_cpu:.2} CPU s = {ours_rate:.0} events per CPU second, {:.0}/s wall; Kafka engine: ClickHouse {engine_cpu:.2} CPU s = {engine_rate:.0} events per CPU second, {:.0}/s wall (start-up included); ratio {:.2}",
        our_rows.len(),
        sent as f64 / our_wall,
        sent as f64 / engine_wall,
        ours_rate / engine_rate
    );
    let mut figures = Recorder::from_env("analytics vs the ClickHouse Kafka engine (JSON orders)")?;
    figures.record(
        "shopstream-analytics, per CPU second of the job and ClickHouse",
        "events/s",
        ours_rate,
        Some(("ClickHouse Kafka engine + materialized views", engine_rate)),
        Some(Goal::RatioAtLeast(1.0)),
    )?;
    figures.record(
        "shopstream-analytics job alone, per CPU second",
        "events/s",
        sent as f64 / job_cpu.max(1e-6),
        None,
        None,
    )?;
    figures.record(
        "ClickHouse Kafka engine + materialized views, per CPU second",
        "events/s",
        engine_rate,
        None,
        None,
    )?;
    figures.record(
        "shopstream-analytics, per wall second",
        "events/s",
        sent as f64 / our_wall,
        None,
        None,
    )?;
    figures.record(
        "ClickHouse Kafka engine, per wall second (from table creation)",
        "events/s",
        sent as f64 / engine_wall,
        None,
        None,
    )?;
    Ok(())
}
