//! `outbox-relay reconcile`: did every consumer process every message the relay delivered? The
//! archive of `run --archive` against the consumers' inboxes over a window; exit code 4 when
//! messages are missing, and `--replay-missing` to re-publish them.

use std::io::Write;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::Args;
use outbox_relay::db::DbConfig;
use outbox_relay::ops::reconcile::{self, MissingMessage, Progress, ReconcileRequest, Reconciliation};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};

use super::change::{actor, confirm, Change};
use super::publish::{publish_awaited, KafkaTarget};
use super::{parse_time, CliError, Global, Missing};

/// Statements of a reconciliation of millions of rows take seconds, not the operator commands'
/// usual 30 s at most.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long reading one missing record back from the broker may take.
const FETCH_WITHIN: Duration = Duration::from_secs(15);

#[derive(Debug, Args)]
pub(crate) struct ReconcileArgs {
    /// A consumer (inbox name) to check; repeatable.
    #[arg(long = "consumer", required = true)]
    consumers: Vec<String>,
    /// Deliveries at or after: an RFC 3339 time, or a duration ago (2h, 3days).
    #[arg(long, value_parser = parse_time, default_value = "24h")]
    since: DateTime<Utc>,
    /// Deliveries before: an RFC 3339 time, or a duration ago (default: now).
    #[arg(long, value_parser = parse_time)]
    until: Option<DateTime<Utc>>,
    /// Unprocessed deliveries younger than this are in flight, not missing.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    grace: Duration,
    /// Only this Kafka topic.
    #[arg(long)]
    topic: Option<String>,
    /// The consumers' database, when it is not the outbox's (default: the same database).
    #[arg(long, env = "INBOX_DATABASE_URL", hide_env_values = true)]
    inbox_database_url: Option<String>,
    /// As JSON (the missing messages up to --limit per consumer included).
    #[arg(long)]
    json: bool,
    /// At most this many missing messages per consumer listed (JSON) and replayed.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(i64).range(1..=10_000_000))]
    limit: i64,
    /// Re-publish the missing messages to their topic (read back from the broker at their offset,
    /// same key, headers and id, so consumers that did process them skip them).
    #[arg(long)]
    replay_missing: bool,
    #[command(flatten)]
    change: Change,
    #[command(flatten)]
    kafka: KafkaTarget,
}

pub(crate) async fn run(global: &Global, args: ReconcileArgs) -> Result<(), CliError> {
    let until = args.until.unwrap_or_else(Utc::now);
    let connect = |db: DbConfig| async move {
        db.with_statement_timeout(Some(STATEMENT_TIMEOUT))
            .with_application_name("outbox-relay reconcile")
            .connect()
            .await
    };
    let outbox = connect(global.db_config()?).await?;
    outbox_relay::schema::check_installed(&outbox, global.schema()).await?;
    let inbox = match &args.inbox_database_url {
        Some(url) => {
            let c = connect(DbConfig::parse(url)?).await?;
            outbox_relay::schema::check_installed(&c, global.schema())
                .await
                .map_err(|e| format!("the consumers' database (--inbox-database-url): {e}"))?;
            Some(c)
        }
        None => None,
    };
    inbox.as_ref().unwrap_or(&outbox).batch_execute(reconcile::SESSION_SETTINGS).await?;
    let req = ReconcileRequest {
        consumers: args.consumers.clone(),
        since: args.since,
        until,
        grace: args.grace,
        topic: args.topic.clone(),
        list_limit: args.limit,
    };
    let mut show = |p: Progress| match p {
        Progress::Staged { rows, elapsed } => {
            eprintln!("staged {rows} deliveries of the window ({:.1}s)", elapsed.as_secs_f64())
        }
        Progress::Consumer { consumer, tally, elapsed } => eprintln!(
            "consumer {consumer:?}: {} delivered, {} missing ({:.1}s)",
            tally.delivered,
            tally.missing,
            elapsed.as_secs_f64()
        ),
    };
    let r = reconcile::reconcile(&outbox, inbox.as_ref(), global.schema(), &req, &mut show).await?;
    let audit = actor(&args.change);
    reconcile::record(&outbox, global.schema(), &r, &audit.actor).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print_human(&r)?;
    }
    let missing = r.missing_total();
    if missing == 0 {
        return Ok(());
    }
    if args.replay_missing {
        return replay_missing(&outbox, global, &args, &r).await;
    }
    Err(Missing(format!(
        "{missing} delivered messages were not processed (listed above, with topic, partition and offset): let the \
         consumer re-consume them from those offsets, or re-publish them with `outbox-relay reconcile \
         --replay-missing` (same ids: a consumer that did process one skips it)"
    ))
    .into())
}

