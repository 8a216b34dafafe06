//! What the operator commands read and change: dead letters (list, show, replay, discard,
//! export), the status of the relay, and where one message is. Every replay and discard writes an
//! audit row in the same transaction as the change.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

mod dead_letters;
pub mod reconcile;
mod status;
mod trace;

pub use dead_letters::*;
pub use status::*;
pub use trace::*;

/// Which dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The relay's (`dead_letters`), ids are message UUIDs.
    Relay,
    /// The consumers' (`inbox_dead_letters`), ids are numbers.
    Inbox,
}

/// A bad filter or argument, said so the operator can fix it.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// An argument cannot be used.
    #[error("{0}")]
    BadArgument(String),
    /// Nothing matched an explicit id.
    #[error("no {which} dead letter with id {id}: check `outbox-relay dlq list{flag}`", which = match .kind { Source::Relay => "relay", Source::Inbox => "inbox" }, flag = match .kind { Source::Relay => "", Source::Inbox => " --inbox" })]
    UnknownId {
        /// Which dead letters.
        kind: Source,
        /// The id.
        id: String,
    },
    /// The schema is missing, not migrated, or its settings are broken.
    #[error(transparent)]
    Schema(#[from] crate::schema::MigrateError),
    /// The database refused.
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// Filters for dead letters.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this topic.
    pub topic: Option<String>,
    /// Only this key.
    pub key: Option<String>,
    /// Only this reason.
    pub reason: Option<String>,
    /// Dead-lettered at or after.
    pub since: Option<DateTime<Utc>>,
    /// Dead-lettered before.
    pub until: Option<DateTime<Utc>>,
    /// Only these ids (UUIDs for relay dead letters, numbers for inbox ones).
    pub ids: Vec<String>,
    /// Only this consumer (inbox).
    pub consumer: Option<String>,
}

impl Filter {
    /// Checks the filter for `source`; errors say what is wrong.
    pub fn validate(&self, source: Source) -> Result<(), OpsError> {
        if let (Some(a), Some(b)) = (self.since, self.until) {
            if a >= b {
                return Err(OpsError::BadArgument(format!("bad time range: --since {a} is not before --until {b}")));
            }
        }
        for id in &self.ids {
            let ok = match source {
                Source::Relay => Uuid::parse_str(id).is_ok(),
                Source::Inbox => id.parse::<i64>().is_ok(),
            };
            if !ok {
                return Err(OpsError::BadArgument(match source {
                    Source::Relay => format!("--id {id:?} is not a message id (a UUID such as 01a2...-7...)"),
                    Source::Inbox => {
                        format!("--id {id:?} is not an inbox dead-letter id (a number; see dlq list --inbox)")
                    }
                }));
            }
        }
        if self.consumer.is_some() && source == Source::Relay {
            return Err(OpsError::BadArgument("--consumer filters inbox dead letters: add --inbox".into()));
        }
        Ok(())
    }

    /// The WHERE clause and its parameters.
    fn sql(&self, source: Source) -> (String, Vec<Box<dyn ToSql + Sync + Send>>) {
        let mut cond = vec!["true".to_owned()];
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let mut add = |c: &str, p: Box<dyn ToSql + Sync + Send>, params: &mut Vec<Box<dyn ToSql + Sync + Send>>| {
            params.push(p);
            cond.push(c.replace('?', &format!("${}", params.len())));
        };
        if let Some(t) = &self.topic {
            add("topic = ?", Box::new(t.clone()), &mut params);
        }
        if let Some(k) = &self.key {
            match source {
                Source::Relay => add("key = ?", Box::new(k.clone()), &mut params),
                Source::Inbox => add("key = convert_to(?, 'UTF8')", Box::new(k.clone()), &mut params),
            }
        }
        if let Some(r) = &self.reason {
            add("reason = ?", Box::new(r.clone()), &mut params);
        }
        if let Some(s) = self.since {
            add("dead_lettered_at >= ?", Box::new(s), &mut params);
        }
        if let Some(u) = self.until {
            add("dead_lettered_at < ?", Box::new(u), &mut params);
        }
        if let Some(c) = &self.consumer {
            add("consumer = ?", Box::new(c.clone()), &mut params);
        }
        if !self.ids.is_empty() {
            match source {
                Source::Relay => {
                    let ids: Vec<Uuid> = self.ids.iter().filter_map(|i| Uuid::parse_str(i).ok()).collect();
                    add("id = ANY(?)", Box::new(ids), &mut params);
                }
                Source::Inbox => {
                    let ids: Vec<i64> = self.ids.iter().filter_map(|i| i.parse().ok()).collect();
                    add("dead_letter_id = ANY(?)", Box::new(ids), &mut params);
                }
            }
        }
        (cond.join(" AND "), params)
    }
}
