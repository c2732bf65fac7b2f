//! Serving both services: listen, health, reflection, graceful shutdown.
//!
//! Each server also serves `grpc.health.v1.Health` and server reflection (v1
//! and v1alpha, since grpcurl 1.8 speaks only v1alpha; off with
//! `--reflection off`). With `--auth-token-file`, every call but health needs
//! a bearer token ([`auth`](crate::auth)). Shutdown is in three
//! steps: report NOT_SERVING and stop accepting; let open calls finish for the
//! drain timeout; then cancel what is left (a pipeline's runs report
//! `CANCELLED`) and close, with a last bound so a stuck stream cannot hold
//! the process.

use crate::auth::{Switch, TokenFile};
use crate::budget::MemoryBudget;
use crate::config::{ConnectionLimits, PipelineConfig, ProcessorConfig};
use crate::engine::{Engine, EngineStats};
use crate::error::Error;
use crate::listener::{Incoming, TrackCallsLayer};
use crate::pipeline::PipelineService;
use crate::pipeline::admission::Admission;
use crate::pipeline::balancer::{Balancer, PROCESSOR_SERVICE};
use crate::pipeline::discovery::{Resolve, SystemResolver};
use crate::processor::{Description, ProcessorService};
use crate::proto;
use crate::tls::{ServerIncoming, ServerTls};
use crate::workload::Workload;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http::Response;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{info, warn};

/// The pipeline's service name, as health and reflection report it.
pub const PIPELINE_SERVICE: &str = "fanout.v1.Pipeline";

/// How long to wait after cancelling the remaining work for it to wind down.
const CANCEL_GRACE: Duration = Duration::from_secs(3);

/// A server running on a background task.
#[derive(Debug)]
pub struct Running {
    /// The address actually bound.
    pub addr: SocketAddr,
    stop: CancellationToken,
    /// Severs every open connection at once (see [`Severable`](crate::listener::Severable)).
    sever: CancellationToken,
    task: JoinHandle<Result<(), Error>>,
    /// A pipeline's run admission (None for a processor).
    admission: Option<Arc<Admission>>,
    /// The tokens calls must carry (`--auth-token-file`).
    auth: Option<Arc<TokenFile>>,
    /// The token a pipeline sends its processors (`--processor-token-file`).
    processor_token: Option<Arc<TokenFile>>,
    /// The address `/metrics` is served on (`--metrics-listen`), if any.
    pub metrics_addr: Option<SocketAddr>,
    /// Stops the metrics listener when the server is done with.
    _metrics_stop: Option<tokio_util::sync::DropGuard>,
    /// The live TLS config, when serving TLS.
    tls: Option<Arc<ServerTls>>,
    /// A pipeline's live TLS config of processor connections, when on.
    processor_tls: Option<Arc<crate::tls::ProcessorTls>>,
}

impl Running {
    /// Runs in progress on a pipeline (0 for a processor): the run tasks
    /// that have not ended, whether or not their clients are still there.
    pub fn active_runs(&self) -> usize {
        self.admission.as_ref().map_or(0, |a| a.active_runs())
    }

    /// The tokens this server requires (`--auth-token-file`), to follow
    /// their reloads.
    pub fn auth_tokens(&self) -> Option<&Arc<TokenFile>> {
        self.auth.as_ref()
    }

    /// The token a pipeline sends its processors (`--processor-token-file`).
    pub fn processor_token(&self) -> Option<&Arc<TokenFile>> {
        self.processor_token.as_ref()
    }

    /// A token that starts graceful shutdown when cancelled.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// `http://ADDR`, or `https://ADDR` when serving TLS, for clients.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The live TLS config (reload it, follow its reloads), when serving TLS.
    pub fn tls(&self) -> Option<&Arc<ServerTls>> {
        self.tls.as_ref()
    }

    /// A pipeline's live TLS config of processor connections (reload it,
    /// follow its reloads), when TLS to processors is on.
    pub fn processor_tls(&self) -> Option<&Arc<crate::tls::ProcessorTls>> {
        self.processor_tls.as_ref()
    }

    /// Starts graceful shutdown and waits for it to finish.
    pub async fn shutdown(self) -> Result<(), Error> {
        self.stop.cancel();
        self.wait().await
    }

    /// Waits for the server to stop (after its stop token is cancelled).
    pub async fn wait(self) -> Result<(), Error> {
        self.task.await.map_err(|e| Error::Internal(format!("server task: {e}")))?
    }

