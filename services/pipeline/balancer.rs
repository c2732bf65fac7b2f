//! Instance choice and capacity: which processor gets the next attempt, and
//! when; and the live set of instances those choices are made among.
//!
//! Each processor advertises its `slots` (`Describe`); the pipeline never has
//! more attempts in flight on an instance than that, across all its runs.
//! An attempt takes a [`Lease`] on a slot: at once when one is free (the
//! healthy instance with the lowest share of its slots in use, avoiding the
//! one the record just failed on), otherwise it waits here, in the pipeline,
//! in its run's queue. Runs take turns: when a slot frees it goes to the
//! oldest waiter of the next run in rotation, so a run of 4,096 records in
//! flight cannot starve a run of one.
//!
//! The set of instances changes while runs go on ([`discovery`](super::discovery)
//! feeds it from DNS): a new instance is probed and described before it gets
//! work; one that leaves takes no new attempts, its in-flight ones finish,
//! and it is forgotten once idle. Instance states:
//!
//! - `UP`: answered its last probe SERVING (or a call) and may get work;
//! - `DRAINING`: answered NOT_SERVING or refused a record as shutting down:
//!   no new work, but its in-flight records finish there;
//! - `DOWN`: unreachable. When a probe gets *no answer at all* within the
//!   probe timeout (link down, frozen host), the instance is *lost*: its
//!   in-flight attempts are ended at once and retried elsewhere, whatever
//!   their `record_timeout`. An explicit refusal (connection refused, reset)
//!   ends nothing that is still running.
//!
//! Not tonic's `balance_list` (random p2c over a load that is always 0, which
//! keeps choosing dead endpoints and waits forever when none is ready). Each
//! instance has two connections: one for records, one for health probes and
//! `Describe`, so a probe never queues behind record traffic. No HTTP/2
//! keepalive pings by default: grpc-go servers (and Envoy) answer pings more
//! often than every 5 minutes with GOAWAY; probes find lost hosts instead.

use super::discovery::{Resolve, SystemResolver, Target};
use super::wire::{ProcessBatchWire, ProcessRecordWire};
use crate::error::Error;
use crate::processor::is_not_started;
use crate::proto::record_processor_client::RecordProcessorClient;
use crate::proto::{DescribeRequest, ProcessBatchResponse, ProcessRecordResponse};
use futures::future::BoxFuture;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint as ChannelEndpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tracing::{debug, info, warn};

/// The service name processors report health for.
pub const PROCESSOR_SERVICE: &str = "fanout.v1.RecordProcessor";

/// Largest request assumed for a processor that does not say (gRPC's
/// default receive limit).
const DEFAULT_MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// Slots assumed for a processor that does not implement `Describe`.
pub const FALLBACK_SLOTS: usize = 4;

/// Largest response accepted from a processor: a record's result must fit,
/// with room to spare, in one event of 4 MiB (the default receive limit of
/// gRPC clients).
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024 - 64 * 1024;

/// Shortest time between two probe rounds triggered by failures.
const MIN_PROBE_GAP: Duration = Duration::from_millis(250);

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;
const DRAINING: u8 = 3;

/// How the pipeline connects to processors.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Bound on opening a connection, and on a probe's answer.
    pub connect_timeout: Duration,
    /// How often every instance is probed.
    pub health_interval: Duration,
    /// HTTP/2 keepalive pings on the record connections (off when `None`).
    pub http2_keepalive: Option<Duration>,
    /// The bearer token sent on every call (`--processor-token-file`).
    pub bearer: Option<Arc<crate::auth::TokenFile>>,
    /// TLS to every instance, when set (see [`crate::tls`]).
    pub tls: Option<Arc<crate::tls::ProcessorTls>>,
}

/// One processor instance: one address.
#[derive(Debug)]
pub struct Endpoint {
    /// Unique for the balancer's life (an address that comes back is a new
    /// instance with a new id).
    pub id: u64,
    /// `http://ADDRESS:PORT`, what it is dialled at.
    pub url: String,
    /// `ADDRESS:PORT`.
    pub addr: String,
    /// The same, to compare with lookups without formatting.
    socket: SocketAddr,
    /// The configured `--processors` entry it came from.
    target: usize,
    calls: tonic::client::Grpc<Channel>,
    probes: Channel,
    /// Leases held; changed only under the scheduler's lock.
    in_flight: AtomicUsize,
    /// From `Describe`; 0 until described (no work before that).
    slots: AtomicUsize,
    /// From `Describe`: most records per `ProcessBatch` call (≤ 1: none).
    max_batch: AtomicUsize,
    /// From `Describe`: largest request it accepts.
    max_message: AtomicUsize,
    state: AtomicU8,
    /// Left the resolved set: no new work; forgotten once idle.
    removed: AtomicBool,
    /// When it last answered (a probe or a call), as nanoseconds since the
    /// balancer's origin; 0 = never.
    last_ok: AtomicU64,
    /// The name it reports in `Describe`.
    name: Mutex<String>,
    /// Cancelled when the instance is lost: its in-flight attempts end.
    lost: Mutex<CancellationToken>,
    warned_no_describe: AtomicBool,
    /// Why it was last marked down or draining, for the error of a record
    /// that finds no instance up.
    why_not_up: Mutex<String>,
    /// Its attempts, for Prometheus (they go with the instance).
    pub metrics: crate::metrics::EndpointMetrics,
}

