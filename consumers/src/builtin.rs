//! Handlers that ship with the worker and are chosen by name. The ClickHouse
//! projections join them in their own module.

use std::str::FromStr;

use crate::handler::{Handler, Outcome, Record};

/// A handler chosen with `--handler NAME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// Marks every record done: for measuring the runtime itself.
    Noop,
    /// Logs every event at info level.
    Log,
}

impl Builtin {
    pub const NAMES: [&'static str; 2] = ["noop", "log"];
}

impl FromStr for Builtin {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "noop" => Ok(Self::Noop),
            "log" => Ok(Self::Log),
            other => Err(format!(
                "unknown handler {other:?}; valid: {}",
                Self::NAMES.join(", ")
            )),
        }
    }
}

impl Handler for Builtin {
    fn name(&self) -> &str {
        match self {
            Self::Noop => "noop",
            Self::Log => "log",
        }
    }

    async fn handle(&self, batch: &[Record]) -> Vec<Outcome> {
        if *self == Self::Log {
            for record in batch {
                tracing::info!(topic = &*record.topic, partition = record.partition, offset = record.offset, event = ?record.event, "Event.");
            }
        }
        vec![Outcome::Done; batch.len()]
    }
}

/// Several handlers over the same batch; a record is done when every handler
/// says so, and the gravest outcome wins (fatal over retry over done).
/// Handlers must be idempotent: a retry runs all of them again.
#[derive(Debug, Clone)]
pub struct Chain(pub Vec<Builtin>);

impl Handler for Chain {
    fn name(&self) -> &str {
        "chain"
    }

    async fn handle(&self, batch: &[Record]) -> Vec<Outcome> {
        let mut outcomes = vec![Outcome::Done; batch.len()];
        for handler in &self.0 {
            let answers = handler.handle(batch).await;
            for (slot, answer) in outcomes.iter_mut().zip(answers) {
                *slot = match (&*slot, answer) {
                    (Outcome::Fatal { .. }, _) => continue,
                    (_, fatal @ Outcome::Fatal { .. }) => fatal,
                    (Outcome::Retry { .. }, _) => continue,
                    (_, other) => other,
                };
            }
        }
        outcomes
    }
}
