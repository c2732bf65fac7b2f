//! The `Pipeline` gRPC service: validates a run, then hands it to
//! [`run::execute`] and streams its events back.
//!
//! - [`run`]: fan-out and fan-in of one run (records sent, retried, gathered).
//! - [`balancer`]: which processor instance gets the next attempt.
//! - [`retry`]: which failures are retried, and the backoff between attempts.
//! - [`report`]: exactly-once bookkeeping and the final report.
//! - [`wire`]: the processor call's request, its record and params encoded
//!   once.
//!
//! Admission: a run is refused up front, with `RESOURCE_EXHAUSTED` naming
//! the flag, when `--max-concurrent-runs` runs are in progress or its
//! request would not fit in what is left of `--run-memory-budget`.

pub mod balancer;
pub mod report;
pub mod retry;
pub mod run;
pub mod wire;

use crate::config::{PipelineConfig, RunLimits};
use crate::convert;
use crate::domain::RunEvent;
use crate::error::Error;
use crate::proto;
use balancer::Balancer;
use prost::Message;
use retry::Backoff;
use run::RunControl;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::{Request, Response, Status};

/// Events buffered between a run and its client's stream.
const EVENT_BUFFER: usize = 32;

/// Memory a run's accepted request costs per record beyond its encoded
/// size (ids, bookkeeping), and per result kept for the report.
const BYTES_PER_RECORD: usize = 192;
const BYTES_PER_KEPT_RESULT: usize = 640;

/// The `Pipeline` service.
#[derive(Debug, Clone)]
pub struct PipelineService {
    balancer: Arc<Balancer>,
    limits: RunLimits,
    backoff: Backoff,
    cancel_runs: CancellationToken,
    admission: Arc<Admission>,
    stalled_client_timeout: Duration,
}

/// What bounds the runs a pipeline takes at once: their number, and the
/// memory their requests hold.
#[derive(Debug)]
pub struct Admission {
    runs: Arc<Semaphore>,
    max_runs: usize,
    /// Bytes of the run memory budget (`--run-memory-budget`).
    pub memory: Arc<Semaphore>,
    budget: usize,
}

/// What an accepted run holds until it ends.
#[derive(Debug)]
pub struct RunPermit {
    _run: OwnedSemaphorePermit,
    _memory: Option<OwnedSemaphorePermit>,
}

impl Admission {
    /// Room for `max_runs` runs and `budget` bytes of their requests.
    pub fn new(max_runs: usize, budget: usize) -> Self {
        let budget = budget.clamp(1, Semaphore::MAX_PERMITS);
        Self { runs: Arc::new(Semaphore::new(max_runs)), max_runs, memory: Arc::new(Semaphore::new(budget)), budget }
    }

    /// A place for a run whose accepted form costs about `bytes`, or
    /// `RESOURCE_EXHAUSTED` naming the limit that is full.
    pub fn admit(&self, bytes: usize) -> Result<RunPermit, Error> {
        let run = self.runs.clone().try_acquire_owned().map_err(|_| Error::Exhausted {
            what: format!("the pipeline is running {} runs", self.max_runs),
            limit: self.max_runs as u64,
            setting: "--max-concurrent-runs",
        })?;
        let memory = match u32::try_from(bytes) {
            Ok(0) => None,
            Ok(n) if (n as usize) <= self.budget => self.memory.clone().try_acquire_many_owned(n).ok(),
            _ => None,
        };
        if bytes > 0 && memory.is_none() {
            return Err(Error::Exhausted {
                what: format!(
                    "a run needing about {bytes} bytes does not fit in what is left of the run memory budget \
                     ({} of {} bytes free)",
                    self.memory.available_permits(),
                    self.budget
                ),
                limit: self.budget as u64,
                setting: "--run-memory-budget",
            });
        }
        Ok(RunPermit { _run: run, _memory: memory })
    }

    /// Runs in progress.
    pub fn active_runs(&self) -> usize {
        self.max_runs - self.runs.available_permits()
    }
}

impl PipelineService {
    /// A pipeline over `cfg.processors`. Cancelling `cancel_runs` cancels
    /// every run (each then reports `CANCELLED`) and stops health probes; the
    /// server does so once its drain timeout has passed.
    pub fn new(cfg: &PipelineConfig, cancel_runs: CancellationToken) -> Result<Self, Error> {
        let balancer = Arc::new(Balancer::new(&cfg.processors, cfg.connect_timeout, cfg.health_interval)?);
        balancer.spawn_health_checks(cfg.health_interval, cancel_runs.clone());
        Ok(Self {
            balancer,
            limits: cfg.limits.clone(),
            backoff: Backoff { base: cfg.backoff_base, max: cfg.backoff_max },
            cancel_runs,
            admission: Arc::new(Admission::new(cfg.max_concurrent_runs, cfg.run_memory_budget)),
            stalled_client_timeout: cfg.stalled_client_timeout,
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
        self.events.poll_recv(cx).map(|e| e.map(|e| Ok(convert::event_to_proto(e))))
    }
}

#[tonic::async_trait]
impl proto::pipeline_server::Pipeline for PipelineService {
    type RunStream = RunStream;

    async fn run(&self, request: Request<proto::RunRequest>) -> Result<Response<RunStream>, Status> {
        let request = request.into_inner();
        let summary_only = request.options.as_ref().is_some_and(|o| o.summary_only);
        let per_record = BYTES_PER_RECORD + if summary_only { 0 } else { BYTES_PER_KEPT_RESULT };
        let cost = request.encoded_len().saturating_add(request.records.len().saturating_mul(per_record));
        let spec = convert::run_spec_from_proto(request, &self.limits)?;
        let permit = self.admission.admit(cost)?;
        self.balancer.ensure_ready().await?;
        let client_gone = CancellationToken::new();
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let control = RunControl {
            client_gone: client_gone.clone(),
            shutdown: self.cancel_runs.clone(),
            stalled_client_timeout: self.stalled_client_timeout,
        };
        let queue = self.balancer.run_queue();
        let processors = self.balancer.endpoints().len();
        let backoff = self.backoff;
        tokio::spawn(async move {
            run::execute(spec, queue, processors, backoff, tx, control).await;
            drop(permit);
        });
        Ok(Response::new(RunStream { events: rx, _cancel_on_drop: client_gone.drop_guard() }))
    }
}
