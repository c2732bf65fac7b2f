//! Distributed tracing across the hops client → pipeline → processor: the
//! W3C trace context (`traceparent`, `tracestate`) each call carries, the
//! spans made from it, and how many of a run's attempts get a span.
//!
//! - A `Run`/`RunStream` call's `traceparent` makes the run's `run` span its
//!   child. Every processor call (an *attempt*: one `ProcessRecord`, or one
//!   `ProcessBatch` of several records) carries the context on; the
//!   processor's `process` span of each record is then a child of the
//!   pipeline's `attempt` span, in the same trace.
//! - Spans reach a collector only when a binary installed the OpenTelemetry
//!   layer ([`telemetry`](crate::telemetry), `OTEL_EXPORTER_OTLP_ENDPOINT`).
//!   Without it nothing here makes an OpenTelemetry span: the trace id is
//!   still decided, sent on and logged, so logs of the three processes can
//!   be joined on it.
//! - Sampling is parent-based end to end: the run's span follows the
//!   sampler (`OTEL_TRACES_SAMPLER`, default parent-based always-on). Of a
//!   sampled run, the first `--trace-attempts-per-run` attempts (1000 by
//!   default) get a span and send a *sampled* `traceparent`; later ones get
//!   none and send the run's context marked not sampled, so the processor
//!   makes no exported span for them either (its log span still carries
//!   the trace id). A processor never starts a trace of its own: a call
//!   with no sampled `traceparent` gets no exported span. A million-record
//!   run is then about a thousand attempt spans and a thousand processor
//!   spans, not two million; the run span records `attempts_untraced`. A retry is an attempt like any other: failures
//!   past the cap are in the logs, not the trace.
//! - Trace id without any tracing configured: the incoming `traceparent`'s
//!   when the call had one, else a random one generated for the run. It is
//!   in `RunStarted.trace_id` and the `trace_id` field of the run's (and the
//!   processor's record) log spans either way.
//!
//! The context travels to where a request is built the way Go's `context`
//! does, scoped to the call's future ([`Outgoing::scope`]), and is written
//! into the request's metadata there ([`inject_current`]), so call sites
//! keep their signatures. Only the W3C format is spoken
//! (`TraceContextPropagator`), whatever `OTEL_PROPAGATORS` says.

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tracing::{Instrument, Span, debug_span, field, info_span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header naming the caller's span.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header of vendor state, passed on with `traceparent`.
pub const TRACESTATE: &str = "tracestate";

/// The pipeline's tracing flags.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct TraceArgs {
    /// Processor calls (attempts) of one sampled run that get a span of
    /// their own and pass the sampled trace on to the processor; later ones
    /// are counted on the run's span (`attempts_untraced`) instead. Bounds
    /// the spans of a big run; 0 traces the run span only.
    #[arg(long, env = "FANOUT_TRACE_ATTEMPTS_PER_RUN", default_value_t = 1000)]
    pub trace_attempts_per_run: u64,
}

impl Default for TraceArgs {
    fn default() -> Self {
        Self { trace_attempts_per_run: 1000 }
    }
}

/// Reads a tonic `MetadataMap` for the propagator.
struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Two header values for the propagator.
struct Pair<'a>(&'a str, Option<&'a str>);

impl Extractor for Pair<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => Some(self.0),
            TRACESTATE => self.1,
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

/// Whether `tp` has the W3C shape (`00-` + 32 + `-` + 16 + `-` + 2
/// lowercase hex digits; later versions may append fields), which the
/// SDK's propagator does not check: it takes `00-4bf9-00f0-01`.
fn well_formed(tp: &str) -> bool {
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let parts: Vec<&str> = tp.split('-').collect();
    match parts.as_slice() {
        [version, trace, span, flags, rest @ ..] => {
            hex(version, 2)
                && *version != "ff"
                && (rest.is_empty() || *version != "00")
                && hex(trace, 32)
                && hex(span, 16)
                && hex(flags, 2)
        }
        _ => false,
    }
}

