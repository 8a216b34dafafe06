//! The rules a message must meet, the same as the SQL functions `enqueue` / `enqueue_json` check
//! (SQLSTATEs OB001-OB007): refused before anything is sent.

use super::OutboxMessage;

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

pub(super) fn validate(m: &OutboxMessage) -> Result<(), InvalidMessage> {
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
