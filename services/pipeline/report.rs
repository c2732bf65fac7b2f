//! Fan-in bookkeeping: the run's totals as results come in, and the report
//! (every result for `Run`, the failed ones, bounded, for `RunStream`).

use crate::domain::{Outcome, RecordResult, RunReport, RunStatus, RunSummary};
use prost::Message;
use std::time::{Instant, SystemTime};

/// Why a run stopped before every record was processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    /// More records failed than `tolerated_failures` or
    /// `tolerated_failure_percentage` allow.
    TooManyFailures,
    /// The pipeline is shutting down.
    Shutdown,
}

/// Most failed records a streamed run's report carries.
pub const MAX_REPORTED_FAILURES: usize = 1000;

/// Bytes the failed records in a streamed run's report may take: the report
/// must fit in one event.
const REPORTED_FAILURE_BYTES: usize = crate::convert::MAX_EVENT_BYTES - 64 * 1024;

/// Which results the report carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Every result, in input order (`Run`): a run of this many records.
    All(usize),
    /// The failed ones, bounded (`RunStream`).
    Failures,
    /// None (`summary_only`).
    Nothing,
}

#[derive(Debug)]
enum Kept {
    All(Vec<Option<RecordResult>>),
    Failures { kept: Vec<RecordResult>, bytes: usize, omitted: u64 },
    Nothing,
}

/// Adds up results as they come (each record's once: the run hands each
/// record's result over exactly once) and builds the report.
#[derive(Debug)]
pub struct ReportBuilder {
    run_id: String,
    kept: Kept,
    summary: RunSummary,
    started: Instant,
}

impl ReportBuilder {
    /// A builder for a run keeping `keep`.
    pub fn new(run_id: String, keep: Keep) -> Self {
        let kept = match keep {
            Keep::All(n) => Kept::All(vec![None; n]),
            Keep::Failures => Kept::Failures { kept: Vec::new(), bytes: 0, omitted: 0 },
            Keep::Nothing => Kept::Nothing,
        };
        Self { run_id, kept, summary: RunSummary::default(), started: Instant::now() }
    }

    /// Adds one record's final result.
    pub fn add(&mut self, r: &RecordResult) {
        let s = &mut self.summary;
        s.total_records_processed += 1;
        s.retries += u64::from(r.attempts.saturating_sub(1));
        let failed = match &r.outcome {
            Outcome::Succeeded { units_processed, .. } => {
                s.records_succeeded += 1;
                s.total_units_processed += u64::from(*units_processed);
                false
            }
            Outcome::Failed(_) => {
                s.records_failed += 1;
                true
            }
        };
        match &mut self.kept {
            Kept::All(results) => {
                if let Some(slot) = results.get_mut(r.index as usize) {
                    debug_assert!(slot.is_none(), "record {} reported twice", r.index);
                    *slot = Some(r.without_attempt_log());
                }
            }
            Kept::Failures { kept, bytes, omitted } if failed => {
                let size = if kept.len() < MAX_REPORTED_FAILURES {
                    crate::convert::record_result_to_proto(r.without_attempt_log()).encoded_len() + 8
                } else {
                    usize::MAX
                };
                if kept.len() < MAX_REPORTED_FAILURES && *bytes + size <= REPORTED_FAILURE_BYTES {
                    *bytes += size;
                    kept.push(r.without_attempt_log());
                } else {
                    *omitted += 1;
                }
            }
            Kept::Failures { .. } | Kept::Nothing => {}
        }
    }

    /// Records failed so far.
    pub fn failed(&self) -> u64 {
        self.summary.records_failed
    }

    /// Records succeeded so far.
    pub fn succeeded(&self) -> u64 {
        self.summary.records_succeeded
    }

    /// Records with a result so far.
    pub fn finished(&self) -> u64 {
        self.summary.total_records_processed
    }

    /// The final report.
    pub fn finish(self, abort: Option<Abort>) -> RunReport {
        let mut summary = self.summary;
        summary.average_units_per_record = if summary.records_succeeded == 0 {
            0.0
        } else {
            summary.total_units_processed as f64 / summary.records_succeeded as f64
        };
        let status = match abort {
            Some(Abort::Shutdown) => RunStatus::Cancelled,
            Some(Abort::TooManyFailures) => RunStatus::Failed,
            None if summary.records_failed == 0 => RunStatus::Succeeded,
            None if summary.records_succeeded == 0 => RunStatus::Failed,
            None => RunStatus::PartiallyFailed,
        };
        let (results, failures_omitted) = match self.kept {
            Kept::All(r) => (r.into_iter().flatten().collect(), 0),
            Kept::Failures { kept, omitted, .. } => (kept, omitted),
            Kept::Nothing => (Vec::new(), 0),
        };
        RunReport {
            run_id: self.run_id,
            status,
            summary,
            results,
            failures_omitted,
            generated_at: SystemTime::now(),
            elapsed: self.started.elapsed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Failure;
    use std::time::Duration;

    fn result(index: u64, ok: bool, attempts: u32) -> RecordResult {
        RecordResult {
            record_id: format!("r{index}"),
            index,
            outcome: if ok {
                Outcome::Succeeded { output: Default::default(), units_processed: 10 }
            } else {
                Outcome::Failed(Failure { code: tonic::Code::Internal, message: "x".into() })
            },
            attempts,
            processor: "p".into(),
            elapsed: Duration::ZERO,
            attempt_log: Vec::new(),
        }
    }

    #[test]
    fn a_run_report_is_in_input_order() {
        let mut b = ReportBuilder::new("run".into(), Keep::All(3));
        b.add(&result(2, true, 1));
        b.add(&result(0, false, 3));
        b.add(&result(1, false, 0));
        let report = b.finish(None);
        assert_eq!(report.status, RunStatus::PartiallyFailed);
        assert_eq!(report.summary.total_records_processed, 3);
        assert_eq!(report.summary.records_failed, 2);
        assert_eq!(report.summary.retries, 2);
        assert_eq!(report.summary.total_units_processed, 10);
        let ids: Vec<_> = report.results.iter().map(|r| r.index).collect();
        assert_eq!(ids, [0, 1, 2]);
    }

    #[test]
    fn summary_only_keeps_counts_not_results() {
        let mut b = ReportBuilder::new("run".into(), Keep::Nothing);
        b.add(&result(0, true, 1));
        let report = b.finish(None);
        assert_eq!(report.status, RunStatus::Succeeded);
        assert!(report.results.is_empty());
        assert_eq!(report.summary.average_units_per_record, 10.0);
    }

    #[test]
    fn a_streamed_report_keeps_a_bounded_number_of_failures() {
        let mut b = ReportBuilder::new("run".into(), Keep::Failures);
        for i in 0..(MAX_REPORTED_FAILURES as u64 + 50) {
            b.add(&result(2 * i, true, 1));
            b.add(&result(2 * i + 1, false, 1));
        }
        let report = b.finish(None);
        assert_eq!(report.results.len(), MAX_REPORTED_FAILURES);
        assert!(report.results.iter().all(|r| matches!(r.outcome, Outcome::Failed(_))));
        assert_eq!(report.failures_omitted, 50);
        assert_eq!(report.summary.records_failed, MAX_REPORTED_FAILURES as u64 + 50);
    }
}
