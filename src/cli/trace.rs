//! `outbox-relay trace <message-id>`: where one message is.

use clap::Args;
use outbox_relay::db::DbConfig;
use outbox_relay::ops;
use uuid::Uuid;

use super::{CliError, Global, NotFound};

#[derive(Debug, Args)]
pub(crate) struct TraceArgs {
    /// The message id (the ce_id header).
    #[arg(value_parser = parse_id)]
    id: Uuid,
    /// The consumers' database, when it is not the outbox's (default: the same database).
    #[arg(long, env = "INBOX_DATABASE_URL", hide_env_values = true)]
    inbox_database_url: Option<String>,
    /// As JSON.
    #[arg(long)]
    json: bool,
}

fn parse_id(s: &str) -> Result<Uuid, String> {
    Uuid::parse_str(s).map_err(|_| format!("{s:?} is not a message id (a UUID, the ce_id header of the record)"))
}

pub(crate) async fn run(global: &Global, args: TraceArgs) -> Result<(), CliError> {
    let client = global.connect_installed().await?;
    let inbox = match &args.inbox_database_url {
        Some(url) => Some(DbConfig::parse(url)?.connect().await?),
        None => None,
    };
    let inbox_ref = inbox.as_ref().unwrap_or(&client);
    let t = ops::trace(&client, Some(inbox_ref), global.schema(), args.id).await?;
    let found = t.pending.is_some()
        || !t.delivered.is_empty()
        || t.dead_letter.is_some()
        || !t.processed_by.is_empty()
        || !t.inbox_dead_letters.is_empty()
        || !t.audit.is_empty();
    let not_found = || {
        NotFound(format!(
            "message {} was found nowhere: not pending, not dead-lettered, not processed by a consumer of this \
             database, no operator action; delivered rows are only kept with `run --archive` (check the id, \
             --schema and --inbox-database-url)",
            args.id
        ))
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&t)?);
        return if found { Ok(()) } else { Err(not_found().into()) };
    }
    println!("message {}", args.id);
    if let Some(p) = &t.pending {
        println!("  pending in the outbox: {p}");
    }
    for d in &t.delivered {
        println!("  delivered: {d}");
    }
    if let Some(d) = &t.dead_letter {
        println!("  dead-lettered: {d}");
    }
    for p in &t.processed_by {
        println!("  processed by consumer: {p}");
    }
    for d in &t.inbox_dead_letters {
        println!("  dead-lettered by consumer: {d}");
    }
    for a in &t.audit {
        println!("  operator action: {a}");
    }
    if !found {
        return Err(not_found().into());
    }
    Ok(())
}
