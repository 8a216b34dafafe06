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
    /// The newest `reconcile` of each consumer.
    pub reconciliations: Vec<super::reconcile::LastReconciliation>,
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
    let head = client.query_one(&q(include_str!("../sql/status_backlog.sql")), &[]).await?;
    let by_lane = client.query(&q(include_str!("../sql/status_by_lane.sql")), &[]).await?;
    let dead = client.query(&q(include_str!("../sql/status_dead_letters.sql")), &[]).await?;
    let inbox_dead = client.query(&q(include_str!("../sql/status_inbox_dead_letters.sql")), &[]).await?;
    let instances = client.query(&q(include_str!("../sql/status_instances.sql")), &[]).await?;
    let parked = client.query(&q(include_str!("../sql/status_parked_keys.sql")), &[]).await?;
    let lanes = crate::schema::check_installed(client, schema).await?.lanes;
    let instances: Vec<InstanceRow> = instances
        .iter()
        .map(|r| InstanceRow {
            instance_id: r.get("instance_id"),
            hostname: r.get("hostname"),
            pid: r.get("pid"),
            lanes: r.get("lanes"),
            breaker_state: r.get("breaker_state"),
            heartbeat_age_seconds: r.get("heartbeat_age_s"),
        })
        .collect();
    let owned: std::collections::HashSet<i16> = instances.iter().flat_map(|i| i.lanes.iter().copied()).collect();
    Ok(Status {
        backlog: head.get("pending"),
        oldest_pending_seconds: head.get("oldest_s"),
        waiting_for_retry: head.get("waiting"),
        backlog_by_topic_and_lane: by_lane
            .iter()
            .map(|r| BacklogRow {
                topic: r.get("topic"),
                lane: r.get("lane"),
                rows: r.get("pending"),
                oldest_seconds: r.get("oldest_s"),
            })
            .collect(),
        dead_letters_by_reason: dead.iter().map(|r| (r.get("reason"), r.get("n"))).collect(),
        inbox_dead_letters: inbox_dead.iter().map(|r| (r.get("consumer"), r.get("reason"), r.get("n"))).collect(),
        instances,
        parked_keys: parked.iter().map(|r| (r.get("key"), r.get("dead_letter_id"))).collect(),
        unowned_lanes: (0..lanes as i16).filter(|l| !owned.contains(l)).collect(),
        outbox_dead_tuples: crate::horizon::dead_tuples(client, schema).await?,
        oldest_snapshots: crate::horizon::snapshot_holders(client, 3).await?,
        reconciliations: super::reconcile::last_reconciliations(client, schema).await?,
    })
}
