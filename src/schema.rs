//! The database schema: its name, its numbered migrations, and `migrate`.
//!
//! All of the product's objects live in one PostgreSQL schema (default `outbox`). Migrations are
//! the numbered files under `schema/`, compiled into the binary; `migrate` applies the missing
//! ones in one transaction under an advisory lock, so two migrators at once are safe and a failed
//! migration leaves nothing half-applied.

use std::fmt;

use sha2::{Digest, Sha256};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

/// The lane count used when `migrate` installs a schema and none is given.
pub const DEFAULT_LANES: u16 = 16;
/// The largest lane count a schema can be installed with.
pub const MAX_LANES: u16 = 1024;

/// The payload size limit of a schema installed without another (the `max_payload_bytes` setting;
/// below the broker's default 1 MiB record limit).
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1_000_000;

/// A validated PostgreSQL schema name for the product's objects.
///
/// Lowercase ASCII letters, digits and `_`, starting with a letter or `_`, at most 48 characters
/// (the NOTIFY channel `outbox_relay.<schema>` must fit PostgreSQL's 63-byte identifiers).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SchemaName(String);

/// A schema name that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid schema name {name:?}: use 1 to 48 lowercase ASCII letters, digits and '_', starting with a letter or '_'"
)]
pub struct InvalidSchemaName {
    name: String,
}

impl SchemaName {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<Self, InvalidSchemaName> {
        let ok = !name.is_empty()
            && name.len() <= 48
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !name.as_bytes()[0].is_ascii_digit()
            && !name.starts_with("pg_");
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(InvalidSchemaName { name: name.to_owned() })
        }
    }

    /// The name as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name quoted as an SQL identifier.
    pub fn ident(&self) -> String {
        format!("\"{}\"", self.0)
    }

    /// The NOTIFY channel the schema's insert trigger signals.
    pub fn notify_channel(&self) -> String {
        format!("outbox_relay.{}", self.0)
    }

    /// Replaces `__SCHEMA__` in an SQL text with the quoted schema name.
    pub fn qualify(&self, sql: &str) -> String {
        sql.replace("__SCHEMA__", &self.ident())
    }
}

impl Default for SchemaName {
    fn default() -> Self {
        Self("outbox".to_owned())
    }
}

impl fmt::Display for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for SchemaName {
    type Err = InvalidSchemaName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// One numbered migration, compiled in from `schema/`.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Its number; migrations apply in this order.
    pub version: i32,
    /// Its file name.
    pub name: &'static str,
    sql: &'static str,
}

/// Every migration this build knows, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "0001_core.sql", sql: include_str!("../schema/0001_core.sql") },
    Migration {
        version: 2,
        name: "0002_writer_functions.sql",
        sql: include_str!("../schema/0002_writer_functions.sql"),
    },
    Migration {
        version: 3,
        name: "0003_delivery_archive.sql",
        sql: include_str!("../schema/0003_delivery_archive.sql"),
    },
    Migration { version: 4, name: "0004_failures.sql", sql: include_str!("../schema/0004_failures.sql") },
    Migration { version: 5, name: "0005_operations.sql", sql: include_str!("../schema/0005_operations.sql") },
    Migration { version: 6, name: "0006_lane_wakeups.sql", sql: include_str!("../schema/0006_lane_wakeups.sql") },
    Migration {
        version: 7,
        name: "0007_queue_autovacuum.sql",
        sql: include_str!("../schema/0007_queue_autovacuum.sql"),
    },
    Migration { version: 8, name: "0008_claim_cursor.sql", sql: include_str!("../schema/0008_claim_cursor.sql") },
    Migration {
        version: 9,
        name: "0009_transaction_of_row.sql",
        sql: include_str!("../schema/0009_transaction_of_row.sql"),
    },
    Migration { version: 10, name: "0010_reconciliation.sql", sql: include_str!("../schema/0010_reconciliation.sql") },
];

impl Migration {
    fn checksum(&self) -> String {
        let digest = Sha256::digest(self.sql.as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn render(&self, schema: &SchemaName, lanes: u16) -> String {
        self.sql
            .replace("__SCHEMA_LITERAL__", &format!("'{}'", schema.as_str()))
            .replace("__SCHEMA__", &schema.ident())
            .replace("__LANES__", &lanes.to_string())
    }
}

/// The newest migration version this build knows.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map(|m| m.version).unwrap_or(0)
}

/// What `migrate` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    /// Versions applied by this call.
    pub applied: Vec<i32>,
    /// Versions that were already in place.
    pub already_applied: Vec<i32>,
    /// The schema's lane count (chosen at install, recorded in `settings`).
    pub lanes: u16,
}

