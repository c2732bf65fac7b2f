//! The processor engine: runs one record through a [`Workload`].
//!
//! Units run on the processor's [`UnitPool`] of `unit_threads` OS threads,
//! never on the async workers; the pool's size bounds how many run at once
//! across *all* records in flight, so a burst of records cannot oversubscribe
//! the cores. Dropping [`Engine::process`]'s future (the gRPC call was
//! cancelled, or its deadline passed) stops every unit of that record that
//! has not started yet, and sets the [`Cancel`] flag that running units
//! check, so they stop too.
//!
//! One opt-in exception, for workloads whose units are all tiny: handing a
//! unit to another thread and back costs a few microseconds, more than such
//! a unit itself. The engine tracks a decaying maximum of recent unit
//! durations ([`UnitCost`]); with a non-zero *inline budget*, a record whose
//! units together are expected to take less than it runs them on the async
//! worker directly. The estimate cannot foresee a unit far slower than the
//! recent ones (say, the same workload with bigger params): such a unit would
//! block an async worker and ignore cancellation, which is why the budget is
//! zero (off) unless the operator sets it.

pub mod pool;

pub use pool::UnitPool;

use crate::domain::{RecordOutput, RecordTask, UnitMode};
use crate::error::Error;
use crate::workload::{Cancel, ErrorKind, Workload, WorkloadError};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tracing::{Instrument, Span, debug, debug_span, trace};

/// Counters an engine keeps; tests and operators read them.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Records handed to the engine.
    pub records_started: AtomicU64,
    /// Records processed successfully.
    pub records_succeeded: AtomicU64,
    /// Records that ended with an error.
    pub records_failed: AtomicU64,
    /// Records whose call was dropped before they finished.
    pub records_cancelled: AtomicU64,
    /// Units that began processing.
    pub units_started: AtomicU64,
    /// Units that finished (successfully, with an error, or by panicking).
    pub units_finished: AtomicU64,
    /// Units by outcome, and their durations, for Prometheus.
    pub units: crate::metrics::UnitMetrics,
}

impl EngineStats {
    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::SeqCst)
    }
}

/// Runs records through a workload on a fixed pool of unit threads.
pub struct Engine<W> {
    workload: Arc<W>,
    pool: UnitPool,
    max_units: usize,
    stats: Arc<EngineStats>,
    cost: Arc<UnitCost>,
    inline_budget: Duration,
}

/// A decaying maximum of recent unit durations: the engine's estimate of
/// what one unit costs.
#[derive(Debug)]
pub struct UnitCost {
    recent_max_ns: AtomicU64,
}

impl Default for UnitCost {
    fn default() -> Self {
        // Unknown until a unit has been measured: assume expensive.
        Self { recent_max_ns: AtomicU64::new(u64::MAX) }
    }
}

impl UnitCost {
    /// Folds in one unit's duration: a slower unit raises the estimate at
    /// once; each faster one lowers it by 1/16 of the gap.
    pub fn observe(&self, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let _ = self.recent_max_ns.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
            Some(if ns >= old || old == u64::MAX { ns } else { old - (old - ns) / 16 })
        });
    }

    /// Whether `units` units fit in `budget` by the current estimate.
    pub fn fits(&self, units: usize, budget: Duration) -> bool {
        let per_unit = self.recent_max_ns.load(Ordering::Relaxed);
        let budget = u64::try_from(budget.as_nanos()).unwrap_or(u64::MAX);
        per_unit != u64::MAX && per_unit.saturating_mul(units as u64) < budget
    }
}

impl<W: Workload> Engine<W> {
    /// An engine running at most `unit_threads` units at once and refusing
    /// records of more than `max_units` units.
    pub fn new(workload: W, unit_threads: usize, max_units: usize) -> Self {
        Self {
            workload: Arc::new(workload),
            pool: UnitPool::new(unit_threads, "fanout-unit"),
            max_units,
            stats: Arc::default(),
            cost: Arc::default(),
            inline_budget: Duration::ZERO,
        }
    }

    /// Sets the inline budget (see the [module docs](self)); zero, the
    /// default, sends every unit to the unit threads.
    pub fn with_inline_budget(mut self, budget: Duration) -> Self {
        self.inline_budget = budget;
        self
    }

