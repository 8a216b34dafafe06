//! `outbox-relay dlq list | show | replay | discard | export`, for the relay's dead letters and,
//! with `--inbox`, the consumers'.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use outbox_relay::ops::{self, Audit, DeadLetterView, Filter, OpsError, Source};
use uuid::Uuid;

use super::change::{actor, confirm, Change};
use super::publish::{publish_awaited, KafkaTarget};
use super::{parse_time, CliError, Global, NotFound};

#[derive(Debug, Args)]
pub(crate) struct DlqArgs {
    #[command(subcommand)]
    command: DlqCommand,
}

#[derive(Debug, Args, Clone)]
struct Filters {
    /// The consumers' dead letters (inbox_dead_letters) instead of the relay's.
    #[arg(long)]
    inbox: bool,
    /// Only this topic.
    #[arg(long)]
    topic: Option<String>,
    /// Only this key.
    #[arg(long)]
    key: Option<String>,
    /// Only this reason (message_too_large, retries_exhausted, handler_failed, ...).
    #[arg(long)]
    reason: Option<String>,
    /// Dead-lettered at or after: an RFC 3339 time, or a duration ago (2h, 3days).
    #[arg(long, value_parser = parse_time)]
    since: Option<DateTime<Utc>>,
    /// Dead-lettered before: an RFC 3339 time, or a duration ago.
    #[arg(long, value_parser = parse_time)]
    until: Option<DateTime<Utc>>,
    /// Only this id (repeatable): a message id, or with --inbox a dead-letter number.
    #[arg(long = "id")]
    ids: Vec<String>,
    /// Ids given as arguments: the same as `--id` for each (`dlq replay ID...`).
    #[arg(value_name = "ID")]
    positional_ids: Vec<String>,
    /// Only this consumer (with --inbox).
    #[arg(long)]
    consumer: Option<String>,
    /// At most this many.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=10_000_000))]
    limit: i64,
}

impl Filters {
    fn source(&self) -> Source {
        if self.inbox {
            Source::Inbox
        } else {
            Source::Relay
        }
    }

    /// Every id asked for, as `--id` or as an argument.
    fn all_ids(&self) -> Vec<String> {
        self.ids.iter().chain(&self.positional_ids).cloned().collect()
    }

    fn filter(&self) -> Filter {
        Filter {
            topic: self.topic.clone(),
            key: self.key.clone(),
            reason: self.reason.clone(),
            since: self.since,
            until: self.until,
            ids: self.all_ids(),
            consumer: self.consumer.clone(),
        }
    }

