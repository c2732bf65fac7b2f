//! Helpers shared by the integration tests: in-process servers on loopback
//! ports, gRPC clients, run collection with the stream's shape checked, an
//! independent digest computation, and test workloads that inject faults.
//!
//! Nothing here sleeps in place of a signal: waits observe a stream, a
//! counter or a channel, always under a timeout.

#![allow(dead_code)]

pub mod auth;
pub mod timeline;
pub mod tls;

use fanout::config::{PipelineConfig, ProcessorConfig};
use fanout::domain::{JsonMap, Record};
use fanout::engine::EngineStats;
use fanout::proto;
use fanout::proto::pipeline_client::PipelineClient;
use fanout::proto::record_processor_client::RecordProcessorClient;
use fanout::proto::run_event::Event;
use fanout::server::{self, Running};
use fanout::workload::digest::{DigestUnit, default_unit_count, unit_value};
use fanout::workload::{Cancel, Digest, Workload, WorkloadError};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tonic::transport::Channel;

pub mod otlp;

/// Upper bound on anything a test waits for; only reached when a test fails.
pub const WAIT: Duration = Duration::from_secs(15);

/// Rounds used by most tests: small, so the suite stays fast.
pub const ROUNDS: u64 = 10;

// ---------------------------------------------------------------- servers

/// A processor config on an ephemeral loopback port with two unit threads.
pub fn processor_config() -> ProcessorConfig {
    ProcessorConfig {
        listen: "127.0.0.1:0".into(),
        unit_threads: Some(2),
        drain_timeout: Duration::from_secs(2),
        ..ProcessorConfig::default()
    }
}

/// A pipeline config over `urls` on an ephemeral loopback port, with short
/// backoff and health intervals.
pub fn pipeline_config(urls: &[String]) -> PipelineConfig {
    let mut cfg = PipelineConfig::new(urls.iter().cloned());
    cfg.listen = "127.0.0.1:0".into();
    cfg.backoff_base = Duration::from_millis(5);
    cfg.backoff_max = Duration::from_millis(50);
    cfg.health_interval = Duration::from_millis(200);
    cfg.drain_timeout = Duration::from_secs(2);
    cfg
}

/// A running in-process processor.
pub struct Proc {
    pub running: Running,
    pub stats: Arc<EngineStats>,
    pub url: String,
    /// `IP:PORT`, as results name the instance (`RecordResult.processor`).
    pub addr: String,
}

/// Starts a processor with `workload` and [`processor_config`].
pub async fn start_processor<W: Workload>(workload: W) -> Proc {
    start_processor_with(&processor_config(), workload).await
}

/// Starts a processor with `workload` and `cfg`.
pub async fn start_processor_with<W: Workload>(cfg: &ProcessorConfig, workload: W) -> Proc {
    let (running, stats) = server::start_processor(cfg, workload).await.expect("start processor");
    let url = running.url();
    let addr = running.addr.to_string();
    Proc { running, stats, url, addr }
}

/// Starts a pipeline over `urls` with [`pipeline_config`].
pub async fn start_pipeline(urls: &[String]) -> Running {
    server::start_pipeline(&pipeline_config(urls)).await.expect("start pipeline")
}

/// A connected `Pipeline` client.
pub async fn pipeline_client(url: &str) -> PipelineClient<Channel> {
    let ch = tokio::time::timeout(WAIT, Channel::from_shared(url.to_owned()).unwrap().connect())
        .await
        .expect("connect timed out")
        .expect("connect to pipeline");
    PipelineClient::new(ch)
}

/// A pipeline client whose HTTP/2 windows are small, so a stream it does
/// not read stalls its sender quickly.
pub async fn small_window_client(url: &str) -> PipelineClient<Channel> {
    let ch = tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .initial_stream_window_size(16 * 1024)
        .initial_connection_window_size(64 * 1024)
        .connect()
        .await
        .unwrap();
    PipelineClient::new(ch)
}

