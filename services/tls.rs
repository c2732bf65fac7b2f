//! TLS on both hops, with rustls (ring provider; no OpenSSL).
//!
//! **Servers** (`--tls-cert`, `--tls-key`, `--tls-client-ca`, [`TlsArgs`]):
//! TLS 1.2 and 1.3, ALPN `h2`, terminated here in the accept path rather
//! than by tonic, so that certificates and client CAs can change without a
//! restart. [`ServerTls`] holds the live `rustls::ServerConfig` behind an
//! `ArcSwap`: every handshake takes the config current at that moment, and a
//! reload (files changed, polled every `--tls-reload-interval`; SIGHUP in
//! the binaries; [`ServerTls::reload`]) swaps in a new one. Open connections
//! keep the session they have. A reload that fails (unreadable file, bad
//! PEM, key not matching the certificate, bad CA) keeps the config in use
//! and logs a warning naming the file.
//!
//! Each accepted connection ([`Severable`]) is handshaken on a task of its
//! own ([`ServerIncoming`]), at most [`MAX_HANDSHAKES`] at once (past it,
//! the oldest gives way), each bounded by `--handshake-timeout` (which
//! covers the TLS handshake and the HTTP/2 preface after it: the
//! connection's watchdog times both), so a slow or garbage client never
//! holds up the accept loop. A plaintext HTTP/2
//! client on a TLS port is answered, for every call, `UNAVAILABLE` saying
//! TLS is required, and nothing reaches the services.
//!
//! With `--tls-client-ca`, clients must present a certificate issued by
//! one of those CAs (mTLS); one with none or another CA's is refused at the
//! handshake. The client's chain is in each request (`Request::peer_certs`).
//!
//! **The pipeline as a TLS client** ([`ProcessorTlsArgs`], [`ProcessorTls`]):
//! on when `--processor-tls`, `--processor-ca`, `--processor-cert` or an
//! `https://` processor entry is given; then every entry uses TLS (an
//! `http://` entry is refused, rather than mixing plaintext in). Processors
//! are verified against `--processor-ca`, or the system's roots (tonic's
//! `tls-native-roots`: the host's trust store, which operators already
//! manage, and `SSL_CERT_FILE`), for the name of the entry (`NAME` of
//! `dns:///NAME:PORT`, the host of `https://HOST:PORT`) even though each
//! instance is dialled at its resolved address; `--processor-tls-name`
//! overrides it. `--processor-cert`/`--processor-key` present a client
//! certificate. A failed handshake is a transport failure naming the
//! instance and why ([`connect_error_reason`]): the instance is down.
//! These files reload like a server's: [`ProcessorTls`] holds the live
//! `rustls::ClientConfig` behind an `ArcSwap`, and the balancer dials each
//! instance with a [`TlsDialer`] (TCP, then the handshake, with the config
//! current at that dial) instead of tonic's fixed `ClientTlsConfig`, so new
//! connections present a rotated client certificate; open ones keep their
//! session until they close (a processor's `--max-connection-age`).
//!
//! **Clients** ([`ClientTlsArgs`]): `--ca-cert`, `--cert`, `--key` for
//! `fanout run`.

