//! One run's fan-out and fan-in: where records are sent out, batched,
//! retried and gathered.
//!
//! A run is one task. Records come from its [`Source`] (all at once, or read
//! from a stream only as fast as they are dispatched). Up to `max_in_flight`
//! of them are in flight at once, in processor calls of up to
//! `max_batch_size` records each (a call first waits for a slot on the
//! least-loaded instance), or backing off before a retry. Each record is
//! owned by exactly one place at a time (the source, a call, a backoff, the
//! retry queue) until its result is handed to the report and sent as an
//! event, so each is reported exactly once. Results leave in completion
//! order; when the last is in, the report follows.
//!
//! Stopping early is cooperative: an exceeded failure tolerance, shutdown
//! or bad input cancels the run's stop token, every call and backoff gives
//! its records back at once (cancelling its processor call), and each record
//! not finished is reported `CANCELLED`. A client that goes away drops the
//! whole task instead: nobody is left to report to.
//!
//! The task always reads its processors' responses, whether or not its
//! client reads its events: results the client has not taken wait in a
//! small outbox, and while the outbox is full no new record is started, so
//! an unread run slows only itself (unread responses would otherwise fill
//! the HTTP/2 connection shared with every other run). A client that takes
//! nothing for the stalled-client timeout has its run cancelled.

use super::attempt_log;
use super::balancer::{CallError, Endpoint, RunQueue};
use super::input::Source;
use super::report::{Abort, Keep, ReportBuilder};
use super::retry::{Backoff, is_transient};
use super::wire::{ProcessBatchWire, ProcessRecordWire};
use crate::convert;
use crate::domain::{Failure, Outcome, RecordResult, RunEvent, RunProgress, RunRecord, RunSpec, UnitMode};
use crate::error::Error;
use crate::otel::RunTrace;
use crate::proto;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use prost::Message;
use prost::bytes::Bytes;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

/// Events a run keeps for a client that is not reading, beyond the
/// channel's own buffer, before it stops starting records.
const OUTBOX_LIMIT: usize = 64;

/// Consecutive "not started" refusals (a processor shared with other
/// pipelines was full) before they count as one failed attempt.
const MAX_NOT_STARTED: u32 = 20;

/// Finished records a streamed run needs before a failure share can be
/// judged while its total is not known yet.
pub const JUDGE_SHARE_AFTER: u64 = 1000;

/// What a run shares with its calls.
struct RunCtx {
    run_id: Bytes,
    mode: UnitMode,
    params: Bytes,
    queue: RunQueue,
    backoff: Backoff,
    max_attempts: u32,
    record_timeout: Duration,
    max_batch_size: usize,
    /// The run's start, when it logs attempts.
    attempt_epoch: Option<Instant>,
    /// Cancelled to stop the run early: calls and backoffs give their
    /// records back.
    stop: CancellationToken,
    trace: Arc<RunTrace>,
}

/// How a run ends early, and its bounds.
#[derive(Debug, Clone)]
pub struct RunControl {
    /// Cancelled when the client's stream is dropped: stop, report nothing.
    pub client_gone: CancellationToken,
    /// Cancelled when the pipeline shuts down: stop, report `CANCELLED`.
    pub shutdown: CancellationToken,
    /// A client that takes no event for this long (or, streaming, sends no
    /// input while the run waits for some) has its run cancelled.
    pub stalled_client_timeout: Duration,
    /// How often a `progress` event is sent.
    pub progress_interval: Duration,
    /// The run's trace parent and attempt-span budget.
    pub tracing: crate::otel::RunTracing,
}

/// The most failed records a run of `records` records tolerates: the
/// stricter of a count and a share, `None` when neither is set. A share is
/// exceeded as soon as more records failed than that share of all of them,
/// which for a run of known size is certain before it ends.
pub fn tolerated(count: Option<u32>, percentage: Option<f64>, records: u64) -> Option<u64> {
    let by_share =
        percentage.map(|p| (p / 100.0 * records as f64).floor().clamp(0.0, u64::MAX as f64) as u64);
    match (count.map(u64::from), by_share) {
        (Some(c), Some(s)) => Some(c.min(s)),
        (c, s) => c.or(s),
    }
}

