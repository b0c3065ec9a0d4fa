//! Scenario 10 of the reliability suite: the decoders and the YAML loaders
//! under arbitrary and mutated input. No panic, and no allocation past a
//! bound: this test binary's allocator refuses to hold more than
//! [`LIMIT`] at once, and a refused allocation aborts the run.
//! `PROPTEST_CASES` raises the case count (the soak mode sets it).

use std::alloc::System;
use std::path::Path;

use backbone::catalog::Catalog;
use backbone::codec::{DecodeHint, Decoder, Encoding};
use backbone::config::{Config, ConfigArgs};
use backbone::events::EventType;
use backbone::schema::SchemaRegistry;
use cap::Cap;
use proptest::prelude::*;

/// Everything this process holds at once, the test harness included: far
/// above what decoding a 64 KiB input needs, far below a corrupt length
/// prefix taken at its word.
const LIMIT: usize = 256 * 1024 * 1024;

#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, LIMIT);

const EVENTS: [EventType; 4] = [
    EventType::User,
    EventType::Order,
    EventType::Chat,
    EventType::Search,
];

fn content_type() -> impl Strategy<Value = Option<&'static str>> {
    prop_oneof![
        Just(None),
        Just(Some(Encoding::Avro.content_type())),
        Just(Some(Encoding::Json.content_type())),
        Just(Some("text/plain")),
    ]
}

fn event_type() -> impl Strategy<Value = Option<EventType>> {
    prop_oneof![Just(None), (0..4usize).prop_map(|i| Some(EVENTS[i]))]
}

/// JSON values of any shape, nested a little.
fn json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("event_id".to_owned()),
                    Just("occurred_at".to_owned()),
                    Just("items".to_owned()),
                    Just("status".to_owned()),
                    "[a-z_]{1,10}"
                ],
                inner,
                0..8
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn shipped_catalog() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../topics.yaml"))
        .expect("topics.yaml")
}

/// A line-level edit of a YAML document: dropped, doubled, swapped,
/// re-indented, or a character replaced.
#[derive(Debug, Clone)]
enum Edit {
    Drop(prop::sample::Index),
    Double(prop::sample::Index),
    Swap(prop::sample::Index, prop::sample::Index),
    Indent(prop::sample::Index, usize),
    Replace(prop::sample::Index, prop::sample::Index, char),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Edit::Drop),
        any::<prop::sample::Index>().prop_map(Edit::Double),
        any::<(prop::sample::Index, prop::sample::Index)>().prop_map(|(a, b)| Edit::Swap(a, b)),
        (any::<prop::sample::Index>(), 0..6usize).prop_map(|(a, n)| Edit::Indent(a, n)),
        (
            any::<prop::sample::Index>(),
            any::<prop::sample::Index>(),
            prop_oneof![
                Just(':'),
                Just('-'),
                Just('['),
                Just('&'),
                Just('*'),
                Just('9'),
                Just('"'),
                any::<char>()
            ]
        )
            .prop_map(|(a, b, c)| Edit::Replace(a, b, c)),
    ]
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    for e in edits {
        if lines.is_empty() {
            break;
        }
        match e {
            Edit::Drop(i) => {
                lines.remove(i.index(lines.len()));
            }
            Edit::Double(i) => {
                let at = i.index(lines.len());
                lines.insert(at, lines[at].clone());
            }
            Edit::Swap(a, b) => {
                let (a, b) = (a.index(lines.len()), b.index(lines.len()));
                lines.swap(a, b);
            }
            Edit::Indent(i, n) => {
                let at = i.index(lines.len());
                lines[at] = format!("{}{}", " ".repeat(*n), lines[at].trim_start());
            }
            Edit::Replace(i, j, c) => {
                let at = i.index(lines.len());
                let mut chars: Vec<char> = lines[at].chars().collect();
                if !chars.is_empty() {
                    let k = j.index(chars.len());
                    chars[k] = *c;
                    lines[at] = chars.into_iter().collect();
                }
            }
        }
    }
    lines.join("\n")
}

