//! `outbox-relay grants`: print least-privilege GRANT statements for a role.

use clap::{Args, ValueEnum};
use outbox_relay::schema::{grants_sql, GrantsFor};

use super::{CliError, Global};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Who {
    Relay,
    Writer,
    Consumer,
}

#[derive(Debug, Args)]
pub(crate) struct GrantsArgs {
    /// The role to grant to (it must exist).
    #[arg(long)]
    role: String,
    /// What the role does.
    #[arg(long = "for", value_enum, default_value = "relay")]
    who: Who,
}

pub(crate) fn run(global: &Global, args: GrantsArgs) -> Result<(), CliError> {
    let who = match args.who {
        Who::Relay => GrantsFor::Relay,
        Who::Writer => GrantsFor::Writer,
        Who::Consumer => GrantsFor::Consumer,
    };
    print!("{}", grants_sql(global.schema(), &args.role, who));
    Ok(())
}
