//! Running the relay: in-process for most tests, as a child process where a test kills it.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outbox_relay::db::DbConfig;
use outbox_relay::relay::{self, RelayConfig, RelayStats};
use outbox_relay::schema::SchemaName;
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{database_url, kafka_brokers};

/// A test configuration: short timers so tests see rebalancing and retries quickly.
pub fn config(schema: &SchemaName) -> RelayConfig {
    let mut c = RelayConfig::new(DbConfig::parse(&database_url()).unwrap(), schema.clone(), kafka_brokers());
    c.heartbeat_interval = Duration::from_millis(300);
    c.instance_timeout = Duration::from_secs(3);
    c.poll_interval = Duration::from_millis(500);
    c.shutdown_timeout = Duration::from_secs(20);
    c
}

/// A relay running inside the test process.
pub struct InProcess {
    pub stop: CancellationToken,
    pub stats: Arc<RelayStats>,
    task: JoinHandle<Result<Arc<RelayStats>, relay::RelayError>>,
}

impl InProcess {
    pub fn start(config: RelayConfig) -> Self {
        let stop = CancellationToken::new();
        let stats = Arc::new(RelayStats::default());
        let task = tokio::spawn(relay::run_with_stats(config, stop.clone(), stats.clone()));
        Self { stop, stats, task }
    }

    /// Waits until the relay has taken `n` lanes (counting every acquisition); panics after `within`.
    pub async fn wait_lanes(&self, n: u64, within: Duration) {
        let stats = &self.stats;
        super::eventually(within, Duration::from_millis(50), || async move {
            let got = stats.lanes_acquired.load(std::sync::atomic::Ordering::Relaxed);
            if got >= n {
                Ok(())
            } else {
                Err(format!("the relay took {got} of {n} lanes"))
            }
        })
        .await;
    }

    /// Graceful shutdown; panics if the relay failed.
    pub async fn shutdown(self) -> Arc<RelayStats> {
        self.stop.cancel();
        self.task.await.expect("relay task").expect("relay ran without error")
    }
}

/// A relay as a child process of the real binary.
pub struct RelayProcess {
    pub child: Child,
}

impl RelayProcess {
    pub fn start(schema: &SchemaName, extra: &[&str]) -> Self {
        Self::start_with(&[&["--schema", schema.as_str()], extra].concat(), Stdio::inherit())
    }

    /// `outbox-relay run` with the tests' short timers and `args` (which name the outboxes),
    /// its log lines (warnings and errors) to `log`.
    pub fn start_with(args: &[&str], log: Stdio) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
        cmd.args(["run", "--heartbeat-interval", "300ms", "--instance-timeout", "3s", "--poll-interval", "500ms"])
            .args(["--metrics-addr", "off"])
            .args(args)
            .env("DATABASE_URL", database_url())
            .env("KAFKA_BROKERS", kafka_brokers())
            .env("OUTBOX_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        Self { child: cmd.spawn().expect("spawn outbox-relay run") }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no chance to finish anything.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit; returns the exit code.
    pub fn terminate(&mut self, within: Duration) -> Option<i32> {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if std::time::Instant::now() > deadline {
                self.kill9();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}
