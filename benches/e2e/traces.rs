//! Section 12 of the e2e benchmarks (see main.rs): what traces cost the relay. The exporter sends
//! to a local OTLP/HTTP endpoint in this process (`traces::receive`) that counts what it got.

use std::sync::atomic::AtomicU64;

use super::throughput::{relay_rate, Rate};
use super::*;

/// Section 12: the relay draining a 200 B backlog with traces off and on (1% sampled, exported),
/// interleaved in each of three rounds.
pub(super) async fn tracing_cost(ctx: &mut Ctx) -> Res<()> {
    ctx.say(&format!(
        "\n## 12. Traces (200 B JSON, 16 lanes, 4 partitions; relay rate over {:.0} s; off and on interleaved in 3 rounds)\n",
        ctx.window.as_secs_f64()
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let bytes = Arc::new(AtomicU64::new(0));
    let counted = bytes.clone();
    let count = move |body: Vec<u8>| {
        counted.fetch_add(body.len() as u64, Ordering::Relaxed);
    };
    tokio::spawn(outbox_relay::traces::receive(listener, Arc::new(count)));
    let settings = outbox_relay::traces::Settings {
        endpoint: format!("http://127.0.0.1:{port}/v1/traces"),
        service_name: "outbox-relay-bench".into(),
        ratio: 0.01,
    };
    let guard = outbox_relay::traces::install(&settings)?;
    let mut runs: Vec<(Rate, Rate)> = Vec::new();
    let mut guess = 60_000.0f64;
    for round in 0..3 {
        let mut pair = Vec::new();
        for on in [false, true] {
            outbox_relay::traces::set_enabled(on);
            let s = ctx.schema(&format!("trace{round}{on}"), 16).await?;
            let topic = ctx.topic(&format!("trace{round}{on}"), 4).await?;
            preload(ctx, &s, &topic, ((guess * 1.2) * (ctx.window.as_secs_f64() + 2.0)) as usize, 200).await?;
            ctx.quiesce().await?;
            let before = bytes.load(Ordering::Relaxed);
            let r = relay_rate(ctx, &s, 1).await?;
            guard.flush();
            ctx.forget(&s, &[&topic]).await?;
            guess = guess.max(r.per_s);
            eprintln!(
                "traces: round {round} {}: relay {r} msg/s, {} KiB exported",
                if on { "on (1%)" } else { "off" },
                (bytes.load(Ordering::Relaxed) - before) / 1024
            );
            pair.push(r);
        }
        runs.push((pair[0], pair[1]));
    }
    outbox_relay::traces::set_enabled(false);
    let ratios: Vec<f64> = runs.iter().map(|(off, on)| on.per_s / off.per_s).collect();
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    let (off, olo, ohi) = median_of_3(runs.clone(), |r| r.0.per_s);
    let (on, nlo, nhi) = median_of_3(runs, |r| r.1.per_s);
    ctx.say("| traces | relay (msg/s), median (spread) | on / off, same round: median (spread) |");
    ctx.say("|---|---|---|");
    ctx.say(&format!("| off | {} ({olo:.0}–{ohi:.0}) | |", off.0));
    ctx.say(&format!(
        "| on, 1% sampled, exported over OTLP/HTTP | {} ({nlo:.0}–{nhi:.0}) | **{:.2}** ({:.2}–{:.2}) |",
        on.1, sorted[1], sorted[0], sorted[2]
    ));
    ctx.say(&format!("\n{} KiB of spans were exported in all.", bytes.load(Ordering::Relaxed) / 1024));
    Ok(())
}