/// A connected `RecordProcessor` client.
pub async fn processor_client(url: &str) -> RecordProcessorClient<Channel> {
    let ch = tokio::time::timeout(WAIT, Channel::from_shared(url.to_owned()).unwrap().connect())
        .await
        .expect("connect timed out")
        .expect("connect to processor");
    RecordProcessorClient::new(ch)
}

/// Reads a counter of an engine.
pub fn get(counter: &AtomicU64) -> u64 {
    EngineStats::get(counter)
}

/// Asserts `status` refuses an over-size request as the contract says:
/// INVALID_ARGUMENT (or RESOURCE_EXHAUSTED) naming the 1024-byte limit and
/// the flag that sets it.
pub fn assert_oversize_refused(status: &tonic::Status) {
    assert!(
        matches!(status.code(), tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted),
        "an oversized request must be INVALID_ARGUMENT or RESOURCE_EXHAUSTED: {status:?}"
    );
    for n in ["1024", "--max-message-bytes"] {
        assert!(status.message().contains(n), "the message names the limit ({n}): {:?}", status.message());
    }
}

/// Asserts a status's code, and that its message contains each of `needles`.
pub fn assert_status(status: &tonic::Status, code: tonic::Code, needles: &[&str]) {
    assert_eq!(status.code(), code, "{status:?}");
    for n in needles {
        assert!(status.message().contains(n), "message {:?} must contain {n:?}", status.message());
    }
}

/// Polls `cond` (a counter, a flag) until it holds; panics after [`WAIT`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let poll = async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    if tokio::time::timeout(WAIT, poll).await.is_err() {
        panic!("timed out waiting for {what}");
    }
}

// --------------------------------------------------------------- requests

/// A JSON object literal as a protobuf `Struct`.
pub fn pb_struct(v: Value) -> prost_types::Struct {
    fanout::convert::json_to_struct(v.as_object().expect("a JSON object").clone())
}

/// A protobuf `Struct` as JSON.
pub fn json(s: &prost_types::Struct) -> JsonMap {
    fanout::convert::struct_to_json(s.clone())
}

/// `{"rounds": rounds}`.
pub fn rounds(rounds: u64) -> prost_types::Struct {
    pb_struct(serde_json::json!({ "rounds": rounds }))
}

/// The record ids `rec-000`, `rec-001`, ...
pub fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("rec-{i:03}")).collect()
}

/// A record with no attributes.
pub fn record(id: &str) -> proto::Record {
    proto::Record { id: id.into(), attributes: None }
}

/// A record with attributes.
pub fn record_with(id: &str, attributes: Value) -> proto::Record {
    proto::Record { id: id.into(), attributes: Some(pb_struct(attributes)) }
}

/// Records `rec-000`.. with no attributes.
pub fn records(n: usize) -> Vec<proto::Record> {
    ids(n).iter().map(|id| record(id)).collect()
}

/// A run of `records` with [`ROUNDS`] rounds and default options.
pub fn run_request(records: Vec<proto::Record>) -> proto::RunRequest {
    proto::RunRequest { records, params: Some(rounds(ROUNDS)), ..Default::default() }
}

/// A `ProcessRecord` request for one record with [`ROUNDS`] rounds.
pub fn process_request(record: proto::Record, mode: proto::UnitMode) -> proto::ProcessRecordRequest {
    proto::ProcessRecordRequest {
        run_id: "direct".into(),
        record: Some(record),
        unit_mode: mode as i32,
        params: Some(rounds(ROUNDS)),
        attempt: 1,
    }
}

// ------------------------------------------------------------------- runs

/// A run's stream, collected and checked for shape: `started` first, then
/// `record` events, then `report` last, nothing after.
#[derive(Debug, Clone)]
pub struct Collected {
    pub started: proto::RunStarted,
    pub records: Vec<proto::RecordResult>,
    pub report: proto::RunReport,
    /// The `progress` events, in order.
    pub progress: Vec<proto::RunProgress>,
}