fn catalog_from(text: &str) -> Result<Catalog, backbone::yaml::Problems> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    Catalog::parse(&root.join("topics.yaml"), text, &root, None)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_under_every_hint_decode_or_fail_cleanly(
        bytes in proptest::collection::vec(any::<u8>(), 0..65_536),
        content_type in content_type(),
        event_type in event_type(),
    ) {
        let _ = Decoder::default().decode(&bytes, DecodeHint { content_type, event_type });
    }

    #[test]
    fn arbitrary_bodies_behind_every_known_fingerprint_fail_cleanly(
        version in any::<prop::sample::Index>(),
        body in proptest::collection::vec(any::<u8>(), 0..4_096),
        lengths in proptest::collection::vec((any::<prop::sample::Index>(), any::<u64>()), 0..4),
    ) {
        let versions = SchemaRegistry::global().versions();
        let mut bytes = versions[version.index(versions.len())].single_object_header().to_vec();
        bytes.extend_from_slice(&body);
        // Plant huge zig-zag lengths (arrays, strings) at random places.
        for (at, n) in lengths {
            let at = 10 + at.index(bytes.len() - 9);
            let mut v = n | (1 << 62);
            let mut varint = Vec::new();
            while v >= 0x80 {
                varint.push((v as u8) | 0x80);
                v >>= 7;
            }
            varint.push(v as u8);
            bytes.splice(at..at, varint);
        }
        let before = ALLOCATOR.allocated();
        let _ = Decoder::default().decode(&bytes, DecodeHint::default());
        prop_assert!(ALLOCATOR.allocated() <= before + 64 * 1024 * 1024);
    }

    #[test]
    fn arbitrary_json_for_every_event_type_fails_cleanly(value in json(), event in 0..4usize) {
        let text = serde_json::to_vec(&value).expect("serialises");
        let _ = Decoder::default().decode(
            &text,
            DecodeHint { content_type: Some(Encoding::Json.content_type()), event_type: Some(EVENTS[event]) },
        );
    }

    #[test]
    fn arbitrary_text_as_a_catalog_is_refused_with_its_file_named(text in ".{0,400}") {
        if let Err(problems) = catalog_from(&text) {
            prop_assert!(problems.to_string().contains("topics.yaml"), "{problems}");
        }
    }

    #[test]
    fn a_mutated_catalog_loads_or_names_file_and_line(edits in proptest::collection::vec(edit(), 1..6)) {
        let text = apply(&shipped_catalog(), &edits);
        if let Err(problems) = catalog_from(&text) {
            let shown = problems.to_string();
            prop_assert!(shown.contains("topics.yaml"), "{shown}");
        }
    }

    #[test]
    fn a_mutated_settings_file_loads_or_names_file_and_line(edits in proptest::collection::vec(edit(), 1..6)) {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("shopstream.yaml");
        let base = "kafka:\n  bootstrap_servers: 127.0.0.1:9092\n  client:\n    linger.ms: \"5\"\nclickhouse:\n  url: http://127.0.0.1:8123\n  database: shop\nworker:\n  handlers: [events-store]\n  batch_max_records: 500\nanalytics:\n  window_ms: 60000\n";
        std::fs::write(&path, apply(base, &edits)).expect("write");
        let args = ConfigArgs { config: Some(path), ..Default::default() };
        if let Err(problems) = Config::load_from(&args, Vec::new()) {
            prop_assert!(problems.to_string().contains("shopstream.yaml"), "{problems}");
        }
    }
}

#[test]
fn documents_nested_far_past_any_event_fail_without_overflowing_the_stack() {
    for depth in [1_000, 100_000] {
        let text = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let result = Decoder::default().decode(
            text.as_bytes(),
            DecodeHint {
                content_type: Some(Encoding::Json.content_type()),
                event_type: Some(EventType::Order),
            },
        );
        assert!(result.is_err());
    }
    for text in [format!("{}1", "- ".repeat(100_000)), "[".repeat(100_000)] {
        let problems = catalog_from(&text).expect_err("refused").to_string();
        assert!(
            problems.contains("topics.yaml:1: nested more than 64 levels deep")
                || problems.contains("topics.yaml:1: not valid YAML: recursion limit exceeded"),
            "{problems}"
        );
    }
}
