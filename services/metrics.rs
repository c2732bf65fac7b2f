//! Prometheus metrics of both servers, served as text on an optional
//! `--metrics-listen` address at `/metrics`.
//!
//! Each started server has its own [`Registry`] (no process-global
//! recorder: tests start several servers in one process). What is counted:
//!
//! - every gRPC call, by a tower layer in the server stack
//!   ([`GrpcMetricsLayer`]): `grpc_server_started_total`,
//!   `grpc_server_handled_total` and `grpc_server_handling_seconds`, named
//!   as go-grpc-prometheus names them. A call's code is read from its
//!   response headers (trailers-only answers) or from the trailers that end
//!   its body; a body dropped before its end (the client went away) counts
//!   as `CANCELLED`. Methods come from a fixed table, so an unknown path is
//!   one `unknown` series, never a new label value per path;
//! - on a pipeline, runs, records and attempts ([`RunMetrics`], kept by the
//!   balancer; [`EndpointMetrics`], kept by each processor instance, whose
//!   series go away with the instance);
//! - on a processor, units ([`UnitMetrics`], kept in the engine's stats).
//!
//! Counters on hot paths are plain handles held where they are counted (per
//! instance from its creation, per method in a table): no label lookup per
//! call. Gauges (runs in progress, in flight, up, threads busy, queue
//! depth) are read when scraped. Without `--metrics-listen` nothing is
//! counted: the run, record, attempt and unit counts are switched on by
//! building the registry that reads them ([`pipeline_registry`],
//! [`processor_registry`]); until then each is one relaxed load and a
//! return (a histogram's observation takes a lock that every unit thread
//! shares).
//!
//! The listener is HTTP/1.1 only, answers `GET /metrics` (405 for other
//! methods there, 404 elsewhere), takes at most [`MAX_CONNECTIONS`]
//! connections at once, closes a connection whose request headers take
//! longer than [`HEADER_READ_TIMEOUT`] or that stays longer than
//! [`CONNECTION_LIFETIME`], and stops with its server.

use crate::domain::RunStatus;
use crate::error::Error;
use clap::Args;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming as HyperBody;
use hyper::{Method, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http::{self, Request, Response};
use tracing::{debug, info, warn};

/// Metrics connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 16;
/// A connection whose request headers are not all in after this is closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection (kept alive between scrapes) is closed after this.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// The metrics flag of both servers.
#[derive(Args, Debug, Clone, Default, PartialEq)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics (text format) at `http://HOST:PORT/metrics`
    /// [default: off]. Port 0 picks a free one (logged at startup).
    #[arg(long, env = "FANOUT_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
}

impl MetricsArgs {
    /// Binds the metrics address, when one is set.
    pub async fn bind(&self) -> Result<Option<TcpListener>, Error> {
        match &self.metrics_listen {
            None => Ok(None),
            Some(listen) => TcpListener::bind(listen)
                .await
                .map(Some)
                .map_err(|e| Error::Transport(format!("cannot listen on {listen} (--metrics-listen): {e}"))),
        }
    }
}

// ------------------------------------------------------------ buckets

/// Seconds, for things that take from tens of microseconds to minutes
/// (records, attempts, gRPC calls).
const SECONDS_BUCKETS: [f64; 23] = [
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Seconds, for units: from a few microseconds up.
const UNIT_BUCKETS: [f64; 22] = [
    0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0,
];

fn seconds_histogram() -> Histogram {
    Histogram::new(SECONDS_BUCKETS)
}

// ------------------------------------------------------------ gRPC codes

/// gRPC status names by code, as go-grpc-prometheus labels them.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];
const CANCELLED: usize = 1;
const UNKNOWN: usize = 2;

/// A code's index in [`CODE_NAMES`] (`UNKNOWN` for anything out of range).
fn code_index(code: tonic::Code) -> usize {
    usize::try_from(code as i32).ok().filter(|&i| i < CODE_NAMES.len()).unwrap_or(UNKNOWN)
}

/// The code in a `grpc-status` header or trailer, if there is one.
fn status_in(headers: &http::HeaderMap) -> Option<usize> {
    let value = headers.get("grpc-status")?;
    Some(value.to_str().ok().and_then(|s| s.parse::<usize>().ok()).filter(|&i| i < 17).unwrap_or(UNKNOWN))
}

/// One counter per code.
type ByCode = [Counter; 17];

fn encode_by_code<'a>(
    encoder: &mut prometheus_client::encoding::MetricEncoder<'a>,
    by_code: &ByCode,
    labels: &[(&str, &str)],
    skip_zero: bool,
) -> Result<(), std::fmt::Error> {
    for (name, counter) in CODE_NAMES.iter().zip(by_code) {
        if skip_zero && counter.get() == 0 {
            continue;
        }
        let mut set: Vec<(&str, &str)> = labels.to_vec();
        set.push(("grpc_code", name));
        counter.encode(encoder.encode_family(&set)?)?;
    }
    Ok(())
}

