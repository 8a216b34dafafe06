#![allow(unreachable_pub, missing_docs)]
//! Integration tests: one binary, real PostgreSQL and a real Kafka-protocol broker.
//!
//! Run them with `bash scripts/test.sh`, which provisions both (or uses `DATABASE_URL` and
//! `KAFKA_BROKERS` when set). Each test makes its own schema and topic names, so they run in
//! parallel, and removes them when it ends.

mod support;

mod failures;
mod fleet;
mod inbox;
mod migrate;
mod operators;
mod reconcile;
mod relay;
mod tls;
mod traces;
mod writer;
mod writers_other_languages;
