//! Instance choice and capacity: which processor gets the next attempt, and
//! when.
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
//! Not tonic's `balance_list` (random p2c over a load that is always 0, which
//! keeps choosing dead endpoints and waits forever when none is ready). Each
//! instance has two connections: one for records, one for health probes and
//! `Describe`, so a probe never queues behind record traffic.

use super::wire::ProcessRecordWire;
use crate::error::Error;
use crate::processor::is_not_started;
use crate::proto::record_processor_client::RecordProcessorClient;
use crate::proto::{DescribeRequest, ProcessRecordResponse};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint as ChannelEndpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tracing::{debug, info, warn};

/// The service name processors report health for.
pub const PROCESSOR_SERVICE: &str = "fanout.v1.RecordProcessor";

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

/// One processor instance.
#[derive(Debug)]
pub struct Endpoint {
    /// The endpoint URL, as configured (normalised to `http://…`).
    pub url: String,
    calls: tonic::client::Grpc<Channel>,
    probes: Channel,
    /// Leases held; changed only under the scheduler's lock.
    in_flight: AtomicUsize,
    /// From `Describe`; 0 until described (no work before that).
    slots: AtomicUsize,
    state: AtomicU8,
    /// When it last answered (a probe or a call), as nanoseconds since the
    /// balancer's origin; 0 = never.
    last_ok: AtomicU64,
    warned_no_describe: AtomicBool,
}

impl Endpoint {
    /// Calls in flight to this instance.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Slots the instance advertised (0 until described).
    pub fn slots(&self) -> usize {
        self.slots.load(Ordering::Relaxed)
    }

    /// Whether the last probe or call found it unreachable or not serving.
    pub fn is_down(&self) -> bool {
        self.state.load(Ordering::Relaxed) == DOWN
    }

    /// Up and described: it may be given work.
    fn usable(&self) -> bool {
        self.state.load(Ordering::Relaxed) == UP && self.slots() > 0
    }