// ------------------------------------------------------------ gRPC server

/// A method this crate serves: full path, then its labels.
struct MethodInfo {
    path: &'static str,
    service: &'static str,
    method: &'static str,
    kind: &'static str,
}

const fn method(
    path: &'static str,
    service: &'static str,
    method: &'static str,
    kind: &'static str,
) -> MethodInfo {
    MethodInfo { path, service, method, kind }
}

/// Every method either server answers, and the `unknown` bucket last.
const METHODS: &[MethodInfo] = &[
    method("/fanout.v1.Pipeline/Run", "fanout.v1.Pipeline", "Run", "server_stream"),
    method("/fanout.v1.Pipeline/RunStream", "fanout.v1.Pipeline", "RunStream", "bidi_stream"),
    method("/fanout.v1.RecordProcessor/ProcessRecord", "fanout.v1.RecordProcessor", "ProcessRecord", "unary"),
    method("/fanout.v1.RecordProcessor/ProcessBatch", "fanout.v1.RecordProcessor", "ProcessBatch", "unary"),
    method("/fanout.v1.RecordProcessor/Describe", "fanout.v1.RecordProcessor", "Describe", "unary"),
    method("/grpc.health.v1.Health/Check", "grpc.health.v1.Health", "Check", "unary"),
    method("/grpc.health.v1.Health/Watch", "grpc.health.v1.Health", "Watch", "server_stream"),
    method(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "grpc.reflection.v1.ServerReflection",
        "ServerReflectionInfo",
        "bidi_stream",
    ),
    method(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "grpc.reflection.v1alpha.ServerReflection",
        "ServerReflectionInfo",
        "bidi_stream",
    ),
    method("", "unknown", "unknown", "unary"),
];

/// Counts of one method.
#[derive(Debug)]
struct MethodStats {
    started: Counter,
    handled: ByCode,
    seconds: Histogram,
}

/// The `grpc_server_*` families of one server.
#[derive(Debug)]
pub struct GrpcMetrics {
    /// Only the methods of this server's services (by index in [`METHODS`]).
    served: Vec<usize>,
    methods: Vec<MethodStats>,
}

impl GrpcMetrics {
    /// For a server of `service` (health and reflection included).
    pub fn new(service: &str) -> Self {
        let served = METHODS
            .iter()
            .enumerate()
            .filter(|(_, m)| m.service == service || !m.service.starts_with("fanout."))
            .map(|(i, _)| i)
            .collect();
        let methods = METHODS
            .iter()
            .map(|_| MethodStats {
                started: Counter::default(),
                handled: Default::default(),
                seconds: seconds_histogram(),
            })
            .collect();
        Self { served, methods }
    }

    fn index(&self, path: &str) -> usize {
        let unknown = METHODS.len() - 1;
        self.served.iter().copied().find(|&i| i != unknown && METHODS[i].path == path).unwrap_or(unknown)
    }

    fn handled(&self, method: usize, code: usize, started: Instant) {
        let m = &self.methods[method];
        m.handled[code].inc();
        m.seconds.observe(started.elapsed().as_secs_f64());
    }
}