use crate::config::ConnectionLimits;
use crate::config::FileStamp;
use crate::error::Error;
use crate::listener::{ConnInfo, Incoming, PrefaceCheck, Severable};
use arc_swap::ArcSwap;
use clap::Args;
use futures::stream::FuturesUnordered;
use futures::{Stream, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tracing::{debug, info, warn};

/// Most TLS handshakes in progress at once per server; past it, a new
/// connection closes the oldest one still handshaking. (Waiting for a slot
/// instead would let that many silent connections lock every client out
/// until they time out; a real handshake takes milliseconds, so it is
/// rarely the oldest.)
pub const MAX_HANDSHAKES: usize = 256;

/// Bound on a handshake when `--handshake-timeout` is 0 (disabled).
const HANDSHAKE_CAP: Duration = Duration::from_secs(10);

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What a plaintext client on a TLS port is told.
pub const TLS_REQUIRED: &str = "this server requires TLS: connect with https:// \
     (and trust its CA, e.g. fanout run --ca-cert FILE)";

// ------------------------------------------------------------ server flags

/// TLS settings of a server (both servers).
#[derive(Args, Debug, Clone, PartialEq)]
pub struct TlsArgs {
    /// Serve TLS with this certificate chain (PEM, leaf first); needs
    /// --tls-key. Re-read when the file changes.
    #[arg(long, env = "FANOUT_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "FANOUT_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates issued by these CAs (PEM bundle): mTLS.
    /// Needs --tls-cert. Re-read when the file changes.
    #[arg(long, env = "FANOUT_TLS_CLIENT_CA", value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// How often the TLS files are checked for changes (also on SIGHUP).
    #[arg(long, env = "FANOUT_TLS_RELOAD_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub tls_reload_interval: Duration,
}

impl Default for TlsArgs {
    /// No TLS.
    fn default() -> Self {
        Self {
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls_reload_interval: Duration::from_secs(5),
        }
    }
}

impl TlsArgs {
    /// Serving TLS with `cert` and `key` (PEM files).
    pub fn with_cert(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        Self { tls_cert: Some(cert.into()), tls_key: Some(key.into()), ..Self::default() }
    }

    /// Loads the files: `None` when TLS is not configured; `Error::Config`
    /// naming the file and flag when they are unusable.
    pub fn load(&self) -> Result<Option<Arc<ServerTls>>, Error> {
        let (cert, key) = match (&self.tls_cert, &self.tls_key) {
            (None, None) if self.tls_client_ca.is_some() => {
                return Err(Error::Config("--tls-client-ca needs --tls-cert and --tls-key".into()));
            }
            (None, None) => return Ok(None),
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            _ => return Err(Error::Config("--tls-cert and --tls-key go together".into())),
        };
        if self.tls_reload_interval.is_zero() {
            return Err(Error::Config("--tls-reload-interval must be positive".into()));
        }
        let files = ServerFiles { cert, key, client_ca: self.tls_client_ca.clone() };
        Ok(Some(Arc::new(ServerTls {
            live: Live::load(files, self.tls_reload_interval)?,
            refused: watch::channel((0, String::new())).0,
        })))
    }
}

// ------------------------------------------------------------ server config

/// The files a server's TLS config is read from.
#[derive(Debug, Clone)]
struct ServerFiles {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

/// A file's stamp, `None` when it cannot be read (see [`FileStamp`]).
type Stamp = Option<FileStamp>;

fn stamp(path: &Path) -> Stamp {
    FileStamp::at(path)
}

impl ConfigFiles for ServerFiles {
    type Config = rustls::ServerConfig;
    const WHAT: &'static str = "TLS certificates";

    fn stamps(&self) -> Vec<Stamp> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(|p| stamp(p))
            .collect()
    }

    fn build(&self) -> Result<rustls::ServerConfig, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = read_certs(&self.cert, "--tls-cert")?;
        let key = read_key(&self.key, "--tls-key")?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| Error::Config(format!("TLS: {e}")))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in read_certs(path, "--tls-client-ca")? {
                    roots.add(cert).map_err(|e| file_error(path, "--tls-client-ca", e))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| file_error(path, "--tls-client-ca", e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(chain, key).map_err(|e| {
            Error::Config(format!(
                "--tls-cert {} / --tls-key {}: {e}",
                self.cert.display(),
                self.key.display()
            ))
        })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

fn file_error(path: &Path, flag: &str, e: impl std::fmt::Display) -> Error {
    Error::Config(format!("{flag} {}: {e}", path.display()))
}

/// Every certificate in a PEM file; at least one.
fn read_certs(path: &Path, flag: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, flag, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, flag, e))?;
    if certs.is_empty() {
        return Err(file_error(path, flag, "no PEM certificate (-----BEGIN CERTIFICATE-----) in the file"));
    }
    Ok(certs)
}

/// The first private key in a PEM file.
fn read_key(path: &Path, flag: &str) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(path, flag, e))
}

/// Files a TLS config is built from (a server's, or the pipeline's for
/// processors).
trait ConfigFiles: std::fmt::Debug + Send + Sync + 'static {
    /// The rustls config they make.
    type Config: Send + Sync + 'static;
    /// What the log lines call it.
    const WHAT: &'static str;
    /// What tells each file changed.
    fn stamps(&self) -> Vec<Stamp>;
    /// Reads the files and builds the config; errors name the file.
    fn build(&self) -> Result<Self::Config, Error>;
}

/// A config kept current with its files: behind an `ArcSwap` (every
/// handshake takes the one current at that moment), rebuilt when a file's
/// stamp changes or on demand; a failed rebuild keeps the config in use.
/// Shared by [`ServerTls`] and [`ProcessorTls`].
#[derive(Debug)]
struct Live<F: ConfigFiles> {
    files: F,
    config: ArcSwap<F::Config>,
    /// The files' stamps at the last load attempt (good or not).
    stamps: Mutex<Vec<Stamp>>,
    /// Count of configs swapped in since start.
    reloads: watch::Sender<u64>,
    interval: Duration,
}

impl<F: ConfigFiles> Live<F>
where
    F::Config: std::fmt::Debug,
{
    fn load(files: F, interval: Duration) -> Result<Self, Error> {
        let stamps = files.stamps();
        let config = files.build()?;
        Ok(Self {
            files,
            config: ArcSwap::from_pointee(config),
            stamps: Mutex::new(stamps),
            reloads: watch::channel(0).0,
            interval,
        })
    }

    fn current(&self) -> Arc<F::Config> {
        self.config.load_full()
    }

    fn reloads(&self) -> u64 {
        *self.reloads.borrow()
    }

    fn reload(&self) -> Result<(), Error> {
        *self.stamps.lock().unwrap_or_else(|p| p.into_inner()) = self.files.stamps();
        match self.files.build() {
            Ok(config) => {
                // Config first, count after: a reader that takes the count
                // and then the config never has an older config than the
                // count says (see TlsDialer::call).
                self.config.store(Arc::new(config));
                self.reloads.send_modify(|n| *n += 1);
                info!(files = ?self.files, "{} reloaded", F::WHAT);
                Ok(())
            }
            Err(e) => {
                warn!(error = %e, "{} reload failed; keeping the config in use", F::WHAT);
                Err(e)
            }
        }
    }

    fn reload_if_changed(&self) -> Option<Result<(), Error>> {
        let now = self.files.stamps();
        let changed = *self.stamps.lock().unwrap_or_else(|p| p.into_inner()) != now;
        changed.then(|| self.reload())
    }
}

