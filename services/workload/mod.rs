//! The pluggable workload: what a processor does to one record.
//!
//! A workload extracts units from a record, processes one unit (blocking,
//! CPU-bound; it may fail or panic), and aggregates the unit results into the
//! record's output. The [`engine`](crate::engine) owns everything else:
//! parallelism, limits, errors, panics, cancellation, timing and tracing.
//!
//! ```
//! use fanout::domain::{JsonMap, Record};
//! use fanout::workload::{Workload, WorkloadError};
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
//!     fn process(&self, unit: String) -> Result<usize, WorkloadError> {
//!         Ok(unit.chars().count())
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
    /// record, not the processor.
    fn process(&self, unit: Self::Unit) -> Result<Self::Output, WorkloadError>;

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