impl Collector for GrpcMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let labels = |i: usize| {
            let m = &METHODS[i];
            [("grpc_type", m.kind), ("grpc_service", m.service), ("grpc_method", m.method)]
        };
        {
            let mut e = encoder.encode_descriptor(
                "grpc_server_started",
                "Total number of RPCs started on the server.",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for &i in &self.served {
                self.methods[i].started.encode(e.encode_family(&labels(i))?)?;
            }
        }
        {
            let mut e = encoder.encode_descriptor(
                "grpc_server_handled",
                "Total number of RPCs completed on the server, regardless of success or failure.",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for &i in &self.served {
                encode_by_code(&mut e, &self.methods[i].handled, &labels(i), true)?;
            }
        }
        let mut e = encoder.encode_descriptor(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
            None,
            prometheus_client::metrics::MetricType::Histogram,
        )?;
        for &i in &self.served {
            self.methods[i].seconds.encode(e.encode_family(&labels(i))?)?;
        }
        Ok(())
    }
}

/// Counts every call into [`GrpcMetrics`] (nothing when built with `None`).
#[derive(Debug, Clone)]
pub struct GrpcMetricsLayer {
    metrics: Option<Arc<GrpcMetrics>>,
}

impl GrpcMetricsLayer {
    /// A layer counting into `metrics`, or passing calls through untouched.
    pub fn new(metrics: Option<Arc<GrpcMetrics>>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService { inner, metrics: self.metrics.clone() }
    }
}

/// The service of [`GrpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Option<Arc<GrpcMetrics>>,
}

/// What a call's end is counted into.
#[derive(Debug)]
struct CallEnd {
    metrics: Arc<GrpcMetrics>,
    method: usize,
    started: Instant,
}

impl CallEnd {
    fn finish(self, code: usize) {
        self.metrics.handled(self.method, code, self.started);
    }
}

impl<S, ReqBody, ResBody> tower::Service<Request<ReqBody>> for GrpcMetricsService<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Unpin,
    ResBody: Unpin,
{
    type Response = Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = MeteredFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let end = self.metrics.as_ref().map(|metrics| {
            let method = metrics.index(req.uri().path());
            metrics.methods[method].started.inc();
            CallEnd { metrics: metrics.clone(), method, started: Instant::now() }
        });
        MeteredFuture { inner: self.inner.call(req), end }
    }
}

/// The response future of [`GrpcMetricsService`].
#[derive(Debug)]
pub struct MeteredFuture<F> {
    inner: F,
    end: Option<CallEnd>,
}

impl<F, B, E> Future for MeteredFuture<F>
where
    F: Future<Output = Result<Response<B>, E>> + Unpin,
{
    type Output = Result<Response<MeteredBody<B>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = ready!(Pin::new(&mut self.inner).poll(cx));
        let mut end = self.end.take();
        match result {
            Err(e) => {
                if let Some(end) = end {
                    end.finish(UNKNOWN);
                }
                Poll::Ready(Err(e))
            }
            Ok(response) => {
                // Trailers-only: the status is in the headers, the body empty.
                if let Some(code) = status_in(response.headers())
                    && let Some(end) = end.take()
                {
                    end.finish(code);
                }
                Poll::Ready(Ok(response.map(|body| MeteredBody { body, end })))
            }
        }
    }
}

impl<F> Drop for MeteredFuture<F> {
    fn drop(&mut self) {
        // Dropped before answering: the client went away.
        if let Some(end) = self.end.take() {
            end.finish(CANCELLED);
        }
    }
}

/// A response body that counts its call as handled when its trailers pass
/// (or as `CANCELLED` when dropped before its end).
#[derive(Debug)]
pub struct MeteredBody<B> {
    body: B,
    end: Option<CallEnd>,
}

impl<B> Drop for MeteredBody<B> {
    fn drop(&mut self) {
        if let Some(end) = self.end.take() {
            end.finish(CANCELLED);
        }
    }
}

