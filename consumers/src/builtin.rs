//! Handlers that ship with the worker and are chosen by name; the ClickHouse
//! projections live in `projection`.

use std::str::FromStr;

use crate::handler::{Handler, Outcome, Record};

/// A handler chosen with `--handler NAME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// Marks every record done: for measuring the runtime itself.
    Noop,
    /// Logs every event at info level.
    Log,
    /// Every event into ClickHouse, a table per event type.
    EventsStore,
    /// The current state of every order in ClickHouse.
    OrderStatus,
}

impl Builtin {
    pub const NAMES: [&'static str; 4] = ["noop", "log", "events-store", "order-status"];

    /// The ClickHouse projection this name stands for, if it is one.
    pub fn projection(self) -> Option<crate::projection::Projection> {
        match self {
            Self::EventsStore => Some(crate::projection::Projection::EventsStore),
            Self::OrderStatus => Some(crate::projection::Projection::OrderStatus),
            Self::Noop | Self::Log => None,
        }
    }
}

impl FromStr for Builtin {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "noop" => Ok(Self::Noop),
            "log" => Ok(Self::Log),
            "events-store" => Ok(Self::EventsStore),
            "order-status" => Ok(Self::OrderStatus),
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
            Self::EventsStore => "events-store",
            Self::OrderStatus => "order-status",
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
pub struct Chain {
    pub builtins: Vec<Builtin>,
    pub projections: Option<std::sync::Arc<crate::projection::Projections>>,
}

impl Handler for Chain {
    fn name(&self) -> &str {
        "chain"
    }

    async fn handle(&self, batch: &[Record]) -> Vec<Outcome> {
        let mut outcomes = vec![Outcome::Done; batch.len()];
        let mut answers = Vec::new();
        for handler in self.builtins.iter().filter(|b| b.projection().is_none()) {
            answers.push(handler.handle(batch).await);
        }
        if let Some(projections) = &self.projections {
            answers.push(projections.handle(batch).await);
        }
        for answers in answers {
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
