//! The command line: one file per subcommand, flags with environment variables.

use clap::{Args, Parser, Subcommand};
use outbox_relay::db::DbConfig;
use outbox_relay::schema::SchemaName;

mod change;
mod dlq;
mod grants;
mod health;
mod inbox;
mod migrate;
mod publish;
mod reconcile;
mod run;
mod status;
mod trace;

/// Transactional outbox relay from PostgreSQL to Kafka.
#[derive(Debug, Parser)]
#[command(name = "outbox-relay", version, about)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options every subcommand takes.
#[derive(Debug, Args)]
pub(crate) struct Global {
    /// PostgreSQL URL. Put the password in the environment, a ~/.pgpass file or
    /// DATABASE_URL_FILE, never on the command line.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    database_url: Option<String>,
    /// A file holding the PostgreSQL URL (for secrets mounted as files).
    #[arg(long, env = "DATABASE_URL_FILE", global = true)]
    database_url_file: Option<std::path::PathBuf>,
    /// The PostgreSQL schema holding the outbox objects.
    #[arg(long, env = "OUTBOX_SCHEMA", default_value = "outbox", global = true)]
    schema: SchemaName,
    /// An outbox as NAME=URL#SCHEMA (NAME=#SCHEMA: on --database-url). `run` serves every one
    /// given (repeatable); the other commands act on the one given, as --database-url and
    /// --schema would.
    #[arg(long, value_name = "NAME=URL#SCHEMA", global = true)]
    pub(crate) outbox: Vec<String>,
    /// The database of the one `--outbox` a command acts on.
    #[arg(skip)]
    chosen_db: Option<DbConfig>,
    /// Log lines as JSON instead of human-readable text.
    #[arg(long, env = "OUTBOX_LOG_JSON", global = true)]
    pub(crate) log_json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install or upgrade the schema (idempotent; safe to run concurrently).
    Migrate(migrate::MigrateArgs),
    /// Run the relay: publish committed outbox rows to Kafka until SIGTERM/SIGINT.
    Run(run::RunArgs),
    /// Print least-privilege GRANT statements for the relay, a writer or a consumer role.
    Grants(grants::GrantsArgs),
    /// Inbox maintenance (purge).
    Inbox(inbox::InboxArgs),
    /// Dead letters: list, show, replay, discard, export (--inbox for the consumers').
    Dlq(dlq::DlqArgs),
    /// Backlog, retries, dead letters, instances and lanes, parked keys.
    Status(status::StatusArgs),
    /// Where one message is: pending, delivered, dead-lettered, processed by which consumers.
    Trace(trace::TraceArgs),
    /// Did every consumer process every delivered message? The archive against the inboxes.
    Reconcile(reconcile::ReconcileArgs),
    /// Ask a running relay's /healthz (or /readyz); exit 0 when healthy (for container health checks).
    Health(health::HealthArgs),
}

/// An error for the operator: what failed and what to do, already in the message.
pub(crate) type CliError = Box<dyn std::error::Error + Send + Sync>;

/// What was asked for does not exist (`trace` of an unknown id, `dlq show` of an unknown dead
/// letter): exit code [`NotFound::EXIT_CODE`], so a script can tell it from a failure (exit 1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct NotFound(pub(crate) String);

impl NotFound {
    /// The exit code for "not found".
    pub(crate) const EXIT_CODE: u8 = 3;
}

/// Messages delivered and not processed were found (`reconcile`): exit code
/// [`Missing::EXIT_CODE`], so a scheduled job can page on it and tell it from a failure (exit 1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Missing(pub(crate) String);

impl Missing {
    /// The exit code for "messages are missing".
    pub(crate) const EXIT_CODE: u8 = 4;
}

