//! Dead letters: list, show, export, replay, discard; re-publishing the consumers'.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::types::ToSql;
use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::{Filter, OpsError, Source};
use crate::schema::SchemaName;

/// One dead letter, as listed and exported.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterView {
    /// Id (message UUID, or the inbox dead letter's number).
    pub id: String,
    /// Message id.
    pub message_id: Option<Uuid>,
    /// Consumer (inbox only).
    pub consumer: Option<String>,
    /// Topic.
    pub topic: String,
    /// Key.
    pub key: Option<String>,
    /// Why.
    pub reason: String,
    /// Error class (relay only).
    pub error_class: Option<String>,
    /// The last error.
    pub error: Option<String>,
    /// Attempts made.
    pub attempts: i32,
    /// When it was written (relay) or consumed at (inbox partition/offset).
    pub created_at: Option<DateTime<Utc>>,
    /// When it was dead-lettered.
    pub dead_lettered_at: DateTime<Utc>,
    /// Kafka partition (inbox).
    pub partition: Option<i32>,
    /// Kafka offset (inbox).
    pub offset: Option<i64>,
    /// Payload size in bytes.
    pub payload_bytes: Option<i32>,
    /// Headers.
    pub headers: serde_json::Value,
    /// Payload, included by `show` and `export` only (UTF-8 text, or `base64:` and the bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
}

fn payload_text(p: Option<Vec<u8>>) -> Option<String> {
    p.map(|bytes| match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => format!("hex:{}", e.into_bytes().iter().map(|b| format!("{b:02x}")).collect::<String>()),
    })
}

/// Lists dead letters, newest first (`with_payload` for show and export).
pub async fn list(
    client: &impl GenericClient,
    schema: &SchemaName,
    source: Source,
    filter: &Filter,
    limit: i64,
    with_payload: bool,
) -> Result<Vec<DeadLetterView>, OpsError> {
    filter.validate(source)?;
    let (cond, params) = filter.sql(source);
    let n = params.len();
    let template = match source {
        Source::Relay => include_str!("../sql/list_dead_letters.sql"),
        Source::Inbox => include_str!("../sql/list_inbox_dead_letters.sql"),
    };
    let sql = schema.qualify(template).replace("__FILTER__", &shift(&cond, 2));
    let mut all: Vec<&(dyn ToSql + Sync)> = vec![&limit, &with_payload];
    all.extend(params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)));
    debug_assert_eq!(all.len(), n + 2);
    let rows = client.query(&sql, &all).await?;
    Ok(rows
        .iter()
        .map(|r| DeadLetterView {
            id: r.get("id"),
            message_id: r.get("message_id"),
            consumer: r.get("consumer"),
            topic: r.get("topic"),
            key: r.get("key"),
            reason: r.get("reason"),
            error_class: r.get("error_class"),
            error: r.get("error"),
            attempts: r.get("attempts"),
            created_at: r.get("created_at"),
            dead_lettered_at: r.get("dead_lettered_at"),
            partition: r.get("kafka_partition"),
            offset: r.get("kafka_offset"),
            payload_bytes: r.get("payload_bytes"),
            headers: r.get("headers"),
            payload: payload_text(r.get("payload")),
        })
        .collect())
}

/// Renumbers `$n` placeholders by `by` (the filter's come after fixed parameters).
fn shift(cond: &str, by: usize) -> String {
    let mut out = String::with_capacity(cond.len());
    let mut chars = cond.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' {
            let mut digits = String::new();
            while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                digits.push(*d);
                chars.next();
            }
            let n: usize = digits.parse().unwrap_or(0);
            out.push_str(&format!("${}", n + by));
        } else {
            out.push(c);
        }
    }
    out
}

/// Who did it and why, for the audit log.
#[derive(Debug, Clone)]
pub struct Audit {
    /// Who.
    pub actor: String,
    /// Why (optional).
    pub why: Option<String>,
}

