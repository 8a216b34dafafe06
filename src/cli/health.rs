//! `outbox-relay health`: asks a running relay's /healthz or /readyz (for container health
//! checks, which then need no HTTP client in the image). Exit 0 when it answers 200.

use std::time::Duration;

use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::CliError;

#[derive(Debug, Args)]
pub(crate) struct HealthArgs {
    /// The relay's --metrics-addr.
    #[arg(long, env = "OUTBOX_HEALTH_ADDR", default_value = "127.0.0.1:9465")]
    addr: String,
    /// Ask /readyz instead of /healthz.
    #[arg(long)]
    ready: bool,
}

pub(crate) async fn run(args: HealthArgs) -> Result<(), CliError> {
    let path = if args.ready { "/readyz" } else { "/healthz" };
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(&args.addr).await?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n", args.addr).as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<String, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
    };
    let response = tokio::time::timeout(Duration::from_secs(3), ask)
        .await
        .map_err(|_| format!("no answer from {} within 3s", args.addr))?
        .map_err(|e| {
            format!("cannot reach the relay at {}: {e} (is `run` serving --metrics-addr there?)", args.addr)
        })?;
    let status = response.split_whitespace().nth(1).unwrap_or("");
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").trim();
    if status == "200" {
        println!("{body}");
        Ok(())
    } else {
        Err(format!("{path} answered {status}: {body}").into())
    }
}
