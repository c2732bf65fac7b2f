//! Tracing set-up for the binaries: `RUST_LOG` filters (default `info`),
//! events go to stderr so stdout stays for output, as text or as JSON lines
//! (`--log-format`); and, when asked for, spans exported over OTLP/gRPC
//! (see [`otel`](crate::otel) for what is traced).

use crate::error::Error;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::time::Duration;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, the event's
    /// fields at the top level (`message`, `record_id`, ...), and `spans`,
    /// the enclosing spans with theirs (`run_id` and `trace_id` of the run,
    /// `record_id`, `attempt` and `trace_id` of a record on a processor).
    Json,
}

/// Span export over OTLP/gRPC. Built by a binary (from the environment, see
/// [`TraceExport::from_env`]); the OpenTelemetry SDK reads the standard
/// `OTEL_*` variables itself (endpoint, headers, timeout, sampler,
/// batching, resource).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceExport {
    /// `service.name` unless `OTEL_SERVICE_NAME` or
    /// `OTEL_RESOURCE_ATTRIBUTES` name one.
    pub service_name: String,
}

impl TraceExport {
    /// For binaries: export when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, unless
    /// `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER` names another
    /// exporter than `otlp` (`none`).
    pub fn from_env(service_name: &str) -> Option<Self> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let endpoint =
            var("OTEL_EXPORTER_OTLP_ENDPOINT").or_else(|| var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"));
        let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let other = var("OTEL_TRACES_EXPORTER").is_some_and(|v| !v.trim().eq_ignore_ascii_case("otlp"));
        (endpoint.is_some() && !disabled && !other).then(|| Self { service_name: service_name.to_owned() })
    }
}

/// What [`init_with_traces`] installed; [`Telemetry::shutdown`] sends the
/// spans still buffered.
#[derive(Debug, Default)]
#[must_use = "shut it down on exit, or buffered spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is buffered and stops the exporter, waiting at most
    /// `limit`; a collector that does not answer costs that much, no more.
    pub async fn shutdown(self, limit: Duration) {
        let Some(provider) = self.provider else { return };
        // The exporter's calls run on this runtime: block another thread.
        let done = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(limit));
        match tokio::time::timeout(limit + Duration::from_millis(500), done).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => eprintln!("trace export shutdown: {e}"),
            Ok(Err(e)) => eprintln!("trace export shutdown: {e}"),
            Err(_) => eprintln!("trace export shutdown: no answer within {limit:?}; spans dropped"),
        }
    }
}

/// Installs a stderr subscriber in `format`, filtered by `RUST_LOG` (default
/// `default_filter`). Safe to call twice (the second call does nothing).
pub fn init(default_filter: &str, format: LogFormat) {
    let _ = init_with_traces(default_filter, format, None);
}

/// [`init`], plus, with `export`, an OpenTelemetry layer sending this
/// crate's `info` spans (whatever `RUST_LOG` says) to an OTLP/gRPC
/// collector in batches. Must run inside a Tokio runtime when exporting.
/// Without `export` no OpenTelemetry layer is installed at all.
pub fn init_with_traces(
    default_filter: &str,
    format: LogFormat,
    export: Option<TraceExport>,
) -> Result<Telemetry, Error> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let Some(export) = export else {
        // No export: exactly the plain subscriber, one global filter.
        let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
        let _ = match format {
            LogFormat::Text => builder.try_init(),
            LogFormat::Json => {
                builder.json().flatten_event(true).with_current_span(false).with_span_list(true).try_init()
            }
        };
        return Ok(Telemetry::default());
    };
    let provider = provider(&export)?;
    // Each layer filters for itself: RUST_LOG the lines, and only our own
    // spans (run, attempt, process) at info for the collector, whatever
    // RUST_LOG says; not the libraries'.
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => {
            fmt.json().flatten_event(true).with_current_span(false).with_span_list(true).boxed()
        }
    };
    let spans = Targets::new().with_target("fanout", tracing::Level::INFO);
    // The run's span is entered on every poll of its task: no clock reads
    // (busy/idle times) or OpenTelemetry context switches per entry, and no
    // thread or source-location attributes per span. Contexts travel
    // explicitly (otel.rs), never through `Context::current()`.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("fanout"))
        .with_tracked_inactivity(false)
        .with_context_activation(false)
        .with_threads(false)
        .with_location(false)
        .with_filter(spans);
    match tracing_subscriber::registry().with(fmt.with_filter(filter)).with(otel).try_init() {
        Ok(()) => Ok(Telemetry { provider: Some(provider) }),
        // Already installed: this exporter would never get a span.
        Err(_) => {
            let _ = provider.shutdown();
            Ok(Telemetry::default())
        }
    }
}

/// The SDK's tracer provider: OTLP/gRPC exporter, batch processor, sampler
/// and resource from the `OTEL_*` variables, `service.name` defaulting to
/// `export.service_name`.
fn provider(export: &TraceExport) -> Result<SdkTracerProvider, Error> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| Error::Config(format!("OTLP trace exporter (OTEL_EXPORTER_OTLP_*): {e}")))?;
    let detected = Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|v| !v.as_str().starts_with("unknown_service"));
    let resource = if named {
        detected
    } else {
        Resource::builder().with_service_name(export.service_name.clone()).build()
    };
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
}
