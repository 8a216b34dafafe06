//! What the commands that publish to Kafka themselves share (`dlq replay --inbox`, `reconcile
//! --replay-missing`): where to publish, and one record sent with a bounded wait for its
//! acknowledgement.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::CliError;

/// How long one record may wait for its acknowledgement.
const ACK_WITHIN: Duration = Duration::from_secs(30);

#[derive(Debug, Args, Clone)]
pub(super) struct KafkaTarget {
    /// Where to publish (host:port, comma-separated).
    #[arg(long, env = "KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// A librdkafka properties file (TLS, SASL).
    #[arg(long, env = "KAFKA_CONFIG_FILE")]
    kafka_config_file: Option<PathBuf>,
}

impl KafkaTarget {
    /// A producer for `purpose` ("replaying inbox dead letters publishes them").
    pub(super) fn producer(&self, purpose: &str) -> Result<FutureProducer, CliError> {
        let brokers =
            self.kafka_brokers.clone().ok_or_else(|| format!("{purpose}: set KAFKA_BROKERS or --kafka-brokers"))?;
        let mut settings = outbox_relay::relay::kafka::ProducerSettings {
            brokers,
            message_timeout: ACK_WITHIN,
            properties: Vec::new(),
        };
        if let Some(path) = &self.kafka_config_file {
            settings.properties = outbox_relay::relay::kafka::read_properties_file(path)?;
        }
        Ok(settings.create()?)
    }

    /// The brokers and properties, for a consumer that reads what it re-publishes.
    pub(super) fn client_config(&self, purpose: &str) -> Result<rdkafka::ClientConfig, CliError> {
        let brokers =
            self.kafka_brokers.clone().ok_or_else(|| format!("{purpose}: set KAFKA_BROKERS or --kafka-brokers"))?;
        let mut cfg = rdkafka::ClientConfig::new();
        cfg.set("bootstrap.servers", brokers);
        if let Some(path) = &self.kafka_config_file {
            for (k, v) in outbox_relay::relay::kafka::read_properties_file(path)? {
                cfg.set(k, v);
            }
        }
        Ok(cfg)
    }
}

/// Sends `record` and waits, at most [`ACK_WITHIN`], for its acknowledgement: the partition and
/// offset it was written at. `what` names the action in the error.
pub(super) async fn publish_awaited(
    producer: &FutureProducer,
    record: FutureRecord<'_, [u8], [u8]>,
    what: &str,
) -> Result<(i32, i64), CliError> {
    match tokio::time::timeout(ACK_WITHIN, producer.send(record, ACK_WITHIN)).await {
        Ok(Ok(d)) => Ok((d.partition, d.offset)),
        Ok(Err((e, _))) => Err(format!("{what} failed: {e}").into()),
        Err(_) => Err(format!("{what}: no acknowledgement within {ACK_WITHIN:?}").into()),
    }
}
