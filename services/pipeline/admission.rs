//! What a pipeline takes at once: at most `--max-concurrent-runs` runs, and
//! requests holding at most `--run-memory-budget` bytes, counted twice over:
//!
//! - while a `Run` request is being received, it takes [`DECODE_FACTOR`]
//!   bytes of the budget per byte of its message (the buffered message plus
//!   what decoding it into `Struct`s can take), all at once as soon as the
//!   gRPC frame header announces the length; a request that does not fit is
//!   refused at its first bytes, before it is decoded, and the bytes return
//!   once tonic has decoded it;
//! - an accepted run holds [`run_cost`] bytes (its records encoded once,
//!   plus bookkeeping per record) until it ends.
//!
//! So the pipeline's memory for requests stays under about the budget,
//! whatever mix of callers sends them. Both refusals are
//! `RESOURCE_EXHAUSTED` naming the flag.

use crate::error::Error;
use http_body::Frame;
use prost::bytes::Bytes;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;

/// Budget bytes a request takes per byte received while it is decoded: the
/// buffered message plus a bound on what prost makes of it. The worst case
/// is a long list of empty `Value`s: 2 bytes each on the wire, 32 in
/// memory, in a `Vec` that may have doubled past its length. Measured: a
/// 30 MB request of them took the pipeline to 852 MB (28x); typical
/// records (a few attributes each) are in the same range, because each
/// `Struct` is a `BTreeMap` node of several hundred bytes.
pub const DECODE_FACTOR: usize = 64;

/// Bytes an accepted run holds per record beyond its encoding (id, slot in
/// the report), and per result kept for the report (not with
/// `summary_only`).
const BYTES_PER_RECORD: usize = 192;
const BYTES_PER_KEPT_RESULT: usize = 640;

/// The budget an accepted run of `records` records whose request encodes
/// to `encoded_len` bytes holds until it ends.
pub fn run_cost(encoded_len: usize, records: usize, summary_only: bool) -> usize {
    let per_record = BYTES_PER_RECORD + if summary_only { 0 } else { BYTES_PER_KEPT_RESULT };
    encoded_len.saturating_add(records.saturating_mul(per_record))
}

/// The limits on runs in progress.
#[derive(Debug)]
pub struct Admission {
    runs: Arc<Semaphore>,
    max_runs: usize,
    memory: Arc<Semaphore>,
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
        let budget = budget.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        let max_runs = max_runs.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            runs: Arc::new(Semaphore::new(max_runs)),
            max_runs,
            memory: Arc::new(Semaphore::new(budget)),
            budget,
        }
    }

    /// A place for a run whose accepted form costs `bytes` ([`run_cost`]),
    /// or `RESOURCE_EXHAUSTED` naming the limit that is full.
    pub fn admit(&self, bytes: usize) -> Result<RunPermit, Error> {
        let run = self.runs.clone().try_acquire_owned().map_err(|_| Error::Exhausted {
            what: format!("the pipeline is already running {} runs", self.max_runs),
            limit: self.max_runs as u64,
            setting: "--max-concurrent-runs",
        })?;
        let memory = take(&self.memory, bytes).ok_or_else(|| Error::Exhausted {
            what: format!(
                "the run needs about {bytes} bytes and {} of the run memory budget are free",
                self.memory.available_permits()
            ),
            limit: self.budget as u64,
            setting: "--run-memory-budget",
        })?;
        Ok(RunPermit { _run: run, _memory: memory })
    }

    /// Runs in progress.
    pub fn active_runs(&self) -> usize {
        self.max_runs - self.runs.available_permits()
    }

    /// Bytes of the budget in use.
    pub fn memory_in_use(&self) -> usize {
        self.budget - self.memory.available_permits()
    }

    /// Wraps the `Pipeline` server so that requests being received take
    /// from the budget (see the [module docs](self)).
    /// A message announced as longer than `max_message` takes nothing: tonic
    /// refuses it (`INVALID_ARGUMENT` naming `--max-message-bytes`).
    pub fn budgeted<S>(&self, inner: S, max_message: usize) -> Budgeted<S> {
        Budgeted { inner, memory: self.memory.clone(), budget: self.budget, max_message }
    }
}

/// `n` bytes of `budget` now, if free (`Some(None)` for zero bytes).
fn take(budget: &Arc<Semaphore>, n: usize) -> Option<Option<OwnedSemaphorePermit>> {
    match u32::try_from(n) {
        Ok(0) => Some(None),
        Ok(n) => budget.clone().try_acquire_many_owned(n).ok().map(Some),
        Err(_) => None,
    }
}

/// The `Pipeline` server, its request bodies taking from the budget.
#[derive(Debug, Clone)]
pub struct Budgeted<S> {
    inner: S,
    memory: Arc<Semaphore>,
    budget: usize,
    max_message: usize,
}

impl<S: NamedService> NamedService for Budgeted<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<Body>> for Budgeted<S>
where
    S: tower::Service<http::Request<Body>, Error = Infallible>,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let (memory, budget, max) = (self.memory.clone(), self.budget, self.max_message);
        self.inner.call(req.map(|inner| Body::new(BudgetedBody::new(inner, memory, budget, max))))
    }
}

