//! outbox-relay: a transactional outbox relay from PostgreSQL to Kafka, and an inbox that gives
//! consumers exactly-once effects.
//!
//! # Layout
//!
//! - [`schema`]: the schema name, the numbered migrations under `schema/`, and `migrate`.
//! - [`outbox`]: the writer API; enqueue messages inside the caller's own transaction.
//! - [`db`]: PostgreSQL connections with timeouts and server-verifying TLS.
//! - [`pool`] (feature `consumer`): a pool of those sessions, for the consumer's partition workers.
//! - [`classify`]: every error, classified once where it enters: retry or not.
//! - [`retry`]: capped exponential backoff with full jitter.
//! - [`telemetry`]: every metric, defined once (name, unit, help, labels).
//! - [`traces`] (feature `kafka`): OpenTelemetry spans of each message, relay and consumer, over
//!   OTLP when an endpoint is configured.
//! - [`health`] (feature `relay`): `/metrics`, `/healthz`, `/readyz`.
//! - [`horizon`]: queue health: who holds back PostgreSQL's cleanup of the outbox.
//! - [`ops`] (feature `relay`): what the operator commands read and change: dead letters,
//!   status, trace, reconciliation; every change with an audit row.
//! - [`inbox`] (feature `inbox`): exactly-once effects; record a message id with the effect.
//! - [`consumer`] (feature `consumer`): a consumer runner around rdkafka using the inbox.
//! - [`relay`] (feature `relay`): the daemon. Its module docs list one file per concern; the lane
//!   loop, where a row is claimed and produced, is `relay/lane.rs`; what its outcome means (delete,
//!   retry, dead-letter) is `relay/settle.rs`.
//!
//! # Guarantees
//!
//! 1. A message enqueued in a transaction exists if and only if that transaction commits; a
//!    repeated idempotency key enqueues nothing new and returns the first id.
//! 2. Every committed outbox row is published to Kafka at least once; per key, in the order the
//!    rows were written (sequence order), provided writes of one key are serialised (as a row lock
//!    on the business entity does). Two transactions writing the same key at once have no order
//!    between them but their commit order.
//! 3. A consumer using the inbox applies each message's effect once: the message id is recorded
//!    in the same transaction as the effect.
//!
//! The SQL contract (`<schema>.enqueue(...)`, `<schema>.enqueue_json(...)`) gives services in any
//! language the same writer as [`outbox::Outbox`].

pub mod classify;
#[cfg(feature = "consumer")]
pub mod consumer;
pub mod db;
#[cfg(feature = "relay")]
pub mod health;
pub mod horizon;
#[cfg(feature = "inbox")]
pub mod inbox;
#[cfg(feature = "relay")]
pub mod ops;
pub mod outbox;
#[cfg(feature = "consumer")]
pub mod pool;
#[cfg(feature = "relay")]
pub mod relay;
pub mod retry;
pub mod schema;
pub mod telemetry;
#[cfg(feature = "kafka")]
pub mod traces;