/// Checks `owner`'s files (`live` of it) every interval until `stop`, or
/// until the owner is dropped.
fn spawn_watcher<T, F>(owner: &Arc<T>, live: fn(&T) -> &Live<F>, stop: CancellationToken)
where
    T: Send + Sync + 'static,
    F: ConfigFiles,
    F::Config: std::fmt::Debug,
{
    let this = Arc::downgrade(owner);
    let interval = live(owner).interval;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            let Some(owner) = this.upgrade() else { return };
            // Reading a few small files: brief enough for a worker.
            let _ = live(&owner).reload_if_changed();
        }
    });
}

/// A server's live TLS config, reloaded from its files (see the [module
/// docs](self)).
#[derive(Debug)]
pub struct ServerTls {
    live: Live<ServerFiles>,
    /// Handshakes failed since start, and why the last one did.
    refused: watch::Sender<(u64, String)>,
}

impl ServerTls {
    /// Follows the TLS handshakes that failed: how many since start, and
    /// why the last one did (e.g. "invalid peer certificate:
    /// UnknownIssuer" for a client certificate of another CA).
    pub fn watch_refusals(&self) -> watch::Receiver<(u64, String)> {
        self.refused.subscribe()
    }

    /// Whether client certificates are required.
    pub fn requires_client_certs(&self) -> bool {
        self.live.files.client_ca.is_some()
    }

    /// Successful reloads since start.
    pub fn reloads(&self) -> u64 {
        self.live.reloads()
    }

    /// Follows the count of successful reloads (tests wait on it).
    pub fn watch_reloads(&self) -> watch::Receiver<u64> {
        self.live.reloads.subscribe()
    }

    /// Reads the files again now and swaps the new config in; on error the
    /// config in use stays, and the error (naming the file) is logged and
    /// returned.
    pub fn reload(&self) -> Result<(), Error> {
        self.live.reload()
    }

    /// Reloads when a file changed since the last attempt; `None` when none
    /// did.
    pub fn reload_if_changed(&self) -> Option<Result<(), Error>> {
        self.live.reload_if_changed()
    }

    /// Checks the files every `--tls-reload-interval` until `stop`.
    pub fn spawn_watcher(self: &Arc<Self>, stop: CancellationToken) {
        spawn_watcher(self, |t: &Self| &t.live, stop);
    }

    fn current(&self) -> Arc<rustls::ServerConfig> {
        self.live.current()
    }
}

// -------------------------------------------------------------- accepting

/// The incoming connections of a server, plaintext or TLS: [`Incoming`]'s,
/// each handshaken (on a task of its own) when TLS is on. Never yields an
/// error and never ends.
pub struct ServerIncoming {
    inner: Incoming,
    tls: Option<Arc<ServerTls>>,
    limit: Duration,
    handshakes: FuturesUnordered<JoinHandle<Option<TlsConn>>>,
    /// The handshakes' tasks, oldest first (finished ones pruned before
    /// counting), to close the oldest when all slots are taken.
    started: VecDeque<AbortHandle>,
}

impl std::fmt::Debug for ServerIncoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerIncoming")
            .field("tls", &self.tls.is_some())
            .field("handshaking", &self.handshakes.len())
            .finish_non_exhaustive()
    }
}

impl ServerIncoming {
    /// `inner`'s connections, through TLS when `tls` is set.
    pub fn new(inner: Incoming, tls: Option<Arc<ServerTls>>, limits: &ConnectionLimits) -> Self {
        let limit = if limits.handshake_timeout.is_zero() { HANDSHAKE_CAP } else { limits.handshake_timeout };
        Self { inner, tls, limit, handshakes: FuturesUnordered::new(), started: VecDeque::new() }
    }
}