impl Endpoint {
    fn new(id: u64, target: (usize, &str), addr: SocketAddr, opts: &ConnectOptions) -> Result<Self, Error> {
        let (target, host) = target;
        let url = format!("{}://{addr}", if opts.tls.is_some() { "https" } else { "http" });
        // With TLS, the dialer does TCP and the handshake itself, with the
        // config current at each dial (reloadable), bounding both by the
        // connect timeout; the channel's own URI stays http:// so tonic
        // adds no TLS of its own, and the origin keeps :scheme https.
        let dialer = opts.tls.as_ref().map(|tls| tls.dialer(host, addr)).transpose()?;
        let base = || -> Result<ChannelEndpoint, Error> {
            let endpoint = ChannelEndpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| Error::Config(format!("processor endpoint {url:?}: {e}")))?;
            Ok(match &dialer {
                Some(_) => endpoint.origin(
                    url.parse().map_err(|e| Error::Config(format!("processor endpoint {url:?}: {e}")))?,
                ),
                None => endpoint.connect_timeout(opts.connect_timeout).tcp_nodelay(true),
            })
        };
        let connect = |e: ChannelEndpoint| match &dialer {
            Some(d) => e.connect_with_connector_lazy(d.clone()),
            None => e.connect_lazy(),
        };
        let mut endpoint = base()?;
        if let Some(every) = opts.http2_keepalive {
            endpoint = endpoint.http2_keep_alive_interval(every).keep_alive_timeout(opts.connect_timeout);
        }
        let calls = tonic::client::Grpc::new(connect(endpoint))
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
            .max_encoding_message_size(usize::MAX);
        // The probe connection sends no keepalive either: probes are the check.
        let probes = connect(base()?);
        Ok(Self {
            id,
            url,
            addr: addr.to_string(),
            socket: addr,
            target,
            calls,
            probes,
            in_flight: AtomicUsize::new(0),
            slots: AtomicUsize::new(0),
            max_batch: AtomicUsize::new(1),
            max_message: AtomicUsize::new(DEFAULT_MAX_MESSAGE),
            state: AtomicU8::new(UNKNOWN),
            removed: AtomicBool::new(false),
            last_ok: AtomicU64::new(0),
            name: Mutex::new(String::new()),
            lost: Mutex::new(CancellationToken::new()),
            warned_no_describe: AtomicBool::new(false),
            why_not_up: Mutex::new(String::new()),
            metrics: Default::default(),
        })
    }

    /// Calls in flight to this instance.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Slots the instance advertised (0 until described).
    pub fn slots(&self) -> usize {
        self.slots.load(Ordering::Relaxed)
    }

    /// Most records it takes in one call (1 when it does not serve
    /// `ProcessBatch`), and the largest request it accepts, from `Describe`.
    pub fn batch_limits(&self) -> (usize, usize) {
        (self.max_batch.load(Ordering::Relaxed).max(1), self.max_message.load(Ordering::Relaxed))
    }

    /// Whether its last probe (or call) found it up. It gets work only once
    /// described too, and while it is still in the resolved set.
    pub fn is_up(&self) -> bool {
        self.state.load(Ordering::Relaxed) == UP
    }

    /// Whether the last probe or call found it unreachable.
    pub fn is_down(&self) -> bool {
        self.state.load(Ordering::Relaxed) == DOWN
    }

    /// Whether it is shutting down (no new work; its records finish).
    pub fn is_draining(&self) -> bool {
        self.state.load(Ordering::Relaxed) == DRAINING
    }

    /// The instance as results name it: its address, and the name it
    /// reports when that is something else.
    pub fn label(&self) -> String {
        let name = self.name.lock().unwrap_or_else(|p| p.into_inner());
        if name.is_empty() || *name == self.addr {
            self.addr.clone()
        } else {
            format!("{} ({name})", self.addr)
        }
    }

    /// Up and described: it may be given work.
    fn usable(&self) -> bool {
        self.is_up() && self.slots() > 0 && !self.removed.load(Ordering::Relaxed)
    }

    fn lost_token(&self) -> CancellationToken {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sets the state, logging the change and why; `true` when it changed.
    fn set_state(&self, state: u8, why: &str) -> bool {
        if state != UP {
            /// Reasons are short; a peer's long message is cut.
            const MAX_REASON: usize = 512;
            let mut end = why.len().min(MAX_REASON);
            while !why.is_char_boundary(end) {
                end -= 1;
            }
            let mut reason = self.why_not_up.lock().unwrap_or_else(|p| p.into_inner());
            reason.clear();
            reason.push_str(&why[..end]);
        }
        let old = self.state.swap(state, Ordering::Relaxed);
        if old != state {
            match state {
                UP => {
                    // Back from lost: later attempts get a live token.
                    let mut lost = self.lost.lock().unwrap_or_else(|p| p.into_inner());
                    if lost.is_cancelled() {
                        *lost = CancellationToken::new();
                    }
                    info!(processor = %self.addr, slots = self.slots(), "processor is up")
                }
                DRAINING => info!(processor = %self.addr, reason = why, "processor is draining"),
                _ => warn!(processor = %self.addr, reason = why, "processor is down"),
            }
        }
        old != state
    }
}

/// A run's place in the dispatch rotation; dropping it forgets the run's
/// waiting attempts.
#[derive(Debug)]
pub struct RunQueue {
    id: u64,
    balancer: Arc<Balancer>,
}

impl Drop for RunQueue {
    fn drop(&mut self) {
        let mut sched = self.balancer.sched();
        sched.queues.remove(&self.id);
        sched.ring.retain(|&r| r != self.id);
    }
}

impl RunQueue {
    /// The pipeline's run and record counts.
    pub fn metrics(&self) -> &Arc<crate::metrics::RunMetrics> {
        &self.balancer.run_metrics
    }

