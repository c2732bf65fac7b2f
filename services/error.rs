//! The library's error type and its one mapping to `tonic::Status`.

use tonic::{Code, Status};

/// Everything that can go wrong in fanout's services.
///
/// Each variant maps to exactly one gRPC status code in
/// [`From<Error> for Status`](#impl-From<Error>-for-Status); handlers return
/// `Error` and convert at the edge.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed: the message names the record and field.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request asks for more than a configured limit allows.
    #[error("{what} is {got}, over the limit of {limit} (set by {setting})")]
    LimitExceeded {
        /// What was counted, e.g. "records in the run".
        what: String,
        /// The count asked for.
        got: u64,
        /// The configured limit.
        limit: u64,
        /// The flag that sets the limit.
        setting: &'static str,
    },
    /// The server is at a configured capacity now; later may succeed.
    #[error("{what}: the limit is {limit} (set by {setting}); try again later")]
    Exhausted {
        /// What is full, e.g. "the pipeline is running 1000 runs".
        what: String,
        /// The configured limit.
        limit: u64,
        /// The flag that sets it.
        setting: &'static str,
    },
    /// The workload refused to process a record whose input is fine
    /// (a permanent failure: retrying will not help).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A transient failure: another attempt may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// A unit panicked or the engine hit a bug.
    #[error("{0}")]
    Internal(String),
    /// The work was cancelled (client gone, run aborted, shutting down).
    #[error("{0}")]
    Cancelled(String),
    /// The work did not finish within its time bound.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A listen address, endpoint URL or similar setting is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// A socket could not be bound or the server failed.
    #[error("transport: {0}")]
    Transport(String),
}

impl Error {
    /// `InvalidArgument` naming a record (by id and input position) and a field.
    pub fn invalid_record(index: u64, id: &str, field: &str, reason: impl std::fmt::Display) -> Self {
        Error::InvalidArgument(format!("record {index} (id {id:?}): {field}: {reason}"))
    }

    /// The gRPC status code this error maps to.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) | Error::LimitExceeded { .. } => Code::InvalidArgument,
            Error::Exhausted { .. } => Code::ResourceExhausted,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Internal(_) | Error::Config(_) | Error::Transport(_) => Code::Internal,
            Error::Cancelled(_) => Code::Cancelled,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        Status::new(err.code(), err.to_string())
    }
}

/// `err` and the errors under it, outermost first (what
/// `std::error::Error::sources` will be once stable).
pub fn chain<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(err), |e| e.source())
}