impl Stream for ServerIncoming {
    type Item = Result<ServerConn, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let Some(tls) = &this.tls else {
            return this.inner.poll_next_unpin(cx).map(|c| c.map(|r| r.map(ServerConn::Plain)));
        };
        loop {
            // New connections, a bounded number per poll so that finished
            // handshakes are handed on during a flood.
            let mut accepted = 0;
            while accepted < MAX_HANDSHAKES {
                let Poll::Ready(Some(Ok(conn))) = this.inner.poll_next_unpin(cx) else { break };
                accepted += 1;
                this.started.retain(|h| !h.is_finished());
                if this.started.len() >= MAX_HANDSHAKES
                    && let Some(oldest) = this.started.pop_front()
                {
                    debug!("TLS handshake slots full: closing the oldest handshake");
                    oldest.abort();
                }
                let task = tokio::spawn(handshake(conn, tls.clone(), this.limit));
                this.started.push_back(task.abort_handle());
                this.handshakes.push(task);
            }
            match this.handshakes.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(Some(conn)))) => {
                    return Poll::Ready(Some(Ok(ServerConn::Tls(Box::new(conn)))));
                }
                // Failed, closed for a newer one, or its task panicked.
                Poll::Ready(Some(_)) => continue,
                Poll::Ready(None) | Poll::Pending if accepted == MAX_HANDSHAKES => {
                    // More may be waiting to be accepted: come back soon.
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// One connection's TLS handshake, bounded by `limit`; `None` when it
/// failed (logged at debug: a client's mistake, or a scanner).
async fn handshake(mut conn: Severable, tls: Arc<ServerTls>, limit: Duration) -> Option<TlsConn> {
    let peer = conn.connect_info().tcp.remote_addr();
    // The preface is now counted on the decrypted bytes; the watchdog's
    // deadline covers the TLS handshake too.
    let preface = conn.take_preface_check();
    let tls2 = tls.clone();
    let work = async move {
        let mut first = [0u8; 1];
        let n = std::future::poll_fn(|cx| conn.poll_peek(cx, &mut ReadBuf::new(&mut first))).await?;
        match first[..n] {
            [] => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before a handshake")),
            [TLS_HANDSHAKE_RECORD] => {}
            // "PRI * HTTP/2.0": a plaintext gRPC client.
            [b'P'] => {
                refuse_plaintext(conn).await;
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "plaintext HTTP/2 on a TLS port; refused",
                ));
            }
            _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "not a TLS handshake")),
        }
        tokio_rustls::TlsAcceptor::from(tls2.current()).accept(Raw(conn)).await
    };
    let refused = |why: String| tls.refused.send_modify(|(n, last)| (*n, *last) = (*n + 1, why));
    match tokio::time::timeout(limit, work).await {
        Ok(Ok(io)) => {
            let mut info = io.get_ref().0.0.connect_info();
            info.tls = Some(io.connect_info());
            Some(TlsConn { io, preface, info })
        }
        Ok(Err(e)) => {
            debug!(?peer, error = %e, "TLS handshake failed");
            refused(e.to_string());
            None
        }
        Err(_) => {
            debug!(?peer, timeout = ?limit, "TLS handshake timed out");
            refused(format!("no TLS handshake within {limit:?}"));
            None
        }
    }
}

/// Answers every call of a plaintext HTTP/2 client with `UNAVAILABLE`
/// ([`TLS_REQUIRED`]), until it closes or the handshake deadline severs it.
async fn refuse_plaintext(conn: Severable) {
    let svc = hyper::service::service_fn(|_req| async {
        Ok::<_, Infallible>(tonic::Status::unavailable(TLS_REQUIRED).into_http::<tonic::body::Body>())
    });
    let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection(hyper_util::rt::TokioIo::new(conn), svc)
        .await;
}

/// A connection under TLS: what rustls reads from and writes to, with the
/// connection info tonic's `TlsStream` impl expects underneath.
#[derive(Debug)]
struct Raw(Severable);

impl Connected for Raw {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.0.connect_info().tcp
    }
}

impl AsyncRead for Raw {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Raw {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A handshaken TLS connection.
pub struct TlsConn {
    io: tokio_rustls::server::TlsStream<Raw>,
    /// Until the HTTP/2 preface and first frame are in (when timed).
    preface: Option<PrefaceCheck>,
    info: ConnInfo,
}

impl std::fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn").field("io", &self.io.get_ref().0).finish_non_exhaustive()
    }
}

/// A server's connection: plaintext, or TLS.
#[derive(Debug)]
pub enum ServerConn {
    /// Plaintext HTTP/2.
    Plain(Severable),
    /// HTTP/2 over TLS.
    Tls(Box<TlsConn>),
}

impl AsyncRead for ServerConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerConn::Plain(c) => Pin::new(c).poll_read(cx, buf),
            ServerConn::Tls(c) => {
                let before = buf.filled().len();
                let read = Pin::new(&mut c.io).poll_read(cx, buf);
                if let (Poll::Ready(Ok(())), Some(p)) = (&read, c.preface.as_mut())
                    && p.feed(&buf.filled()[before..])
                {
                    c.preface = None;
                }
                read
            }
        }
    }
}

impl AsyncWrite for ServerConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerConn::Plain(c) => Pin::new(c).poll_write(cx, buf),
            ServerConn::Tls(c) => Pin::new(&mut c.io).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerConn::Plain(c) => Pin::new(c).poll_write_vectored(cx, bufs),
            ServerConn::Tls(c) => Pin::new(&mut c.io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ServerConn::Plain(c) => c.is_write_vectored(),
            ServerConn::Tls(c) => c.io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerConn::Plain(c) => Pin::new(c).poll_flush(cx),
            ServerConn::Tls(c) => Pin::new(&mut c.io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerConn::Plain(c) => Pin::new(c).poll_shutdown(cx),
            ServerConn::Tls(c) => Pin::new(&mut c.io).poll_shutdown(cx),
        }
    }
}

impl Connected for ServerConn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        match self {
            ServerConn::Plain(c) => c.connect_info(),
            ServerConn::Tls(c) => c.info.clone(),
        }
    }
}

// ------------------------------------------------- pipeline → processors

