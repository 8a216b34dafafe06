//! The Kafka record a row becomes: CloudEvents binary content mode in headers, the W3C
//! `traceparent`, the correlation id, and the writer's own headers.

use rdkafka::message::{Header, OwnedHeaders};

use super::lane_session::ClaimedRow;

/// CloudEvents spec version written in `ce_specversion`.
pub const CE_SPECVERSION: &str = "1.0";
pub use crate::outbox::{ID_HEADER, LANE_HEADER, SEQ_HEADER};

/// A record for `topic` with its headers, and a key and a payload when there are (a record
/// without a payload is a tombstone; without a key, the partitioner spreads it). For the
/// producers that await each acknowledgement (the DLQ mirror, `dlq replay --inbox`).
pub fn record<'a>(
    topic: &'a str,
    key: Option<&'a [u8]>,
    payload: Option<&'a [u8]>,
    headers: OwnedHeaders,
) -> rdkafka::producer::FutureRecord<'a, [u8], [u8]> {
    rdkafka::producer::FutureRecord { topic, partition: None, payload, key, timestamp: None, headers: Some(headers) }
}

/// The same record for the relay's own producer, carrying the number its delivery report is
/// routed by (`relay::reports`).
pub(crate) fn routed_record<'a>(
    topic: &'a str,
    key: Option<&'a [u8]>,
    payload: Option<&'a [u8]>,
    headers: OwnedHeaders,
    delivery_opaque: usize,
) -> rdkafka::producer::BaseRecord<'a, [u8], [u8], usize> {
    rdkafka::producer::BaseRecord {
        topic,
        partition: None,
        payload,
        key,
        timestamp: None,
        headers: Some(headers),
        delivery_opaque,
    }
}

/// Builds the headers of one row's record.
pub fn headers(row: &ClaimedRow, source: &str) -> OwnedHeaders {
    with_traceparent(row, source, row.traceparent.as_deref())
}

/// Builds the headers of one row's record with `traceparent` (the relay's span, when it traces
/// the row) in place of the writer's.
pub fn with_traceparent(row: &ClaimedRow, source: &str, traceparent: Option<&str>) -> OwnedHeaders {
    let time = row.created_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let id = row.id.hyphenated().to_string();
    let ce_type = row.message_type.as_deref().unwrap_or(&row.topic);
    let content_type = row.content_type.as_deref().unwrap_or(crate::outbox::CONTENT_TYPE_BYTES);
    let lane = row.lane.to_string();
    let seq = row.seq.to_string();
    let mut h = OwnedHeaders::new_with_capacity(10 + row.headers.len())
        .insert(Header { key: "ce_specversion", value: Some(CE_SPECVERSION) })
        .insert(Header { key: ID_HEADER, value: Some(id.as_str()) })
        .insert(Header { key: "ce_source", value: Some(source) })
        .insert(Header { key: "ce_type", value: Some(ce_type) })
        .insert(Header { key: "ce_time", value: Some(time.as_str()) })
        .insert(Header { key: "content-type", value: Some(content_type) })
        .insert(Header { key: LANE_HEADER, value: Some(lane.as_str()) })
        .insert(Header { key: SEQ_HEADER, value: Some(seq.as_str()) });
    if let Some(tp) = traceparent {
        h = h.insert(Header { key: "traceparent", value: Some(tp) });
    }
    if let Some(c) = &row.correlation_id {
        h = h.insert(Header { key: "correlation_id", value: Some(c.as_str()) });
    }
    for (k, v) in &row.headers {
        h = h.insert(Header { key: k.as_str(), value: Some(v.as_str()) });
    }
    h
}
