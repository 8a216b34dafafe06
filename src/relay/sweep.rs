//! The sweep: a slow look below every lane's claim cursor for rows no NOTIFY announced (written
//! with triggers disabled, a key unparked by `dlq discard`). It runs every `--sweep-interval` in a
//! task, on the database's background session, so a claim never waits for it; a row it finds rewinds its lane's
//! cursor. The NOTIFY of a late row does the same within milliseconds; the sweep is what bounds the
//! delay when no NOTIFY comes (ARCHITECTURE.md, "The claim cursor").

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::database::Database;
use super::Shared;

/// One sweep over the lanes this instance runs: a lane with a row below its cursor is rewound.
pub(crate) async fn sweep(shared: Arc<Shared>, database: Arc<Database>) {
    let cursors = shared.signals.cursors();
    if cursors.is_empty() {
        return;
    }
    let config = &shared.config;
    let limit = config.db_call_timeout;
    let run = async {
        let client = database.background.get().await.ok_or("no background session")?;
        let lanes: Vec<i16> = cursors.iter().map(|(l, _)| *l).collect();
        let at: Vec<i64> = cursors.iter().map(|(_, c)| *c).collect();
        let sql = config.schema.qualify(include_str!("../sql/sweep_behind_cursors.sql"));
        let rows = client.query(&sql, &[&lanes, &at]).await.map_err(|e| e.to_string())?;
        Ok::<Vec<(i16, i64)>, String>(
            rows.iter().filter_map(|r| r.get::<_, Option<i64>>("behind").map(|seq| (r.get("lane"), seq))).collect(),
        )
    };
    match tokio::time::timeout(limit, run).await {
        Ok(Ok(found)) => {
            for (lane, seq) in &found {
                tracing::info!(
                    lane,
                    seq,
                    "the sweep found a row behind the lane's claim cursor; the lane claims from it"
                );
                shared.signals.rewind(*lane as usize, *seq);
            }
            shared.stats.swept.fetch_add(found.len() as u64, Ordering::Relaxed);
            crate::telemetry::sweep_found(&shared.label, found.len() as u64);
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "sweeping below the lanes' claim cursors failed; will retry"),
        Err(_) => {
            tracing::warn!(
                timeout_ms = limit.as_millis() as u64,
                "sweeping below the lanes' claim cursors took longer than --db-call-timeout; will retry"
            );
            database.background.reset().await;
        }
    }
}
