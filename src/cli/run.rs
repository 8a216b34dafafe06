//! `outbox-relay run`: the relay daemon.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use outbox_relay::db::DbConfig;
use outbox_relay::relay::{self, kafka, DeadLetterPolicy, RelayConfig};
use outbox_relay::retry::Backoff;
use tokio_util::sync::CancellationToken;

use super::{CliError, Global};

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Kafka bootstrap servers (host:port,...).
    #[arg(long, env = "KAFKA_BROKERS")]
    kafka_brokers: String,
    /// A librdkafka property, name=value (repeatable); name=@file reads the value from a file.
    /// Secrets (passwords) are refused as literal values: use @file or --kafka-config-file.
    #[arg(short = 'X', value_name = "NAME=VALUE", value_parser = kafka::parse_property)]
    kafka_property: Vec<(String, String)>,
    /// A librdkafka properties file (name=value lines), for TLS and SASL settings and secrets.
    #[arg(long, env = "KAFKA_CONFIG_FILE")]
    kafka_config_file: Option<PathBuf>,
    /// Rows read and produced per batch.
    #[arg(long, env = "OUTBOX_BATCH_SIZE", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    batch_size: u32,
    /// Rows a lane may hold between claim and delete: it claims and sends its next rows while
    /// earlier ones await their acknowledgements or their delete, up to this many (memory: rows x
    /// payload size x lanes; also what a crash can send twice per lane).
    #[arg(long, env = "OUTBOX_MAX_IN_FLIGHT", default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_in_flight: u32,
    /// How often an idle lane checks for rows when no NOTIFY arrived.
    #[arg(long, env = "OUTBOX_POLL_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// The most lanes this instance takes (default: an even share of the lanes among live instances).
    #[arg(long, env = "OUTBOX_MAX_LANES")]
    max_lanes: Option<u16>,
    /// The most PostgreSQL sessions the instance's lanes use per database, for all its outboxes
    /// there (default: one per lane). With fewer, each session holds the locks of several lanes
    /// and runs their statements one at a time. Each database also has a control, a background
    /// and a LISTEN session.
    #[arg(long, env = "OUTBOX_MAX_SESSIONS", value_parser = clap::value_parser!(u16).range(1..))]
    max_sessions: Option<u16>,
    /// Under --max-sessions: the most rows a lane claims per statement on a session it shares with
    /// other lanes (a session's replies come back in order, so an idle lane's claim waits behind
    /// the busy lanes' replies before it).
    #[arg(long, env = "OUTBOX_SHARED_BATCH_SIZE", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    shared_batch_size: u32,
    /// How often the instance heartbeats and rebalances lanes.
    #[arg(long, env = "OUTBOX_HEARTBEAT_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// An instance silent for this long counts as dead and its lanes are shared out.
    #[arg(long, env = "OUTBOX_INSTANCE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    instance_timeout: Duration,
    /// How long a batch may wait for its acknowledgements; then the producer is replaced and the
    /// rows are sent again (a duplicate at worst, never a reorder).
    #[arg(long, env = "OUTBOX_MESSAGE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    message_timeout: Duration,
    /// The first retry delay ceiling (full jitter: random(0, min(cap, base * 2^attempt))).
    #[arg(long, env = "OUTBOX_RETRY_BASE", default_value = "200ms", value_parser = humantime::parse_duration)]
    retry_base: Duration,
    /// The largest retry delay.
    #[arg(long, env = "OUTBOX_RETRY_CAP", default_value = "60s", value_parser = humantime::parse_duration)]
    retry_cap: Duration,
    /// Attempts before a message is dead-lettered as retries_exhausted.
    #[arg(long, env = "OUTBOX_MAX_ATTEMPTS", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    max_attempts: u32,
    /// Dead-letter a message older than this instead of retrying it (default: no limit).
    #[arg(long, env = "OUTBOX_MAX_AGE", value_parser = humantime::parse_duration)]
    max_age: Option<Duration>,
    /// What happens to later messages of a dead-lettered message's key: skip (they go on) or
    /// park-key (they wait until the dead letter is replayed or discarded).
    #[arg(long, env = "OUTBOX_DEAD_LETTER_POLICY", default_value = "skip")]
    dead_letter_policy: DeadLetterPolicy,
    /// Also publish dead letters to this Kafka topic (the dead_letters table stays the record).
    #[arg(long, env = "OUTBOX_DLQ_TOPIC")]
    dlq_topic: Option<String>,
    /// Consecutive failed batches that open the circuit breaker.
    #[arg(long, env = "OUTBOX_BREAKER_FAILURES", default_value_t = 5)]
    breaker_failures: u32,
    /// The breaker's first cool-down (jittered, doubling per failed probe up to 12 times as long).
    #[arg(long, env = "OUTBOX_BREAKER_COOLDOWN", default_value = "5s", value_parser = humantime::parse_duration)]
    breaker_cooldown: Duration,
    /// How long one database statement may take before the lane drops its session and starts over.
    #[arg(long, env = "OUTBOX_DB_CALL_TIMEOUT", default_value = "35s", value_parser = humantime::parse_duration)]
    db_call_timeout: Duration,
    /// Serve /metrics, /healthz and /readyz on this address ("off" to disable).
    #[arg(long, env = "OUTBOX_METRICS_ADDR", default_value = "127.0.0.1:9465")]
    metrics_addr: String,
    /// /readyz reports unready when the head of an owned lane is older than this.
    #[arg(long, env = "OUTBOX_STUCK_THRESHOLD", default_value = "5m", value_parser = humantime::parse_duration)]
    stuck_threshold: Duration,
    /// How often the backlog gauges (/metrics) and the stuck-head check (/readyz) are refreshed.
    #[arg(long, env = "OUTBOX_BACKLOG_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    backlog_interval: Duration,
    /// Warn in the log when a snapshot held on the database (a long transaction, a replication
    /// slot) is older than this: the outbox's deleted rows cannot be cleaned up meanwhile.
    #[arg(long, env = "OUTBOX_HORIZON_WARN", default_value = "5m", value_parser = humantime::parse_duration)]
    horizon_warn: Duration,
    /// How often a slow sweep looks below each lane's claim cursor for rows no NOTIFY announced
    /// (written with triggers disabled); it bounds their delay.
    #[arg(long, env = "OUTBOX_SWEEP_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    sweep_interval: Duration,
    /// How long a graceful shutdown (SIGTERM/SIGINT) may take.
    #[arg(long, env = "OUTBOX_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_timeout: Duration,
    /// The CloudEvents ce_source header (default /outbox-relay/<schema>).
    #[arg(long, env = "OUTBOX_SOURCE")]
    source: Option<String>,
    /// A prefix for every Kafka topic.
    #[arg(long, env = "OUTBOX_TOPIC_PREFIX", default_value = "")]
    topic_prefix: String,
    /// Send rows written for topic FROM to topic TO (repeatable).
    #[arg(long, value_name = "FROM=TO", value_parser = parse_mapping)]
    topic_map: Vec<(String, String)>,
    /// Serve every schema of --database-url whose name matches this SQL LIKE pattern (repeatable),
    /// and those created later (looked for every --discover-interval); a schema that is dropped
    /// is let go. Their metrics carry the pattern as `outbox`. With --outbox or
    /// --schema-pattern, --schema is served only when named by an --outbox too.
    #[arg(long, value_name = "PATTERN")]
    schema_pattern: Vec<String>,
    /// A TOML file of outboxes to serve, one `[[outbox]]` table each: `name`, `schema`, optionally
    /// `url` (default --database-url), and settings of its own (`batch_size`, `max_in_flight`,
    /// `max_attempts`, `retry_base`, `retry_cap`, `dead_letter_policy`, `topic_prefix`, `topic_map`,
    /// `archive`, `source`) over the command line's.
    #[arg(long, env = "OUTBOX_FILE")]
    outbox_file: Option<PathBuf>,
    /// Install or upgrade the outbox of a schema --schema-pattern finds that is not migrated,
    /// instead of passing it by with an error.
    #[arg(long)]
    migrate: bool,
    /// How often --schema-pattern looks for schemas created or dropped since.
    #[arg(long, env = "OUTBOX_DISCOVER_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    discover_interval: Duration,
    /// Keep delivered rows in <schema>.delivered (topic, partition, offset, time) instead of deleting them.
    #[arg(long, env = "OUTBOX_ARCHIVE")]
    archive: bool,
    /// How long archived rows are kept.
    #[arg(long, env = "OUTBOX_ARCHIVE_RETENTION", default_value = "7days", value_parser = humantime::parse_duration)]
    archive_retention: Duration,
}