impl Collected {
    /// The streamed result of record `id`.
    pub fn record(&self, id: &str) -> &proto::RecordResult {
        let found: Vec<_> = self.records.iter().filter(|r| r.record_id == id).collect();
        assert_eq!(found.len(), 1, "record {id} must be streamed exactly once");
        found[0]
    }

    /// Checks that every input record (ids in input order) was streamed
    /// exactly once with the right index, and that the report (unless
    /// `summary_only`) holds the same results in input order.
    pub fn assert_exactly_once(&self, ids: &[String]) {
        assert_eq!(self.started.record_count as usize, ids.len(), "started.record_count");
        assert_eq!(self.records.len(), ids.len(), "one record event per input record");
        let mut seen = HashSet::new();
        for r in &self.records {
            let i = r.index as usize;
            assert!(i < ids.len(), "index {i} out of range");
            assert!(seen.insert(i), "index {i} streamed twice");
            assert_eq!(r.record_id, ids[i], "record_id at index {i}");
        }
        assert_eq!(seen.len(), ids.len());
        let s = self.report.summary.as_ref().expect("report.summary");
        assert_eq!(s.total_records_processed as usize, ids.len(), "summary.total_records_processed");
        assert_eq!(
            (s.records_succeeded + s.records_failed) as usize,
            ids.len(),
            "succeeded + failed = every record"
        );
        let succeeded = self.records.iter().filter(|r| r.status() == proto::RecordStatus::Succeeded).count();
        assert_eq!(s.records_succeeded as usize, succeeded, "summary.records_succeeded");
        let retries: u64 = self.records.iter().map(|r| u64::from(r.attempts.saturating_sub(1))).sum();
        assert_eq!(s.retries, retries, "summary.retries = attempts beyond the first");
        if !self.report.results.is_empty() {
            assert_eq!(self.report.results.len(), ids.len(), "report.results has every record");
            for (i, r) in self.report.results.iter().enumerate() {
                assert_eq!(r.index as usize, i, "report.results in input order");
                let streamed = self.records.iter().find(|e| e.index as usize == i).unwrap();
                assert_eq!(r, streamed, "report result {i} equals its streamed event");
            }
        }
    }

    /// The report's status.
    pub fn status(&self) -> proto::RunStatus {
        self.report.status()
    }

    /// The failed records, for assertion messages.
    pub fn failures(&self) -> Vec<String> {
        self.records
            .iter()
            .filter_map(|r| {
                r.error.as_ref().map(|e| {
                    format!("{} after {} attempts on {:?}: {e:?}", r.record_id, r.attempts, r.processor)
                })
            })
            .collect()
    }

    /// The report's summary.
    pub fn summary(&self) -> &proto::RunSummary {
        self.report.summary.as_ref().expect("report.summary")
    }
}

/// Calls `Run` and collects its whole stream (under [`WAIT`]). A status
/// before the first event is returned as `Err`; anything out of shape panics.
pub async fn run(
    client: &mut PipelineClient<Channel>,
    req: impl tonic::IntoRequest<proto::RunRequest>,
) -> Result<Collected, tonic::Status> {
    run_for(client, req, WAIT).await
}

/// [`run`] under a bound of `limit` instead of [`WAIT`], for big runs.
pub async fn run_for(
    client: &mut PipelineClient<Channel>,
    req: impl tonic::IntoRequest<proto::RunRequest>,
    limit: Duration,
) -> Result<Collected, tonic::Status> {
    tokio::time::timeout(limit, run_inner(client, req)).await.expect("run timed out")
}

