//! The Kafka producer: defaults that keep the delivery promise, and the `-X` passthrough.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::FutureProducer;

/// librdkafka properties that hold secrets: refused as literal `-X` values on the command line
/// (give them as `-X name=@file` or in `--kafka-config-file`), and never logged.
pub const SECRET_PROPERTIES: &[&str] = &[
    "sasl.password",
    "sasl.oauthbearer.client.secret",
    "ssl.key.password",
    "ssl.keystore.password",
    "ssl.key.pem",
    "ssl_key",
    "sasl.oauthbearer.config",
];

/// Whether a librdkafka property holds a secret.
pub fn is_secret_property(name: &str) -> bool {
    SECRET_PROPERTIES.contains(&name) || name.contains("password") || name.contains("secret")
}

/// Why the producer could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KafkaConfigError {
    /// A property would break at-least-once delivery or per-key order.
    #[error("librdkafka property {name}={value} is refused: {why}")]
    Refused {
        /// The property.
        name: String,
        /// Its value.
        value: String,
        /// Why.
        why: &'static str,
    },
    /// librdkafka refused the configuration.
    #[error("the Kafka producer could not be created: {0} (check the -X properties and KAFKA_BROKERS)")]
    Create(#[source] rdkafka::error::KafkaError),
}

/// Settings for the relay's producer.
#[derive(Clone, Debug)]
pub struct ProducerSettings {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// How long the relay waits for a batch's acknowledgements before it replaces the producer
    /// and sends the rows again (`--message-timeout`). librdkafka's own `message.timeout.ms` is
    /// 0 (never give up): a record it timed out could be overtaken by a later one of its key.
    pub message_timeout: Duration,
    /// librdkafka properties given by the operator; they override the defaults.
    pub properties: Vec<(String, String)>,
}

impl ProducerSettings {
    /// The full librdkafka configuration.
    pub fn client_config(&self) -> Result<ClientConfig, KafkaConfigError> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", "outbox-relay")
            // The promise: every acknowledged write is on all in-sync replicas, retries never
            // duplicate or reorder within a partition.
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("max.in.flight.requests.per.connection", "5")
            // Java's partitioner, so keys land where Java producers would put them.
            .set("partitioner", "murmur2_random")
            // 1 ms, chosen by measurement (BENCHMARKS.md, table 6): at gentle rates linger is
            // most of a row's latency (5 ms put p99 commit-to-ack near 11 ms at 200 msg/s, 1 ms
            // near 6.5), and under load the lane's window keeps requests in flight, so batches
            // fill while earlier ones are acknowledged; throughput did not drop.
            .set("linger.ms", "1")
            // lz4, chosen by measurement (BENCHMARKS.md, table 10): on order JSON it sends 4-5
            // times fewer bytes to the broker than none (112 vs 477 B per 200 B record, 449 vs
            // 2,244 at 2 KiB) for 0.94 (0.84-0.99) of the relay's throughput at 200 B and 1.02 at
            // 2 KiB on two shared cores; zstd sends 13-16 times fewer for 0.80-0.86.
            .set("compression.type", "lz4")
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", "200000")
            .set("queue.buffering.max.kbytes", "262144")
            // Never time a record out inside librdkafka: that bumps the producer epoch and lets a
            // later record of the partition through while the earlier one failed. The relay bounds
            // each batch itself and replaces the producer instead (relay::producer).
            .set("message.timeout.ms", "0")
            // A permanent failure of one record must not let the records behind it through either:
            // the producer fails for good instead, and the relay replaces it.
            .set("enable.gapless.guarantee", "true")
            .set("socket.timeout.ms", "10000")
            .set("socket.connection.setup.timeout.ms", "10000")
            .set("reconnect.backoff.ms", "100")
            .set("reconnect.backoff.max.ms", "5000")
            .set("retry.backoff.ms", "100")
            .set("retry.backoff.max.ms", "2000")
            .set("topic.metadata.refresh.interval.ms", "30000")
            .set("log_level", "4");
        for (name, value) in &self.properties {
            check_property(name, value)?;
            c.set(name, value);
        }
        Ok(c)
    }

    /// Creates a producer that awaits each acknowledgement as a future (operator commands).
    pub fn create(&self) -> Result<FutureProducer, KafkaConfigError> {
        self.client_config()?.create().map_err(KafkaConfigError::Create)
    }

    /// Creates the relay's producer: delivery reports go to `router`, one callback per record.
    pub(crate) fn create_routed(
        &self,
        router: super::reports::DeliveryRouter,
    ) -> Result<super::reports::RelayProducer, KafkaConfigError> {
        self.client_config()?.create_with_context(router).map_err(KafkaConfigError::Create)
    }
}