    /// Aborts the server task at once: connections drop, nothing drains.
    /// Tests use it to stand for a crashed instance.
    pub fn abort(self) {
        // tonic serves each connection on its own task, which aborting the
        // accept task does not reach (and dropping it would drain them
        // gracefully): sever them first.
        self.sever.cancel();
        self.task.abort();
    }
}

/// Binds `listen` (`HOST:PORT`; port 0 picks a free one).
pub async fn bind(listen: &str) -> Result<TcpListener, Error> {
    TcpListener::bind(listen).await.map_err(|e| Error::Transport(format!("cannot listen on {listen}: {e}")))
}

/// Starts a `RecordProcessor` with `workload` on `cfg.listen`. Returns the
/// running server and the engine's counters.
pub async fn start_processor<W: Workload>(
    cfg: &ProcessorConfig,
    workload: W,
) -> Result<(Running, Arc<EngineStats>), Error> {
    cfg.validate()?;
    let auth = cfg.access.auth_token_file.as_deref().map(TokenFile::open).transpose()?;
    let metrics_listener = cfg.metrics.bind().await?;
    let tls = cfg.tls.load()?;
    let listener = bind(&cfg.listen).await?;
    let addr = local_addr(&listener)?;
    let engine = Arc::new(
        Engine::new(workload, cfg.unit_threads(), cfg.max_units_per_record)
            .with_inline_budget(cfg.inline_budget),
    );
    let stats = engine.stats().clone();
    let grpc_metrics =
        metrics_listener.as_ref().map(|_| Arc::new(crate::metrics::GrpcMetrics::new(PROCESSOR_SERVICE)));
    let registry = grpc_metrics.clone().map(|grpc| {
        let e = engine.clone();
        crate::metrics::processor_registry(
            grpc,
            stats.clone(),
            cfg.unit_threads(),
            Box::new(move || e.queued_units()),
        )
    });
    info!(
        %addr,
        workload = engine.workload_name(),
        unit_threads = cfg.unit_threads(),
        slots = cfg.capacity().slots,
        queue = cfg.capacity().queue,
        "fanout-processor listening"
    );
    let name = cfg.name.clone().unwrap_or_else(|| addr.to_string());
    let description = Description {
        name,
        unit_threads: cfg.unit_threads(),
        max_units_per_record: cfg.max_units_per_record,
        max_message_bytes: cfg.max_message_bytes,
    };
    // Set when shutdown begins: new records are then refused as not started.
    let draining = CancellationToken::new();
    let service = ProcessorService::new(engine, cfg.capacity(), description, draining.clone());
    let service = proto::record_processor_server::RecordProcessorServer::new(service)
        .max_decoding_message_size(cfg.max_message_bytes)
        .max_encoding_message_size(usize::MAX);
    let service =
        MemoryBudget::new(cfg.memory_budget, "--memory-budget").wrap(service, cfg.max_message_bytes);
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_service_status(PROCESSOR_SERVICE, ServingStatus::Serving).await;
    let router = base_routes(PROCESSOR_SERVICE, health, cfg.access.reflection)?.add_service(service);
    let router = crate::auth::guard(router, auth.as_ref());
    let mut running = spawn(
        router,
        cfg.max_message_bytes,
        &cfg.connections,
        listener,
        addr,
        reporter,
        PROCESSOR_SERVICE,
        cfg.drain_timeout,
        None,
        grpc_metrics,
        tls,
    );
    running.auth = auth;
    serve_metrics(&mut running, metrics_listener.zip(registry))?;
    let stop = running.stop_token();
    tokio::spawn(async move {
        stop.cancelled().await;
        draining.cancel();
    });
    Ok((running, stats))
}

/// Starts a `Pipeline` over `cfg.processors` on `cfg.listen`.
pub async fn start_pipeline(cfg: &PipelineConfig) -> Result<Running, Error> {
    start_pipeline_with_resolver(cfg, Arc::new(SystemResolver)).await
}