/// Why `migrate` (or a schema check) failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The lane count asked for is out of range.
    #[error("lane count {0} is out of range: choose 1 to {MAX_LANES}")]
    LanesOutOfRange(u16),
    /// The schema is installed with another lane count.
    #[error("schema {schema} is installed with {recorded} lanes and the lane count is fixed at install; drop --lanes {requested} (or install into a new schema)")]
    LanesMismatch {
        /// The schema.
        schema: SchemaName,
        /// What the schema recorded.
        recorded: u16,
        /// What was asked for.
        requested: u16,
    },
    /// An applied migration's file differs from what was applied.
    #[error("migration {version} ({name}) was changed after it was applied to schema {schema}: restore the original file; never edit an applied migration, add a new one")]
    ChecksumMismatch {
        /// The schema.
        schema: SchemaName,
        /// The migration.
        version: i32,
        /// Its file.
        name: &'static str,
    },
    /// The database holds migrations this build does not know.
    #[error("schema {schema} is at migration {found}, newer than this build knows ({known}): upgrade outbox-relay")]
    NewerThanBuild {
        /// The schema.
        schema: SchemaName,
        /// The newest version in the database.
        found: i32,
        /// The newest version this build knows.
        known: i32,
    },
    /// The schema is missing migrations this build needs.
    #[error("schema {schema} is at migration {found} but this build needs {needed}: run `outbox-relay migrate`")]
    NotMigrated {
        /// The schema.
        schema: SchemaName,
        /// The newest version in the database (0: not installed).
        found: i32,
        /// What this build needs.
        needed: i32,
    },
    /// A row of `<schema>.settings` does not hold what it must.
    #[error("schema {schema}: setting {name} = {value:?} is not {expected}; fix the row in {schema}.settings (UPDATE {schema}.settings SET value = ... WHERE name = '{name}')")]
    BadSetting {
        /// The schema.
        schema: SchemaName,
        /// The setting.
        name: &'static str,
        /// What it holds.
        value: String,
        /// What it should hold.
        expected: &'static str,
    },
    /// The database refused.
    #[error("migration {step} failed: {source}")]
    Database {
        /// What was being done.
        step: String,
        /// The database error.
        #[source]
        source: tokio_postgres::Error,
    },
}

fn db(step: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> MigrateError {
    let step = step.into();
    move |source| MigrateError::Database { step, source }
}

/// Applies every missing migration to `schema`, creating it if needed.
///
/// Idempotent, and safe to run concurrently: the work runs in one transaction holding a
/// transaction-level advisory lock keyed on the schema name, so a second migrator waits and then
/// finds everything applied. `lanes` is used only when the schema is first installed; a different
/// value for an installed schema is an error, since every row's lane depends on it.
pub async fn migrate(
    client: &mut Client,
    schema: &SchemaName,
    lanes: Option<u16>,
) -> Result<MigrateReport, MigrateError> {
    if let Some(n) = lanes {
        if n == 0 || n > MAX_LANES {
            return Err(MigrateError::LanesOutOfRange(n));
        }
    }
    let tx = client.transaction().await.map_err(db("begin"))?;
    tx.execute(include_str!("sql/migrate_lock.sql"), &[&schema.as_str()])
        .await
        .map_err(db("taking the migration lock"))?;
    tx.batch_execute(&schema.qualify(include_str!("sql/migrations_ledger.sql")))
        .await
        .map_err(db("creating the schema and its migrations ledger"))?;

    let rows = tx
        .query(&schema.qualify(include_str!("sql/applied_migrations.sql")), &[])
        .await
        .map_err(db("reading the migrations ledger"))?;
    let applied: Vec<(i32, String)> = rows.iter().map(|r| (r.get("version"), r.get("checksum"))).collect();
    if let Some(&(found, _)) = applied.last() {
        if found > latest_version() {
            return Err(MigrateError::NewerThanBuild { schema: schema.clone(), found, known: latest_version() });
        }
    }
    for (version, checksum) in &applied {
        if let Some(m) = MIGRATIONS.iter().find(|m| m.version == *version) {
            if &m.checksum() != checksum {
                return Err(MigrateError::ChecksumMismatch {
                    schema: schema.clone(),
                    version: m.version,
                    name: m.name,
                });
            }
        }
    }

    let recorded = if applied.is_empty() { None } else { Some(read_lanes(&tx, schema).await?) };
    let lanes = match (recorded, lanes) {
        (Some(recorded), Some(requested)) if recorded != requested => {
            return Err(MigrateError::LanesMismatch { schema: schema.clone(), recorded, requested });
        }
        (Some(recorded), _) => recorded,
        (None, requested) => requested.unwrap_or(DEFAULT_LANES),
    };

    let mut report = MigrateReport { applied: Vec::new(), already_applied: Vec::new(), lanes };
    for m in MIGRATIONS {
        if applied.iter().any(|(v, _)| *v == m.version) {
            report.already_applied.push(m.version);
            continue;
        }
        tx.batch_execute(&m.render(schema, lanes)).await.map_err(db(format!("{} ({})", m.version, m.name)))?;
        tx.execute(&schema.qualify(include_str!("sql/record_migration.sql")), &[&m.version, &m.name, &m.checksum()])
            .await
            .map_err(db("recording the migration"))?;
        report.applied.push(m.version);
    }
    tx.commit().await.map_err(db("commit"))?;
    Ok(report)
}

/// One row of the schema's settings.
async fn read_setting(
    client: &impl tokio_postgres::GenericClient,
    schema: &SchemaName,
    name: &'static str,
) -> Result<String, MigrateError> {
    let row = client
        .query_one(&schema.qualify(include_str!("sql/setting.sql")), &[&name])
        .await
        .map_err(db(format!("reading the {name} setting")))?;
    Ok(row.get("value"))
}

async fn read_lanes(client: &impl tokio_postgres::GenericClient, schema: &SchemaName) -> Result<u16, MigrateError> {
    let v = read_setting(client, schema, "lanes").await?;
    match v.trim().parse::<u16>() {
        Ok(n) if (1..=MAX_LANES).contains(&n) => Ok(n),
        _ => Err(MigrateError::BadSetting {
            schema: schema.clone(),
            name: "lanes",
            value: v,
            expected: "a lane count from 1 to 1024",
        }),
    }
}

/// Who a set of least-privilege grants is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantsFor {
    /// The relay daemon.
    Relay,
    /// A service writing outbox rows.
    Writer,
    /// A consumer using the inbox.
    Consumer,
}