fn parse_mapping(s: &str) -> Result<(String, String), String> {
    let (a, b) = s.split_once('=').ok_or_else(|| format!("--topic-map {s:?}: expected FROM=TO"))?;
    outbox_relay::outbox::validate_topic(a).map_err(|e| format!("--topic-map {s:?}: {e}"))?;
    outbox_relay::outbox::validate_topic(b).map_err(|e| format!("--topic-map {s:?}: {e}"))?;
    Ok((a.to_owned(), b.to_owned()))
}

pub(crate) async fn run(global: &Global, args: RunArgs) -> Result<(), CliError> {
    // The signal handlers first: a SIGTERM that comes while the relay starts (an orchestrator
    // stopping a pod it just started) is a graceful stop too, not a kill by the signal.
    let signals = install_signals();
    // Traces when OTEL_EXPORTER_OTLP_ENDPOINT says where (outbox_relay::traces); flushed at exit.
    let _traces = match outbox_relay::traces::Settings::from_env("outbox-relay")? {
        Some(s) => {
            tracing::info!(endpoint = %s.endpoint, sampled = s.ratio, "exporting traces over OTLP");
            Some(outbox_relay::traces::install(&s)?)
        }
        None => None,
    };
    let mut outboxes = global.outboxes()?;
    if let Some(path) = &args.outbox_file {
        let default = global.db_config().ok();
        outboxes.extend(relay::read_outbox_file(path, default.as_ref())?);
    }
    let patterns = args.schema_pattern.clone();
    let migrate = args.migrate;
    if migrate && patterns.is_empty() {
        return Err("--migrate migrates the schemas --schema-pattern finds: give --schema-pattern too \
                    (for one schema run `outbox-relay migrate`)"
            .into());
    }
    // Without --outbox, --outbox-file and --schema-pattern: the one outbox of --database-url and --schema.
    let db = if outboxes.is_empty() || !patterns.is_empty() { Some(global.db_config()?) } else { None };
    if outboxes.is_empty() && patterns.is_empty() {
        let db = db.clone().expect("asked for");
        outboxes.push(relay::OutboxSpec {
            name: global.schema().to_string(),
            db,
            schema: global.schema().clone(),
            overrides: relay::Overrides::default(),
        });
    }
    let discover = patterns
        .into_iter()
        .map(|pattern| relay::Discovery { db: db.clone().expect("asked for"), pattern, migrate })
        .collect();
    let config = config(global, args, outboxes.first().map(|o| o.db.clone()))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(signals, shutdown.clone()));
    let stats = std::sync::Arc::new(relay::RelayStats::default());
    relay::run_fleet(config, outboxes, discover, shutdown, stats).await?;
    Ok(())
}

