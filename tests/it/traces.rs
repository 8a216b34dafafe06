//! Traces across the relay: a writer's `traceparent` reaches the consumer's span as its ancestor
//! through the relay's span, collected by a local OTLP/HTTP receiver from the real exporter.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use outbox_relay::consumer::{self, ConsumedMessage, ConsumerConfig, ConsumerStats, Handler, HandlerFuture};
use outbox_relay::db::DbConfig;
use outbox_relay::outbox::{Outbox, OutboxMessage};
use prost::Message as _;
use tokio_util::sync::CancellationToken;

use crate::support::cli::free_port;
use crate::support::kafka::{create_topic, read_topic};
use crate::support::relay::{config, InProcess};
use crate::support::{connect, database_url, eventually, kafka_brokers, TestSchema};

/// A span as the receiver decoded it: hex ids, name.
#[derive(Debug, Clone)]
struct Got {
    trace: String,
    span: String,
    parent: String,
    name: String,
    attributes: Vec<(String, String)>,
    links: Vec<(String, String)>,
}

/// Serves `POST /v1/traces` (OTLP/HTTP, protobuf) on `port`, keeping every span.
async fn receiver(port: u16, spans: Arc<Mutex<Vec<Got>>>) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let keep = move |body: Vec<u8>| {
        let req = ExportTraceServiceRequest::decode(body.as_slice()).expect("an OTLP protobuf body");
        let mut decoded = Vec::new();
        for rs in req.resource_spans {
            for ss in rs.scope_spans {
                for s in ss.spans {
                    let attributes = s
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), format!("{:?}", kv.value.as_ref().and_then(|v| v.value.as_ref()))))
                        .collect();
                    decoded.push(Got {
                        trace: hex(&s.trace_id),
                        span: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                        name: s.name,
                        attributes,
                        links: s.links.iter().map(|l| (hex(&l.trace_id), hex(&l.span_id))).collect(),
                    });
                }
            }
        }
        spans.lock().unwrap().extend(decoded);
    };
    outbox_relay::traces::receive(listener, Arc::new(keep)).await;
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

struct Nothing;

impl Handler for Nothing {
    fn handle<'a>(&'a self, _: &'a tokio_postgres::Transaction<'a>, _: &'a ConsumedMessage) -> HandlerFuture<'a> {
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writers_traceparent_is_the_ancestor_of_the_consumers_span_through_the_relays_span() {
    let port = free_port();
    let spans = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn(receiver(port, spans.clone()));
    // Nothing sampled but what the writer sampled: a message without a traceparent makes no span.
    let settings = outbox_relay::traces::Settings {
        endpoint: format!("http://127.0.0.1:{port}/v1/traces"),
        service_name: "outbox-relay-it".into(),
        ratio: 0.0,
    };
    let guard = outbox_relay::traces::install(&settings).unwrap();

    let s = TestSchema::new(2).await;
    let topic = create_topic("traces", 2).await;
    let (trace, writer_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let mut c = connect().await;
    let tx = c.transaction().await.unwrap();
    let outbox = Outbox::new(s.name.clone());
    let traced = outbox
        .enqueue(
            &tx,
            &OutboxMessage::builder(&topic)
                .key("order-1")
                .payload(b"{}".to_vec())
                .traceparent(format!("00-{trace}-{writer_span}-01"))
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    let untraced = outbox
        .enqueue(&tx, &OutboxMessage::builder(&topic).key("order-2").payload(b"{}".to_vec()).build().unwrap())
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let relay = InProcess::start(config(&s.name));
    let mut cc = ConsumerConfig::new(
        kafka_brokers(),
        &format!("traces-{}", s.name),
        vec![topic.clone()],
        "traced",
        s.name.clone(),
        DbConfig::parse(&database_url()).unwrap(),
    );
    cc.shutdown_timeout = Duration::from_secs(20);
    let (stop, stats) = (CancellationToken::new(), Arc::new(ConsumerStats::default()));
    let consumer_task = tokio::spawn(consumer::run(cc, Arc::new(Nothing), stop.clone(), stats.clone()));
    let stats_ref = stats.clone();
    eventually(Duration::from_secs(60), Duration::from_millis(100), || {
        let stats = stats_ref.clone();
        async move {
            match stats.processed.load(std::sync::atomic::Ordering::Relaxed) {
                2 => Ok(()),
                n => Err(format!("processed {n} of 2")),
            }
        }
    })
    .await;
    stop.cancel();
    consumer_task.await.unwrap().unwrap();
    relay.shutdown().await;
    guard.flush();

    let (got, _) = eventually(Duration::from_secs(20), Duration::from_millis(100), || {
        let spans = spans.clone();
        async move {
            let got = spans.lock().unwrap().clone();
            match got.iter().filter(|g| g.trace == trace).count() {
                n if n >= 2 && got.iter().any(|g| g.name == "outbox batch") => Ok(got),
                n => Err(format!("{n} spans of the trace so far: {got:?}")),
            }
        }
    })
    .await;
    let publish: Vec<&Got> = got.iter().filter(|g| g.name == "outbox publish").collect();
    let batches: Vec<&Got> = got.iter().filter(|g| g.name == "outbox batch").collect();
    let process: Vec<&Got> = got.iter().filter(|g| g.name == "outbox process").collect();
    println!("figures: spans received {}, publish {}, process {}", got.len(), publish.len(), process.len());
    assert_eq!(publish.len(), 1, "one relay span, for the traced message only: {got:?}");
    assert_eq!(process.len(), 1, "one consumer span, for the traced message only: {got:?}");
    let (r, k) = (publish[0], process[0]);
    assert_eq!((r.trace.as_str(), r.parent.as_str()), (trace, writer_span), "the relay's span is the writer's child");
    assert_eq!(
        (k.trace.as_str(), k.parent.as_str()),
        (trace, r.span.as_str()),
        "the consumer's span is the relay's child"
    );
    let has = |g: &Got, key: &str| g.attributes.iter().any(|(k, _)| k == key);
    for key in ["messaging.destination.name", "messaging.kafka.offset", "outbox.lane", "outbox.seq", "outbox.attempt"] {
        assert!(has(r, key), "the relay's span has {key}: {:?}", r.attributes);
    }
    assert!(k.attributes.iter().any(|(k, v)| k == "outbox.dedup" && v.contains("processed")), "{:?}", k.attributes);
    assert!(has(k, "outbox.handler_ms"));
    // The batch that carried it has a span of its own, linked to the message's.
    assert_eq!(batches.len(), 1, "one batch span, for the one batch with a sampled message: {got:?}");
    assert!(batches[0].links.contains(&(trace.to_owned(), r.span.clone())), "{:?}", batches[0].links);

    // The record carries the relay's span as its traceparent; the untraced one none.
    let records = read_topic(&topic, 2, Duration::from_secs(30));
    let header = |id| records.iter().find(|r| r.id == id).and_then(|r| r.headers.get("traceparent").cloned());
    assert_eq!(header(traced), Some(format!("00-{trace}-{}-01", r.span)));
    assert_eq!(header(untraced), None);
}