/// [`start_pipeline`], looking processor names up through `resolver`
/// (tests drive the fleet's membership with one).
pub async fn start_pipeline_with_resolver(
    cfg: &PipelineConfig,
    resolver: Arc<dyn Resolve>,
) -> Result<Running, Error> {
    cfg.validate()?;
    let auth = cfg.access.auth_token_file.as_deref().map(TokenFile::open).transpose()?;
    let metrics_listener = cfg.metrics.bind().await?;
    let tls = cfg.tls.load()?;
    let listener = bind(&cfg.listen).await?;
    let addr = local_addr(&listener)?;
    let cancel_runs = CancellationToken::new();
    let pipeline = PipelineService::with_resolver(cfg, cancel_runs.clone(), resolver)?;
    let balancer = pipeline.balancer().clone();
    let admission = pipeline.admission().clone();
    info!(%addr, processors = ?cfg.processors, "fanout-pipeline listening");
    let grpc_metrics =
        metrics_listener.as_ref().map(|_| Arc::new(crate::metrics::GrpcMetrics::new(PIPELINE_SERVICE)));
    let registry = grpc_metrics
        .clone()
        .map(|grpc| crate::metrics::pipeline_registry(grpc, balancer.clone(), admission.clone()));
    let service = proto::pipeline_server::PipelineServer::new(pipeline)
        .max_decoding_message_size(cfg.max_message_bytes)
        .max_encoding_message_size(crate::convert::MAX_EVENT_BYTES);
    let service = admission.memory().wrap(service, cfg.max_message_bytes);
    let (reporter, health) = tonic_health::server::health_reporter();
    // Ready only once a processor has answered a probe (see follow_processors).
    reporter.set_service_status(PIPELINE_SERVICE, ServingStatus::NotServing).await;
    let router = base_routes(PIPELINE_SERVICE, health, cfg.access.reflection)?.add_service(service);
    let router = crate::auth::guard(router, auth.as_ref());
    let mut running = spawn(
        router,
        cfg.max_message_bytes,
        &cfg.connections,
        listener,
        addr,
        reporter.clone(),
        PIPELINE_SERVICE,
        cfg.drain_timeout,
        Some(cancel_runs),
        grpc_metrics,
        tls,
    );
    running.admission = Some(admission);
    running.auth = auth;
    running.processor_token = balancer.processor_token().cloned();
    running.processor_tls = balancer.processor_tls().cloned();
    serve_metrics(&mut running, metrics_listener.zip(registry))?;
    follow_processors(balancer, reporter, running.stop_token());
    Ok(running)
}

/// The pipeline's readiness: `fanout.v1.Pipeline` is `SERVING` while some
/// processor is up and described (from its first successful probe on), and
/// `NOT_SERVING` while none is, so a load balancer sends runs to another
/// pipeline. The overall status (`""`) stays `SERVING` while the process
/// lives, for liveness probes: a processor outage must not get pipelines
/// restarted. Stops when shutdown starts, which sets both `NOT_SERVING`.
fn follow_processors(balancer: Arc<Balancer>, reporter: HealthReporter, stop: CancellationToken) {
    let mut usable = balancer.watch_usable();
    tokio::spawn(async move {
        let mut serving = false;
        loop {
            let now = *usable.borrow_and_update();
            if now != serving && !stop.is_cancelled() {
                serving = now;
                let status = if now { ServingStatus::Serving } else { ServingStatus::NotServing };
                match now {
                    true => info!("a processor is up: SERVING"),
                    false => warn!("no processor is up: NOT_SERVING"),
                }
                reporter.set_service_status(PIPELINE_SERVICE, status).await;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = usable.changed() => if changed.is_err() { return },
            }
        }
    });
}

/// Serves `/metrics` for `running` until it is done with (see
/// [`crate::metrics`]), when metrics are on.
fn serve_metrics(
    running: &mut Running,
    metrics: Option<(TcpListener, prometheus_client::registry::Registry)>,
) -> Result<(), Error> {
    if let Some((listener, registry)) = metrics {
        let stop = CancellationToken::new();
        running.metrics_addr = Some(crate::metrics::serve(listener, registry, stop.clone())?);
        running._metrics_stop = Some(stop.drop_guard());
    }
    Ok(())
}

fn local_addr(listener: &TcpListener) -> Result<SocketAddr, Error> {
    listener.local_addr().map_err(|e| Error::Transport(format!("local address: {e}")))
}

/// Health and reflection (v1 and v1alpha, unless `reflection` is off),
/// which both servers serve. Reflection lists exactly the services this
/// server answers.
fn base_routes(
    service: &str,
    health: tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    reflection_on: Switch,
) -> Result<Routes, Error> {
    if reflection_on == Switch::Off {
        return Ok(Routes::new(health));
    }
    let reflection = || {
        [
            service,
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]
        .into_iter()
        .fold(tonic_reflection::server::Builder::configure(), |b, name| b.with_service_name(name))
        .include_reflection_service(false)
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
    };
    let refl_err = |e: tonic_reflection::server::Error| Error::Internal(format!("reflection: {e}"));
    let v1 = reflection().build_v1().map_err(refl_err)?;
    let v1alpha = reflection().build_v1alpha().map_err(refl_err)?;
    Ok(Routes::new(health).add_service(v1).add_service(v1alpha))
}

