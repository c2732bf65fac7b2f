//! Domain types: what the engine and the pipeline work on, free of gRPC.
//!
//! The processor side sees records as JSON ([`Record`]) because the workload
//! reads them. The pipeline never looks inside a record, so it carries the
//! wire `Struct`s through untouched ([`Payload`]) instead of converting them
//! twice per record.

use prost::bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Most records one `ProcessBatch` call carries (both sides enforce it).
pub const MAX_BATCH_SIZE: usize = 1024;

/// A JSON object: a record's attributes, a run's params, a record's output.
pub type JsonMap = serde_json::Map<String, serde_json::Value>;

/// Opaque free-form data the pipeline forwards without reading.
pub type Payload = prost_types::Struct;

/// One record, as a workload sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Non-empty identifier, unique within a run.
    pub id: String,
    /// Free-form attributes.
    pub attributes: JsonMap,
}

/// How a processor handles one record's units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnitMode {
    /// One after another, in order.
    Sequential,
    /// Concurrently on the processor's bounded blocking pool.
    #[default]
    Parallel,
}

/// One record to process, with its run's context: the engine's input.
#[derive(Debug, Clone)]
pub struct RecordTask {
    /// The run the record belongs to (for tracing).
    pub run_id: String,
    /// The record.
    pub record: Record,
    /// Sequential or parallel units.
    pub mode: UnitMode,
    /// The run's workload parameters.
    pub params: Arc<JsonMap>,
    /// 1-based attempt number (for tracing).
    pub attempt: u32,
}

/// A processed record: the engine's output.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordOutput {
    /// The workload's aggregate.
    pub output: JsonMap,
    /// Units processed.
    pub units_processed: u32,
    /// Processing time.
    pub elapsed: Duration,
}

/// A validated run's settings (its records come separately: all at once
/// for `Run`, as a stream for `RunStream`).
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// The run id (generated when the request had none).
    pub run_id: String,
    /// Unit mode handed to every processor call.
    pub mode: UnitMode,
    /// Workload parameters handed to every processor call, encoded once
    /// (a `google.protobuf.Struct`) and shared by every call.
    pub params: Bytes,
    /// Scheduling and fault-handling settings, defaults applied.
    pub options: RunOptions,
}

/// One record of a run as the pipeline holds it: its id, and the whole
/// record encoded once (the pipeline never reads the attributes, and the
/// encoding is several times smaller than the decoded `Struct`).
#[derive(Debug, Clone)]
pub struct RunRecord {
    /// The record's id.
    pub id: String,
    /// The encoded `fanout.v1.Record`, forwarded as it came.
    pub encoded: Bytes,
}

/// Scheduling and fault-handling settings of a run, defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOptions {
    /// Records in flight at once (≥ 1).
    pub max_in_flight: usize,
    /// Attempts per record, first included (≥ 1).
    pub max_attempts: u32,
    /// Time bound of each attempt.
    pub record_timeout: Duration,
    /// More failed records than this aborts the run; `None` tolerates all.
    pub tolerated_failures: Option<u32>,
    /// More failed records than this share (0 to 100) of the run's records
    /// aborts the run; `None` tolerates all.
    pub tolerated_failure_percentage: Option<f64>,
    /// Leave per-record results out of the report.
    pub summary_only: bool,
    /// Most records per processor call (≥ 1).
    pub max_batch_size: usize,
    /// Log every attempt of each record in its result.
    pub attempt_log: bool,
}

/// A gRPC status code and message, as recorded for a failed record.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The status code.
    pub code: tonic::Code,
    /// The status message.
    pub message: String,
}

/// How one record ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Processed: the processor's output and unit count.
    Succeeded {
        /// The workload's aggregate, forwarded as the processor sent it.
        output: Payload,
        /// Units the processor processed.
        units_processed: u32,
    },
    /// Failed with this final status.
    Failed(Failure),
}