/// Whether `failed` failed records of `finished` so far exceed what a run
/// tolerates. With the total known, the rule of [`tolerated`]; while a
/// stream's total is not known, a count is checked as it is and a share
/// against the records finished so far, once [`JUDGE_SHARE_AFTER`] have.
pub fn over_tolerance(
    count: Option<u32>,
    percentage: Option<f64>,
    failed: u64,
    finished: u64,
    total: Option<u64>,
) -> bool {
    match total {
        Some(total) => tolerated(count, percentage, total).is_some_and(|t| failed > t),
        None => {
            count.is_some_and(|c| failed > u64::from(c))
                || percentage.is_some_and(|p| {
                    finished >= JUDGE_SHARE_AFTER && failed as f64 > p / 100.0 * finished as f64
                })
        }
    }
}

/// Runs `spec` over its `source`'s records to completion over the slots of
/// `queue`'s balancer, sending its events to `events`.
pub async fn execute(
    spec: RunSpec,
    source: Source,
    queue: RunQueue,
    processor_count: usize,
    backoff: Backoff,
    events: mpsc::Sender<RunEvent>,
    control: RunControl,
) {
    let span = info_span!(
        "run",
        run_id = %spec.run_id,
        trace_id = tracing::field::Empty,
        attempts_untraced = tracing::field::Empty
    );
    let trace = Arc::new(RunTrace::start(&span, &control.tracing));
    execute_inner(spec, source, queue, processor_count, backoff, events, control, trace.clone())
        .instrument(span)
        .await;
    trace.finish();
}

/// Why sending to the client stopped.
enum Gone {
    /// The client cancelled or disconnected.
    Left,
    /// The client took nothing for the stalled-client timeout.
    Stalled,
}

/// Events on their way to the client: the channel, and an outbox for when
/// the channel is full.
struct Outbox {
    tx: mpsc::Sender<RunEvent>,
    queue: VecDeque<RunEvent>,
    /// Since when the client has taken nothing while events waited.
    blocked_since: Option<Instant>,
    stall: Duration,
}

impl Outbox {
    fn push(&mut self, event: RunEvent) -> Result<(), Gone> {
        if self.queue.is_empty() {
            match self.tx.try_send(event) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(Gone::Left),
                Err(mpsc::error::TrySendError::Full(event)) => self.queue.push_back(event),
            }
            self.blocked_since = Some(Instant::now());
        } else {
            self.queue.push_back(event);
        }
        Ok(())
    }

    /// Sends `event` only if the client has room for it now: for events a
    /// client that is not reading does not need (progress).
    fn offer(&mut self, event: RunEvent) {
        if self.queue.is_empty() {
            let _ = self.tx.try_send(event);
        }
    }

    fn deadline(&self) -> Option<tokio::time::Instant> {
        self.blocked_since.map(|t| tokio::time::Instant::from_std(t + self.stall))
    }

    /// Waits until the client takes one queued event (or the stall deadline).
    async fn send_one(&mut self) -> Result<(), Gone> {
        let deadline = self.deadline().unwrap_or_else(|| tokio::time::Instant::now() + self.stall);
        let permit = match tokio::time::timeout_at(deadline, self.tx.reserve()).await {
            Err(_) => return Err(Gone::Stalled),
            Ok(Err(_)) => return Err(Gone::Left),
            Ok(Ok(permit)) => permit,
        };
        if let Some(event) = self.queue.pop_front() {
            permit.send(event);
        }
        self.blocked_since = if self.queue.is_empty() { None } else { Some(Instant::now()) };
        Ok(())
    }

    /// Sends everything queued.
    async fn flush(&mut self) -> Result<(), Gone> {
        while !self.queue.is_empty() {
            self.send_one().await?;
        }
        Ok(())
    }

    /// Sends one more event and waits until it is in the channel.
    async fn send(&mut self, event: RunEvent) -> Result<(), Gone> {
        self.push(event)?;
        self.flush().await
    }
}

/// A record on its way: waiting for a call, in one, or backing off.
struct Pending {
    index: u64,
    record: RunRecord,
    /// Attempts made (refusals as not started excluded).
    attempts: u32,
    /// Consecutive "not started" refusals.
    not_started: u32,
    /// When its first call was formed.
    started: Option<Instant>,
    /// The instance of its last attempt.
    last: Option<Arc<Endpoint>>,
    /// Its attempts, when the run logs them.
    log: Vec<crate::domain::Attempt>,
}