async fn run_inner(
    client: &mut PipelineClient<Channel>,
    req: impl tonic::IntoRequest<proto::RunRequest>,
) -> Result<Collected, tonic::Status> {
    let mut stream = client.run(req).await?.into_inner();
    let first = stream.message().await?.expect("stream ended before any event");
    let Some(Event::Started(started)) = first.event else { panic!("first event must be started: {first:?}") };
    let mut records = Vec::new();
    let mut progress = Vec::new();
    let report = loop {
        let ev = stream.message().await.expect("stream failed mid-run").expect("stream ended before report");
        match ev.event.expect("event set") {
            Event::Started(s) => panic!("a second started event: {s:?}"),
            Event::Record(r) => records.push(r),
            Event::Report(r) => break r,
            Event::Progress(p) => progress.push(p),
        }
    };
    let after = stream.message().await.expect("stream failed after report");
    assert!(after.is_none(), "events after the report: {after:?}");
    Ok(Collected { started, records, report, progress })
}

/// A streamed run's events: `started`, the records and progress, then the
/// report, or the status that ended the call instead.
#[derive(Debug)]
pub struct StreamCollected {
    pub started: proto::RunStarted,
    pub records: Vec<proto::RecordResult>,
    pub progress: Vec<proto::RunProgress>,
    pub end: Result<proto::RunReport, tonic::Status>,
}

impl StreamCollected {
    /// The report, which the run must have ended with.
    pub fn report(&self) -> &proto::RunReport {
        self.end.as_ref().expect("the run ended without a report")
    }

    /// Checks that the records at positions `0..ids.len()` (ids in input
    /// order) each had exactly one `record` event with that index and id,
    /// and nothing else did.
    pub fn assert_each_once(&self, ids: &[String]) {
        let mut seen = HashSet::new();
        for r in &self.records {
            let i = r.index as usize;
            assert!(i < ids.len(), "index {i} out of range ({} records accepted)", ids.len());
            assert!(seen.insert(i), "index {i} streamed twice");
            assert_eq!(r.record_id, ids[i], "record_id at index {i}");
        }
        assert_eq!(seen.len(), ids.len(), "one record event per accepted record");
    }

    /// [`Self::assert_each_once`], and the report's summary and failures
    /// agree with the events.
    pub fn assert_exactly_once(&self, ids: &[String]) {
        self.assert_each_once(ids);
        assert_eq!(self.started.record_count, 0, "a stream's size is not known at the start");
        let s = self.report().summary.as_ref().expect("report.summary");
        assert_eq!(s.total_records_processed as usize, ids.len(), "summary.total_records_processed");
        let failed: Vec<_> =
            self.records.iter().filter(|r| r.status() != proto::RecordStatus::Succeeded).collect();
        assert_eq!(s.records_failed as usize, failed.len(), "summary.records_failed");
        assert_eq!(s.records_succeeded as usize, ids.len() - failed.len(), "summary.records_succeeded");
        let retries: u64 = self.records.iter().map(|r| u64::from(r.attempts.saturating_sub(1))).sum();
        assert_eq!(s.retries, retries, "summary.retries");
        let report = self.report();
        assert_eq!(
            report.results.len() as u64 + report.failures_omitted,
            failed.len() as u64,
            "failures reported"
        );
        for r in &report.results {
            let streamed = self.records.iter().find(|e| e.index == r.index).unwrap();
            assert_eq!(r, streamed, "report failure {} equals its event", r.index);
        }
    }
}

/// `RunInput` messages: the header.
pub fn header_msg(options: proto::RunOptions, params: prost_types::Struct) -> proto::RunInput {
    let header = proto::RunHeader { params: Some(params), options: Some(options), ..Default::default() };
    proto::RunInput { input: Some(proto::run_input::Input::Header(header)) }
}

/// `RunInput` messages: a batch of records.
pub fn batch_msg(records: Vec<proto::Record>) -> proto::RunInput {
    proto::RunInput { input: Some(proto::run_input::Input::Records(proto::RecordBatch { records })) }
}

/// `RunInput` messages: the end, with a count.
pub fn done_msg(record_count: u64) -> proto::RunInput {
    proto::RunInput { input: Some(proto::run_input::Input::Done(proto::InputDone { record_count })) }
}