/// The final result of one record.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordResult {
    /// The record's id.
    pub record_id: String,
    /// The record's input position.
    pub index: u64,
    /// How it ended.
    pub outcome: Outcome,
    /// Attempts made (0 when cancelled before the first).
    pub attempts: u32,
    /// The endpoint of the last attempt (empty when none was made).
    pub processor: String,
    /// From the first attempt to the outcome.
    pub elapsed: Duration,

    /// Every attempt, in order, when the run asked for them; else empty.
    pub attempt_log: Vec<Attempt>,
}

impl RecordResult {
    /// A copy without its attempt log (which only the `record` event
    /// carries), made without copying the log.
    pub fn without_attempt_log(&self) -> Self {
        Self {
            record_id: self.record_id.clone(),
            index: self.index,
            outcome: self.outcome.clone(),
            attempts: self.attempts,
            processor: self.processor.clone(),
            elapsed: self.elapsed,
            attempt_log: Vec::new(),
        }
    }
}

/// One attempt of a record: a processor call it took part in.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    /// 1-based attempt number.
    pub attempt: u32,
    /// The instance's label (as [`RecordResult::processor`]); empty when
    /// none was up.
    pub processor: String,
    /// From the run's start to the call's start (its slot taken).
    pub start: Duration,
    /// From the call's start to its answer.
    pub elapsed: Duration,
    /// Why it failed; `None` when it succeeded.
    pub error: Option<Failure>,
    /// Records in the call (1 for `ProcessRecord`).
    pub batch_size: u32,
}

/// The outcome of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    /// Every record succeeded.
    Succeeded,
    /// Some failed, within tolerance.
    PartiallyFailed,
    /// All failed, or more than tolerated.
    Failed,
    /// The pipeline cancelled the run (shutting down).
    Cancelled,
}

/// Totals of a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunSummary {
    /// Records with a final result.
    pub total_records_processed: u64,
    /// Units over the succeeded records.
    pub total_units_processed: u64,
    /// Units per succeeded record.
    pub average_units_per_record: f64,
    /// Records that failed (cancelled included).
    pub records_failed: u64,
    /// Records that succeeded.
    pub records_succeeded: u64,
    /// Attempts beyond each record's first.
    pub retries: u64,
}

/// The final report of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunReport {
    /// The run id.
    pub run_id: String,
    /// The outcome.
    pub status: RunStatus,
    /// Totals.
    pub summary: RunSummary,
    /// Per-record results in input order (empty with `summary_only`); for
    /// a streamed run, the failed records only, in the order they failed.
    pub results: Vec<RecordResult>,
    /// Failed records left out of `results` of a streamed run.
    pub failures_omitted: u64,
    /// When the report was generated.
    pub generated_at: SystemTime,
    /// Wall time of the run.
    pub elapsed: Duration,
}

/// One event of a run, as the pipeline emits it.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEvent {
    /// The run was accepted.
    Started {
        /// The run id.
        run_id: String,
        /// Input records (0 when not known yet: a streamed run).
        record_count: u64,
        /// Processor instances configured.
        processor_count: u32,
        /// Start time.
        started_at: SystemTime,
        /// The run's trace id (hex).
        trace_id: String,
    },
    /// One record's final result.
    Record(RecordResult),
    /// The final report.
    Report(RunReport),
    /// Counts so far, at a steady interval.
    Progress(RunProgress),
    /// The run ended without a report (bad `RunStream` input): the call
    /// ends with this status.
    Aborted(Failure),
}

/// A run's counts at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct RunProgress {
    /// Records read from the input.
    pub records_received: u64,
    /// Records started (first attempt made or waiting for a slot).
    pub records_dispatched: u64,
    /// Records that succeeded.
    pub records_succeeded: u64,
    /// Records that failed.
    pub records_failed: u64,
    /// Records started and not finished.
    pub records_in_flight: u64,
    /// Input records (0 while not known: a streamed run's input goes on).
    pub record_count: u64,
    /// Since the run started.
    pub elapsed: Duration,
}
