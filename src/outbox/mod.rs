//! The writer API: enqueue messages inside the caller's own transaction.
//!
//! ```no_run
//! # async fn demo(client: &mut tokio_postgres::Client) -> Result<(), Box<dyn std::error::Error>> {
//! use outbox_relay::outbox::{Outbox, OutboxMessage};
//!
//! let outbox = Outbox::new(outbox_relay::schema::SchemaName::default());
//! let tx = client.transaction().await?;
//! tx.execute("UPDATE orders SET state = 'paid' WHERE id = $1", &[&42_i64]).await?;
//! let message = OutboxMessage::builder("orders.paid")
//!     .key("order-42")
//!     .json(&serde_json::json!({"order": 42, "state": "paid"}))
//!     .message_type("com.example.order.paid")
//!     .idempotency_key("pay-request-7f3a") // the same request enqueues once
//!     .build()?;
//! let id = outbox.enqueue(&tx, &message).await?;
//! tx.commit().await?; // the message exists if and only if the order update does
//! # let _ = id; Ok(()) }
//! ```
//!
//! The library never commits: the message becomes visible to the relay exactly when the caller's
//! transaction commits, and vanishes with it on rollback. Validation happens before anything is
//! sent, with the same rules as the SQL functions `enqueue` / `enqueue_json`.

use serde_json::Value;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::schema::SchemaName;

mod message;
mod validate;

pub use crate::schema::DEFAULT_MAX_PAYLOAD_BYTES;
pub use message::{idempotent_id, OutboxMessage, OutboxMessageBuilder, CONTENT_TYPE_BYTES, CONTENT_TYPE_JSON};
use validate::validate;
pub use validate::{validate_topic, InvalidMessage};

/// The UUIDv5 namespace of ids derived from idempotency keys (the SQL function
/// `idempotent_id` uses the same, so both APIs give one id for one key).
pub const IDEMPOTENCY_NAMESPACE: Uuid = uuid::uuid!("7d23c104-60d5-4fd5-9f73-75537a8eb7bd");

/// The Kafka header that carries the message id (CloudEvents `ce_id`); the inbox reads it.
pub const ID_HEADER: &str = "ce_id";
/// The header naming the outbox lane a record was delivered from.
pub const LANE_HEADER: &str = "outbox_lane";
/// The header carrying the row's sequence number in the outbox: unique, and increasing per key in
/// delivery order; not dense (one sequence serves every lane, and rolled-back writes leave holes).
pub const SEQ_HEADER: &str = "outbox_seq";

/// Why an enqueue failed.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    /// A message was refused; nothing of the batch was written.
    #[error("message {index} of the batch was refused: {source}")]
    Invalid {
        /// Its position in the batch (0 for a single message).
        index: usize,
        /// Why.
        #[source]
        source: InvalidMessage,
    },
    /// The database refused the insert; the caller's transaction is now aborted.
    #[error("writing to the outbox failed: {0}")]
    Database(#[from] tokio_postgres::Error),
}

/// The writer: enqueues messages into one schema's outbox.
#[derive(Debug, Clone)]
pub struct Outbox {
    max_payload_bytes: usize,
    insert_sql: String,
}

impl Outbox {
    /// A writer for `schema`, with the default payload limit.
    pub fn new(schema: SchemaName) -> Self {
        Self {
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            insert_sql: schema.qualify(include_str!("../sql/enqueue_batch.sql")),
        }
    }

    /// Sets the largest payload accepted (keep it at or below the broker's `message.max.bytes`
    /// and the schema's `max_payload_bytes` setting, which the SQL functions enforce).
    pub fn with_max_payload_bytes(mut self, max: usize) -> Self {
        self.max_payload_bytes = max;
        self
    }

    /// Enqueues one message in the caller's transaction and returns its id (for a repeated
    /// idempotency key, the id it was first enqueued with; nothing new is written).
    pub async fn enqueue(&self, tx: &impl GenericClient, message: &OutboxMessage) -> Result<Uuid, EnqueueError> {
        let ids = self.enqueue_batch(tx, std::slice::from_ref(message)).await?;
        Ok(ids[0])
    }

    /// Enqueues many messages in the caller's transaction with one round trip, in the order given
    /// (which is their sequence order), and returns their ids in that order. If any message is
    /// invalid, nothing is written and the error names its position.
    pub async fn enqueue_batch(
        &self,
        tx: &impl GenericClient,
        messages: &[OutboxMessage],
    ) -> Result<Vec<Uuid>, EnqueueError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        for (index, m) in messages.iter().enumerate() {
            validate(m).map_err(|source| EnqueueError::Invalid { index, source })?;
            let size = m.payload.as_ref().map_or(0, Vec::len);
            if size > self.max_payload_bytes {
                return Err(EnqueueError::Invalid {
                    index,
                    source: InvalidMessage::PayloadTooLarge { size, max: self.max_payload_bytes },
                });
            }
        }
        let n = messages.len();
        let mut ids = Vec::with_capacity(n);
        let mut cols = BatchColumns::with_capacity(n);
        let mut seen_keyed = std::collections::HashSet::new();
        for m in messages {
            let id = m.id();
            ids.push(id);
            let keyed = m.idempotency_key.is_some();
            // A key repeated inside one batch is the same request twice: write it once.
            if keyed && !seen_keyed.insert(id) {
                continue;
            }
            cols.push(id, m, keyed);
        }
        let params: [(&(dyn ToSql + Sync), Type); 10] = [
            (&cols.ids, Type::UUID_ARRAY),
            (&cols.topics, Type::TEXT_ARRAY),
            (&cols.keys, Type::TEXT_ARRAY),
            (&cols.payloads, Type::BYTEA_ARRAY),
            (&cols.headers, Type::JSONB_ARRAY),
            (&cols.types, Type::TEXT_ARRAY),
            (&cols.content_types, Type::TEXT_ARRAY),
            (&cols.correlation_ids, Type::TEXT_ARRAY),
            (&cols.traceparents, Type::TEXT_ARRAY),
            (&cols.keyed, Type::BOOL_ARRAY),
        ];
        tx.execute_typed(&self.insert_sql, &params).await?;
        Ok(ids)
    }
}

