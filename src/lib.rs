//! kpay: a payment system built as event-streaming microservices, in one binary.
//!
//! # Layout
//!
//! A payment's path, module by module:
//!
//! 1. `http::payments` validates `POST /api/v1/payments` and hands it to
//!    `runtime::ingest`, whose per-partition sequencer checks the id and
//!    appends it durably to `payment.incoming` (group commit) before the 202.
//! 2. `runtime::task` runs `pipeline::inflight` per partition: dedup, status,
//!    inflight totals; it emits a DEBIT keyed by `from` to `payment.inflight`.
//! 3. `pipeline::account` screens the payment when rules are on
//!    (`pipeline::screening`: reject it, hold it for an operator's review
//!    in `pipeline::inflight`, or queue it behind the payer's payment in
//!    flight), then debits `from` and emits a CREDIT keyed by `to` (or
//!    completes the payment as rejected); the CREDIT credits `to` and emits
//!    the completion to `payment.complete` (or a REFUND back to `from`,
//!    which completes it as reversed).
//! 4. `pipeline::inflight` records the terminal state and the lineage (every
//!    hop's processor, partition, offset, time in and out); `pipeline::confirmed`
//!    counts it, adds it to the throughput/latency windows
//!    (`pipeline::windows`) and forwards confirmed payments to
//!    `payment.confirmed`. The runtime shows each completion to the
//!    observer `app` wired in (`instrument::live`: the dashboard's last two
//!    minutes and the latency histogram).
//!
//! A record no processor can act on becomes a `runtime::dead_letter` (store +
//! `payment.dlq`) and the task goes on; an operator replays it (`ops::dlq`)
//! to its source topic.
//!
//! Account rows live in blocks (`store::blocks`): each checkpoint packs the
//! accounts it changed into new blocks, and collects the older copies. A
//! settled payment leaves its own row for a block (`store::blocks`) at the
//! next checkpoint, and is forgotten after
//! `limits.payment_retention_seconds` (`runtime::task`, after a checkpoint);
//! a record older than that is dead-lettered as `expired` rather than risk
//! applying a forgotten copy.
//!
//! Modules, in layers that only import downward (`tests/architecture.rs`
//! holds the list):
//! - [`model`]: money, ids, events and their byte codec; [`failpoint`]: crash
//!   points for drills (`KPAY_CRASH_AT`), in the IO layers only.
//! - [`config`]: layered settings (defaults ← file ← `KPAY_*` env ← flags),
//!   their types (tokens, backend) and limits.
//! - [`log`]: the `Log` trait, the embedded durable log and Kafka (rskafka).
//! - [`cluster`]: membership of a Kafka consumer group (its own client of
//!   the group protocol), so that kpay instances divide the partitions.
//! - [`store`]: sled-backed state tables and task checkpoints.
//! - [`pipeline`]: pillar 1, every processor as pure logic (inflight,
//!   account, confirmed, and the control processor that applies commands).
//! - [`runtime`]: all IO of the pipeline: tasks per (processor, partition),
//!   ingest, flush, retention, shutdown; reached through `Runtime`'s methods.
//! - [`instrument`]: pillar 2, business metrics: live view, SLOs, lag, Prometheus.
//! - [`control`]: pillar 3, commands through the log: pause with drain,
//!   rate limit, screening rules, status, bootstrap, the shutdown signal;
//!   the adaptive intake controller.
//! - [`ops`]: pillar 4: dead letters and replay, audit trail and error log
//!   (journals), `kpay rebuild` (state from the log).
//! - [`generator`]: payments at a set rate for demos and load, through the ingest path.
//! - [`http`]: the axum server: REST API, auth, audit, OpenAPI, Swagger UI, web UI.
//! - [`app`]: the composition root: opens the backends, starts the runtime
//!   and the planes, serves HTTP, owns the order of shutdown.
//! - [`bench`]: the end-to-end benchmark behind `kpay bench`.

#![forbid(unsafe_code)]
#![warn(clippy::all)]

pub mod app;
pub mod bench;
pub mod cluster;
pub mod config;
pub mod control;
pub mod failpoint;
pub mod generator;
pub mod http;
pub mod instrument;
pub mod log;
pub mod model;
pub mod ops;
pub mod pipeline;
pub mod runtime;
pub mod store;
