//! The `Pipeline` gRPC service: validates a run, then hands it to
//! [`run::execute`] and streams its events back.
//!
//! - [`run`]: fan-out and fan-in of one run (records sent, retried, gathered).
//! - [`balancer`]: which processor instance gets the next attempt, and the
//!   live set of instances.
//! - [`discovery`]: where instances come from: `--processors`, names looked
//!   up again and again.
//! - [`retry`]: which failures are retried, and the backoff between attempts.
//! - [`input`]: where a run's records come from: a `Run` request, or a
//!   `RunStream` read as fast as records are dispatched.
//! - [`report`]: the run's totals and the final report.
//! - [`admission`]: how many runs, and how many bytes of requests, the
//!   pipeline takes at once.
//! - [`attempt_log`]: each record's attempts, when a run asks for them.
//! - [`wire`]: the processor call's request, its record and params encoded
//!   once.
//!
//! A run is refused up front, with `RESOURCE_EXHAUSTED` naming the flag,
//! when `--max-concurrent-runs` runs are in progress or its request would
//! not fit in what is left of `--run-memory-budget` ([`admission`]).

pub mod admission;
pub mod attempt_log;
pub mod balancer;
pub mod discovery;
pub mod input;
pub mod report;
pub mod retry;
pub mod run;
pub mod wire;

use crate::config::{PipelineConfig, RunLimits};
use crate::convert;
use crate::domain::RunEvent;
use crate::error::Error;
use crate::proto;
use admission::Admission;
use balancer::Balancer;
use prost::Message;
use retry::Backoff;
use run::RunControl;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::{Request, Response, Status};

/// Events buffered between a run and its client's stream.
const EVENT_BUFFER: usize = 32;

/// The `Pipeline` service.
#[derive(Debug, Clone)]
pub struct PipelineService {
    balancer: Arc<Balancer>,
    limits: RunLimits,
    backoff: Backoff,
    cancel_runs: CancellationToken,
    admission: Arc<Admission>,
    stalled_client_timeout: Duration,
    progress_interval: Duration,
    trace_attempts_per_run: u64,
}

impl PipelineService {
    /// A pipeline over `cfg.processors`. Cancelling `cancel_runs` cancels
    /// every run (each then reports `CANCELLED`) and stops health probes; the
    /// server does so once its drain timeout has passed.
    pub fn new(cfg: &PipelineConfig, cancel_runs: CancellationToken) -> Result<Self, Error> {
        Self::with_resolver(cfg, cancel_runs, Arc::new(discovery::SystemResolver))
    }

    /// [`PipelineService::new`] looking names up through `resolver` (tests
    /// drive membership with one).
    pub fn with_resolver(
        cfg: &PipelineConfig,
        cancel_runs: CancellationToken,
        resolver: Arc<dyn discovery::Resolve>,
    ) -> Result<Self, Error> {
        let opts = balancer::ConnectOptions {
            connect_timeout: cfg.connect_timeout,
            health_interval: cfg.health_interval,
            http2_keepalive: cfg.http2_keepalive_interval,
            bearer: cfg
                .processor_token
                .processor_token_file
                .as_deref()
                .map(crate::auth::TokenFile::open)
                .transpose()?,
            tls: cfg.processor_tls.load(&cfg.processors, cfg.connect_timeout, cfg.tls.tls_reload_interval)?,
        };
        if let Some(tls) = &opts.tls {
            tls.spawn_watcher(cancel_runs.clone());
        }
        let balancer = Arc::new(Balancer::with_resolver(&cfg.processors, opts, resolver)?);
        balancer.spawn_resolver(cfg.resolve_interval, cancel_runs.clone());
        balancer.spawn_health_checks(cfg.health_interval, cancel_runs.clone());
        Ok(Self {
            balancer,
            limits: cfg.limits.clone(),
            backoff: Backoff { base: cfg.backoff_base, max: cfg.backoff_max },
            cancel_runs,
            admission: Arc::new(Admission::new(cfg.max_concurrent_runs, cfg.run_memory_budget)),
            stalled_client_timeout: cfg.stalled_client_timeout,
            progress_interval: cfg.progress_interval,
            trace_attempts_per_run: cfg.trace.trace_attempts_per_run,
        })
    }

