//! One run's fan-out and fan-in: where records are sent out, retried and
//! gathered.
//!
//! A run is one task. It keeps up to `max_in_flight` record futures in a
//! `FuturesUnordered`; each future makes the record's attempts (waiting for a
//! slot on an instance, calling it, backing off). Results leave as events in
//! completion order; when the last is in, the report follows. Dropping the
//! task's futures cancels their calls, which is how a gone client, an
//! exceeded failure tolerance, a stalled client and shutdown stop the work
//! below them.
//!
//! The task always reads its processors' responses, whether or not its
//! client reads its events: results the client has not taken wait in a
//! small outbox, and while the outbox is full no new record is started, so
//! an unread run slows only itself (unread responses would otherwise fill
//! the HTTP/2 connection shared with every other run). A client that takes
//! nothing for the stalled-client timeout has its run cancelled.

use super::balancer::{CallError, Endpoint, RunQueue};
use super::report::{Abort, ReportBuilder};
use super::retry::{Backoff, is_transient};
use super::wire::ProcessRecordWire;
use crate::convert;
use crate::domain::{Failure, Outcome, RecordResult, RunEvent, RunProgress, RunRecord, RunSpec, UnitMode};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use prost::bytes::Bytes;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
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

/// What a run shares with its record futures.
struct RunCtx {
    run_id: Bytes,
    mode: UnitMode,
    params: Bytes,
    queue: RunQueue,
    backoff: Backoff,
    max_attempts: u32,
    record_timeout: Duration,
    /// Attempts made per record, readable when a record is cancelled mid-way.
    attempts: Vec<AtomicU32>,
}

/// How a run ends early, and its bounds.
#[derive(Debug, Clone)]
pub struct RunControl {
    /// Cancelled when the client's stream is dropped: stop, report nothing.
    pub client_gone: CancellationToken,
    /// Cancelled when the pipeline shuts down: stop, report `CANCELLED`.
    pub shutdown: CancellationToken,
    /// A client that takes no event for this long has its run cancelled.
    pub stalled_client_timeout: Duration,
    /// How often a `progress` event is sent.
    pub progress_interval: Duration,
}

/// The most failed records a run of `records` records tolerates: the
/// stricter of a count and a share, `None` when neither is set. A share is
/// exceeded as soon as more records failed than that share of all of them,
/// which for a run of known size is certain before it ends.
pub fn tolerated(count: Option<u32>, percentage: Option<f64>, records: usize) -> Option<u32> {
    let by_share =
        percentage.map(|p| (p / 100.0 * records as f64).floor().clamp(0.0, u32::MAX as f64) as u32);
    match (count, by_share) {
        (Some(c), Some(s)) => Some(c.min(s)),
        (c, s) => c.or(s),
    }
}