/// The messages of a stream of `ids` in batches of `per_batch`, with the
/// right count at the end.
pub fn stream_of(ids: &[String], per_batch: usize, options: proto::RunOptions) -> Vec<proto::RunInput> {
    let mut msgs = vec![header_msg(options, rounds(ROUNDS))];
    msgs.extend(ids.chunks(per_batch).map(|c| batch_msg(c.iter().map(|id| record(id)).collect())));
    msgs.push(done_msg(ids.len() as u64));
    msgs
}

/// Calls `RunStream`, sending `input` from its own task while the events are
/// read, and collects the events (under [`WAIT`] unless `limit`). A status
/// before `started` is `Err`.
pub async fn run_stream(
    client: &mut PipelineClient<Channel>,
    input: impl IntoIterator<Item = proto::RunInput> + Send + 'static,
    limit: Option<Duration>,
) -> Result<StreamCollected, tonic::Status> {
    let input: Vec<_> = input.into_iter().collect();
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(async move {
        for m in input {
            if tx.send(m).await.is_err() {
                return;
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    tokio::time::timeout(limit.unwrap_or(WAIT), collect_stream(client, stream)).await.expect("run timed out")
}

/// Calls `RunStream` with `input` and collects its events.
pub async fn collect_stream(
    client: &mut PipelineClient<Channel>,
    input: impl tokio_stream::Stream<Item = proto::RunInput> + Send + 'static,
) -> Result<StreamCollected, tonic::Status> {
    let mut stream = client.run_stream(input).await?.into_inner();
    let first = stream.message().await?.expect("stream ended before any event");
    let Some(Event::Started(started)) = first.event else { panic!("first event must be started: {first:?}") };
    let mut records = Vec::new();
    let mut progress = Vec::new();
    let end = loop {
        match stream.message().await {
            Err(status) => break Err(status),
            Ok(None) => panic!("stream ended without a report or a status"),
            Ok(Some(ev)) => match ev.event.expect("event set") {
                Event::Started(s) => panic!("a second started event: {s:?}"),
                Event::Record(r) => records.push(r),
                Event::Report(r) => break Ok(r),
                Event::Progress(p) => progress.push(p),
            },
        }
    };
    if end.is_ok() {
        let after = stream.message().await.expect("stream failed after report");
        assert!(after.is_none(), "events after the report: {after:?}");
    }
    Ok(StreamCollected { started, records, progress, end })
}

/// Reads what is left of a stalled run's stream (under 30 s: a stalled
/// run ends at its stalled-client timeout): it must end without a report.
pub async fn assert_ends_without_report(stream: &mut tonic::Streaming<proto::RunEvent>) {
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stream.message().await {
                Ok(Some(ev)) => {
                    assert!(!matches!(ev.event, Some(Event::Report(_))), "a stalled run reported")
                }
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "a stalled run's stream did not end");
}

/// Runs `req`, expecting it to be accepted.
pub async fn run_ok(client: &mut PipelineClient<Channel>, req: proto::RunRequest) -> Collected {
    run(client, req).await.expect("Run rejected")
}

/// Asserts a timestamp is within a minute of the real time.
pub fn assert_recent(t: &prost_types::Timestamp, what: &str) {
    let t = SystemTime::try_from(*t).expect("valid timestamp");
    let now = SystemTime::now();
    let skew = now.duration_since(t).unwrap_or_else(|e| e.duration());
    assert!(skew < Duration::from_secs(60), "{what} is {skew:?} away from now");
}

// ----------------------------------------------------------------- digest

/// A record's digest output, computed here sequentially from the unit
/// function alone (not through the engine).
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    pub unit_count: u64,
    pub xor_digest: String,
    pub min_unit: String,
    pub max_unit: String,
}

/// The expected output of record `id` with `units` (or the default count).
pub fn expected(id: &str, units: Option<u64>, rounds: u64) -> Expected {
    let n = units.unwrap_or_else(|| default_unit_count(id));
    let values: Vec<u64> = (0..n).map(|i| unit_value(format!("{id}/{i}").as_bytes(), rounds)).collect();
    let hex = |v: u64| format!("{v:016x}");
    Expected {
        unit_count: n,
        xor_digest: hex(values.iter().fold(0, |a, v| a ^ v)),
        min_unit: hex(*values.iter().min().unwrap()),
        max_unit: hex(*values.iter().max().unwrap()),
    }
}

/// Checks a succeeded result's output against [`expected`].
pub fn assert_output(r: &proto::RecordResult, want: &Expected) {
    assert_eq!(r.status(), proto::RecordStatus::Succeeded, "{} status: {:?}", r.record_id, r.error);
    assert!(r.error.is_none(), "{}: error set on success", r.record_id);
    assert_eq!(u64::from(r.units_processed), want.unit_count, "{} units_processed", r.record_id);
    let out = json(r.output.as_ref().expect("output"));
    assert_eq!(out["unit_count"].as_f64(), Some(want.unit_count as f64), "{} unit_count", r.record_id);
    assert_eq!(out["xor_digest"].as_str(), Some(want.xor_digest.as_str()), "{} xor_digest", r.record_id);
    assert_eq!(out["min_unit"].as_str(), Some(want.min_unit.as_str()), "{} min_unit", r.record_id);
    assert_eq!(out["max_unit"].as_str(), Some(want.max_unit.as_str()), "{} max_unit", r.record_id);
}

/// Asserts a failed result's code, that its message contains each of
/// `needles`, and its attempts.
pub fn assert_failed(r: &proto::RecordResult, code: tonic::Code, needles: &[&str], attempts: u32) {
    assert_eq!(r.status(), proto::RecordStatus::Failed, "{} must fail", r.record_id);
    let e = r.error.as_ref().unwrap_or_else(|| panic!("{}: failed without error", r.record_id));
    assert_eq!(e.code, code as i32, "{} error code: {e:?}", r.record_id);
    assert_eq!(e.code_name, fanout::convert::code_name(code), "{} code_name", r.record_id);
    for n in needles {
        assert!(e.message.contains(n), "{} error message {:?} must contain {n:?}", r.record_id, e.message);
    }
    assert_eq!(r.attempts, attempts, "{} attempts", r.record_id);
    assert_eq!(r.units_processed, 0, "{} units_processed on failure", r.record_id);
}

// -------------------------------------------------------------- workloads

/// A gate that blocks units until the test opens it.
#[derive(Debug, Default)]
pub struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    /// A closed gate.
    pub fn closed() -> Arc<Self> {
        Arc::default()
    }

    /// Blocks until the gate is open.
    pub fn wait(&self) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.cv.wait(open).unwrap();
        }
    }

    /// Opens the gate for every waiting and future unit.
    pub fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }

    /// A guard that opens the gate when dropped, so a failing test never
    /// leaves blocking threads (which the runtime waits for) stuck.
    pub fn open_on_drop(self: &Arc<Self>) -> OpenOnDrop {
        OpenOnDrop(self.clone())
    }
}

