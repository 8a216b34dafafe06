//! One classification of every error the product meets, made where the error enters: retry it,
//! or not. The tables are documented in ARCHITECTURE.md; keep the two in step.

use tokio_postgres::error::SqlState;

/// What to do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Transient: try again later (with backoff).
    Retry,
    /// Will fail the same way every time: stop trying, dead-letter or report.
    Permanent,
    /// Nothing was wrong with the record: the relay's own producer was replaced under it (see
    /// `relay::producer`). Send it again at once; no attempt is counted.
    Resend,
}

/// An error, classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classified {
    /// Retry or not.
    pub disposition: Disposition,
    /// A short, stable label for logs and metrics (`kafka.timeout`, `pg.connection`, ...).
    pub class: &'static str,
    /// Whether the error says the broker (not this message) is unhealthy: feeds the breaker.
    pub blames_broker: bool,
    /// For permanent message errors, the dead-letter reason.
    pub reason: &'static str,
}

const fn retry(class: &'static str, blames_broker: bool) -> Classified {
    Classified { disposition: Disposition::Retry, class, blames_broker, reason: "retries_exhausted" }
}

const fn permanent(class: &'static str, reason: &'static str) -> Classified {
    Classified { disposition: Disposition::Permanent, class, blames_broker: false, reason }
}

/// Dead-letter reasons.
pub mod reason {
    /// The row breaks the message rules (bad topic, bad headers), written by raw SQL.
    pub const MALFORMED_ROW: &str = "malformed_row";
    /// The record exceeds the producer's or the broker's size limit.
    pub const MESSAGE_TOO_LARGE: &str = "message_too_large";
    /// The topic does not exist and is not created automatically.
    pub const UNKNOWN_TOPIC: &str = "unknown_topic";
    /// The topic name is refused by the broker.
    pub const INVALID_TOPIC: &str = "invalid_topic";
    /// The relay's credentials may not write to the topic.
    pub const TOPIC_AUTHORIZATION: &str = "topic_authorization";
    /// The broker refused this record (corrupt, invalid, policy).
    pub const RECORD_REJECTED: &str = "record_rejected";
    /// Every allowed attempt failed with retryable errors.
    pub const RETRIES_EXHAUSTED: &str = "retries_exhausted";
    /// The row is older than the configured maximum age.
    pub const MAX_AGE_EXCEEDED: &str = "max_age_exceeded";
}

/// A row that can never be sent as written (bad headers JSON, an invalid topic name, written by
/// raw SQL): dead-lettered at once.
pub const fn malformed_row() -> Classified {
    permanent("row.malformed", reason::MALFORMED_ROW)
}

/// Why a consumer dead-lettered a message (`inbox_dead_letters.reason`).
pub mod inbox_reason {
    /// The message's id was processed before with another payload.
    pub const CONFLICTING_PAYLOAD: &str = "conflicting_payload";
    /// The handler kept failing (a poison message).
    pub const HANDLER_FAILED: &str = "handler_failed";
    /// The message has no id header.
    pub const MISSING_ID: &str = "missing_id";
    /// The id header is not a UUID.
    pub const INVALID_ID: &str = "invalid_id";
}

/// Classifies a librdkafka error code.
#[cfg(feature = "kafka")]
pub fn kafka_code(code: rdkafka::types::RDKafkaErrorCode) -> Classified {
    use rdkafka::types::RDKafkaErrorCode as C;
    match code {
        // This message can never be written as it is.
        C::MessageSizeTooLarge | C::InvalidMessageSize | C::MessageBatchTooLarge => {
            permanent("kafka.message_too_large", reason::MESSAGE_TOO_LARGE)
        }
        C::UnknownTopic | C::UnknownTopicOrPartition | C::UnknownTopicId | C::UnknownPartition => {
            permanent("kafka.unknown_topic", reason::UNKNOWN_TOPIC)
        }
        C::InvalidTopic => permanent("kafka.invalid_topic", reason::INVALID_TOPIC),
        C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed => {
            permanent("kafka.authorization", reason::TOPIC_AUTHORIZATION)
        }
        C::InvalidMessage
        | C::InvalidRecord
        | C::PolicyViolation
        | C::InvalidTimestamp
        | C::UnsupportedForMessageFormat
        | C::BadMessage
        | C::InvalidArgument
        | C::InvalidRequiredAcks => permanent("kafka.record_rejected", reason::RECORD_REJECTED),
        // The broker or the path to it is unhealthy: the message itself is fine.
        C::MessageTimedOut | C::TimedOutQueue | C::RequestTimedOut | C::OperationTimedOut => {
            retry("kafka.timeout", true)
        }
        C::BrokerTransportFailure
        | C::AllBrokersDown
        | C::NetworkException
        | C::BrokerNotAvailable
        | C::Resolve
        | C::SSL
        | C::Authentication
        | C::SaslAuthenticationFailed => retry("kafka.transport", true),
        C::NotLeaderForPartition
        | C::LeaderNotAvailable
        | C::FencedLeaderEpoch
        | C::UnknownLeaderEpoch
        | C::NotEnoughReplicas
        | C::NotEnoughReplicasAfterAppend
        | C::KafkaStorageError
        | C::ReplicaNotAvailable => retry("kafka.leader", true),
        C::ThrottlingQuotaExceeded | C::QueueFull => retry("kafka.throttled", true),
        // Purged by the relay when it retired a producer, or refused by a producer that failed for
        // good and is being replaced.
        C::PurgeQueue | C::PurgeInflight | C::Fatal | C::GaplessGuarantee => Classified {
            disposition: Disposition::Resend,
            class: "kafka.producer_replaced",
            blames_broker: false,
            reason: reason::RETRIES_EXHAUSTED,
        },
        _ => retry("kafka.other", false),
    }
}

