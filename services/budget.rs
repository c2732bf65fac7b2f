//! A memory budget for requests being received and decoded.
//!
//! prost turns a message into Rust values several times its size on the
//! wire (up to [`DECODE_FACTOR`] times), before any handler can look at it.
//! A [`Budgeted`] server makes each request take that many bytes of a
//! [`MemoryBudget`] per byte of its message, all at once as soon as the gRPC
//! frame header announces the length, and refuses a request that does not
//! fit with `RESOURCE_EXHAUSTED` naming the flag (and marked
//! `fanout-not-started`), before it is decoded. The bytes stay taken until
//! the handler lets go of the request's [`HeldBudget`]: the pipeline drops it
//! once it has converted a run to its compact form; a processor keeps it
//! while it works on the record.

use crate::error::Error;
use http_body::Frame;
use prost::bytes::Bytes;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;

/// Budget bytes a request takes per byte of its message while it is
/// decoded: the buffered message plus a bound on what prost makes of it.
/// The worst case is a long list of empty `Value`s: 2 bytes each on the
/// wire, 32 in memory, in a `Vec` that may have doubled past its length.
/// Measured: a 30 MB request of them took the pipeline to 852 MB (28x);
/// typical records (a few attributes each) are in the same range, because
/// each `Struct` is a `BTreeMap` node of several hundred bytes.
pub const DECODE_FACTOR: usize = 64;

/// Bytes shared by every request of a server.
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    memory: Arc<Semaphore>,
    total: usize,
    setting: &'static str,
}

impl MemoryBudget {
    /// `total` bytes, set by the flag `setting` (named in refusals).
    pub fn new(total: usize, setting: &'static str) -> Self {
        let total = total.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        Self { memory: Arc::new(Semaphore::new(total)), total, setting }
    }

    /// The budget's size.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes free now.
    pub fn available(&self) -> usize {
        self.memory.available_permits()
    }

    /// `bytes` now, `Some(None)` for zero, `None` when they are not free.
    pub fn try_take(&self, bytes: usize) -> Option<Option<OwnedSemaphorePermit>> {
        take(&self.memory, bytes)
    }

    /// Wraps a gRPC server so that its requests take from this budget. A
    /// message announced as longer than `max_message` takes nothing: tonic
    /// refuses it (`INVALID_ARGUMENT` naming `--max-message-bytes`).
    pub fn wrap<S>(&self, inner: S, max_message: usize) -> Budgeted<S> {
        Budgeted {
            inner,
            memory: self.memory.clone(),
            budget: self.total,
            max_message,
            setting: self.setting,
        }
    }
}

/// The budget a request's message took, for its handler to keep while it
/// needs the decoded request (found in the request's extensions).
#[derive(Debug, Clone, Default)]
pub struct HeldBudget(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

impl HeldBudget {
    /// Takes what the request holds, to keep it past the request's life.
    pub fn take(&self) -> Option<OwnedSemaphorePermit> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// `n` bytes of `budget` now, if free (`Some(None)` for zero bytes).
pub(crate) fn take(budget: &Arc<Semaphore>, n: usize) -> Option<Option<OwnedSemaphorePermit>> {
    match u32::try_from(n) {
        Ok(0) => Some(None),
        Ok(n) => budget.clone().try_acquire_many_owned(n).ok().map(Some),
        Err(_) => None,
    }
}

/// A gRPC server whose request bodies take from a [`MemoryBudget`].
#[derive(Debug, Clone)]
pub struct Budgeted<S> {
    inner: S,
    memory: Arc<Semaphore>,
    budget: usize,
    max_message: usize,
    setting: &'static str,
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
        let held = HeldBudget::default();
        let mut body = BudgetedBody::new(Body::empty(), self.memory.clone(), self.budget, self.max_message);
        body.setting = self.setting;
        body.deposit = Some(held.clone());
        let (mut parts, inner) = req.into_parts();
        parts.extensions.insert(held);
        body.inner = inner;
        self.inner.call(http::Request::from_parts(parts, Body::new(body)))
    }
}

/// A request body that takes budget for each message as soon as its gRPC
/// frame header (5 bytes: flag, then the length) has arrived, all at once,
/// so that concurrent large requests are each admitted whole or refused at
/// their first bytes, rather than all taking part of the budget and all
/// failing halfway. In a streamed request, a message's bytes are given back
/// when the next message's header arrives. That is an approximation: tonic
/// reads on when the handler asks for the next message, but a chunk that
/// holds the end of one message and the start of the next releases the
/// first a little before it is decoded; for large messages, which span many
/// chunks, it is exact. When tonic drops the body after decoding, what it
/// holds moves to the request's [`HeldBudget`].
struct BudgetedBody {
    inner: Body,
    memory: Arc<Semaphore>,
    budget: usize,
    max_message: usize,
    setting: &'static str,
    deposit: Option<HeldBudget>,
    held: Option<OwnedSemaphorePermit>,
    /// Where in the framing the next byte falls.
    state: Framing,
    /// The current frame header, as far as it has arrived.
    header: [u8; 5],
}

/// Where a request body is in its gRPC framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes of a frame header have arrived.
    Header(usize),
    /// This many bytes of the current message are still to come.
    Payload(usize),
    /// A message over the limit was announced: tonic refuses the request.
    Refused,
}

