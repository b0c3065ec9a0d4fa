//! `shopstream-worker dlq list | show | replay`: what is in a dead-letter
//! queue, and sending records back to their original topic once the cause is
//! fixed. A replayed record carries `replay-count`; records replayed
//! `worker.max_replays` times already are refused, so a record that keeps
//! failing cannot loop for ever.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context};
use backbone::catalog::Catalog;
use backbone::codec::{DecodeHint, Decoder};
use backbone::events::{AnyEvent, EventType};
use backbone::headers;
use backbone::kafka::KafkaConnection;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::forward::now_ms;
use crate::readback::header;

/// Which records of the DLQ a command looks at.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Filter {
    /// Only records whose error-class header is this.
    #[arg(long)]
    pub error_class: Option<String>,
    /// Only records dead-lettered at or after this time: epoch milliseconds,
    /// or an age such as 30m, 2h or 1d.
    #[arg(long, value_parser = parse_since)]
    pub since: Option<i64>,
}

/// `--since`: epoch milliseconds, or an age (`90s`, `30m`, `2h`, `1d`).
pub fn parse_since(text: &str) -> Result<i64, String> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => 0,
    };
    match number.parse::<i64>() {
        Ok(n) if seconds > 0 => Ok(now_ms() - n * seconds * 1_000),
        _ => Err(format!(
            "{text:?} is neither epoch milliseconds nor an age such as 90s, 30m, 2h or 1d"
        )),
    }
}

impl Filter {
    fn matches(&self, message: &OwnedMessage) -> bool {
        let class_ok = self
            .error_class
            .as_deref()
            .is_none_or(|c| header(message, headers::ERROR_CLASS).as_deref() == Some(c));
        let time_ok = self
            .since
            .is_none_or(|since| message.timestamp().to_millis().is_some_and(|t| t >= since));
        class_ok && time_ok
    }
}

/// The DLQ `topic` names, or the DLQ of the catalog topic it names.
pub fn dead_letter_topic(catalog: &Catalog, topic: &str) -> String {
    catalog
        .topic(topic)
        .and_then(|t| t.dead_letter.as_ref())
        .map_or_else(|| topic.to_owned(), |d| d.topic.clone())
}

/// Every record in `topic` up to its end as of now, in partition order.
pub fn read_all(connection: &KafkaConnection, topic: &str) -> anyhow::Result<Vec<OwnedMessage>> {
    crate::readback::read_since(
        &connection.client_config(),
        topic,
        None,
        connection.gap_confirmation(),
    )
}

/// `dlq list`: counts by error class and original topic.
pub fn list(
    records: &[OwnedMessage],
    filter: &Filter,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
    for message in records.iter().filter(|m| filter.matches(m)) {
        let class = header(message, headers::ERROR_CLASS).unwrap_or_else(|| "(none)".into());
        let origin = header(message, headers::ORIGINAL_TOPIC).unwrap_or_else(|| "(unknown)".into());
        *counts.entry((class, origin)).or_default() += 1;
    }
    let total: usize = counts.values().sum();
    writeln!(
        out,
        "{:<28} {:<28} {:>10}",
        "ERROR CLASS", "ORIGINAL TOPIC", "RECORDS"
    )?;
    for ((class, origin), n) in &counts {
        writeln!(out, "{class:<28} {origin:<28} {n:>10}")?;
    }
    writeln!(out, "{:<28} {:<28} {total:>10}", "total", "")
}

