//! `outbox-relay trace <message-id>`: where one message is.

use clap::Args;
use outbox_relay::db::DbConfig;
use outbox_relay::ops;
use uuid::Uuid;

use super::{CliError, Global};

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
    let client = global.db_config()?.connect().await?;
    outbox_relay::schema::check_installed(&client, global.schema()).await?;
    let inbox = match &args.inbox_database_url {
        Some(url) => Some(DbConfig::parse(url)?.connect().await?),
        None => None,
    };
    let inbox_ref = inbox.as_ref().unwrap_or(&client);
    let t = ops::trace(&client, Some(inbox_ref), global.schema(), args.id).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&t)?);
        return Ok(());
    }
    println!("message {}", args.id);
    let mut found = false;
    if let Some(p) = &t.pending {
        found = true;
        println!("  pending in the outbox: {p}");
    }
    for d in &t.delivered {
        found = true;
        println!("  delivered: {d}");
    }
    if let Some(d) = &t.dead_letter {
        found = true;
        println!("  dead-lettered: {d}");
    }
    for p in &t.processed_by {
        found = true;
        println!("  processed by consumer: {p}");
    }
    for d in &t.inbox_dead_letters {
        found = true;
        println!("  dead-lettered by consumer: {d}");
    }
    for a in &t.audit {
        println!("  operator action: {a}");
    }
    if !found {
        println!(
            "  not pending, not dead-lettered, not processed by a consumer of this database; \
             delivered rows are only kept with `run --archive`"
        );
    }
    Ok(())
}
