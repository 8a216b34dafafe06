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

use std::collections::BTreeMap;

use serde_json::Value;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::schema::SchemaName;

/// The payload size limit when none is configured (below the broker's default 1 MiB record limit).
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1_000_000;

/// The UUIDv5 namespace of ids derived from idempotency keys (the SQL function
/// `idempotent_id` uses the same, so both APIs give one id for one key).
pub const IDEMPOTENCY_NAMESPACE: Uuid = uuid::uuid!("7d23c104-60d5-4fd5-9f73-75537a8eb7bd");

/// The Kafka header that carries the message id (CloudEvents `ce_id`); the inbox reads it.
pub const ID_HEADER: &str = "ce_id";

/// Content type of payloads given as bytes.
pub const CONTENT_TYPE_BYTES: &str = "application/octet-stream";
/// Content type of payloads given as JSON.
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// Header names the envelope sets itself; a writer's header may not take them.
fn is_reserved_header(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("ce_")
        || matches!(lower.as_str(), "content-type" | "traceparent" | "tracestate" | "correlation_id")
}

/// Why a message was refused. Nothing is written when a message is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidMessage {
    /// The topic is empty.
    #[error("topic is empty: give the Kafka topic the message goes to")]
    EmptyTopic,
    /// The topic breaks Kafka's naming rules.
    #[error("invalid topic name {topic:?}: a Kafka topic name is 1 to 249 characters of ASCII letters, digits, '.', '_' and '-', and is not '.' or '..'")]
    InvalidTopic {
        /// The refused name.
        topic: String,
    },
    /// The payload exceeds the configured maximum.
    #[error("payload of {size} bytes exceeds the maximum of {max} bytes: send a reference to the data instead, or raise max_payload_bytes together with the broker's message.max.bytes")]
    PayloadTooLarge {
        /// The payload's size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A header name is empty, too long or holds control characters.
    #[error("invalid header name {name:?}: a header name is 1 to 255 characters with no control characters")]
    InvalidHeaderName {
        /// The refused name.
        name: String,
    },
    /// A header name is one the envelope sets.
    #[error("header name {name:?} is reserved for the message envelope: use correlation_id()/traceparent(); ce_* and content-type are set by the relay")]
    ReservedHeaderName {
        /// The refused name.
        name: String,
    },
    /// A field that must be text is not valid UTF-8.
    #[error("{field} is not valid UTF-8: it must be text")]
    NotUtf8 {
        /// Which field.
        field: &'static str,
    },
    /// A text field holds a NUL character, which PostgreSQL text cannot store.
    #[error("{field} contains a NUL character, which PostgreSQL text cannot store")]
    NulInText {
        /// Which field.
        field: &'static str,
    },
    /// The message type is empty, too long or holds control characters.
    #[error("invalid message type: 1 to 255 characters with no control characters")]
    InvalidMessageType,
    /// The correlation id is empty, too long or holds control characters.
    #[error("invalid correlation id: 1 to 255 characters with no control characters")]
    InvalidCorrelationId,
    /// The traceparent is not a W3C traceparent.
    #[error("invalid traceparent {value:?}: expected 00-<32 hex trace id>-<16 hex span id>-<2 hex flags>, lowercase, ids not all zero")]
    InvalidTraceparent {
        /// The refused value.
        value: String,
    },
    /// The idempotency key is empty or longer than 1024 characters.
    #[error("invalid idempotency key: 1 to 1024 characters")]
    InvalidIdempotencyKey,
    /// The payload could not be serialised as JSON.
    #[error("payload could not be serialised as JSON: {0}")]
    Json(String),
}

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

/// A message ready to be enqueued. Build one with [`OutboxMessage::builder`].
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxMessage {
    topic: String,
    key: Option<String>,
    payload: Option<Vec<u8>>,
    content_type: &'static str,
    headers: BTreeMap<String, String>,
    message_type: Option<String>,
    correlation_id: Option<String>,
    traceparent: Option<String>,
    idempotency_key: Option<String>,
}

impl OutboxMessage {
    /// Starts a message for `topic`.
    pub fn builder(topic: impl Into<String>) -> OutboxMessageBuilder {
        OutboxMessageBuilder {
            message: OutboxMessage {
                topic: topic.into(),
                key: None,
                payload: None,
                content_type: CONTENT_TYPE_BYTES,
                headers: BTreeMap::new(),
                message_type: None,
                correlation_id: None,
                traceparent: None,
                idempotency_key: None,
            },
            error: None,
        }
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The key (the Kafka key, and what per-key order is kept by).
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The payload.
    pub fn payload(&self) -> Option<&[u8]> {
        self.payload.as_deref()
    }

    /// The id this message will have: derived from its idempotency key when it has one.
    fn id(&self) -> Uuid {
        match &self.idempotency_key {
            Some(k) => idempotent_id(k),
            None => Uuid::now_v7(),
        }
    }
}

/// The id the writer gives a message enqueued with `idempotency_key` (UUIDv5).
pub fn idempotent_id(idempotency_key: &str) -> Uuid {
    Uuid::new_v5(&IDEMPOTENCY_NAMESPACE, idempotency_key.as_bytes())
}

/// Builds an [`OutboxMessage`]; [`build`](Self::build) reports the first invalid field.
#[derive(Debug)]
#[must_use]
pub struct OutboxMessageBuilder {
    message: OutboxMessage,
    error: Option<InvalidMessage>,
}

impl OutboxMessageBuilder {
    fn fail(&mut self, e: InvalidMessage) {
        self.error.get_or_insert(e);
    }

