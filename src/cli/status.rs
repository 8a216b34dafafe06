//! `outbox-relay status`: backlog, retries, dead letters, instances and lanes, queue health (dead
//! tuples, who holds the oldest snapshot), parked keys.

use std::time::Duration;

use clap::Args;
use outbox_relay::ops;

use super::{CliError, Global};

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// As JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(global: &Global, args: StatusArgs) -> Result<(), CliError> {
    let client = global.connect_installed().await?;
    let s = ops::status(&client, global.schema()).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!("schema {}", global.schema());
    println!(
        "backlog: {} rows, oldest {:.1}s, {} waiting for a retry",
        s.backlog, s.oldest_pending_seconds, s.waiting_for_retry
    );
    for b in s.backlog_by_topic_and_lane.iter().take(50) {
        println!("  {:<30} lane {:>3}: {:>8} rows, oldest {:.1}s", b.topic, b.lane, b.rows, b.oldest_seconds);
    }
    if s.backlog_by_topic_and_lane.len() > 50 {
        println!("  ... {} more (use --json)", s.backlog_by_topic_and_lane.len() - 50);
    }
    let dead: i64 = s.dead_letters_by_reason.iter().map(|(_, n)| n).sum();
    println!("dead letters: {dead}");
    for (reason, n) in &s.dead_letters_by_reason {
        println!("  {reason:<24} {n}");
    }
    let inbox_dead: i64 = s.inbox_dead_letters.iter().map(|(_, _, n)| n).sum();
    println!("inbox dead letters: {inbox_dead}");
    for (consumer, reason, n) in &s.inbox_dead_letters {
        println!("  {consumer:<24} {reason:<24} {n}");
    }
    println!("relay instances: {}", s.instances.len());
    for i in &s.instances {
        println!(
            "  {} {}:{} breaker {}, heartbeat {:.1}s ago, lanes {:?}",
            i.instance_id, i.hostname, i.pid, i.breaker_state, i.heartbeat_age_seconds, i.lanes
        );
    }
    if !s.unowned_lanes.is_empty() {
        println!(
            "lanes without an owner: {:?} (start a relay, or wait for a dead one's lanes to be taken over)",
            s.unowned_lanes
        );
    }
    println!("outbox dead tuples: {}", s.outbox_dead_tuples);
    match s.oldest_snapshots.first() {
        None => println!("oldest snapshot: none held"),
        Some(_) => {
            println!("oldest snapshots (they keep delivered rows from being cleaned up: the outbox table grows while they last):")
        }
    }
    for h in &s.oldest_snapshots {
        println!(
            "  {} pid {} {:?} from {} ({}), open {}, query {:?}",
            h.kind,
            h.pid.map_or("-".to_owned(), |p| p.to_string()),
            h.name,
            h.client,
            h.state,
            h.age_seconds.map_or("?".to_owned(), |a| format!("{a:.0}s")),
            h.query_prefix.as_deref().unwrap_or("")
        );
    }
    match s.reconciliations.is_empty() {
        true => println!("reconciliation: never run (`outbox-relay reconcile --consumer NAME`)"),
        false => println!("last reconciliation per consumer:"),
    }
    for r in &s.reconciliations {
        let f = &r.found;
        println!(
            "  {:<24} {} ago, window {} to {}: {} delivered, {} processed, {} dead-lettered, {} in flight, {} missing{}, {} unknown",
            f.consumer,
            humantime::format_duration(Duration::from_secs(r.age_seconds.max(0.0) as u64)),
            r.since.format("%Y-%m-%d %H:%M"),
            r.until.format("%Y-%m-%d %H:%M"),
            f.delivered,
            f.processed,
            f.dead_lettered,
            f.in_flight,
            f.missing,
            f.oldest_missing_at.map(|t| format!(" (oldest delivered {})", t.format("%Y-%m-%d %H:%M:%S"))).unwrap_or_default(),
            f.unknown
        );
    }
    println!("parked keys: {}", s.parked_keys.len());
    for (key, dl) in s.parked_keys.iter().take(20) {
        println!("  {key} (dead letter {dl}: replay or discard it to release the key)");
    }
    Ok(())
}
