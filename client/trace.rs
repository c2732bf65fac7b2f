//! The trace context `fanout run` sends with its run: the `TRACEPARENT`
//! (and `TRACESTATE`) environment variables when set (OpenTelemetry's
//! convention for passing a context to a process); else, when spans are
//! exported (`OTEL_EXPORTER_OTLP_ENDPOINT`), a root span of its own; else
//! none, and the pipeline starts the trace. With both, the client's span is
//! a child of `TRACEPARENT`'s.

use fanout::otel::{Outgoing, Parent};
use std::future::Future;
use tracing::{Instrument, Span};

/// The client's span (none unless exporting) and what its calls carry.
pub struct ClientTrace {
    span: Span,
    outgoing: Option<Outgoing>,
}

impl ClientTrace {
    /// From the environment; an invalid `TRACEPARENT` is reported and left out.
    pub fn start(exporting: bool) -> Self {
        let parent = std::env::var("TRACEPARENT").ok().and_then(|tp| {
            let state = std::env::var("TRACESTATE").ok();
            let parent = Parent::parse(&tp, state.as_deref());
            if parent.is_none() {
                eprintln!("warning: TRACEPARENT {tp:?} is not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>); ignored");
            }
            parent
        });
        if !exporting {
            return Self { span: Span::none(), outgoing: parent.and_then(|p| p.outgoing()) };
        }
        let span = tracing::info_span!("fanout run", otel.kind = "client");
        if let Some(p) = parent.as_ref().and_then(Parent::span_context) {
            use opentelemetry::trace::TraceContextExt;
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(p.clone()));
        }
        let own = Parent::of_span(&span).outgoing();
        Self { outgoing: own.or_else(|| parent.and_then(|p| p.outgoing())), span }
    }

    /// Runs `fut` (the run) in the client's span, its calls carrying the context.
    pub async fn scope<F: Future>(self, fut: F) -> F::Output {
        let fut = fut.instrument(self.span);
        match self.outgoing {
            Some(o) => o.scope(fut).await,
            None => fut.await,
        }
    }
}