/// A request body that takes budget for its message as soon as the gRPC
/// frame header (5 bytes: flag, then the length) has arrived, all at once,
/// so that concurrent large requests are each admitted whole or refused at
/// their first bytes, rather than all taking part of the budget and all
/// failing halfway. Bytes beyond the announced length (there should be
/// none) take budget as they come. The budget returns when the body is
/// dropped, after decoding.
struct BudgetedBody {
    inner: Body,
    memory: Arc<Semaphore>,
    budget: usize,
    max_message: usize,
    held: Option<OwnedSemaphorePermit>,
    /// The gRPC frame header, as far as it has arrived.
    header: [u8; 5],
    /// Bytes received so far.
    seen: usize,
    /// Bytes the budget held covers.
    covered: usize,
}

impl BudgetedBody {
    fn new(inner: Body, memory: Arc<Semaphore>, budget: usize, max_message: usize) -> Self {
        Self { inner, memory, budget, max_message, held: None, header: [0; 5], seen: 0, covered: 0 }
    }

    /// Accounts for `data`; `Err` when the budget has no room for it.
    fn account(&mut self, data: &[u8]) -> Result<(), tonic::Status> {
        let before = self.seen;
        self.seen += data.len();
        if before < 5 {
            let n = (5 - before).min(data.len());
            self.header[before..before + n].copy_from_slice(&data[..n]);
            if self.seen >= 5 {
                let len =
                    u32::from_be_bytes([self.header[1], self.header[2], self.header[3], self.header[4]]);
                if len as usize > self.max_message {
                    // tonic refuses it at once, naming --max-message-bytes.
                    self.covered = usize::MAX;
                    return Ok(());
                }
                self.covered = 5 + len as usize;
                self.take(self.covered)?;
            }
        }
        if self.seen > self.covered.max(5) {
            let extra = self.seen - self.covered.max(5);
            self.covered = self.seen;
            self.take(extra)?;
        }
        Ok(())
    }

    fn take(&mut self, bytes: usize) -> Result<(), tonic::Status> {
        match take(&self.memory, bytes.saturating_mul(DECODE_FACTOR)) {
            Some(Some(permit)) => {
                match &mut self.held {
                    Some(held) => held.merge(permit),
                    None => self.held = Some(permit),
                }
                Ok(())
            }
            Some(None) => Ok(()),
            None => Err(tonic::Status::from(Error::Exhausted {
                what: format!(
                    "a request of {bytes} bytes needs {} bytes of the run memory budget while it is decoded \
                     ({DECODE_FACTOR} per byte) and {} are free",
                    bytes.saturating_mul(DECODE_FACTOR),
                    self.memory.available_permits()
                ),
                limit: self.budget as u64,
                setting: "--run-memory-budget",
            })),
        }
    }
}

impl http_body::Body for BudgetedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
            && let Err(refused) = this.account(data)
        {
            return Poll::Ready(Some(Err(refused)));
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_takes_its_whole_message_at_the_header() {
        let memory = Arc::new(Semaphore::new(64 * 100));
        let mut body = BudgetedBody::new(Body::empty(), memory.clone(), 6400, 1000);
        // Header in two pieces announcing 45 bytes: 50 in all, x64.
        body.account(&[0, 0, 0]).unwrap();
        assert_eq!(memory.available_permits(), 6400);
        body.account(&[0, 45, 1, 2]).unwrap();
        assert_eq!(memory.available_permits(), 6400 - 50 * 64);
        body.account(&[0; 43]).unwrap();
        assert_eq!(memory.available_permits(), 6400 - 50 * 64, "the rest was covered");
        // A second request announcing more than is left is refused at once.
        let mut other = BudgetedBody::new(Body::empty(), memory.clone(), 6400, 1000);
        let err = other.account(&[0, 0, 0, 0, 60]).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.message().contains("--run-memory-budget"), "{}", err.message());
        // Over the message limit: left to tonic's INVALID_ARGUMENT.
        let mut huge = BudgetedBody::new(Body::empty(), memory.clone(), 6400, 1000);
        huge.account(&[0, 0, 1, 0, 0]).unwrap();
        drop((body, other, huge));
        assert_eq!(memory.available_permits(), 6400, "all given back");
    }

    #[test]
    fn runs_and_bytes_are_bounded() {
        let a = Admission::new(2, 1000);
        let one = a.admit(600).unwrap();
        let err = a.admit(600).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.to_string().contains("--run-memory-budget"), "{err}");
        let two = a.admit(100).unwrap();
        let err = a.admit(0).unwrap_err();
        assert!(err.to_string().contains("--max-concurrent-runs"), "{err}");
        assert_eq!((a.active_runs(), a.memory_in_use()), (2, 700));
        drop((one, two));
        assert_eq!((a.active_runs(), a.memory_in_use()), (0, 0));
        assert!(a.admit(usize::MAX).is_err(), "never more than the budget");
    }
}
