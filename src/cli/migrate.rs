//! `outbox-relay migrate`: install or upgrade the schema, or every schema matching a pattern
//! (one per tenant), each in its own transaction.

use clap::Args;
use outbox_relay::schema::{self, SchemaName};

use super::{CliError, Global};

#[derive(Debug, Args)]
pub(crate) struct MigrateArgs {
    /// Lane count, chosen once when the schema is installed (default 16). Per-key order is kept
    /// inside a lane; lanes are what relay instances share, so pick at least the number of
    /// instances you will run.
    #[arg(long, env = "OUTBOX_LANES")]
    lanes: Option<u16>,
    /// Install or upgrade every existing schema whose name matches this SQL LIKE pattern
    /// (`tenant_%`) instead of --schema; each in its own transaction, reported one by one.
    /// --lanes then applies to the schemas installed now, not to those installed before.
    #[arg(long)]
    schema_pattern: Option<String>,
}

pub(crate) async fn run(global: &Global, args: MigrateArgs) -> Result<(), CliError> {
    let config = global.db_config()?.with_statement_timeout(None);
    let mut client = config.connect().await?;
    let Some(pattern) = &args.schema_pattern else {
        println!("{}", migrate_one(&mut client, global.schema(), args.lanes).await?);
        return Ok(());
    };
    let names: Vec<String> = client
        .query("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE $1 ORDER BY nspname", &[pattern])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if names.is_empty() {
        return Err(format!(
            "no schema matches --schema-pattern {pattern:?}: create the tenants' schemas first (CREATE SCHEMA), or \
             check the pattern (SQL LIKE: % is any run of characters, _ any one character; escape a literal _ as \\_)"
        )
        .into());
    }
    let mut failed = Vec::new();
    for (n, name) in names.iter().enumerate() {
        let outcome = match SchemaName::new(name) {
            Ok(s) => {
                // --lanes is for the schemas installed now: one installed earlier keeps its count.
                let installed: bool = client
                    .query_one("SELECT to_regclass($1) IS NOT NULL", &[&format!("{}.migrations", s.ident())])
                    .await?
                    .get(0);
                let lanes = if installed { None } else { args.lanes };
                migrate_one(&mut client, &s, lanes).await.map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(line) => println!("[{}/{}] {line}", n + 1, names.len()),
            Err(e) => {
                println!("[{}/{}] schema {name}: FAILED: {e}", n + 1, names.len());
                failed.push(name.clone());
            }
        }
    }
    if failed.is_empty() {
        println!("{} schemas matching {pattern:?} are at migration {}", names.len(), schema::latest_version());
        Ok(())
    } else {
        Err(format!(
            "{} of {} schemas failed ({}); the others were migrated: fix the cause printed for each and run the \
             same command again (migrated schemas are left as they are)",
            failed.len(),
            names.len(),
            failed.join(", ")
        )
        .into())
    }
}

/// Migrates one schema in its own transaction; the line that reports it.
async fn migrate_one(
    client: &mut tokio_postgres::Client,
    s: &SchemaName,
    lanes: Option<u16>,
) -> Result<String, schema::MigrateError> {
    let report = schema::migrate(client, s, lanes).await?;
    Ok(if report.applied.is_empty() {
        format!("schema {s} is up to date (migration {}, {} lanes)", schema::latest_version(), report.lanes)
    } else {
        format!("schema {s}: applied migrations {:?} ({} lanes)", report.applied, report.lanes)
    })
}
