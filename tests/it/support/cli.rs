//! The `outbox-relay` binary as an operator runs it: environment set, no terminal.

use std::process::{Command, Output};

use super::{database_url, kafka_brokers};

/// Runs the binary with DATABASE_URL and KAFKA_BROKERS set, stdin closed.
pub fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(args)
        .env("DATABASE_URL", database_url())
        .env("KAFKA_BROKERS", kafka_brokers())
        .env("USER", "oncall-test")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run outbox-relay")
}

/// The standard output of a run that must succeed.
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A run that must fail, its error saying `says`.
pub fn fails(out: &Output, says: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail: {}", String::from_utf8_lossy(&out.stdout));
    assert!(err.contains(says), "error should say {says:?}: {err}");
}