/// How the pipeline connects to processors over TLS (see the [module
/// docs](self)).
#[derive(Args, Debug, Clone, Default, PartialEq)]
pub struct ProcessorTlsArgs {
    /// Connect to processors over TLS, verified against the system's roots
    /// unless --processor-ca is given. Implied by --processor-ca,
    /// --processor-cert and https:// entries; every entry then uses TLS
    /// (http:// entries are refused).
    #[arg(long, env = "FANOUT_PROCESSOR_TLS")]
    pub processor_tls: bool,
    /// Verify processors' certificates against these CAs (PEM bundle)
    /// instead of the system's roots.
    #[arg(long, env = "FANOUT_PROCESSOR_CA", value_name = "FILE")]
    pub processor_ca: Option<PathBuf>,
    /// Present this client certificate (PEM chain) to processors (mTLS);
    /// needs --processor-key.
    #[arg(long, env = "FANOUT_PROCESSOR_CERT", value_name = "FILE")]
    pub processor_cert: Option<PathBuf>,
    /// The private key of --processor-cert (PEM).
    #[arg(long, env = "FANOUT_PROCESSOR_KEY", value_name = "FILE")]
    pub processor_key: Option<PathBuf>,
    /// The name processors' certificates must carry [default: the entry's
    /// host: NAME of dns:///NAME:PORT, HOST of https://HOST:PORT].
    #[arg(long, env = "FANOUT_PROCESSOR_TLS_NAME", value_name = "NAME")]
    pub processor_tls_name: Option<String>,
}

/// The pipeline's TLS settings for processor connections, loaded: the live
/// `rustls::ClientConfig` behind an `ArcSwap`, reloaded like a server's
/// ([`ServerTls`]): files polled every `--tls-reload-interval`, SIGHUP in
/// the binary, [`ProcessorTls::reload`]. Each new connection (see
/// [`ProcessorTls::dialer`]) handshakes with the config current at that
/// moment; open connections keep their session until they close (a
/// processor's `--max-connection-age` makes that happen).
pub struct ProcessorTls {
    live: Live<ClientFiles>,
    /// Bound on the TCP connect, and on the handshake after it.
    timeout: Duration,
    name: Option<String>,
    /// Open connections by the reload count of the config they were dialled
    /// with, and successful handshakes since start.
    open: Mutex<std::collections::BTreeMap<u64, usize>>,
    dials: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for ProcessorTls {
    /// Not the config: it holds the client's private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessorTls")
            .field("files", &self.live.files)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ProcessorTls {
    /// Dials `addr`, an instance of the entry whose host is `host`, over
    /// TLS: its certificate must be valid for `host` (or
    /// `--processor-tls-name`), whatever address it is dialled at. Give it
    /// to `Endpoint::connect_with_connector_lazy` of an `http://` endpoint
    /// (the TLS is done here, with the config current at each dial).
    pub fn dialer(self: &Arc<Self>, host: &str, addr: SocketAddr) -> Result<TlsDialer, Error> {
        let name = self.name.as_deref().unwrap_or(host.trim_start_matches('[').trim_end_matches(']'));
        let name = ServerName::try_from(name.to_owned())
            .map_err(|e| Error::Config(format!("TLS name {name:?} of processors: {e}")))?;
        Ok(TlsDialer { tls: self.clone(), addr, name })
    }

    /// Successful reloads since start.
    pub fn reloads(&self) -> u64 {
        self.live.reloads()
    }

    /// Follows the count of successful reloads (tests wait on it).
    pub fn watch_reloads(&self) -> watch::Receiver<u64> {
        self.live.reloads.subscribe()
    }

    /// Connections to processors that completed their handshake since
    /// start.
    pub fn dials(&self) -> u64 {
        self.dials.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Open connections dialled with a config older than the current one
    /// (they keep their session until they close).
    pub fn stale_connections(&self) -> usize {
        let current = self.reloads();
        self.open.lock().unwrap_or_else(|p| p.into_inner()).range(..current).map(|(_, n)| n).sum()
    }

    /// Reads the files again now and swaps the new config in; on error the
    /// config in use stays, and the error (naming the file) is logged and
    /// returned.
    pub fn reload(&self) -> Result<(), Error> {
        self.live.reload()
    }

    /// Reloads when a file changed since the last attempt; `None` when none
    /// did.
    pub fn reload_if_changed(&self) -> Option<Result<(), Error>> {
        self.live.reload_if_changed()
    }

    /// Checks the files every `--tls-reload-interval` until `stop` (or
    /// until this is dropped). Nothing to watch without files.
    pub fn spawn_watcher(self: &Arc<Self>, stop: CancellationToken) {
        if self.live.files.ca.is_none() && self.live.files.cert.is_none() {
            return;
        }
        spawn_watcher(self, |t: &Self| &t.live, stop);
    }
}

/// Opens TLS connections to one processor instance (see
/// [`ProcessorTls::dialer`]): TCP connect, then the handshake with the
/// config current at that moment, each bounded by the connect timeout;
/// ALPN must pick `h2`. Errors read as tonic's own TLS connector's do
/// ("tcp connect error: ...", "TLS handshake timeout.", rustls' errors),
/// which [`connect_error_reason`] and the balancer rely on.
#[derive(Clone)]
pub struct TlsDialer {
    tls: Arc<ProcessorTls>,
    addr: SocketAddr,
    name: ServerName<'static>,
}

impl std::fmt::Debug for TlsDialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsDialer")
            .field("addr", &self.addr)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl tower::Service<tonic::codegen::http::Uri> for TlsDialer {
    type Response = ProcessorConn;
    type Error = io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Uri) -> Self::Future {
        // The count before the config (see ProcessorTls::reload).
        let generation = self.tls.reloads();
        let config = self.tls.live.current();
        let (tls, addr, name) = (self.tls.clone(), self.addr, self.name.clone());
        Box::pin(async move {
            let timeout = tls.timeout;
            let tcp = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => tcp,
                // The words hyper's connector uses: the balancer tells a
                // refused connection (request never sent) by them.
                Ok(Err(e)) => return Err(io::Error::new(e.kind(), format!("tcp connect error: {e}"))),
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "tcp connect error: connection timed out",
                    ));
                }
            };
            let _ = tcp.set_nodelay(true);
            let handshake = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
            let stream = match tokio::time::timeout(timeout, handshake).await {
                Ok(stream) => stream?,
                Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timeout.")),
            };
            if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Err(io::Error::other("HTTP/2 was not negotiated."));
            }
            tls.dials.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            *tls.open.lock().unwrap_or_else(|p| p.into_inner()).entry(generation).or_default() += 1;
            Ok(ProcessorConn { io: hyper_util::rt::TokioIo::new(stream), tls, generation })
        })
    }
}