impl<B: Body + Unpin> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        if self.end.is_some() {
            let code = match &frame {
                Some(Ok(f)) => f.trailers_ref().map(|t| status_in(t).unwrap_or(UNKNOWN)),
                Some(Err(_)) => Some(UNKNOWN),
                // Ended with neither trailers nor a status in the headers.
                None => Some(UNKNOWN),
            };
            if let Some(code) = code
                && let Some(end) = self.end.take()
            {
                end.finish(code);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

// ------------------------------------------------------------ pipeline

/// The run and record counts of one pipeline (kept by its balancer).
#[derive(Debug)]
pub struct RunMetrics {
    /// Counting at all: set by [`pipeline_registry`].
    on: AtomicBool,
    succeeded: Counter,
    failed: Counter,
    record_seconds: Histogram,
    /// By [`RUN_STATUSES`].
    runs: [Counter; 6],
    /// Attempts that found no instance up (no processor to name).
    unplaced: ByCode,
}

/// The statuses a run ends with, as `fanout_runs_total` labels them: its
/// report's status, `ABORTED` (ended by bad input, no report) or
/// `CLIENT_GONE` (its client left before the end).
const RUN_STATUSES: [&str; 6] =
    ["SUCCEEDED", "PARTIALLY_FAILED", "FAILED", "CANCELLED", "ABORTED", "CLIENT_GONE"];
const ABORTED: usize = 4;
const CLIENT_GONE: usize = 5;

impl Default for RunMetrics {
    fn default() -> Self {
        Self {
            on: AtomicBool::new(false),
            succeeded: Counter::default(),
            failed: Counter::default(),
            record_seconds: seconds_histogram(),
            runs: Default::default(),
            unplaced: Default::default(),
        }
    }
}

impl RunMetrics {
    /// A record's final result: its status and, when it was `dispatched`,
    /// its time from first dispatch (a record a stopped run never sent has
    /// none: it is counted, not timed).
    pub fn record(&self, result: &crate::domain::RecordResult, dispatched: bool) {
        if !self.on.load(Ordering::Relaxed) {
            return;
        }
        match result.outcome {
            crate::domain::Outcome::Succeeded { .. } => self.succeeded.inc(),
            crate::domain::Outcome::Failed(_) => self.failed.inc(),
        };
        if dispatched {
            self.record_seconds.observe(result.elapsed.as_secs_f64());
        }
    }

    /// One attempt that ended with `code`: on `endpoint`, started at
    /// `started` (`None` when not timed), or, with no endpoint, placed
    /// nowhere (no instance was up).
    pub fn attempt(
        &self,
        endpoint: Option<&crate::pipeline::balancer::Endpoint>,
        code: tonic::Code,
        started: Option<Instant>,
    ) {
        if !self.on.load(Ordering::Relaxed) {
            return;
        }
        match endpoint {
            Some(ep) => ep.metrics.attempt(code, started.map(|t| t.elapsed())),
            None => {
                self.unplaced[code_index(code)].inc();
            }
        }
    }

    /// A run has begun: the returned tally counts it when it ends
    /// (`CLIENT_GONE` if dropped before [`RunTally::finish`]).
    pub fn run_started(self: &Arc<Self>) -> RunTally {
        RunTally { metrics: self.on.load(Ordering::Relaxed).then(|| self.clone()) }
    }
}

/// Counts one run's end into `fanout_runs_total` once.
#[derive(Debug)]
pub struct RunTally {
    metrics: Option<Arc<RunMetrics>>,
}

impl RunTally {
    /// The run ended with a report of `status` (`None`: ended by its input,
    /// with no report).
    pub fn finish(&mut self, status: Option<RunStatus>) {
        let i = match status {
            Some(RunStatus::Succeeded) => 0,
            Some(RunStatus::PartiallyFailed) => 1,
            Some(RunStatus::Failed) => 2,
            Some(RunStatus::Cancelled) => 3,
            None => ABORTED,
        };
        if let Some(m) = self.metrics.take() {
            m.runs[i].inc();
        }
    }
}

impl Drop for RunTally {
    fn drop(&mut self) {
        if let Some(m) = self.metrics.take() {
            m.runs[CLIENT_GONE].inc();
        }
    }
}

/// Attempt counts of one processor instance, held by it: its series go when
/// the pipeline forgets the instance.
#[derive(Debug)]
pub struct EndpointMetrics {
    attempts: ByCode,
    seconds: Histogram,
}

impl Default for EndpointMetrics {
    fn default() -> Self {
        Self { attempts: Default::default(), seconds: seconds_histogram() }
    }
}

impl EndpointMetrics {
    fn attempt(&self, code: tonic::Code, took: Option<Duration>) {
        self.attempts[code_index(code)].inc();
        if let Some(took) = took {
            self.seconds.observe(took.as_secs_f64());
        }
    }
}

/// The pipeline's `fanout_*` families, read from its balancer and admission
/// when scraped.
#[derive(Debug)]
struct PipelineCollector {
    balancer: Arc<crate::pipeline::balancer::Balancer>,
    admission: Arc<crate::pipeline::admission::Admission>,
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

fn as_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

use prometheus_client::metrics::MetricType as Kind;

impl Collector for PipelineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = self.balancer.run_metrics();
        {
            let mut e = encoder.encode_descriptor(
                "fanout_runs",
                "Runs ended, by final status.",
                None,
                Kind::Counter,
            )?;
            for (name, c) in RUN_STATUSES.iter().zip(&m.runs) {
                c.encode(e.encode_family(&[("status", *name)])?)?;
            }
        }
        gauge(&mut encoder, "fanout_runs_active", "Runs in progress.", as_i64(self.admission.active_runs()))?;
        {
            let mut e = encoder.encode_descriptor(
                "fanout_records",
                "Records finished, by final status.",
                None,
                Kind::Counter,
            )?;
            m.succeeded.encode(e.encode_family(&[("status", "succeeded")])?)?;
            m.failed.encode(e.encode_family(&[("status", "failed")])?)?;
        }
        m.record_seconds.encode(encoder.encode_descriptor(
            "fanout_record_duration_seconds",
            "Time of each record from its first dispatch to its final result.",
            None,
            Kind::Histogram,
        )?)?;
        // One series set per instance label: an instance that left is no
        // longer listed (its series end; a successor at the same address
        // starts from zero, which rate() reads as a counter reset). Two live
        // instances with one label (an address listed twice) would be a
        // duplicate series, which Prometheus rejects: the first one's are
        // shown, the other's are not (no merging).
        let mut instances: Vec<(String, Arc<crate::pipeline::balancer::Endpoint>)> =
            self.balancer.endpoints().into_iter().map(|ep| (ep.label(), ep)).collect();
        instances.sort_by(|a, b| a.0.cmp(&b.0));
        instances.dedup_by(|a, b| a.0 == b.0);
        {
            let mut e = encoder.encode_descriptor(
                "fanout_record_attempts",
                "Attempts (processor calls per record), by instance and gRPC code; processor=\"none\" when no instance was up.",
                None,
                Kind::Counter,
            )?;
            for (label, ep) in &instances {
                encode_by_code(&mut e, &ep.metrics.attempts, &[("processor", label)], true)?;
            }
            encode_by_code(&mut e, &m.unplaced, &[("processor", "none")], true)?;
        }
        {
            let mut e = encoder.encode_descriptor(
                "fanout_record_attempt_duration_seconds",
                "Time of each attempt on an instance, from its slot to its answer.",
                None,
                Kind::Histogram,
            )?;
            for (label, ep) in &instances {
                ep.metrics.seconds.encode(e.encode_family(&[("processor", label.as_str())])?)?;
            }
        }
        {
            let mut e = encoder.encode_descriptor(
                "fanout_processor_up",
                "Whether the instance's last probe or call found it up (1) or not (0).",
                None,
                Kind::Gauge,
            )?;
            for (label, ep) in &instances {
                ConstGauge::new(i64::from(ep.is_up()))
                    .encode(e.encode_family(&[("processor", label.as_str())])?)?;
            }
        }
        let mut e = encoder.encode_descriptor(
            "fanout_processor_in_flight",
            "Calls in flight to the instance.",
            None,
            Kind::Gauge,
        )?;
        for (label, ep) in &instances {
            ConstGauge::new(as_i64(ep.in_flight()))
                .encode(e.encode_family(&[("processor", label.as_str())])?)?;
        }
        Ok(())
    }
}

// ------------------------------------------------------------ processor

/// Unit counts of one engine (kept in its stats).
#[derive(Debug)]
pub struct UnitMetrics {
    /// Counting at all: set by [`processor_registry`].
    on: AtomicBool,
    succeeded: Counter,
    failed: Counter,
    seconds: Histogram,
}

impl Default for UnitMetrics {
    fn default() -> Self {
        Self {
            on: AtomicBool::new(false),
            succeeded: Counter::default(),
            failed: Counter::default(),
            seconds: Histogram::new(UNIT_BUCKETS),
        }
    }
}

impl UnitMetrics {
    /// One unit done (`ok`: without an error or panic), taking `took`.
    pub fn unit(&self, ok: bool, took: Duration) {
        if !self.on.load(Ordering::Relaxed) {
            return;
        }
        match ok {
            true => self.succeeded.inc(),
            false => self.failed.inc(),
        };
        self.seconds.observe(took.as_secs_f64());
    }
}

/// The processor's `fanout_unit*` families.
struct ProcessorCollector {
    stats: Arc<crate::engine::EngineStats>,
    threads: usize,
    queued: Box<dyn Fn() -> usize + Send + Sync>,
}

impl std::fmt::Debug for ProcessorCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessorCollector").field("threads", &self.threads).finish_non_exhaustive()
    }
}

