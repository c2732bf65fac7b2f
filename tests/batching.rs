//! `max_batch_size`: records go to processors several per call, and each
//! keeps its own result, retries and time bound.

mod common;

use common::*;
use fanout::proto::record_processor_server::{RecordProcessor, RecordProcessorServer};
use fanout::proto::{self, batch_item::Outcome};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tonic::{Code, Request, Response, Status};

/// A processor that counts its calls: records named `bad-*` fail
/// INVALID_ARGUMENT, `flaky-*` fail UNAVAILABLE the first time.
#[derive(Default)]
struct Counting {
    max_batch: u32,
    batch_calls: AtomicUsize,
    largest_batch: AtomicUsize,
    unary_calls: AtomicUsize,
    failed_once: Mutex<HashSet<String>>,
}

impl Counting {
    fn answer(&self, id: String) -> Result<proto::ProcessRecordResponse, Status> {
        if id.starts_with("bad-") {
            return Err(Status::invalid_argument(format!("{id} is bad")));
        }
        if id.starts_with("flaky-") && self.failed_once.lock().unwrap().insert(id.clone()) {
            return Err(Status::unavailable(format!("{id} failed once")));
        }
        let output = pb_struct(serde_json::json!({ "echo": id }));
        Ok(proto::ProcessRecordResponse {
            record_id: id,
            output: Some(output),
            units_processed: 1,
            ..Default::default()
        })
    }
}

/// The service: a handle on the shared counters.
struct Fake(Arc<Counting>);

#[tonic::async_trait]
impl RecordProcessor for Fake {
    async fn process_record(
        &self,
        request: Request<proto::ProcessRecordRequest>,
    ) -> Result<Response<proto::ProcessRecordResponse>, Status> {
        self.0.unary_calls.fetch_add(1, Ordering::SeqCst);
        self.0.answer(request.into_inner().record.unwrap().id).map(Response::new)
    }

    async fn process_batch(
        &self,
        request: Request<proto::ProcessBatchRequest>,
    ) -> Result<Response<proto::ProcessBatchResponse>, Status> {
        let req = request.into_inner();
        self.0.batch_calls.fetch_add(1, Ordering::SeqCst);
        self.0.largest_batch.fetch_max(req.records.len(), Ordering::SeqCst);
        let results = req
            .records
            .into_iter()
            .map(|r| proto::BatchItem {
                outcome: Some(match self.0.answer(r.id) {
                    Ok(resp) => Outcome::Processed(resp),
                    Err(s) => Outcome::Error(proto::Error {
                        code: s.code() as i32,
                        code_name: String::new(),
                        message: s.message().into(),
                    }),
                }),
            })
            .collect();
        Ok(Response::new(proto::ProcessBatchResponse { results }))
    }

    async fn describe(
        &self,
        _request: Request<proto::DescribeRequest>,
    ) -> Result<Response<proto::DescribeResponse>, Status> {
        Ok(Response::new(proto::DescribeResponse {
            name: "counting".into(),
            slots: 8,
            max_batch_size: self.0.max_batch,
            max_message_bytes: 4 << 20,
            ..Default::default()
        }))
    }
}

async fn start_counting(max_batch: u32) -> (Arc<Counting>, String) {
    let counting = Arc::new(Counting { max_batch, ..Default::default() });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_service_status("fanout.v1.RecordProcessor", tonic_health::ServingStatus::Serving).await;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(RecordProcessorServer::new(Fake(counting.clone())))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (counting, url)
}

/// 500 ids: every 100th bad, every 60th flaky.
fn mixed_ids() -> Vec<String> {
    (0..500)
        .map(|i| match i {
            _ if i % 100 == 7 => format!("bad-{i:03}"),
            _ if i % 60 == 11 => format!("flaky-{i:03}"),
            _ => format!("ok-{i:03}"),
        })
        .collect()
}