    /// The engine's counters.
    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.stats
    }

    /// Unit jobs waiting for a unit thread.
    pub fn queued_units(&self) -> usize {
        self.pool.queued()
    }

    /// The workload's name.
    pub fn workload_name(&self) -> &str {
        self.workload.name()
    }

    /// Extracts, processes and aggregates one record.
    pub async fn process(&self, task: RecordTask) -> Result<RecordOutput, Error> {
        let span = debug_span!(
            "record",
            run_id = %task.run_id,
            record_id = %task.record.id,
            attempt = task.attempt
        );
        self.process_inner(task).instrument(span).await
    }

    async fn process_inner(&self, task: RecordTask) -> Result<RecordOutput, Error> {
        let started = Instant::now();
        self.stats.records_started.fetch_add(1, Ordering::Relaxed);
        let mut guard = CancelGuard { cancelled: Cancel::new(), finished: false, stats: &self.stats };
        let result = self.run(&task, &guard.cancelled).await;
        guard.finished = true;
        let counter = match &result {
            Ok(_) => &self.stats.records_succeeded,
            Err(_) => &self.stats.records_failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        match &result {
            Ok((_, n)) => debug!(units = n, elapsed_us = started.elapsed().as_micros() as u64, "record done"),
            Err(e) => debug!(error = %e, "record failed"),
        }
        let (output, units) = result?;
        Ok(RecordOutput { output, units_processed: units, elapsed: started.elapsed() })
    }

    async fn run(
        &self,
        task: &RecordTask,
        cancelled: &Cancel,
    ) -> Result<(crate::domain::JsonMap, u32), Error> {
        let id = &task.record.id;
        let units = guarded(id, Step::Extract, || self.workload.extract(&task.record, &task.params))?;
        let count = units.len();
        if count > self.max_units {
            return Err(Error::LimitExceeded {
                what: format!("record {id:?}: the number of units"),
                got: count as u64,
                limit: self.max_units as u64,
                setting: "--max-units-per-record",
            });
        }
        debug!(units = count, mode = ?task.mode, "record started");
        let ctx = UnitCtx {
            count,
            record_id: id.clone(),
            cancelled: cancelled.clone(),
            span: Span::current(),
            cost: self.cost.clone(),
        };
        let inline = self.cost.fits(count, self.inline_budget);
        let outputs = match task.mode {
            _ if inline => {
                // Cheap by the estimate: cheaper to run here than to hand off.
                let workload = &*self.workload;
                units
                    .into_iter()
                    .enumerate()
                    .map(|(i, u)| run_unit(workload, &self.stats, &ctx, i, u))
                    .collect::<Result<_, _>>()?
            }
            UnitMode::Sequential => self.sequential(units, ctx).await?,
            UnitMode::Parallel => self.parallel(units, ctx).await?,
        };
        let output = guarded(id, Step::Aggregate, || self.workload.aggregate(&task.record, outputs))?;
        Ok((output, count as u32))
    }

    /// All units in order on one unit thread.
    async fn sequential(&self, units: Vec<W::Unit>, ctx: UnitCtx) -> Result<Vec<W::Output>, Error> {
        let (workload, stats) = (self.workload.clone(), self.stats.clone());
        self.pool
            .run(move || {
                units
                    .into_iter()
                    .enumerate()
                    .map(|(i, unit)| run_unit(&*workload, &stats, &ctx, i, unit))
                    .collect()
            })
            .await?
    }

    /// Every unit as its own job on the unit threads (the `join_all` of the
    /// design, woken once for the whole record rather than once per unit).
    /// The first failing unit makes the others that have not started skip.
    async fn parallel(&self, units: Vec<W::Unit>, ctx: UnitCtx) -> Result<Vec<W::Output>, Error> {
        let ctx = Arc::new(ctx);
        let jobs: Vec<_> = units
            .into_iter()
            .enumerate()
            .map(|(i, unit)| {
                let (workload, stats, ctx) = (self.workload.clone(), self.stats.clone(), ctx.clone());
                move || {
                    let out = run_unit(&*workload, &stats, &ctx, i, unit);
                    if out.is_err() {
                        ctx.cancelled.cancel();
                    }
                    out
                }
            })
            .collect();
        let results = self.pool.run_all(jobs).await?;
        let mut outputs = Vec::with_capacity(results.len());
        let mut skipped = None;
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Some(Ok(out)) => outputs.push(out),
                // Skipped because another unit failed: report that one.
                Some(Err(e @ Error::Cancelled(_))) => skipped = skipped.or(Some(e)),
                Some(Err(e)) => return Err(e),
                None => {
                    return Err(Error::Internal(format!(
                        "record {:?}: unit {}/{} ended without a result",
                        ctx.record_id,
                        i + 1,
                        ctx.count
                    )));
                }
            }
        }
        match skipped {
            Some(e) => Err(e),
            None => Ok(outputs),
        }
    }
}

