//! The topic-level configuration keys Kafka accepts, with the type of value
//! each takes, so a typo or a badly typed value fails at load time, not at
//! apply time on a production cluster.

/// What values a topic config key takes.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// A whole number at least `min`.
    Integer {
        min: i64,
    },
    Bool,
    /// A decimal between `min` and `max`.
    Ratio,
    /// One of the listed words.
    OneOf(&'static [&'static str]),
    /// A comma-separated list of the listed words.
    ListOf(&'static [&'static str]),
    /// Free text.
    Text,
}

const KEYS: &[(&str, Kind)] = &[
    ("cleanup.policy", Kind::ListOf(&["delete", "compact"])),
    (
        "compression.type",
        Kind::OneOf(&["uncompressed", "zstd", "lz4", "snappy", "gzip", "producer"]),
    ),
    ("delete.retention.ms", Kind::Integer { min: 0 }),
    ("file.delete.delay.ms", Kind::Integer { min: 0 }),
    ("flush.messages", Kind::Integer { min: 1 }),
    ("flush.ms", Kind::Integer { min: 0 }),
    ("follower.replication.throttled.replicas", Kind::Text),
    ("index.interval.bytes", Kind::Integer { min: 0 }),
    ("leader.replication.throttled.replicas", Kind::Text),
    ("local.retention.bytes", Kind::Integer { min: -2 }),
    ("local.retention.ms", Kind::Integer { min: -2 }),
    ("max.compaction.lag.ms", Kind::Integer { min: 1 }),
    ("max.message.bytes", Kind::Integer { min: 0 }),
    ("message.downconversion.enable", Kind::Bool),
    ("message.timestamp.after.max.ms", Kind::Integer { min: 0 }),
    ("message.timestamp.before.max.ms", Kind::Integer { min: 0 }),
    (
        "message.timestamp.difference.max.ms",
        Kind::Integer { min: 0 },
    ),
    (
        "message.timestamp.type",
        Kind::OneOf(&["CreateTime", "LogAppendTime"]),
    ),
    ("min.cleanable.dirty.ratio", Kind::Ratio),
    ("min.compaction.lag.ms", Kind::Integer { min: 0 }),
    ("min.insync.replicas", Kind::Integer { min: 1 }),
    ("preallocate", Kind::Bool),
    ("remote.storage.enable", Kind::Bool),
    ("retention.bytes", Kind::Integer { min: -1 }),
    ("retention.ms", Kind::Integer { min: -1 }),
    ("segment.bytes", Kind::Integer { min: 14 }),
    ("segment.index.bytes", Kind::Integer { min: 4 }),
    ("segment.jitter.ms", Kind::Integer { min: 0 }),
    ("segment.ms", Kind::Integer { min: 1 }),
    ("unclean.leader.election.enable", Kind::Bool),
];

/// Checks one `key: value` pair; on success returns the value in the form
/// Kafka reports it, so later comparisons with a cluster are exact.
pub fn check(key: &str, value: &str) -> Result<String, String> {
    let Some(&(_, kind)) = KEYS.iter().find(|(k, _)| *k == key) else {
        let close: Vec<&str> = KEYS
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| {
                k.split('.')
                    .any(|part| key.contains(part) && part.len() > 3)
            })
            .take(5)
            .collect();
        let hint = if close.is_empty() {
            "see the Kafka topic configuration reference".to_owned()
        } else {
            format!("did you mean {}?", close.join(", "))
        };
        return Err(format!("unknown topic config key; {hint}"));
    };
    let value = value.trim();
    match kind {
        Kind::Integer { min } => match value.parse::<i64>() {
            Ok(n) if n >= min => Ok(n.to_string()),
            _ => Err(format!("must be a whole number >= {min}, got {value:?}")),
        },
        Kind::Bool => match value {
            "true" | "false" => Ok(value.to_owned()),
            _ => Err(format!("must be true or false, got {value:?}")),
        },
        Kind::Ratio => match value.parse::<f64>() {
            Ok(r) if (0.0..=1.0).contains(&r) => Ok(value.to_owned()),
            _ => Err(format!("must be a number from 0 to 1, got {value:?}")),
        },
        Kind::OneOf(words) => match words.contains(&value) {
            true => Ok(value.to_owned()),
            false => Err(format!(
                "must be one of {}, got {value:?}",
                words.join(", ")
            )),
        },
        Kind::ListOf(words) => {
            let items: Vec<&str> = value.split(',').map(str::trim).collect();
            match items.iter().all(|i| words.contains(i)) {
                true => Ok(items.join(",")),
                false => Err(format!(
                    "must be a comma-separated list of {}, got {value:?}",
                    words.join(", ")
                )),
            }
        }
        Kind::Text => Ok(value.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn typed_values_are_checked_and_normalised() {
        assert_eq!(check("retention.ms", "604800000"), Ok("604800000".into()));
        assert_eq!(check("retention.ms", "-1"), Ok("-1".into()));
        assert!(check("retention.ms", "7d").unwrap_err().contains(">= -1"));
        assert!(check("min.insync.replicas", "0").is_err());
        assert_eq!(
            check("cleanup.policy", "compact, delete"),
            Ok("compact,delete".into())
        );
        assert!(check("cleanup.policy", "forever")
            .unwrap_err()
            .contains("delete, compact"));
        assert!(check("unclean.leader.election.enable", "yes").is_err());
        assert!(check("min.cleanable.dirty.ratio", "1.5").is_err());
        assert!(check("compression.type", "brotli")
            .unwrap_err()
            .contains("zstd"));
    }

    #[test]
    fn unknown_keys_suggest_close_ones() {
        let err = check("retention.msec", "1").unwrap_err();
        assert!(err.contains("retention.ms"), "{err}");
    }
}
