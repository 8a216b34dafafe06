//! TLS to PostgreSQL verifies the server, and plaintext fallbacks are refused.

use std::time::Duration;

use outbox_relay::db::{ConnectError, DbConfig};
use outbox_relay::schema::{self, SchemaName};

use crate::support::kafka::{create_topic, read_topic};
use crate::support::pg_tls::TlsPostgres;
use crate::support::relay::InProcess;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tls_verifies_the_server_and_the_relay_runs_over_it() {
    let server = TlsPostgres::start();
    let ca = server.ca.display().to_string();
    let other = server.other_ca.display().to_string();

    // verify-full with the right CA and the certificate's name: connected, and encrypted.
    let good = DbConfig::parse(&server.url("localhost", &format!("sslmode=verify-full&sslrootcert={ca}"))).unwrap();
    let client = good.connect().await.expect("verify-full with the right CA connects");
    let ssl: bool =
        client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap().get(0);
    assert!(ssl, "the session is encrypted");

    // A server whose certificate another CA signed is refused.
    let wrong_ca =
        DbConfig::parse(&server.url("localhost", &format!("sslmode=verify-full&sslrootcert={other}"))).unwrap();
    let err = wrong_ca.connect().await.expect_err("an unknown CA must be refused");
    assert!(matches!(err, ConnectError::Connect { .. }), "{err}");

    // The certificate names localhost, not 127.0.0.1: verify-full refuses, verify-ca accepts.
    let by_ip = DbConfig::parse(&server.url("127.0.0.1", &format!("sslmode=verify-full&sslrootcert={ca}"))).unwrap();
    assert!(by_ip.connect().await.is_err(), "host name mismatch must be refused under verify-full");
    let by_ip_ca = DbConfig::parse(&server.url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}"))).unwrap();
    by_ip_ca.connect().await.expect("verify-ca checks the chain, not the name");

    // Plaintext is refused by this server, and prefer is refused by the relay before it tries.
    let plain = DbConfig::parse(&server.url("127.0.0.1", "sslmode=disable")).unwrap();
    assert!(plain.connect().await.is_err());
    assert!(matches!(
        DbConfig::parse(&server.url("localhost", "sslmode=prefer")),
        Err(ConnectError::InsecureSslMode(_))
    ));

    // The whole path over TLS: migrate, write, relay, Kafka.
    let schema = SchemaName::new("tls_outbox").unwrap();
    let mut admin = good.connect().await.unwrap();
    schema::migrate(&mut admin, &schema, Some(2)).await.unwrap();
    let topic = create_topic("relay-tls", 1).await;
    for i in 0..100 {
        admin.execute("SELECT tls_outbox.enqueue($1, $2, '\\x01')", &[&topic, &format!("k{}", i % 3)]).await.unwrap();
    }
    let mut cfg = crate::support::relay::config(&schema);
    cfg.db = good.clone();
    let relay = InProcess::start(cfg);
    let received = read_topic(&topic, 100, Duration::from_secs(60));
    let stats = relay.shutdown().await;
    println!("figures: delivered over TLS {}", stats.delivered.load(std::sync::atomic::Ordering::Relaxed));
    assert_eq!(received.len(), 100);
}
