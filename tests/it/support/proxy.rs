//! A small TCP proxy between a client and a server on loopback, for two uses: counting the
//! PostgreSQL frontend messages a client sends (to prove round trips), and injecting faults
//! (latency, blackholes, resets) in failure tests.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Running proxy; dropped, it stops accepting and cuts its connections.
pub struct Proxy {
    pub port: u16,
    state: Arc<State>,
    _stop: watch::Sender<bool>,
}

#[derive(Default)]
struct State {
    /// PostgreSQL frontend messages that end a round trip (Sync, simple Query) seen from clients.
    round_trips: AtomicU64,
    /// While true, bytes are accepted and dropped in both directions.
    blackhole: AtomicBool,
    /// Extra delay per chunk forwarded, in milliseconds.
    latency_ms: AtomicU64,
    /// Bumped to cut every open connection.
    generation: AtomicU64,
}

impl Proxy {
    /// Starts a proxy on a free loopback port forwarding to `target` (host:port).
    pub async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State::default());
        let (stop_tx, stop_rx) = watch::channel(false);
        let st = state.clone();
        tokio::spawn(async move {
            let mut stop = stop_rx.clone();
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        let target = target.clone();
                        let st = st.clone();
                        let stop = stop_rx.clone();
                        tokio::spawn(async move {
                            if let Ok(server) = TcpStream::connect(&target).await {
                                pipe(client, server, st, stop).await;
                            }
                        });
                    }
                }
            }
        });
        Proxy { port, state, _stop: stop_tx }
    }

    /// Round trips (Sync or Query messages) clients have sent so far.
    pub fn round_trips(&self) -> u64 {
        self.state.round_trips.load(Ordering::SeqCst)
    }

    /// Stops forwarding without closing anything: the peers see silence.
    pub fn set_blackhole(&self, on: bool) {
        self.state.blackhole.store(on, Ordering::SeqCst);
    }

    /// Adds latency to every chunk forwarded.
    pub fn set_latency(&self, latency: Duration) {
        self.state.latency_ms.store(latency.as_millis() as u64, Ordering::SeqCst);
    }

    /// Cuts every open connection (new ones are still accepted).
    pub fn reset_connections(&self) {
        self.state.generation.fetch_add(1, Ordering::SeqCst);
    }
}

async fn pipe(client: TcpStream, server: TcpStream, st: Arc<State>, mut stop: watch::Receiver<bool>) {
    let generation = st.generation.load(Ordering::SeqCst);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let st_up = st.clone();
    let up = async move {
        let mut counter = PgFrontendCounter::default();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = cr.read(&mut buf).await.ok().filter(|n| *n > 0)?;
            st_up.round_trips.fetch_add(counter.feed(&buf[..n]), Ordering::SeqCst);
            forward(&st_up, &mut sw, &buf[..n]).await?;
        }
        #[allow(unreachable_code)]
        Some(())
    };
    let st_down = st.clone();
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = sr.read(&mut buf).await.ok().filter(|n| *n > 0)?;
            forward(&st_down, &mut cw, &buf[..n]).await?;
        }
        #[allow(unreachable_code)]
        Some(())
    };
    let cut = async {
        loop {
            if st.generation.load(Ordering::SeqCst) != generation {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = cut => {}
        _ = stop.changed() => {}
    }
}

async fn forward(st: &State, w: &mut tokio::net::tcp::OwnedWriteHalf, bytes: &[u8]) -> Option<()> {
    let latency = st.latency_ms.load(Ordering::SeqCst);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    if st.blackhole.load(Ordering::SeqCst) {
        return Some(());
    }
    w.write_all(bytes).await.ok()
}

/// Parses the frontend side of the PostgreSQL protocol just enough to count round trips.
#[derive(Default)]
struct PgFrontendCounter {
    started: bool,
    header: Vec<u8>,
    remaining: usize,
}

impl PgFrontendCounter {
    fn feed(&mut self, mut bytes: &[u8]) -> u64 {
        let mut trips = 0;
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(bytes.len());
                self.remaining -= n;
                bytes = &bytes[n..];
                continue;
            }
            // The startup (and SSL request) message has no type byte: 4-byte length first.
            let header_len = if self.started { 5 } else { 4 };
            let need = header_len - self.header.len();
            let n = need.min(bytes.len());
            self.header.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.header.len() < header_len {
                break;
            }
            let (kind, len_bytes) =
                if self.started { (Some(self.header[0]), &self.header[1..5]) } else { (None, &self.header[0..4]) };
            let len = u32::from_be_bytes(len_bytes.try_into().unwrap()) as usize;
            let is_ssl_request = !self.started && len == 8;
            if matches!(kind, Some(b'S') | Some(b'Q')) {
                trips += 1;
            }
            self.remaining = len - 4;
            self.header.clear();
            if !self.started && !is_ssl_request {
                self.started = true;
            }
        }
        trips
    }
}
