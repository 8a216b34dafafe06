//! What the operator commands read and change: dead letters (list, show, replay, discard,
//! export), the status of the relay, and where one message is. Every replay and discard writes an
//! audit row in the same transaction as the change.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::types::ToSql;
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::schema::SchemaName;

/// Which dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The relay's (`dead_letters`), ids are message UUIDs.
    Relay,
    /// The consumers' (`inbox_dead_letters`), ids are numbers.
    Inbox,
}

/// A bad filter or argument, said so the operator can fix it.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// An argument cannot be used.
    #[error("{0}")]
    BadArgument(String),
    /// Nothing matched an explicit id.
    #[error("no {which} dead letter with id {id}: check `outbox-relay dlq list{flag}`", which = match .kind { Source::Relay => "relay", Source::Inbox => "inbox" }, flag = match .kind { Source::Relay => "", Source::Inbox => " --inbox" })]
    UnknownId {
        /// Which dead letters.
        kind: Source,
        /// The id.
        id: String,
    },
    /// The database refused.
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// Filters for dead letters.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this topic.
    pub topic: Option<String>,
    /// Only this key.
    pub key: Option<String>,
    /// Only this reason.
    pub reason: Option<String>,
    /// Dead-lettered at or after.
    pub since: Option<DateTime<Utc>>,
    /// Dead-lettered before.
    pub until: Option<DateTime<Utc>>,
    /// Only these ids (UUIDs for relay dead letters, numbers for inbox ones).
    pub ids: Vec<String>,
    /// Only this consumer (inbox).
    pub consumer: Option<String>,
}

impl Filter {
    /// Checks the filter for `source`; errors say what is wrong.
    pub fn validate(&self, source: Source) -> Result<(), OpsError> {
        if let (Some(a), Some(b)) = (self.since, self.until) {
            if a >= b {
                return Err(OpsError::BadArgument(format!("bad time range: --since {a} is not before --until {b}")));
            }
        }
        for id in &self.ids {
            let ok = match source {
                Source::Relay => Uuid::parse_str(id).is_ok(),
                Source::Inbox => id.parse::<i64>().is_ok(),
            };
            if !ok {
                return Err(OpsError::BadArgument(match source {
                    Source::Relay => format!("--id {id:?} is not a message id (a UUID such as 01a2...-7...)"),
                    Source::Inbox => {
                        format!("--id {id:?} is not an inbox dead-letter id (a number; see dlq list --inbox)")
                    }
                }));
            }
        }
        if self.consumer.is_some() && source == Source::Relay {
            return Err(OpsError::BadArgument("--consumer filters inbox dead letters: add --inbox".into()));
        }
        Ok(())
    }