/// The relay's producer failed for good for a reason of its own (not a refused record): the broker
/// or the relay's permissions are at fault, so it is retried with backoff and feeds the breaker.
#[cfg(feature = "kafka")]
pub fn producer_failed() -> Classified {
    retry("kafka.producer_failed", true)
}

/// Classifies an rdkafka error.
#[cfg(feature = "kafka")]
pub fn kafka(e: &rdkafka::error::KafkaError) -> Classified {
    match e.rdkafka_error_code() {
        Some(code) => kafka_code(code),
        None => retry("kafka.other", false),
    }
}

/// Classifies a PostgreSQL error by its SQLSTATE (no code: the connection is gone).
pub fn postgres(e: &tokio_postgres::Error) -> Classified {
    let Some(code) = e.code() else {
        return retry("pg.connection", false);
    };
    let s = code.code();
    if s.starts_with("08")
        || code == &SqlState::ADMIN_SHUTDOWN
        || code == &SqlState::CRASH_SHUTDOWN
        || code == &SqlState::CANNOT_CONNECT_NOW
    {
        retry("pg.connection", false)
    } else if code == &SqlState::T_R_SERIALIZATION_FAILURE || code == &SqlState::T_R_DEADLOCK_DETECTED {
        retry("pg.conflict", false)
    } else if code == &SqlState::QUERY_CANCELED || code == &SqlState::LOCK_NOT_AVAILABLE {
        retry("pg.timeout", false)
    } else if s.starts_with("53") || s.starts_with("58") {
        retry("pg.resources", false)
    } else if s.starts_with("23") {
        permanent("pg.constraint", "")
    } else if s.starts_with("22") {
        permanent("pg.data", "")
    } else if s.starts_with("42") {
        permanent("pg.privilege_or_schema", "")
    } else {
        permanent("pg.other", "")
    }
}

/// A PostgreSQL error for logs and operators: the server's SQLSTATE and message when it sent
/// one (the driver's own text says only "db error"), else the driver's.
pub fn describe_postgres(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} {}", d.code().code(), d.message()),
        None => e.to_string(),
    }
}

#[cfg(all(test, feature = "kafka"))]
mod tests {
    use super::*;
    use rdkafka::types::RDKafkaErrorCode as C;

    #[test]
    fn kafka_codes_split_as_documented() {
        for c in [
            C::MessageSizeTooLarge,
            C::UnknownTopicOrPartition,
            C::UnknownTopic,
            C::InvalidTopic,
            C::TopicAuthorizationFailed,
            C::InvalidRecord,
        ] {
            assert_eq!(kafka_code(c).disposition, Disposition::Permanent, "{c:?}");
        }
        for c in [
            C::MessageTimedOut,
            C::BrokerTransportFailure,
            C::AllBrokersDown,
            C::NotLeaderForPartition,
            C::QueueFull,
            C::ThrottlingQuotaExceeded,
            C::RequestTimedOut,
        ] {
            let k = kafka_code(c);
            assert_eq!(k.disposition, Disposition::Retry, "{c:?}");
            assert!(k.blames_broker, "{c:?} says the broker is unhealthy");
        }
        assert_eq!(kafka_code(C::MessageSizeTooLarge).reason, reason::MESSAGE_TOO_LARGE);
    }
}