    /// The instances this pipeline spreads records over.
    pub fn balancer(&self) -> &Arc<Balancer> {
        &self.balancer
    }

    /// The run admission limits.
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }
}

/// Events of one run on their way to the client. Dropping it (the client
/// cancelled or disconnected) cancels the run and its processor calls.
pub struct RunStream {
    events: mpsc::Receiver<RunEvent>,
    _cancel_on_drop: DropGuard,
}

impl futures::Stream for RunStream {
    type Item = Result<proto::RunEvent, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.poll_recv(cx).map(|e| e.map(convert::event_to_proto))
    }
}

#[tonic::async_trait]
impl proto::pipeline_server::Pipeline for PipelineService {
    type RunStream = RunStream;
    type RunStreamStream = RunStream;

    async fn run_stream(
        &self,
        request: Request<tonic::Streaming<proto::RunInput>>,
    ) -> Result<Response<RunStream>, Status> {
        let parent = crate::otel::Parent::from_metadata(request.metadata());
        let mut input = request.into_inner();
        let first =
            tokio::time::timeout(self.stalled_client_timeout, input.message()).await.map_err(|_| {
                Status::deadline_exceeded(format!(
                    "no header within {:?} (set by --stalled-client-timeout)",
                    self.stalled_client_timeout
                ))
            })??;
        let header = match first.and_then(|m| m.input) {
            Some(proto::run_input::Input::Header(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of RunStream must be a `header` (then `records` batches, then `done`)",
                ));
            }
        };
        let spec = convert::run_spec_from_header(header, &self.limits)?;
        // A streamed run holds about a prefetch of records and its id index;
        // the index takes from the budget itself as it grows.
        let cost = admission::run_cost(0, spec.options.max_in_flight.max(spec.options.max_batch_size), true);
        let permit = self.admission.admit(cost)?;
        self.balancer.ensure_ready().await?;
        let source =
            input::Source::Stream(input::StreamInput::new(Box::pin(input), self.admission.memory().clone()));
        Ok(self.start(spec, source, permit, parent))
    }

    async fn run(&self, request: Request<proto::RunRequest>) -> Result<Response<RunStream>, Status> {
        // The request's share of the memory budget (taken while it was
        // decoded) is held until it is converted to its compact form below.
        let parent = crate::otel::Parent::from_metadata(request.metadata());
        let (_, decoding_budget, request) = request.into_parts();
        let summary_only = request.options.as_ref().is_some_and(|o| o.summary_only);
        let cost = admission::run_cost(request.encoded_len(), request.records.len(), summary_only);
        let (spec, records) = convert::run_spec_from_proto(request, &self.limits)?;
        drop(decoding_budget);
        let permit = self.admission.admit(cost)?;
        self.balancer.ensure_ready().await?;
        Ok(self.start(spec, input::Source::whole(records), permit, parent))
    }
}

impl PipelineService {
    /// Starts an accepted run: its task, and the stream of its events.
    fn start(
        &self,
        spec: crate::domain::RunSpec,
        source: input::Source,
        permit: admission::RunPermit,
        parent: crate::otel::Parent,
    ) -> Response<RunStream> {
        let client_gone = CancellationToken::new();
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let control = RunControl {
            client_gone: client_gone.clone(),
            shutdown: self.cancel_runs.clone(),
            stalled_client_timeout: self.stalled_client_timeout,
            progress_interval: self.progress_interval,
            tracing: crate::otel::RunTracing { parent, attempts_per_run: self.trace_attempts_per_run },
        };
        let queue = self.balancer.run_queue();
        let processors = self.balancer.endpoints().len();
        let backoff = self.backoff;
        tokio::spawn(async move {
            run::execute(spec, source, queue, processors, backoff, tx, control).await;
            drop(permit);
        });
        Response::new(RunStream { events: rx, _cancel_on_drop: client_gone.drop_guard() })
    }
}
