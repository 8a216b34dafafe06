//! What every bulk change of the operator commands shares: `--dry-run`, confirmation before more
//! than one row changes (and `--yes` without a terminal), and who acts and why for the audit rows.

use std::io::IsTerminal;

use clap::Args;
use outbox_relay::ops::Audit;

use super::CliError;

#[derive(Debug, Args, Clone)]
pub(super) struct Change {
    /// Show what would change, change nothing.
    #[arg(long)]
    pub(super) dry_run: bool,
    /// Do not ask for confirmation (needed without a terminal when more than one matches).
    #[arg(long)]
    pub(super) yes: bool,
    /// Who is acting, for the audit log (default: the OS user).
    #[arg(long)]
    pub(super) actor: Option<String>,
    /// Why, for the audit log.
    #[arg(long)]
    pub(super) why: Option<String>,
}

/// Who acts, for the audit rows: `--actor`, else the OS user.
pub(super) fn actor(change: &Change) -> Audit {
    let actor = change
        .actor
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .or_else(|| std::env::var("LOGNAME").ok())
        .unwrap_or_else(|| "unknown".to_owned());
    Audit { actor, why: change.why.clone() }
}

/// Asks before a bulk change of `n` `what` ("dead letters"); without a terminal, --yes is required.
pub(super) fn confirm(verb: &str, what: &str, n: usize, change: &Change) -> Result<(), CliError> {
    if change.yes || n <= 1 {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(format!(
            "refusing to {verb} {n} {what} without confirmation: add --yes (or --dry-run to list them first)"
        )
        .into());
    }
    eprint!("{verb} {n} {what}? [y/N] ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if matches!(answer.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        Err("nothing changed".into())
    }
}
