//! Bearer tokens and the reflection switch: who may call a server, and
//! whether it describes its API to anyone who connects.
//!
//! - `--auth-token-file FILE` (both servers): every call except
//!   `grpc.health.v1.Health` must carry `authorization: Bearer <token>` with
//!   one of the file's tokens, or is answered `UNAUTHENTICATED` before it
//!   reaches a service (nothing is decoded or budgeted for it). One token
//!   per line; blank lines and `#` comments are skipped; several lines let a
//!   token be rotated without a moment where neither works. Health stays
//!   open so Kubernetes and load balancer probes need no secret.
//!   Reflection is behind the token too: when an operator has asked for
//!   tokens, an anonymous peer should learn no more than that the server is
//!   alive, and grpcurl sends its `-H` headers on reflection calls as well,
//!   so a caller holding a token loses nothing.
//! - `--processor-token-file FILE` (pipeline): the token (first line) the
//!   pipeline sends to its processors.
//! - `--reflection on|off` (both servers).
//!
//! Token files are polled (every [`POLL_INTERVAL`]) and re-read when their
//! modification time, size or inode changes; a file that cannot be read or
//! holds no token then keeps the previous tokens and logs a warning.
//! Presented tokens are compared as SHA-256 digests, in constant time and
//! against every stored token, so neither the timing nor the length of a
//! wrong guess tells anything. Tokens never appear in logs, errors or
//! `Debug` output.

use crate::config::FileStamp as Stamp;
use crate::error::Error;
use clap::{Args, ValueEnum};
use futures::future::{Either, Ready, ready};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::watch;
use tonic::codegen::http::{HeaderValue, Request, Response};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Routes;
use tracing::{debug, info, warn};

/// How often a token file's metadata is looked at for a change.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The metadata key a bearer token travels in.
pub const AUTHORIZATION: &str = "authorization";

/// Paths that stay open with tokens on: health, for probes.
const OPEN_PREFIXES: &[&str] = &["/grpc.health.v1.Health/"];

/// On or off.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

/// Who may call a server, and whether it serves reflection (both servers).
#[derive(Args, Debug, Clone, PartialEq)]
pub struct AccessArgs {
    /// Require `authorization: Bearer <token>` on every call except health
    /// checks, the token being one line of FILE (several lines: any of them,
    /// for rotation; blank lines and `#` comments skipped). FILE is re-read
    /// when it changes. Calls without a valid token get UNAUTHENTICATED;
    /// reflection needs the token too [default: no token needed].
    #[arg(long, env = "FANOUT_AUTH_TOKEN_FILE", value_name = "FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// Serve gRPC server reflection (v1 and v1alpha). grpcurl and buf curl
    /// need it (or the .proto files) to call the server by method name; it
    /// also shows the API's whole surface to anyone who can connect (with
    /// --auth-token-file, to token holders only).
    #[arg(long, env = "FANOUT_REFLECTION", value_enum, default_value = "on")]
    pub reflection: Switch,
}

/// The token the pipeline sends its processors.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct ProcessorTokenArgs {
    /// Send `authorization: Bearer <token>` on every call to processors
    /// (records, Describe, health), the token being the first line of FILE
    /// that is neither blank nor a `#` comment; re-read when FILE changes.
    /// For processors started with --auth-token-file.
    #[arg(long, env = "FANOUT_PROCESSOR_TOKEN_FILE", value_name = "FILE")]
    pub processor_token_file: Option<PathBuf>,
}

/// The tokens of one reading of a file.
struct Tokens {
    /// SHA-256 of each token.
    digests: Vec<[u8; 32]>,
    /// `Bearer <first token>`, marked sensitive (HPACK never indexes it,
    /// `Debug` does not print it).
    header: AsciiMetadataValue,
}

/// Reloads of a token file so far: a signal to wait on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reloads {
    /// Changed readings applied.
    pub applied: u64,
    /// Changes seen whose reading failed (the previous tokens kept).
    pub failed: u64,
}

/// A file of bearer tokens, kept current: read at start (an error then is
/// fatal), then polled for changes.
pub struct TokenFile {
    path: PathBuf,
    tokens: RwLock<Arc<Tokens>>,
    reloads: watch::Sender<Reloads>,
}

impl std::fmt::Debug for TokenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenFile")
            .field("path", &self.path)
            .field("tokens", &self.current().digests.len())
            .finish()
    }
}