/// What a unit needs to know about its record.
struct UnitCtx {
    count: usize,
    record_id: String,
    cancelled: Cancel,
    span: Span,
    cost: Arc<UnitCost>,
}

/// Runs one unit on the current (unit) thread, turning errors and panics
/// into an [`Error`] naming the unit.
fn run_unit<W: Workload>(
    workload: &W,
    stats: &EngineStats,
    ctx: &UnitCtx,
    i: usize,
    unit: W::Unit,
) -> Result<W::Output, Error> {
    if ctx.cancelled.is_cancelled() {
        return Err(Error::Cancelled(format!("record {:?}: cancelled before unit {}", ctx.record_id, i + 1)));
    }
    let _enter = ctx.span.enter();
    stats.units_started.fetch_add(1, Ordering::SeqCst);
    trace!(unit = i, units = ctx.count, "unit {}/{} of {}", i + 1, ctx.count, ctx.record_id);
    let started = Instant::now();
    let result = guarded(&ctx.record_id, Step::Unit { index: i, count: ctx.count }, || {
        workload.process(unit, &ctx.cancelled)
    });
    let took = started.elapsed();
    ctx.cost.observe(took);
    stats.units.unit(result.is_ok(), took);
    stats.units_finished.fetch_add(1, Ordering::SeqCst);
    result
}

/// Runs one step of the workload (`what`, e.g. "unit 3/17"), turning its
/// error into one naming the record and the step, and a panic into
/// `INTERNAL`: a panicking workload fails the record, never the call's task
/// (which would reset the stream and look like a dead processor).
fn guarded<T>(
    record_id: &str,
    what: Step,
    step: impl FnOnce() -> Result<T, WorkloadError>,
) -> Result<T, Error> {
    match std::panic::catch_unwind(AssertUnwindSafe(step)) {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(e)) => Err(record_error(record_id, what, e)),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".into());
            Err(Error::Internal(format!("record {record_id:?}: {what} panicked: {msg}")))
        }
    }
}

/// Which step of the workload ran: named in errors, formatted only then (a
/// unit's name is not built on the hot path).
#[derive(Debug, Clone, Copy)]
enum Step {
    Extract,
    Aggregate,
    Unit { index: usize, count: usize },
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Extract => f.write_str("extracting units"),
            Step::Aggregate => f.write_str("aggregating"),
            Step::Unit { index, count } => write!(f, "unit {}/{count}", index + 1),
        }
    }
}

/// A workload error as the engine reports it: with the record, and the unit
/// when a unit failed (invalid input already names its field).
fn record_error(record_id: &str, what: Step, e: WorkloadError) -> Error {
    let msg = match what {
        Step::Unit { .. } => format!("record {record_id:?} {what}: {e}"),
        // Invalid input already names its field.
        Step::Extract | Step::Aggregate => format!("record {record_id:?}: {e}"),
    };
    match e.kind {
        ErrorKind::Invalid => Error::InvalidArgument(msg),
        ErrorKind::Permanent => Error::FailedPrecondition(msg),
        ErrorKind::Transient => Error::Unavailable(msg),
        ErrorKind::Cancelled => Error::Cancelled(msg),
    }
}

/// Marks a record cancelled when its future is dropped before it finished.
struct CancelGuard<'a> {
    cancelled: Cancel,
    finished: bool,
    stats: &'a EngineStats,
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.cancelled.cancel();
            self.stats.records_cancelled.fetch_add(1, Ordering::SeqCst);
            debug!("record cancelled; its remaining units will not start");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_cost_rises_at_once_and_decays_slowly() {
        let cost = UnitCost::default();
        let budget = Duration::from_micros(50);
        assert!(!cost.fits(1, budget), "unknown cost is never inlined");
        cost.observe(Duration::from_micros(2));
        assert!(cost.fits(10, budget));
        assert!(!cost.fits(100, budget), "the budget is for the whole record");
        cost.observe(Duration::from_millis(100));
        assert!(!cost.fits(1, budget), "one slow unit stops inlining at once");
        for _ in 0..50 {
            cost.observe(Duration::from_micros(2));
        }
        assert!(!cost.fits(1, budget), "and it takes many fast units to resume");
        for _ in 0..500 {
            cost.observe(Duration::from_micros(2));
        }
        assert!(cost.fits(1, budget));
    }
}
