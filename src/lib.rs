//! waymark: a Kafka-native customer-journey engine.
//!
//! Services produce events to Kafka; waymark decides, per user and per session, who enters which
//! journey, moves sessions from step to step, and publishes entry, step and conversion records.
//! The data's path, one module per stage, each importing only those above it:
//!
//! - [`time`]: event time as epoch milliseconds, RFC 3339 in and out, journey durations.
//! - [`event`]: input events (contract section 1): decoding, validation, normalisation.
//! - [`record`]: output records (contract section 3).
//! - [`journey`]: journey definitions: conditions, entry windows, loading and validation.
//! - [`engine`]: the pure journey state machine: sessions + input -> new sessions + records.
//! - [`store`]: the state store trait (sessions, timers, metadata, atomic batches), RocksDB (the
//!   service's) and memory (a backtest's, thrown away).
//! - [`processor`]: the engine over a store: timers, session loading, staging, commits.
//! - [`profile`]: user profile records (update, erase) and their merge rule.
//! - [`replay`]: `waymark replay`, the processor over a file of events (the `Feed` that replay and
//!   backtest share).
//! - [`backtest`]: `waymark backtest`, the same run counted as a funnel per journey, from a file or
//!   straight from Kafka, as text, JSON or an HTML page.
//! - [`inspect`]: `waymark inspect` (a user's sessions) and `waymark journeys` (the loaded set).
//! - [`loadgen`]: synthetic journeys and events for benchmarks.
//! - [`config`]: `waymark run` configuration: defaults, file, environment, flags.
//! - [`properties`]: librdkafka client properties (SASL, TLS), `_file` secrets, redaction.
//! - [`metrics`]: Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` endpoints.
//! - [`logging`]: tracing setup (text or JSON, level from `WAYMARK_LOG`).
//! - [`service`]: wiring for `waymark run`: config, journeys, topics, signals, metrics server.
//! - [`kafka`]: the Kafka runtime (`waymark run`), its commit pipeline, partition lifecycle and
//!   producer, restore, ownership by murmur2, the route topic's records, the changelog, topics,
//!   produce/tail.

#![forbid(unsafe_code)]

pub mod backtest;
pub mod config;
pub mod engine;
pub mod event;
pub mod inspect;
pub mod journey;
pub mod kafka;
pub mod loadgen;
pub mod logging;
pub mod metrics;
pub mod processor;
pub mod profile;
pub mod properties;
pub mod record;
pub mod replay;
pub mod service;
pub mod store;
pub mod time;
