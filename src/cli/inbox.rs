//! `outbox-relay inbox ...`: inbox maintenance.

use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use outbox_relay::inbox::Inbox;

use super::{CliError, Global};

#[derive(Debug, Args)]
pub(crate) struct InboxArgs {
    #[command(subcommand)]
    command: InboxCommand,
}

#[derive(Debug, Subcommand)]
enum InboxCommand {
    /// Delete a consumer's inbox rows older than the retention, in chunks, showing progress.
    Purge {
        /// The consumer name whose rows to purge.
        #[arg(long)]
        consumer: String,
        /// Rows processed longer ago than this are deleted (ids older than this are no longer
        /// recognised as duplicates: keep it above any redelivery you expect).
        #[arg(long, default_value = "7days", value_parser = humantime::parse_duration)]
        older_than: Duration,
        /// Rows per statement.
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(i64).range(1..=1_000_000))]
        chunk: i64,
    },
}

pub(crate) async fn run(global: &Global, args: InboxArgs) -> Result<(), CliError> {
    match args.command {
        InboxCommand::Purge { consumer, older_than, chunk } => {
            let client = global.connect_installed().await?;
            let inbox = Inbox::new(global.schema().clone(), &consumer)?;
            let started = Instant::now();
            let total = outbox_relay::db::in_chunks(
                chunk,
                || inbox.purge_chunk(&client, older_than, chunk),
                |total| {
                    if total > 0 {
                        eprintln!("purged {total} rows so far ({:.1}s)", started.elapsed().as_secs_f64());
                    }
                },
            )
            .await?;
            println!(
                "purged {total} inbox rows of consumer {consumer:?} older than {}",
                humantime::format_duration(older_than)
            );
            Ok(())
        }
    }
}