/// The `GRANT` statements giving `role` what it needs and nothing more.
pub fn grants_sql(schema: &SchemaName, role: &str, who: GrantsFor) -> String {
    let sql = match who {
        GrantsFor::Relay => include_str!("../schema/roles/relay.sql"),
        GrantsFor::Writer => include_str!("../schema/roles/writer.sql"),
        GrantsFor::Consumer => include_str!("../schema/roles/consumer.sql"),
    };
    let role = format!("\"{}\"", role.replace('"', "\"\""));
    schema.qualify(sql).replace("__ROLE__", &role)
}

/// The facts a relay or a tool needs about an installed schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaInfo {
    /// The lane count recorded at install.
    pub lanes: u16,
    /// The largest payload the writer functions accept.
    pub max_payload_bytes: usize,
}

/// Checks that `schema` is installed at this build's version and reads its settings.
pub async fn check_installed(
    client: &impl tokio_postgres::GenericClient,
    schema: &SchemaName,
) -> Result<SchemaInfo, MigrateError> {
    let found: i32 = match client.query_one(&schema.qualify(include_str!("sql/schema_version.sql")), &[]).await {
        Ok(row) => row.get("version"),
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) || e.code() == Some(&SqlState::INVALID_SCHEMA_NAME) => 0,
        Err(e) => return Err(db("reading the migrations ledger")(e)),
    };
    if found > latest_version() {
        return Err(MigrateError::NewerThanBuild { schema: schema.clone(), found, known: latest_version() });
    }
    if found < latest_version() {
        return Err(MigrateError::NotMigrated { schema: schema.clone(), found, needed: latest_version() });
    }
    let lanes = read_lanes(client, schema).await?;
    let max = read_setting(client, schema, "max_payload_bytes").await?;
    let max_payload_bytes =
        max.trim().parse::<usize>().ok().filter(|n| *n > 0).ok_or_else(|| MigrateError::BadSetting {
            schema: schema.clone(),
            name: "max_payload_bytes",
            value: max.clone(),
            expected: "a positive number of bytes",
        })?;
    Ok(SchemaInfo { lanes, max_payload_bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_follow_the_documented_rules() {
        for ok in ["outbox", "_x", "svc_orders_2", &"a".repeat(48)] {
            assert!(SchemaName::new(ok).is_ok(), "{ok} should be valid");
        }
        for bad in ["", "Outbox", "1abc", "a-b", "a b", "pg_x", &"a".repeat(49), "x\"; drop"] {
            assert!(SchemaName::new(bad).is_err(), "{bad} should be invalid");
        }
    }

    #[test]
    fn migrations_are_numbered_in_order_without_gaps() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1, "{}", m.name);
            assert!(m.name.starts_with(&format!("{:04}_", m.version)));
        }
    }
}