    /// Waits for a slot (see the [module docs](self)); `avoid` is the id of
    /// the instance the record just failed on, taken only when no other has
    /// room. `UNAVAILABLE` when a round of health probes finds every
    /// instance down (one is asked for at once when they all look down, so
    /// one lost connection does not fail a record before a probe has had
    /// its say).
    pub async fn acquire(&self, avoid: Option<u64>) -> Result<Lease, Error> {
        let b = &self.balancer;
        let rx = {
            let mut sched = b.sched();
            // Nobody waiting: no one to be fair to.
            if sched.ring.is_empty()
                && let Some(ep) = choose(&mut sched, avoid)
            {
                return Ok(b.lease_locked(ep));
            }
            if all_down(&sched) {
                b.probe_soon.notify_one();
            }
            let (tx, rx) = oneshot::channel();
            let queue = sched.queues.entry(self.id).or_default();
            let was_empty = queue.is_empty();
            queue.push_back(Waiter { tx, avoid });
            if was_empty {
                sched.ring.push_back(self.id);
            }
            // Cheap insurance: if a slot is free after all, it goes out now.
            b.dispatch_locked(&mut sched);
            rx
        };
        rx.await.map_err(|_| b.none_up())
    }
}

/// An attempt waiting for a slot.
#[derive(Debug)]
struct Waiter {
    tx: oneshot::Sender<Lease>,
    avoid: Option<u64>,
}

/// The instances, the waiting attempts per run, and the order runs take
/// turns in: one lock, so that a choice and the counts it reads agree.
#[derive(Debug, Default)]
struct Sched {
    endpoints: Vec<Arc<Endpoint>>,
    queues: HashMap<u64, VecDeque<Waiter>>,
    /// Runs with waiters, next to serve first.
    ring: VecDeque<u64>,
    rotate: usize,
}

/// The instance for the next attempt: among usable ones with a free slot,
/// not `avoid` if another has room, then the lowest share of slots in use;
/// ties rotate so equal instances share the work. One pass over the fleet.
fn choose(sched: &mut Sched, avoid: Option<u64>) -> Option<Arc<Endpoint>> {
    let n = sched.endpoints.len();
    if n == 0 {
        return None;
    }
    let start = sched.rotate % n;
    sched.rotate = sched.rotate.wrapping_add(1);
    let mut best: Option<(usize, bool, usize, usize)> = None;
    for k in 0..n {
        let i = (start + k) % n;
        let ep = &sched.endpoints[i];
        let (used, slots) = (ep.in_flight(), ep.slots());
        if !ep.usable() || used >= slots {
            continue;
        }
        let avoided = Some(ep.id) == avoid;
        let better = match best {
            None => true,
            Some((_, b_avoided, b_used, b_slots)) => {
                (b_avoided && !avoided) || (b_avoided == avoided && used * b_slots < b_used * slots)
            }
        };
        if better {
            best = Some((i, avoided, used, slots));
        }
    }
    best.map(|(i, ..)| sched.endpoints[i].clone())
}

/// Every instance unreachable (draining ones still count as there: their
/// records finish, and new instances may be joining).
fn all_down(sched: &Sched) -> bool {
    sched.endpoints.iter().filter(|e| !e.removed.load(Ordering::Relaxed)).all(|e| e.is_down())
}

/// The set of processor instances a pipeline spreads records over.
pub struct Balancer {
    sched: Mutex<Sched>,
    /// The configured `--processors` entries.
    targets: Vec<Target>,
    resolver: Arc<dyn Resolve>,
    opts: ConnectOptions,
    next_id: AtomicU64,
    next_run: AtomicU64,
    origin: Instant,
    probe_soon: Notify,
    /// Asks the resolver loop to look names up again now (rate-limited there).
    pub(super) resolve_soon: Notify,
    /// Whether some instance is usable, for the pipeline's readiness.
    usable_tx: watch::Sender<bool>,
    /// Held by the one run checking the fleet itself ([`Balancer::ensure_ready`]),
    /// so that runs arriving together share one round of lookups and probes.
    ready_round: tokio::sync::Mutex<()>,
    /// Runs, records and placeless attempts, for Prometheus.
    run_metrics: Arc<crate::metrics::RunMetrics>,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer").field("targets", &self.targets).finish_non_exhaustive()
    }
}

/// A slot on a chosen instance; counts as in flight until dropped, and then
/// goes to the next waiting attempt.
#[derive(Debug)]
pub struct Lease {
    balancer: Arc<Balancer>,
    endpoint: Arc<Endpoint>,
    /// False for a lease that was never handed out (its waiter had gone).
    armed: bool,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.armed {
            self.balancer.release(&self.endpoint);
        }
    }
}

/// How one call ended, beyond success.
#[derive(Debug)]
pub enum CallError {
    /// The processor refused the record before starting it (full, or
    /// shutting down), or the call never reached it: sending it again is
    /// not a new attempt.
    NotStarted(tonic::Status),
    /// The attempt failed with this status.
    Failed(tonic::Status),
}

/// Whether a transport failure happened before the request reached the
/// processor: the connection was refused; the stream was refused (HTTP/2
/// REFUSED_STREAM, sent by a server that is closing); or hyper dropped the
/// request unsent because its connection closed first ("operation was
/// canceled", which is what a processor shutting down gracefully causes).
fn never_sent(status: &tonic::Status) -> bool {
    crate::error::chain(status).skip(1).any(|e| {
        let text = e.to_string();
        text.contains("tcp connect error")
            || text.contains("refused stream")
            || text.contains("operation was canceled")
    })
}

impl Lease {
    /// The instance's id.
    pub fn endpoint_id(&self) -> u64 {
        self.endpoint.id
    }