impl Pending {
    fn new(index: u64, record: RunRecord) -> Self {
        Self { index, record, attempts: 0, not_started: 0, started: None, last: None, log: Vec::new() }
    }

    fn result(self, outcome: Outcome) -> RecordResult {
        RecordResult {
            record_id: self.record.id,
            index: self.index,
            outcome,
            attempts: self.attempts,
            processor: self.last.map(|e| e.label()).unwrap_or_default(),
            elapsed: self.started.map(|s| s.elapsed()).unwrap_or_default(),
            attempt_log: self.log,
        }
    }
}

/// How one record's call ended.
enum Step {
    Succeeded(proto::ProcessRecordResponse),
    Failed(tonic::Status),
    /// The processor never began it: not an attempt.
    NotStarted(tonic::Status),
    /// Left out of a batch the instance could not take whole: untouched.
    Requeue,
    /// The run stopped while it waited or was in flight.
    Stopped,
}

impl Step {
    /// How the attempt ended, for the attempt log: `None` when it succeeded.
    fn failure(&self) -> Option<Failure> {
        match self {
            Step::Succeeded(_) | Step::Requeue => None,
            Step::Failed(s) | Step::NotStarted(s) => Some(attempt_log::failure(s)),
            Step::Stopped => Some(Failure {
                code: tonic::Code::Cancelled,
                message: "the run stopped while the call was in flight".into(),
            }),
        }
    }
}

/// What a call or a backoff gives back.
enum Done {
    Call(Vec<(Pending, Step)>),
    /// Backed off: ready to be sent again (or, stopped, to be cancelled).
    Backoff(Pending),
}

/// Why a run stopped early.
enum Stop {
    /// Reported with a report of this status.
    Abort(Abort),
    /// Ended with this error instead of a report (bad input).
    Fault(Error),
}