/// A TLS connection to a processor (from [`TlsDialer`]), counted open
/// under the config it was dialled with until it is dropped.
pub struct ProcessorConn {
    io: hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    tls: Arc<ProcessorTls>,
    generation: u64,
}

impl Drop for ProcessorConn {
    fn drop(&mut self) {
        let mut open = self.tls.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.generation) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.generation);
            }
        }
    }
}

impl hyper::rt::Read for ProcessorConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for ProcessorConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        hyper::rt::Write::is_write_vectored(&self.io)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl ProcessorTlsArgs {
    /// Whether these settings and `processors` ask for TLS.
    pub fn enabled(&self, processors: &[String]) -> bool {
        self.processor_tls
            || self.processor_ca.is_some()
            || self.processor_cert.is_some()
            || self.processor_key.is_some()
            || self.processor_tls_name.is_some()
            || processors.iter().any(|p| p.trim().starts_with("https://"))
    }

    /// Loads the files: `None` when TLS to processors is off; `timeout`
    /// bounds each TCP connect and each handshake; the files are checked
    /// for changes every `reload_interval` once
    /// [`ProcessorTls::spawn_watcher`] runs.
    pub fn load(
        &self,
        processors: &[String],
        timeout: Duration,
        reload_interval: Duration,
    ) -> Result<Option<Arc<ProcessorTls>>, Error> {
        if !self.enabled(processors) {
            return Ok(None);
        }
        if let Some(p) = processors.iter().find(|p| p.trim().starts_with("http://")) {
            return Err(Error::Config(format!(
                "processor endpoint {p:?} is plaintext (http://) while TLS to processors is on; use https:// or dns:///"
            )));
        }
        if reload_interval.is_zero() {
            return Err(Error::Config("--tls-reload-interval must be positive".into()));
        }
        let files = ClientFiles {
            ca: self.processor_ca.clone(),
            cert: self.processor_cert.clone(),
            key: self.processor_key.clone(),
        };
        if files.cert.is_some() != files.key.is_some() {
            return Err(Error::Config("--processor-cert and --processor-key go together".into()));
        }
        Ok(Some(Arc::new(ProcessorTls {
            live: Live::load(files, reload_interval)?,
            timeout,
            name: self.processor_tls_name.clone(),
            open: Mutex::default(),
            dials: Default::default(),
        })))
    }
}

/// The files the pipeline's processor TLS config is read from.
#[derive(Debug, Clone)]
struct ClientFiles {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

/// The rustls config is TLS 1.2 and 1.3, ALPN h2, as tonic's would be.
impl ConfigFiles for ClientFiles {
    type Config = rustls::ClientConfig;
    const WHAT: &'static str = "processor TLS files";

    fn stamps(&self) -> Vec<Stamp> {
        [&self.ca, &self.cert, &self.key].into_iter().flatten().map(|p| stamp(p)).collect()
    }