impl TokenFile {
    /// Reads `path` and starts watching it (on the current tokio runtime)
    /// until the returned handle is dropped. `Err` naming the file when it
    /// cannot be read or holds no token.
    pub fn open(path: &Path) -> Result<Arc<Self>, Error> {
        let meta = std::fs::metadata(path)
            .map_err(|e| Error::Config(format!("token file {}: {e}", path.display())))?;
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("token file {}: {e}", path.display())))?;
        let tokens = parse(path, &text)?;
        let (reloads, _) = watch::channel(Reloads::default());
        let file = Arc::new(Self { path: path.to_owned(), tokens: RwLock::new(Arc::new(tokens)), reloads });
        info!(file = %path.display(), tokens = file.current().digests.len(), "token file read");
        spawn_watch(Arc::downgrade(&file), Some(Stamp::of(&meta)));
        Ok(file)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Follows the file's reloads: the count goes up once a changed file has
    /// been read (`applied`) or found unusable (`failed`).
    pub fn reloads(&self) -> watch::Receiver<Reloads> {
        self.reloads.subscribe()
    }

    fn current(&self) -> Arc<Tokens> {
        self.tokens.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `Bearer <token>` with the file's first token, for outgoing calls.
    pub fn bearer(&self) -> AsciiMetadataValue {
        self.current().header.clone()
    }

    /// Adds `authorization: Bearer <first token>` to an outgoing request.
    pub fn authorize<T>(&self, request: &mut tonic::Request<T>) {
        request.metadata_mut().insert(AUTHORIZATION, self.bearer());
    }

    /// Checks an incoming `authorization` header: `Err` says what is missing
    /// or wrong, never what was sent.
    pub fn check(&self, header: Option<&HeaderValue>) -> Result<(), &'static str> {
        let Some(header) = header else {
            return Err(
                "this server requires `authorization: Bearer <token>` metadata, and the call has none",
            );
        };
        let value = header.as_bytes();
        let token = match value.iter().position(|&b| b == b' ') {
            Some(i) if value[..i].eq_ignore_ascii_case(b"bearer") => value[i + 1..].trim_ascii(),
            _ => return Err("the `authorization` metadata is not of the form `Bearer <token>`"),
        };
        if token.is_empty() {
            return Err("the bearer token is empty");
        }
        let presented: [u8; 32] = Sha256::digest(token).into();
        // Every stored digest is compared, whatever matched, without early
        // exit: the time taken says nothing about which or how close.
        let mut ok = false;
        for d in &self.current().digests {
            ok |= constant_time_eq(d, &presented);
        }
        if ok { Ok(()) } else { Err("the bearer token is not one this server accepts") }
    }

    /// Looks at the file once: re-reads it if its stamp changed since `seen`.
    async fn poll(&self, seen: &mut Option<Stamp>) {
        let stamp = match tokio::fs::metadata(&self.path).await {
            Ok(meta) => Stamp::of(&meta),
            Err(e) => {
                // Gone (or unreadable): keep the tokens; warn once, and
                // read it again when it is back.
                if seen.take().is_some() {
                    warn!(file = %self.path.display(), error = %e, "token file unreadable; keeping its previous tokens");
                    self.reloads.send_modify(|r| r.failed += 1);
                }
                return;
            }
        };
        if *seen == Some(stamp) {
            return;
        }
        *seen = Some(stamp);
        let read = tokio::fs::read_to_string(&self.path)
            .await
            .map_err(|e| Error::Config(format!("token file {}: {e}", self.path.display())))
            .and_then(|text| parse(&self.path, &text));
        match read {
            Ok(tokens) => {
                let count = tokens.digests.len();
                *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(tokens);
                info!(file = %self.path.display(), tokens = count, "token file changed; reloaded");
                self.reloads.send_modify(|r| r.applied += 1);
            }
            Err(e) => {
                warn!(file = %self.path.display(), error = %e, "token file changed but cannot be used; keeping its previous tokens");
                self.reloads.send_modify(|r| r.failed += 1);
            }
        }
    }
}

/// Polls `file` every [`POLL_INTERVAL`] until it is dropped.
fn spawn_watch(file: Weak<TokenFile>, mut seen: Option<Stamp>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(file) = file.upgrade() else { return };
            file.poll(&mut seen).await;
        }
    });
}

/// The tokens of a file's text. Errors name the file and line, never a token.
fn parse(path: &Path, text: &str) -> Result<Tokens, Error> {
    let mut digests = Vec::new();
    let mut first = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if !line.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::Config(format!(
                "token file {}: line {}: a token must be printable ASCII without spaces",
                path.display(),
                n + 1
            )));
        }
        first.get_or_insert(line);
        digests.push(Sha256::digest(line.as_bytes()).into());
    }
    let Some(first) = first else {
        return Err(Error::Config(format!(
            "token file {}: no token (every line is blank or a # comment)",
            path.display()
        )));
    };
    Ok(Tokens { digests, header: bearer_value(first)? })
}