    /// The instance the slot is on.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// One `ProcessRecord` call bounded by `timeout`, which also travels as
    /// the call's `grpc-timeout` so the processor stops the record's units
    /// when it passes even if the cancellation never reaches it. (tonic's own
    /// client timeouts surface as `CANCELLED` and bound only the time to
    /// headers, so the bound that decides is here.) Ends early, as a
    /// transient failure, when the instance is found lost. Dropping the
    /// future cancels the call on the processor.
    pub async fn process(
        &self,
        req: ProcessRecordWire,
        timeout: Duration,
    ) -> Result<ProcessRecordResponse, CallError> {
        self.call("/fanout.v1.RecordProcessor/ProcessRecord", req, timeout, MAX_RESPONSE_BYTES).await
    }

    /// One `ProcessBatch` call bounded by `timeout`, as [`Lease::process`]:
    /// the call fails as a whole only when the batch never got to the
    /// records (refused, transport, timeout); otherwise each record's result
    /// is in the response.
    pub async fn process_batch(
        &self,
        req: ProcessBatchWire,
        timeout: Duration,
    ) -> Result<ProcessBatchResponse, CallError> {
        let limit = crate::processor::MAX_BATCH_RESPONSE_BYTES + 64 * 1024;
        self.call("/fanout.v1.RecordProcessor/ProcessBatch", req, timeout, limit).await
    }

    async fn call<Req, Resp>(
        &self,
        path: &'static str,
        req: Req,
        timeout: Duration,
        response_limit: usize,
    ) -> Result<Resp, CallError>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let ep = &self.endpoint;
        let lost = ep.lost_token();
        let mut grpc = ep.calls.clone().max_decoding_message_size(response_limit);
        let call = async {
            grpc.ready()
                .await
                .map_err(|e| tonic::Status::unavailable(format!("{}: not ready: {e}", ep.addr)))?;
            let mut request = tonic::Request::new(req);
            request.set_timeout(timeout);
            if let Some(token) = &self.balancer.opts.bearer {
                token.authorize(&mut request);
            }
            crate::otel::inject_current(request.metadata_mut());
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
            grpc.unary(request, path, tonic_prost::ProstCodec::<Req, Resp>::default()).await
        };
        let timed_out = || {
            // A frozen instance only ever times out: let a probe look at it
            // now rather than at the next interval.
            self.balancer.probe_soon.notify_one();
            CallError::Failed(tonic::Status::deadline_exceeded(format!(
                "attempt timed out after {timeout:?} on {}",
                ep.addr
            )))
        };
        let result = tokio::select! {
            r = tokio::time::timeout(timeout, call) => r,
            _ = lost.cancelled() => {
                return Err(CallError::Failed(tonic::Status::unavailable(format!(
                    "{}: instance lost (no answer to its health probe); retried elsewhere",
                    ep.addr
                ))));
            }
        };
        match result {
            Ok(Ok(resp)) => {
                self.balancer.answered(ep);
                Ok(resp.into_inner())
            }
            Ok(Err(status)) if is_not_started(&status) => {
                if status.code() == tonic::Code::Unavailable {
                    // Refused as shutting down: no new work for it.
                    self.balancer.set_state(ep, DRAINING, "refused a record: shutting down");
                } else {
                    self.balancer.answered(ep);
                }
                Err(CallError::NotStarted(status))
            }
            // Our grpc-timeout, enforced by tonic on either side (the
            // client's channel reports it with a transport source).
            Ok(Err(status))
                if status.code() == tonic::Code::Cancelled && status.message() == "Timeout expired" =>
            {
                Err(timed_out())
            }
            // A wrong token is the fleet's configuration, not the record's
            // fault, and the record never ran: it goes to another instance
            // without counting an attempt, and this one gets no new work
            // until a probe (whose Describe carries the token too) finds it
            // accepted. With no instance left, the record fails UNAVAILABLE
            // with this reason.
            Ok(Err(status))
                if status.code() == tonic::Code::Unauthenticated
                    && std::error::Error::source(&status).is_none() =>
            {
                let status = crate::auth::refused_by_processor(&ep.label(), &status);
                self.balancer.mark_down(ep, status.message());
                Err(CallError::NotStarted(status))
            }
            Ok(Err(status)) => {
                // A status with a source came from the transport (refused,
                // reset, closed), not from the processor's handler.
                if std::error::Error::source(&status).is_some() {
                    debug!(processor = %ep.addr, error = %status, "transport failure");
                    if let Some(why) = crate::tls::connect_error_reason(&status) {
                        // The handshake failed: the request was never sent.
                        self.balancer.mark_down(ep, &why);
                        return Err(CallError::NotStarted(tonic::Status::unavailable(format!(
                            "{}: {why}",
                            ep.addr
                        ))));
                    }
                    self.balancer.mark_down(ep, &status.to_string());
                    if never_sent(&status) {
                        return Err(CallError::NotStarted(status));
                    }
                    // A transport CANCELLED left here is the stream reset
                    // under the call (HTTP/2 CANCEL: the instance or its
                    // connection went away mid-call); "operation was
                    // canceled" (never sent) was taken above. That is the
                    // instance being unavailable, worth an attempt elsewhere.
                    if status.code() == tonic::Code::Cancelled {
                        return Err(CallError::Failed(tonic::Status::unavailable(format!(
                            "{} ({}: connection lost)",
                            status.message(),
                            ep.addr
                        ))));
                    }
                } else {
                    self.balancer.answered(ep);
                }
                Err(CallError::Failed(status))
            }
            Err(_) => Err(timed_out()),
        }
    }
}

