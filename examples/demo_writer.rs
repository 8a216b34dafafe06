//! Demo writer: a tiny order service. Each order is one transaction that inserts the order row and
//! enqueues its `orders.created` message through the outbox, so the message exists if and only if
//! the order does.
//!
//! ```sh
//! DATABASE_URL=... cargo run --example demo_writer -- --orders 10000 --rate 2000
//! ```
//! Environment: `DATABASE_URL`, `OUTBOX_SCHEMA` (default `outbox`), `DEMO_TOPIC` (default
//! `demo.orders`), `DEMO_CUSTOMER_PREFIX` (default `customer`: the customers, which are the message
//! keys, are `<prefix>-0` to `<prefix>-96`; writers running at once with different prefixes write
//! disjoint keys, so each key's writes stay serialised). Prints a progress line a second and a
//! final `written N`.

use std::time::{Duration, Instant};

use outbox_relay::db::DbConfig;
use outbox_relay::outbox::{Outbox, OutboxMessage};
use outbox_relay::schema::SchemaName;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} takes a whole number")))
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let orders = arg("--orders", 10_000);
    let rate = arg("--rate", 2_000).max(1);
    let per_tx = arg("--per-tx", 1).max(1);
    let url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL")?;
    let schema: SchemaName = std::env::var("OUTBOX_SCHEMA").unwrap_or_else(|_| "outbox".into()).parse()?;
    let topic = std::env::var("DEMO_TOPIC").unwrap_or_else(|_| "demo.orders".into());
    let prefix = std::env::var("DEMO_CUSTOMER_PREFIX").unwrap_or_else(|_| "customer".into());
    let mut client = DbConfig::parse(&url)?.connect().await?;
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS demo;
             CREATE TABLE IF NOT EXISTS demo.orders (
                 id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 customer text NOT NULL, amount_cents bigint NOT NULL, created_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    let outbox = Outbox::new(schema);
    let start = Instant::now();
    let mut written = 0u64;
    let mut last_report = Instant::now();
    while written < orders {
        let n = per_tx.min(orders - written);
        let tx = client.transaction().await?;
        let mut batch = Vec::with_capacity(n as usize);
        for i in 0..n {
            let seq = written + i;
            let customer = format!("{prefix}-{}", seq % 97);
            let amount = 100 + (seq * 37 % 9_900) as i64;
            let id: i64 = tx
                .query_one(
                    "INSERT INTO demo.orders (customer, amount_cents) VALUES ($1, $2) RETURNING id",
                    &[&customer, &amount],
                )
                .await?
                .get(0);
            batch.push(
                OutboxMessage::builder(topic.as_str())
                    .key(customer.as_str()) // per-customer order
                    .json(&serde_json::json!({ "order_id": id, "customer": customer, "amount_cents": amount }))
                    .message_type("com.example.order.created")
                    .correlation_id(format!("order-{id}"))
                    .build()?,
            );
        }
        outbox.enqueue_batch(&tx, &batch).await?;
        tx.commit().await?;
        written += n;
        // Pace to the rate asked for.
        let due = Duration::from_secs_f64(written as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            println!("writer: written {written}");
            last_report = Instant::now();
        }
    }
    println!("written {written} in {:.1}s", start.elapsed().as_secs_f64());
    Ok(())
}