/// Rewrites the answers tonic gives a request it cannot take, which name no
/// setting or blame the server, to `INVALID_ARGUMENT` saying what is wrong
/// with the request; every other response passes through untouched.
///
/// - Over the decoding limit, tonic answers `OUT_OF_RANGE` ("decoded message
///   length too large: found N bytes, the limit is: M bytes"): the answer
///   names the limit and the flag that sets it.
/// - A request prost cannot decode (invalid UTF-8 in a string field, messages
///   nested past prost's recursion limit of 100, a malformed field) is
///   answered `INTERNAL` by tonic-prost ("failed to decode Protobuf message:
///   Inner.field: Outer.field: what"): the answer says the request could not
///   be decoded, why, and where.
fn request_errors_as_invalid_argument<B: Default>(
    limit: usize,
) -> impl Fn(Response<B>) -> Response<B> + Clone {
    /// The location stack comes innermost first; at most this many of its
    /// outermost entries are shown (one per nesting level when too deep).
    const SHOWN: usize = 4;
    fn undecodable(message: &str) -> Option<String> {
        let rest = message.strip_prefix("failed to decode Protobuf message: ")?;
        let mut path = Vec::new();
        let mut what = rest;
        while let Some((head, tail)) = what.split_once(": ") {
            let is_field = head.split_once('.').is_some_and(|(m, f)| {
                !m.is_empty()
                    && !f.is_empty()
                    && head.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '.')
            });
            if !is_field {
                break;
            }
            path.push(head);
            what = tail;
        }
        let why = match what {
            "invalid string value: data is not UTF-8 encoded" => "invalid UTF-8 in a string field".to_owned(),
            "recursion limit reached" => "nested too deeply (more than 100 levels of messages)".to_owned(),
            other => format!("malformed protobuf ({other})"),
        };
        path.reverse();
        let mut at = path.iter().take(SHOWN).copied().collect::<Vec<_>>().join(" > ");
        if path.len() > SHOWN {
            at.push_str(&format!(" > ... ({} more)", path.len() - SHOWN));
        }
        Some(match at.is_empty() {
            true => format!("request could not be decoded: {why}"),
            false => format!("request could not be decoded: {why}, at {at}"),
        })
    }
    move |response: Response<B>| match tonic::Status::from_header_map(response.headers()) {
        Some(s)
            if s.code() == tonic::Code::OutOfRange && s.message().contains("message length too large") =>
        {
            let found = s.message().split("found ").nth(1).and_then(|r| r.split(' ').next()).unwrap_or("?");
            tonic::Status::invalid_argument(format!(
                "request message is {found} bytes, over the limit of {limit} bytes (set by --max-message-bytes)"
            ))
            .into_http()
        }
        Some(s) if s.code() == tonic::Code::Internal => match undecodable(s.message()) {
            Some(message) => tonic::Status::invalid_argument(message).into_http(),
            None => response,
        },
        _ => response,
    }
}

