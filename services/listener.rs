//! The accept side of both servers: the stream of incoming connections and
//! the wrapper around each.
//!
//! - [`Incoming`] accepts from a `TcpListener` and never yields an error nor
//!   spins: when the process is out of descriptors or memory (EMFILE, ENFILE,
//!   ENOBUFS, ENOMEM, ...) it logs (rate-limited) and backs off, 10 ms
//!   doubling to 1 s, before accepting again; an error that concerns one
//!   connection only (ECONNABORTED, ...) is skipped.
//! - [`Severable`] wraps each accepted connection: its reads and writes fail
//!   once it is severed, which closes it. A per-connection watchdog task
//!   severs it when it has not sent the HTTP/2 preface and its first frame
//!   within `--handshake-timeout`, or has had no open call for
//!   `--idle-timeout`; the server severs every connection at once on abort or
//!   at the end of shutdown.
//! - [`TrackCallsLayer`] counts each connection's open calls: a call is open
//!   from the moment its request reaches the service until its response body
//!   is finished or dropped. The count lives in [`ConnInfo`], which tonic
//!   copies into every request's extensions.

use crate::config::ConnectionLimits;
use futures::Stream;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, DropGuard, WaitForCancellationFutureOwned};
use tonic::codegen::http::{Request, Response};
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};
use tracing::{debug, warn};

/// First delay after an accept error that is not about one connection.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest delay between accept attempts while they keep failing.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one warning per this while accepting keeps failing.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// Per-connection errors skipped in a row before yielding to the runtime.
const SKIP_BUDGET: u32 = 64;
/// Longer timeouts are cut to this, so deadlines (`Instant + timeout`) cannot
/// overflow.
const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// The HTTP/2 client connection preface, `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const PREFACE_LEN: usize = 24;
/// Every HTTP/2 frame starts with a 9-byte header, its length in the first 3.
const FRAME_HEADER_LEN: usize = 9;

// ------------------------------------------------------------ accepting

/// The incoming connections of a server: accepted from a `TcpListener`, with
/// `TCP_NODELAY` set, each wrapped in a [`Severable`]. Never yields an error
/// and never ends.
#[derive(Debug)]
pub struct Incoming {
    listener: TcpListener,
    server: CancellationToken,
    handshake_timeout: Duration,
    idle_timeout: Duration,
    /// Current back-off delay, doubled after each failed attempt.
    delay: Duration,
    /// Set while backing off.
    pause: Option<Pin<Box<Sleep>>>,
    /// When the last warning was logged, and failures since then (not
    /// reset by a success, so the warnings stay rate-limited while the
    /// process hovers at its limit).
    warned: Option<Instant>,
    suppressed: u64,
    /// Whether accepting is failing (for the "accepting again" line).
    failing: bool,
}

impl Incoming {
    /// Accepts from `listener`; cancelling `server` severs every connection
    /// accepted (see [`Severable`]).
    pub fn new(listener: TcpListener, server: &CancellationToken, limits: &ConnectionLimits) -> Self {
        Self {
            listener,
            server: server.clone(),
            handshake_timeout: limits.handshake_timeout.min(MAX_TIMEOUT),
            idle_timeout: limits.idle_timeout.min(MAX_TIMEOUT),
            delay: BACKOFF_MIN,
            pause: None,
            warned: None,
            suppressed: 0,
            failing: false,
        }
    }

    /// Logs a failed accept, at most once per [`WARN_EVERY`], and starts a
    /// pause.
    fn back_off(&mut self, e: &io::Error) {
        let now = Instant::now();
        if self.warned.is_none_or(|at| now.duration_since(at) >= WARN_EVERY) {
            warn!(
                error = %e,
                retry_in = ?self.delay,
                suppressed = self.suppressed,
                "cannot accept connections (out of file descriptors or memory?); backing off"
            );
            self.warned = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
        self.failing = true;
        self.pause = Some(Box::pin(tokio::time::sleep(self.delay)));
        self.delay = (self.delay * 2).min(BACKOFF_MAX);
    }
}

/// Whether an accept error concerns only the connection being accepted (it
/// was reset or aborted before `accept` returned it), so the next accept may
/// well succeed.
fn per_connection(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted
            | ConnectionReset
            | ConnectionRefused
            | Interrupted
            | WouldBlock
            | TimedOut
            | PermissionDenied
            | HostUnreachable
            | NetworkUnreachable
            | NetworkDown
    )
}