    /// Sets the state; `true` when it changed.
    fn set_state(&self, state: u8) -> bool {
        let old = self.state.swap(state, Ordering::Relaxed);
        if old != state {
            match state {
                UP => info!(processor = %self.url, slots = self.slots(), "processor is up"),
                _ => warn!(processor = %self.url, "processor is down"),
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
    /// Waits for a slot (see the [module docs](self)); `avoid` is the
    /// instance the record just failed on, taken only when no other has
    /// room. `UNAVAILABLE` when a round of health probes finds every
    /// instance down (one is asked for at once when they all look down, so
    /// one lost connection does not fail a record before a probe has had
    /// its say).
    pub async fn acquire(&self, avoid: Option<usize>) -> Result<Lease, Error> {
        let b = &self.balancer;
        let rx = {
            let mut sched = b.sched();
            // Nobody waiting: no one to be fair to.
            if sched.ring.is_empty()
                && let Some(i) = b.choose(avoid, &mut sched.rotate)
            {
                return Ok(b.lease_locked(i));
            }
            if b.all_down() {
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
    avoid: Option<usize>,
}

/// Waiting attempts, per run, and the order runs take turns in.
#[derive(Debug, Default)]
struct Sched {
    queues: HashMap<u64, VecDeque<Waiter>>,
    /// Runs with waiters, next to serve first.
    ring: VecDeque<u64>,
    rotate: usize,
}

/// The set of processor instances a pipeline spreads records over.
#[derive(Debug)]
pub struct Balancer {
    endpoints: Vec<Arc<Endpoint>>,
    sched: Mutex<Sched>,
    next_run: AtomicU64,
    probe_timeout: Duration,
    health_interval: Duration,
    origin: Instant,
    probe_soon: Notify,
}

/// A slot on a chosen instance; counts as in flight until dropped, and then
/// goes to the next waiting attempt.
#[derive(Debug)]
pub struct Lease {
    balancer: Arc<Balancer>,
    endpoint: Arc<Endpoint>,
    /// Position of the endpoint in the balancer.
    pub index: usize,
    /// False for a lease that was never handed out (its waiter had gone).
    armed: bool,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.armed {
            self.balancer.release(self.index);
        }
    }
}

/// How one call ended, beyond success.
#[derive(Debug)]
pub enum CallError {
    /// The processor refused the record before starting it (it was full):
    /// sending it again is not a new attempt.
    NotStarted(tonic::Status),
    /// The attempt failed with this status.
    Failed(tonic::Status),
}

impl Lease {
    /// The endpoint's URL.
    pub fn url(&self) -> &str {
        &self.endpoint.url
    }

    /// One `ProcessRecord` call bounded by `timeout`, which also travels as
    /// the call's `grpc-timeout` so the processor stops the record's units
    /// when it passes even if the cancellation never reaches it. (tonic's own
    /// client timeouts surface as `CANCELLED` and bound only the time to
    /// headers, so the bound that decides is here.) Dropping the future
    /// cancels the call on the processor.
    pub async fn process(
        &self,
        req: ProcessRecordWire,
        timeout: Duration,
    ) -> Result<ProcessRecordResponse, CallError> {
        let ep = &self.endpoint;
        let mut grpc = ep.calls.clone();
        let call = async {
            grpc.ready()
                .await
                .map_err(|e| tonic::Status::unavailable(format!("{}: not ready: {e}", ep.url)))?;
            let mut request = tonic::Request::new(req);
            request.set_timeout(timeout);
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(
                "/fanout.v1.RecordProcessor/ProcessRecord",
            );
            grpc.unary(
                request,
                path,
                tonic_prost::ProstCodec::<ProcessRecordWire, ProcessRecordResponse>::default(),
            )
            .await
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(resp)) => {
                self.balancer.answered(self.index);
                Ok(resp.into_inner())
            }
            Ok(Err(status)) if is_not_started(&status) => {
                self.balancer.answered(self.index);
                Err(CallError::NotStarted(status))
            }
            Ok(Err(status))
                if status.code() == tonic::Code::Cancelled && status.message() == "Timeout expired" =>
            {
                // Our grpc-timeout, enforced by tonic on either side (the
                // client's channel reports it with a transport source): the
                // attempt timed out, the instance is fine.
                Err(CallError::Failed(tonic::Status::deadline_exceeded(format!(
                    "attempt timed out after {timeout:?} on {}",
                    ep.url
                ))))
            }
            Ok(Err(status)) => {
                // A status with a source came from the transport (refused,
                // reset, closed), not from the processor's handler.
                if std::error::Error::source(&status).is_some() {
                    debug!(processor = %ep.url, error = %status, "transport failure");
                    self.balancer.mark_down(self.index);
                    // hyper reports a call whose connection died under it
                    // (the instance crashed) as "operation was canceled",
                    // which tonic maps to CANCELLED; that is the instance
                    // being unavailable, and worth another attempt elsewhere.
                    if status.code() == tonic::Code::Cancelled {
                        return Err(CallError::Failed(tonic::Status::unavailable(format!(
                            "{} ({}: connection lost)",
                            status.message(),
                            ep.url
                        ))));
                    }
                } else {
                    self.balancer.answered(self.index);
                }
                Err(CallError::Failed(status))
            }
            Err(_) => Err(CallError::Failed(tonic::Status::deadline_exceeded(format!(
                "attempt timed out after {timeout:?} on {}",
                ep.url
            )))),
        }
    }
}

impl Balancer {
    /// Endpoints for these URLs (`host:port` gets `http://`). Connections are
    /// opened lazily with `connect_timeout`; nothing is dialled here.
    /// `https://` is refused: TLS to processors is not built yet, and
    /// speaking plaintext to an `https://` URL would be a silent downgrade.
    pub fn new(urls: &[String], connect_timeout: Duration, health_interval: Duration) -> Result<Self, Error> {
        if urls.is_empty() {
            return Err(Error::Config("no processor endpoints (--processors / FANOUT_PROCESSORS)".into()));
        }
        let endpoints = urls
            .iter()
            .map(|raw| {
                let url = normalize_url(raw);
                if !url.starts_with("http://") {
                    return Err(Error::Config(format!(
                        "processor endpoint {raw:?}: only http:// is supported (TLS to processors is not built yet)"
                    )));
                }
                let endpoint = ChannelEndpoint::from_shared(url.clone())
                    .map_err(|e| Error::Config(format!("processor endpoint {raw:?}: {e}")))?
                    .connect_timeout(connect_timeout)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(20))
                    .keep_alive_timeout(Duration::from_secs(10));
                let calls = tonic::client::Grpc::new(endpoint.connect_lazy())
                    .max_decoding_message_size(MAX_RESPONSE_BYTES)
                    .max_encoding_message_size(usize::MAX);
                Ok(Arc::new(Endpoint {
                    url,
                    calls,
                    probes: endpoint.connect_lazy(),
                    in_flight: AtomicUsize::new(0),
                    slots: AtomicUsize::new(0),
                    state: AtomicU8::new(UNKNOWN),
                    last_ok: AtomicU64::new(0),
                    warned_no_describe: AtomicBool::new(false),
                }))
            })
            .collect::<Result<_, Error>>()?;
        Ok(Self {
            endpoints,
            sched: Mutex::default(),
            next_run: AtomicU64::new(1),
            probe_timeout: connect_timeout,
            health_interval,
            origin: Instant::now(),
            probe_soon: Notify::new(),
        })
    }

    /// The endpoints, in configured order.
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// A new run's place in the rotation.
    pub fn run_queue(self: &Arc<Self>) -> RunQueue {
        RunQueue { id: self.next_run.fetch_add(1, Ordering::Relaxed), balancer: self.clone() }
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

    /// The instance for the next attempt, under the scheduler's lock: among
    /// usable ones with a free slot, not `avoid` if another has room, then
    /// the lowest share of slots in use; ties rotate so equal instances
    /// share the work.
    fn choose(&self, avoid: Option<usize>, rotate: &mut usize) -> Option<usize> {
        let n = self.endpoints.len();
        let start = *rotate;
        *rotate = rotate.wrapping_add(1);
        let mut best: Option<(usize, bool, usize, usize)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            let ep = &self.endpoints[i];
            let (used, slots) = (ep.in_flight(), ep.slots());
            if !ep.usable() || used >= slots {
                continue;
            }
            let avoided = Some(i) == avoid;
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
        best.map(|(i, ..)| i)
    }

    fn lease_locked(self: &Arc<Self>, index: usize) -> Lease {
        let endpoint = self.endpoints[index].clone();
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        Lease { balancer: self.clone(), endpoint, index, armed: true }
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
            let Some(index) = self.choose(avoid, &mut sched.rotate) else { return };
            let waiter = queue.pop_front().expect("checked non-empty");
            let more = !queue.is_empty();
            sched.ring.pop_front();
            if more {
                sched.ring.push_back(run);
            } else {
                sched.queues.remove(&run);
            }
            if let Err(mut lease) = waiter.tx.send(self.lease_locked(index)) {
                // Gone between the check and now: take the slot back here
                // (dropping it armed would re-enter this lock).
                lease.armed = false;
                lease.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    fn release(self: &Arc<Self>, index: usize) {
        let mut sched = self.sched();
        self.endpoints[index].in_flight.fetch_sub(1, Ordering::Relaxed);
        self.dispatch_locked(&mut sched);
    }

    /// After a change of state or slots: hand out what became free; and,
    /// after a probe round (`confirmed`) that left every instance down, fail
    /// the waiting attempts (each is then retried, or fails, as a transient
    /// failure).
    fn refresh(self: &Arc<Self>, confirmed: bool) {
        let mut sched = self.sched();
        if self.all_down() {
            if !confirmed {
                return;
            }
            if !sched.queues.is_empty() {
                warn!(
                    waiting = sched.queues.values().map(VecDeque::len).sum::<usize>(),
                    "every processor is down"
                );
            }
            sched.queues.clear();
            sched.ring.clear();
        } else {
            self.dispatch_locked(&mut sched);
        }
    }

    fn all_down(&self) -> bool {
        self.endpoints.iter().all(|e| e.is_down())
    }

    fn none_up(&self) -> Error {
        let urls: Vec<&str> = self.endpoints.iter().map(|e| e.url.as_str()).collect();
        Error::Unavailable(format!("no processor is up ({})", urls.join(", ")))
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1)
    }

    /// A call was answered by the processor's handler: it is reachable.
    fn answered(self: &Arc<Self>, index: usize) {
        let ep = &self.endpoints[index];
        ep.last_ok.store(self.now_ns(), Ordering::Relaxed);
        if ep.set_state(UP) {
            self.refresh(false);
        }
    }

    /// A call failed in the transport: no new work until a probe says
    /// otherwise, and probe soon.
    fn mark_down(self: &Arc<Self>, index: usize) {
        if self.endpoints[index].set_state(DOWN) {
            self.refresh(false);
        }
        self.probe_soon.notify_one();
    }

    /// Probes one instance: health, then `Describe` for its slots.
    async fn probe(self: &Arc<Self>, index: usize) -> Result<(), String> {
        let ep = &self.endpoints[index];
        let check = async {
            let mut health = HealthClient::new(ep.probes.clone());
            let req = HealthCheckRequest { service: PROCESSOR_SERVICE.into() };
            let resp = health.check(req).await.map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
            if resp.get_ref().status != ServingStatus::Serving as i32 {
                return Err(format!("health status {:?}", resp.get_ref().status()));
            }
            let mut describe = RecordProcessorClient::new(ep.probes.clone());
            let slots = match describe.describe(DescribeRequest {}).await {
                Ok(d) => d.into_inner().slots as usize,
                Err(s) if s.code() == tonic::Code::Unimplemented => {
                    if !ep.warned_no_describe.swap(true, Ordering::Relaxed) {
                        warn!(processor = %ep.url, slots = FALLBACK_SLOTS, "processor has no Describe; assuming slots");
                    }
                    FALLBACK_SLOTS
                }
                Err(s) => return Err(format!("Describe: {:?}: {}", s.code(), s.message())),
            };
            Ok(slots.max(1))
        };
        let result = match tokio::time::timeout(self.probe_timeout, check).await {
            Err(_) => Err(format!("health check timed out after {:?}", self.probe_timeout)),
            Ok(r) => r,
        };
        let changed = match result {
            Ok(slots) => {
                ep.last_ok.store(self.now_ns(), Ordering::Relaxed);
                let resized = ep.slots.swap(slots, Ordering::Relaxed) != slots;
                ep.set_state(UP) || resized
            }
            Err(_) => ep.set_state(DOWN),
        };
        if changed {
            self.refresh(false);
        }
        result.map(drop)
    }

    /// Probes every instance at once.
    pub async fn probe_all(self: &Arc<Self>) -> Vec<Result<(), String>> {
        let results = futures::future::join_all((0..self.endpoints.len()).map(|i| self.probe(i))).await;
        self.refresh(true);
        results
    }

    /// Succeeds when some instance is usable and answered within the last
    /// health interval; otherwise probes them all now and fails with
    /// `UNAVAILABLE` naming each when none is usable. (A run is not accepted
    /// on health older than a probe interval.)
    pub async fn ensure_ready(self: &Arc<Self>) -> Result<(), Error> {
        let fresh =
            self.now_ns().saturating_sub(u64::try_from(self.health_interval.as_nanos()).unwrap_or(u64::MAX));
        if self.endpoints.iter().any(|ep| ep.usable() && ep.last_ok.load(Ordering::Relaxed) >= fresh) {
            return Ok(());
        }
        let results = self.probe_all().await;
        if self.endpoints.iter().any(|ep| ep.usable()) {
            return Ok(());
        }
        let why: Vec<String> = self
            .endpoints
            .iter()
            .zip(results)
            .map(|(ep, r)| format!("{} ({})", ep.url, r.err().unwrap_or_else(|| "not described".into())))
            .collect();
        Err(Error::Unavailable(format!("no reachable processor: {}", why.join(", "))))
    }

    /// Probes every instance each `interval`, and soon after a call's
    /// transport failure (at most every 250 ms), until `stop` or the
    /// balancer is dropped, so a down instance comes back once it answers
    /// again and a new one is described before it gets work.
    pub fn spawn_health_checks(self: &Arc<Self>, interval: Duration, stop: CancellationToken) {
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(b) = weak.upgrade() else { return };
                drop(b.probe_all().await);
                let soon = async {
                    tokio::time::sleep(MIN_PROBE_GAP).await;
                    b.probe_soon.notified().await;
                };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                    _ = soon => {}
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

    fn balancer(slots: &[usize]) -> Arc<Balancer> {
        let urls: Vec<String> = (0..slots.len()).map(|i| format!("127.0.0.1:{}", 1 + i)).collect();
        let b = Balancer::new(&urls, Duration::from_millis(100), Duration::from_secs(1)).unwrap();
        for (ep, &s) in b.endpoints.iter().zip(slots) {
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
            per[l.index] += 1;
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
            per[l.index] += 1;
        }
        assert_eq!(per, [1, 2]);
        // Full: the next attempt waits until a slot frees.
        let waiting = q.acquire(None);
        tokio::pin!(waiting);
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        assert_eq!(b.waiting(), 1);
        let [a, _, _] = leases;
        let freed = a.index;
        drop(a);
        let got = tokio::time::timeout(Duration::from_secs(1), waiting).await.unwrap().unwrap();
        assert_eq!(got.index, freed);
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
        assert_eq!(got.index, 0);
        assert!(futures::poll!(big_waiting[0].as_mut()).is_pending());
    }

    #[tokio::test]
    async fn avoids_down_and_the_failed_instance() {
        let b = balancer(&[4, 4, 4]);
        let q = b.run_queue();
        b.endpoints[0].set_state(DOWN);
        for _ in 0..10 {
            assert_eq!(q.acquire(Some(1)).await.unwrap().index, 2);
        }
        // With every other choice down, the avoided one is still better than nothing.
        b.endpoints[2].set_state(DOWN);
        assert_eq!(q.acquire(Some(1)).await.unwrap().index, 1);
        // Every instance down: once a probe round confirms it (nothing
        // listens on these ports), waiting would be forever, so it fails.
        b.mark_down(1);
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
        b.mark_down(0);
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
        let b = Arc::new(
            Balancer::new(&[format!("127.0.0.1:{port}")], Duration::from_millis(500), Duration::from_secs(1))
                .unwrap(),
        );
        let err = b.ensure_ready().await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(err.to_string().contains(&port.to_string()), "{err}");
    }

    #[test]
    fn https_is_refused_until_tls_exists() {
        let err = Balancer::new(&["https://p:1".into()], Duration::from_secs(1), Duration::from_secs(1))
            .unwrap_err();
        assert!(err.to_string().contains("only http://"), "{err}");
    }
}