/// Opens its gate when dropped.
pub struct OpenOnDrop(Arc<Gate>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// Faults shared by every processor of a test (so "the first N times a
/// record is seen" counts across the fleet), plus a log of attempts.
#[derive(Debug, Default)]
pub struct Script {
    /// Remaining transient failures per record id.
    transient: Mutex<HashMap<String, u32>>,
    /// Record ids that fail permanently.
    permanent: HashSet<String>,
    /// `(record id, unit index)` whose processing panics.
    panic_at: Option<(String, usize)>,
    /// Record ids whose unit extraction panics.
    panic_in_extract: HashSet<String>,
    /// Every attempt seen: `(record id, processor label)`, in order.
    attempts: Mutex<Vec<(String, String)>>,
}

impl Script {
    /// No faults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Record `id` fails transiently the first `times` times it is seen.
    pub fn transient(self, id: &str, times: u32) -> Self {
        self.transient.lock().unwrap().insert(id.into(), times);
        self
    }

    /// Record `id` fails permanently.
    pub fn permanent(mut self, id: &str) -> Self {
        self.permanent.insert(id.into());
        self
    }

    /// Unit `unit` (0-based) of record `id` panics.
    pub fn panic_at(mut self, id: &str, unit: usize) -> Self {
        self.panic_at = Some((id.into(), unit));
        self
    }

    /// Extracting the units of record `id` panics.
    pub fn panic_in_extract(mut self, id: &str) -> Self {
        self.panic_in_extract.insert(id.into());
        self
    }

    /// Processor labels that saw record `id`, in attempt order.
    pub fn attempts_of(&self, id: &str) -> Vec<String> {
        self.attempts.lock().unwrap().iter().filter(|(r, _)| r == id).map(|(_, p)| p.clone()).collect()
    }

    /// Every record id seen by any processor.
    pub fn seen_ids(&self) -> HashSet<String> {
        self.attempts.lock().unwrap().iter().map(|(r, _)| r.clone()).collect()
    }
}

/// The digest workload with injected faults and an optional gate.
pub struct TestWorkload {
    label: String,
    script: Arc<Script>,
    gate: Option<Arc<Gate>>,
}

impl TestWorkload {
    /// A workload labelled `label` (to tell processors apart) following
    /// `script`.
    pub fn new(label: &str, script: &Arc<Script>) -> Self {
        Self { label: label.into(), script: script.clone(), gate: None }
    }

    /// Every unit blocks on `gate` before processing.
    pub fn gated(mut self, gate: &Arc<Gate>) -> Self {
        self.gate = Some(gate.clone());
        self
    }
}

impl Workload for TestWorkload {
    type Unit = DigestUnit;
    type Output = u64;

    fn name(&self) -> &str {
        "test-digest"
    }

    fn extract(&self, record: &Record, params: &JsonMap) -> Result<Vec<DigestUnit>, WorkloadError> {
        let id = &record.id;
        self.script.attempts.lock().unwrap().push((id.clone(), self.label.clone()));
        if self.script.permanent.contains(id) {
            return Err(WorkloadError::permanent("injected permanent failure"));
        }
        if self.script.panic_in_extract.contains(id) {
            panic!("injected panic extracting {id}");
        }
        if let Some(left) = self.script.transient.lock().unwrap().get_mut(id)
            && *left > 0
        {
            *left -= 1;
            return Err(WorkloadError::transient(format!("injected transient failure on {}", self.label)));
        }
        Digest::default().extract(record, params)
    }

    fn process(&self, unit: DigestUnit, cancel: &Cancel) -> Result<u64, WorkloadError> {
        if let Some(gate) = &self.gate {
            gate.wait();
        }
        if let Some((id, i)) = &self.script.panic_at
            && unit.input == format!("{id}/{i}")
        {
            panic!("injected panic in {}", unit.input);
        }
        Digest::default().process(unit, cancel)
    }

    fn aggregate(&self, record: &Record, outputs: Vec<u64>) -> Result<JsonMap, WorkloadError> {
        Digest::default().aggregate(record, outputs)
    }
}

/// Digest, counting the records it works on at once and in all, each unit
/// optionally taking `unit_time` of wall time too.
#[derive(Clone, Default)]
pub struct Tracked {
    pub active: Arc<AtomicUsize>,
    pub peak: Arc<AtomicUsize>,
    pub total: Arc<AtomicUsize>,
    /// Wall time each unit also takes (slept), so shares depend on slots
    /// alone and a run lasts long enough to change things under it.
    pub unit_time: Duration,
}

impl Workload for Tracked {
    type Unit = DigestUnit;
    type Output = u64;

    fn name(&self) -> &str {
        "tracked-digest"
    }

    fn extract(&self, record: &Record, params: &JsonMap) -> Result<Vec<Self::Unit>, WorkloadError> {
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        self.total.fetch_add(1, Ordering::SeqCst);
        Digest::default().extract(record, params)
    }

    fn process(&self, unit: Self::Unit, cancel: &Cancel) -> Result<u64, WorkloadError> {
        if !self.unit_time.is_zero() {
            // Work that takes the same wall time however busy the CPU is, so
            // shares depend on slots alone.
            std::thread::sleep(self.unit_time);
        }
        Digest::default().process(unit, cancel)
    }

    fn aggregate(&self, record: &Record, outputs: Vec<u64>) -> Result<JsonMap, WorkloadError> {
        self.active.fetch_sub(1, Ordering::SeqCst);
        Digest::default().aggregate(record, outputs)
    }
}

impl Tracked {
    /// Counting, every unit also taking `unit_time`.
    pub fn slow(unit_time: Duration) -> Self {
        Self { unit_time, ..Self::default() }
    }
}

/// A processor config on an ephemeral loopback port with this many unit
/// threads and slots.
pub fn processor_config_with(unit_threads: usize, slots: usize) -> ProcessorConfig {
    let mut cfg = processor_config();
    cfg.unit_threads = Some(unit_threads);
    cfg.slots = Some(slots);
    cfg
}

// ------------------------------------------------------------ binaries

/// A server binary in a child process, killed (SIGKILL) and reaped when
/// dropped, so a failing test never leaves servers behind.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Server {
    /// Starts `exe` with `args` and reads the bound address from its startup
    /// line `NAME listening on ADDR`.
    pub fn start(exe: &str, name: &str, args: &[&str]) -> Self {
        Self::start_logging(exe, name, args, "warn", Stdio::null())
    }

    /// [`Server::start`] with `RUST_LOG=rust_log` and stderr to `stderr`.
    pub fn start_logging(exe: &str, name: &str, args: &[&str], rust_log: &str, stderr: Stdio) -> Self {
        Self::start_with_env(exe, name, args, &[], rust_log, stderr)
    }

    /// [`Server::start_logging`] with these environment variables too.
    pub fn start_with_env(
        exe: &str,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
        rust_log: &str,
        stderr: Stdio,
    ) -> Self {
        let child = Command::new(exe)
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {exe}: {e}"));
        let mut server = Server { child, addr: "0.0.0.0:0".parse().unwrap() };
        let stdout = server.child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        // Reads the startup line, then drains stdout until the child exits.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let prefix = format!("{name} listening on ");
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).unwrap_or_else(|e| panic!("{name} startup line: {e}"));
            if let Some(addr) = line.strip_prefix(&prefix) {
                server.addr = addr.trim().parse().unwrap_or_else(|e| panic!("{name} address {addr:?}: {e}"));
                return server;
            }
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// Waits (observing the child, under `limit`) for it to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "process {} did not exit within {limit:?}", self.pid());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------- metrics

/// Sums, over one scrape of the Prometheus text at `addr`, the samples of
/// `name` whose labels include every `labels` pair.
pub fn metric_sum(addr: std::net::SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("metrics listener");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            n == name && wanted.iter().all(|w| rest.split([',', '}']).any(|kv| kv == w))
        })
        .map(|(_, v)| v.parse::<f64>().unwrap())
        .sum()
}

// ------------------------------------------------------------- JSON logs

/// Every line of a `--log-format json` log file, each parsed (a line that
/// is not JSON fails the test, naming it).
pub fn json_lines(path: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
}

/// Whether one of a JSON log line's enclosing spans has `field` = `value`.
pub fn in_span(line: &Value, field: &str, value: &str) -> bool {
    line["spans"].as_array().is_some_and(|spans| spans.iter().any(|s| s[field] == value))
}