impl Stream for Incoming {
    type Item = Result<Severable, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let mut skipped = 0;
        while skipped < SKIP_BUDGET {
            if let Some(pause) = this.pause.as_mut() {
                ready!(pause.as_mut().poll(cx));
                this.pause = None;
            }
            match ready!(this.listener.poll_accept(cx)) {
                Ok((io, peer)) => {
                    if this.failing {
                        // Not a warning: a process at its descriptor limit may
                        // alternate between the two many times a second.
                        debug!("accepting connections again");
                        this.failing = false;
                    }
                    this.delay = BACKOFF_MIN;
                    // Small unary messages: send at once rather than wait for Nagle.
                    let _ = io.set_nodelay(true);
                    let conn =
                        Severable::new(io, peer, &this.server, this.handshake_timeout, this.idle_timeout);
                    return Poll::Ready(Some(Ok(conn)));
                }
                Err(e) if per_connection(&e) => {
                    debug!(error = %e, "accept failed for one connection; skipped");
                    skipped += 1;
                }
                Err(e) => this.back_off(&e),
            }
        }
        // A long run of per-connection errors: let other tasks run first.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

// ------------------------------------------------------ connection state

/// What a connection's watchdog and its calls share.
#[derive(Debug)]
struct ConnState {
    /// When the connection was accepted; `idle_since` counts from it.
    born: Instant,
    /// Calls open on the connection.
    open: AtomicUsize,
    /// Nanoseconds from `born` to when `open` last fell to zero.
    idle_since: AtomicU64,
    /// Whether the preface and the first frame have been read.
    handshaken: AtomicBool,
}

impl ConnState {
    fn new() -> Self {
        Self {
            born: Instant::now(),
            open: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            handshaken: AtomicBool::new(false),
        }
    }

    fn call_started(self: &Arc<Self>) -> CallGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        CallGuard(self.clone())
    }

    /// When the connection will have been idle for `idle`, or `None` while a
    /// call is open.
    fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        if self.open.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(self.born + Duration::from_nanos(self.idle_since.load(Ordering::Acquire)) + idle)
    }
}

/// One open call; dropping it closes the call.
#[derive(Debug)]
struct CallGuard(Arc<ConnState>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            let now = self.0.born.elapsed().as_nanos().try_into().unwrap_or(u64::MAX);
            // fetch_max: a later call's end, recorded first, must not be
            // moved back by an earlier one.
            self.0.idle_since.fetch_max(now, Ordering::AcqRel);
        }
    }
}

/// A connection's `ConnectInfo`: tonic copies it into the extensions of each
/// request on the connection. [`TrackCallsLayer`] also inserts its
/// [`TcpConnectInfo`] there, so `Request::remote_addr` keeps working.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub(crate) tcp: TcpConnectInfo,
    state: Arc<ConnState>,
    /// The TLS session's peer certificates, on a TLS connection (see
    /// [`tls`](crate::tls)); inserted in each request so `peer_certs` works.
    pub(crate) tls: Option<TlsConnectInfo<TcpConnectInfo>>,
}

// ------------------------------------------------------------ connection

/// Counts the bytes of the client preface and first frame (SETTINGS) until
/// both are in.
#[derive(Debug)]
struct Handshake {
    seen: usize,
    need: usize,
    length: [u8; 3],
}

impl Handshake {
    fn new() -> Self {
        Self { seen: 0, need: PREFACE_LEN + FRAME_HEADER_LEN, length: [0; 3] }
    }

    /// Takes bytes just read; true once the preface and the whole first
    /// frame have been read.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            if self.seen >= self.need {
                break;
            }
            if let Some(i) = self.seen.checked_sub(PREFACE_LEN).filter(|i| *i < 3) {
                self.length[i] = b;
            }
            self.seen += 1;
            if self.seen == PREFACE_LEN + FRAME_HEADER_LEN {
                let [a, b, c] = self.length;
                self.need += u32::from_be_bytes([0, a, b, c]) as usize;
            }
        }
        self.seen >= self.need
    }
}

/// Counts the HTTP/2 preface and first frame read through a layer above
/// the connection (see [`Severable::take_preface_check`]).
#[derive(Debug)]
pub(crate) struct PrefaceCheck {
    handshake: Handshake,
    state: Arc<ConnState>,
}

impl PrefaceCheck {
    /// Takes bytes just read; true once the preface and first frame are in
    /// (the watchdog then stops timing the handshake).
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> bool {
        let done = self.handshake.feed(bytes);
        if done {
            self.state.handshaken.store(true, Ordering::Release);
        }
        done
    }
}