    fn narrows(&self) -> bool {
        self.topic.is_some()
            || self.key.is_some()
            || self.reason.is_some()
            || self.since.is_some()
            || self.until.is_some()
            || !self.all_ids().is_empty()
            || self.consumer.is_some()
    }
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// List dead letters, newest first.
    List {
        #[command(flatten)]
        filters: Filters,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter in full, payload included.
    Show {
        /// The id (a message id, or with --inbox a dead-letter number).
        #[arg(required_unless_present = "id_flag", conflicts_with = "id_flag")]
        id: Option<String>,
        /// The same id as a flag, as the other dlq commands take it.
        #[arg(long = "id", value_name = "ID")]
        id_flag: Option<String>,
        /// An inbox dead letter.
        #[arg(long)]
        inbox: bool,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back: relay ones into the outbox (same id, attempts reset), inbox ones
    /// re-published to their topic (or --retry-topic).
    Replay {
        #[command(flatten)]
        filters: Filters,
        #[command(flatten)]
        change: Change,
        /// Act on every dead letter (up to --limit) when no filter is given.
        #[arg(long)]
        all: bool,
        /// At most this many per second (bulk replays).
        #[arg(long)]
        rate: Option<u32>,
        /// With --inbox: publish to this topic instead of the original one.
        #[arg(long)]
        retry_topic: Option<String>,
        /// With --inbox: where to publish.
        #[command(flatten)]
        kafka: KafkaTarget,
    },
    /// Delete dead letters, keeping an audit record of each.
    Discard {
        #[command(flatten)]
        filters: Filters,
        #[command(flatten)]
        change: Change,
        /// Act on every dead letter (up to --limit) when no filter is given.
        #[arg(long)]
        all: bool,
    },
    /// Write dead letters as JSON lines (payload included) to a file or standard output.
    Export {
        #[command(flatten)]
        filters: Filters,
        /// The file (default: standard output).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

fn print_list(items: &[DeadLetterView], json: bool) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    if json {
        for i in items {
            writeln!(out, "{}", serde_json::to_string(i)?)?;
        }
        return Ok(());
    }
    if items.is_empty() {
        writeln!(out, "no dead letters match")?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<38} {:<24} {:<20} {:<22} {:>8}  {:<20}  error",
        "id", "topic", "key", "reason", "attempts", "dead-lettered"
    )?;
    for i in items {
        let err: String = i.error.as_deref().unwrap_or("").chars().take(60).collect();
        writeln!(
            out,
            "{:<38} {:<24} {:<20} {:<22} {:>8}  {:<20}  {}",
            i.id,
            i.topic,
            i.key.as_deref().unwrap_or("-"),
            i.reason,
            i.attempts,
            i.dead_lettered_at.format("%Y-%m-%d %H:%M:%S"),
            err
        )?;
    }
    Ok(())
}

/// `--dry-run`: lists what would change and returns `None`. Otherwise asks for confirmation (see
/// `confirm`) and returns who acts, for the audit rows.
fn preview_or_confirm(verb: &str, items: &[DeadLetterView], change: &Change) -> Result<Option<Audit>, CliError> {
    if change.dry_run {
        print_list(items, false)?;
        println!("dry run: would {verb} {} dead letters; nothing changed", items.len());
        return Ok(None);
    }
    confirm(verb, "dead letters", items.len(), change)?;
    Ok(Some(actor(change)))
}

async fn matched(
    client: &tokio_postgres::Client,
    global: &Global,
    filters: &Filters,
    all: bool,
) -> Result<Vec<DeadLetterView>, CliError> {
    if !filters.narrows() && !all {
        return Err("give a filter (--id, --topic, --key, --reason, --since, --until, --consumer) or --all".into());
    }
    // Every id asked for is looked at, however many: --limit caps what filters match, not a list.
    let limit = filters.limit.max(filters.all_ids().len() as i64);
    let items = ops::list(client, global.schema(), filters.source(), &filters.filter(), limit, false).await?;
    for id in &filters.all_ids() {
        if !items.iter().any(|i| &i.id == id) {
            return Err(NotFound(OpsError::UnknownId { kind: filters.source(), id: id.clone() }.to_string()).into());
        }
    }
    Ok(items)
}

pub(crate) async fn run(global: &Global, args: DlqArgs) -> Result<(), CliError> {
    let mut client = global.connect_installed().await?;
    match args.command {
        DlqCommand::List { filters, json } => {
            let items =
                ops::list(&client, global.schema(), filters.source(), &filters.filter(), filters.limit, false).await?;
            print_list(&items, json)
        }
        DlqCommand::Show { id, id_flag, inbox, json } => {
            let id = id.or(id_flag).expect("clap requires one");
            let source = if inbox { Source::Inbox } else { Source::Relay };
            let filter = Filter { ids: vec![id.clone()], ..Default::default() };
            let items = ops::list(&client, global.schema(), source, &filter, 1, true).await?;
            let Some(item) = items.first() else {
                return Err(NotFound(OpsError::UnknownId { kind: source, id }.to_string()).into());
            };
            if json {
                println!("{}", serde_json::to_string_pretty(item)?);
            } else {
                let v = serde_json::to_value(item)?;
                for (k, val) in v.as_object().expect("an object") {
                    println!(
                        "{k:>18}: {}",
                        match val {
                            serde_json::Value::String(s) => s.clone(),
                            other => other.to_string(),
                        }
                    );
                }
            }
            Ok(())
        }
        DlqCommand::Discard { filters, change, all } => {
            let items = matched(&client, global, &filters, all).await?;
            let Some(audit) = preview_or_confirm("discard", &items, &change)? else { return Ok(()) };
            let mut done = 0u64;
            let started = Instant::now();
            for chunk in items.chunks(500) {
                let ids: Vec<String> = chunk.iter().map(|i| i.id.clone()).collect();
                done += ops::discard(&mut client, global.schema(), filters.source(), &ids, &audit).await?;
                if items.len() > 500 {
                    eprintln!("discarded {done}/{} ({:.1}s)", items.len(), started.elapsed().as_secs_f64());
                }
            }
            println!("discarded {done} dead letters (audit rows written, actor {})", audit.actor);
            Ok(())
        }
        DlqCommand::Replay { filters, change, all, rate, retry_topic, kafka } => {
            let items = matched(&client, global, &filters, all).await?;
            let Some(audit) = preview_or_confirm("replay", &items, &change)? else { return Ok(()) };
            let per_chunk = rate.map_or(200, |r| r.clamp(1, 200) as usize);
            let started = Instant::now();
            let mut done = 0usize;
            let producer =
                if filters.inbox { Some(kafka.producer("replaying inbox dead letters publishes them")?) } else { None };
            for chunk in items.chunks(per_chunk) {
                let chunk_started = Instant::now();
                match &producer {
                    None => {
                        let ids: Vec<Uuid> = chunk.iter().filter_map(|i| Uuid::parse_str(&i.id).ok()).collect();
                        done += ops::replay_relay(&mut client, global.schema(), &ids, &audit).await?.len();
                    }
                    Some(producer) => {
                        let ids: Vec<i64> = chunk.iter().filter_map(|i| i.id.parse().ok()).collect();
                        for r in ops::inbox_for_replay(&client, global.schema(), &ids).await? {
                            let topic = retry_topic.clone().unwrap_or_else(|| r.topic.clone());
                            republish(producer, &topic, &r).await?;
                            ops::inbox_replayed(&mut client, global.schema(), r.dead_letter_id, &topic, &audit).await?;
                            done += 1;
                        }
                    }
                }
                if items.len() > per_chunk {
                    eprintln!("replayed {done}/{} ({:.1}s)", items.len(), started.elapsed().as_secs_f64());
                }
                if let Some(r) = rate {
                    let due = Duration::from_secs_f64(chunk.len() as f64 / r.max(1) as f64);
                    if let Some(wait) = due.checked_sub(chunk_started.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
            let what = if filters.inbox { "re-published to Kafka" } else { "back in the outbox with their ids" };
            println!("replayed {done} dead letters ({what}; audit rows written, actor {})", audit.actor);
            Ok(())
        }
        DlqCommand::Export { filters, output } => {
            let items =
                ops::list(&client, global.schema(), filters.source(), &filters.filter(), filters.limit, true).await?;
            let mut out: Box<dyn Write> = match &output {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(path).map_err(|e| format!("cannot write {}: {e}", path.display()))?,
                )),
                None => Box::new(std::io::stdout().lock()),
            };
            for (n, i) in items.iter().enumerate() {
                writeln!(out, "{}", serde_json::to_string(i)?)?;
                if (n + 1) % 1000 == 0 {
                    eprintln!("exported {}/{}", n + 1, items.len());
                }
            }
            out.flush()?;
            eprintln!(
                "exported {} dead letters{}",
                items.len(),
                output.map(|p| format!(" to {}", p.display())).unwrap_or_default()
            );
            Ok(())
        }
    }
}

async fn republish(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    r: &ops::Republish,
) -> Result<(), CliError> {
    use rdkafka::message::{Header, OwnedHeaders};
    let mut headers = OwnedHeaders::new();
    for (k, v) in &r.headers {
        headers = headers.insert(Header { key: k.as_str(), value: Some(v.as_str()) });
    }
    let record = outbox_relay::relay::envelope::record(topic, r.key.as_deref(), r.payload.as_deref(), headers);
    publish_awaited(producer, record, &format!("re-publishing inbox dead letter {} to {topic}", r.dead_letter_id))
        .await
        .map(|_| ())
        .map_err(|e| {
            format!("{e}; it stays a dead letter (check KAFKA_BROKERS and the broker, then run the replay again)")
                .into()
        })
}
