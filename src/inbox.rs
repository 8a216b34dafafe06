//! The inbox: exactly-once effects for consumers.
//!
//! Record the message id in the same transaction as the effect; a redelivered message is then
//! seen as a duplicate and its effect is skipped:
//!
//! ```no_run
//! # async fn demo(client: &mut tokio_postgres::Client, id: uuid::Uuid, payload: &[u8]) -> Result<(), Box<dyn std::error::Error>> {
//! use outbox_relay::inbox::{Inbox, InboxMessage, InboxOutcome};
//!
//! let inbox = Inbox::new(outbox_relay::schema::SchemaName::default(), "billing")?;
//! let tx = client.transaction().await?;
//! match inbox.record(&tx, &InboxMessage::new(id, Some(payload))).await? {
//!     InboxOutcome::Processed => {
//!         tx.execute("UPDATE accounts SET balance = balance + 10 WHERE id = 1", &[]).await?;
//!         tx.commit().await?; // the id and the effect commit together
//!     }
//!     InboxOutcome::Duplicate => tx.commit().await?, // applied before: skip the effect
//!     InboxOutcome::Conflict { .. } => tx.rollback().await?, // same id, other payload: never applied
//! }
//! # Ok(()) }
//! ```
//!
//! Correctness rests on the primary key `(consumer, message_id)` and `INSERT ... ON CONFLICT DO
//! NOTHING`, not on the isolation level: a concurrent transaction recording the same id waits for
//! the first and then finds it there. The library never commits for the caller.

use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::schema::SchemaName;

/// What the inbox says about a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboxOutcome {
    /// First time seen: apply the effect in this transaction.
    Processed,
    /// Seen before with the same payload: skip the effect.
    Duplicate,
    /// Seen before with a different payload: never apply; report it.
    Conflict {
        /// Digest recorded for the id.
        recorded: Vec<u8>,
        /// Digest of this message.
        received: Vec<u8>,
    },
}

/// A message as the inbox needs it.
#[derive(Debug, Clone)]
pub struct InboxMessage<'a> {
    /// The message id (the relay's `ce_id`).
    pub id: Uuid,
    /// The payload, digested to detect conflicting redeliveries.
    pub payload: Option<&'a [u8]>,
    /// Where it was consumed from, for operators.
    pub topic: Option<&'a str>,
    /// Partition.
    pub partition: Option<i32>,
    /// Offset.
    pub offset: Option<i64>,
    /// The outbox lane it was delivered from (the `outbox_lane` header).
    pub lane: Option<i16>,
    /// Its sequence number in the outbox (the `outbox_seq` header).
    pub seq: Option<i64>,
}

impl<'a> InboxMessage<'a> {
    /// A message with an id and a payload.
    pub fn new(id: Uuid, payload: Option<&'a [u8]>) -> Self {
        Self { id, payload, topic: None, partition: None, offset: None, lane: None, seq: None }
    }

    /// Adds where it was consumed from.
    pub fn at(mut self, topic: &'a str, partition: i32, offset: i64) -> Self {
        self.topic = Some(topic);
        self.partition = Some(partition);
        self.offset = Some(offset);
        self
    }

    /// Adds the outbox lane and sequence number the record carried, for `reconcile`.
    pub fn sequenced(mut self, lane: Option<i16>, seq: Option<i64>) -> Self {
        self.lane = lane;
        self.seq = seq;
        self
    }

    fn digest(&self) -> Vec<u8> {
        let mut h = Sha256::new();
        match self.payload {
            Some(p) => {
                h.update([1u8]);
                h.update(p);
            }
            None => h.update([0u8]),
        }
        h.finalize().to_vec()
    }
}

/// A consumer name that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid consumer name {0:?}: use 1 to 200 characters without control characters")]
pub struct InvalidConsumerName(String);