/// A batch as columns, sent as arrays and unnested by the server.
struct BatchColumns<'a> {
    ids: Vec<Uuid>,
    topics: Vec<&'a str>,
    keys: Vec<Option<&'a str>>,
    payloads: Vec<Option<&'a [u8]>>,
    headers: Vec<Value>,
    types: Vec<Option<&'a str>>,
    content_types: Vec<&'static str>,
    correlation_ids: Vec<Option<&'a str>>,
    traceparents: Vec<Option<&'a str>>,
    keyed: Vec<bool>,
}

impl<'a> BatchColumns<'a> {
    fn with_capacity(n: usize) -> Self {
        Self {
            ids: Vec::with_capacity(n),
            topics: Vec::with_capacity(n),
            keys: Vec::with_capacity(n),
            payloads: Vec::with_capacity(n),
            headers: Vec::with_capacity(n),
            types: Vec::with_capacity(n),
            content_types: Vec::with_capacity(n),
            correlation_ids: Vec::with_capacity(n),
            traceparents: Vec::with_capacity(n),
            keyed: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, id: Uuid, m: &'a OutboxMessage, keyed: bool) {
        self.ids.push(id);
        self.topics.push(&m.topic);
        self.keys.push(m.key.as_deref());
        self.payloads.push(m.payload.as_deref());
        self.headers
            .push(Value::Object(m.headers.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect()));
        self.types.push(m.message_type.as_deref());
        self.content_types.push(m.content_type);
        self.correlation_ids.push(m.correlation_id.as_deref());
        self.traceparents.push(m.traceparent.as_deref());
        self.keyed.push(keyed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg() -> OutboxMessageBuilder {
        OutboxMessage::builder("orders").key("k").payload(b"x".to_vec())
    }

    #[test]
    fn topic_rules_match_kafka() {
        assert_eq!(validate_topic(""), Err(InvalidMessage::EmptyTopic));
        for bad in [".", "..", "a b", "ä", "a/b", &"x".repeat(250)] {
            assert!(matches!(validate_topic(bad), Err(InvalidMessage::InvalidTopic { .. })), "{bad}");
        }
        for ok in ["a", "orders.paid", "A_b-9", &"x".repeat(249)] {
            assert_eq!(validate_topic(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn each_invalid_field_gets_its_own_error() {
        assert_eq!(msg().key_bytes(&[0xff, 0xfe]).build(), Err(InvalidMessage::NotUtf8 { field: "key" }));
        assert_eq!(msg().key("a\0b").build(), Err(InvalidMessage::NulInText { field: "key" }));
        assert_eq!(msg().header_bytes(b"ok", &[0xc3]).build(), Err(InvalidMessage::NotUtf8 { field: "header value" }));
        assert_eq!(msg().header("", "v").build(), Err(InvalidMessage::InvalidHeaderName { name: String::new() }));
        assert_eq!(msg().header("a\nb", "v").build(), Err(InvalidMessage::InvalidHeaderName { name: "a\nb".into() }));
        assert_eq!(
            msg().header("CE_id", "v").build(),
            Err(InvalidMessage::ReservedHeaderName { name: "CE_id".into() })
        );
        assert_eq!(msg().message_type("").build(), Err(InvalidMessage::InvalidMessageType));
        assert_eq!(msg().correlation_id("a\tb").build(), Err(InvalidMessage::InvalidCorrelationId));
        assert!(matches!(msg().traceparent("00-abc").build(), Err(InvalidMessage::InvalidTraceparent { .. })));
        assert!(matches!(
            msg().traceparent(format!("00-{}-{}-01", "0".repeat(32), "1".repeat(16))).build(),
            Err(InvalidMessage::InvalidTraceparent { .. })
        ));
        assert_eq!(msg().idempotency_key("").build(), Err(InvalidMessage::InvalidIdempotencyKey));
        let ok = msg()
            .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .header("x-tenant", "t1")
            .build();
        assert!(ok.is_ok());
    }

    #[test]
    fn idempotent_ids_are_uuid_v5_and_stable() {
        let a = idempotent_id("order-42");
        assert_eq!(a.get_version_num(), 5);
        assert_eq!(a, idempotent_id("order-42"));
        assert_ne!(a, idempotent_id("order-43"));
        // The same value the SQL function computes (checked against the server in the tests too).
        assert_eq!(a.to_string(), "f47dc888-792e-578c-b3e3-ad2eb52e6653");
        let fresh = msg().build().unwrap().id();
        assert_eq!(fresh.get_version_num(), 7);
    }
}
