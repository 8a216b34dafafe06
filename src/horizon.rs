//! Queue health: what holds back PostgreSQL's cleanup of the outbox. Every delivered row is
//! deleted; while any session holds an older snapshot (a long report, a `pg_dump`, a forgotten
//! `BEGIN`, a replication slot), those rows stay as dead versions and every claim walks over them.
//! The relay cannot end such a session, but it can name it: `status` shows the holders, and the
//! relay exports the horizon's age and the outbox's dead tuples as metrics and warns in its log.

use serde::Serialize;
use tokio_postgres::GenericClient;

use crate::schema::SchemaName;

/// Something that holds back the oldest snapshot.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SnapshotHolder {
    /// `session`, `replication slot` or `prepared transaction`.
    pub kind: String,
    /// The backend's pid (sessions).
    pub pid: Option<i32>,
    /// `application_name`, the slot's name or the prepared transaction's gid.
    pub name: String,
    /// The client's address (`local` for a Unix socket), or the slot's database, or the owner.
    pub client: String,
    /// The session's state (`idle in transaction`, `active`, ...).
    pub state: String,
    /// How long its transaction (or prepared transaction) has been open, in seconds.
    pub age_seconds: Option<f64>,
    /// The first 60 characters of its current or last query (shown by `status`, never logged).
    pub query_prefix: Option<String>,
}

/// The `limit` oldest snapshot holders, oldest first. Without `pg_read_all_stats`, other roles'
/// sessions show no query or client (PostgreSQL hides them), but still their pid and age.
pub async fn snapshot_holders(
    client: &impl GenericClient,
    limit: i64,
) -> Result<Vec<SnapshotHolder>, tokio_postgres::Error> {
    let rows = client.query(include_str!("sql/snapshot_holders.sql"), &[&limit]).await?;
    Ok(rows
        .iter()
        .map(|r| SnapshotHolder {
            kind: r.get("kind"),
            pid: r.get("pid"),
            name: r.get("name"),
            client: r.get("client"),
            state: r.get("state"),
            age_seconds: r.get("age_seconds"),
            query_prefix: r.get("query_prefix"),
        })
        .collect())
}

/// Dead row versions in the outbox table, as PostgreSQL's statistics count them.
pub async fn dead_tuples(client: &impl GenericClient, schema: &SchemaName) -> Result<i64, tokio_postgres::Error> {
    Ok(client.query_one(&schema.qualify(include_str!("sql/outbox_dead_tuples.sql")), &[]).await?.get(0))
}
