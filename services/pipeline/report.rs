//! Fan-in bookkeeping: every record's result exactly once, and the report.

use crate::domain::{Failure, Outcome, RecordResult, RunReport, RunStatus, RunSummary};
use std::time::{Duration, Instant, SystemTime};

/// Why a run stopped before every record was processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    /// More records failed than `tolerated_failures` or
    /// `tolerated_failure_percentage` allow.
    TooManyFailures,
    /// The pipeline is shutting down.
    Shutdown,
}

/// Collects one result per record and builds the report.
#[derive(Debug)]
pub struct ReportBuilder {
    run_id: String,
    ids: Vec<String>,
    done: Vec<bool>,
    /// Kept only when the report carries per-record results.
    results: Option<Vec<Option<RecordResult>>>,
    summary: RunSummary,
    started: Instant,
}

impl ReportBuilder {
    /// A builder for a run of records with these ids (input order).
    pub fn new(run_id: String, ids: Vec<String>, summary_only: bool) -> Self {
        let n = ids.len();
        Self {
            run_id,
            ids,
            done: vec![false; n],
            results: (!summary_only).then(|| vec![None; n]),
            summary: RunSummary::default(),
            started: Instant::now(),
        }
    }

    /// Records one result. Returns `false` (and records nothing) if that
    /// record already has one: a record is reported exactly once.
    pub fn add(&mut self, r: &RecordResult) -> bool {
        if std::mem::replace(&mut self.done[r.index as usize], true) {
            return false;
        }
        let s = &mut self.summary;
        s.total_records_processed += 1;
        s.retries += u64::from(r.attempts.saturating_sub(1));
        match &r.outcome {
            Outcome::Succeeded { units_processed, .. } => {
                s.records_succeeded += 1;
                s.total_units_processed += u64::from(*units_processed);
            }
            Outcome::Failed(_) => s.records_failed += 1,
        }
        if let Some(results) = &mut self.results {
            results[r.index as usize] = Some(r.clone());
        }
        true
    }

    /// Records failed so far.
    pub fn failed(&self) -> u64 {
        self.summary.records_failed
    }

    /// Records succeeded so far.
    pub fn succeeded(&self) -> u64 {
        self.summary.records_succeeded
    }

    /// Input positions of the records without a result yet, in order.
    pub fn unfinished(&self) -> Vec<usize> {
        (0..self.ids.len()).filter(|&i| !self.done[i]).collect()
    }

    /// The result of record `index` cancelled before it finished: failed
    /// with `CANCELLED` and `reason`, after `attempts` attempts.
    pub fn cancelled(&self, index: usize, reason: &str, attempts: u32) -> RecordResult {
        RecordResult {
            record_id: self.ids[index].clone(),
            index: index as u64,
            outcome: Outcome::Failed(Failure { code: tonic::Code::Cancelled, message: reason.to_owned() }),
            attempts,
            processor: String::new(),
            elapsed: Duration::ZERO,
        }
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
        RunReport {
            run_id: self.run_id,
            status,
            summary,
            results: self.results.map(|r| r.into_iter().flatten().collect()).unwrap_or_default(),
            failures_omitted: 0,
            generated_at: SystemTime::now(),
            elapsed: self.started.elapsed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(index: usize, ok: bool, attempts: u32) -> RecordResult {
        RecordResult {
            record_id: format!("r{index}"),
            index: index as u64,
            outcome: if ok {
                Outcome::Succeeded { output: Default::default(), units_processed: 10 }
            } else {
                Outcome::Failed(Failure { code: tonic::Code::Internal, message: "x".into() })
            },
            attempts,
            processor: "p".into(),
            elapsed: Duration::ZERO,
        }
    }

    #[test]
    fn each_record_counts_once_and_report_is_in_input_order() {
        let mut b = ReportBuilder::new("run".into(), vec!["r0".into(), "r1".into(), "r2".into()], false);
        assert!(b.add(&result(2, true, 1)));
        assert!(b.add(&result(0, false, 3)));
        assert!(!b.add(&result(0, true, 1)), "a second result for r0 is refused");
        assert_eq!(b.unfinished(), [1]);
        let cancelled = b.cancelled(1, "aborted", 0);
        assert_eq!(cancelled.record_id, "r1");
        assert!(b.add(&cancelled));
        assert!(b.unfinished().is_empty());
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
        let mut b = ReportBuilder::new("run".into(), vec!["a".into()], true);
        b.add(&result(0, true, 1));
        let report = b.finish(None);
        assert_eq!(report.status, RunStatus::Succeeded);
        assert!(report.results.is_empty());
        assert_eq!(report.summary.average_units_per_record, 10.0);
    }
}
