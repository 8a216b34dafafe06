//! Inbox dead letters: a message the runner cannot apply (no usable id, a conflicting payload, a
//! handler that keeps failing) is recorded in `<schema>.inbox_dead_letters` with its coordinates,
//! headers, payload and error, and only then may its offset move.

use std::sync::atomic::Ordering;

use uuid::Uuid;

use super::partition::{drop_session, session, Next};
use super::{ConsumedMessage, ConsumerError, Handler, PoisonPolicy, Shared};
use crate::pool::Pooled;

/// A message that keeps failing: dead-letter it and go on, or stop the runner, as the policy says.
pub(super) async fn poison<H: Handler>(
    shared: &Shared<H>,
    db: &mut Option<Pooled>,
    m: &ConsumedMessage,
    error: &str,
    attempts: u32,
) -> Next {
    match shared.config.poison_policy {
        PoisonPolicy::DeadLetter => {
            tracing::error!(message_id = %m.id, topic = %m.topic, partition = m.partition, offset = m.offset, attempts,
                error = %error, "poison message dead-lettered; the partition goes on");
            dead_letter(
                shared,
                db,
                m,
                Some(m.id),
                crate::classify::inbox_reason::HANDLER_FAILED,
                error,
                attempts as i32,
            )
            .await
        }
        PoisonPolicy::Stop => {
            *shared.failure.lock().expect("lock") = Some(ConsumerError::Poison {
                id: m.id.to_string(),
                topic: m.topic.clone(),
                partition: m.partition,
                offset: m.offset,
                error: error.to_owned(),
            });
            shared.abort.cancel();
            Next::Stop
        }
    }
}

/// Writes an inbox dead letter; retries with backoff while the failure is transient. Returns
/// [`Next::Stop`] (and the message is not acknowledged) when the runner is stopping or the failure
/// is permanent, which stops the runner with an error saying so.
/// Writes an inbox dead letter, retrying while the database is unavailable; a refusal that
/// repeats stops the runner (the offset must not move past a message neither applied nor recorded).
pub(super) async fn dead_letter<H: Handler>(
    shared: &Shared<H>,
    db: &mut Option<Pooled>,
    m: &ConsumedMessage,
    id: Option<Uuid>,
    reason: &str,
    error: &str,
    attempts: i32,
) -> Next {
    // jsonb cannot hold NUL: header bytes are kept as text with NUL escaped.
    let headers = serde_json::Value::Object(
        m.headers
            .iter()
            .map(|(k, v)| {
                (
                    k.replace('\0', "\\u0000"),
                    serde_json::Value::String(String::from_utf8_lossy(v).replace('\0', "\\u0000")),
                )
            })
            .collect(),
    );
    let mut failures = 0u32;
    loop {
        let written: Result<u64, (bool, String)> = async {
            let client = session(&shared.pool, db).await.map_err(|e| (false, e))?;
            client
                .execute(
                    &shared.dead_letter_sql,
                    &[
                        &shared.inbox.consumer(),
                        &id,
                        &m.topic,
                        &m.partition,
                        &m.offset,
                        &m.key,
                        &headers,
                        &m.payload,
                        &reason,
                        &error,
                        &attempts,
                    ],
                )
                .await
                .map_err(|e| {
                    (
                        crate::classify::postgres(&e).disposition == crate::classify::Disposition::Permanent,
                        e.to_string(),
                    )
                })
        }
        .await;
        match written {
            Ok(_) => {
                shared.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                crate::telemetry::inbox_dead_lettered(shared.inbox.consumer(), reason);
                return Next::Continue;
            }
            Err((true, e)) => {
                tracing::error!(topic = %m.topic, partition = m.partition, offset = m.offset, error = %e,
                    "an inbox dead letter cannot be written; stopping");
                *shared.failure.lock().expect("lock") = Some(ConsumerError::DeadLetterWrite(e));
                shared.abort.cancel();
                return Next::Stop;
            }
            Err((false, e)) => {
                if shared.abort.is_cancelled() {
                    return Next::Stop;
                }
                drop_session(db);
                failures += 1;
                let delay = shared.config.backoff.delay(failures.min(10));
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "could not write an inbox dead letter; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}