/// The trace context a call arrived with: its caller's span, if the call
/// carried a valid `traceparent` (an invalid one is ignored, as W3C asks).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Parent(Option<SpanContext>);

impl Parent {
    /// From a request's `traceparent` and `tracestate`.
    pub fn from_metadata(metadata: &MetadataMap) -> Self {
        match metadata.get(TRACEPARENT).map(|v| v.to_str()) {
            Some(Ok(tp)) if well_formed(tp) => {
                Self::from_context(TraceContextPropagator::new().extract(&MetadataExtractor(metadata)))
            }
            _ => Self(None),
        }
    }

    /// From the two header values (`TRACEPARENT` / `TRACESTATE` env vars of
    /// a client). `None` when `traceparent` is not a valid W3C value.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        if !well_formed(traceparent.trim()) {
            return None;
        }
        let cx = TraceContextPropagator::new().extract(&Pair(traceparent.trim(), tracestate));
        Some(Self::from_context(cx)).filter(|p| p.0.is_some())
    }

    /// The context of an existing span (a client's own root span).
    pub fn of_span(span: &Span) -> Self {
        Self::from_context(span.context())
    }

    fn from_context(cx: opentelemetry::Context) -> Self {
        let sc = cx.span().span_context().clone();
        Self(sc.is_valid().then_some(sc))
    }

    /// The caller's span, when there is one.
    pub fn span_context(&self) -> Option<&SpanContext> {
        self.0.as_ref()
    }

    /// Whether the caller asked for this trace to be recorded.
    pub fn sampled(&self) -> bool {
        self.0.as_ref().is_some_and(SpanContext::is_sampled)
    }

    /// What to send on to a callee with this as its parent.
    pub fn outgoing(&self) -> Option<Outgoing> {
        self.0.as_ref().map(Outgoing::new)
    }
}

/// A span's context as the headers a call carries, formatted once.
#[derive(Debug, Clone)]
pub struct Outgoing {
    traceparent: AsciiMetadataValue,
    tracestate: Option<AsciiMetadataValue>,
}

tokio::task_local! {
    static OUTGOING: Outgoing;
}

impl Outgoing {
    /// The headers naming `sc` as the callee's parent.
    pub fn new(sc: &SpanContext) -> Self {
        let traceparent =
            format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8() & 0x01);
        let state = sc.trace_state().header();
        Self {
            traceparent: traceparent.parse().expect("hex and dashes are ASCII"),
            // A state that is no valid header value is dropped, not the call.
            tracestate: (!state.is_empty()).then(|| state.parse().ok()).flatten(),
        }
    }

    /// The `traceparent` value.
    pub fn traceparent(&self) -> &str {
        self.traceparent.to_str().expect("ASCII")
    }

    /// Writes the headers into `metadata`.
    pub fn inject(&self, metadata: &mut MetadataMap) {
        metadata.insert(TRACEPARENT, self.traceparent.clone());
        if let Some(state) = &self.tracestate {
            metadata.insert(TRACESTATE, state.clone());
        }
    }

    /// Runs `fut` with this as the context of the calls it makes (see
    /// [`inject_current`]).
    pub async fn scope<F: Future>(self, fut: F) -> F::Output {
        OUTGOING.scope(self, fut).await
    }
}

/// Writes the trace context of the call being made, if the future making it
/// runs in an [`Outgoing::scope`], into its request's `metadata`.
pub fn inject_current(metadata: &mut MetadataMap) {
    let _ = OUTGOING.try_with(|o| o.inject(metadata));
}

/// How a run is traced: the context its call arrived with, and its bound
/// on attempt spans.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunTracing {
    /// The `Run`/`RunStream` call's `traceparent`.
    pub parent: Parent,
    /// Attempts of the run that get a span (`--trace-attempts-per-run`).
    pub attempts_per_run: u64,
}