#[allow(clippy::too_many_arguments)]
async fn execute_inner(
    spec: RunSpec,
    mut source: Source,
    queue: RunQueue,
    processor_count: usize,
    backoff: Backoff,
    events: mpsc::Sender<RunEvent>,
    control: RunControl,
    trace: Arc<RunTrace>,
) {
    let opts = spec.options;
    let mut tally = queue.metrics().run_started();
    info!(
        records = source.total(),
        processors = processor_count,
        max_in_flight = opts.max_in_flight,
        max_batch_size = opts.max_batch_size,
        mode = ?spec.mode,
        "run started"
    );
    let mut outbox = Outbox {
        tx: events,
        queue: VecDeque::new(),
        blocked_since: None,
        stall: control.stalled_client_timeout,
    };
    let epoch = Instant::now();
    let started = RunEvent::Started {
        run_id: spec.run_id.clone(),
        record_count: source.total().unwrap_or(0),
        processor_count: processor_count as u32,
        started_at: SystemTime::now(),
        trace_id: trace.trace_id(),
    };
    // Every send to the client also watches for it leaving.
    macro_rules! deliver {
        ($fut:expr) => {
            let sent = tokio::select! {
                r = $fut => r,
                _ = control.client_gone.cancelled() => Err(Gone::Left),
            };
            if let Err(why) = sent {
                return gone(why, &control);
            }
        };
    }
    deliver!(outbox.send(started));
    let keep = match &source {
        _ if opts.summary_only => Keep::Nothing,
        Source::Whole { total, .. } => Keep::All(*total as usize),
        Source::Stream(_) => Keep::Failures,
    };
    let mut report = ReportBuilder::new(spec.run_id.clone(), keep);
    let ctx = Arc::new(RunCtx {
        run_id: Bytes::from(spec.run_id.into_bytes()),
        mode: spec.mode,
        params: spec.params,
        queue,
        backoff,
        max_attempts: opts.max_attempts,
        record_timeout: opts.record_timeout,
        max_batch_size: opts.max_batch_size.max(1),
        attempt_epoch: opts.attempt_log.then_some(epoch),
        stop: CancellationToken::new(),
        trace,
    });
    let max_in_flight = opts.max_in_flight.max(1);
    // Received records waiting for dispatch: enough to fill every free
    // place at once, and no more.
    let prefetch = max_in_flight.max(ctx.max_batch_size);
    let run_started = Instant::now();
    let mut progress = tokio::time::interval_at(
        tokio::time::Instant::now() + control.progress_interval,
        control.progress_interval,
    );
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dispatched = 0u64;
    // Records owned by calls and backoffs, and those ready to go again.
    let mut in_flight = 0usize;
    let mut tasks: FuturesUnordered<BoxFuture<'static, Done>> = FuturesUnordered::new();
    let mut again: VecDeque<Pending> = VecDeque::new();
    let mut stop: Option<Stop> = None;
    // What records cancelled by the stop are told: set once, when it stops,
    // so every one of them reads the same counts.
    let mut reason = String::new();
    // Stops the run early: calls and backoffs hand their records back.
    macro_rules! halt {
        ($why:expr) => {{
            let why = $why;
            reason = stop_reason(&why, &opts, &report, source.total());
            stop = Some(why);
            ctx.stop.cancel();
        }};
    }
    // Since when the run has waited for input it wants.
    let mut input_wait: Option<tokio::time::Instant> = None;
    loop {
        // New records only while the client keeps up; in-flight ones are
        // always read. Records to send again go first.
        while stop.is_none() {
            let mut batch = Vec::new();
            while batch.len() < ctx.max_batch_size {
                if let Some(p) = again.pop_front() {
                    batch.push(p);
                    continue;
                }
                if in_flight >= max_in_flight || outbox.queue.len() >= OUTBOX_LIMIT {
                    break;
                }
                let Some((index, record)) = source.pop() else { break };
                in_flight += 1;
                dispatched += 1;
                batch.push(Pending::new(index, record));
            }
            if batch.is_empty() {
                break;
            }
            tasks.push(Box::pin(call(ctx.clone(), batch)));
        }
        let wants_input = stop.is_none() && source.wants_input(prefetch);
        if !wants_input {
            input_wait = None;
        } else if input_wait.is_none() {
            input_wait = Some(tokio::time::Instant::now());
        }
        if tasks.is_empty() && again.is_empty() && (stop.is_some() || source.exhausted()) {
            break;
        }
        let input_deadline = input_wait.map(|t| t + control.stalled_client_timeout);
        // Events wait for a client that is not taking them: watch the stall.
        let blocked = outbox.deadline().is_some();
        tokio::select! {
            biased;
            _ = control.client_gone.cancelled() => return gone(Gone::Left, &control),
            _ = control.shutdown.cancelled(), if stop.is_none() => {
                warn!("pipeline shutting down; run cancelled");
                halt!(Stop::Abort(Abort::Shutdown));
            }
            sent = outbox.send_one(), if blocked => {
                if let Err(why) = sent {
                    return gone(why, &control);
                }
            }
            Some(done) = tasks.next(), if !tasks.is_empty() => {
                let items = match done {
                    Done::Call(items) => items,
                    Done::Backoff(p) if stop.is_some() => vec![(p, Step::Stopped)],
                    Done::Backoff(p) => {
                        again.push_back(p);
                        continue;
                    }
                };
                for (mut p, step) in items {
                    let refused = matches!(step, Step::NotStarted(_));
                    let outcome = match step {
                        Step::Succeeded(resp) => Outcome::Succeeded {
                            output: resp.output.unwrap_or_default(),
                            units_processed: resp.units_processed,
                        },
                        Step::Requeue => {
                            again.push_front(p);
                            continue;
                        }
                        Step::Stopped => {
                            Outcome::Failed(Failure { code: tonic::Code::Cancelled, message: reason.clone() })
                        }
                        Step::NotStarted(status) if p.not_started < MAX_NOT_STARTED => {
                            p.not_started += 1;
                            debug!(record_id = %p.record.id, code = ?status.code(), "record not started; sent again");
                            tasks.push(Box::pin(back_off(ctx.clone(), p, ctx.backoff.delay(1))));
                            continue;
                        }
                        Step::NotStarted(status) | Step::Failed(status) => {
                            // Many refusals in a row count as one attempt (a
                            // failure after them was counted by its call).
                            if refused && p.not_started >= MAX_NOT_STARTED {
                                p.attempts += 1;
                                ctx.queue.metrics().attempt(p.last.as_deref(), status.code(), None);
                            }
                            p.not_started = 0;
                            let code = status.code();
                            if is_transient(code) && p.attempts < ctx.max_attempts && stop.is_none() {
                                let delay = ctx.backoff.delay(p.attempts);
                                debug!(
                                    record_id = %p.record.id,
                                    index = p.index,
                                    attempt = p.attempts,
                                    processor = %p.last.as_ref().map_or("", |e| e.addr.as_str()),
                                    error = %status.message(),
                                    code = ?code,
                                    delay_ms = delay.as_millis() as u64,
                                    "attempt failed; retrying"
                                );
                                tasks.push(Box::pin(back_off(ctx.clone(), p, delay)));
                                continue;
                            }
                            debug!(record_id = %p.record.id, index = p.index, attempt = p.attempts, code = ?code, error = %status.message(), "record failed");
                            Outcome::Failed(Failure { code, message: status.message().to_owned() })
                        }
                    };
                    in_flight -= 1;
                    let result = p.result(outcome);
                    report.add(&result);
                    ctx.queue.metrics().record(&result, true);
                    if let Err(why) = outbox.push(RunEvent::Record(result)) {
                        return gone(why, &control);
                    }
                }
                if stop.is_none()
                    && over_tolerance(
                        opts.tolerated_failures,
                        opts.tolerated_failure_percentage,
                        report.failed(),
                        report.finished(),
                        source.total(),
                    )
                {
                    warn!(failed = report.failed(), finished = report.finished(), "too many failed records; run aborted");
                    halt!(Stop::Abort(Abort::TooManyFailures));
                }
            }
            message = async { source.stream().expect("a stream wants input").next_message().await }, if wants_input => {
                input_wait = None;
                if let Err(fault) = source.stream().expect("a stream").accept(message) {
                    warn!(error = %fault, received = source.received(), "bad input; run ended");
                    halt!(Stop::Fault(fault));
                }
            }
            _ = sleep_until(input_deadline), if input_deadline.is_some() => {
                let waited = control.stalled_client_timeout;
                warn!(received = source.received(), waited_ms = waited.as_millis() as u64, "client sent no input; run ended");
                halt!(Stop::Fault(Error::DeadlineExceeded(format!(
                    "no input for {waited:?} after record {} while the run waited for more (set by \
                     --stalled-client-timeout)",
                    source.received()
                ))));
            }
            _ = progress.tick() => {
                outbox.offer(RunEvent::Progress(RunProgress {
                    records_received: source.received(),
                    records_dispatched: dispatched,
                    records_succeeded: report.succeeded(),
                    records_failed: report.failed(),
                    records_in_flight: in_flight as u64,
                    record_count: source.total().unwrap_or(0),
                    elapsed: run_started.elapsed(),
                }));
            }
        }
    }
    // Stopped early: what was received and never finished is reported.
    if stop.is_some() {
        let left: Vec<Pending> = again
            .drain(..)
            .chain(source.drain_received().into_iter().map(|(i, r)| Pending::new(i, r)))
            .collect();
        for p in left {
            let dispatched = p.started.is_some();
            let result =
                p.result(Outcome::Failed(Failure { code: tonic::Code::Cancelled, message: reason.clone() }));
            report.add(&result);
            ctx.queue.metrics().record(&result, dispatched);
            deliver!(outbox.send(RunEvent::Record(result)));
        }
    }
    deliver!(outbox.flush());
    let abort = match stop {
        Some(Stop::Fault(fault)) => {
            info!(received = source.received(), finished = report.finished(), "run ended by its input");
            let failure = Failure { code: fault.code(), message: fault.to_string() };
            tally.finish(None);
            deliver!(outbox.send(RunEvent::Aborted(failure)));
            return;
        }
        Some(Stop::Abort(why)) => Some(why),
        None => None,
    };
    let report = report.finish(abort);
    tally.finish(Some(report.status));
    info!(
        status = ?report.status,
        succeeded = report.summary.records_succeeded,
        failed = report.summary.records_failed,
        retries = report.summary.retries,
        elapsed_ms = report.elapsed.as_millis() as u64,
        "run finished"
    );
    deliver!(outbox.send(RunEvent::Report(report)));
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// What a record cancelled by an early stop is told.
fn stop_reason(
    stop: &Stop,
    opts: &crate::domain::RunOptions,
    report: &ReportBuilder,
    total: Option<u64>,
) -> String {
    match stop {
        Stop::Abort(Abort::TooManyFailures) => {
            let count = opts.tolerated_failures.map_or("unset".into(), |t| t.to_string());
            let share = opts.tolerated_failure_percentage.map_or("unset".into(), |p| format!("{p}%"));
            match total.and_then(|n| {
                tolerated(opts.tolerated_failures, opts.tolerated_failure_percentage, n).map(|t| (n, t))
            }) {
                Some((n, t)) => format!(
                    "run aborted: {} records failed, more than the {t} tolerated (tolerated_failures = {count}, \
                     tolerated_failure_percentage = {share} of {n} records)",
                    report.failed(),
                ),
                None => format!(
                    "run aborted: {} of the {} records finished so far failed, more than tolerated \
                     (tolerated_failures = {count}, tolerated_failure_percentage = {share})",
                    report.failed(),
                    report.finished(),
                ),
            }
        }
        Stop::Abort(Abort::Shutdown) => "run cancelled: the pipeline is shutting down".to_owned(),
        Stop::Fault(fault) if fault.code() == tonic::Code::InvalidArgument => {
            format!("run ended by bad input: {fault}")
        }
        Stop::Fault(fault) => format!("run ended: {fault}"),
    }
}

/// The run ends without its report: the client left, or stopped reading.
fn gone(why: Gone, control: &RunControl) {
    match why {
        Gone::Left => info!("client went away; run cancelled"),
        Gone::Stalled => warn!(
            stalled_client_timeout_ms = control.stalled_client_timeout.as_millis() as u64,
            "client read nothing for the stalled-client timeout; run cancelled"
        ),
    }
}

/// Waits `delay` before `p` may be sent again; at once if the run stops.
async fn back_off(ctx: Arc<RunCtx>, p: Pending, delay: Duration) -> Done {
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = ctx.stop.cancelled() => {}
    }
    Done::Backoff(p)
}

