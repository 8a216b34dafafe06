//! Deleting (or archiving) what the broker acknowledged, beside the lane's claims instead of
//! before them: one statement at a time per lane, and the batches acknowledged while one runs go
//! together in the next (so a busy lane deletes many batches in one statement, and an idle one at
//! once). A delete is sent before any later claim of the lane, on the same session, so the claim
//! sees it; rows whose delete has not been sent yet are left out of claims from below the cursor
//! ([`Completions::held`]).

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;

use super::lane_session::{Acked, ClaimedRow, LaneDbError, LaneSession};
use super::Shared;

/// Acknowledged batches: their rows (for the delivery metrics) and where the broker put them.
type Acknowledged = Vec<(Vec<ClaimedRow>, Vec<Acked>)>;

type Running<'s> = Pin<Box<dyn Future<Output = (Result<u64, LaneDbError>, Acknowledged)> + Send + 's>>;

/// A lane's acknowledged rows on their way out of the outbox.
pub(super) struct Completions<'s> {
    session: &'s LaneSession,
    waiting: Acknowledged,
    running: Option<Running<'s>>,
    /// The sequences waiting or being deleted.
    seqs: HashSet<i64>,
}

impl<'s> Completions<'s> {
    pub(super) fn new(session: &'s LaneSession) -> Self {
        Self { session, waiting: Vec::new(), running: None, seqs: HashSet::new() }
    }

    /// How many rows are acknowledged and not yet deleted: they count against the lane's
    /// `--max-in-flight` with the window, so what a crash can send twice stays bounded.
    pub(super) fn rows(&self) -> usize {
        self.seqs.len()
    }

    /// The rows acknowledged and still on their way out (a claim must not take them again).
    pub(super) fn held(&self) -> &HashSet<i64> {
        &self.seqs
    }

    pub(super) fn is_empty(&self) -> bool {
        self.running.is_none() && self.waiting.is_empty()
    }

    /// Queues an acknowledged batch, and sends the delete at once when none is running.
    pub(super) async fn push(&mut self, rows: Vec<ClaimedRow>, acked: Vec<Acked>) {
        self.seqs.extend(acked.iter().map(|a| a.seq));
        self.waiting.push((rows, acked));
        self.start().await;
    }

    /// Sends the waiting batches' delete if none is running. The statement is handed to the
    /// session before this returns (its first poll sends it), so any later claim runs after it.
    async fn start(&mut self) {
        if self.running.is_some() || self.waiting.is_empty() {
            return;
        }
        let batches = std::mem::take(&mut self.waiting);
        let session = self.session;
        let mut running: Running<'s> = Box::pin(async move {
            let acked: Vec<Acked> = batches.iter().flat_map(|(_, a)| a.iter().cloned()).collect();
            (session.complete(&acked).await, batches)
        });
        if let std::task::Poll::Ready(done) = futures::poll!(running.as_mut()) {
            running = Box::pin(std::future::ready(done));
        }
        self.running = Some(running);
    }

    /// Waits for the running delete (pending forever when none runs, for `select!`), counts what
    /// it removed, and sends the next one.
    pub(super) async fn next(&mut self, shared: &Shared) -> Result<(), String> {
        let Some(running) = self.running.as_mut() else { return std::future::pending().await };
        let (result, batches) = running.await;
        self.running = None;
        let n: usize = batches.iter().map(|(_, a)| a.len()).sum();
        if let Err(e) = result {
            return Err(format!("deleting {n} acknowledged rows failed: {e}"));
        }
        shared.stats.delivered.fetch_add(n as u64, Ordering::Relaxed);
        for (rows, acked) in &batches {
            for a in acked {
                self.seqs.remove(&a.seq);
            }
            super::settle::record_delivery(&shared.label, rows, acked);
        }
        self.start().await;
        Ok(())
    }

    /// Waits until everything acknowledged is deleted.
    pub(super) async fn drain(&mut self, shared: &Shared) -> Result<(), String> {
        while !self.is_empty() {
            self.start().await;
            self.next(shared).await?;
        }
        Ok(())
    }
}
