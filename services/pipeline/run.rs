//! One run's fan-out and fan-in: where records are sent out, retried and
//! gathered.
//!
//! A run is one task. It keeps up to `max_in_flight` record futures in a
//! `FuturesUnordered`; each future makes the record's attempts (choosing an
//! instance, calling it, backing off). Results leave as events in completion
//! order; when the last is in, the report follows. Dropping the task's
//! futures cancels their calls, which is how a gone client, an exceeded
//! failure tolerance and shutdown stop the work below them.

use super::balancer::Balancer;
use super::report::{Abort, ReportBuilder};
use super::retry::{Backoff, is_transient};
use crate::convert;
use crate::domain::{Failure, Outcome, Payload, RecordResult, RunEvent, RunRecord, RunSpec, UnitMode};
use crate::proto;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

/// What a run shares with its record futures.
struct RunCtx {
    run_id: String,
    mode: UnitMode,
    params: Payload,
    balancer: Arc<Balancer>,
    backoff: Backoff,
    max_attempts: u32,
    record_timeout: Duration,
    /// Attempts made per record, readable when a record is cancelled mid-way.
    attempts: Vec<AtomicU32>,
}

/// How a run ends early.
#[derive(Debug, Clone)]
pub struct RunControl {
    /// Cancelled when the client's stream is dropped: stop, report nothing.
    pub client_gone: CancellationToken,
    /// Cancelled when the pipeline shuts down: stop, report `CANCELLED`.
    pub shutdown: CancellationToken,
}

/// Runs `spec` to completion, sending its events to `events`.
pub async fn execute(
    spec: RunSpec,
    balancer: Arc<Balancer>,
    backoff: Backoff,
    events: mpsc::Sender<RunEvent>,
    control: RunControl,
) {
    let span = info_span!("run", run_id = %spec.run_id);
    execute_inner(spec, balancer, backoff, events, control).instrument(span).await
}

async fn execute_inner(
    spec: RunSpec,
    balancer: Arc<Balancer>,
    backoff: Backoff,
    events: mpsc::Sender<RunEvent>,
    control: RunControl,
) {
    let n = spec.records.len();
    let opts = spec.options;
    info!(
        records = n,
        processors = balancer.endpoints().len(),
        max_in_flight = opts.max_in_flight,
        mode = ?spec.mode,
        "run started"
    );
    let started = RunEvent::Started {
        run_id: spec.run_id.clone(),
        record_count: n as u32,
        processor_count: balancer.endpoints().len() as u32,
        started_at: SystemTime::now(),
    };
    let send = |event| async {
        tokio::select! {
            r = events.send(event) => r.is_ok(),
            _ = control.client_gone.cancelled() => false,
        }
    };
    if !send(started).await {
        return;
    }
    let ids = spec.records.iter().map(|r| r.id.clone()).collect();
    let mut report = ReportBuilder::new(spec.run_id.clone(), ids, opts.summary_only);
    let ctx = Arc::new(RunCtx {
        run_id: spec.run_id,
        mode: spec.mode,
        params: spec.params,
        balancer,
        backoff,
        max_attempts: opts.max_attempts,
        record_timeout: opts.record_timeout,
        attempts: (0..n).map(|_| AtomicU32::new(0)).collect(),
    });
    let mut pending = spec.records.into_iter().enumerate();
    let mut in_flight = FuturesUnordered::new();
    let mut abort = None;
    loop {
        // max(1): even a misconfigured limit of 0 must not strand records.
        while in_flight.len() < opts.max_in_flight.max(1) {
            let Some((index, record)) = pending.next() else { break };
            in_flight.push(process_record(ctx.clone(), index, record));
        }
        let result = tokio::select! {
            biased;
            _ = control.client_gone.cancelled() => {
                info!("client went away; run cancelled");
                return;
            }
            _ = control.shutdown.cancelled() => {
                warn!("pipeline shutting down; run cancelled");
                abort = Some(Abort::Shutdown);
                break;
            }
            next = in_flight.next() => match next {
                Some(result) => result,
                None => break,
            },
        };
        report.add(&result);
        if !send(RunEvent::Record(result)).await {
            return;
        }
        if opts.tolerated_failures.is_some_and(|t| report.failed() > t) {
            warn!(
                failed = report.failed(),
                tolerated = opts.tolerated_failures,
                "too many failed records; run aborted"
            );
            abort = Some(Abort::TooManyFailures);
            break;
        }
    }
    // Dropping the in-flight futures cancels their processor calls.
    drop(in_flight);
    drop(pending);
    if let Some(why) = abort {
        let reason = match why {
            Abort::TooManyFailures => format!(
                "run aborted: {} records failed, more than tolerated_failures = {}",
                report.failed(),
                opts.tolerated_failures.unwrap_or_default()
            ),
            Abort::Shutdown => "run cancelled: the pipeline is shutting down".to_owned(),
        };
        for result in report.cancel_unfinished(&reason, |i| ctx.attempts[i].load(Ordering::Relaxed)) {
            report.add(&result);
            if !send(RunEvent::Record(result)).await {
                return;
            }
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
    send(RunEvent::Report(report)).await;
}

/// One record's sub-pipeline: attempts until success, a permanent failure, or
/// `max_attempts`, each on the least-loaded instance, avoiding the last one.
async fn process_record(ctx: Arc<RunCtx>, index: usize, record: RunRecord) -> RecordResult {
    let started = Instant::now();
    let mut req = proto::ProcessRecordRequest {
        run_id: ctx.run_id.clone(),
        record: Some(proto::Record { id: record.id, attributes: Some(record.attributes) }),
        unit_mode: convert::unit_mode_to_proto(ctx.mode) as i32,
        params: Some(ctx.params.clone()),
        attempt: 0,
    };
    let mut avoid = None;
    loop {
        req.attempt += 1;
        let attempt = req.attempt;
        ctx.attempts[index].store(attempt, Ordering::Relaxed);
        let lease = ctx.balancer.pick(avoid);
        let result = lease.process(req.clone(), ctx.record_timeout).await;
        let record_id = req.record.as_ref().map(|r| r.id.clone()).unwrap_or_default();
        let outcome = match result {
            Ok(resp) => Outcome::Succeeded {
                output: resp.output.unwrap_or_default(),
                units_processed: resp.units_processed,
            },
            Err(status) => {
                let code = status.code();
                if is_transient(code) && attempt < ctx.max_attempts {
                    let delay = ctx.backoff.delay(attempt);
                    debug!(
                        record_id = %record_id,
                        attempt,
                        processor = lease.url(),
                        error = %status.message(),
                        code = ?code,
                        delay_ms = delay.as_millis() as u64,
                        "attempt failed; retrying"
                    );
                    avoid = Some(lease.index);
                    drop(lease);
                    tokio::time::sleep(delay).await;
                    continue;
                }
                debug!(record_id = %record_id, attempt, code = ?code, error = %status.message(), "record failed");
                Outcome::Failed(Failure { code, message: status.message().to_owned() })
            }
        };
        return RecordResult {
            record_id,
            index,
            outcome,
            attempts: attempt,
            processor: lease.url().to_owned(),
            elapsed: started.elapsed(),
        };
    }
}
