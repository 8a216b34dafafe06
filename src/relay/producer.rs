//! The relay's Kafka producer, in generations: when the order promise can no longer be kept by
//! the producer in hand, it is retired whole and the next generation starts from the outbox.
//!
//! Why generations. Per key, Kafka must see the first arrival of each message in sequence order.
//! The idempotent producer keeps a partition's records in order while it retries, so within one
//! producer epoch the broker holds, per partition, a contiguous prefix of what was sent. Only an
//! epoch bump breaks that: librdkafka bumps the epoch when a record times out
//! (`message.timeout.ms`) or fails permanently, and then sends the records behind it, so a later
//! row of a key can land while an earlier one failed (a gap). So:
//!
//! - librdkafka never times a record out (`message.timeout.ms=0`); the relay bounds each batch
//!   with its own deadline (`--message-timeout`);
//! - a permanent per-record failure does not bump the epoch but makes the producer fail for good
//!   (`enable.gapless.guarantee=true`: the records behind it are never written);
//! - when a deadline passes or the producer failed for good, the generation is retired: everything
//!   it still holds is purged (those records fail, their rows stay in the outbox) and a fresh
//!   producer (a new producer id) takes over. Lanes send again from the head of each lane.
//!
//! A purged record may still have been written (it was in flight): the next generation sends it
//! again, a duplicate, which the inbox absorbs. Whatever interleaving the two generations' writes
//! take at the broker, each wrote a prefix of its records in order and the new one starts again
//! from the oldest unacknowledged row, so the first arrival of every message of a key still follows
//! sequence order: a timeout becomes a duplicate, never a reorder.

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::producer::{FutureProducer, Producer, PurgeConfig};

use super::kafka::{KafkaConfigError, ProducerSettings};
use super::RelayStats;

/// One producer and its generation number.
pub(crate) struct Generation {
    /// The producer.
    pub(crate) producer: FutureProducer,
    /// Counts up from 1 with each replacement.
    pub(crate) number: u64,
}

/// Holds the current generation; lanes take an `Arc` of it for one batch.
pub(crate) struct ProducerSlot {
    settings: ProducerSettings,
    current: RwLock<Arc<Generation>>,
    stats: Arc<RelayStats>,
}

impl ProducerSlot {
    /// Creates the first generation.
    pub(crate) fn new(settings: ProducerSettings, stats: Arc<RelayStats>) -> Result<Self, KafkaConfigError> {
        let producer = settings.create()?;
        Ok(Self { settings, current: RwLock::new(Arc::new(Generation { producer, number: 1 })), stats })
    }

    /// The generation to send with.
    pub(crate) fn current(&self) -> Arc<Generation> {
        self.current.read().expect("producer slot lock").clone()
    }

    /// Retires generation `number` if it is still the current one (several lanes may ask for the
    /// same one): a fresh producer takes over, then everything the old one holds is purged, so its
    /// records fail now and their rows, still in the outbox, are sent again by the new one. No
    /// lane sends a key's rows on the new generation while its batch on the old one is unresolved
    /// (a lane's batches are serial), so only the module's argument is needed for order.
    pub(crate) async fn retire(&self, number: u64, why: &'static str) {
        let old = {
            let mut current = self.current.write().expect("producer slot lock");
            if current.number != number {
                return;
            }
            let producer = match self.settings.create() {
                Ok(p) => p,
                Err(e) => {
                    // The same settings made the first producer; keep the old one rather than none.
                    tracing::error!(error = %e, "could not create a new Kafka producer; keeping the current one");
                    return;
                }
            };
            let next = Arc::new(Generation { producer, number: number + 1 });
            std::mem::replace(&mut *current, next)
        };
        self.stats.producer_generations.fetch_add(1, Ordering::Relaxed);
        crate::telemetry::producer_replaced(why);
        tracing::warn!(
            generation = number + 1,
            reason = why,
            "Kafka producer replaced: records it still held fail and are sent again from the head of their lanes"
        );
        // Purging waits briefly for librdkafka's broker threads: off the async workers.
        let purge = tokio::task::spawn_blocking(move || {
            old.producer.purge(PurgeConfig::default().queue().inflight());
            // Serve the delivery reports the purge made, so waiting lanes learn it at once.
            let _ = old.producer.flush(Duration::from_millis(500));
        });
        let _ = purge.await;
    }
}
