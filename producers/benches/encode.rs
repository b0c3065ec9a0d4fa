//! Encoding cost per event, on generated (realistic) events.
//! Goal: Avro at most 1 µs per event to encode. Decoding is measured too. Run: cargo bench -p producers --bench encode

use backbone::codec::{encode_into, Encoding};
use backbone::events::AnyEvent;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use producers::generator::{Generator, GeneratorConfig};

fn encode_events(c: &mut Criterion) {
    let events: Vec<AnyEvent> = Generator::new(GeneratorConfig::default())
        .take(10_000)
        .map(|g| g.event)
        .collect();
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(events.len() as u64));
    for encoding in [Encoding::Avro, Encoding::Json] {
        group.bench_function(format!("{encoding:?}/10k mixed events"), |b| {
            let mut buffer = Vec::with_capacity(1024);
            b.iter(|| {
                for event in &events {
                    buffer.clear();
                    match event {
                        AnyEvent::User(e) => encode_into(e, encoding, &mut buffer),
                        AnyEvent::Order(e) => encode_into(e, encoding, &mut buffer),
                        AnyEvent::Chat(e) => encode_into(e, encoding, &mut buffer),
                        AnyEvent::Search(e) => encode_into(e, encoding, &mut buffer),
                    }
                }
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(events.len() as u64));
    let decoder = backbone::codec::Decoder::default();
    for encoding in [Encoding::Avro, Encoding::Json] {
        let encoded: Vec<(Vec<u8>, backbone::events::EventType)> = events
            .iter()
            .map(|event| {
                let mut buffer = Vec::new();
                match event {
                    AnyEvent::User(e) => encode_into(e, encoding, &mut buffer),
                    AnyEvent::Order(e) => encode_into(e, encoding, &mut buffer),
                    AnyEvent::Chat(e) => encode_into(e, encoding, &mut buffer),
                    AnyEvent::Search(e) => encode_into(e, encoding, &mut buffer),
                }
                (buffer, event.event_type())
            })
            .collect();
        group.bench_function(format!("{encoding:?}/10k mixed events"), |b| {
            b.iter(|| {
                for (bytes, event_type) in &encoded {
                    let hint = backbone::codec::DecodeHint {
                        content_type: Some(encoding.content_type()),
                        event_type: Some(*event_type),
                    };
                    decoder.decode(bytes, hint).expect("decodes");
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, encode_events);
criterion_main!(benches);