/// `Bearer <token>` as metadata, marked sensitive; `Err` (not naming the
/// token) when it is not printable ASCII without spaces.
pub fn bearer_value(token: &str) -> Result<AsciiMetadataValue, Error> {
    let token = token.trim();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::Config("a token must be non-empty printable ASCII without spaces".into()));
    }
    let mut value: AsciiMetadataValue = MetadataValue::try_from(format!("Bearer {token}"))
        .map_err(|_| Error::Config("a token must be printable ASCII".into()))?;
    value.set_sensitive(true);
    Ok(value)
}

/// The first token of a file (for clients): `Err` naming the file when it
/// cannot be read or holds none.
pub fn read_first_token(path: &Path) -> Result<AsciiMetadataValue, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("token file {}: {e}", path.display())))?;
    Ok(parse(path, &text)?.header)
}

/// A processor's `UNAUTHENTICATED` as the pipeline reports it: naming the
/// processor and the flags to check (a configuration error, not the
/// record's fault: the pipeline sends the record elsewhere, uncounted).
pub fn refused_by_processor(processor: &str, status: &tonic::Status) -> tonic::Status {
    tonic::Status::unauthenticated(format!(
        "processor {processor} refused the pipeline's credentials (UNAUTHENTICATED: {}); check the \
         pipeline's --processor-token-file against the processor's --auth-token-file",
        status.message()
    ))
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// `routes` behind `tokens` (health excepted); as they are when `None`.
pub fn guard(routes: Routes, tokens: Option<&Arc<TokenFile>>) -> Routes {
    match tokens {
        None => routes,
        Some(t) => Routes::from(routes.into_axum_router().layer(RequireTokenLayer(t.clone()))),
    }
}

/// The tower layer of [`guard`].
#[derive(Debug, Clone)]
pub struct RequireTokenLayer(Arc<TokenFile>);

impl<S> tower::Layer<S> for RequireTokenLayer {
    type Service = RequireToken<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireToken { inner, tokens: self.0.clone() }
    }
}

/// Answers `UNAUTHENTICATED` to a call without a valid token (see the
/// [module docs](self)); passes the others on.
#[derive(Debug, Clone)]
pub struct RequireToken<S> {
    inner: S,
    tokens: Arc<TokenFile>,
}

impl<S, B, RB> tower::Service<Request<B>> for RequireToken<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
    RB: Default,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<Response<RB>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let path = req.uri().path();
        if OPEN_PREFIXES.iter().any(|p| path.starts_with(p)) {
            return Either::Left(self.inner.call(req));
        }
        match self.tokens.check(req.headers().get(AUTHORIZATION)) {
            Ok(()) => Either::Left(self.inner.call(req)),
            Err(why) => {
                debug!(path, reason = why, "call refused: UNAUTHENTICATED");
                Either::Right(ready(Ok(tonic::Status::unauthenticated(why).into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(text: &str) -> TokenFile {
        let (reloads, _) = watch::channel(Reloads::default());
        let tokens = parse(Path::new("t"), text).unwrap();
        TokenFile { path: "t".into(), tokens: RwLock::new(Arc::new(tokens)), reloads }
    }

    fn header(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn checks_scheme_and_every_line() {
        let t = tokens("# comment\n\n  alpha  \nbeta\n");
        assert!(t.check(Some(&header("Bearer alpha"))).is_ok());
        assert!(t.check(Some(&header("bearer beta"))).is_ok());
        assert!(t.check(Some(&header("Bearer gamma"))).unwrap_err().contains("not one"));
        assert!(t.check(Some(&header("Bearer alph"))).is_err());
        assert!(t.check(Some(&header("Bearer alphaa"))).is_err());
        assert!(t.check(Some(&header("Basic alpha"))).unwrap_err().contains("Bearer <token>"));
        assert!(t.check(Some(&header("alpha"))).is_err());
        assert!(t.check(Some(&header("Bearer "))).is_err());
        assert!(t.check(None).unwrap_err().contains("has none"));
        assert_eq!(t.bearer(), "Bearer alpha");
        assert!(!format!("{t:?}").contains("alpha"), "{t:?}");
        assert!(!format!("{:?}", t.bearer()).contains("alpha"), "{:?}", t.bearer());
    }

    #[test]
    fn files_without_tokens_and_bad_lines_are_refused_without_echo() {
        let e = parse(Path::new("/x/tokens"), "# only\n\n").err().unwrap().to_string();
        assert!(e.contains("/x/tokens") && e.contains("no token"), "{e}");
        let e = parse(Path::new("/x/tokens"), "ok\nsecret with space\n").err().unwrap().to_string();
        assert!(e.contains("line 2") && !e.contains("secret"), "{e}");
        let e = parse(Path::new("/x/tokens"), "sécret\n").err().unwrap().to_string();
        assert!(e.contains("line 1") && !e.contains("cret"), "{e}");
    }
}
