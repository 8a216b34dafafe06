//! The LISTEN session of one database: turns the NOTIFYs of every outbox there into wake-ups and
//! rewinds of that outbox's lanes ([`super::lanes`]).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::lanes::LaneSignals;
use crate::db::DbConfig;

/// Reconnects with capped, jittered exponential backoff (200 ms doubling to 10 s, plus up to as
/// much again of jitter), so a restarting database is not hammered by every instance at once.
pub(super) fn reconnect_policy() -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
}

/// Follows every channel in `channels` (and each one `asked` names later) on one session, and
/// turns each NOTIFY into wake-ups (and rewinds) of the lanes it names; reconnects with backoff.
pub(super) async fn listen(
    db: DbConfig,
    channels: Arc<RwLock<HashMap<String, LaneSignals>>>,
    mut asked: mpsc::UnboundedReceiver<String>,
    stop: CancellationToken,
) {
    use backon::Retryable;
    let followed = || -> Vec<String> { channels.read().expect("channels lock").keys().cloned().collect() };
    let signals_of = |channel: &str| channels.read().expect("channels lock").get(channel).cloned();
    loop {
        // Nothing to follow yet: wait for the first outbox.
        while followed().is_empty() {
            tokio::select! {
                _ = stop.cancelled() => return,
                a = asked.recv() => if a.is_none() { return },
            }
        }
        let connect = (|| {
            let now = followed();
            let db = db.clone();
            async move { db.listen(&now).await.map(|pair| (pair, now)) }
        })
        .retry(reconnect_policy().without_max_times())
        .sleep(tokio::time::sleep)
        .notify(|e, after| {
            tracing::warn!(error = %e, retry_in_ms = after.as_millis() as u64,
                "could not LISTEN for new rows; lanes poll meanwhile")
        });
        let ((client, mut notes), now) = tokio::select! {
            _ = stop.cancelled() => return,
            r = connect => match r {
                Ok(pair) => pair,
                Err(_) => continue,
            },
        };
        // Rows may have come while no one listened, late ones below a lane's cursor too.
        for ch in &now {
            if let Some(s) = signals_of(ch) {
                s.announce_all();
            }
        }
        let mut following: std::collections::HashSet<String> = now.into_iter().collect();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                n = notes.recv() => match n {
                    Some(note) => if let Some(s) = signals_of(&note.channel) {
                        s.announce_payload(&note.payload);
                    },
                    None => break,
                },
                a = asked.recv() => match a {
                    Some(ch) if !following.contains(&ch) => {
                        let statement = crate::db::listen_statement(&ch);
                        match tokio::time::timeout(Duration::from_secs(10), client.batch_execute(&statement)).await {
                            Ok(Ok(())) => {
                                following.insert(ch.clone());
                                // Rows written before the LISTEN took effect announced nothing.
                                if let Some(s) = signals_of(&ch) {
                                    s.announce_all();
                                }
                            }
                            _ => break,
                        }
                    }
                    Some(_) => {}
                    None => return,
                },
            }
        }
        tracing::warn!("the LISTEN session closed; lanes fall back to polling until it is back");
    }
}