impl Collector for ProcessorCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let u = &self.stats.units;
        {
            let mut e = encoder.encode_descriptor(
                "fanout_units",
                "Units processed, by outcome.",
                None,
                Kind::Counter,
            )?;
            u.succeeded.encode(e.encode_family(&[("status", "succeeded")])?)?;
            u.failed.encode(e.encode_family(&[("status", "failed")])?)?;
        }
        u.seconds.encode(encoder.encode_descriptor(
            "fanout_unit_duration_seconds",
            "Time of each unit's processing.",
            None,
            Kind::Histogram,
        )?)?;
        gauge(
            &mut encoder,
            "fanout_unit_threads",
            "Unit threads (units processed at once at most).",
            as_i64(self.threads),
        )?;
        let get = crate::engine::EngineStats::get;
        let busy = get(&self.stats.units_started).saturating_sub(get(&self.stats.units_finished));
        gauge(
            &mut encoder,
            "fanout_unit_threads_busy",
            "Units being processed now.",
            i64::try_from(busy).unwrap_or(i64::MAX),
        )?;
        gauge(
            &mut encoder,
            "fanout_unit_queue_depth",
            "Unit jobs waiting for a unit thread.",
            as_i64((self.queued)()),
        )
    }
}

// ------------------------------------------------------------ registries