/// An accepted connection that can be severed: reads and writes fail from
/// the moment its token is cancelled, so hyper drops the connection and the
/// calls on it. The server severs every connection at once on
/// `Running::abort` (standing for a crash) and at the end of shutdown; the
/// connection's watchdog severs it when its handshake or idle timeout passes.
///
/// Each connection watches a child token of its own: the check runs on every
/// read and write, and a token's state sits behind a mutex, which one token
/// shared by all connections would make a process-wide point of contention.
/// Apart from that check, a read or write costs one branch once the
/// handshake is in.
pub struct Severable {
    io: TcpStream,
    severed: Pin<Box<WaitForCancellationFutureOwned>>,
    done: bool,
    /// Until the preface and first frame are in (when the handshake is timed).
    handshake: Option<Handshake>,
    state: Arc<ConnState>,
    /// Ends the watchdog when the connection is dropped.
    _watchdog: DropGuard,
}

impl std::fmt::Debug for Severable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Severable").field("io", &self.io).field("state", &self.state).finish_non_exhaustive()
    }
}

impl Severable {
    /// Wraps `io`, severed when `server` is cancelled, and starts its
    /// watchdog: zero `handshake_timeout` or `idle_timeout` disables that
    /// timeout. Must run on a Tokio runtime.
    pub fn new(
        io: TcpStream,
        peer: SocketAddr,
        server: &CancellationToken,
        handshake_timeout: Duration,
        idle_timeout: Duration,
    ) -> Self {
        let (handshake_timeout, idle_timeout) =
            (handshake_timeout.min(MAX_TIMEOUT), idle_timeout.min(MAX_TIMEOUT));
        let token = server.child_token();
        let state = Arc::new(ConnState::new());
        if !handshake_timeout.is_zero() || !idle_timeout.is_zero() {
            tokio::spawn(watchdog(state.clone(), token.clone(), peer, handshake_timeout, idle_timeout));
        }
        Self {
            io,
            severed: Box::pin(token.clone().cancelled_owned()),
            done: false,
            handshake: (!handshake_timeout.is_zero()).then(Handshake::new),
            state,
            _watchdog: token.drop_guard(),
        }
    }

    /// Hands the HTTP/2 preface check to the layer above (TLS): this
    /// stream no longer counts the bytes it reads (they are TLS records);
    /// the [`PrefaceCheck`] counts the decrypted ones. `None` when the
    /// handshake is not timed. The watchdog's deadline stays, so the TLS
    /// handshake and the preface together must fit in the timeout.
    pub(crate) fn take_preface_check(&mut self) -> Option<PrefaceCheck> {
        let handshake = self.handshake.take()?;
        Some(PrefaceCheck { handshake, state: self.state.clone() })
    }

    /// Peeks at the first bytes received, without taking them; fails once
    /// severed.
    pub(crate) fn poll_peek(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        self.io.poll_peek(cx, buf)
    }

    /// An error once severed; otherwise arranges a wake-up for when it is.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.done || self.severed.as_mut().poll(cx).is_ready() {
            self.done = true;
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "connection closed by the server"));
        }
        Ok(())
    }
}

/// Severs the connection (cancels `token`) when it has not completed its
/// handshake within `handshake`, or has had no open call for `idle`; ends
/// when the connection is dropped. Wakes at the handshake deadline, then at
/// most once per `idle`.
async fn watchdog(
    state: Arc<ConnState>,
    token: CancellationToken,
    peer: SocketAddr,
    handshake: Duration,
    idle: Duration,
) {
    let mut handshake_by = (!handshake.is_zero()).then(|| state.born + handshake);
    loop {
        let now = Instant::now();
        if handshake_by.is_some_and(|by| by <= now) {
            if !state.handshaken.load(Ordering::Acquire) {
                debug!(%peer, timeout = ?handshake, "closing a connection that sent no HTTP/2 handshake in time");
                token.cancel();
                return;
            }
            handshake_by = None;
        }
        let idle_by = match state.idle_deadline(idle) {
            _ if idle.is_zero() => None,
            Some(by) if by <= now => {
                debug!(%peer, timeout = ?idle, "closing an idle connection");
                token.cancel();
                return;
            }
            Some(by) => Some(by),
            // A call is open: look again in a while.
            None => Some(now + idle),
        };
        let Some(wake) = [handshake_by, idle_by].into_iter().flatten().min() else { return };
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
}

impl AsyncRead for Severable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check(cx)?;
        if self.handshake.is_none() {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = read {
            let this = &mut *self;
            if this.handshake.as_mut().is_some_and(|h| h.feed(&buf.filled()[before..])) {
                this.handshake = None;
                this.state.handshaken.store(true, Ordering::Release);
            }
        }
        read
    }
}

