//! `status`: backlog per lane and topic, retries, dead letters, instances and their lanes, parked
//! keys, and who holds back the cleanup of the outbox.

use serde::Serialize;
use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::OpsError;
use crate::schema::SchemaName;

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
