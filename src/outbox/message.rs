//! A message as a writer builds it: [`OutboxMessage`] and its builder, the content types, and the
//! id an idempotency key gives.

use std::collections::BTreeMap;

use uuid::Uuid;

use super::validate::validate;
use super::{InvalidMessage, IDEMPOTENCY_NAMESPACE};

/// Content type of payloads given as bytes.
pub const CONTENT_TYPE_BYTES: &str = "application/octet-stream";
/// Content type of payloads given as JSON.
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// A message ready to be enqueued. Build one with [`OutboxMessage::builder`].
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxMessage {
    pub(super) topic: String,
    pub(super) key: Option<String>,
    pub(super) payload: Option<Vec<u8>>,
    pub(super) content_type: &'static str,
    pub(super) headers: BTreeMap<String, String>,
    pub(super) message_type: Option<String>,
    pub(super) correlation_id: Option<String>,
    pub(super) traceparent: Option<String>,
    pub(super) idempotency_key: Option<String>,
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
    pub(super) fn id(&self) -> Uuid {
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
