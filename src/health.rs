//! `/metrics`, `/healthz` and `/readyz` for the relay, on a small HTTP/1.1 server of its own.
//!
//! - `/healthz`: 200 while the process serves requests (liveness).
//! - `/readyz`: 200 when the database answered the last heartbeat, the broker answered a metadata
//!   request in the last few seconds, the breaker is not open, the instance owns at least one lane,
//!   and no owned lane's head is older than `--stuck-threshold`; otherwise 503 and the reasons.
//! - `/metrics`: the Prometheus text format.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What `/readyz` looks at: the broker and the breaker, which every outbox of the instance shares,
/// and per outbox the last heartbeat, the lanes owned and the oldest owned head.
#[derive(Debug)]
pub struct Health {
    broker_ok: AtomicBool,
    breaker_open: AtomicBool,
    outboxes: Mutex<HashMap<String, OutboxHealth>>,
    stuck_threshold: Duration,
}

#[derive(Debug, Default, Clone, Copy)]
struct OutboxHealth {
    db_ok: bool,
    lanes: usize,
    oldest_head: Duration,
}

impl Health {
    /// Nothing known yet: not ready.
    pub fn new(stuck_threshold: Duration) -> Self {
        Self {
            broker_ok: AtomicBool::new(false),
            breaker_open: AtomicBool::new(false),
            outboxes: Mutex::new(HashMap::new()),
            stuck_threshold,
        }
    }

    fn outbox(&self, outbox: &str, f: impl FnOnce(&mut OutboxHealth)) {
        let mut all = self.outboxes.lock().expect("health lock");
        f(all.entry(outbox.to_owned()).or_default());
    }

    pub(crate) fn set_db_ok(&self, outbox: &str, ok: bool) {
        self.outbox(outbox, |o| o.db_ok = ok);
    }

    pub(crate) fn set_broker_ok(&self, ok: bool) {
        self.broker_ok.store(ok, Ordering::Relaxed);
    }

    pub(crate) fn set_breaker_open(&self, open: bool) {
        self.breaker_open.store(open, Ordering::Relaxed);
    }

    pub(crate) fn set_lanes(&self, outbox: &str, n: usize) {
        self.outbox(outbox, |o| o.lanes = n);
    }

    pub(crate) fn set_oldest_head(&self, outbox: &str, age: Duration) {
        self.outbox(outbox, |o| o.oldest_head = age);
    }

    /// Forgets an outbox the instance stopped serving.
    pub(crate) fn forget(&self, outbox: &str) {
        self.outboxes.lock().expect("health lock").remove(outbox);
    }

    /// Ready, or the reasons it is not.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let mut why = Vec::new();
        let all = self.outboxes.lock().expect("health lock").clone();
        let mut failing: Vec<&str> = all.iter().filter(|(_, o)| !o.db_ok).map(|(k, _)| k.as_str()).collect();
        failing.sort_unstable();
        if all.is_empty() {
            why.push("database: no outbox served yet".to_owned());
        } else if !failing.is_empty() {
            why.push(format!("database: the last heartbeat failed ({})", failing.join(", ")));
        }
        if !self.broker_ok.load(Ordering::Relaxed) {
            why.push("broker: no answer to a metadata request".to_owned());
        }
        if self.breaker_open.load(Ordering::Relaxed) {
            why.push("breaker: open".to_owned());
        }
        if all.values().map(|o| o.lanes).sum::<usize>() == 0 {
            why.push("lanes: none owned".to_owned());
        }
        if let Some((name, o)) = all.iter().max_by_key(|(_, o)| o.oldest_head) {
            if o.oldest_head > self.stuck_threshold {
                why.push(format!("stuck: an owned lane's head is {}s old ({name})", o.oldest_head.as_secs()));
            }
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(why)
        }
    }
}

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn install_recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(&[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
                .expect("static buckets are valid")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            crate::telemetry::describe();
            handle
        })
        .clone()
}

/// Serves the endpoints until `stop`.
pub async fn serve(
    listener: TcpListener,
    metrics: Option<PrometheusHandle>,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    loop {
        let (mut socket, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(s) => s,
                Err(_) => continue,
            },
        };
        let metrics = metrics.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            // A request line within 5 s, or the connection is dropped.
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while len < buf.len() {
                    let n = socket.read(&mut buf[len..]).await.ok()?;
                    if n == 0 {
                        break;
                    }
                    len += n;
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Some(())
            })
            .await;
            if read.is_err() {
                return;
            }
            let request = String::from_utf8_lossy(&buf[..len]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (status, body, content_type) = match path {
                "/healthz" => ("200 OK", "ok\n".to_owned(), "text/plain"),
                "/readyz" => match health.readiness() {
                    Ok(()) => ("200 OK", "ready\n".to_owned(), "text/plain"),
                    Err(why) => ("503 Service Unavailable", format!("not ready: {}\n", why.join("; ")), "text/plain"),
                },
                "/metrics" => match &metrics {
                    Some(h) => ("200 OK", h.render(), "text/plain; version=0.0.4"),
                    None => ("404 Not Found", "metrics are off\n".to_owned(), "text/plain"),
                },
                _ => ("404 Not Found", "try /metrics, /healthz or /readyz\n".to_owned(), "text/plain"),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tokio::time::timeout(Duration::from_secs(5), socket.write_all(response.as_bytes())).await;
        });
    }
}
