//! Delivery reports without a future per record: librdkafka calls the producer context's
//! `delivery` callback (on the producer's polling thread) with the number the record was sent
//! with, and the context routes the report to the lane loop that sent it.
//!
//! The number packs a route (one per lane loop, never reused, so a report that arrives after its
//! lane loop ended is dropped rather than taken for another loop's record) and a ticket (the
//! record's place in that loop's sequence of sends). No allocation, oneshot channel or future per
//! record: one channel per lane loop, made when it starts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use tokio::sync::mpsc;

// Route and ticket are packed into the delivery opaque, a usize.
const _: () = assert!(usize::BITS >= 64, "delivery tickets need a 64-bit usize");

/// The relay's producer: delivery reports through [`DeliveryRouter`].
pub(crate) type RelayProducer = ThreadedProducer<DeliveryRouter>;

/// What became of one record at the broker.
#[derive(Debug)]
pub(crate) struct DeliveryReport {
    /// The ticket the record was sent with.
    pub(crate) ticket: u32,
    /// Where it was stored, or why not.
    pub(crate) result: Result<(i32, i64), KafkaError>,
    /// When the report came (the acknowledgement's time).
    pub(crate) at: std::time::Instant,
}

/// The producer context: routes each delivery report to the lane loop that sent the record.
/// Every producer generation shares one.
#[derive(Clone, Default)]
pub(crate) struct DeliveryRouter {
    inner: Arc<Routes>,
}

#[derive(Default)]
struct Routes {
    next: AtomicU32,
    open: RwLock<HashMap<u32, mpsc::UnboundedSender<DeliveryReport>>>,
}

/// One lane loop's end of the router: the reports of the records it sent. Closing it (dropping)
/// drops the reports still to come for it.
pub(crate) struct Route {
    id: u32,
    next_ticket: u32,
    reports: mpsc::UnboundedReceiver<DeliveryReport>,
    router: DeliveryRouter,
}

impl DeliveryRouter {
    /// Opens a route for a lane loop.
    pub(crate) fn open(&self) -> Route {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner.open.write().expect("delivery routes lock").insert(id, tx);
        Route { id, next_ticket: 0, reports: rx, router: self.clone() }
    }
}

impl Route {
    /// The next ticket, and the delivery opaque a record sent with it carries.
    pub(crate) fn ticket(&mut self) -> (u32, usize) {
        let t = self.next_ticket;
        self.next_ticket = t.wrapping_add(1);
        (t, ((self.id as usize) << 32) | t as usize)
    }

    /// The next report (`None` never happens while the route is open: it holds a sender).
    pub(crate) async fn recv(&mut self) -> Option<DeliveryReport> {
        self.reports.recv().await
    }

    /// A report already there, if any.
    pub(crate) fn try_recv(&mut self) -> Option<DeliveryReport> {
        self.reports.try_recv().ok()
    }
}

impl Drop for Route {
    fn drop(&mut self) {
        if let Ok(mut open) = self.router.inner.open.write() {
            open.remove(&self.id);
        }
    }
}

impl ClientContext for DeliveryRouter {}

impl ProducerContext for DeliveryRouter {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let at = std::time::Instant::now();
        let (route, ticket) = ((opaque >> 32) as u32, opaque as u32);
        let result = match result {
            Ok(m) => Ok((m.partition(), m.offset())),
            Err((e, _)) => Err(e.clone()),
        };
        let open = self.inner.open.read().expect("delivery routes lock");
        if let Some(tx) = open.get(&route) {
            // A closed receiver means the lane loop ended: its rows stay in the outbox.
            let _ = tx.send(DeliveryReport { ticket, result, at });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_carry_their_route_and_routes_are_not_reused() {
        let router = DeliveryRouter::default();
        let mut a = router.open();
        let b = router.open();
        assert_ne!(a.id, b.id);
        let (t0, o0) = a.ticket();
        let (t1, o1) = a.ticket();
        assert_eq!((t0, t1), (0, 1));
        assert_eq!((o0 >> 32) as u32, a.id);
        assert_eq!(o1 as u32, 1);
        let id = b.id;
        drop(b);
        assert!(!router.inner.open.read().unwrap().contains_key(&id));
        assert_ne!(router.open().id, id, "a new loop never gets an old route");
    }
}