/// A pipeline's registry: its calls, runs, records and instances. Switches
/// the balancer's run, record and attempt counts on.
pub fn pipeline_registry(
    grpc: Arc<GrpcMetrics>,
    balancer: Arc<crate::pipeline::balancer::Balancer>,
    admission: Arc<crate::pipeline::admission::Admission>,
) -> Registry {
    balancer.run_metrics().on.store(true, Ordering::Relaxed);
    let mut registry = Registry::default();
    registry.register_collector(Box::new(grpc));
    registry.register_collector(Box::new(PipelineCollector { balancer, admission }));
    registry
}

/// A processor's registry: its calls and units; `queued` reads the unit
/// jobs waiting for a thread. Switches the engine's unit counts on.
pub fn processor_registry(
    grpc: Arc<GrpcMetrics>,
    stats: Arc<crate::engine::EngineStats>,
    threads: usize,
    queued: Box<dyn Fn() -> usize + Send + Sync>,
) -> Registry {
    stats.units.on.store(true, Ordering::Relaxed);
    let mut registry = Registry::default();
    registry.register_collector(Box::new(grpc));
    registry.register_collector(Box::new(ProcessorCollector { stats, threads, queued }));
    registry
}

/// Renders `registry` in the Prometheus text format (version 0.0.4).
pub fn render(registry: &Registry) -> String {
    let mut text = String::with_capacity(16 * 1024);
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, registry);
    text
}

// ------------------------------------------------------------ listener