    fn build(&self) -> Result<rustls::ClientConfig, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca {
            Some(path) => {
                for cert in read_certs(path, "--processor-ca")? {
                    roots.add(cert).map_err(|e| file_error(path, "--processor-ca", e))?;
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                if native.certs.is_empty() {
                    // Every handshake will then fail with UnknownIssuer,
                    // which names the instance; a CA file fixes it.
                    warn!(errors = ?native.errors, "no native root CA certificates found; give --processor-ca");
                }
                roots.add_parsable_certificates(native.certs);
            }
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| Error::Config(format!("TLS: {e}")))?
            .with_root_certificates(roots);
        let mut config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert, "--processor-cert")?;
                let der = read_key(key, "--processor-key")?;
                builder.with_client_auth_cert(chain, der).map_err(|e| {
                    Error::Config(format!(
                        "--processor-cert {} / --processor-key {}: {e}",
                        cert.display(),
                        key.display()
                    ))
                })?
            }
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// A client TLS config: trust `ca` (else the system's roots), present
/// `cert`/`key` when given. Files are checked here, so a bad one is an error
/// naming it (`flags`: the flags of ca, cert and key).
fn client_config(
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
    flags: [&str; 3],
) -> Result<ClientTlsConfig, Error> {
    let mut config = ClientTlsConfig::new();
    config = match ca {
        Some(path) => {
            read_certs(path, flags[0])?;
            let pem = std::fs::read(path).map_err(|e| file_error(path, flags[0], e))?;
            config.ca_certificate(Certificate::from_pem(pem))
        }
        None => config.with_native_roots(),
    };
    match (cert, key) {
        (None, None) => {}
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert, flags[1])?;
            let der = read_key(key, flags[2])?;
            let provider = rustls::crypto::ring::default_provider();
            rustls::sign::CertifiedKey::from_der(chain, der, &provider).map_err(|e| {
                Error::Config(format!(
                    "{} {} / {} {}: {e}",
                    flags[1],
                    cert.display(),
                    flags[2],
                    key.display()
                ))
            })?;
            let read = |p: &Path, flag: &str| std::fs::read(p).map_err(|e| file_error(p, flag, e));
            config = config.identity(Identity::from_pem(read(cert, flags[1])?, read(key, flags[2])?));
        }
        _ => return Err(Error::Config(format!("{} and {} go together", flags[1], flags[2]))),
    }
    Ok(config)
}

// ----------------------------------------------------------------- clients

/// TLS settings of a client of the pipeline (`fanout run`).
#[derive(Args, Debug, Clone, Default, PartialEq)]
pub struct ClientTlsArgs {
    /// Verify the pipeline's certificate against these CAs (PEM) instead
    /// of the system's roots; implies https://.
    #[arg(long, env = "FANOUT_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Present this client certificate (PEM chain) to the pipeline (mTLS);
    /// needs --key; implies https://.
    #[arg(long, env = "FANOUT_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// The private key of --cert (PEM).
    #[arg(long, env = "FANOUT_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,
}

impl ClientTlsArgs {
    /// The URL to dial and its TLS config: `url` (`host:port` is
    /// `http://host:port`) as is when plaintext; with any TLS flag given, or
    /// an `https://` URL, the `https://` URL and a config verifying the
    /// server's name (the URL's host) against --ca-cert or the system's
    /// roots.
    pub fn for_url(&self, url: &str) -> Result<(String, Option<ClientTlsConfig>), Error> {
        let url = crate::pipeline::balancer::normalize_url(url);
        let flags = self.ca_cert.is_some() || self.cert.is_some() || self.key.is_some();
        if !flags && !url.starts_with("https://") {
            return Ok((url, None));
        }
        let url = match url.strip_prefix("http://") {
            Some(rest) => format!("https://{rest}"),
            None => url,
        };
        let config = client_config(
            self.ca_cert.as_deref(),
            self.cert.as_deref(),
            self.key.as_deref(),
            ["--ca-cert", "--cert", "--key"],
        )?;
        Ok((url, Some(config)))
    }
}

// ------------------------------------------------------------------ errors

/// Why a connection failed, in words, when TLS was the cause: the rustls
/// error somewhere in `err`'s chain ("certificate verify failed:
/// UnknownIssuer", "the server refused our certificate: ...", "the server
/// does not speak TLS (plaintext?)"), or tonic's own TLS errors. `None` when
/// TLS was not the cause.
pub fn connect_error_reason(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    for e in crate::error::chain(err) {
        let inner = e.downcast_ref::<io::Error>().and_then(|io| io.get_ref());
        let rustls = e.downcast_ref::<rustls::Error>().or_else(|| inner.and_then(|i| i.downcast_ref()));
        if let Some(r) = rustls {
            return Some(describe_rustls(r));
        }
        let text = e.to_string();
        // rustls reports an alert received after the handshake (TLS 1.3:
        // the server judges the client's certificate then) as text.
        if let Some(rest) = text.split("received fatal alert: ").nth(1) {
            let alert: String = rest.chars().take_while(char::is_ascii_alphanumeric).collect();
            return Some(refused(&alert));
        }
        if text.contains("HTTP/2 was not negotiated") {
            return Some("TLS: the server did not negotiate HTTP/2 (ALPN h2)".into());
        }
        // TlsDialer's (or tonic's ClientTlsConfig::timeout) passing.
        if text.contains("TLS handshake timeout") {
            return Some(
                "TLS handshake failed: no answer to the handshake in time (is that port serving TLS?)".into(),
            );
        }
        if text.contains("tls handshake eof") {
            return Some(format!(
                "TLS handshake failed: {text} (is the server serving plaintext, or refusing our certificate?)"
            ));
        }
        if text.contains("native root CA certificates") {
            return Some(format!("TLS: {text} (give a CA file)"));
        }
    }
    None
}

fn refused(alert: &str) -> String {
    format!(
        "TLS handshake failed: the server refused the handshake (alert {alert}; a client certificate it does not accept?)"
    )
}