    fn text(&mut self, field: &'static str, bytes: &[u8]) -> Option<String> {
        match std::str::from_utf8(bytes) {
            Ok(s) => Some(s.to_owned()),
            Err(_) => {
                self.fail(InvalidMessage::NotUtf8 { field });
                None
            }
        }
    }

    /// The Kafka key; messages with the same key reach Kafka in the order they were written.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.message.key = Some(key.into());
        self
    }

    /// The key given as bytes, which must be UTF-8 text.
    pub fn key_bytes(mut self, key: &[u8]) -> Self {
        self.message.key = self.text("key", key);
        self
    }

    /// The payload as raw bytes (`content-type: application/octet-stream`).
    pub fn payload(mut self, payload: impl Into<Vec<u8>>) -> Self {
        self.message.payload = Some(payload.into());
        self.message.content_type = CONTENT_TYPE_BYTES;
        self
    }

    /// The payload as any `Serialize` value, encoded as JSON (`content-type: application/json`).
    pub fn json<T: serde::Serialize + ?Sized>(mut self, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(bytes) => {
                self.message.payload = Some(bytes);
                self.message.content_type = CONTENT_TYPE_JSON;
            }
            Err(e) => self.fail(InvalidMessage::Json(e.to_string())),
        }
        self
    }

    /// The message type (the CloudEvents `ce_type`), e.g. `com.example.order.paid`.
    pub fn message_type(mut self, message_type: impl Into<String>) -> Self {
        self.message.message_type = Some(message_type.into());
        self
    }

    /// A header of the writer's own, sent as a Kafka header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.message.headers.insert(name.into(), value.into());
        self
    }

    /// A header given as bytes; both name and value must be UTF-8 text.
    pub fn header_bytes(mut self, name: &[u8], value: &[u8]) -> Self {
        if let (Some(n), Some(v)) = (self.text("header name", name), self.text("header value", value)) {
            self.message.headers.insert(n, v);
        }
        self
    }

    /// The correlation id, carried in the `correlation_id` header.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.message.correlation_id = Some(id.into());
        self
    }

    /// A W3C `traceparent` to carry the writer's trace into the consumers.
    pub fn traceparent(mut self, traceparent: impl Into<String>) -> Self {
        self.message.traceparent = Some(traceparent.into());
        self
    }

    /// Derives the message id from a business request's idempotency key: enqueueing the same key
    /// again is a no-op that returns the same id.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.message.idempotency_key = Some(key.into());
        self
    }

    /// Checks every field and returns the message, or the first reason it is invalid.
    pub fn build(self) -> Result<OutboxMessage, InvalidMessage> {
        if let Some(e) = self.error {
            return Err(e);
        }
        validate(&self.message)?;
        Ok(self.message)
    }
}

fn short_text_ok(s: &str) -> bool {
    !s.is_empty() && s.chars().count() <= 255 && !s.chars().any(char::is_control)
}

fn no_nul(field: &'static str, s: &str) -> Result<(), InvalidMessage> {
    if s.contains('\0') {
        Err(InvalidMessage::NulInText { field })
    } else {
        Ok(())
    }
}

/// Kafka's topic naming rules.
pub fn validate_topic(topic: &str) -> Result<(), InvalidMessage> {
    if topic.is_empty() {
        return Err(InvalidMessage::EmptyTopic);
    }
    let legal = topic.len() <= 249
        && topic.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && topic != "."
        && topic != "..";
    if legal {
        Ok(())
    } else {
        Err(InvalidMessage::InvalidTopic { topic: topic.chars().take(300).collect() })
    }
}

fn validate_traceparent(tp: &str) -> bool {
    let parts: Vec<&str> = tp.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    parts.len() == 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && parts[1].bytes().any(|b| b != b'0')
        && hex(parts[2], 16)
        && parts[2].bytes().any(|b| b != b'0')
        && hex(parts[3], 2)
}

fn validate(m: &OutboxMessage) -> Result<(), InvalidMessage> {
    validate_topic(&m.topic)?;
    if let Some(k) = &m.key {
        no_nul("key", k)?;
    }
    for (name, value) in &m.headers {
        if !short_text_ok(name) {
            return Err(InvalidMessage::InvalidHeaderName { name: name.chars().take(300).collect() });
        }
        if is_reserved_header(name) {
            return Err(InvalidMessage::ReservedHeaderName { name: name.clone() });
        }
        no_nul("header value", value)?;
    }
    if let Some(t) = &m.message_type {
        if !short_text_ok(t) {
            return Err(InvalidMessage::InvalidMessageType);
        }
    }
    if let Some(c) = &m.correlation_id {
        if !short_text_ok(c) {
            return Err(InvalidMessage::InvalidCorrelationId);
        }
    }
    if let Some(tp) = &m.traceparent {
        if !validate_traceparent(tp) {
            return Err(InvalidMessage::InvalidTraceparent { value: tp.chars().take(100).collect() });
        }
    }
    if let Some(k) = &m.idempotency_key {
        if k.is_empty() || k.chars().count() > 1024 {
            return Err(InvalidMessage::InvalidIdempotencyKey);
        }
        no_nul("idempotency key", k)?;
    }
    Ok(())
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
            insert_sql: schema.qualify(include_str!("sql/enqueue_batch.sql")),
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
