//! Property tests over request validation: any `RunRequest`, `RunStream`
//! sequence or processor request a generator can build (ids empty, huge,
//! unicode, with control characters or duplicated; options zero, huge or
//! out of range, durations negative or past protobuf's range; params and
//! attributes nested, with NaN and infinities) is either accepted or
//! refused with INVALID_ARGUMENT: never a panic, never another code.
//!
//! In process, against the conversion functions ([`IN_PROCESS_CASES`] cases
//! each); then through a real pipeline and processor over gRPC
//! ([`GRPC_CASES`] cases each), where acceptance means the run starts and
//! ends with a report.

mod common;

use common::*;
use fanout::budget::MemoryBudget;
use fanout::config::RunLimits;
use fanout::convert;
use fanout::pipeline::input::StreamInput;
use fanout::proto::run_input::Input;
use fanout::proto::{self, run_event::Event};
use fanout::workload::Digest;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use prost_types::value::Kind;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tonic::Code;

/// Cases of each in-process property (fast: no I/O).
const IN_PROCESS_CASES: u32 = 2048;
/// Cases of each property over gRPC (a run each, on loopback).
const GRPC_CASES: u32 = 96;

/// Most records a generated run has; the limits below make some too many.
const MAX_GENERATED_RECORDS: usize = 12;
/// `--max-records` of the limits the properties use.
const MAX_RECORDS: usize = 10;

fn config(cases: u32) -> Config {
    // No regression files written into the tree; a failure prints its
    // minimal case.
    Config { cases, failure_persistence: None, ..Config::default() }
}

fn limits() -> RunLimits {
    RunLimits { max_records: MAX_RECORDS, max_attempts_limit: 3, ..RunLimits::default() }
}

// ------------------------------------------------------------ generators

/// Strings of every kind: empty, ASCII, any Unicode (control characters
/// included), around the id limits (128 and 512 bytes).
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9-]{1,12}",
        ".{0,24}",
        "\\PC{0,24}",
        (100usize..140).prop_map(|n| "r".repeat(n)),
        (500usize..530).prop_map(|n| "é".repeat(n / 2)),
    ]
}

/// Record ids: mostly plain and distinct, often from a tiny set (so
/// duplicates are common), or anything.
fn record_id() -> impl Strategy<Value = String> {
    prop_oneof![12 => "[a-z0-9]{6,10}", 1 => "[ab]{1,2}", 1 => text()]
}

/// Each generated field is valid most of the time, so that whole requests
/// are accepted often enough; `weird` is drawn the rest of the time.
fn mostly<T: std::fmt::Debug>(
    valid: impl Strategy<Value = T> + 'static,
    weird: impl Strategy<Value = T> + 'static,
) -> BoxedStrategy<T> {
    prop_oneof![6 => valid, 1 => weird].boxed()
}

fn number() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>(),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        (0u32..40).prop_map(f64::from),
    ]
}

fn value() -> impl Strategy<Value = prost_types::Value> {
    let leaf = prop_oneof![
        Just(None),
        Just(Some(Kind::NullValue(0))),
        number().prop_map(|n| Some(Kind::NumberValue(n))),
        text().prop_map(|s| Some(Kind::StringValue(s))),
        any::<bool>().prop_map(|b| Some(Kind::BoolValue(b))),
    ]
    .prop_map(|kind| prost_types::Value { kind });
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4)
                .prop_map(|values| Some(Kind::ListValue(prost_types::ListValue { values }))),
            prop::collection::btree_map(text(), inner, 0..4).prop_map(|m| Some(Kind::StructValue(
                prost_types::Struct { fields: m.into_iter().collect() }
            ))),
        ]
        .prop_map(|kind| prost_types::Value { kind })
    })
}