    /// The WHERE clause and its parameters.
    fn sql(&self, source: Source) -> (String, Vec<Box<dyn ToSql + Sync + Send>>) {
        let mut cond = vec!["true".to_owned()];
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let mut add = |c: &str, p: Box<dyn ToSql + Sync + Send>, params: &mut Vec<Box<dyn ToSql + Sync + Send>>| {
            params.push(p);
            cond.push(c.replace('?', &format!("${}", params.len())));
        };
        if let Some(t) = &self.topic {
            add("topic = ?", Box::new(t.clone()), &mut params);
        }
        if let Some(k) = &self.key {
            match source {
                Source::Relay => add("key = ?", Box::new(k.clone()), &mut params),
                Source::Inbox => add("key = convert_to(?, 'UTF8')", Box::new(k.clone()), &mut params),
            }
        }
        if let Some(r) = &self.reason {
            add("reason = ?", Box::new(r.clone()), &mut params);
        }
        if let Some(s) = self.since {
            add("dead_lettered_at >= ?", Box::new(s), &mut params);
        }
        if let Some(u) = self.until {
            add("dead_lettered_at < ?", Box::new(u), &mut params);
        }
        if let Some(c) = &self.consumer {
            add("consumer = ?", Box::new(c.clone()), &mut params);
        }
        if !self.ids.is_empty() {
            match source {
                Source::Relay => {
                    let ids: Vec<Uuid> = self.ids.iter().filter_map(|i| Uuid::parse_str(i).ok()).collect();
                    add("id = ANY(?)", Box::new(ids), &mut params);
                }
                Source::Inbox => {
                    let ids: Vec<i64> = self.ids.iter().filter_map(|i| i.parse().ok()).collect();
                    add("dead_letter_id = ANY(?)", Box::new(ids), &mut params);
                }
            }
        }
        (cond.join(" AND "), params)
    }
}

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
    let sql = match source {
        Source::Relay => format!(
            "SELECT id::text, id, NULL::text, topic, key, reason, error_class, last_error, attempts, created_at,
                    dead_lettered_at, NULL::int, NULL::bigint, octet_length(payload), headers,
                    CASE WHEN $2 THEN payload END
             FROM {}.dead_letters WHERE {} ORDER BY dead_lettered_at DESC, seq DESC LIMIT $1",
            schema.ident(),
            shift(&cond, 2)
        ),
        Source::Inbox => format!(
            "SELECT dead_letter_id::text, message_id, consumer, topic, encode(key, 'escape'), reason, NULL::text, error,
                    attempts, NULL::timestamptz, dead_lettered_at, kafka_partition, kafka_offset, octet_length(payload), headers,
                    CASE WHEN $2 THEN payload END
             FROM {}.inbox_dead_letters WHERE {} ORDER BY dead_lettered_at DESC, dead_letter_id DESC LIMIT $1",
            schema.ident(),
            shift(&cond, 2)
        ),
    };
    let mut all: Vec<&(dyn ToSql + Sync)> = vec![&limit, &with_payload];
    all.extend(params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)));
    debug_assert_eq!(all.len(), n + 2);
    let rows = client.query(&sql, &all).await?;
    Ok(rows
        .iter()
        .map(|r| DeadLetterView {
            id: r.get(0),
            message_id: r.get(1),
            consumer: r.get(2),
            topic: r.get(3),
            key: r.get(4),
            reason: r.get(5),
            error_class: r.get(6),
            error: r.get(7),
            attempts: r.get(8),
            created_at: r.get(9),
            dead_lettered_at: r.get(10),
            partition: r.get(11),
            offset: r.get(12),
            payload_bytes: r.get(13),
            headers: r.get(14),
            payload: payload_text(r.get(15)),
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
        .query(&schema.qualify(include_str!("sql/replay_dead_letters.sql")), &[&ids, &audit.actor, &audit.why])
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
                .query(&schema.qualify(include_str!("sql/discard_dead_letters.sql")), &[&ids, &audit.actor, &audit.why])
                .await?;
            // Rows of an unparked key sit below the relay's claim cursor: announce them, as a
            // late row's insert does.
            let keys: Vec<String> = gone.iter().filter_map(|r| r.get::<_, Option<String>>("key")).collect();
            if !keys.is_empty() {
                tx.query(&schema.qualify(include_str!("sql/announce_keys.sql")), &[&schema.notify_channel(), &keys])
                    .await?;
            }
            gone.len()
        }
        Source::Inbox => {
            let ids: Vec<i64> = ids.iter().filter_map(|i| i.parse().ok()).collect();
            tx.query(
                &schema.qualify(include_str!("sql/discard_inbox_dead_letters.sql")),
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
    let rows = client
        .query(
            &schema.qualify(
                "SELECT dead_letter_id, topic, key, headers, payload FROM __SCHEMA__.inbox_dead_letters
                 WHERE dead_letter_id = ANY($1) ORDER BY dead_letter_id",
            ),
            &[&ids],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let headers: serde_json::Value = r.get(3);
            Republish {
                dead_letter_id: r.get(0),
                topic: r.get(1),
                key: r.get(2),
                headers: headers
                    .as_object()
                    .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned())).collect())
                    .unwrap_or_default(),
                payload: r.get(4),
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
    tx.execute(
        &schema.qualify(
            "WITH d AS (DELETE FROM __SCHEMA__.inbox_dead_letters WHERE dead_letter_id = $1 RETURNING *)
             INSERT INTO __SCHEMA__.audit_log (actor, action, source, target, why, details)
             SELECT $2, 'replay', 'inbox', d.dead_letter_id::text, $3,
                    jsonb_build_object('consumer', d.consumer, 'message_id', d.message_id, 'topic', d.topic,
                                       'republished_to', $4::text, 'reason', d.reason, 'attempts', d.attempts)
             FROM d",
        ),
        &[&id, &audit.actor, &audit.why, &to_topic],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The relay's state, for `status`.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Pending rows.
    pub backlog: i64,
    /// Age of the oldest pending row, in seconds.
    pub oldest_pending_seconds: f64,
    /// Rows waiting for a retry.
    pub waiting_for_retry: i64,
    /// Backlog per topic and lane.
    pub backlog_by_topic_and_lane: Vec<BacklogRow>,
    /// Dead letters by reason.
    pub dead_letters_by_reason: Vec<(String, i64)>,
    /// Inbox dead letters by consumer and reason.
    pub inbox_dead_letters: Vec<(String, String, i64)>,
    /// Live instances.
    pub instances: Vec<InstanceRow>,
    /// Keys parked under `park-key`.
    pub parked_keys: Vec<(String, Uuid)>,
    /// Lanes nobody owns.
    pub unowned_lanes: Vec<i16>,
    /// Dead row versions in the outbox table.
    pub outbox_dead_tuples: i64,
    /// What holds back the oldest snapshots on the database (at most 3, oldest first).
    pub oldest_snapshots: Vec<crate::horizon::SnapshotHolder>,
}

/// Backlog of one topic in one lane.
#[derive(Debug, Serialize)]
pub struct BacklogRow {
    /// Topic.
    pub topic: String,
    /// Lane.
    pub lane: i16,
    /// Rows.
    pub rows: i64,
    /// Oldest row's age, seconds.
    pub oldest_seconds: f64,
}

/// A live relay instance.
#[derive(Debug, Serialize)]
pub struct InstanceRow {
    /// Id.
    pub instance_id: Uuid,
    /// Host.
    pub hostname: String,
    /// Process id.
    pub pid: i32,
    /// Lanes it owns.
    pub lanes: Vec<i16>,
    /// Its breaker.
    pub breaker_state: String,
    /// Seconds since its last heartbeat.
    pub heartbeat_age_seconds: f64,
}

/// Reads the status.
pub async fn status(client: &impl GenericClient, schema: &SchemaName) -> Result<Status, OpsError> {
    let q = |s: &str| schema.qualify(s);
    let head = client
        .query_one(
            &q("SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8,
                       count(*) FILTER (WHERE next_attempt_at > now())
                FROM __SCHEMA__.messages"),
            &[],
        )
        .await?;
    let by_lane = client
        .query(
            &q("SELECT topic, lane, count(*), extract(epoch FROM now() - min(created_at))::float8
                FROM __SCHEMA__.messages GROUP BY topic, lane ORDER BY topic, lane"),
            &[],
        )
        .await?;
    let dead = client
        .query(&q("SELECT reason, count(*) FROM __SCHEMA__.dead_letters GROUP BY reason ORDER BY 2 DESC"), &[])
        .await?;
    let inbox_dead = client
        .query(
            &q("SELECT consumer, reason, count(*) FROM __SCHEMA__.inbox_dead_letters GROUP BY 1, 2 ORDER BY 3 DESC"),
            &[],
        )
        .await?;
    let instances = client
        .query(
            &q("SELECT instance_id, hostname, pid, lanes, breaker_state,
                       extract(epoch FROM now() - heartbeat_at)::float8
                FROM __SCHEMA__.relay_instances ORDER BY started_at"),
            &[],
        )
        .await?;
    let parked = client
        .query(&q("SELECT key, dead_letter_id FROM __SCHEMA__.parked_keys ORDER BY parked_at LIMIT 1000"), &[])
        .await?;
    let lanes: i64 =
        client.query_one(&q("SELECT value::bigint FROM __SCHEMA__.settings WHERE name = 'lanes'"), &[]).await?.get(0);
    let instances: Vec<InstanceRow> = instances
        .iter()
        .map(|r| InstanceRow {
            instance_id: r.get(0),
            hostname: r.get(1),
            pid: r.get(2),
            lanes: r.get(3),
            breaker_state: r.get(4),
            heartbeat_age_seconds: r.get(5),
        })
        .collect();
    let owned: std::collections::HashSet<i16> = instances.iter().flat_map(|i| i.lanes.iter().copied()).collect();
    Ok(Status {
        backlog: head.get(0),
        oldest_pending_seconds: head.get(1),
        waiting_for_retry: head.get(2),
        backlog_by_topic_and_lane: by_lane
            .iter()
            .map(|r| BacklogRow { topic: r.get(0), lane: r.get(1), rows: r.get(2), oldest_seconds: r.get(3) })
            .collect(),
        dead_letters_by_reason: dead.iter().map(|r| (r.get(0), r.get(1))).collect(),
        inbox_dead_letters: inbox_dead.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect(),
        instances,
        parked_keys: parked.iter().map(|r| (r.get(0), r.get(1))).collect(),
        unowned_lanes: (0..lanes as i16).filter(|l| !owned.contains(l)).collect(),
        outbox_dead_tuples: crate::horizon::dead_tuples(client, schema).await?,
        oldest_snapshots: crate::horizon::snapshot_holders(client, 3).await?,
    })
}

/// Where one message is.
#[derive(Debug, Serialize, Default)]
pub struct Trace {
    /// The id asked about.
    pub message_id: Option<Uuid>,
    /// Pending in the outbox: attempts, last error, next attempt.
    pub pending: Option<serde_json::Value>,
    /// Delivered (when the archive is kept): topic, partition, offset, time.
    pub delivered: Vec<serde_json::Value>,
    /// Dead-lettered: reason, error, attempts, times.
    pub dead_letter: Option<serde_json::Value>,
    /// Consumers that applied it.
    pub processed_by: Vec<serde_json::Value>,
    /// Consumers that dead-lettered it.
    pub inbox_dead_letters: Vec<serde_json::Value>,
    /// Operator actions on it.
    pub audit: Vec<serde_json::Value>,
}

/// Traces one message in the outbox database, and in the inbox database when given (the same one
/// when consumers share it).
pub async fn trace(
    outbox_db: &impl GenericClient,
    inbox_db: Option<&tokio_postgres::Client>,
    schema: &SchemaName,
    id: Uuid,
) -> Result<Trace, OpsError> {
    let json_rows =
        |rows: Vec<tokio_postgres::Row>| -> Vec<serde_json::Value> { rows.iter().map(|r| r.get(0)).collect() };
    let q = |s: &str| schema.qualify(s);
    let mut t = Trace { message_id: Some(id), ..Default::default() };
    t.pending = outbox_db
        .query_opt(
            &q("SELECT jsonb_build_object('topic', topic, 'key', key, 'lane', lane, 'seq', seq, 'created_at', created_at,
                       'attempts', attempts, 'last_error', last_error, 'next_attempt_at', next_attempt_at,
                       'first_failed_at', first_failed_at)
                FROM __SCHEMA__.messages WHERE id = $1"),
            &[&id],
        )
        .await?
        .map(|r| r.get(0));
    t.delivered = json_rows(
        outbox_db
            .query(
                &q("SELECT jsonb_build_object('topic', kafka_topic, 'partition', kafka_partition, 'offset', kafka_offset,
                           'delivered_at', delivered_at, 'attempts', attempts)
                    FROM __SCHEMA__.delivered WHERE id = $1 ORDER BY delivered_at"),
                &[&id],
            )
            .await?,
    );
    t.dead_letter = outbox_db
        .query_opt(
            &q("SELECT jsonb_build_object('topic', topic, 'key', key, 'reason', reason, 'error_class', error_class,
                       'last_error', last_error, 'attempts', attempts, 'created_at', created_at,
                       'first_failed_at', first_failed_at, 'dead_lettered_at', dead_lettered_at)
                FROM __SCHEMA__.dead_letters WHERE id = $1"),
            &[&id],
        )
        .await?
        .map(|r| r.get(0));
    t.audit = json_rows(
        outbox_db
            .query(
                &q("SELECT jsonb_build_object('at', at, 'actor', actor, 'action', action, 'source', source, 'why', why)
                    FROM __SCHEMA__.audit_log WHERE target = $1::text ORDER BY at"),
                &[&id.to_string()],
            )
            .await?,
    );
    if let Some(inbox) = inbox_db {
        t.processed_by = json_rows(
            inbox
                .query(
                    &q("SELECT jsonb_build_object('consumer', consumer, 'processed_at', processed_at, 'topic', topic,
                               'partition', kafka_partition, 'offset', kafka_offset)
                        FROM __SCHEMA__.inbox WHERE message_id = $1 ORDER BY processed_at"),
                    &[&id],
                )
                .await?,
        );
        t.inbox_dead_letters = json_rows(
            inbox
                .query(
                    &q("SELECT jsonb_build_object('id', dead_letter_id, 'consumer', consumer, 'reason', reason,
                               'error', error, 'attempts', attempts, 'dead_lettered_at', dead_lettered_at)
                        FROM __SCHEMA__.inbox_dead_letters WHERE message_id = $1"),
                    &[&id],
                )
                .await?,
        );
    }
    Ok(t)
}