/// A time given as RFC 3339 or as a duration ago (`2h`, `3days`).
pub(crate) fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    use chrono::{DateTime, Utc};
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    match humantime::parse_duration(s) {
        Ok(d) => Ok(Utc::now() - chrono::Duration::from_std(d).map_err(|e| e.to_string())?),
        Err(_) => {
            Err(format!("{s:?} is neither an RFC 3339 time (2026-11-23T06:00:00Z) nor a duration ago (2h, 3days)"))
        }
    }
}

impl Global {
    pub(crate) fn db_config(&self) -> Result<DbConfig, CliError> {
        if let Some(db) = &self.chosen_db {
            return Ok(db.clone());
        }
        let url = match (&self.database_url, &self.database_url_file) {
            (_, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read DATABASE_URL_FILE {}: {e}", path.display()))?
                .trim()
                .to_owned(),
            (Some(url), None) => url.clone(),
            (None, None) => {
                return Err("no database given: set DATABASE_URL (or DATABASE_URL_FILE, or --database-url)".into())
            }
        };
        Ok(DbConfig::parse(&url)?)
    }

    /// A session on the database, once the schema is known to be installed at this build's version
    /// (else the error says to run `migrate`). What every operator command starts with.
    pub(crate) async fn connect_installed(&self) -> Result<tokio_postgres::Client, CliError> {
        let client = self.db_config()?.connect().await?;
        outbox_relay::schema::check_installed(&client, self.schema()).await?;
        Ok(client)
    }

    pub(crate) fn schema(&self) -> &SchemaName {
        &self.schema
    }

    /// The outboxes `--outbox` names, parsed (`NAME=#SCHEMA` on --database-url).
    pub(crate) fn outboxes(&self) -> Result<Vec<outbox_relay::relay::OutboxSpec>, CliError> {
        let default = match (&self.database_url, &self.database_url_file) {
            (None, None) => None,
            _ => Some(self.db_config()?),
        };
        Ok(self
            .outbox
            .iter()
            .map(|o| outbox_relay::relay::OutboxSpec::parse(o, default.as_ref()))
            .collect::<Result<_, _>>()?)
    }

    /// For the commands that act on one outbox: `--outbox` stands for --database-url and --schema.
    fn one_outbox(&mut self) -> Result<(), CliError> {
        let mut all = self.outboxes()?;
        match all.len() {
            0 => Ok(()),
            1 => {
                let one = all.remove(0);
                self.schema = one.schema;
                self.chosen_db = Some(one.db);
                Ok(())
            }
            n => Err(format!(
                "--outbox names {n} outboxes; this command acts on one: give one --outbox (or --database-url and --schema)"
            )
            .into()),
        }
    }
}

pub(crate) fn init_logging(global: &Global) {
    // The PostgreSQL driver logs statement parameters at debug level: keep it at info unless the
    // operator names it explicitly, so `OUTBOX_LOG=debug` cannot put data in the logs.
    let mut directives = std::env::var("OUTBOX_LOG").unwrap_or_else(|_| "info".to_owned());
    if !directives.contains("tokio_postgres") {
        directives.push_str(",tokio_postgres=info");
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&directives).unwrap_or_else(|e| {
        eprintln!("warning: OUTBOX_LOG={directives:?} is not a valid filter ({e}); logging at info");
        tracing_subscriber::EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if global.log_json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

pub(crate) async fn dispatch(mut cli: Cli) -> Result<(), CliError> {
    if !matches!(cli.command, Command::Run(_)) {
        cli.global.one_outbox()?;
    }
    match cli.command {
        Command::Migrate(args) => migrate::run(&cli.global, args).await,
        Command::Run(args) => run::run(&cli.global, args).await,
        Command::Grants(args) => grants::run(&cli.global, args),
        Command::Inbox(args) => inbox::run(&cli.global, args).await,
        Command::Dlq(args) => dlq::run(&cli.global, args).await,
        Command::Status(args) => status::run(&cli.global, args).await,
        Command::Trace(args) => trace::run(&cli.global, args).await,
        Command::Reconcile(args) => reconcile::run(&cli.global, args).await,
        Command::Health(args) => health::run(args).await,
    }
}