/// A `Struct`, sometimes with the digest workload's keys (`rounds`,
/// `units`) holding anything.
fn pb_struct_any() -> impl Strategy<Value = prost_types::Struct> {
    let key = prop_oneof![Just("rounds".to_owned()), Just("units".to_owned()), text()];
    prop::collection::btree_map(key, value(), 0..4)
        .prop_map(|m| prost_types::Struct { fields: m.into_iter().collect() })
}

/// Counts: small, at the limits (4096 in flight, 1024 per batch), or any.
fn small_or_any_u32() -> impl Strategy<Value = u32> {
    mostly(0u32..4, prop_oneof![any::<u32>(), 4090u32..4100, 1020u32..1030])
}

fn duration() -> impl Strategy<Value = prost_types::Duration> {
    prop_oneof![
        8 => (0i64..3, 0i32..1_000_000_000),
        1 => (any::<i64>(), any::<i32>()),
        1 => (Just(convert::MAX_DURATION_SECONDS), 0i32..1_000_000_000),
        1 => (Just(convert::MAX_DURATION_SECONDS + 1), Just(0)),
        1 => (-2i64..0, 0i32..10),
        1 => (0i64..2, prop_oneof![Just(-1), Just(1_000_000_000), Just(i32::MAX)]),
    ]
    .prop_map(|(seconds, nanos)| prost_types::Duration { seconds, nanos })
}

fn options() -> impl Strategy<Value = Option<proto::RunOptions>> {
    let opts = (
        small_or_any_u32(),
        small_or_any_u32(),
        prop::option::of(duration()),
        prop::option::of(small_or_any_u32()),
        prop::option::of(mostly(0.0f64..=100.0, number())),
        any::<bool>(),
        small_or_any_u32(),
        any::<bool>(),
    )
        .prop_map(
            |(
                max_in_flight,
                max_attempts,
                record_timeout,
                failures,
                share,
                summary_only,
                batch,
                attempt_log,
            )| {
                proto::RunOptions {
                    max_in_flight,
                    max_attempts,
                    record_timeout,
                    tolerated_failures: failures,
                    tolerated_failure_percentage: share,
                    summary_only,
                    max_batch_size: batch,
                    attempt_log,
                }
            },
        );
    prop::option::of(opts)
}

fn unit_mode() -> impl Strategy<Value = i32> {
    mostly(0i32..3, any::<i32>())
}

fn gen_record() -> impl Strategy<Value = proto::Record> {
    (record_id(), prop::option::of(pb_struct_any()))
        .prop_map(|(id, attributes)| proto::Record { id, attributes })
}

fn gen_records() -> impl Strategy<Value = Vec<proto::Record>> {
    prop::collection::vec(gen_record(), 0..=MAX_GENERATED_RECORDS)
}

fn header() -> impl Strategy<Value = proto::RunHeader> {
    (mostly("[a-z0-9-]{0,12}", text()), unit_mode(), prop::option::of(pb_struct_any()), options()).prop_map(
        |(run_id, unit_mode, params, options)| proto::RunHeader { run_id, unit_mode, params, options },
    )
}

fn gen_request() -> impl Strategy<Value = proto::RunRequest> {
    (header(), gen_records()).prop_map(|(h, records)| proto::RunRequest {
        run_id: h.run_id,
        unit_mode: h.unit_mode,
        params: h.params,
        options: h.options,
        records,
    })
}

/// One `RunStream` message after the header: a batch, `done` (with the
/// right count or any), a second header, or an empty message.
#[derive(Debug, Clone)]
enum Step {
    Batch(Vec<proto::Record>),
    DoneRight,
    Done(u64),
    Header(proto::RunHeader),
    Empty,
}

