//! OpenTelemetry traces over OTLP (HTTP, protobuf), off unless an endpoint is configured with the
//! standard variables: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (the full URL) or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (`/v1/traces` appended), `OTEL_SERVICE_NAME`, and
//! `OTEL_TRACES_SAMPLER_ARG` (the share of traces started here that are sampled, 0.01 by default;
//! a writer's sampled `traceparent` is always followed, an unsampled one never).
//!
//! The relay's span of a message (`outbox publish`, kind producer) is a child of the writer's
//! `traceparent`; it starts when the row was written and ends at the broker's acknowledgement,
//! with an event when the row was claimed and when it was handed to the producer, and the
//! topic, partition, offset, lane, sequence and attempt; each batch with a sampled message gets an
//! `outbox batch` span of its own, linked to those messages' spans, from its send until every row
//! has its outcome. The record's `traceparent` header is the
//! relay's span, so a consumer that does not use this crate continues the trace from there. The
//! consumer runner's span of a message (`outbox process`, kind consumer) is a child of the
//! record's `traceparent`: the dedup outcome, the handler's time, the commit.
//!
//! When off, a message costs one relaxed atomic load here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};

static TRACER: OnceLock<opentelemetry_sdk::trace::SdkTracer> = OnceLock::new();
static ON: AtomicBool = AtomicBool::new(false);

/// Where traces go and how many are kept.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The OTLP/HTTP traces URL (`http://collector:4318/v1/traces`).
    pub endpoint: String,
    /// `service.name` of the spans.
    pub service_name: String,
    /// The share of the traces started here that are sampled (0 to 1).
    pub ratio: f64,
}

impl Settings {
    /// From the standard OpenTelemetry variables; `None` when no endpoint is set (traces off).
    pub fn from_env(default_service: &str) -> Result<Option<Self>, String> {
        let endpoint = match (
            std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").ok().filter(|v| !v.is_empty()),
            std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok().filter(|v| !v.is_empty()),
        ) {
            (Some(full), _) => full,
            (None, Some(base)) => format!("{}/v1/traces", base.trim_end_matches('/')),
            (None, None) => return Ok(None),
        };
        let ratio =
            match std::env::var("OTEL_TRACES_SAMPLER_ARG") {
                Ok(v) => v.parse::<f64>().ok().filter(|r| (0.0..=1.0).contains(r)).ok_or_else(|| {
                    format!("OTEL_TRACES_SAMPLER_ARG={v:?}: expected a share from 0 to 1, such as 0.01")
                })?,
                Err(_) => 0.01,
            };
        let service_name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| default_service.to_owned());
        Ok(Some(Self { endpoint, service_name, ratio }))
    }
}

/// Flushes and stops the exporter when dropped (at the end of `main`).
pub struct Guard(opentelemetry_sdk::trace::SdkTracerProvider);

impl Guard {
    /// Sends every finished span now.
    pub fn flush(&self) {
        let _ = self.0.force_flush();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        ON.store(false, Ordering::Relaxed);
        let _ = self.0.shutdown_with_timeout(Duration::from_secs(5));
    }
}

/// Starts exporting spans (once per process). The exporter has a 10 s timeout per request and
/// sends in batches from a thread of its own; spans it cannot send are dropped, never retried
/// into memory without bound.
pub fn install(settings: &Settings) -> Result<Guard, String> {
    use opentelemetry_otlp::WithExportConfig;
    // The exporter's blocking HTTP client must not be made on an async runtime's thread.
    let endpoint = settings.endpoint.clone();
    let exporter = std::thread::spawn(move || {
        opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint.clone())
            .with_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("cannot export traces to {endpoint}: {e}"))
    })
    .join()
    .map_err(|_| "making the trace exporter failed".to_owned())??;
    let sampler = FollowLinks(opentelemetry_sdk::trace::Sampler::ParentBased(Box::new(
        opentelemetry_sdk::trace::Sampler::TraceIdRatioBased(settings.ratio),
    )));
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler)
        .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(settings.service_name.clone()).build())
        .build();
    if TRACER.set(provider.tracer("outbox-relay")).is_err() {
        return Err("traces are already being exported by this process".into());
    }
    ON.store(true, Ordering::Relaxed);
    Ok(Guard(provider))
}

/// The sampler: a batch's span (a root linked to its messages' spans) is sampled when one of
/// those is; every other span as the parent-based ratio sampler decides.
#[derive(Clone, Debug)]
struct FollowLinks(opentelemetry_sdk::trace::Sampler);

impl opentelemetry_sdk::trace::ShouldSample for FollowLinks {
    fn should_sample(
        &self,
        parent: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[opentelemetry::trace::Link],
    ) -> opentelemetry_sdk::trace::SamplingResult {
        let root = parent.is_none_or(|p| !p.has_active_span());
        if root && links.iter().any(|l| l.span_context.is_sampled()) {
            return opentelemetry_sdk::trace::SamplingResult {
                decision: opentelemetry_sdk::trace::SamplingDecision::RecordAndSample,
                attributes: Vec::new(),
                trace_state: TraceState::default(),
            };
        }
        self.0.should_sample(parent, trace_id, name, kind, attributes, links)
    }
}

