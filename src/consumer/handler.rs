//! What an application implements: the [`Handler`] that applies a message's effect inside the
//! inbox's transaction, and the message as it sees it.

use std::future::Future;
use std::pin::Pin;

use tokio_postgres::Transaction;
use uuid::Uuid;

/// What a handler returns.
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'a>>;

/// A handler's failure; the message is retried in place, then dead-lettered (or the partition
/// stops, with [`PoisonPolicy::Stop`]).
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// The consumer's effect: runs inside the transaction that records the message id. It must not
/// commit or roll back.
pub trait Handler: Send + Sync + 'static {
    /// Applies the effect of `message` in `tx`.
    fn handle<'a>(&'a self, tx: &'a Transaction<'a>, message: &'a ConsumedMessage) -> HandlerFuture<'a>;
}

/// A message as the handler sees it.
#[derive(Debug, Clone)]
pub struct ConsumedMessage {
    /// The message id (from the id header).
    pub id: Uuid,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Payload.
    pub payload: Option<Vec<u8>>,
    /// Headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl ConsumedMessage {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// The outbox lane the relay delivered it from (the `outbox_lane` header), if it says.
    pub fn lane(&self) -> Option<i16> {
        self.header(crate::outbox::LANE_HEADER).and_then(|v| v.parse().ok())
    }

    /// The row's sequence number in the outbox (the `outbox_seq` header), if it says: unique,
    /// increasing per key in delivery order.
    pub fn seq(&self) -> Option<i64> {
        self.header(crate::outbox::SEQ_HEADER).and_then(|v| v.parse().ok())
    }
}
