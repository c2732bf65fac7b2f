//! fanout: dynamic fan-out / fan-in over gRPC.
//!
//! A [`Pipeline`](pipeline) receives a run of records and fans it out, one
//! unary `ProcessRecord` call per record, over a fleet of
//! [`RecordProcessor`](processor)s; each processor splits its record into
//! units, processes them on a fixed pool of one thread per core and
//! aggregates them.
//! Results stream back in completion order, then a final report.
//!
//! # Layout
//!
//! - [`proto`]: the generated wire types (`fanout.v1`) and the descriptor set
//!   for reflection. Only the service modules ([`processor`], [`pipeline`],
//!   [`server`]) and [`convert`] touch them.
//! - [`convert`]: wire ⇄ domain conversion, done once at the edge
//!   (`Struct` ⇄ JSON, `Duration`, `Timestamp`, request validation).
//! - [`domain`]: the domain types the engine and pipeline work on.
//! - [`error`]: the typed error enum and its single mapping to `tonic::Status`.
//! - [`workload`]: the `Workload` trait and the reference `digest` workload.
//! - [`engine`]: the processor engine: units sequential or parallel on its
//!   [`UnitPool`](engine::UnitPool) (one thread per core), errors, panics,
//!   cancellation, tracing.
//! - [`processor`]: the `RecordProcessor` gRPC service over the engine:
//!   admission (slots, queue, "not started" refusals) and `Describe`.
//! - [`pipeline`]: the `Pipeline` service: fan-out ([`pipeline::run`]),
//!   slots and instance choice ([`pipeline::balancer`]), retries
//!   ([`pipeline::retry`]), the report ([`pipeline::report`]), run
//!   admission and the memory budget ([`pipeline::admission`]), the
//!   pre-encoded processor call ([`pipeline::wire`]).
//! - [`budget`]: the memory budget requests take, from their first bytes,
//!   for what decoding them can cost (both servers).
//! - [`config`]: command-line flags and env vars of both servers.
//! - [`server`]: serving: health (the pipeline's follows its processors),
//!   reflection, listen, graceful shutdown.
//! - [`listener`]: accepting connections (back-off when out of descriptors),
//!   handshake and idle timeouts, open calls counted per connection.
//! - [`telemetry`]: tracing subscriber set-up for the binaries.
//! - [`auth`]: bearer tokens (checked at the edge, sent to processors) and
//!   the reflection switch.
//! - [`metrics`]: Prometheus metrics of both servers and their `/metrics`
//!   listener.
//! - [`otel`]: trace context across client, pipeline and processor
//!   (W3C `traceparent`), and the per-run bound on attempt spans.
//! - [`tls`]: TLS and mTLS on both hops: servers (certificates reloaded
//!   without a restart), the pipeline's processor connections, clients.

#![warn(missing_docs)]

pub mod auth;
pub mod budget;
pub mod config;
pub mod convert;
pub mod domain;
pub mod engine;
pub mod error;
pub mod listener;
pub mod metrics;
pub mod otel;
pub mod pipeline;
pub mod processor;
pub mod proto;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod workload;

pub use error::Error;

/// Compiles the README's Rust example as a doctest.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