/// Serves `registry` at `/metrics` on `listener` until `stop` is cancelled.
/// Returns the address bound.
pub fn serve(
    listener: TcpListener,
    registry: Registry,
    stop: CancellationToken,
) -> Result<SocketAddr, Error> {
    let addr = listener.local_addr().map_err(|e| Error::Transport(format!("metrics address: {e}")))?;
    info!(%addr, "metrics at http://{addr}/metrics");
    let registry = Arc::new(registry);
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors and the like: wait a little
                        // rather than spin.
                        warn!(error = %e, "metrics listener: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                debug!(%peer, "metrics listener: too many connections; closed");
                continue;
            };
            let registry = registry.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let service = hyper::service::service_fn(move |req| {
                    let registry = registry.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(&req, &registry)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .max_buf_size(16 * 1024)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                tokio::select! {
                    _ = stop.cancelled() => {}
                    r = tokio::time::timeout(CONNECTION_LIFETIME, conn) => {
                        if let Ok(Err(e)) = r {
                            debug!(%peer, error = %e, "metrics connection ended");
                        }
                    }
                }
            });
        }
    });
    Ok(addr)
}

fn answer(req: &Request<HyperBody>, registry: &Registry) -> Response<String> {
    let reply = |status: StatusCode, text: &str| {
        let mut r = Response::new(text.to_owned());
        *r.status_mut() = status;
        r
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            let mut r = Response::new(render(registry));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(prometheus_client::encoding::prometheus_text::CONTENT_TYPE),
            );
            r
        }
        (_, "/metrics") => {
            let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
            r.headers_mut().insert(http::header::ALLOW, http::HeaderValue::from_static("GET"));
            r
        }
        _ => reply(StatusCode::NOT_FOUND, "not found: metrics are at /metrics\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_known_per_server_and_the_rest_is_one_bucket() {
        let p = GrpcMetrics::new(crate::server::PIPELINE_SERVICE);
        assert_eq!(METHODS[p.index("/fanout.v1.Pipeline/Run")].method, "Run");
        assert_eq!(METHODS[p.index("/grpc.health.v1.Health/Watch")].kind, "server_stream");
        // Another server's method, and made-up paths, are "unknown".
        assert_eq!(METHODS[p.index("/fanout.v1.RecordProcessor/ProcessRecord")].method, "unknown");
        assert_eq!(METHODS[p.index("/x.Y/Z")].service, "unknown");
        assert_eq!(p.index("/a/b"), p.index("/c/d"));
    }

    #[test]
    fn codes_are_named_and_bounded() {
        assert_eq!(CODE_NAMES[code_index(tonic::Code::InvalidArgument)], "INVALID_ARGUMENT");
        assert_eq!(CODE_NAMES[code_index(tonic::Code::Unauthenticated)], "UNAUTHENTICATED");
        let mut h = http::HeaderMap::new();
        assert_eq!(status_in(&h), None);
        h.insert("grpc-status", http::HeaderValue::from_static("14"));
        assert_eq!(status_in(&h), Some(14));
        h.insert("grpc-status", http::HeaderValue::from_static("99"));
        assert_eq!(status_in(&h), Some(UNKNOWN));
    }

    #[test]
    fn nothing_is_counted_until_a_registry_reads_it() {
        let units = UnitMetrics::default();
        units.unit(true, Duration::from_millis(1));
        assert_eq!(units.succeeded.get(), 0, "counted while off");
        units.on.store(true, Ordering::Relaxed);
        units.unit(false, Duration::from_millis(1));
        assert_eq!(units.failed.get(), 1);
        let runs = Arc::new(RunMetrics::default());
        drop(runs.run_started());
        runs.attempt(None, tonic::Code::Unavailable, Some(Instant::now()));
        assert_eq!(
            runs.runs[CLIENT_GONE].get() + runs.unplaced[code_index(tonic::Code::Unavailable)].get(),
            0
        );
        runs.on.store(true, Ordering::Relaxed);
        drop(runs.run_started());
        runs.attempt(None, tonic::Code::Unavailable, None);
        assert_eq!(
            runs.runs[CLIENT_GONE].get() + runs.unplaced[code_index(tonic::Code::Unavailable)].get(),
            2
        );
    }

    #[tokio::test]
    async fn no_address_means_no_listener() {
        assert!(MetricsArgs::default().bind().await.expect("nothing to bind").is_none());
    }
}