fn describe_rustls(e: &rustls::Error) -> String {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(c) => format!("TLS handshake failed: certificate verify failed: {c:?}"),
        E::AlertReceived(alert) => refused(&format!("{alert:?}")),
        E::InvalidMessage(_) | E::InappropriateHandshakeMessage { .. } | E::InappropriateMessage { .. } => {
            format!("TLS handshake failed: the server does not speak TLS (plaintext? use http://): {e}")
        }
        other => format!("TLS handshake failed: {other}"),
    }
}

/// A failed call's status in words: the TLS reason when TLS was the cause
/// ([`connect_error_reason`]), else its code and message.
pub fn status_reason(status: &tonic::Status) -> String {
    connect_error_reason(status).unwrap_or_else(|| format!("{:?}: {}", status.code(), status.message()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_flags_go_together_and_errors_name_the_file() {
        assert!(TlsArgs::default().load().unwrap().is_none());
        let cert_only = TlsArgs { tls_cert: Some("c.pem".into()), ..TlsArgs::default() };
        assert!(cert_only.load().unwrap_err().to_string().contains("--tls-cert and --tls-key"));
        let ca_only = TlsArgs { tls_client_ca: Some("ca.pem".into()), ..TlsArgs::default() };
        assert!(ca_only.load().unwrap_err().to_string().contains("--tls-client-ca needs"));
        let err =
            TlsArgs::with_cert("/nonexistent/c.pem", "/nonexistent/k.pem").load().unwrap_err().to_string();
        assert!(err.contains("--tls-cert /nonexistent/c.pem"), "{err}");
    }

    #[test]
    fn processor_tls_is_on_when_asked_and_refuses_plaintext_entries() {
        let t = Duration::from_secs(1);
        let off = ProcessorTlsArgs::default();
        assert!(off.load(&["http://p:1".into()], t, t).unwrap().is_none());
        assert!(off.enabled(&["https://p:1".into()]) && !off.enabled(&["dns:///p:1".into()]));
        let on = ProcessorTlsArgs { processor_tls: true, ..Default::default() };
        assert!(on.load(&["dns:///p:1".into()], t, t).unwrap().is_some());
        let err = on.load(&["dns:///q:1".into(), "http://p:1".into()], t, t).unwrap_err().to_string();
        assert!(err.contains("http://p:1") && err.contains("plaintext"), "{err}");
        let half = ProcessorTlsArgs { processor_cert: Some("c.pem".into()), ..Default::default() };
        let err = half.load(&["p:1".into()], t, t).unwrap_err().to_string();
        assert!(err.contains("--processor-cert and --processor-key go together"), "{err}");
    }

    #[test]
    fn debug_output_holds_no_private_key() {
        let dir = std::env::temp_dir().join(format!("fanout-tls-debug-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["client".to_owned()]).unwrap().self_signed(&key).unwrap();
        let (cert_path, key_path) = (dir.join("c.pem"), dir.join("k.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let args = ProcessorTlsArgs {
            processor_ca: Some(cert_path.clone()),
            processor_cert: Some(cert_path),
            processor_key: Some(key_path),
            ..Default::default()
        };
        let tls =
            args.load(&["p:1".into()], Duration::from_secs(1), Duration::from_secs(1)).unwrap().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let shown = format!("{tls:?}");
        // The key as tonic's Debug of its bytes would print it.
        let pem = key.serialize_pem();
        let bytes = format!("{:?}", &pem.as_bytes()[..40]);
        assert!(!shown.contains(bytes.trim_end_matches(']')), "{shown}");
        assert!(!shown.contains(&pem[..40]), "{shown}");
    }

    #[test]
    fn client_urls_switch_to_https_with_tls_flags() {
        let none = ClientTlsArgs::default();
        let (url, tls) = none.for_url("127.0.0.1:1").unwrap();
        assert_eq!((url.as_str(), tls.is_none()), ("http://127.0.0.1:1", true));
        let (url, tls) = none.for_url("https://h:1").unwrap();
        assert_eq!((url.as_str(), tls.is_some()), ("https://h:1", true));
        let ca = ClientTlsArgs { ca_cert: Some("/nonexistent/ca.pem".into()), ..Default::default() };
        let err = ca.for_url("h:1").unwrap_err().to_string();
        assert!(err.contains("--ca-cert /nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn tls_failures_are_put_in_words() {
        let unknown = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let e = io::Error::new(io::ErrorKind::InvalidData, unknown);
        assert_eq!(
            connect_error_reason(&e).as_deref(),
            Some("TLS handshake failed: certificate verify failed: UnknownIssuer")
        );
        let e = io::Error::new(io::ErrorKind::InvalidData, "received fatal alert: CertificateRequired");
        let why = connect_error_reason(&e).unwrap();
        assert!(why.contains("refused the handshake (alert CertificateRequired;"), "{why}");
        let why = connect_error_reason(&io::Error::other("TLS handshake timeout.")).unwrap();
        assert!(why.contains("no answer to the handshake in time"), "{why}");
        assert_eq!(connect_error_reason(&io::Error::other("connection refused")), None);
    }
}