impl Balancer {
    /// A balancer over `processors` (see [`Target::parse`]), looked up with
    /// the system's resolver. Connections are opened lazily; nothing is
    /// dialled or looked up here: addresses given as IPs are instances at
    /// once, names become instances when [`discovery`](super::discovery)
    /// resolves them.
    pub fn new(processors: &[String], opts: ConnectOptions) -> Result<Self, Error> {
        Self::with_resolver(processors, opts, Arc::new(SystemResolver))
    }

    /// [`Balancer::new`] with another resolver (tests drive membership
    /// through one).
    pub fn with_resolver(
        processors: &[String],
        opts: ConnectOptions,
        resolver: Arc<dyn Resolve>,
    ) -> Result<Self, Error> {
        if processors.is_empty() {
            return Err(Error::Config("no processor endpoints (--processors / FANOUT_PROCESSORS)".into()));
        }
        let targets = processors.iter().map(|raw| Target::parse(raw)).collect::<Result<Vec<_>, _>>()?;
        if opts.tls.is_none()
            && let Some(p) = processors.iter().find(|p| p.trim().starts_with("https://"))
        {
            // Plaintext to an https:// URL would be a silent downgrade.
            return Err(Error::Config(format!("processor endpoint {p:?}: https:// needs TLS settings")));
        }
        let (usable_tx, _) = watch::channel(false);
        let b = Self {
            sched: Mutex::default(),
            targets,
            resolver,
            opts,
            next_id: AtomicU64::new(1),
            next_run: AtomicU64::new(1),
            origin: Instant::now(),
            probe_soon: Notify::new(),
            ready_round: tokio::sync::Mutex::new(()),
            resolve_soon: Notify::new(),
            usable_tx,
            run_metrics: Arc::default(),
        };
        for (i, t) in b.targets.iter().enumerate() {
            if let Some(addr) = t.fixed_addr() {
                b.update_target(i, &[addr]);
            }
        }
        Ok(b)
    }

    /// The token sent to processors (`--processor-token-file`).
    pub fn processor_token(&self) -> Option<&Arc<crate::auth::TokenFile>> {
        self.opts.bearer.as_ref()
    }

    /// The live TLS config of processor connections, when TLS is on.
    pub fn processor_tls(&self) -> Option<&Arc<crate::tls::ProcessorTls>> {
        self.opts.tls.as_ref()
    }

    /// `msg` as a request, with the processor token when there is one.
    fn authorized<T>(&self, msg: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(msg);
        if let Some(token) = &self.opts.bearer {
            token.authorize(&mut request);
        }
        request
    }