fn print_human(r: &Reconciliation) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "deliveries from {} to {}; unprocessed ones after {} (grace {:.0}s) count as in flight",
        r.since.format("%Y-%m-%d %H:%M:%S"),
        r.until.format("%Y-%m-%d %H:%M:%S"),
        r.cutoff.format("%Y-%m-%d %H:%M:%S"),
        r.grace_seconds
    )?;
    writeln!(
        out,
        "the archive holds deliveries from {} to {}",
        r.archive_oldest.format("%Y-%m-%d %H:%M:%S"),
        r.archive_newest.format("%Y-%m-%d %H:%M:%S")
    )?;
    for w in &r.warnings {
        writeln!(out, "warning: {w}")?;
    }
    writeln!(
        out,
        "\n{:<20} {:<28} {:>10} {:>10} {:>13} {:>10} {:>8} {:>8}",
        "consumer", "topic", "delivered", "processed", "dead-lettered", "in flight", "missing", "unknown"
    )?;
    for c in &r.consumers {
        let topics: Vec<_> = r.by_topic.iter().filter(|t| t.consumer == c.consumer).collect();
        // A consumer's total (topic `*`) when it read more than one topic.
        let total = if topics.len() > 1 { Some(c) } else { None };
        for t in topics.into_iter().chain(total) {
            writeln!(
                out,
                "{:<20} {:<28} {:>10} {:>10} {:>13} {:>10} {:>8} {:>8}",
                t.consumer, t.topic, t.delivered, t.processed, t.dead_lettered, t.in_flight, t.missing, t.unknown
            )?;
        }
    }
    if r.by_topic.is_empty() {
        writeln!(out, "(nothing delivered in the window, nothing processed from outside it)")?;
    }
    const SHOWN: usize = 20;
    for c in r.consumers.iter().filter(|c| c.missing > 0) {
        writeln!(out, "\nmissing for consumer {:?} (by topic, partition and offset):", c.consumer)?;
        writeln!(
            out,
            "  {:<36} {:<28} {:>9} {:>12} {:>5} {:>12}  delivered",
            "id", "topic", "partition", "offset", "lane", "seq"
        )?;
        let listed: Vec<&MissingMessage> = r.missing.iter().filter(|m| m.consumer == c.consumer).collect();
        for m in listed.iter().take(SHOWN) {
            writeln!(
                out,
                "  {:<36} {:<28} {:>9} {:>12} {:>5} {:>12}  {}",
                m.id,
                m.topic,
                m.partition,
                m.offset,
                m.lane,
                m.seq,
                m.delivered_at.format("%Y-%m-%d %H:%M:%S")
            )?;
        }
        if c.missing as usize > SHOWN {
            writeln!(
                out,
                "  ... and {} more (--json lists up to --limit)",
                c.missing as usize - SHOWN.min(listed.len())
            )?;
        }
    }
    writeln!(out, "\nreconciled in {:.1}s (run {})", r.elapsed_seconds, r.run_id)
}