fn check_each_result(records: &[proto::RecordResult]) {
    for r in records {
        let id = &r.record_id;
        if id.starts_with("bad-") {
            assert_failed(r, Code::InvalidArgument, &[&format!("{id} is bad")], 1);
        } else {
            assert_eq!(r.status(), proto::RecordStatus::Succeeded, "{r:?}");
            assert_eq!(json(r.output.as_ref().unwrap())["echo"], serde_json::json!(id), "{id}'s own output");
            let attempts = if id.starts_with("flaky-") { 2 } else { 1 };
            assert_eq!(r.attempts, attempts, "{r:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_records_keep_their_own_results_and_retries() {
    let (counting, url) = start_counting(1024).await;
    let pipeline = start_pipeline(std::slice::from_ref(&url)).await;
    let mut client = pipeline_client(&pipeline.url()).await;
    let ids = mixed_ids();
    let mut req = run_request(ids.iter().map(|id| record(id)).collect());
    req.options = Some(proto::RunOptions { max_batch_size: 32, max_in_flight: 256, ..Default::default() });
    let got = run_ok(&mut client, req).await;
    got.assert_exactly_once(&ids);
    check_each_result(&got.records);
    assert_eq!(got.status(), proto::RunStatus::PartiallyFailed);
    let calls = counting.batch_calls.load(Ordering::SeqCst) + counting.unary_calls.load(Ordering::SeqCst);
    let largest = counting.largest_batch.load(Ordering::SeqCst);
    assert!(largest > 1 && largest <= 32, "largest batch {largest}");
    // 500 records in batches of up to 32 is at least 16 calls, plus one per
    // retried flaky record (9); one record per call would be 509.
    assert!(calls < 100, "{calls} calls for 500 records in batches of up to 32");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_batched_run_accounts_for_every_record_once() {
    let (counting, url) = start_counting(16).await;
    let pipeline = start_pipeline(std::slice::from_ref(&url)).await;
    let mut client = pipeline_client(&pipeline.url()).await;
    let ids = mixed_ids();
    let opts = proto::RunOptions { max_batch_size: 64, max_in_flight: 128, ..Default::default() };
    let got = run_stream(&mut client, stream_of(&ids, 45, opts), None).await.unwrap();
    got.assert_exactly_once(&ids);
    check_each_result(&got.records);
    let report = got.report();
    assert_eq!(report.results.len(), 5, "the bad records are in the report");
    // The instance takes at most 16 per call (its Describe), fewer than asked.
    let largest = counting.largest_batch.load(Ordering::SeqCst);
    assert!(largest > 1 && largest <= 16, "largest batch {largest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_without_process_batch_gets_one_record_per_call() {
    let (counting, url) = start_counting(0).await;
    let pipeline = start_pipeline(std::slice::from_ref(&url)).await;
    let mut client = pipeline_client(&pipeline.url()).await;
    let ids = mixed_ids();
    let mut req = run_request(ids.iter().map(|id| record(id)).collect());
    req.options = Some(proto::RunOptions { max_batch_size: 32, ..Default::default() });
    let got = run_ok(&mut client, req).await;
    got.assert_exactly_once(&ids);
    check_each_result(&got.records);
    assert_eq!(counting.batch_calls.load(Ordering::SeqCst), 0);
    assert_eq!(counting.unary_calls.load(Ordering::SeqCst), 500 + 9, "one call per attempt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_processor_batch_fails_records_alone() {
    // Units take 100 ms each, one at a time in sequential mode.
    let p = start_processor(Tracked::slow(Duration::from_millis(100))).await;
    let mut client = processor_client(&p.url).await;
    let req = proto::ProcessBatchRequest {
        run_id: "run-1".into(),
        records: vec![
            record_with("quick", serde_json::json!({"units": 1})),
            record_with("too-many-units", serde_json::json!({"units": 1_000_000})),
            record_with("slow", serde_json::json!({"units": 30})),
            record_with("rec-ok", serde_json::json!({"units": 2})),
        ],
        unit_mode: proto::UnitMode::Sequential as i32,
        params: Some(rounds(ROUNDS)),
        attempts: vec![1, 1, 2],
        record_timeout: Some(prost_types::Duration { seconds: 1, nanos: 0 }),
    };
    let resp = tokio::time::timeout(WAIT, client.process_batch(req)).await.unwrap().unwrap().into_inner();
    assert_eq!(resp.results.len(), 4);
    let outcome = |i: usize| resp.results[i].outcome.clone().unwrap();
    let Outcome::Processed(quick) = outcome(0) else { panic!("{:?}", outcome(0)) };
    assert_eq!(quick.record_id, "quick");
    assert_eq!(quick.units_processed, 1);
    let Outcome::Error(e) = outcome(1) else { panic!("{:?}", outcome(1)) };
    assert_eq!(e.code, Code::InvalidArgument as i32, "{e:?}");
    let Outcome::Error(e) = outcome(2) else { panic!("{:?}", outcome(2)) };
    assert_eq!(e.code, Code::DeadlineExceeded as i32, "{e:?}");
    assert!(e.message.contains("slow"), "{e:?}");
    let Outcome::Processed(ok) = outcome(3) else { panic!("{:?}", outcome(3)) };
    assert_output(
        &proto::RecordResult {
            record_id: ok.record_id.clone(),
            output: ok.output,
            units_processed: ok.units_processed,
            status: proto::RecordStatus::Succeeded as i32,
            ..Default::default()
        },
        &expected("rec-ok", Some(2), ROUNDS),
    );
    // Too many records for one call is refused whole.
    let req = proto::ProcessBatchRequest {
        records: (0..1025).map(|i| record(&format!("r{i}"))).collect(),
        ..Default::default()
    };
    let err = client.process_batch(req).await.unwrap_err();
    assert_status(&err, Code::InvalidArgument, &["records in the batch", "1024"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_run_on_real_processors_gives_every_records_output() {
    let p1 = start_processor(fanout::workload::Digest::default()).await;
    let p2 = start_processor(fanout::workload::Digest::default()).await;
    let pipeline = start_pipeline(&[p1.url.clone(), p2.url.clone()]).await;
    let mut client = pipeline_client(&pipeline.url()).await;
    let mut req = run_request(records(400));
    req.params = Some(rounds(ROUNDS));
    req.options = Some(proto::RunOptions { max_batch_size: 32, ..Default::default() });
    let got = run_ok(&mut client, req).await;
    got.assert_exactly_once(&ids(400));
    assert_eq!(got.status(), proto::RunStatus::Succeeded, "{:#?}", got.failures());
    for r in &got.records {
        assert_output(r, &expected(&r.record_id, None, ROUNDS));
    }
}