/// Puts relay dead letters back into the outbox with the same id (consumers dedup) and their
/// original sequence number (so they go before later messages of their key), attempts reset,
/// unparks their keys and writes audit rows; all in one transaction. Returns the ids replayed.
pub async fn replay_relay(
    client: &mut tokio_postgres::Client,
    schema: &SchemaName,
    ids: &[Uuid],
    audit: &Audit,
) -> Result<Vec<Uuid>, OpsError> {
    let tx = client.transaction().await?;
    let rows = tx
        .query(&schema.qualify(include_str!("../sql/replay_dead_letters.sql")), &[&ids, &audit.actor, &audit.why])
        .await?;
    tx.commit().await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Deletes dead letters (relay or inbox), unparking keys, with an audit row each (the record of
/// what was discarded: topic, key, reason, attempts, payload size and digest; not the payload).
pub async fn discard(
    client: &mut tokio_postgres::Client,
    schema: &SchemaName,
    source: Source,
    ids: &[String],
    audit: &Audit,
) -> Result<u64, OpsError> {
    let tx = client.transaction().await?;
    let n = match source {
        Source::Relay => {
            let ids: Vec<Uuid> = ids.iter().filter_map(|i| Uuid::parse_str(i).ok()).collect();
            let gone = tx
                .query(
                    &schema.qualify(include_str!("../sql/discard_dead_letters.sql")),
                    &[&ids, &audit.actor, &audit.why],
                )
                .await?;
            // Rows of an unparked key sit below the relay's claim cursor: announce them, as a
            // late row's insert does.
            let keys: Vec<String> = gone.iter().filter_map(|r| r.get::<_, Option<String>>("key")).collect();
            if !keys.is_empty() {
                tx.query(&schema.qualify(include_str!("../sql/announce_keys.sql")), &[&schema.notify_channel(), &keys])
                    .await?;
            }
            gone.len()
        }
        Source::Inbox => {
            let ids: Vec<i64> = ids.iter().filter_map(|i| i.parse().ok()).collect();
            tx.query(
                &schema.qualify(include_str!("../sql/discard_inbox_dead_letters.sql")),
                &[&ids, &audit.actor, &audit.why],
            )
            .await?
            .len()
        }
    };
    tx.commit().await?;
    Ok(n as u64)
}

/// An inbox dead letter to re-publish.
#[derive(Debug, Clone)]
pub struct Republish {
    /// Its id.
    pub dead_letter_id: i64,
    /// Original topic.
    pub topic: String,
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Headers (as received).
    pub headers: Vec<(String, String)>,
    /// Payload.
    pub payload: Option<Vec<u8>>,
}

/// Reads inbox dead letters for re-publishing.
pub async fn inbox_for_replay(
    client: &impl GenericClient,
    schema: &SchemaName,
    ids: &[i64],
) -> Result<Vec<Republish>, OpsError> {
    let rows = client.query(&schema.qualify(include_str!("../sql/inbox_for_replay.sql")), &[&ids]).await?;
    Ok(rows
        .iter()
        .map(|r| {
            let headers: serde_json::Value = r.get("headers");
            Republish {
                dead_letter_id: r.get("dead_letter_id"),
                topic: r.get("topic"),
                key: r.get("key"),
                headers: headers
                    .as_object()
                    .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned())).collect())
                    .unwrap_or_default(),
                payload: r.get("payload"),
            }
        })
        .collect())
}

/// Marks an inbox dead letter replayed (after the broker acknowledged its re-publication).
pub async fn inbox_replayed(
    client: &mut tokio_postgres::Client,
    schema: &SchemaName,
    id: i64,
    to_topic: &str,
    audit: &Audit,
) -> Result<(), OpsError> {
    let tx = client.transaction().await?;
    tx.execute(&schema.qualify(include_str!("../sql/inbox_replayed.sql")), &[&id, &audit.actor, &audit.why, &to_topic])
        .await?;
    tx.commit().await?;
    Ok(())
}