    /// The configured entries.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    pub(super) fn resolver(&self) -> &Arc<dyn Resolve> {
        &self.resolver
    }

    /// The instances now (those that left the set and are finishing their
    /// last records excluded).
    pub fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        self.sched().endpoints.iter().filter(|e| !e.removed.load(Ordering::Relaxed)).cloned().collect()
    }

    /// Follows whether some instance can take work.
    pub fn watch_usable(&self) -> watch::Receiver<bool> {
        self.usable_tx.subscribe()
    }

    /// A new run's place in the rotation.
    pub fn run_queue(self: &Arc<Self>) -> RunQueue {
        RunQueue { id: self.next_run.fetch_add(1, Ordering::Relaxed), balancer: self.clone() }
    }

    /// The pipeline's run and record counts.
    pub fn run_metrics(&self) -> &Arc<crate::metrics::RunMetrics> {
        &self.run_metrics
    }

    /// Attempts waiting for a slot, over all runs.
    pub fn waiting(&self) -> usize {
        self.sched().queues.values().map(VecDeque::len).sum()
    }

    fn sched(&self) -> MutexGuard<'_, Sched> {
        // A panic while holding the lock cannot leave the counts half-done
        // (each change is one statement), so a poisoned lock is still sound.
        self.sched.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the instances of `target` exactly `addrs`: new addresses become
    /// new instances (probed and described before they get work); vanished
    /// ones take no new work and are forgotten once their in-flight attempts
    /// end. Returns how many joined and left.
    pub(super) fn update_target(&self, target: usize, addrs: &[SocketAddr]) -> (usize, usize) {
        let mut sched = self.sched();
        let mut joined = 0;
        let mut left = 0;
        for ep in sched.endpoints.iter().filter(|e| e.target == target && !e.removed.load(Ordering::Relaxed))
        {
            if !addrs.contains(&ep.socket) {
                ep.removed.store(true, Ordering::Relaxed);
                info!(processor = %ep.addr, in_flight = ep.in_flight(), "processor left the resolved set; draining");
                left += 1;
            }
        }
        for addr in addrs {
            let known = sched
                .endpoints
                .iter()
                .any(|e| e.target == target && !e.removed.load(Ordering::Relaxed) && e.socket == *addr);
            if known {
                continue;
            }
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            match Endpoint::new(id, (target, self.targets[target].host()), *addr, &self.opts) {
                Ok(ep) => {
                    info!(processor = %ep.addr, target = %self.targets[target], "processor joined; probing");
                    sched.endpoints.push(Arc::new(ep));
                    joined += 1;
                }
                Err(e) => warn!(%addr, error = %e, "cannot use a resolved address"),
            }
        }
        sched.endpoints.retain(|e| !(e.removed.load(Ordering::Relaxed) && e.in_flight() == 0));
        drop(sched);
        if joined > 0 {
            self.probe_soon.notify_one();
        }
        if left > 0 {
            self.publish_usable();
        }
        (joined, left)
    }

    fn lease_locked(self: &Arc<Self>, endpoint: Arc<Endpoint>) -> Lease {
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        Lease { balancer: self.clone(), endpoint, armed: true }
    }

    /// Hands free slots to waiting attempts, runs taking turns.
    fn dispatch_locked(self: &Arc<Self>, sched: &mut Sched) {
        while let Some(&run) = sched.ring.front() {
            let Some(queue) = sched.queues.get_mut(&run) else {
                sched.ring.pop_front();
                continue;
            };
            // Skip attempts whose record is gone (run ended, cancelled).
            while queue.front().is_some_and(|w| w.tx.is_closed()) {
                queue.pop_front();
            }
            let Some(avoid) = queue.front().map(|w| w.avoid) else {
                sched.queues.remove(&run);
                sched.ring.pop_front();
                continue;
            };
            let Some(endpoint) = choose(sched, avoid) else { return };
            let queue = sched.queues.get_mut(&run).expect("checked above");
            let waiter = queue.pop_front().expect("checked non-empty");
            let more = !queue.is_empty();
            sched.ring.pop_front();
            if more {
                sched.ring.push_back(run);
            } else {
                sched.queues.remove(&run);
            }
            if let Err(mut lease) = waiter.tx.send(self.lease_locked(endpoint)) {
                // Gone between the check and now: take the slot back here
                // (dropping it armed would re-enter this lock).
                lease.armed = false;
                lease.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    fn release(self: &Arc<Self>, endpoint: &Arc<Endpoint>) {
        let mut sched = self.sched();
        let left = endpoint.in_flight.fetch_sub(1, Ordering::Relaxed) - 1;
        if left == 0 && endpoint.removed.load(Ordering::Relaxed) {
            sched.endpoints.retain(|e| e.id != endpoint.id);
            debug!(processor = %endpoint.addr, "a processor that left is idle; forgotten");
        }
        self.dispatch_locked(&mut sched);
    }

    /// After a change of state or slots: hand out what became free; and,
    /// after a probe round (`confirmed`) that left every instance down, fail
    /// the waiting attempts (each is then retried, or fails, as a transient
    /// failure).
    fn refresh(self: &Arc<Self>, confirmed: bool) {
        let mut sched = self.sched();
        if all_down(&sched) {
            if confirmed && !sched.queues.is_empty() {
                warn!(
                    waiting = sched.queues.values().map(VecDeque::len).sum::<usize>(),
                    "every processor is down"
                );
                sched.queues.clear();
                sched.ring.clear();
            }
        } else {
            self.dispatch_locked(&mut sched);
        }
        drop(sched);
        self.publish_usable();
    }

    fn publish_usable(&self) {
        let usable = self.sched().endpoints.iter().any(|e| e.usable());
        self.usable_tx.send_if_modified(|now| std::mem::replace(now, usable) != usable);
    }

    /// Each instance and why it is not up (the configured entries when
    /// none is known).
    fn none_up(&self) -> Error {
        let endpoints = self.endpoints();
        let names: Vec<String> = match endpoints.is_empty() {
            true => self.targets.iter().map(ToString::to_string).collect(),
            false => endpoints
                .iter()
                .map(|ep| {
                    let why = ep.why_not_up.lock().unwrap_or_else(|p| p.into_inner());
                    match why.is_empty() {
                        true => ep.url.clone(),
                        false => format!("{}: {}", ep.url, why),
                    }
                })
                .collect(),
        };
        Error::Unavailable(format!("no processor is up ({})", names.join("; ")))
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1)
    }

    fn set_state(self: &Arc<Self>, ep: &Endpoint, state: u8, why: &str) {
        if ep.set_state(state, why) {
            self.refresh(false);
        }
    }

    /// A call was answered by the processor's handler: it is reachable.
    fn answered(self: &Arc<Self>, ep: &Endpoint) {
        ep.last_ok.store(self.now_ns(), Ordering::Relaxed);
        if !ep.is_draining() {
            self.set_state(ep, UP, "answered");
        }
    }

    /// A call failed in the transport: no new work until a probe says
    /// otherwise; probe soon, and look its name up again soon.
    fn mark_down(self: &Arc<Self>, ep: &Endpoint, why: &str) {
        self.set_state(ep, DOWN, why);
        self.probe_soon.notify_one();
        self.resolve_soon.notify_one();
    }

    /// Probes one instance: health, then `Describe` for its slots and name.
    async fn probe(self: &Arc<Self>, ep: &Arc<Endpoint>) -> Result<(), String> {
        let timeout = self.opts.connect_timeout;
        let check = async {
            let mut health = HealthClient::new(ep.probes.clone());
            let req = self.authorized(HealthCheckRequest { service: PROCESSOR_SERVICE.into() });
            let resp = health.check(req).await.map_err(|s| (DOWN, crate::tls::status_reason(&s)))?;
            if resp.get_ref().status != ServingStatus::Serving as i32 {
                return Err((DRAINING, format!("health status {:?}", resp.get_ref().status())));
            }
            let mut describe = RecordProcessorClient::new(ep.probes.clone());
            let (slots, name) = match describe.describe(self.authorized(DescribeRequest {})).await {
                Ok(d) => {
                    let d = d.into_inner();
                    ep.max_batch.store(d.max_batch_size as usize, Ordering::Relaxed);
                    if d.max_message_bytes > 0 {
                        ep.max_message
                            .store(d.max_message_bytes.min(usize::MAX as u64) as usize, Ordering::Relaxed);
                    }
                    (d.slots as usize, d.name)
                }
                Err(s) if s.code() == tonic::Code::Unimplemented => {
                    if !ep.warned_no_describe.swap(true, Ordering::Relaxed) {
                        warn!(processor = %ep.addr, slots = FALLBACK_SLOTS, "processor has no Describe; assuming slots");
                    }
                    (FALLBACK_SLOTS, String::new())
                }
                Err(s) if s.code() == tonic::Code::Unauthenticated => {
                    return Err((DOWN, crate::auth::refused_by_processor(&ep.addr, &s).message().to_owned()));
                }
                Err(s) => return Err((DOWN, format!("Describe: {:?}: {}", s.code(), s.message()))),
            };
            Ok((slots.max(1), name))
        };
        let result = match tokio::time::timeout(timeout, check).await {
            Err(_) => {
                // No answer at all: a host gone without closing its
                // connections, or frozen. What it had in flight will never
                // come back: end those attempts now.
                let why = format!("no answer to a health probe within {timeout:?}");
                ep.lost_token().cancel();
                Err((DOWN, why))
            }
            Ok(r) => r,
        };
        let changed = match &result {
            Ok((slots, name)) => {
                ep.last_ok.store(self.now_ns(), Ordering::Relaxed);
                *ep.name.lock().unwrap_or_else(|p| p.into_inner()) = name.clone();
                let resized = ep.slots.swap(*slots, Ordering::Relaxed) != *slots;
                ep.set_state(UP, "probe answered SERVING") || resized
            }
            Err((state, why)) => ep.set_state(*state, why),
        };
        if changed {
            self.refresh(false);
        }
        result.map(drop).map_err(|(_, why)| why)
    }

    /// Probes every instance at once.
    pub async fn probe_all(self: &Arc<Self>) -> Vec<(Arc<Endpoint>, Result<(), String>)> {
        let endpoints = self.sched().endpoints.clone();
        let results = futures::future::join_all(endpoints.iter().map(|ep| self.probe(ep))).await;
        self.refresh(true);
        endpoints.into_iter().zip(results).collect()
    }

    /// Succeeds when some instance is usable and answered within the last
    /// health interval; otherwise looks names up and probes every instance
    /// now, and fails with `UNAVAILABLE` naming each when none is usable. (A
    /// run is not accepted on health older than a probe interval.)
    pub async fn ensure_ready(self: &Arc<Self>) -> Result<(), Error> {
        // Health is fresh for a probe interval plus the time a probe round
        // may take, so the wait between two periodic rounds is never stale.
        let window = self.opts.health_interval + self.opts.connect_timeout;
        let window = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        let ready_now = || {
            let fresh = self.now_ns().saturating_sub(window);
            let endpoints = self.endpoints();
            // An instance never probed yet (just started, just joined) is
            // probed first, so that the run spreads over it too.
            let unknown = endpoints.iter().any(|ep| ep.state.load(Ordering::Relaxed) == UNKNOWN);
            !unknown && endpoints.iter().any(|ep| ep.usable() && ep.last_ok.load(Ordering::Relaxed) >= fresh)
        };
        if ready_now() {
            return Ok(());
        }
        // One round at a time; a run that waited for another's round looks
        // at its outcome before starting its own.
        let _round = self.ready_round.lock().await;
        if ready_now() {
            return Ok(());
        }
        let resolved = tokio::time::timeout(self.opts.connect_timeout, self.resolve_all()).await;
        let results = self.probe_all().await;
        if self.endpoints().iter().any(|ep| ep.usable()) {
            return Ok(());
        }
        let mut why: Vec<String> = results
            .into_iter()
            .filter(|(ep, _)| !ep.removed.load(Ordering::Relaxed))
            .map(|(ep, r)| format!("{} ({})", ep.url, r.err().unwrap_or_else(|| "not described".into())))
            .collect();
        match resolved {
            Err(_) => why.push("name lookups timed out".into()),
            Ok(failures) => why.extend(failures),
        }
        Err(Error::Unavailable(format!("no reachable processor: {}", why.join(", "))))
    }

    /// Probes every instance each `interval`, and soon after a failure (at
    /// most every 250 ms) or a new instance, until `stop` or the balancer is
    /// dropped, so a down instance comes back once it answers again and a
    /// new one is described before it gets work.
    pub fn spawn_health_checks(self: &Arc<Self>, interval: Duration, stop: CancellationToken) {
        let soon: fn(&Self) -> &Notify = |b| &b.probe_soon;
        self.spawn_rounds(interval, MIN_PROBE_GAP, soon, stop, |b| {
            Box::pin(async move { drop(b.probe_all().await) })
        });
    }

    /// Runs `round` now, then again every `interval`, or sooner when
    /// `soon(self)` is notified (at most once per `gap`), until `stop` is
    /// cancelled or the balancer is dropped.
    pub(super) fn spawn_rounds(
        self: &Arc<Self>,
        interval: Duration,
        gap: Duration,
        soon: fn(&Self) -> &Notify,
        stop: CancellationToken,
        round: fn(Arc<Self>) -> BoxFuture<'static, ()>,
    ) {
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(b) = weak.upgrade() else { return };
                round(b.clone()).await;
                let sooner = async {
                    tokio::time::sleep(gap).await;
                    soon(&b).notified().await;
                };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                    _ = sooner => {}
                }
            }
        });
    }
}