/// Why recording failed (the caller's transaction is then aborted).
#[derive(Debug, thiserror::Error)]
#[error("recording the message in the inbox failed: {0}")]
pub struct InboxError(#[from] pub tokio_postgres::Error);

/// One consumer's inbox in a schema.
#[derive(Debug, Clone)]
pub struct Inbox {
    consumer: String,
    record_sql: String,
    digest_sql: String,
    batch_sql: String,
    purge_sql: String,
}

impl Inbox {
    /// The inbox of `consumer` (a stable name per consuming service) in `schema`.
    pub fn new(schema: SchemaName, consumer: &str) -> Result<Self, InvalidConsumerName> {
        if consumer.is_empty() || consumer.chars().count() > 200 || consumer.chars().any(char::is_control) {
            return Err(InvalidConsumerName(consumer.to_owned()));
        }
        Ok(Self {
            consumer: consumer.to_owned(),
            record_sql: schema.qualify(include_str!("sql/inbox_record.sql")),
            digest_sql: schema.qualify(include_str!("sql/inbox_digest.sql")),
            batch_sql: schema.qualify(include_str!("sql/inbox_record_batch.sql")),
            purge_sql: schema.qualify(include_str!("sql/inbox_purge.sql")),
        })
    }

    /// The consumer name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Records one message in the caller's transaction.
    pub async fn record(&self, tx: &impl GenericClient, m: &InboxMessage<'_>) -> Result<InboxOutcome, InboxError> {
        let digest = m.digest();
        let params: [(&(dyn ToSql + Sync), Type); 8] = [
            (&self.consumer, Type::TEXT),
            (&m.id, Type::UUID),
            (&digest, Type::BYTEA),
            (&m.topic, Type::TEXT),
            (&m.partition, Type::INT4),
            (&m.offset, Type::INT8),
            (&m.lane, Type::INT2),
            (&m.seq, Type::INT8),
        ];
        let inserted = tx.execute_typed(&self.record_sql, &params).await?;
        if inserted == 1 {
            return Ok(InboxOutcome::Processed);
        }
        let row = tx.query_one(&self.digest_sql, &[&self.consumer, &m.id]).await?;
        Ok(compare(row.get::<_, Option<Vec<u8>>>(0), digest))
    }

    /// Records many messages in one statement; outcomes in the order given. An id given twice is
    /// `Processed` the first time and `Duplicate` after.
    pub async fn record_batch(
        &self,
        tx: &impl GenericClient,
        messages: &[InboxMessage<'_>],
    ) -> Result<Vec<InboxOutcome>, InboxError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let digests: Vec<Vec<u8>> = messages.iter().map(InboxMessage::digest).collect();
        let ids: Vec<Uuid> = messages.iter().map(|m| m.id).collect();
        let topics: Vec<Option<&str>> = messages.iter().map(|m| m.topic).collect();
        let partitions: Vec<Option<i32>> = messages.iter().map(|m| m.partition).collect();
        let offsets: Vec<Option<i64>> = messages.iter().map(|m| m.offset).collect();
        let lanes: Vec<Option<i16>> = messages.iter().map(|m| m.lane).collect();
        let seqs: Vec<Option<i64>> = messages.iter().map(|m| m.seq).collect();
        let params: [(&(dyn ToSql + Sync), Type); 8] = [
            (&self.consumer, Type::TEXT),
            (&ids, Type::UUID_ARRAY),
            (&digests, Type::BYTEA_ARRAY),
            (&topics, Type::TEXT_ARRAY),
            (&partitions, Type::INT4_ARRAY),
            (&offsets, Type::INT8_ARRAY),
            (&lanes, Type::INT2_ARRAY),
            (&seqs, Type::INT8_ARRAY),
        ];
        let rows = tx.query_typed(&self.batch_sql, &params).await?;
        let mut fresh = std::collections::HashSet::new();
        let mut recorded = std::collections::HashMap::new();
        for r in &rows {
            let id: Uuid = r.get(0);
            if r.get::<_, bool>(1) {
                fresh.insert(id);
            } else if let Some(d) = r.get::<_, Option<Vec<u8>>>(2) {
                recorded.insert(id, d);
            }
        }
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(messages.len());
        for (m, digest) in messages.iter().zip(digests) {
            let first = seen.insert(m.id);
            let outcome = if fresh.contains(&m.id) && first {
                InboxOutcome::Processed
            } else if fresh.contains(&m.id) {
                // The same id twice in one batch: the first copy is applied.
                let first_digest = messages.iter().find(|x| x.id == m.id).map(InboxMessage::digest);
                compare(first_digest, digest)
            } else {
                let recorded = match recorded.get(&m.id) {
                    Some(d) => Some(d.clone()),
                    // Committed by a concurrent transaction after this statement's snapshot.
                    None => tx.query_one(&self.digest_sql, &[&self.consumer, &m.id]).await?.get(0),
                };
                compare(recorded, digest)
            };
            out.push(outcome);
        }
        Ok(out)
    }

    /// Deletes this consumer's inbox rows older than `older_than`, `chunk` rows per statement;
    /// returns how many. Ids older than the retention can no longer be recognised as duplicates,
    /// so keep it longer than any redelivery you expect (Kafka retention, replays).
    pub async fn purge(
        &self,
        client: &impl GenericClient,
        older_than: Duration,
        chunk: i64,
    ) -> Result<u64, InboxError> {
        crate::db::in_chunks(chunk, || self.purge_chunk(client, older_than, chunk), |_| {}).await
    }

    /// One statement of [`purge`](Self::purge): deletes at most `chunk` rows, returns how many.
    pub async fn purge_chunk(
        &self,
        client: &impl GenericClient,
        older_than: Duration,
        chunk: i64,
    ) -> Result<u64, InboxError> {
        let secs = older_than.as_secs() as i64;
        Ok(client.execute(&self.purge_sql, &[&self.consumer, &secs, &chunk]).await?)
    }
}

fn compare(recorded: Option<Vec<u8>>, received: Vec<u8>) -> InboxOutcome {
    match recorded {
        Some(r) if r != received => InboxOutcome::Conflict { recorded: r, received },
        _ => InboxOutcome::Duplicate,
    }
}
