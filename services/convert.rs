//! Wire ⇄ domain conversion, done once at each edge.
//!
//! Requests are validated while they are converted, so everything past this
//! module works on well-formed domain values.

use crate::config::RunLimits;
use crate::domain::{
    Attempt, Failure, JsonMap, MAX_BATCH_SIZE, Outcome, Record, RecordOutput, RecordResult, RecordTask,
    RunEvent, RunOptions, RunRecord, RunReport, RunSpec, RunStatus, UnitMode,
};
use crate::error::Error;
use crate::pipeline::wire;
use crate::proto;
use prost::Message;
use prost_types::value::Kind;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A protobuf `Struct` as a JSON object.
pub fn struct_to_json(s: prost_types::Struct) -> JsonMap {
    s.fields.into_iter().map(|(k, v)| (k, value_to_json(v))).collect()
}

/// A protobuf `Value` as JSON. Numbers stay `f64`, as on the wire; a
/// non-finite number (which JSON cannot hold) becomes `null`.
pub fn value_to_json(v: prost_types::Value) -> Value {
    match v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number),
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::StructValue(s)) => Value::Object(struct_to_json(s)),
        Some(Kind::ListValue(l)) => Value::Array(l.values.into_iter().map(value_to_json).collect()),
    }
}

/// A JSON object as a protobuf `Struct`.
pub fn json_to_struct(m: JsonMap) -> prost_types::Struct {
    prost_types::Struct { fields: m.into_iter().map(|(k, v)| (k, json_to_value(v))).collect() }
}