/// Runs `spec` to completion over the slots of `queue`'s balancer, sending
/// its events to `events`.
pub async fn execute(
    spec: RunSpec,
    queue: RunQueue,
    processor_count: usize,
    backoff: Backoff,
    events: mpsc::Sender<RunEvent>,
    control: RunControl,
) {
    let span = info_span!("run", run_id = %spec.run_id);
    execute_inner(spec, queue, processor_count, backoff, events, control).instrument(span).await
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

async fn execute_inner(
    spec: RunSpec,
    queue: RunQueue,
    processor_count: usize,
    backoff: Backoff,
    events: mpsc::Sender<RunEvent>,
    control: RunControl,
) {
    let n = spec.records.len();
    let opts = spec.options;
    info!(
        records = n,
        processors = processor_count,
        max_in_flight = opts.max_in_flight,
        mode = ?spec.mode,
        "run started"
    );
    let mut outbox = Outbox {
        tx: events,
        queue: VecDeque::new(),
        blocked_since: None,
        stall: control.stalled_client_timeout,
    };
    let started = RunEvent::Started {
        run_id: spec.run_id.clone(),
        record_count: n as u64,
        processor_count: processor_count as u32,
        started_at: SystemTime::now(),
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
    let ids = spec.records.iter().map(|r| r.id.clone()).collect();
    let mut report = ReportBuilder::new(spec.run_id.clone(), ids, opts.summary_only);
    let ctx = Arc::new(RunCtx {
        run_id: Bytes::from(spec.run_id.into_bytes()),
        mode: spec.mode,
        params: spec.params,
        queue,
        backoff,
        max_attempts: opts.max_attempts,
        record_timeout: opts.record_timeout,
        attempts: (0..n).map(|_| AtomicU32::new(0)).collect(),
    });
    let tolerated = tolerated(opts.tolerated_failures, opts.tolerated_failure_percentage, n);
    let run_started = Instant::now();
    let mut progress = tokio::time::interval_at(
        tokio::time::Instant::now() + control.progress_interval,
        control.progress_interval,
    );
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dispatched = 0u64;
    let mut pending = spec.records.into_iter().enumerate();
    let mut in_flight = FuturesUnordered::new();
    let mut abort = None;
    loop {
        // New records only while the client keeps up; in-flight ones are
        // always read. max(1): a limit of 0 must not strand records.
        while in_flight.len() < opts.max_in_flight.max(1) && outbox.queue.len() < OUTBOX_LIMIT {
            let Some((index, record)) = pending.next() else { break };
            in_flight.push(process_record(ctx.clone(), index as u64, record));
            dispatched += 1;
        }
        if in_flight.is_empty() && outbox.queue.is_empty() {
            break;
        }
        // Events wait for a client that is not taking them: watch the stall.
        let blocked = outbox.deadline().is_some();
        tokio::select! {
            biased;
            _ = control.client_gone.cancelled() => return gone(Gone::Left, &control),
            _ = control.shutdown.cancelled() => {
                warn!("pipeline shutting down; run cancelled");
                abort = Some(Abort::Shutdown);
                break;
            }
            sent = outbox.send_one(), if blocked => {
                if let Err(why) = sent {
                    return gone(why, &control);
                }
            }
            _ = progress.tick() => {
                outbox.offer(RunEvent::Progress(RunProgress {
                    records_received: n as u64,
                    records_dispatched: dispatched,
                    records_succeeded: report.succeeded(),
                    records_failed: report.failed(),
                    records_in_flight: in_flight.len() as u64,
                    record_count: n as u64,
                    elapsed: run_started.elapsed(),
                }));
            }
            Some(result) = in_flight.next(), if !in_flight.is_empty() => {
                report.add(&result);
                if let Err(why) = outbox.push(RunEvent::Record(result)) {
                    return gone(why, &control);
                }
                if tolerated.is_some_and(|t| report.failed() > u64::from(t)) {
                    warn!(failed = report.failed(), tolerated, "too many failed records; run aborted");
                    abort = Some(Abort::TooManyFailures);
                    break;
                }
            }
        }
    }
    // Dropping the in-flight futures cancels their processor calls.
    drop(in_flight);
    drop(pending);
    deliver!(outbox.flush());
    if let Some(why) = abort {
        let reason = match why {
            Abort::TooManyFailures => format!(
                "run aborted: {} records failed, more than the {} tolerated (tolerated_failures = {}, \
                 tolerated_failure_percentage = {} of {n} records)",
                report.failed(),
                tolerated.unwrap_or_default(),
                opts.tolerated_failures.map_or("unset".into(), |t| t.to_string()),
                opts.tolerated_failure_percentage.map_or("unset".into(), |p| format!("{p}%")),
            ),
            Abort::Shutdown => "run cancelled: the pipeline is shutting down".to_owned(),
        };
        for index in report.unfinished() {
            let result = report.cancelled(index, &reason, ctx.attempts[index].load(Ordering::Relaxed));
            report.add(&result);
            deliver!(outbox.send(RunEvent::Record(result)));
        }
    }
    let report = report.finish(abort);
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

/// One record's sub-pipeline: attempts until success, a permanent failure, or
/// `max_attempts`, each on a free slot of the least-loaded instance, avoiding
/// the last one. The attempt's timeout starts when it has its slot.
async fn process_record(ctx: Arc<RunCtx>, index: u64, record: RunRecord) -> RecordResult {
    let started = Instant::now();
    let record_id = record.id;
    let mut req = ProcessRecordWire {
        run_id: ctx.run_id.clone(),
        record: record.encoded,
        unit_mode: convert::unit_mode_to_proto(ctx.mode) as i32,
        params: ctx.params.clone(),
        attempt: 0,
    };
    let mut avoid = None;
    let mut not_started = 0;
    // Attempts made so far (sends refused as not started excluded), and the
    // instance of the last one (named in the result, formatted only then).
    let mut made = 0;
    let mut last: Option<Arc<Endpoint>> = None;
    let processor = |last: &Option<Arc<Endpoint>>| last.as_ref().map(|e| e.label()).unwrap_or_default();
    loop {
        let attempt = made + 1;
        let failure = match ctx.queue.acquire(avoid).await {
            // No instance is up: this counts as a failed attempt.
            Err(e) => tonic::Status::from(e),
            Ok(lease) => {
                req.attempt = attempt;
                ctx.attempts[index as usize].store(attempt, Ordering::Relaxed);
                last = Some(lease.endpoint().clone());
                avoid = Some(lease.endpoint_id());
                match lease.process(req.clone(), ctx.record_timeout).await {
                    Ok(resp) => {
                        let outcome = Outcome::Succeeded {
                            output: resp.output.unwrap_or_default(),
                            units_processed: resp.units_processed,
                        };
                        return result(record_id, index, outcome, attempt, processor(&last), started);
                    }
                    // Not an attempt: the processor never began it.
                    Err(CallError::NotStarted(_)) if not_started < MAX_NOT_STARTED => {
                        not_started += 1;
                        drop(lease);
                        debug!(record_id = ?record_id, processor = %processor(&last), "record not started; sent again");
                        tokio::time::sleep(ctx.backoff.delay(1)).await;
                        continue;
                    }
                    Err(CallError::NotStarted(status) | CallError::Failed(status)) => status,
                }
            }
        };
        made = attempt;
        ctx.attempts[index as usize].store(attempt, Ordering::Relaxed);
        not_started = 0;
        let code = failure.code();
        if is_transient(code) && attempt < ctx.max_attempts {
            let delay = ctx.backoff.delay(attempt);
            debug!(
                record_id = ?record_id,
                attempt,
                processor = %processor(&last),
                error = %failure.message(),
                code = ?code,
                delay_ms = delay.as_millis() as u64,
                "attempt failed; retrying"
            );
            tokio::time::sleep(delay).await;
            continue;
        }
        debug!(record_id = ?record_id, attempt, code = ?code, error = %failure.message(), "record failed");
        let outcome = Outcome::Failed(Failure { code, message: failure.message().to_owned() });
        return result(record_id, index, outcome, attempt, processor(&last), started);
    }
}

fn result(
    record_id: String,
    index: u64,
    outcome: Outcome,
    attempts: u32,
    processor: String,
    started: Instant,
) -> RecordResult {
    RecordResult { record_id, index, outcome, attempts, processor, elapsed: started.elapsed() }
}