/// Turns spans off and on again (for the overhead benchmark: both in one run).
pub fn set_enabled(on: bool) {
    ON.store(on && TRACER.get().is_some(), Ordering::Relaxed);
}

fn tracer() -> Option<&'static opentelemetry_sdk::trace::SdkTracer> {
    if ON.load(Ordering::Relaxed) {
        TRACER.get()
    } else {
        None
    }
}

/// The span context a W3C `traceparent` names (`00-<trace>-<span>-<flags>`), as a remote parent.
pub fn parse_traceparent(tp: &str) -> Option<SpanContext> {
    let mut parts = tp.trim().split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok().filter(|t| *t != TraceId::INVALID)?;
    let span = SpanId::from_hex(span).ok().filter(|s| *s != SpanId::INVALID)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(SpanContext::new(trace, span, TraceFlags::new(flags & 1), true, TraceState::default()))
}

/// The W3C `traceparent` of a span context.
pub fn traceparent(cx: &SpanContext) -> String {
    format!("00-{}-{}-{:02x}", cx.trace_id(), cx.span_id(), cx.trace_flags().to_u8())
}

/// A span in progress; dropping it ends it.
pub struct Span(opentelemetry_sdk::trace::Span);

impl Span {
    /// Starts a span, a child of `parent` (a `traceparent`) when it names one, with the
    /// attributes `attributes` makes; `None` when traces are off or the span is not sampled (it
    /// would be neither kept nor written, so its attributes are not made at all).
    pub fn start(
        name: &'static str,
        kind: SpanKind,
        parent: Option<&str>,
        started: Option<SystemTime>,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Option<Self> {
        let tracer = tracer()?;
        let parent_cx = match parent.and_then(parse_traceparent) {
            Some(sc) => Context::new().with_remote_span_context(sc),
            None => Context::new(),
        };
        let mut b = tracer.span_builder(name).with_kind(kind);
        if let Some(t) = started {
            b = b.with_start_time(t);
        }
        let mut span = Self(tracer.build_with_context(b, &parent_cx));
        if !span.is_recording() {
            return None;
        }
        for kv in attributes() {
            span.set(kv);
        }
        Some(span)
    }

    /// Starts a span of its own trace linked to `linked` (the spans of a batch's messages, which
    /// belong to many traces); `None` when traces are off or nothing is linked.
    pub fn linked(name: &'static str, linked: Vec<SpanContext>, attributes: Vec<KeyValue>) -> Option<Self> {
        let tracer = tracer()?;
        if linked.is_empty() {
            return None;
        }
        let links = linked.into_iter().map(|cx| opentelemetry::trace::Link::with_context(cx)).collect();
        let b = tracer.span_builder(name).with_kind(SpanKind::Internal).with_attributes(attributes).with_links(links);
        Some(Self(tracer.build_with_context(b, &Context::new())))
    }

    /// Whether the span is kept (sampled): attributes are worth adding only then.
    pub fn is_recording(&self) -> bool {
        self.0.is_recording()
    }

    /// The span's context, when it is sampled.
    pub fn context(&self) -> Option<SpanContext> {
        let cx = self.0.span_context();
        cx.is_sampled().then(|| cx.clone())
    }

    /// The span's `traceparent`, when it is sampled (an unsampled span is not written anywhere).
    pub fn traceparent(&self) -> Option<String> {
        let cx = self.0.span_context();
        cx.is_sampled().then(|| traceparent(cx))
    }

    /// Records an attribute.
    pub fn set(&mut self, attribute: KeyValue) {
        self.0.set_attribute(attribute);
    }

    /// Records an event now.
    pub fn event(&mut self, name: &'static str) {
        self.0.add_event(name, Vec::new());
    }

    /// Records an event at `at`.
    pub fn event_at(&mut self, name: &'static str, at: SystemTime) {
        self.0.add_event_with_timestamp(name, at, Vec::new());
    }

    /// Marks the span failed (`error` is what failed, never a payload).
    pub fn fail(&mut self, error: &str) {
        self.0.set_status(Status::error(error.to_owned()));
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// A local OTLP/HTTP endpoint for this crate's trace test and benchmark (feature `testing`):
/// answers every request with 200 and hands its body (an `ExportTraceServiceRequest`) to `got`.
#[cfg(feature = "testing")]
pub async fn receive(listener: tokio::net::TcpListener, got: std::sync::Arc<dyn Fn(Vec<u8>) + Send + Sync>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    while let Ok((mut sock, _)) = listener.accept().await {
        let got = got.clone();
        tokio::spawn(async move {
            let (mut buf, mut chunk) = (Vec::new(), vec![0u8; 64 * 1024]);
            loop {
                // One request: the head, then Content-Length bytes of body.
                let head_end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while buf.len() < head_end + len {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                got(buf.drain(..head_end + len).skip(head_end).collect());
                let ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                if sock.write_all(ok).await.is_err() {
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_parse_and_print_back() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = parse_traceparent(tp).unwrap();
        assert!(cx.is_sampled() && cx.is_remote());
        assert_eq!(traceparent(&cx), tp);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-xyz-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn without_an_endpoint_traces_are_off_and_cost_nothing() {
        assert!(Span::start("x", SpanKind::Internal, None, None, Vec::new).is_none());
    }
}
