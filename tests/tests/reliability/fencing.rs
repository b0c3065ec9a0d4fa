//! A replica the group has replaced writes nothing. An analytics replica
//! holding partials it could not store (ClickHouse unreachable for it alone)
//! is frozen whole (SIGSTOP) past its session, so the group hands its
//! partitions to the other replica, which resumes after the offsets stored
//! in ClickHouse; then it is thawed with ClickHouse back. Unfenced, it
//! stored its held partials on thawing and the new owner counted the same
//! events again (issue 28, part 4).

use std::time::{Duration, Instant};

use checker::Checks;
use shopstream_tests::proxy::ClickHouseProxy;
use shopstream_tests::{clickhouse, Broker};

use crate::{Run, Service, System};

on_both_brokers!(
    a_replaced_analytics_replica_writes_nothing: |broker| replaced_replica_writes_nothing(broker)
);

async fn replaced_replica_writes_nothing(broker: Broker) {
    let url = clickhouse().await.url();
    let proxy = ClickHouseProxy::start(url).await.expect("proxy");
    let system = System::new(broker, url, url, &[("telemetry", "log_filter: info")]).await;
    let run = Run::new(30, 6_000, 3_000.0, 0.01);
    let expected = run.expected();
    let replaced_url = format!("clickhouse.url={}", proxy.url());
    let mut replaced = system.analytics_with(&[&replaced_url]);
    // The other replica stores only when it stops: the replaced one, thawed,
    // would store its held partials first, and those events would count twice.
    let mut survivor = system.analytics_with(&["analytics.flush_interval_ms=600000"]);
    system.ready(&[&replaced, &survivor]).await;
    system.sharing(&[&replaced, &survivor]).await;
    let partitions = assigned(&replaced).await + assigned(&survivor).await;

    proxy.refuse(true);
    system.publish_all(&run);
    until(&system, "the replica retries its insert", || async {
        replaced
            .metric("shopstream_analytics_insert_retries_total")
            .await
            > 0
    })
    .await;
    replaced.freeze(true);
    until(&system, "the survivor holds every partition", || async {
        assigned(&survivor).await == partitions
    })
    .await;
    let rebalances = replaced
        .metric("shopstream_analytics_rebalances_total")
        .await;
    proxy.refuse(false);
    replaced.freeze(false);
    until(
        &system,
        "the thawed replica finds itself fenced",
        || async {
            replaced
                .metric("shopstream_analytics_fenced_flushes_total")
                .await
                > 0
        },
    )
    .await;
    // The replaced replica rejoins (its assignment gauge still shows what it
    // held when frozen until the group answers; with the survivor stopped in
    // the middle of that rebalance, it once stayed unassigned for over two
    // minutes on tansu 0.6.0), then the
    // survivor stores what it holds as it leaves, and the other takes every
    // partition back.
    until(&system, "the thawed replica rejoins the group", || async {
        replaced
            .metric("shopstream_analytics_rebalances_total")
            .await
            > rebalances
    })
    .await;
    system.sharing(&[&replaced, &survivor]).await;
    system.stop(&mut [&mut survivor]);

    let checks = Checks {
        events: false,
        order_status: false,
        analytics: true,
        dead_letter_groups: vec![system.analytics_group.clone()],
        exact_raw: false,
        dead_letters_at_least_once: false,
        topic_copies: system.topic_copies(),
    };
    let started = Instant::now();
    let report = system
        .converge(&expected, &checks, Duration::from_secs(120))
        .await;
    assert!(
        report.passed(),
        "{broker:?}: {report}\n{}{}",
        system.progress(&[&replaced]).await,
        system.logs()
    );
    system.stop(&mut [&mut replaced]);
    println!(
        "{broker:?}: a replaced replica fenced; exact {:.1} s after the survivor left: {report}",
        started.elapsed().as_secs_f64()
    );
}

async fn assigned(service: &Service) -> u64 {
    service.metric(service.assigned_metric()).await
}

/// Waits up to 90 s for `condition`.
async fn until<F, Fut>(system: &System, what: &str, condition: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !condition().await {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "{what}: not within 90 s\n{}",
            system.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