/// A `RunStream` input: a header (or not), then steps, usually ending with
/// the right `done`.
fn stream_input() -> impl Strategy<Value = (Option<proto::RunHeader>, Vec<Step>)> {
    let step = prop_oneof![
        6 => prop::collection::vec(gen_record(), 0..4).prop_map(Step::Batch),
        2 => Just(Step::DoneRight),
        1 => prop_oneof![0u64..4, any::<u64>()].prop_map(Step::Done),
        1 => header().prop_map(Step::Header),
        1 => Just(Step::Empty),
    ];
    let steps = (prop::collection::vec(step, 0..6), prop::bool::weighted(0.8)).prop_map(|(mut s, done)| {
        if done {
            s.push(Step::DoneRight);
        }
        s
    });
    (prop::option::weighted(0.9, header()), steps)
}

/// The messages of a stream input, the right `done` counting the records
/// sent before it.
fn messages(header: &Option<proto::RunHeader>, steps: &[Step]) -> Vec<proto::RunInput> {
    let mut out = Vec::new();
    if let Some(h) = header {
        out.push(Some(Input::Header(h.clone())));
    }
    let mut sent = 0u64;
    for s in steps {
        out.push(match s {
            Step::Batch(records) => {
                sent += records.len() as u64;
                Some(Input::Records(proto::RecordBatch { records: records.clone() }))
            }
            Step::DoneRight => Some(Input::Done(proto::InputDone { record_count: sent })),
            Step::Done(n) => Some(Input::Done(proto::InputDone { record_count: *n })),
            Step::Header(h) => Some(Input::Header(h.clone())),
            Step::Empty => None,
        });
    }
    out.into_iter().map(|input| proto::RunInput { input }).collect()
}

// ---------------------------------------------------------- in process

/// Counts of accepted and refused cases: each side must be a real share of
/// the cases, or the generators no longer reach one of them.
#[derive(Default)]
struct Tally {
    accepted: AtomicU32,
    refused: AtomicU32,
}

impl Tally {
    fn add(&self, accepted: bool) {
        let n = if accepted { &self.accepted } else { &self.refused };
        n.fetch_add(1, Ordering::Relaxed);
    }

    /// Both sides reached at least `share` of `cases` (the runner also
    /// counts the cases it shrinks, so these are lower bounds).
    fn assert_both(&self, what: &str, cases: u32, share: f64) {
        let (a, r) = (self.accepted.load(Ordering::Relaxed), self.refused.load(Ordering::Relaxed));
        let least = (f64::from(cases) * share) as u32;
        assert!(
            a >= least && r >= least,
            "{what}: {a} accepted, {r} refused of {cases}; each should be >= {least}"
        );
        eprintln!("{what}: {a} accepted, {r} refused");
    }
}

/// `Err` unless `result` is accepted or INVALID_ARGUMENT.
fn accepted_or_invalid<T>(what: &str, result: Result<T, fanout::Error>) -> Result<(), TestCaseError> {
    match result {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Code::InvalidArgument => {
            prop_assert!(!e.to_string().is_empty(), "{what}: an empty message");
            Ok(())
        }
        Err(e) => Err(TestCaseError::fail(format!("{what}: {:?}: {e}", e.code()))),
    }
}

#[test]
fn run_requests_are_accepted_or_invalid_argument() {
    let limits = limits();
    let tally = Tally::default();
    TestRunner::new(config(IN_PROCESS_CASES))
        .run(&gen_request(), |req| {
            let n = req.records.len();
            let result = convert::run_spec_from_proto(req, &limits);
            tally.add(result.is_ok());
            if let Ok((spec, records)) = &result {
                // What is accepted is within the limits.
                prop_assert!((1..=MAX_RECORDS).contains(&n));
                prop_assert_eq!(records.len(), n);
                prop_assert!((1..=limits.max_in_flight_limit).contains(&spec.options.max_in_flight));
                prop_assert!((1..=limits.max_attempts_limit).contains(&spec.options.max_attempts));
                prop_assert!(!spec.options.record_timeout.is_zero());
                prop_assert!(!spec.run_id.is_empty());
            }
            accepted_or_invalid("RunRequest", result)
        })
        .unwrap();
    tally.assert_both("RunRequest in process", IN_PROCESS_CASES, 0.05);
}