/// One run's trace: its id, its span's context, and the attempt-span budget.
#[derive(Debug)]
pub struct RunTrace {
    span: Span,
    trace_id: TraceId,
    /// An OpenTelemetry layer made the run's span (attempts get spans).
    otel: bool,
    sampled: bool,
    /// What traced attempts send when no span of their own can be made.
    sampled_out: Outgoing,
    /// What every untraced attempt sends: the run's context, not sampled;
    /// nothing when the run is not traced at all (no caller's context, no
    /// OpenTelemetry layer), so that untraced runs cost nothing per attempt.
    unsampled_out: Option<Outgoing>,
    left: AtomicU64,
    untraced: AtomicU64,
}

impl RunTrace {
    /// The trace of the run whose span is `span` (not entered yet, with the
    /// empty fields `trace_id` and `attempts_untraced`): parents it, and
    /// records its trace id on it.
    pub fn start(span: &Span, tracing: &RunTracing) -> Self {
        let incoming = tracing.parent.span_context();
        if let Some(parent) = incoming {
            let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent.clone()));
        }
        // With the OpenTelemetry layer this starts the run's span; without
        // it (or with the span filtered out) the context is invalid.
        let own = span.context().span().span_context().clone();
        let (sc, otel) = match (own.is_valid(), incoming) {
            (true, _) => (own, true),
            (false, Some(parent)) => (parent.clone(), false),
            (false, None) => (generated(), false),
        };
        span.record("trace_id", field::display(sc.trace_id()));
        let unsampled = SpanContext::new(
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().with_sampled(false),
            true,
            sc.trace_state().clone(),
        );
        Self {
            span: span.clone(),
            trace_id: sc.trace_id(),
            otel,
            sampled: sc.is_sampled(),
            sampled_out: Outgoing::new(&sc),
            unsampled_out: (otel || incoming.is_some()).then(|| Outgoing::new(&unsampled)),
            left: AtomicU64::new(tracing.attempts_per_run),
            untraced: AtomicU64::new(0),
        }
    }

    /// The trace id, 32 lowercase hex digits.
    pub fn trace_id(&self) -> String {
        self.trace_id.to_string()
    }

    /// One attempt (a call of `records` records, the first `record_id` on
    /// its `attempt`th attempt, to `processor`): a span and a sampled
    /// context while the run's budget lasts, otherwise neither.
    pub fn attempt(&self, record_id: &str, attempt: u32, records: usize, processor: &str) -> Attempt {
        let traced = self.sampled
            && self.left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok();
        if !traced {
            if self.unsampled_out.is_some() {
                self.untraced.fetch_add(1, Ordering::Relaxed);
            }
            return Attempt { span: Span::none(), outgoing: self.unsampled_out.clone() };
        }
        if !self.otel {
            // Passing the caller's sampled context on: the processor's spans
            // become its children.
            return Attempt { span: Span::none(), outgoing: Some(self.sampled_out.clone()) };
        }
        let span = info_span!(
            parent: &self.span,
            "attempt",
            otel.kind = "client",
            record_id = %record_id,
            attempt,
            records,
            processor = %processor,
        );
        let sc = span.context().span().span_context().clone();
        let outgoing = if sc.is_valid() { Outgoing::new(&sc) } else { self.sampled_out.clone() };
        Attempt { span, outgoing: Some(outgoing) }
    }

    /// Records on the run's span how many attempts got no span.
    pub fn finish(&self) {
        self.span.record("attempts_untraced", self.untraced.load(Ordering::Relaxed));
    }
}

/// A fresh trace for a run whose call carried none (not sampled: nothing
/// asked for it to be recorded).
fn generated() -> SpanContext {
    let trace = fastrand::u128(1..);
    let span = fastrand::u64(1..);
    SpanContext::new(
        TraceId::from(trace),
        SpanId::from(span),
        TraceFlags::NOT_SAMPLED,
        false,
        TraceState::NONE,
    )
}

/// One attempt's span (possibly none) and the context its call carries.
#[derive(Debug)]
pub struct Attempt {
    span: Span,
    outgoing: Option<Outgoing>,
}

