//! The pluggable workload: what a processor does to one record.
//!
//! A workload extracts units from a record, processes one unit (blocking,
//! CPU-bound; it may fail or panic), and aggregates the unit results into the
//! record's output. The [`engine`](crate::engine) owns everything else:
//! parallelism, limits, errors, panics, cancellation, timing and tracing.
//!
//! ```
//! use fanout::domain::{JsonMap, Record};
//! use fanout::workload::{Cancel, Workload, WorkloadError};
//!
//! /// Counts the characters of each word of `attributes.text`.
//! struct WordLengths;
//!
//! impl Workload for WordLengths {
//!     type Unit = String;
//!     type Output = usize;
//!
//!     fn name(&self) -> &str { "word-lengths" }
//!
//!     fn extract(&self, record: &Record, _params: &JsonMap) -> Result<Vec<String>, WorkloadError> {
//!         let text = record.attributes.get("text").and_then(|v| v.as_str())
//!             .ok_or_else(|| WorkloadError::invalid("attributes.text", "must be a string"))?;
//!         Ok(text.split_whitespace().map(str::to_owned).collect())
//!     }
//!
//!     fn process(&self, unit: String, cancel: &Cancel) -> Result<usize, WorkloadError> {
//!         let mut n = 0;
//!         for (i, _) in unit.chars().enumerate() {
//!             // A long unit checks now and then whether its record was
//!             // cancelled (call dropped, deadline passed) and stops if so.
//!             if i % 4096 == 0 {
//!                 cancel.check()?;
//!             }
//!             n += 1;
//!         }
//!         Ok(n)
//!     }
//!
//!     fn aggregate(&self, _record: &Record, lengths: Vec<usize>) -> Result<JsonMap, WorkloadError> {
//!         let mut out = JsonMap::new();
//!         out.insert("words".into(), lengths.len().into());
//!         out.insert("chars".into(), lengths.iter().sum::<usize>().into());
//!         Ok(out)
//!     }
//! }
//! ```

pub mod digest;

pub use digest::Digest;

use crate::domain::{JsonMap, Record};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A record's processing, split into units. See the [module docs](self).
///
/// `extract` and `aggregate` run on the async runtime and should be cheap;
/// `process` runs on the engine's bounded blocking pool and may be as heavy
/// as it likes. Unit outputs reach `aggregate` in unit order in both modes.
pub trait Workload: Send + Sync + 'static {
    /// One unit of work, handed to a blocking thread.
    type Unit: Send + 'static;
    /// One unit's result.
    type Output: Send + 'static;

    /// Short name for logs.
    fn name(&self) -> &str;

    /// Splits a record into units. Invalid input is
    /// [`WorkloadError::invalid`] naming the field (`attributes.x`,
    /// `params.y`); the engine adds the record's id.
    fn extract(&self, record: &Record, params: &JsonMap) -> Result<Vec<Self::Unit>, WorkloadError>;

    /// Processes one unit. Blocking and CPU-bound is fine; a panic fails the
    /// record, not the processor. A unit that may run for long should call
    /// [`Cancel::check`] every millisecond or so: once the record is
    /// cancelled (its call dropped, its deadline passed, another unit failed)
    /// it returns an error, and the unit should return it at once so the
    /// thread moves on.
    fn process(&self, unit: Self::Unit, cancel: &Cancel) -> Result<Self::Output, WorkloadError>;

    /// Folds the unit results (in unit order) into the record's output.
    fn aggregate(&self, record: &Record, outputs: Vec<Self::Output>) -> Result<JsonMap, WorkloadError>;
}

/// Whether retrying a failed record may help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The input is wrong (`INVALID_ARGUMENT`, never retried).
    Invalid,
    /// A permanent failure on valid input (`FAILED_PRECONDITION`, never retried).
    Permanent,
    /// Another attempt may succeed (`UNAVAILABLE`, retried by the pipeline).
    Transient,
    /// The record was cancelled while the unit ran ([`Cancel::check`]).
    Cancelled,
}

/// A record's cancellation flag, as a unit sees it: set when the record's
/// call is dropped (the pipeline cancelled it or its deadline passed) or
/// another of its units failed. Checking it is one atomic load.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// A flag that is not set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the record has been cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// `Err` (kind [`ErrorKind::Cancelled`]) once the record is cancelled:
    /// `cancel.check()?` inside a long unit stops it.
    pub fn check(&self) -> Result<(), WorkloadError> {
        if self.is_cancelled() {
            Err(WorkloadError { kind: ErrorKind::Cancelled, field: None, message: "cancelled".into() })
        } else {
            Ok(())
        }
    }

    /// Sets the flag: every unit of the record that checks it stops.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A workload's error: kind, the field at fault (if any), and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", field.as_ref().map(|f| format!("{f}: ")).unwrap_or_default())]
pub struct WorkloadError {
    /// Retry classification.
    pub kind: ErrorKind,
    /// The input field at fault, e.g. `attributes.units`.
    pub field: Option<String>,
    /// What went wrong.
    pub message: String,
}

impl WorkloadError {
    /// Invalid input in `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Invalid, field: Some(field.into()), message: message.into() }
    }

    /// A permanent failure.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Permanent, field: None, message: message.into() }
    }

    /// A transient failure.
    pub fn transient(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Transient, field: None, message: message.into() }
    }
}
