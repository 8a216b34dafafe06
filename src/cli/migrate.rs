//! `outbox-relay migrate`: install or upgrade the schema.

use clap::Args;
use outbox_relay::schema;

use super::{CliError, Global};

#[derive(Debug, Args)]
pub(crate) struct MigrateArgs {
    /// Lane count, chosen once when the schema is installed (default 16). Per-key order is kept
    /// inside a lane; lanes are what relay instances share, so pick at least the number of
    /// instances you will run.
    #[arg(long, env = "OUTBOX_LANES")]
    lanes: Option<u16>,
}

pub(crate) async fn run(global: &Global, args: MigrateArgs) -> Result<(), CliError> {
    let config = global.db_config()?.with_statement_timeout(None);
    let mut client = config.connect().await?;
    let report = schema::migrate(&mut client, global.schema(), args.lanes).await?;
    if report.applied.is_empty() {
        println!(
            "schema {} is up to date (migration {}, {} lanes)",
            global.schema(),
            schema::latest_version(),
            report.lanes
        );
    } else {
        println!("schema {}: applied migrations {:?} ({} lanes)", global.schema(), report.applied, report.lanes);
    }
    Ok(())
}