/// The relay's configuration from the command line (flags and environment): what every outbox
/// it serves shares (the database and schema are the default outbox's, replaced per outbox).
fn config(global: &Global, args: RunArgs, fallback: Option<DbConfig>) -> Result<RelayConfig, CliError> {
    let db = match (global.db_config(), fallback) {
        (Ok(db), _) => db,
        // Every outbox named with its own URL (--outbox, --outbox-file): no --database-url needed.
        (Err(_), Some(db)) => db,
        (Err(e), None) => return Err(e),
    };
    let mut config = RelayConfig::new(db, global.schema().clone(), args.kafka_brokers);
    if let Some(path) = &args.kafka_config_file {
        config.producer.properties.extend(kafka::read_properties_file(path)?);
    }
    config.producer.properties.extend(args.kafka_property);
    config.producer.message_timeout = args.message_timeout;
    config.batch_size = args.batch_size as usize;
    config.max_in_flight = args.max_in_flight as usize;
    config.poll_interval = args.poll_interval;
    config.max_lanes = args.max_lanes;
    config.max_sessions = args.max_sessions;
    config.shared_batch_size = args.shared_batch_size as usize;
    config.heartbeat_interval = args.heartbeat_interval;
    config.instance_timeout = args.instance_timeout;
    config.shutdown_timeout = args.shutdown_timeout;
    config.source = args.source;
    config.topic_prefix = args.topic_prefix;
    config.topic_map = args.topic_map.into_iter().collect::<HashMap<_, _>>();
    config.archive = args.archive;
    config.archive_retention = args.archive_retention;
    config.retry = Backoff { base: args.retry_base, cap: args.retry_cap };
    config.max_attempts = args.max_attempts;
    config.max_age = args.max_age;
    config.dead_letter_policy = args.dead_letter_policy;
    if let Some(dlq) = &args.dlq_topic {
        outbox_relay::outbox::validate_topic(dlq).map_err(|e| format!("--dlq-topic: {e}"))?;
    }
    config.dlq_topic = args.dlq_topic;
    config.breaker.failure_threshold = args.breaker_failures;
    config.breaker.cooldown = args.breaker_cooldown;
    config.breaker.max_cooldown = args.breaker_cooldown * 12;
    config.db_call_timeout = args.db_call_timeout;
    config.metrics_addr = match args.metrics_addr.as_str() {
        "off" | "" => None,
        a => Some(
            a.parse()
                .map_err(|e| format!("--metrics-addr {a:?}: {e} (expected host:port, e.g. 127.0.0.1:9465, or off)"))?,
        ),
    };
    config.stuck_threshold = args.stuck_threshold;
    config.backlog_interval = args.backlog_interval;
    config.horizon_warn = args.horizon_warn;
    config.sweep_interval = args.sweep_interval;
    config.discover_interval = args.discover_interval;
    Ok(config)
}

