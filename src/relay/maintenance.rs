//! Pruning: archived rows past retention and idempotency keys past their window.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::database::Database;
use super::Shared;
use crate::db::in_chunks;

/// Deletes archived rows past retention and idempotency keys past their window (whose message is
/// gone), in chunks so that no statement holds locks for long. Any instance may do it; doing it
/// twice is harmless.
pub(super) async fn prune(shared: Arc<Shared>, database: Arc<Database>) {
    const CHUNK: i64 = 10_000;
    let config = &shared.config;
    let run = async {
        let client = database.background.get().await.ok_or("no background session")?;
        let mut pruned = 0u64;
        if config.archive {
            let sql = config.schema.qualify(include_str!("../sql/prune_archive.sql"));
            let retention_s = config.archive_retention.as_secs() as i64;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&retention_s, &CHUNK];
            pruned += in_chunks(CHUNK, || client.execute(&sql, &params), |_| {}).await.map_err(|e| e.to_string())?;
        }
        let sql = config.schema.qualify(include_str!("../sql/prune_idempotency_keys.sql"));
        pruned += in_chunks(CHUNK, || client.execute(&sql, &[&CHUNK]), |_| {}).await.map_err(|e| e.to_string())?;
        Ok::<u64, String>(pruned)
    };
    match run.await {
        Ok(pruned) => {
            if pruned > 0 {
                tracing::info!(pruned, "pruned archived rows and expired idempotency keys");
            }
            shared.stats.pruned.fetch_add(pruned, Ordering::Relaxed);
        }
        Err(e) => tracing::warn!(error = %e, "pruning the archive and expired idempotency keys failed; will retry"),
    }
}
