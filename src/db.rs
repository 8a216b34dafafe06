//! Connecting to PostgreSQL: timeouts on every connection, and TLS that verifies the server.
//!
//! `sslmode` in the URL is read here rather than by the driver, because the driver's `prefer`
//! falls back to plaintext without a word and it does not verify certificates by itself:
//!
//! | `sslmode` | what this does |
//! |---|---|
//! | absent | `disable` for a loopback host or a Unix socket, `verify-full` for any other host |
//! | `disable` | plaintext |
//! | `prefer`, `allow` | refused: a silent plaintext fallback is not a security setting |
//! | `require`, `verify-ca` | TLS; the certificate chain is verified (not the host name) |
//! | `verify-full` | TLS; the chain and the host name are verified |
//!
//! `sslrootcert=<file>` names the CA bundle; without it the system's roots are used.
//! (TLS needs the `relay` feature; without it only plaintext connections are made.)

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config};
use tokio_util::sync::CancellationToken;

/// How long a connection attempt may take when the URL sets no `connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long sent data may stay unacknowledged before the connection is dropped.
pub const DEFAULT_TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a database connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL cannot be parsed. The URL itself is not repeated: it may hold a password.
    #[error("the database URL is not valid ({0}): expected postgres://user@host:port/dbname?sslmode=verify-full")]
    BadUrl(String),
    /// The URL asks for an sslmode this product refuses.
    #[error("sslmode={0} is refused: it falls back to plaintext without telling; use sslmode=verify-full (or sslmode=disable on a trusted network)")]
    InsecureSslMode(String),
    /// TLS was asked for but could not be set up.
    #[error("TLS to PostgreSQL could not be set up: {0}")]
    Tls(String),
    /// The server could not be reached or refused the connection.
    #[error(
        "could not connect to PostgreSQL at {target}: {source} (check that the server is up and DATABASE_URL is right)"
    )]
    Connect {
        /// Host and port, without credentials.
        target: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Setting up the session failed.
    #[error("setting up the PostgreSQL session failed: {0}")]
    Session(#[source] tokio_postgres::Error),
    /// Setting up the session took too long.
    #[error("setting up the PostgreSQL session took longer than {0:?} (is the server or the network stuck?)")]
    Timeout(Duration),
    /// Every session of a pool was in use for the pool's whole wait timeout.
    #[error("all {0} sessions of the pool stayed busy for the whole wait (raise the pool size, or look for slow handlers or a stuck database)")]
    PoolExhausted(usize),
    /// The pool refused for another reason.
    #[error("the session pool failed: {0}")]
    Pool(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsMode {
    Disable,
    VerifyCa,
    VerifyFull,
}

/// A parsed database URL with this product's TLS policy applied.
#[derive(Clone)]
pub struct DbConfig {
    config: Config,
    tls: TlsMode,
    #[cfg_attr(not(feature = "relay"), allow(dead_code))]
    root_cert: Option<String>,
    statement_timeout: Option<Duration>,
}

impl std::fmt::Debug for DbConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        f.debug_struct("DbConfig").field("target", &self.target()).field("tls", &self.tls).finish()
    }
}

impl DbConfig {
    /// Parses `url` (a `postgres://` URL or a `key=value` string).
    pub fn parse(url: &str) -> Result<Self, ConnectError> {
        let (rest, sslmode, root_cert) = split_tls_params(url);
        let mut config: Config =
            rest.parse().map_err(|e: tokio_postgres::Error| ConnectError::BadUrl(e.to_string()))?;
        let local = config.get_hosts().iter().all(|h| match h {
            Host::Tcp(name) => matches!(name.as_str(), "localhost" | "::1") || name.starts_with("127."),
            #[cfg(unix)]
            Host::Unix(_) => true,
        });
        let tls = match sslmode.as_deref() {
            None if local => TlsMode::Disable,
            None => TlsMode::VerifyFull,
            Some("disable") => TlsMode::Disable,
            Some("require" | "verify-ca") => TlsMode::VerifyCa,
            Some("verify-full") => TlsMode::VerifyFull,
            Some(other) => return Err(ConnectError::InsecureSslMode(other.to_owned())),
        };
        config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(DEFAULT_TCP_USER_TIMEOUT);
        }
        config.keepalives(true).keepalives_idle(Duration::from_secs(30));
        if config.get_application_name().is_none() {
            config.application_name("outbox-relay");
        }
        Ok(Self { config, tls, root_cert, statement_timeout: Some(Duration::from_secs(30)) })
    }

    /// Sets the session's `statement_timeout` (`None`: the server's default).
    pub fn with_statement_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// Sets the connect timeout.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout(timeout);
        self
    }

    /// Sets the application name the server shows for these sessions.
    pub fn with_application_name(mut self, name: &str) -> Self {
        self.config.application_name(name);
        self
    }

    /// The driver configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Host, port and database, without credentials, for messages and logs.
    pub fn target(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "localhost".to_owned(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        format!("{host}:{port}/{}", self.config.get_dbname().unwrap_or(""))
    }

    /// The user it logs in as, if the URL names one.
    pub fn user(&self) -> Option<&str> {
        self.config.get_user()
    }

    /// Opens a session; its connection task runs on the current tokio runtime and ends with it.
    pub async fn connect(&self) -> Result<Client, ConnectError> {
        Ok(self.connect_watched().await?.0)
    }

    /// Opens a session and returns a token cancelled the moment the session is gone (server
    /// restart, `pg_terminate_backend`, network loss), for work that must stop with it.
    pub async fn connect_watched(&self) -> Result<(Client, CancellationToken), ConnectError> {
        let (client, closed, _) = self.open(false).await?;
        Ok((client, closed))
    }

    /// Opens a session that LISTENs on `channels`; the receiver yields each notification's
    /// channel and payload, and ends when the session is gone. [`listen_statement`] follows
    /// another channel on it.
    pub async fn listen(&self, channels: &[String]) -> Result<(Client, mpsc::UnboundedReceiver<Note>), ConnectError> {
        let (client, _, notes) = self.open(true).await?;
        let all: String = channels.iter().map(|c| listen_statement(c)).collect();
        client.batch_execute(&all).await.map_err(ConnectError::Session)?;
        Ok((client, notes.expect("asked for notifications")))
    }

    async fn open(
        &self,
        notifications: bool,
    ) -> Result<(Client, CancellationToken, Option<mpsc::UnboundedReceiver<Note>>), ConnectError> {
        // The driver's connect_timeout covers the TCP connect only; a peer that accepts and then
        // says nothing (a blackholed path) must not hang the caller either.
        let limit = self.config.get_connect_timeout().copied().unwrap_or(DEFAULT_CONNECT_TIMEOUT) * 2;
        match tokio::time::timeout(limit, self.open_inner(notifications)).await {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Timeout(limit)),
        }
    }

    async fn open_inner(
        &self,
        notifications: bool,
    ) -> Result<(Client, CancellationToken, Option<mpsc::UnboundedReceiver<Note>>), ConnectError> {
        let closed = CancellationToken::new();
        let (tx, rx) = if notifications {
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let client = match self.tls {
            TlsMode::Disable => {
                let (client, conn) = self
                    .config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(|source| ConnectError::Connect { target: self.target(), source })?;
                tokio::spawn(drive(conn, closed.clone(), tx));
                client
            }
            TlsMode::VerifyCa | TlsMode::VerifyFull => self.connect_tls(closed.clone(), tx).await?,
        };
        // Server-side keepalives too: without them a backend (and the lane lock it holds) outlives
        // a crashed or partitioned client by the kernel's default of about two hours. No JIT: these
        // are short statements, and a cost estimate over `jit_above_cost` (the claim's, with its
        // lateral join) made PostgreSQL spend 0.6 s compiling each of a session's first claims.
        let mut setup =
            "SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; SET tcp_keepalives_count = 3; SET jit = off;"
                .to_owned();
        if let Some(t) = self.statement_timeout {
            setup.push_str(&format!("SET statement_timeout = {};", t.as_millis()));
        }
        client.batch_execute(&setup).await.map_err(ConnectError::Session)?;
        Ok((client, closed, rx))
    }

    #[cfg(feature = "relay")]
    async fn connect_tls(
        &self,
        closed: CancellationToken,
        notes: Option<mpsc::UnboundedSender<Note>>,
    ) -> Result<Client, ConnectError> {
        use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
        let mut builder =
            SslConnector::builder(SslMethod::tls_client()).map_err(|e| ConnectError::Tls(e.to_string()))?;
        builder.set_verify(SslVerifyMode::PEER);
        if let Some(path) = &self.root_cert {
            builder.set_ca_file(path).map_err(|e| ConnectError::Tls(format!("cannot read sslrootcert {path}: {e}")))?;
        }
        let mut connector = postgres_openssl::MakeTlsConnector::new(builder.build());
        if self.tls == TlsMode::VerifyCa {
            connector.set_callback(|cfg, _domain| {
                cfg.set_verify_hostname(false);
                Ok(())
            });
        }
        let mut config = self.config.clone();
        config.ssl_mode(tokio_postgres::config::SslMode::Require);
        let (client, conn) = config
            .connect(connector)
            .await
            .map_err(|source| ConnectError::Connect { target: self.target(), source })?;
        tokio::spawn(drive(conn, closed, notes));
        Ok(client)
    }

    #[cfg(not(feature = "relay"))]
    async fn connect_tls(
        &self,
        _closed: CancellationToken,
        _notes: Option<mpsc::UnboundedSender<Note>>,
    ) -> Result<Client, ConnectError> {
        Err(ConnectError::Tls(
            "this build has no TLS support: enable the `relay` feature or use sslmode=disable".into(),
        ))
    }
}