impl BudgetedBody {
    fn new(inner: Body, memory: Arc<Semaphore>, budget: usize, max_message: usize) -> Self {
        Self {
            inner,
            memory,
            budget,
            max_message,
            setting: "--run-memory-budget",
            deposit: None,
            held: None,
            state: Framing::Header(0),
            header: [0; 5],
        }
    }

    /// Accounts for `data`; `Err` when the budget has no room for a message
    /// it announces.
    fn account(&mut self, mut data: &[u8]) -> Result<(), tonic::Status> {
        while !data.is_empty() {
            match self.state {
                Framing::Refused => return Ok(()),
                Framing::Payload(left) => {
                    let n = left.min(data.len());
                    data = &data[n..];
                    self.state = if n == left { Framing::Header(0) } else { Framing::Payload(left - n) };
                }
                Framing::Header(got) => {
                    let n = (5 - got).min(data.len());
                    self.header[got..got + n].copy_from_slice(&data[..n]);
                    data = &data[n..];
                    if got + n < 5 {
                        self.state = Framing::Header(got + n);
                        continue;
                    }
                    let len =
                        u32::from_be_bytes([self.header[1], self.header[2], self.header[3], self.header[4]])
                            as usize;
                    if len > self.max_message {
                        // tonic refuses it at once, naming --max-message-bytes.
                        self.state = Framing::Refused;
                        return Ok(());
                    }
                    // The message before this one has been taken by the
                    // handler: its bytes go back before this one's are taken.
                    self.held = None;
                    self.take(5 + len)?;
                    self.state = if len == 0 { Framing::Header(0) } else { Framing::Payload(len) };
                }
            }
        }
        Ok(())
    }

    fn take(&mut self, bytes: usize) -> Result<(), tonic::Status> {
        match take(&self.memory, bytes.saturating_mul(DECODE_FACTOR)) {
            Some(Some(permit)) => {
                self.held = Some(permit);
                Ok(())
            }
            Some(None) => Ok(()),
            None => {
                let status = tonic::Status::from(Error::Exhausted {
                    what: format!(
                        "a request of {bytes} bytes needs {} bytes of the memory budget while it is decoded \
                         ({DECODE_FACTOR} per byte) and {} are free; it was not started",
                        bytes.saturating_mul(DECODE_FACTOR),
                        self.memory.available_permits()
                    ),
                    limit: self.budget as u64,
                    setting: self.setting,
                });
                // Refused before anything was done: safe to send again.
                Err(crate::processor::not_started(status))
            }
        }
    }
}

impl Drop for BudgetedBody {
    fn drop(&mut self) {
        if let (Some(deposit), Some(held)) = (&self.deposit, self.held.take()) {
            *deposit.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(held);
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
        // A streamed request: the next message (10 bytes, then 20) replaces
        // the one before in the budget, its header split across chunks.
        body.account(&[0, 0, 0, 0, 5, 1, 2, 3]).unwrap();
        assert_eq!(memory.available_permits(), 6400 - 10 * 64, "the first message given back");
        body.account(&[4, 5, 0, 0, 0]).unwrap();
        body.account(&[0, 15]).unwrap();
        assert_eq!(memory.available_permits(), 6400 - 20 * 64);
        body.account(&[0; 15]).unwrap();
        body.account(&[0, 0, 0, 0, 0]).unwrap();
        assert_eq!(memory.available_permits(), 6400 - 5 * 64, "an empty message takes its header");
        // A second request announcing more than is left is refused at once.
        let mut other = BudgetedBody::new(Body::empty(), memory.clone(), 6400, 1000);
        let err = other.account(&[0, 0, 0, 0, 99]).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.message().contains("--run-memory-budget"), "{}", err.message());
        // Over the message limit: left to tonic's INVALID_ARGUMENT.
        let mut huge = BudgetedBody::new(Body::empty(), memory.clone(), 6400, 1000);
        huge.account(&[0, 0, 1, 0, 0]).unwrap();
        drop((body, other, huge));
        assert_eq!(memory.available_permits(), 6400, "all given back");
    }
}
