//! The `Pipeline` gRPC service: validates a run, then hands it to
//! [`run::execute`] and streams its events back.
//!
//! - [`run`]: fan-out and fan-in of one run (records sent, retried, gathered).
//! - [`balancer`]: which processor instance gets the next attempt.
//! - [`retry`]: which failures are retried, and the backoff between attempts.
//! - [`report`]: exactly-once bookkeeping and the final report.

pub mod balancer;
pub mod report;
pub mod retry;
pub mod run;

use crate::config::{PipelineConfig, RunLimits};
use crate::convert;
use crate::domain::RunEvent;
use crate::error::Error;
use crate::proto;
use balancer::Balancer;
use retry::Backoff;
use run::RunControl;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::{Request, Response, Status};

/// The `Pipeline` service.
#[derive(Debug, Clone)]
pub struct PipelineService {
    balancer: Arc<Balancer>,
    limits: RunLimits,
    backoff: Backoff,
    cancel_runs: CancellationToken,
}

impl PipelineService {
    /// A pipeline over `cfg.processors`. Cancelling `cancel_runs` cancels
    /// every run (each then reports `CANCELLED`) and stops health probes; the
    /// server does so once its drain timeout has passed.
    pub fn new(cfg: &PipelineConfig, cancel_runs: CancellationToken) -> Result<Self, Error> {
        let balancer = Arc::new(Balancer::new(&cfg.processors, cfg.connect_timeout)?);
        balancer.spawn_health_checks(cfg.health_interval, cancel_runs.clone());
        Ok(Self {
            balancer,
            limits: cfg.limits.clone(),
            backoff: Backoff { base: cfg.backoff_base, max: cfg.backoff_max },
            cancel_runs,
        })
    }

    /// The instances this pipeline spreads records over.
    pub fn balancer(&self) -> &Arc<Balancer> {
        &self.balancer
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
        let spec = convert::run_spec_from_proto(request.into_inner(), &self.limits)?;
        self.balancer.ensure_ready().await?;
        let client_gone = CancellationToken::new();
        let (tx, rx) = mpsc::channel(1024);
        let control = RunControl { client_gone: client_gone.clone(), shutdown: self.cancel_runs.clone() };
        tokio::spawn(run::execute(spec, self.balancer.clone(), self.backoff, tx, control));
        Ok(Response::new(RunStream { events: rx, _cancel_on_drop: client_gone.drop_guard() }))
    }
}