/// Re-publishes every listed missing message: read back from the broker at its offset (the
/// archive keeps no payload), sent again with the same key, headers and id, then audited.
async fn replay_missing(
    outbox: &tokio_postgres::Client,
    global: &Global,
    args: &ReconcileArgs,
    r: &Reconciliation,
) -> Result<(), CliError> {
    // A message missing for two consumers goes out once: both read the topic.
    let mut todo: Vec<&MissingMessage> = Vec::new();
    for m in &r.missing {
        if !todo.iter().any(|t| t.id == m.id) {
            todo.push(m);
        }
    }
    if args.change.dry_run {
        println!("dry run: would re-publish {} missing messages; nothing sent", todo.len());
        return Ok(());
    }
    confirm("re-publish", "missing messages", todo.len(), &args.change)?;
    let audit = actor(&args.change);
    let producer = args.kafka.producer("--replay-missing re-publishes the missing messages")?;
    let mut cfg = args.kafka.client_config("--replay-missing reads the missing messages back from the broker")?;
    cfg.set("group.id", "outbox-relay-reconcile")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "error")
        .set("fetch.wait.max.ms", "10")
        .set("socket.timeout.ms", "10000");
    let reader: BaseConsumer = cfg.create()?;
    let (mut done, mut gone) = (0usize, Vec::new());
    for (n, m) in todo.iter().enumerate() {
        // Reading back blocks on librdkafka's poll: off the runtime's worker.
        let fetched = tokio::task::block_in_place(|| fetch(&reader, m));
        let record = match fetched {
            Ok(rec) => rec,
            Err(why) => {
                gone.push(format!("{} ({} [{}] @ {}): {why}", m.id, m.topic, m.partition, m.offset));
                continue;
            }
        };
        let mut headers = OwnedHeaders::new();
        if let Some(h) = record.headers() {
            for x in h.iter() {
                headers = headers.insert(Header { key: x.key, value: x.value });
            }
        }
        headers = headers.insert(Header { key: "outbox_replayed_by", value: Some("reconcile") });
        let rec = outbox_relay::relay::envelope::record(&m.topic, record.key(), record.payload(), headers);
        let at =
            publish_awaited(&producer, rec, &format!("re-publishing missing message {} to {}", m.id, m.topic)).await?;
        reconcile::replayed(outbox, global.schema(), m, at, &audit).await?;
        done += 1;
        if todo.len() > 100 && (n + 1) % 100 == 0 {
            eprintln!("re-published {}/{}", n + 1, todo.len());
        }
    }
    println!(
        "re-published {done} missing messages with their ids (audit rows written, actor {}); reconcile again once \
         the consumers had time to process them",
        audit.actor
    );
    if gone.is_empty() {
        Ok(())
    } else {
        Err(Missing(format!(
            "{} missing messages could not be read back from the broker, so they were not re-published (the topic's \
             retention removed them, or the offset holds another record): {}; their ids are in the archive: write \
             them again from their source",
            gone.len(),
            gone.join("; ")
        ))
        .into())
    }
}

/// Reads the record at `m`'s offset, and checks it is that message.
fn fetch(reader: &BaseConsumer, m: &MissingMessage) -> Result<OwnedMessage, String> {
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(&m.topic, m.partition, rdkafka::Offset::Offset(m.offset)).map_err(|e| e.to_string())?;
    reader.assign(&tpl).map_err(|e| format!("cannot read the partition: {e}"))?;
    let deadline = std::time::Instant::now() + FETCH_WITHIN;
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match reader.poll(left.min(Duration::from_millis(500))) {
            Some(Ok(msg)) if msg.topic() == m.topic && msg.partition() == m.partition => {
                if msg.offset() != m.offset {
                    return Err(format!("the partition no longer holds offset {} (it starts later)", m.offset));
                }
                let id = msg
                    .headers()
                    .and_then(|h| h.iter().find(|x| x.key == outbox_relay::outbox::ID_HEADER))
                    .and_then(|x| x.value)
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|v| uuid::Uuid::parse_str(v).ok());
                if id != Some(m.id) {
                    return Err("the offset holds another message".into());
                }
                return Ok(msg.detach());
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("reading it back failed: {e}")),
            None => {}
        }
    }
    Err(format!("not read back within {FETCH_WITHIN:?} (check the broker)"))
}