#[allow(clippy::too_many_arguments)]
fn spawn(
    routes: Routes,
    max_message_bytes: usize,
    connections: &ConnectionLimits,
    listener: TcpListener,
    addr: SocketAddr,
    reporter: HealthReporter,
    service: &'static str,
    drain: Duration,
    cancel_rest: Option<CancellationToken>,
    grpc_metrics: Option<Arc<crate::metrics::GrpcMetrics>>,
    tls: Option<Arc<ServerTls>>,
) -> Running {
    let stop = CancellationToken::new();
    let sever = CancellationToken::new();
    /// Receive windows of each call and each connection (see below).
    const STREAM_WINDOW: u32 = 64 * 1024;
    const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
    /// How often each connection is pinged (HTTP/2 PING)...
    const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
    /// ...and how long its answer may take before the connection is closed.
    const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
    // Never errors nor spins (backs off when out of descriptors); closes
    // connections without a handshake or idle past their timeouts.
    let incoming =
        ServerIncoming::new(Incoming::new(listener, &sever, connections), tls.clone(), connections);
    if let Some(tls) = &tls {
        tls.spawn_watcher(stop.clone());
    }
    // Unless given, tonic replaces hyper's per-connection stream limit (200)
    // and local-reset limit (1024, against "MadeYouReset" floods) with no
    // limit at all; h2's bound on streams reset before accept (20, against
    // "Rapid Reset") and hyper's 16 KiB header list limit stay as they are.
    // Keepalive pings find dead peers (a call on a silent connection would
    // otherwise wait forever).
    //
    // The receive windows keep unread request DATA frames within h2's
    // budget for them (half the connection window): a `RunStream` client
    // sending one small record per message while its run waits for the
    // fleet leaves one small frame per message unread, each charged about
    // 250 bytes, and under hyper's defaults (1 MiB stream window, 1 MiB
    // connection window, 512 KiB budget) about 2,300 of them made h2 close
    // the connection (ENHANCE_YOUR_CALM). A 64 KiB stream window holds at
    // most ~5,500 frames of 12 bytes (~1.3 MB of budget), under the 2 MiB a
    // 4 MiB connection window gives, and a connection's unread requests
    // stay within 4 MiB.
    let builder = Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(connections.max_concurrent_streams.max(1))
        .http2_max_local_error_reset_streams(Some(1024))
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT));
    // GOAWAY at the age, with no grace period: tonic's grace would cut the
    // calls still open (a long run) at age + grace.
    let builder = match connections.max_connection_age.is_zero() {
        true => builder,
        false => builder.max_connection_age(connections.max_connection_age),
    };
    let signal = stop.clone();
    let closing = sever.clone();
    let task = tokio::spawn(async move {
        let svc = tower::ServiceBuilder::new()
            .layer(crate::metrics::GrpcMetricsLayer::new(grpc_metrics))
            .layer(TrackCallsLayer)
            .map_response(request_errors_as_invalid_argument(max_message_bytes))
            .service(routes.prepare());
        let stop_accepting = CancellationToken::new();
        let serve =
            builder.serve_with_incoming_shutdown(svc, incoming, stop_accepting.clone().cancelled_owned());
        let mut serve = std::pin::pin!(serve);
        let transport = |e: tonic::transport::Error| Error::Transport(e.to_string());
        tokio::select! {
            r = &mut serve => return r.map_err(transport),
            _ = signal.cancelled() => {}
        }
        // NOT_SERVING first, while health watchers are still connected, then
        // stop accepting.
        reporter.set_service_status(service, ServingStatus::NotServing).await;
        reporter.set_service_status("", ServingStatus::NotServing).await;
        info!(%addr, drain_timeout = ?drain, "shutting down: draining open calls");
        stop_accepting.cancel();
        if let Ok(r) = tokio::time::timeout(drain, &mut serve).await {
            info!(%addr, "stopped");
            return r.map_err(transport);
        }
        if let Some(rest) = cancel_rest {
            warn!(%addr, "drain timeout passed; cancelling what is still running");
            rest.cancel();
            if let Ok(r) = tokio::time::timeout(CANCEL_GRACE, &mut serve).await {
                info!(%addr, "stopped");
                return r.map_err(transport);
            }
        }
        warn!(%addr, "closing with calls still open");
        closing.cancel();
        Ok(())
    });
    Running {
        addr,
        stop,
        sever,
        task,
        admission: None,
        auth: None,
        processor_token: None,
        processor_tls: None,
        metrics_addr: None,
        _metrics_stop: None,
        tls,
    }
}

/// Reloads `running`'s TLS files on every SIGHUP (Unix), until the process
/// ends; without TLS, SIGHUP is logged and otherwise ignored.
pub fn reload_tls_on_sighup(running: &Running) {
    // The handler is installed even without TLS: SIGHUP means "reload" to
    // operators (and the README), and its default action would end the
    // process. Token files need no signal (they are re-read within a second
    // of a change).
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let tls = running.tls().cloned();
        let processor_tls = running.processor_tls().cloned();
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        if let Some(processor_tls) = &processor_tls {
                            info!("SIGHUP: reloading the TLS files of processor connections");
                            let _ = processor_tls.reload();
                        }
                        match &tls {
                            Some(tls) => {
                                info!("SIGHUP: reloading TLS certificates");
                                let _ = tls.reload();
                            }
                            None if processor_tls.is_none() => {
                                info!("SIGHUP: nothing to reload (no TLS files); still serving")
                            }
                            None => {}
                        }
                    }
                });
            }
            Err(e) => warn!(error = %e, "cannot listen for SIGHUP; TLS files are still polled"),
        }
    }
    #[cfg(not(unix))]
    let _ = running;
}

/// Resolves on the first SIGINT or SIGTERM (SIGINT only off Unix). The
/// handlers are installed when this is called, not when it is first
/// polled, so a binary that calls it before announcing its address is never
/// ended by a signal's default action once the address is out.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (int, term) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate()));
        async move {
            match (int, term) {
                (Ok(mut int), Ok(mut term)) => tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                },
                _ => drop(tokio::signal::ctrl_c().await),
            }
        }
    }
    #[cfg(not(unix))]
    async move {
        drop(tokio::signal::ctrl_c().await);
    }
}