/// `dlq show`: records with headers and the payload decoded where possible.
pub fn show(
    records: &[OwnedMessage],
    filter: &Filter,
    limit: usize,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let decoder = Decoder::default();
    let mut shown = 0;
    for message in records.iter().filter(|m| filter.matches(m)).take(limit) {
        shown += 1;
        writeln!(
            out,
            "--- partition {} offset {} timestamp {}",
            message.partition(),
            message.offset(),
            message.timestamp().to_millis().unwrap_or(-1)
        )?;
        if let Some(key) = message.key() {
            writeln!(out, "key: {}", String::from_utf8_lossy(key))?;
        }
        if let Some(hs) = message.headers() {
            for h in hs.iter() {
                writeln!(
                    out,
                    "{}: {}",
                    h.key,
                    h.value.map(String::from_utf8_lossy).unwrap_or_default()
                )?;
            }
        }
        let payload = message.payload().unwrap_or_default();
        let event_type =
            header(message, headers::EVENT_TYPE).and_then(|t| EventType::from_name(&t));
        let content_type = header(message, headers::CONTENT_TYPE);
        let hint = DecodeHint {
            content_type: content_type.as_deref(),
            event_type,
        };
        match decoder.decode(payload, hint) {
            Ok(event) => writeln!(out, "payload: {}", event_json(&event))?,
            Err(error) => writeln!(
                out,
                "payload: undecodable ({error}), {} bytes: {}",
                payload.len(),
                escaped(payload)
            )?,
        }
    }
    writeln!(out, "{shown} record(s) shown")
}

fn event_json(event: &AnyEvent) -> String {
    let json = match event {
        AnyEvent::User(e) => serde_json::to_string(e),
        AnyEvent::Order(e) => serde_json::to_string(e),
        AnyEvent::Chat(e) => serde_json::to_string(e),
        AnyEvent::Search(e) => serde_json::to_string(e),
    };
    json.unwrap_or_else(|e| format!("(not serialisable: {e})"))
}

/// The first 64 bytes, printable ASCII as is and the rest as `\xNN`.
fn escaped(bytes: &[u8]) -> String {
    let mut text: String = bytes
        .iter()
        .take(64)
        .flat_map(|b| std::ascii::escape_default(*b))
        .map(char::from)
        .collect();
    if bytes.len() > 64 {
        text.push_str("...");
    }
    text
}

/// What `dlq replay` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    pub replayed: usize,
    /// Refused by the loop guard.
    pub refused: usize,
    /// No `original-topic` header, so nowhere to send them.
    pub homeless: usize,
}

/// Sends the matching records back to their original topics with
/// `replay-count` incremented and the failure headers removed; waits for
/// every acknowledgement. With `dry_run`, only counts.
pub async fn replay(
    connection: &KafkaConnection,
    records: &[OwnedMessage],
    filter: &Filter,
    max_replays: u32,
    dry_run: bool,
) -> anyhow::Result<Replayed> {
    let producer: FutureProducer = connection
        .client_config()
        .set("enable.idempotence", "true")
        .create()
        .context("creating the Kafka producer")?;
    let mut summary = Replayed::default();
    let mut deliveries = Vec::new();
    for message in records.iter().filter(|m| filter.matches(m)) {
        let Some(topic) = header(message, headers::ORIGINAL_TOPIC) else {
            summary.homeless += 1;
            continue;
        };
        let count: u32 = header(message, headers::REPLAY_COUNT)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        if count >= max_replays {
            summary.refused += 1;
            continue;
        }
        summary.replayed += 1;
        if dry_run {
            continue;
        }
        let mut out = OwnedHeaders::new();
        if let Some(hs) = message.headers() {
            for h in hs.iter() {
                if !headers::FAILURE_HEADERS.contains(&h.key) && h.key != headers::REPLAY_COUNT {
                    out = out.insert(Header {
                        key: h.key,
                        value: h.value,
                    });
                }
            }
        }
        let next = (count + 1).to_string();
        out = out.insert(Header {
            key: headers::REPLAY_COUNT,
            value: Some(next.as_bytes()),
        });
        let mut record = FutureRecord::<[u8], [u8]>::to(&topic).headers(out);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(payload) = message.payload() {
            record = record.payload(payload);
        }
        loop {
            match producer.send_result(record) {
                Ok(delivery) => break deliveries.push(delivery),
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    back,
                )) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err((error, _)) => bail!("replaying a record to {topic}: {error}"),
            }
        }
    }
    for delivery in deliveries {
        delivery
            .await
            .context("the producer stopped")?
            .map_err(|(error, _)| anyhow::anyhow!("replaying a record: {error}"))?;
    }
    Ok(summary)
}
