//! What a handler sees and answers. The runtime decodes every record first:
//! bytes that are not a valid event never reach a handler, they go straight
//! to the dead-letter queue.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::watch;

use backbone::events::AnyEvent;
use backbone::metrics::Gauge;

/// One decoded record of a batch.
#[derive(Debug, Clone)]
pub struct Record {
    /// The topic the event belongs to: for a record read from a retry tier,
    /// the original topic.
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub event: AnyEvent,
    /// Handler attempts before this delivery (0 the first time).
    pub attempts: u32,
}

/// What became of one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Handled; its offset may be committed.
    Done,
    /// Failed for a reason that may pass (a timeout, a server down): retry
    /// with backoff, then in the retry tiers, then dead-letter.
    Retry { reason: String },
    /// Will never succeed (an invalid event, a row the sink rejects):
    /// dead-letter now.
    Fatal { class: String, reason: String },
}

impl Outcome {
    pub fn retry(reason: impl Into<String>) -> Self {
        Self::Retry {
            reason: reason.into(),
        }
    }

    pub fn fatal(class: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Fatal {
            class: class.into(),
            reason: reason.into(),
        }
    }
}

/// How many partition tasks hold records now (batching them, waiting for a
/// handler slot, in the handler or retrying). A handler that gathers
/// several partitions' batches into one write (the ClickHouse sink) knows
/// no more batches can arrive than this; it is told whenever a task lets go.
#[derive(Debug)]
pub struct BusyPartitions {
    /// The count, exported as is; read and changed with `SeqCst` here.
    count: Gauge,
    fell: watch::Sender<()>,
}

impl Default for BusyPartitions {
    fn default() -> Self {
        Self {
            count: Gauge::default(),
            fell: watch::Sender::new(()),
        }
    }
}

impl BusyPartitions {
    pub fn get(&self) -> usize {
        usize::try_from(self.count.inner().load(Ordering::SeqCst)).unwrap_or(0)
    }

    /// The count as a metric (shared, not copied).
    pub fn gauge(&self) -> Gauge {
        self.count.clone()
    }

    /// Changes after each fall of the count (none is missed: a change since
    /// the last look is seen at once).
    pub fn falls(&self) -> watch::Receiver<()> {
        self.fell.subscribe()
    }

    pub(crate) fn enter(&self) {
        self.count.inner().fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn leave(&self) {
        self.count.inner().fetch_sub(1, Ordering::SeqCst);
        self.fell.send_replace(());
    }
}

/// A handler gets the records of one partition in order and answers one
/// outcome per record, in the same order. A missing outcome counts as retry.
pub trait Handler: Send + Sync + 'static {
    fn name(&self) -> &str;

    fn handle(&self, batch: &[Record]) -> impl Future<Output = Vec<Outcome>> + Send;
}

impl<H: Handler> Handler for Arc<H> {
    fn name(&self) -> &str {
        (**self).name()
    }

    fn handle(&self, batch: &[Record]) -> impl Future<Output = Vec<Outcome>> + Send {
        (**self).handle(batch)
    }
}