/// Runs a connection until it ends, forwarding notifications, then cancels `closed`.
async fn drive<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    closed: CancellationToken,
    notes: Option<mpsc::UnboundedSender<Note>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                if let Some(tx) = &notes {
                    let _ = tx.send(Note { channel: n.channel().to_owned(), payload: n.payload().to_owned() });
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::debug!(error = %e, "postgres connection closed");
                break;
            }
            None => break,
        }
    }
    closed.cancel();
}

/// A NOTIFY: its channel and payload.
#[derive(Debug)]
pub struct Note {
    /// The channel.
    pub channel: String,
    /// The payload.
    pub payload: String,
}

/// The statement that LISTENs on `channel` (quoted as an identifier).
pub fn listen_statement(channel: &str) -> String {
    format!("LISTEN \"{}\";", channel.replace('"', "\"\""))
}

/// Takes `sslmode` and `sslrootcert` out of a URL or key=value string.
fn split_tls_params(url: &str) -> (String, Option<String>, Option<String>) {
    let mut sslmode = None;
    let mut root = None;
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_owned(), None, None);
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("sslmode", v)) => sslmode = Some(v.to_owned()),
                Some(("sslrootcert", v)) => root = Some(v.to_owned()),
                _ => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) };
        (rest, sslmode, root)
    } else {
        let mut kept = Vec::new();
        for part in url.split_whitespace() {
            match part.split_once('=') {
                Some(("sslmode", v)) => sslmode = Some(v.to_owned()),
                Some(("sslrootcert", v)) => root = Some(v.to_owned()),
                _ => kept.push(part),
            }
        }
        (kept.join(" "), sslmode, root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_policy_follows_the_table() {
        let mode = |u: &str| DbConfig::parse(u).map(|c| c.tls);
        assert_eq!(mode("postgres://u@127.0.0.1:5432/db").unwrap(), TlsMode::Disable);
        assert_eq!(mode("postgres://u@db.internal:5432/db").unwrap(), TlsMode::VerifyFull);
        assert_eq!(mode("postgres://u@db.internal/db?sslmode=require").unwrap(), TlsMode::VerifyCa);
        assert_eq!(mode("postgres://u@db.internal/db?sslmode=disable&application_name=x").unwrap(), TlsMode::Disable);
        assert!(matches!(mode("postgres://u@db.internal/db?sslmode=prefer"), Err(ConnectError::InsecureSslMode(_))));
        assert!(matches!(mode("host=db.internal sslmode=allow"), Err(ConnectError::InsecureSslMode(_))));
        let c = DbConfig::parse("postgres://u:hunter2@db.internal/db?sslmode=verify-full&sslrootcert=/ca.pem").unwrap();
        assert_eq!(c.root_cert.as_deref(), Some("/ca.pem"));
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}

/// Repeats a chunked statement until a chunk comes back short, so that no one statement holds its
/// locks for long: `step` runs one statement of at most `chunk` rows and returns how many it
/// touched; `progress` sees the running total after each. Returns the total.
pub async fn in_chunks<F, Fut, E>(chunk: i64, mut step: F, mut progress: impl FnMut(u64)) -> Result<u64, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, E>>,
{
    let mut total = 0;
    loop {
        let n = step().await?;
        total += n;
        progress(total);
        if n < chunk.max(1) as u64 {
            return Ok(total);
        }
    }
}