impl AsyncWrite for Severable {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Connected for Severable {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo { tcp: self.io.connect_info(), state: self.state.clone(), tls: None }
    }
}

// ---------------------------------------------------------- call counting

/// Counts each connection's open calls (see [`ConnInfo`]), so its watchdog
/// knows when it is idle, and puts the connection's [`TcpConnectInfo`] in
/// each request's extensions.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrackCallsLayer;

impl<S> tower::Layer<S> for TrackCallsLayer {
    type Service = TrackCalls<S>;

    fn layer(&self, inner: S) -> TrackCalls<S> {
        TrackCalls { inner }
    }
}

/// The service of [`TrackCallsLayer`].
#[derive(Debug, Clone)]
pub struct TrackCalls<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<Request<ReqBody>> for TrackCalls<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Unpin,
    ResBody: Unpin,
{
    type Response = Response<Pin<Tracked<ResBody>>>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let guard = match req.extensions().get::<ConnInfo>() {
            Some(info) => {
                let (tcp, tls, guard) = (info.tcp.clone(), info.tls.clone(), info.state.call_started());
                req.extensions_mut().insert(tcp);
                if let Some(tls) = tls {
                    req.extensions_mut().insert(tls);
                }
                Some(guard)
            }
            None => None,
        };
        TrackedFuture { inner: self.inner.call(req), guard }
    }
}

/// The response future of [`TrackCalls`]: the call is open while it runs,
/// then while its response body does.
#[derive(Debug)]
pub struct TrackedFuture<F> {
    inner: F,
    guard: Option<CallGuard>,
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>> + Unpin,
    B: Unpin,
{
    type Output = Result<Response<Pin<Tracked<B>>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = ready!(Pin::new(&mut self.inner).poll(cx))?;
        let guard = self.guard.take();
        Poll::Ready(Ok(response.map(|body| Pin::new(Tracked { body, _guard: guard }))))
    }
}

/// A response body holding its call open until it is dropped. As
/// `Pin<Tracked<B>>` it is an `http_body::Body` (through the blanket impl
/// for pinned pointers), with no allocation.
#[derive(Debug)]
pub struct Tracked<B> {
    body: B,
    _guard: Option<CallGuard>,
}

impl<B> Deref for Tracked<B> {
    type Target = B;

    fn deref(&self) -> &B {
        &self.body
    }
}

impl<B> DerefMut for Tracked<B> {
    fn deref_mut(&mut self) -> &mut B {
        &mut self.body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    #[test]
    fn handshake_needs_the_preface_and_the_whole_first_frame() {
        // SETTINGS with one 6-byte setting, then the start of another frame.
        let mut bytes = PREFACE.to_vec();
        bytes.extend_from_slice(&[0, 0, 6, 4, 0, 0, 0, 0, 0]);
        bytes.extend_from_slice(&[0, 3, 0, 0, 0, 100]);
        bytes.extend_from_slice(&[0, 0, 4, 8, 0]);
        let whole = PREFACE.len() + 9 + 6;
        for split in 0..bytes.len() {
            let mut h = Handshake::new();
            let first = h.feed(&bytes[..split]);
            assert_eq!(first, split >= whole, "split at {split}");
            assert!(h.feed(&bytes[split..]), "split at {split}");
        }
        let mut h = Handshake::new();
        assert!(!h.feed(&bytes[..whole - 1]));
        assert!(h.feed(&bytes[whole - 1..whole]));
    }

    #[test]
    fn only_errors_about_one_connection_are_skipped_without_back_off() {
        assert!(per_connection(&io::Error::from(io::ErrorKind::ConnectionAborted)));
        for errno in [24, 23, 105, 12] {
            // EMFILE, ENFILE, ENOBUFS, ENOMEM
            assert!(!per_connection(&io::Error::from_raw_os_error(errno)), "errno {errno}");
        }
    }

    #[test]
    fn idle_since_the_last_call_ended() {
        let state = Arc::new(ConnState::new());
        let idle = Duration::from_secs(60);
        assert_eq!(state.idle_deadline(idle), Some(state.born + idle));
        let (a, b) = (state.call_started(), state.call_started());
        assert_eq!(state.idle_deadline(idle), None);
        drop(a);
        assert_eq!(state.idle_deadline(idle), None);
        drop(b);
        let at = state.idle_deadline(idle).expect("idle");
        assert!(at >= state.born + idle && at <= Instant::now() + idle);
    }
}
