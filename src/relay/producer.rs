//! The relay's Kafka producer, in generations: when the order promise can no longer be kept by
//! the producer in hand, it is retired whole and the next generation starts from the outbox.
//!
//! Why generations. Per key, Kafka must see the first arrival of each message in sequence order.
//! The idempotent producer keeps a partition's records in order while it retries, so within one
//! producer epoch the broker holds, per partition, a contiguous prefix of what was sent. Only an
//! epoch bump breaks that: librdkafka bumps the epoch when a record times out
//! (`message.timeout.ms`), fails permanently, runs out of retries, or when records were purged
//! from under it, and then sends the records behind, so a later row of a key can land while an
//! earlier one failed (a gap). So:
//!
//! - librdkafka never times a record out (`message.timeout.ms=0`) and never runs out of retries;
//!   the relay bounds each batch with its own deadline (`--message-timeout`);
//! - a permanent per-record failure does not bump the epoch but makes the producer fail for good
//!   (`enable.gapless.guarantee=true`: the records behind it are refused as out of sequence);
//! - when a deadline passes or the producer failed for good, the generation is retired: it is
//!   marked retired (no record is handed to it after that), everything it still holds is purged
//!   (those records fail, their rows stay in the outbox) and a fresh producer (a new producer id)
//!   takes over. Lanes send again from the head of each lane.
//!
//! A purged record may still have been written (it was in flight): the next generation sends it
//! again, a duplicate, which the inbox absorbs. Whatever interleaving the two generations' writes
//! take at the broker, each wrote a prefix of its records in order and the new one starts again
//! from the oldest unacknowledged row, so the first arrival of every message of a key still follows
//! sequence order: a timeout becomes a duplicate, never a reorder.

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, FutureProducer, Producer, PurgeConfig};

use super::kafka::{KafkaConfigError, ProducerSettings};
use super::reports::{DeliveryRouter, RelayProducer};
use super::RelayStats;

/// One producer and its generation number.
pub(crate) struct Generation {
    /// The producer.
    pub(crate) producer: RelayProducer,
    /// Counts up from 1 with each replacement.
    pub(crate) number: u64,
    /// Set (under the write lock) before the producer is purged; a send holds the read lock from
    /// its check to the hand-over, so no record reaches a purged producer: it would be sent after
    /// the records purged before it, with a gap in its sequence numbers.
    retired: RwLock<bool>,
}

/// Why a record was not handed to the producer.
pub(crate) enum SendError<'a> {
    /// The generation was retired: the row stays in the outbox and goes with the next one.
    Retired,
    /// librdkafka refused it (queue full: the record is given back to try again).
    Kafka(KafkaError, BaseRecord<'a, [u8], [u8], usize>),
}

impl Generation {
    fn new(producer: RelayProducer, number: u64) -> Self {
        Self { producer, number, retired: RwLock::new(false) }
    }

    /// Hands a record to this generation's producer, unless the generation was retired. Its
    /// delivery report comes through the record's route.
    pub(crate) fn send<'a>(&self, record: BaseRecord<'a, [u8], [u8], usize>) -> Result<(), SendError<'a>> {
        let retired = self.retired.read().expect("generation lock");
        if *retired {
            return Err(SendError::Retired);
        }
        self.producer.send(record).map_err(|(e, r)| SendError::Kafka(e, r))
    }

    /// Whether this producer failed for good (a record refused under the gapless guarantee, or
    /// the producer itself cannot work).
    pub(crate) fn failed_for_good(&self) -> Option<(rdkafka::types::RDKafkaErrorCode, String)> {
        self.producer.client().fatal_error()
    }
}

/// Holds the current generation; a lane holds an `Arc` of it while it has records in flight.
pub(crate) struct ProducerSlot {
    settings: ProducerSettings,
    router: DeliveryRouter,
    current: RwLock<Arc<Generation>>,
    stats: Arc<RelayStats>,
}

impl ProducerSlot {
    /// Creates the first generation.
    pub(crate) fn new(settings: ProducerSettings, stats: Arc<RelayStats>) -> Result<Self, KafkaConfigError> {
        let router = DeliveryRouter::default();
        let producer = settings.create_routed(router.clone())?;
        Ok(Self { settings, router, current: RwLock::new(Arc::new(Generation::new(producer, 1))), stats })
    }

    /// Where delivery reports go: every generation shares one router, so a lane's route outlives
    /// a replacement.
    pub(crate) fn router(&self) -> &DeliveryRouter {
        &self.router
    }

    /// The generation to send with.
    pub(crate) fn current(&self) -> Arc<Generation> {
        self.current.read().expect("producer slot lock").clone()
    }

    /// Retires generation `number` if it is still the current one (several lanes may ask for the
    /// same one): a fresh producer takes over, the old one takes no more records, and everything
    /// it holds is purged, so its records fail now and their rows, still in the outbox, are sent
    /// again by the new one. No lane sends a key's rows on the new generation while records it sent
    /// on the old one are unresolved (a lane's window stays on one generation until it is
    /// resolved), so the module's argument holds.
    pub(crate) async fn retire(&self, number: u64, why: &'static str) {
        if self.current().number != number {
            return;
        }
        // Made before taking the lock (creating a producer starts threads); dropped unused when
        // another lane retired this generation first.
        let settings = self.settings.clone();
        let router = self.router.clone();
        let made = tokio::task::spawn_blocking(move || settings.create_routed(router)).await;
        let producer = match made {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                // The same settings made the first producer; keep the old one rather than none.
                tracing::error!(error = %e, "could not create a new Kafka producer; keeping the current one");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "creating a new Kafka producer failed; keeping the current one");
                return;
            }
        };
        let old = {
            let mut current = self.current.write().expect("producer slot lock");
            if current.number != number {
                drop(current);
                tokio::task::spawn_blocking(move || drop(producer));
                return;
            }
            std::mem::replace(&mut *current, Arc::new(Generation::new(producer, number + 1)))
        };
        *old.retired.write().expect("generation lock") = true;
        self.stats.producer_generations.fetch_add(1, Ordering::Relaxed);
        crate::telemetry::producer_replaced(why);
        tracing::warn!(
            generation = number + 1,
            reason = why,
            "Kafka producer replaced: records it still held fail and are sent again from the head of their lanes"
        );
        // Purging waits briefly for librdkafka's broker threads, and destroying a producer joins
        // its threads: both off the async workers. The lanes still holding the old generation let
        // go of it when their batch ends; the last reference is dropped here.
        let purged = tokio::task::spawn_blocking({
            let old = old.clone();
            move || {
                old.producer.purge(PurgeConfig::default().queue().inflight());
                // Serve the delivery reports the purge made, so waiting lanes learn it at once.
                let _ = old.producer.flush(Duration::from_millis(500));
            }
        });
        let _ = purged.await;
        tokio::task::spawn_blocking(move || {
            let until = std::time::Instant::now() + Duration::from_secs(120);
            while Arc::strong_count(&old) > 1 && std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            drop(old);
        });
    }
}

/// A producer for the dead-letter mirror topic, apart from the relay's own: a mirror record the
/// broker refuses (no write access to the DLQ topic) must not make the relay's producer fail for
/// good, and the mirror is best effort, so its records may time out inside librdkafka.
pub(crate) fn mirror_producer(settings: &ProducerSettings) -> Result<FutureProducer, KafkaConfigError> {
    let mut config = settings.client_config()?;
    config
        .set("enable.gapless.guarantee", "false")
        .set("message.timeout.ms", settings.message_timeout.as_millis().to_string());
    config.create().map_err(KafkaConfigError::Create)
}