/// SIGTERM's and SIGINT's streams (from now on neither kills the process); `None`, said in the
/// log, when they cannot be installed.
fn install_signals() -> Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)> {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(term), Ok(int)) => Some((term, int)),
        _ => {
            tracing::error!("cannot install signal handlers; stop the relay with SIGKILL");
            None
        }
    }
}

/// Cancels `shutdown` on SIGTERM or SIGINT; a second signal exits at once.
async fn stop_on_signal(
    signals: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
    shutdown: CancellationToken,
) {
    let Some((mut term, mut int)) = signals else { return };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("signal received: graceful shutdown (send it again to exit at once)");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second signal: exiting without finishing in-flight batches (their rows are delivered again later)");
    std::process::exit(130);
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::{Cli, Command};
    use super::*;

    /// The flags' defaults restate the library's for `--help`; this keeps them one decision.
    #[test]
    fn the_command_line_defaults_are_the_library_defaults() {
        let cli = Cli::try_parse_from([
            "outbox-relay",
            "--database-url",
            "postgres://relay@db.example/app",
            "--schema",
            "outbox",
            "run",
            "--kafka-brokers",
            "broker:9092",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else { panic!("parsed as another command") };
        let mut from_cli = config(&cli.global, args, None).unwrap();
        let lib = RelayConfig::new(cli.global.db_config().unwrap(), cli.global.schema().clone(), "broker:9092");
        from_cli.instance_id = lib.instance_id;
        // The one deliberate difference: the daemon serves /metrics by default, an embedded relay
        // only when asked.
        assert_eq!(from_cli.metrics_addr, Some("127.0.0.1:9465".parse().unwrap()));
        from_cli.metrics_addr = lib.metrics_addr;
        assert_eq!(format!("{from_cli:#?}"), format!("{lib:#?}"));
    }
}
