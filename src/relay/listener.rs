//! The LISTEN session: turns the outbox's NOTIFYs into wake-ups and rewinds of the lanes
//! ([`super::lanes`]).

use std::time::Duration;

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

/// Turns NOTIFYs on the outbox's channel into wake-ups (and rewinds) of the lanes they name; reconnects with
/// backoff.
pub(super) async fn listen(db: DbConfig, channel: String, signals: LaneSignals, stop: CancellationToken) {
    use backon::Retryable;
    loop {
        let connect = (|| db.listen(&channel))
            .retry(reconnect_policy().without_max_times())
            .sleep(tokio::time::sleep)
            .notify(|e, after| {
                tracing::warn!(error = %e, retry_in_ms = after.as_millis() as u64,
                    "could not LISTEN for new rows; lanes poll meanwhile")
            });
        let (_client, mut notes) = tokio::select! {
            _ = stop.cancelled() => return,
            r = connect => match r {
                Ok(pair) => pair,
                Err(_) => continue,
            },
        };
        // Rows may have come while no one listened, late ones below a lane's cursor too.
        signals.announce_all();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                n = notes.recv() => match n {
                    Some(payload) => signals.announce_payload(&payload),
                    None => break,
                }
            }
        }
        tracing::warn!("the LISTEN session closed; lanes fall back to polling until it is back");
    }
}