/// `host:port` → `http://host:port`; URLs with a scheme are kept.
pub fn normalize_url(raw: &str) -> String {
    let raw = raw.trim();
    if raw.contains("://") { raw.to_owned() } else { format!("http://{raw}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(connect_ms: u64) -> ConnectOptions {
        ConnectOptions {
            connect_timeout: Duration::from_millis(connect_ms),
            health_interval: Duration::from_secs(1),
            http2_keepalive: None,
            bearer: None,
            tls: None,
        }
    }

    /// Position of the lease's instance in the balancer's list.
    fn pos(b: &Balancer, l: &Lease) -> usize {
        b.endpoints().iter().position(|e| e.id == l.endpoint_id()).unwrap()
    }

    fn id(b: &Balancer, i: usize) -> u64 {
        b.endpoints()[i].id
    }

    fn balancer(slots: &[usize]) -> Arc<Balancer> {
        let urls: Vec<String> = (0..slots.len()).map(|i| format!("127.0.0.1:{}", 1 + i)).collect();
        let b = Balancer::new(&urls, opts(100)).unwrap();
        for (ep, &s) in b.endpoints().iter().zip(slots) {
            ep.slots.store(s, Ordering::Relaxed);
            ep.state.store(UP, Ordering::Relaxed);
        }
        Arc::new(b)
    }

    #[tokio::test]
    async fn picks_least_loaded_then_rotates() {
        let b = balancer(&[4, 4, 4]);
        let q = b.run_queue();
        let mut leases = Vec::new();
        for _ in 0..6 {
            leases.push(q.acquire(None).await.unwrap());
        }
        let mut per = [0; 3];
        for l in &leases {
            per[pos(&b, l)] += 1;
        }
        assert_eq!(per, [2, 2, 2], "equal instances share the work");
        drop(leases);
        assert!(b.endpoints().iter().all(|e| e.in_flight() == 0), "leases release on drop");
    }

    #[tokio::test]
    async fn shares_work_in_proportion_to_slots() {
        let b = balancer(&[1, 2]);
        let q = b.run_queue();
        let leases =
            [q.acquire(None).await.unwrap(), q.acquire(None).await.unwrap(), q.acquire(None).await.unwrap()];
        let mut per = [0; 2];
        for l in &leases {
            per[pos(&b, l)] += 1;
        }
        assert_eq!(per, [1, 2]);
        // Full: the next attempt waits until a slot frees.
        let waiting = q.acquire(None);
        tokio::pin!(waiting);
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        assert_eq!(b.waiting(), 1);
        let [a, _, _] = leases;
        let freed = a.endpoint_id();
        drop(a);
        let got = tokio::time::timeout(Duration::from_secs(1), waiting).await.unwrap().unwrap();
        assert_eq!(got.endpoint_id(), freed);
    }

    #[tokio::test]
    async fn runs_take_turns_for_free_slots() {
        let b = balancer(&[1]);
        let (big, small) = (b.run_queue(), b.run_queue());
        let held = big.acquire(None).await.unwrap();
        // The big run queues many attempts before the small run queues one.
        let mut big_waiting: Vec<_> = (0..10).map(|_| Box::pin(big.acquire(None))).collect();
        for w in &mut big_waiting {
            assert!(futures::poll!(w.as_mut()).is_pending());
        }
        let mut small_waiting = Box::pin(small.acquire(None));
        assert!(futures::poll!(small_waiting.as_mut()).is_pending());
        drop(held);
        // One slot: the big run's oldest attempt gets it (its turn came first).
        let first =
            tokio::time::timeout(Duration::from_secs(1), big_waiting.remove(0)).await.unwrap().unwrap();
        drop(first);
        // Next turn is the small run's, not the big run's second attempt.
        let got = tokio::time::timeout(Duration::from_secs(1), small_waiting).await.unwrap().unwrap();
        assert_eq!(pos(&b, &got), 0);
        assert!(futures::poll!(big_waiting[0].as_mut()).is_pending());
    }

    #[tokio::test]
    async fn avoids_down_and_the_failed_instance() {
        let b = balancer(&[4, 4, 4]);
        let q = b.run_queue();
        b.endpoints()[0].set_state(DOWN, "test");
        for _ in 0..10 {
            let l = q.acquire(Some(id(&b, 1))).await.unwrap();
            assert_eq!(pos(&b, &l), 2);
        }
        // With every other choice down, the avoided one is still better than nothing.
        b.endpoints()[2].set_state(DOWN, "test");
        let l = q.acquire(Some(id(&b, 1))).await.unwrap();
        assert_eq!(pos(&b, &l), 1);
        drop(l);
        // Every instance down: once a probe round confirms it (nothing
        // listens on these ports), waiting would be forever, so it fails.
        b.mark_down(&b.endpoints()[1], "test");
        b.spawn_health_checks(Duration::from_secs(60), CancellationToken::new());
        let err = tokio::time::timeout(Duration::from_secs(5), q.acquire(None)).await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
    }

    #[tokio::test]
    async fn waiting_attempts_fail_when_every_instance_goes_down() {
        let b = balancer(&[1]);
        let q = b.run_queue();
        let held = q.acquire(None).await.unwrap();
        let waiting = q.acquire(None);
        tokio::pin!(waiting);
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        b.mark_down(&b.endpoints()[0], "test");
        // A lost connection alone does not fail it: it waits for a probe.
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        b.spawn_health_checks(Duration::from_secs(60), CancellationToken::new());
        let err = tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        drop(held);
    }

    #[tokio::test]
    async fn no_reachable_processor_is_unavailable() {
        // Bind and drop to find a port with nothing listening.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let b = Arc::new(Balancer::new(&[format!("127.0.0.1:{port}")], opts(500)).unwrap());
        let err = b.ensure_ready().await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(err.to_string().contains(&port.to_string()), "{err}");
    }

    #[test]
    fn https_without_tls_settings_is_refused() {
        let err = Balancer::new(&["https://p:1".into()], opts(1000)).unwrap_err();
        assert!(err.to_string().contains("TLS") && err.to_string().contains("https://p:1"), "{err}");
    }
}