/// Bytes of a batch request beyond its records: run id, params, attempts,
/// framing.
const BATCH_OVERHEAD: usize = 16 * 1024;

/// One processor call for `batch` (one record, or several of one run): a
/// slot on the least-loaded instance (avoiding the first record's last
/// one), then `ProcessRecord` or `ProcessBatch`. The attempt's timeout
/// starts when it has its slot. Records the instance cannot take in one
/// call (its `Describe` limits) are handed back untouched.
async fn call(ctx: Arc<RunCtx>, mut batch: Vec<Pending>) -> Done {
    let now = Instant::now();
    for p in &mut batch {
        p.started.get_or_insert(now);
    }
    let avoid = batch[0].last.as_ref().map(|e| e.id);
    let lease = tokio::select! {
        lease = ctx.queue.acquire(avoid) => lease,
        _ = ctx.stop.cancelled() => return Done::Call(batch.into_iter().map(|p| (p, Step::Stopped)).collect()),
    };
    let lease = match lease {
        // No instance is up: this counts as a failed attempt.
        Err(e) => {
            let status = tonic::Status::from(e);
            let size = batch.len();
            return Done::Call(
                batch
                    .into_iter()
                    .map(|mut p| {
                        p.attempts += 1;
                        ctx.queue.metrics().attempt(None, status.code(), None);
                        if let Some(epoch) = ctx.attempt_epoch {
                            let failure = Some(attempt_log::failure(&status));
                            attempt_log::push(&mut p.log, epoch, p.attempts, None, now, failure, size);
                        }
                        (p, Step::Failed(status.clone()))
                    })
                    .collect(),
            );
        }
        Ok(lease) => lease,
    };
    let (max_batch, max_bytes) = lease.endpoint().batch_limits();
    let room = max_bytes.saturating_sub(ctx.params.len() + ctx.run_id.len() + BATCH_OVERHEAD);
    let mut bytes = 0;
    let fits = batch
        .iter()
        .take(max_batch)
        .take_while(|p| {
            bytes += p.record.encoded.len() + 8;
            bytes <= room
        })
        .count()
        .max(1);
    let rest = batch.split_off(fits);
    for p in &mut batch {
        p.attempts += 1;
        p.last = Some(lease.endpoint().clone());
    }
    let attempt_start = Instant::now();
    // A span (and a sampled context for the processor) while the run's budget lasts.
    let traced =
        ctx.trace.attempt(&batch[0].record.id, batch[0].attempts, batch.len(), &lease.endpoint().addr);
    let mut items: Vec<(Pending, Step)> = if let [p] = batch.as_slice() {
        // One record: the plain call, which every processor serves.
        let req = ProcessRecordWire {
            run_id: ctx.run_id.clone(),
            record: p.record.encoded.clone(),
            unit_mode: convert::unit_mode_to_proto(ctx.mode) as i32,
            params: ctx.params.clone(),
            attempt: p.attempts,
        };
        let step = tokio::select! {
            r = traced.scope(lease.process(req, ctx.record_timeout)) => match r {
                Ok(resp) => Step::Succeeded(resp),
                Err(CallError::NotStarted(s)) => Step::NotStarted(s),
                Err(CallError::Failed(s)) => Step::Failed(s),
            },
            _ = ctx.stop.cancelled() => Step::Stopped,
        };
        let p = batch.pop().expect("one record");
        vec![(p, step)]
    } else {
        let req = ProcessBatchWire {
            run_id: ctx.run_id.clone(),
            records: batch.iter().map(|p| p.record.encoded.clone()).collect(),
            unit_mode: convert::unit_mode_to_proto(ctx.mode) as i32,
            params: ctx.params.clone(),
            attempts: batch.iter().map(|p| p.attempts).collect(),
            record_timeout: Some(convert::duration_to_proto(ctx.record_timeout)),
        };
        // Each record's bound is applied by the processor; the call's is a
        // little later, so the processor's per-record answer wins.
        let timeout = ctx.record_timeout + (ctx.record_timeout / 10).max(Duration::from_secs(1));
        let outcome = tokio::select! {
            r = traced.scope(lease.process_batch(req, timeout)) => Some(r),
            _ = ctx.stop.cancelled() => None,
        };
        match outcome {
            None => batch.into_iter().map(|p| (p, Step::Stopped)).collect(),
            Some(Err(e)) => {
                let step = |e: &CallError| match e {
                    CallError::NotStarted(s) => Step::NotStarted(s.clone()),
                    CallError::Failed(s) => Step::Failed(s.clone()),
                };
                batch.into_iter().map(|p| (p, step(&e))).collect()
            }
            Some(Ok(resp)) if resp.results.len() != batch.len() => {
                let status = tonic::Status::internal(format!(
                    "{}: ProcessBatch answered {} results for {} records",
                    lease.endpoint().addr,
                    resp.results.len(),
                    batch.len()
                ));
                batch.into_iter().map(|p| (p, Step::Failed(status.clone()))).collect()
            }
            Some(Ok(resp)) => {
                batch.into_iter().zip(resp.results).map(|(p, item)| (p, batch_step(item))).collect()
            }
        }
    };
    let size = items.len();
    for (p, step) in &mut items {
        let refused = matches!(step, Step::NotStarted(_));
        // A refusal is no attempt, unless one of so many in a row that
        // they count as one.
        if let Some(epoch) = ctx.attempt_epoch
            && (!refused || p.not_started >= MAX_NOT_STARTED)
        {
            let (endpoint, failure) = (Some(&**lease.endpoint()), step.failure());
            attempt_log::push(&mut p.log, epoch, p.attempts, endpoint, attempt_start, failure, size);
        }
        let code = match step {
            Step::NotStarted(_) => {
                p.attempts -= 1;
                continue;
            }
            Step::Requeue => continue,
            Step::Succeeded(_) => tonic::Code::Ok,
            Step::Failed(s) => s.code(),
            Step::Stopped => tonic::Code::Cancelled,
        };
        ctx.queue.metrics().attempt(Some(lease.endpoint()), code, Some(attempt_start));
    }
    drop(lease);
    items.extend(rest.into_iter().map(|p| (p, Step::Requeue)));
    Done::Call(items)
}

/// One record's outcome in a `ProcessBatch` response.
fn batch_step(item: proto::BatchItem) -> Step {
    match item.outcome {
        Some(proto::batch_item::Outcome::Processed(resp)) => match resp.encoded_len() {
            // The limit a ProcessRecord response meets: any result fits in one event.
            len if len > super::balancer::MAX_RESPONSE_BYTES => {
                Step::Failed(tonic::Status::out_of_range(format!(
                    "the record's result is {len} bytes, over the limit of {} for one result",
                    super::balancer::MAX_RESPONSE_BYTES
                )))
            }
            _ => Step::Succeeded(resp),
        },
        Some(proto::batch_item::Outcome::Error(e)) => {
            Step::Failed(tonic::Status::new(e.code.into(), e.message))
        }
        None => Step::Failed(tonic::Status::internal("ProcessBatch answered an empty result for the record")),
    }
}
