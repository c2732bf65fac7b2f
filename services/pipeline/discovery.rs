//! Where processor instances come from: the `--processors` entries, with
//! names looked up (and looked up again) through the system's resolver.
//!
//! - `http://10.0.0.5:50052` (or `10.0.0.5:50052`): one instance.
//! - `dns:///NAME:PORT`, or `http://NAME:PORT`: every A/AAAA address of
//!   NAME is an instance (a Kubernetes headless Service lists each ready
//!   pod). NAME is looked up as every program on the host would (its
//!   `/etc/resolv.conf` and `/etc/hosts`, through `getaddrinfo`), again
//!   every `--resolve-interval`, and within a second of a transport failure.
//!   Each lookup is diffed into the [`Balancer`]: new addresses are probed
//!   and described, then get work (runs in progress included); addresses
//!   gone take no new work, and their in-flight attempts finish. A failed
//!   or empty lookup keeps the last good set, and says why in the log.
//!
//! The lookup is behind [`Resolve`], so tests can drive membership.

use super::balancer::Balancer;
use crate::error::Error;
use futures::future::BoxFuture;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Shortest time between two lookups of the same names.
const MIN_RESOLVE_GAP: Duration = Duration::from_secs(1);

/// Longest a lookup may take (getaddrinfo's own retries are per
/// `/etc/resolv.conf`, and may add up to much more).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Looks a name up: every address it has, for this port.
pub trait Resolve: Send + Sync + 'static {
    /// The addresses of `host` (A and AAAA records, hosts file), with `port`.
    fn resolve(&self, host: &str, port: u16) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>>;
}

/// The host's resolver: `getaddrinfo`, which reads `/etc/resolv.conf` and
/// `/etc/hosts` (so it also works in network namespaces with their own
/// `/etc/netns/NAME/resolv.conf`).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, host: &str, port: u16) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
        let host = host.to_owned();
        Box::pin(async move { Ok(tokio::net::lookup_host((host.as_str(), port)).await?.collect()) })
    }
}

/// One `--processors` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    raw: String,
    host: String,
    port: u16,
    fixed: Option<SocketAddr>,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl Target {
    /// Parses `dns:///NAME:PORT`, `http://HOST:PORT`, `https://HOST:PORT`
    /// or `HOST:PORT`. Whether an entry is dialled over TLS is decided by the
    /// pipeline's TLS settings ([`crate::tls::ProcessorTlsArgs`]).
    pub fn parse(raw: &str) -> Result<Self, Error> {
        let entry = raw.trim();
        let bad = |why: &str| Error::Config(format!("processor endpoint {entry:?}: {why}"));
        let rest = if let Some(rest) = entry.strip_prefix("dns:///") {
            rest
        } else if entry.starts_with("dns://") {
            return Err(bad(
                "a DNS server in the URL (dns://SERVER/NAME) is not supported; use dns:///NAME:PORT",
            ));
        } else if let Some(rest) = entry.strip_prefix("http://").or_else(|| entry.strip_prefix("https://")) {
            rest.trim_end_matches('/')
        } else if entry.contains("://") {
            return Err(bad("only http://, https:// and dns:/// are supported"));
        } else {
            entry
        };
        let (host, port) = match rest.strip_prefix('[') {
            Some(v6) => v6.split_once("]:").ok_or_else(|| bad("expected [IPV6]:PORT"))?,
            None => rest.rsplit_once(':').ok_or_else(|| bad("expected HOST:PORT"))?,
        };
        if host.is_empty() || host.contains('/') {
            return Err(bad("expected HOST:PORT"));
        }
        let port: u16 = port.parse().map_err(|_| bad("the port must be a number from 1 to 65535"))?;
        if port == 0 {
            return Err(bad("the port must be a number from 1 to 65535"));
        }
        let fixed = host.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, port));
        Ok(Self { raw: entry.to_owned(), host: host.to_owned(), port, fixed })
    }

    /// The one address of an entry given as an IP, which needs no lookup.
    pub fn fixed_addr(&self) -> Option<SocketAddr> {
        self.fixed
    }

    /// The host of the entry (a name or an IP address): the name a
    /// processor's TLS certificate must carry.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The name looked up, for entries given by name.
    pub fn name(&self) -> Option<&str> {
        self.fixed.is_none().then_some(self.host.as_str())
    }
}

impl Balancer {
    /// Looks every name up once, now, and applies the answers. Returns what
    /// failed, one line each (the last good set stays in use for those).
    pub async fn resolve_all(self: &Arc<Self>) -> Vec<String> {
        // All names at once: one slow name must not hold up the others.
        let lookups = self.targets().iter().enumerate().filter_map(|(i, target)| {
            let name = target.name()?;
            let lookup = tokio::time::timeout(LOOKUP_TIMEOUT, self.resolver().resolve(name, target.port));
            Some(async move {
                let answer = lookup.await.unwrap_or_else(|_| {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer in {LOOKUP_TIMEOUT:?}"),
                    ))
                });
                (i, target, answer)
            })
        });
        let answers = futures::future::join_all(lookups).await;
        let mut failures = Vec::new();
        for (i, target, answer) in answers {
            match answer {
                Ok(mut addrs) if !addrs.is_empty() => {
                    addrs.sort();
                    addrs.dedup();
                    let (joined, left) = self.update_target(i, &addrs);
                    debug!(target = %target, addresses = addrs.len(), joined, left, "resolved");
                }
                Ok(_) => {
                    warn!(target = %target, "name lookup returned no address; keeping the last good set");
                    failures.push(format!("{target}: no address"));
                }
                Err(e) => {
                    warn!(target = %target, error = %e, "name lookup failed; keeping the last good set");
                    failures.push(format!("{target}: lookup failed: {e}"));
                }
            }
        }
        failures
    }

    /// Looks names up every `interval`, and within a second of a transport
    /// failure (at most once a second), until `stop` or the balancer is
    /// dropped. Nothing to do when every entry is an IP address.
    pub fn spawn_resolver(self: &Arc<Self>, interval: Duration, stop: CancellationToken) {
        if self.targets().iter().all(|t| t.name().is_none()) {
            return;
        }
        let soon: fn(&Self) -> &tokio::sync::Notify = |b| &b.resolve_soon;
        self.spawn_rounds(interval, MIN_RESOLVE_GAP, soon, stop, |b| {
            Box::pin(async move { drop(b.resolve_all().await) })
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_or_say_why() {
        let t = Target::parse("dns:///fanout-processor:50052").unwrap();
        assert_eq!((t.name(), t.port), (Some("fanout-processor"), 50052));
        let t = Target::parse("http://10.1.2.3:7").unwrap();
        assert_eq!(t.fixed_addr(), Some("10.1.2.3:7".parse().unwrap()));
        let t = Target::parse("[::1]:9").unwrap();
        assert_eq!(t.fixed_addr(), Some("[::1]:9".parse().unwrap()));
        let t = Target::parse("http://procs.example:50052/").unwrap();
        assert_eq!(t.name(), Some("procs.example"));
        for (bad, why) in [
            ("ftp://p:1", "https://"),
            ("dns://8.8.8.8/p:1", "dns:///NAME:PORT"),
            ("p", "HOST:PORT"),
            ("p:x", "port"),
            ("p:0", "port"),
            ("http://p:1/path", "port"),
        ] {
            let err = Target::parse(bad).unwrap_err().to_string();
            assert!(err.contains(why) && err.contains(bad), "{bad}: {err}");
        }
    }
}