fn check_property(name: &str, value: &str) -> Result<(), KafkaConfigError> {
    let refuse = |why| Err(KafkaConfigError::Refused { name: name.to_owned(), value: value.to_owned(), why });
    match name {
        "enable.idempotence" if value != "true" => {
            refuse("the idempotent producer keeps retries from duplicating or reordering messages")
        }
        "acks" | "request.required.acks" if !matches!(value, "all" | "-1") => {
            refuse("a row is deleted once acknowledged, so the acknowledgement must mean all in-sync replicas")
        }
        "transactional.id" => refuse("the relay does not use Kafka transactions"),
        "message.timeout.ms" | "delivery.timeout.ms" => refuse(
            "the relay bounds delivery itself with --message-timeout and then replaces the producer, so that a \
             timeout gives a duplicate, never a reorder; set --message-timeout instead",
        ),
        "retries" | "message.send.max.retries" => refuse(
            "a record that runs out of retries lets the records behind it through; the relay retries without \
             limit inside one batch and bounds the batch with --message-timeout",
        ),
        "enable.gapless.guarantee" if value != "true" => {
            refuse("without it a record that failed for good lets later records of its key through")
        }
        _ => Ok(()),
    }
}

/// Parses `name=value`; a value `@path` is read from that file (for secrets).
pub fn parse_property(arg: &str) -> Result<(String, String), String> {
    let (name, value) =
        arg.split_once('=').ok_or_else(|| format!("-X {arg:?}: expected name=value (a librdkafka property)"))?;
    let name = name.trim();
    if name.is_empty() {
        return Err(format!("-X {arg:?}: the property name is empty"));
    }
    if let Some(path) = value.strip_prefix('@') {
        let v = std::fs::read_to_string(path).map_err(|e| format!("-X {name}=@{path}: cannot read the file: {e}"))?;
        return Ok((name.to_owned(), v.trim_end_matches(['\n', '\r']).to_owned()));
    }
    if is_secret_property(name) {
        return Err(format!(
            "-X {name}=...: a secret on the command line is visible to every user of the machine; \
             use -X {name}=@/path/to/file or put it in --kafka-config-file"
        ));
    }
    Ok((name.to_owned(), value.to_owned()))
}

/// Reads a librdkafka properties file (`name=value` lines, `#` comments).
pub fn read_properties_file(path: &std::path::Path) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the Kafka config file {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (n, v) =
            line.split_once('=').ok_or_else(|| format!("{}:{}: expected name=value", path.display(), i + 1))?;
        out.push((n.trim().to_owned(), v.trim().to_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_that_break_the_promise_are_refused() {
        let s = |props: &[(&str, &str)]| ProducerSettings {
            brokers: "x:1".into(),
            message_timeout: Duration::from_secs(30),
            properties: props.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
        };
        assert!(s(&[("acks", "1")]).client_config().is_err());
        assert!(s(&[("enable.idempotence", "false")]).client_config().is_err());
        assert!(s(&[("acks", "all"), ("compression.type", "zstd")]).client_config().is_ok());
        assert!(s(&[("message.timeout.ms", "5000")]).client_config().is_err());
        assert!(s(&[("delivery.timeout.ms", "5000")]).client_config().is_err());
        assert!(s(&[("enable.gapless.guarantee", "false")]).client_config().is_err());
        assert!(s(&[("retries", "3")]).client_config().is_err());
        assert!(s(&[("message.send.max.retries", "3")]).client_config().is_err());
        assert!(s(&[("max.in.flight.requests.per.connection", "1")]).client_config().is_ok());
    }

    #[test]
    fn secrets_are_refused_on_the_command_line() {
        assert!(parse_property("sasl.password=hunter2").unwrap_err().contains("@/path"));
        assert!(!parse_property("sasl.password=hunter2").unwrap_err().contains("hunter2"));
        assert_eq!(parse_property("linger.ms=10").unwrap(), ("linger.ms".into(), "10".into()));
        assert!(parse_property("nonsense").is_err());
    }
}
