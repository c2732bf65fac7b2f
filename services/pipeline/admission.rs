//! What a pipeline takes at once: at most `--max-concurrent-runs` runs, and
//! requests holding at most `--run-memory-budget` bytes, counted twice over:
//!
//! - while a `Run` request is being received and decoded, it takes
//!   [`DECODE_FACTOR`](crate::budget::DECODE_FACTOR) bytes of the budget per
//!   byte of its message ([`budget`](crate::budget)); a request that does not
//!   fit is refused at its first bytes, and the bytes return once the run is
//!   in its compact form;
//! - an accepted run holds [`run_cost`] bytes (its records encoded once,
//!   plus bookkeeping per record) until it ends.
//!
//! So the pipeline's memory for requests stays under about the budget,
//! whatever mix of callers sends them. Both refusals are
//! `RESOURCE_EXHAUSTED` naming the flag.

use crate::budget::MemoryBudget;
use crate::error::Error;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes an accepted run holds per record beyond its encoding (id, slot in
/// the report), and per result kept for the report (not with
/// `summary_only`).
const BYTES_PER_RECORD: usize = 192;
const BYTES_PER_KEPT_RESULT: usize = 640;

/// The budget an accepted run of `records` records whose request encodes
/// to `encoded_len` bytes holds until it ends.
pub fn run_cost(encoded_len: usize, records: usize, summary_only: bool) -> usize {
    let per_record = BYTES_PER_RECORD + if summary_only { 0 } else { BYTES_PER_KEPT_RESULT };
    encoded_len.saturating_add(records.saturating_mul(per_record))
}

/// The limits on runs in progress.
#[derive(Debug)]
pub struct Admission {
    runs: Arc<Semaphore>,
    max_runs: usize,
    memory: MemoryBudget,
}

/// What an accepted run holds until it ends.
#[derive(Debug)]
pub struct RunPermit {
    _run: OwnedSemaphorePermit,
    _memory: Option<OwnedSemaphorePermit>,
}

impl Admission {
    /// Room for `max_runs` runs and `budget` bytes of their requests.
    pub fn new(max_runs: usize, budget: usize) -> Self {
        let max_runs = max_runs.clamp(1, Semaphore::MAX_PERMITS);
        let memory = MemoryBudget::new(budget, "--run-memory-budget");
        Self { runs: Arc::new(Semaphore::new(max_runs)), max_runs, memory }
    }

    /// A place for a run whose accepted form costs `bytes` ([`run_cost`]),
    /// or `RESOURCE_EXHAUSTED` naming the limit that is full.
    pub fn admit(&self, bytes: usize) -> Result<RunPermit, Error> {
        let run = self.runs.clone().try_acquire_owned().map_err(|_| Error::Exhausted {
            what: format!("the pipeline is already running {} runs", self.max_runs),
            limit: self.max_runs as u64,
            setting: "--max-concurrent-runs",
        })?;
        let memory = self.memory.try_take(bytes).ok_or_else(|| Error::Exhausted {
            what: format!(
                "the run needs about {bytes} bytes and {} of the run memory budget are free",
                self.memory.available()
            ),
            limit: self.memory.total() as u64,
            setting: "--run-memory-budget",
        })?;
        Ok(RunPermit { _run: run, _memory: memory })
    }

    /// Runs in progress.
    pub fn active_runs(&self) -> usize {
        self.max_runs - self.runs.available_permits()
    }

    /// Bytes of the budget in use.
    pub fn memory_in_use(&self) -> usize {
        self.memory.total() - self.memory.available()
    }

    /// The run memory budget, which requests being received take from too.
    pub fn memory(&self) -> &MemoryBudget {
        &self.memory
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_bytes_are_bounded() {
        let a = Admission::new(2, 1000);
        let one = a.admit(600).unwrap();
        let err = a.admit(600).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.to_string().contains("--run-memory-budget"), "{err}");
        let two = a.admit(100).unwrap();
        let err = a.admit(0).unwrap_err();
        assert!(err.to_string().contains("--max-concurrent-runs"), "{err}");
        assert_eq!((a.active_runs(), a.memory_in_use()), (2, 700));
        drop((one, two));
        assert_eq!((a.active_runs(), a.memory_in_use()), (0, 0));
        assert!(a.admit(usize::MAX).is_err(), "never more than the budget");
    }
}