#[test]
fn stream_inputs_are_accepted_or_invalid_argument() {
    let limits = limits();
    let tally = Tally::default();
    TestRunner::new(config(IN_PROCESS_CASES))
        .run(&stream_input(), |(header, steps)| {
            let Some(h) = header else { return Ok(()) };
            let spec = convert::run_spec_from_header(h.clone(), &limits);
            tally.add(spec.is_ok());
            accepted_or_invalid("header", spec)?;
            let mut input = StreamInput::new(
                Box::pin(futures::stream::empty::<Result<proto::RunInput, tonic::Status>>()),
                MemoryBudget::new(1 << 30, "test"),
            );
            // Messages after the header, as the run reads them: up to the
            // first fault or an accepted `done`; an input that ends before
            // `done` is INVALID_ARGUMENT.
            for m in messages(&Some(h), &steps).into_iter().skip(1) {
                let done = matches!(m.input, Some(Input::Done(_)));
                let result = input.accept(Some(Ok(m)));
                let fault = result.is_err();
                accepted_or_invalid("stream message", result)?;
                if fault || done {
                    return Ok(());
                }
            }
            match input.accept(None) {
                Err(e) if e.code() == Code::InvalidArgument => Ok(()),
                other => Err(TestCaseError::fail(format!("an input ended without done: {other:?}"))),
            }
        })
        .unwrap();
    tally.assert_both("RunStream header in process", IN_PROCESS_CASES, 0.05);
}

#[test]
fn processor_requests_are_accepted_or_invalid_argument() {
    let batch = (
        text(),
        unit_mode(),
        prop::option::of(pb_struct_any()),
        prop::collection::vec(gen_record(), 0..6),
        prop::collection::vec(any::<u32>(), 0..6),
    );
    TestRunner::new(config(IN_PROCESS_CASES))
        .run(&batch, |(run_id, unit_mode, params, records, attempts)| {
            let one = proto::ProcessRecordRequest {
                run_id: run_id.clone(),
                record: records.first().cloned(),
                unit_mode,
                params: params.clone(),
                attempt: attempts.first().copied().unwrap_or(1),
            };
            accepted_or_invalid("ProcessRecordRequest", convert::record_task_from_proto(one))?;
            let req = proto::ProcessBatchRequest {
                run_id,
                records,
                unit_mode,
                params,
                attempts,
                record_timeout: None,
            };
            match convert::batch_tasks_from_proto(req) {
                Ok(tasks) => {
                    for t in tasks {
                        accepted_or_invalid("batch record", t)?;
                    }
                    Ok(())
                }
                Err(e) => accepted_or_invalid::<()>("ProcessBatchRequest", Err(e)),
            }
        })
        .unwrap();
}

// --------------------------------------------------------------- gRPC

/// A pipeline over one processor whose records are always cheap: at most
/// 10 rounds (more is INVALID_ARGUMENT for the record) and 32 units.
struct Fleet {
    runtime: tokio::runtime::Runtime,
    _processor: Proc,
    pipeline: fanout::server::Running,
}

fn fleet() -> Fleet {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (processor, pipeline) = runtime.block_on(async {
        let mut pcfg = processor_config_with(2, 64);
        pcfg.max_rounds = 10;
        pcfg.max_units_per_record = 32;
        let p = start_processor_with(&pcfg, Digest::with_max_rounds(pcfg.max_rounds)).await;
        let mut cfg = pipeline_config(std::slice::from_ref(&p.url));
        cfg.limits = limits();
        let pipe = fanout::server::start_pipeline(&cfg).await.unwrap();
        (p, pipe)
    });
    Fleet { runtime, _processor: processor, pipeline }
}