impl Attempt {
    /// Runs the call `fut` in the attempt's span, carrying its context (as
    /// is, when the run is not traced at all).
    pub async fn scope<F: Future>(self, fut: F) -> F::Output {
        match self.outgoing {
            Some(outgoing) => outgoing.scope(fut.instrument(self.span)).await,
            None => fut.await,
        }
    }
}

/// A processor's span for one record of a call that arrived with `parent`.
/// When the caller's attempt was sampled it is an `info` span, the child
/// of that attempt, exported with the OpenTelemetry layer; otherwise a
/// `debug` span that only logs see. Either carries the trace id as the
/// `trace_id` field, when the call had one.
pub fn record_span(parent: &Parent, run_id: &str, record_id: &str, attempt: u32) -> Span {
    let span = if parent.sampled() {
        info_span!("process", otel.kind = "server", trace_id = field::Empty, run_id, record_id, attempt)
    } else {
        debug_span!("process", trace_id = field::Empty, run_id, record_id, attempt)
    };
    if let Some(sc) = parent.span_context()
        && !span.is_disabled()
    {
        span.record("trace_id", field::display(sc.trace_id()));
        if sc.is_sampled() {
            let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc.clone()));
        }
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_through_metadata() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parent = Parent::parse(value, Some("congo=t61rcWkgMzE")).expect("valid");
        assert!(parent.sampled());
        let mut md = MetadataMap::new();
        parent.outgoing().unwrap().inject(&mut md);
        assert_eq!(md.get(TRACEPARENT).unwrap(), value);
        assert_eq!(md.get(TRACESTATE).unwrap(), "congo=t61rcWkgMzE");
        assert_eq!(Parent::from_metadata(&md), parent);
    }

    #[test]
    fn invalid_traceparents_are_ignored() {
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf9-00f0-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(Parent::parse(bad, None).is_none(), "{bad:?}");
            let mut md = MetadataMap::new();
            if let Ok(v) = bad.parse() {
                md.insert(TRACEPARENT, v);
            }
            assert_eq!(Parent::from_metadata(&md), Parent::default(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn without_a_layer_the_run_keeps_the_callers_trace_and_caps_sampled_attempts() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let tracing = RunTracing { parent: Parent::parse(value, None).unwrap(), attempts_per_run: 2 };
        let trace = RunTrace::start(&Span::none(), &tracing);
        assert_eq!(trace.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let sent = |a: Attempt| async move {
            a.scope(async {
                let mut md = MetadataMap::new();
                inject_current(&mut md);
                md.get(TRACEPARENT).unwrap().to_str().unwrap().to_owned()
            })
            .await
        };
        assert_eq!(sent(trace.attempt("r", 1, 1, "p")).await, value);
        assert_eq!(sent(trace.attempt("r", 1, 1, "p")).await, value);
        // Past the cap: the same trace, not sampled.
        assert_eq!(sent(trace.attempt("r", 1, 1, "p")).await, value.replace("-01", "-00"));
        assert_eq!(trace.untraced.load(Ordering::Relaxed), 1);
        // Outside a scope nothing is written.
        let mut md = MetadataMap::new();
        inject_current(&mut md);
        assert!(md.is_empty());
    }

    #[tokio::test]
    async fn a_run_without_a_caller_gets_a_fresh_trace_id_and_sends_nothing() {
        let a = RunTrace::start(&Span::none(), &RunTracing::default());
        let b = RunTrace::start(&Span::none(), &RunTracing::default());
        assert_eq!(a.trace_id().len(), 32);
        assert_ne!(a.trace_id(), b.trace_id());
        assert!(!a.sampled);
        // Neither traced nor in a caller's trace: its calls carry no context.
        let md = a
            .attempt("r", 1, 1, "p")
            .scope(async {
                let mut md = MetadataMap::new();
                inject_current(&mut md);
                md
            })
            .await;
        assert!(md.is_empty());
    }
}