/// JSON as a protobuf `Value` (numbers become `f64`, as proto3 JSON does).
pub fn json_to_value(v: Value) -> prost_types::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => Kind::StringValue(s),
        Value::Array(a) => {
            Kind::ListValue(prost_types::ListValue { values: a.into_iter().map(json_to_value).collect() })
        }
        Value::Object(m) => Kind::StructValue(json_to_struct(m)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A `std` duration as a protobuf `Duration`.
pub fn duration_to_proto(d: Duration) -> prost_types::Duration {
    prost_types::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

/// Largest `google.protobuf.Duration` seconds (about 10,000 years), as its
/// definition gives the range.
pub const MAX_DURATION_SECONDS: i64 = 315_576_000_000;

/// A protobuf `Duration` as a `std` duration; `None` when negative,
/// malformed or outside the range protobuf defines (±315,576,000,000 s).
pub fn duration_from_proto(d: &prost_types::Duration) -> Option<Duration> {
    ((0..=MAX_DURATION_SECONDS).contains(&d.seconds) && (0..1_000_000_000).contains(&d.nanos))
        .then(|| Duration::new(d.seconds as u64, d.nanos as u32))
}

/// A `SystemTime` as a protobuf `Timestamp`.
pub fn timestamp_to_proto(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

/// A wire unit mode; unknown numbers are `INVALID_ARGUMENT`.
pub fn unit_mode_from_proto(raw: i32) -> Result<UnitMode, Error> {
    match proto::UnitMode::try_from(raw) {
        Ok(proto::UnitMode::Unspecified) => Ok(UnitMode::default()),
        Ok(proto::UnitMode::Sequential) => Ok(UnitMode::Sequential),
        Ok(proto::UnitMode::Parallel) => Ok(UnitMode::Parallel),
        Err(_) => Err(Error::InvalidArgument(format!(
            "unit_mode: unknown value {raw} (expected 0 UNSPECIFIED, 1 SEQUENTIAL or 2 PARALLEL)"
        ))),
    }
}

/// A domain unit mode on the wire.
pub fn unit_mode_to_proto(mode: UnitMode) -> proto::UnitMode {
    match mode {
        UnitMode::Sequential => proto::UnitMode::Sequential,
        UnitMode::Parallel => proto::UnitMode::Parallel,
    }
}

/// Validates a `RunRequest` against the pipeline's limits and applies
/// defaults: the run's settings, and its records in input order.
pub fn run_spec_from_proto(
    req: proto::RunRequest,
    limits: &RunLimits,
) -> Result<(RunSpec, Vec<RunRecord>), Error> {
    if req.records.is_empty() {
        return Err(Error::InvalidArgument("records: a run needs at least one record".into()));
    }
    if req.records.len() > limits.max_records {
        return Err(Error::LimitExceeded {
            what: "the number of records in the run".into(),
            got: req.records.len() as u64,
            limit: limits.max_records as u64,
            setting: "--max-records",
        });
    }
    let spec = run_spec_from_header(
        proto::RunHeader {
            run_id: req.run_id,
            unit_mode: req.unit_mode,
            params: req.params,
            options: req.options,
        },
        limits,
    )?;
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(req.records.len());
    for (i, r) in req.records.iter().enumerate() {
        check_record_id(i as u64, &r.id)?;
        if let Some(first) = seen.insert(&r.id, i) {
            return Err(Error::invalid_record(i as u64, &r.id, "id", format!("duplicates record {first}")));
        }
    }
    drop(seen);
    // Encoded once, the decoded Structs dropped: the run holds about its
    // wire size, and every attempt sends these bytes as they are.
    let records = req.records.into_iter().map(run_record).collect();
    Ok((spec, records))
}

/// Validates the settings of a run (a `RunStream` header, or a `RunRequest`
/// without its records) and applies defaults.
pub fn run_spec_from_header(h: proto::RunHeader, limits: &RunLimits) -> Result<RunSpec, Error> {
    let mode = unit_mode_from_proto(h.unit_mode)?;
    let options = run_options_from_proto(h.options.unwrap_or_default(), limits)?;
    if !h.run_id.is_empty() {
        check_label(&h.run_id, MAX_RUN_ID_BYTES)
            .map_err(|why| Error::InvalidArgument(format!("run_id: {why}")))?;
    }
    let run_id = if h.run_id.is_empty() { generate_run_id() } else { h.run_id };
    let params = wire::encode_params(&h.params.unwrap_or_default());
    Ok(RunSpec { run_id, mode, params, options })
}

/// Checks the id of the record at input position `position`: non-empty,
/// bounded, no control characters.
pub fn check_record_id(position: u64, id: &str) -> Result<(), Error> {
    if id.is_empty() {
        return Err(Error::InvalidArgument(format!("record {position}: id: must not be empty")));
    }
    if let Err(why) = check_label(id, MAX_RECORD_ID_BYTES) {
        // The id itself is shown shortened and escaped.
        let shown: String = id.chars().take(32).collect();
        return Err(Error::invalid_record(position, &shown, "id", why));
    }
    Ok(())
}

/// A checked record as the pipeline holds it: its id and its encoding.
pub fn run_record(r: proto::Record) -> RunRecord {
    let encoded = wire::encode_record(&r);
    RunRecord { id: r.id, encoded }
}

/// Longest `run_id`, in bytes.
pub const MAX_RUN_ID_BYTES: usize = 128;
/// Longest record id, in bytes.
pub const MAX_RECORD_ID_BYTES: usize = 512;

/// Ids are logged and echoed in every event: no control characters (they
/// could forge log lines or move a terminal's cursor) and a bounded length
/// (they could multiply log volume).
fn check_label(s: &str, max_bytes: usize) -> Result<(), String> {
    if s.len() > max_bytes {
        return Err(format!("{} bytes, over the limit of {max_bytes}", s.len()));
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(format!("must not contain control characters (found {c:?})"));
    }
    Ok(())
}

fn run_options_from_proto(o: proto::RunOptions, limits: &RunLimits) -> Result<RunOptions, Error> {
    let max_in_flight = match o.max_in_flight as usize {
        // A default over the limit is capped by it.
        0 => limits.default_max_in_flight.min(limits.max_in_flight_limit),
        n if n > limits.max_in_flight_limit => {
            return Err(Error::LimitExceeded {
                what: "options.max_in_flight".into(),
                got: n as u64,
                limit: limits.max_in_flight_limit as u64,
                setting: "--max-in-flight-limit",
            });
        }
        n => n,
    };
    let max_attempts = match o.max_attempts {
        0 => limits.default_max_attempts.min(limits.max_attempts_limit),
        n if n > limits.max_attempts_limit => {
            return Err(Error::LimitExceeded {
                what: "options.max_attempts".into(),
                got: n.into(),
                limit: limits.max_attempts_limit.into(),
                setting: "--max-attempts-limit",
            });
        }
        n => n,
    };
    let record_timeout = match &o.record_timeout {
        None => limits.default_record_timeout,
        Some(d) => match duration_from_proto(d) {
            None => {
                return Err(Error::InvalidArgument(format!(
                    "options.record_timeout: must be a non-negative duration of at most {MAX_DURATION_SECONDS}s \
                     (protobuf's range), got {}s {}ns",
                    d.seconds, d.nanos
                )));
            }
            Some(Duration::ZERO) => limits.default_record_timeout,
            Some(d) => d,
        },
    };
    Ok(RunOptions {
        max_in_flight,
        max_attempts,
        record_timeout,
        tolerated_failures: o.tolerated_failures,
        tolerated_failure_percentage: match o.tolerated_failure_percentage {
            Some(p) if !(0.0..=100.0).contains(&p) => {
                return Err(Error::InvalidArgument(format!(
                    "options.tolerated_failure_percentage: must be from 0 to 100, got {p}"
                )));
            }
            p => p,
        },
        summary_only: o.summary_only,
        attempt_log: o.attempt_log,
        max_batch_size: match o.max_batch_size as usize {
            0 => 1,
            n if n > MAX_BATCH_SIZE => {
                return Err(Error::LimitExceeded {
                    what: "options.max_batch_size".into(),
                    got: n as u64,
                    limit: MAX_BATCH_SIZE as u64,
                    setting: "the protocol",
                });
            }
            n => n,
        },
    })
}

/// A run id: time-ordered and unique enough for logs and reports.
fn generate_run_id() -> String {
    let ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis();
    format!("run-{ms:x}-{:08x}", fastrand::u32(..))
}

/// A `ProcessRecordRequest` as the engine's task. A missing record or empty
/// id is `INVALID_ARGUMENT`.
pub fn record_task_from_proto(req: proto::ProcessRecordRequest) -> Result<RecordTask, Error> {
    let run = run_context(req.run_id, req.unit_mode, req.params)?;
    record_task(&run, req.record, req.attempt)
}

/// A `ProcessBatchRequest` as engine tasks, one per record, in order: a
/// record at fault fails alone; a fault of the whole call (run id, unit
/// mode, params, too many records) is `Err`.
pub fn batch_tasks_from_proto(
    req: proto::ProcessBatchRequest,
) -> Result<Vec<Result<RecordTask, Error>>, Error> {
    if req.records.len() > MAX_BATCH_SIZE {
        return Err(Error::LimitExceeded {
            what: "the number of records in the batch".into(),
            got: req.records.len() as u64,
            limit: MAX_BATCH_SIZE as u64,
            setting: "the protocol",
        });
    }
    let run = run_context(req.run_id, req.unit_mode, req.params)?;
    let attempts = req.attempts;
    Ok(req
        .records
        .into_iter()
        .enumerate()
        .map(|(i, record)| record_task(&run, Some(record), attempts.get(i).copied().unwrap_or(1)))
        .collect())
}

/// What every record of a processor call shares, converted once.
struct RunContext {
    run_id: String,
    mode: UnitMode,
    params: Arc<JsonMap>,
}

fn run_context(
    run_id: String,
    unit_mode: i32,
    params: Option<prost_types::Struct>,
) -> Result<RunContext, Error> {
    check_label(&run_id, MAX_RUN_ID_BYTES).map_err(|why| Error::InvalidArgument(format!("run_id: {why}")))?;
    if let Some((path, n)) = params.as_ref().and_then(|s| non_finite(s, "params")) {
        return Err(Error::InvalidArgument(format!(
            "{path}: {n} is not a valid value here (JSON has no NaN or Infinity)"
        )));
    }
    Ok(RunContext {
        run_id,
        mode: unit_mode_from_proto(unit_mode)?,
        params: Arc::new(params.map(struct_to_json).unwrap_or_default()),
    })
}

fn record_task(run: &RunContext, record: Option<proto::Record>, attempt: u32) -> Result<RecordTask, Error> {
    let record = record.ok_or_else(|| Error::InvalidArgument("record: missing".into()))?;
    if record.id.is_empty() {
        return Err(Error::InvalidArgument("record.id: must not be empty".into()));
    }
    check_label(&record.id, MAX_RECORD_ID_BYTES)
        .map_err(|why| Error::InvalidArgument(format!("record.id: {why}")))?;
    if let Some((path, n)) = record.attributes.as_ref().and_then(|s| non_finite(s, "attributes")) {
        return Err(Error::InvalidArgument(format!(
            "record {:?}: {path}: {n} is not a valid value here (JSON has no NaN or Infinity)",
            record.id
        )));
    }
    Ok(RecordTask {
        run_id: run.run_id.clone(),
        record: Record {
            id: record.id,
            attributes: record.attributes.map(struct_to_json).unwrap_or_default(),
        },
        mode: run.mode,
        params: run.params.clone(),
        attempt,
    })
}

/// The first NaN or ±Infinity in `s` (which JSON, and so a workload, cannot
/// see), with its path, e.g. `("params.rounds", "NaN")`.
fn non_finite(s: &prost_types::Struct, prefix: &str) -> Option<(String, &'static str)> {
    fn walk(v: &prost_types::Value, path: String) -> Option<(String, &'static str)> {
        match &v.kind {
            Some(Kind::NumberValue(n)) if n.is_nan() => Some((path, "NaN")),
            Some(Kind::NumberValue(n)) if n.is_infinite() => {
                Some((path, if *n > 0.0 { "Infinity" } else { "-Infinity" }))
            }
            Some(Kind::StructValue(s)) => s.fields.iter().find_map(|(k, v)| walk(v, format!("{path}.{k}"))),
            Some(Kind::ListValue(l)) => {
                l.values.iter().enumerate().find_map(|(i, v)| walk(v, format!("{path}[{i}]")))
            }
            _ => None,
        }
    }
    s.fields.iter().find_map(|(k, v)| walk(v, format!("{prefix}.{k}")))
}

/// The engine's output as a `ProcessRecordResponse`.
pub fn record_output_to_proto(
    record_id: String,
    out: RecordOutput,
    processor: &str,
) -> proto::ProcessRecordResponse {
    proto::ProcessRecordResponse {
        record_id,
        output: Some(json_to_struct(out.output)),
        units_processed: out.units_processed,
        elapsed: Some(duration_to_proto(out.elapsed)),
        processor: processor.to_owned(),
    }
}

/// A typed error on the wire, as a record's failure.
pub fn error_to_proto(e: &Error) -> proto::Error {
    proto::Error { code: e.code() as i32, code_name: code_name(e.code()).into(), message: e.to_string() }
}

/// A domain failure on the wire.
pub fn failure_to_proto(f: &Failure) -> proto::Error {
    proto::Error { code: f.code as i32, code_name: code_name(f.code).into(), message: f.message.clone() }
}

/// The canonical upper-case name of a status code, as grpcurl prints it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A record result on the wire.
pub fn record_result_to_proto(r: RecordResult) -> proto::RecordResult {
    let (status, output, units_processed, error) = match r.outcome {
        Outcome::Succeeded { output, units_processed } => {
            (proto::RecordStatus::Succeeded, Some(output), units_processed, None)
        }
        Outcome::Failed(f) => (proto::RecordStatus::Failed, None, 0, Some(failure_to_proto(&f))),
    };
    proto::RecordResult {
        record_id: r.record_id,
        index: r.index,
        status: status as i32,
        output,
        units_processed,
        attempts: r.attempts,
        processor: r.processor,
        elapsed: Some(duration_to_proto(r.elapsed)),
        error,
        attempt_log: r.attempt_log.into_iter().map(attempt_to_proto).collect(),
    }
}

/// One logged attempt on the wire.
pub fn attempt_to_proto(a: Attempt) -> proto::Attempt {
    proto::Attempt {
        attempt: a.attempt,
        processor: a.processor,
        start: Some(duration_to_proto(a.start)),
        elapsed: Some(duration_to_proto(a.elapsed)),
        error: a.error.as_ref().map(failure_to_proto),
        batch_size: a.batch_size,
    }
}

fn run_status_to_proto(s: RunStatus) -> proto::RunStatus {
    match s {
        RunStatus::Succeeded => proto::RunStatus::Succeeded,
        RunStatus::PartiallyFailed => proto::RunStatus::PartiallyFailed,
        RunStatus::Failed => proto::RunStatus::Failed,
        RunStatus::Cancelled => proto::RunStatus::Cancelled,
    }
}

/// Largest event the pipeline sends: under the 4 MiB default receive limit
/// of grpcio, grpc-go, grpc-java and grpcurl, with room for framing.
pub const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024 - 16 * 1024;

/// A run report on the wire. When its per-record results would make it
/// larger than [`MAX_EVENT_BYTES`], they are left out and `results_omitted`
/// is set (each was already streamed as a `record` event).
pub fn report_to_proto(r: RunReport) -> proto::RunReport {
    let s = r.summary;
    let mut report = proto::RunReport {
        run_id: r.run_id,
        status: run_status_to_proto(r.status) as i32,
        summary: Some(proto::RunSummary {
            total_records_processed: s.total_records_processed,
            total_units_processed: s.total_units_processed,
            average_units_per_record: s.average_units_per_record,
            records_failed: s.records_failed,
            retries: s.retries,
            records_succeeded: s.records_succeeded,
        }),
        results: r.results.into_iter().map(record_result_to_proto).collect(),
        generated_at: Some(timestamp_to_proto(r.generated_at)),
        elapsed: Some(duration_to_proto(r.elapsed)),
        results_omitted: false,
        failures_omitted: r.failures_omitted,
    };
    // Every result already went out as a `record` event; a report that would
    // not fit in one message of a default client is sent without them.
    if report.encoded_len() > MAX_EVENT_BYTES {
        report.results = Vec::new();
        report.results_omitted = true;
    }
    report
}

/// A run event on the wire; `Err` (the call's final status) for a run
/// ended without a report.
pub fn event_to_proto(e: RunEvent) -> Result<proto::RunEvent, tonic::Status> {
    use proto::run_event::Event;
    let event = match e {
        RunEvent::Aborted(f) => return Err(tonic::Status::new(f.code, f.message)),
        RunEvent::Started { run_id, record_count, processor_count, started_at, trace_id } => {
            Event::Started(proto::RunStarted {
                run_id,
                record_count,
                processor_count,
                started_at: Some(timestamp_to_proto(started_at)),
                trace_id,
            })
        }
        RunEvent::Record(r) => Event::Record(record_result_to_proto(r)),
        RunEvent::Report(r) => Event::Report(report_to_proto(r)),
        RunEvent::Progress(p) => Event::Progress(proto::RunProgress {
            records_dispatched: p.records_dispatched,
            records_succeeded: p.records_succeeded,
            records_failed: p.records_failed,
            records_in_flight: p.records_in_flight,
            record_count: p.record_count,
            elapsed: Some(duration_to_proto(p.elapsed)),
            records_received: p.records_received,
        }),
    };
    Ok(proto::RunEvent { event: Some(event) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn struct_json_round_trip() {
        let j = json!({"a": 1.0, "b": "x", "c": [true, null, {"d": 2.5}], "e": {}});
        let m = j.as_object().unwrap().clone();
        assert_eq!(struct_to_json(json_to_struct(m.clone())), m);
    }

    fn req(ids: &[&str]) -> proto::RunRequest {
        proto::RunRequest {
            records: ids.iter().map(|id| proto::Record { id: id.to_string(), attributes: None }).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn validation_names_record_and_field() {
        let limits = RunLimits::default();
        let msg = |r| run_spec_from_proto(r, &limits).unwrap_err().to_string();
        assert!(msg(req(&[])).contains("records"));
        assert!(msg(req(&["a", ""])).contains("record 1: id"));
        assert!(msg(req(&["a", "b", "a"])).contains("record 2 (id \"a\"): id: duplicates record 0"));
        let mut r = req(&["a"]);
        r.unit_mode = 9;
        assert!(msg(r).contains("unit_mode"));
        let (spec, records) = run_spec_from_proto(req(&["a", "b"]), &limits).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(spec.options.max_in_flight, limits.default_max_in_flight);
        assert!(spec.run_id.starts_with("run-"));
    }
}
