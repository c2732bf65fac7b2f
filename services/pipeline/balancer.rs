//! Instance choice: least in-flight among healthy processors.
//!
//! Not tonic's `balance_list` (random p2c over a load that is always 0, which
//! keeps choosing dead endpoints and waits forever when none is ready): each
//! endpoint has its own channel, an in-flight count and a health state fed
//! both by periodic `grpc.health.v1` probes and by call failures.

use crate::error::Error;
use crate::proto::record_processor_client::RecordProcessorClient;
use crate::proto::{ProcessRecordRequest, ProcessRecordResponse};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tracing::{debug, info, warn};

/// The service name processors report health for.
pub const PROCESSOR_SERVICE: &str = "fanout.v1.RecordProcessor";

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// One processor instance.
#[derive(Debug)]
pub struct Endpoint {
    /// The endpoint URL, as configured (normalised to `http://…`).
    pub url: String,
    client: RecordProcessorClient<Channel>,
    health: HealthClient<Channel>,
    in_flight: AtomicUsize,
    state: AtomicU8,
}

impl Endpoint {
    /// Calls in flight to this instance.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether the last probe or call found it unreachable or not serving.
    pub fn is_down(&self) -> bool {
        self.state.load(Ordering::Relaxed) == DOWN
    }

    fn set_state(&self, state: u8) {
        let old = self.state.swap(state, Ordering::Relaxed);
        if old != state {
            match state {
                UP => info!(processor = %self.url, "processor is up"),
                _ => warn!(processor = %self.url, "processor is down"),
            }
        }
    }

    /// Probes health once; updates and returns whether it is serving.
    async fn probe(&self, timeout: Duration) -> Result<(), String> {
        let mut health = self.health.clone();
        let req = HealthCheckRequest { service: PROCESSOR_SERVICE.into() };
        let result = match tokio::time::timeout(timeout, health.check(req)).await {
            Err(_) => Err(format!("health check timed out after {timeout:?}")),
            Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
            Ok(Ok(resp)) if resp.get_ref().status == ServingStatus::Serving as i32 => Ok(()),
            Ok(Ok(resp)) => Err(format!("health status {:?}", resp.get_ref().status())),
        };
        self.set_state(if result.is_ok() { UP } else { DOWN });
        result
    }
}

/// The set of processor instances a pipeline spreads records over.
#[derive(Debug)]
pub struct Balancer {
    endpoints: Vec<Arc<Endpoint>>,
    next: AtomicUsize,
    probe_timeout: Duration,
}

/// A chosen instance; counts as in flight until dropped.
#[derive(Debug)]
pub struct Lease {
    endpoint: Arc<Endpoint>,
    /// Position of the endpoint in the balancer.
    pub index: usize,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Lease {
    /// The endpoint's URL.
    pub fn url(&self) -> &str {
        &self.endpoint.url
    }

    /// One `ProcessRecord` call bounded by `timeout` (tonic's own timeouts
    /// surface as `CANCELLED` and bound only time to headers, so the bound is
    /// here). Dropping the future cancels the call on the processor.
    pub async fn process(
        &self,
        req: ProcessRecordRequest,
        timeout: Duration,
    ) -> Result<ProcessRecordResponse, tonic::Status> {
        let mut client = self.endpoint.client.clone();
        match tokio::time::timeout(timeout, client.process_record(req)).await {
            Ok(Ok(resp)) => {
                self.endpoint.set_state(UP);
                Ok(resp.into_inner())
            }
            Ok(Err(status)) => {
                // A status with a source came from the transport (refused,
                // reset, closed), not from the processor's handler.
                if std::error::Error::source(&status).is_some() {
                    debug!(processor = %self.endpoint.url, error = %status, "transport failure");
                    self.endpoint.set_state(DOWN);
                    // hyper reports a call whose connection died under it
                    // (the instance crashed) as "operation was canceled",
                    // which tonic maps to CANCELLED; that is the instance
                    // being unavailable, and worth another attempt elsewhere.
                    if status.code() == tonic::Code::Cancelled {
                        return Err(tonic::Status::unavailable(format!(
                            "{} ({}: connection lost)",
                            status.message(),
                            self.endpoint.url
                        )));
                    }
                }
                Err(status)
            }
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "attempt timed out after {timeout:?} on {}",
                self.endpoint.url
            ))),
        }
    }
}