/// How a call ended: refused with INVALID_ARGUMENT, or started and
/// reported; anything else is the property failing.
async fn outcome(
    call: Result<tonic::Response<tonic::Streaming<proto::RunEvent>>, tonic::Status>,
    tally: &Tally,
) -> Result<(), TestCaseError> {
    let mut stream = match call {
        Err(s) if s.code() == Code::InvalidArgument => {
            tally.add(false);
            return Ok(());
        }
        Err(s) => return Err(TestCaseError::fail(format!("refused with {:?}: {}", s.code(), s.message()))),
        Ok(r) => r.into_inner(),
    };
    let mut started = false;
    loop {
        match stream.message().await {
            Ok(Some(proto::RunEvent { event: Some(Event::Started(_)) })) => {
                started = true;
                tally.add(true);
            }
            Ok(Some(proto::RunEvent { event: Some(Event::Report(_)) })) => {
                prop_assert!(started, "a report without started");
                return Ok(());
            }
            Ok(Some(_)) => prop_assert!(started, "an event before started"),
            Ok(None) => return Err(TestCaseError::fail("the stream ended without a report or status")),
            // A streamed run ends with its input's fault (refused before
            // it started when the header is bad).
            Err(s) if s.code() == Code::InvalidArgument => {
                if !started {
                    tally.add(false);
                }
                return Ok(());
            }
            Err(s) => return Err(TestCaseError::fail(format!("ended with {:?}: {}", s.code(), s.message()))),
        }
    }
}

#[test]
fn run_requests_over_grpc_start_or_are_invalid_argument() {
    let fleet = fleet();
    let url = fleet.pipeline.url();
    let mut client = fleet.runtime.block_on(pipeline_client(&url));
    let tally = Tally::default();
    TestRunner::new(config(GRPC_CASES))
        .run(&gen_request(), |req| {
            fleet.runtime.block_on(async {
                let call = async { outcome(client.clone().run(req).await, &tally).await };
                tokio::time::timeout(WAIT, call).await.map_err(|_| TestCaseError::fail("run timed out"))?
            })
        })
        .unwrap();
    tally.assert_both("Run over gRPC", GRPC_CASES, 0.05);
    // The pipeline is still serving normally.
    let got = fleet.runtime.block_on(run_ok(&mut client, common::run_request(records(3))));
    assert_eq!(got.status(), proto::RunStatus::Succeeded);
}

#[test]
fn stream_inputs_over_grpc_start_or_are_invalid_argument() {
    let fleet = fleet();
    let url = fleet.pipeline.url();
    let client = fleet.runtime.block_on(pipeline_client(&url));
    let tally = Tally::default();
    TestRunner::new(config(GRPC_CASES))
        .run(&stream_input(), |(header, steps)| {
            let input = futures::stream::iter(messages(&header, &steps));
            fleet.runtime.block_on(async {
                let call = async { outcome(client.clone().run_stream(input).await, &tally).await };
                tokio::time::timeout(WAIT, call).await.map_err(|_| TestCaseError::fail("run timed out"))?
            })
        })
        .unwrap();
    tally.assert_both("RunStream over gRPC", GRPC_CASES, 0.05);
}

#[test]
fn durations_past_the_range_do_not_overflow() {
    // The property's edges, stated once plainly: the largest valid duration
    // is taken, one past it is INVALID_ARGUMENT naming the field.
    let limits = limits();
    let header = |seconds, nanos| proto::RunHeader {
        options: Some(proto::RunOptions {
            record_timeout: Some(prost_types::Duration { seconds, nanos }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let max = convert::run_spec_from_header(header(convert::MAX_DURATION_SECONDS, 999_999_999), &limits);
    assert_eq!(
        max.unwrap().options.record_timeout,
        Duration::new(convert::MAX_DURATION_SECONDS as u64, 999_999_999)
    );
    let over =
        convert::run_spec_from_header(header(convert::MAX_DURATION_SECONDS + 1, 0), &limits).unwrap_err();
    assert_eq!(over.code(), Code::InvalidArgument);
    assert!(over.to_string().contains("options.record_timeout"), "{over}");
}
