//! Our Avro is Avro: an independent implementation (Python's fastavro),
//! given only schemas/, parses every schema and decodes what we encode.

use std::collections::BTreeMap;
use std::process::Command;

use backbone::codec::{encode, Encoding};
use backbone::events::*;
use shopstream_tests::repo_root;
use uuid::Uuid;

fn write<E: Event>(dir: &std::path::Path, name: &str, event: &E) {
    std::fs::write(
        dir.join(format!("{name}.avro")),
        encode(event, Encoding::Avro),
    )
    .expect("writes the sample");
    std::fs::write(
        dir.join(format!("{name}.json")),
        encode(event, Encoding::Json),
    )
    .expect("writes the sample");
}

#[test]
fn fastavro_parses_every_schema_and_decodes_our_events() {
    let dir = tempfile::tempdir().unwrap();
    let at = 1_763_000_000_123;
    write(
        dir.path(),
        "user",
        &UserEvent {
            event_id: Uuid::new_v4(),
            occurred_at: at,
            kind: UserEventKind::PageViewed,
            user_id: "u-1".into(),
            session_id: "s-1".into(),
            country: "DE".into(),
            platform: Platform::Android,
            page: Some("/p/sku-9".into()),
        },
    );
    write(
        dir.path(),
        "order",
        &OrderEvent {
            event_id: Uuid::new_v4(),
            occurred_at: at,
            status: OrderStatus::Created,
            order_id: "o-1".into(),
            user_id: "u-1".into(),
            session_id: None,
            items: vec![
                LineItem {
                    sku: "sku-9".into(),
                    category: "shoes".into(),
                    quantity: 2,
                    unit_price_minor: 4_999,
                },
                LineItem {
                    sku: "sku-3".into(),
                    category: "socks".into(),
                    quantity: 1,
                    unit_price_minor: 599,
                },
            ],
            currency: "EUR".into(),
            total_minor: 10_597,
        },
    );
    write(
        dir.path(),
        "chat",
        &ChatMessage {
            event_id: Uuid::new_v4(),
            occurred_at: at,
            room_id: "room-1".into(),
            user_id: "u-2".into(),
            text: "Größe 42? \u{1F45F} \"quoted\"".into(),
            flagged: true,
        },
    );
    write(
        dir.path(),
        "search",
        &SearchQuery {
            event_id: Uuid::new_v4(),
            occurred_at: at,
            user_id: "u-1".into(),
            session_id: "s-1".into(),
            query: "running shoes".into(),
            filters: BTreeMap::from([
                ("category".into(), "shoes".into()),
                ("max_price".into(), "10000".into()),
            ]),
            results_count: 0,
            clicked_sku: None,
            latency_ms: 17,
        },
    );
    let output = Command::new("python3")
        .arg(repo_root().join("tests/avro_interop.py"))
        .arg(repo_root().join("schemas"))
        .arg(dir.path())
        .output()
        .expect("python3 runs (scripts/test installs it with fastavro)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "fastavro disagrees (pip install fastavro if it is missing):\n{stderr}"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("5 schemas parsed, 4 samples decoded"),
        "{stdout}"
    );
}