impl Balancer {
    /// Endpoints for these URLs (`host:port` gets `http://`). Connections are
    /// opened lazily with `connect_timeout`; nothing is dialled here.
    pub fn new(urls: &[String], connect_timeout: Duration) -> Result<Self, Error> {
        if urls.is_empty() {
            return Err(Error::Config("no processor endpoints (--processors / FANOUT_PROCESSORS)".into()));
        }
        let endpoints = urls
            .iter()
            .map(|raw| {
                let url = normalize_url(raw);
                let channel = Channel::from_shared(url.clone())
                    .map_err(|e| Error::Config(format!("processor endpoint {raw:?}: {e}")))?
                    .connect_timeout(connect_timeout)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(20))
                    .keep_alive_timeout(Duration::from_secs(10))
                    .connect_lazy();
                Ok(Arc::new(Endpoint {
                    url,
                    client: RecordProcessorClient::new(channel.clone())
                        .max_decoding_message_size(usize::MAX)
                        .max_encoding_message_size(usize::MAX),
                    health: HealthClient::new(channel),
                    in_flight: AtomicUsize::new(0),
                    state: AtomicU8::new(UNKNOWN),
                }))
            })
            .collect::<Result<_, Error>>()?;
        Ok(Self { endpoints, next: AtomicUsize::new(0), probe_timeout: connect_timeout })
    }

    /// The endpoints, in configured order.
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// Picks an instance: healthy before down, not `avoid` (the instance the
    /// record just failed on) when another exists, then least in flight;
    /// ties rotate so equal instances share the work.
    pub fn pick(&self, avoid: Option<usize>) -> Lease {
        let n = self.endpoints.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let index = (0..n)
            .map(|k| (start + k) % n)
            .min_by_key(|&i| {
                let ep = &self.endpoints[i];
                (ep.is_down(), Some(i) == avoid, ep.in_flight())
            })
            .expect("a balancer has at least one endpoint");
        let endpoint = self.endpoints[index].clone();
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        Lease { endpoint, index }
    }

    /// Probes every instance at once.
    pub async fn probe_all(&self) -> Vec<Result<(), String>> {
        futures::future::join_all(self.endpoints.iter().map(|ep| ep.probe(self.probe_timeout))).await
    }

    /// Succeeds when some instance is known up; otherwise probes them all
    /// now and fails with `UNAVAILABLE` naming each when none answers.
    pub async fn ensure_ready(&self) -> Result<(), Error> {
        if self.endpoints.iter().any(|ep| ep.state.load(Ordering::Relaxed) == UP) {
            return Ok(());
        }
        let results = self.probe_all().await;
        if results.iter().any(Result::is_ok) {
            return Ok(());
        }
        let why: Vec<String> = self
            .endpoints
            .iter()
            .zip(results)
            .map(|(ep, r)| format!("{} ({})", ep.url, r.unwrap_err()))
            .collect();
        Err(Error::Unavailable(format!("no reachable processor: {}", why.join(", "))))
    }

    /// Probes every instance each `interval` until `stop` or the balancer is
    /// dropped, so a down instance comes back once it answers again.
    pub fn spawn_health_checks(self: &Arc<Self>, interval: Duration, stop: CancellationToken) {
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                match weak.upgrade() {
                    Some(b) => drop(b.probe_all().await),
                    None => return,
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
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

    fn balancer(n: usize) -> Balancer {
        let urls: Vec<String> = (0..n).map(|i| format!("127.0.0.1:{}", 1 + i)).collect();
        Balancer::new(&urls, Duration::from_millis(100)).unwrap()
    }

    #[tokio::test]
    async fn picks_least_loaded_then_rotates() {
        let b = balancer(3);
        let leases: Vec<Lease> = (0..6).map(|_| b.pick(None)).collect();
        let mut per = [0; 3];
        for l in &leases {
            per[l.index] += 1;
        }
        assert_eq!(per, [2, 2, 2], "equal instances share the work");
        drop(leases);
        assert!(b.endpoints().iter().all(|e| e.in_flight() == 0), "leases release on drop");
    }

    #[tokio::test]
    async fn avoids_down_and_the_failed_instance() {
        let b = balancer(3);
        b.endpoints[0].set_state(DOWN);
        for _ in 0..10 {
            let l = b.pick(Some(1));
            assert_eq!(l.index, 2);
        }
        // With every other choice down, the avoided one is still better than nothing.
        b.endpoints[2].set_state(DOWN);
        assert_eq!(b.pick(Some(1)).index, 1);
    }

    #[tokio::test]
    async fn no_reachable_processor_is_unavailable() {
        // Bind and drop to find a port with nothing listening.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let b = Balancer::new(&[format!("127.0.0.1:{port}")], Duration::from_millis(500)).unwrap();
        let err = b.ensure_ready().await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(err.to_string().contains(&port.to_string()), "{err}");
    }
}
