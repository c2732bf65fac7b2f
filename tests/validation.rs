//! Bad input to `Pipeline.Run`: request-level problems end the call with
//! INVALID_ARGUMENT naming the field; per-record problems only the workload
//! can see fail that record with INVALID_ARGUMENT, unretried.

mod common;

use common::*;
use fanout::config::ProcessorConfig;
use fanout::proto::pipeline_client::PipelineClient;
use fanout::proto::{self, RunOptions};
use fanout::server;
use fanout::workload::Digest;
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::Channel;

async fn rejected(client: &mut PipelineClient<Channel>, req: proto::RunRequest) -> tonic::Status {
    match run(client, req).await {
        Ok(got) => panic!("Run must be refused, but it ran: {:?}", got.report.status()),
        Err(status) => status,
    }
}

fn assert_invalid(status: &tonic::Status, needles: &[&str]) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    for n in needles {
        assert!(status.message().contains(n), "message {:?} must contain {n:?}", status.message());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_run_requests_are_invalid_argument_naming_the_field() {
    let p = start_processor(Digest::default()).await;
    let mut cfg = pipeline_config(std::slice::from_ref(&p.url));
    cfg.limits.max_records = 5;
    cfg.limits.max_in_flight_limit = 8;
    cfg.limits.max_attempts_limit = 4;
    let pipeline = server::start_pipeline(&cfg).await.unwrap();
    let mut client = pipeline_client(&pipeline.url()).await;

    // No records.
    let status = rejected(&mut client, run_request(vec![])).await;
    assert_invalid(&status, &["records"]);

    // An empty id.
    let status = rejected(&mut client, run_request(vec![record("a"), record("")])).await;
    assert_invalid(&status, &["record 1", "id"]);

    // A duplicate id.
    let status = rejected(&mut client, run_request(vec![record("a"), record("b"), record("a")])).await;
    assert_invalid(&status, &["record 2", "\"a\"", "id", "duplicates record 0"]);

    // An unknown unit mode.
    let mut req = run_request(records(2));
    req.unit_mode = 7;
    assert_invalid(&rejected(&mut client, req).await, &["unit_mode", "7"]);

    // More records than --max-records.
    let status = rejected(&mut client, run_request(records(6))).await;
    assert_invalid(&status, &["records", "6", "5", "--max-records"]);

    // max_in_flight over --max-in-flight-limit.
    let mut req = run_request(records(2));
    req.options = Some(RunOptions { max_in_flight: 9, ..Default::default() });
    assert_invalid(&rejected(&mut client, req).await, &["max_in_flight", "9", "8", "--max-in-flight-limit"]);

    // max_attempts over --max-attempts-limit.
    let mut req = run_request(records(2));
    req.options = Some(RunOptions { max_attempts: 5, ..Default::default() });
    assert_invalid(&rejected(&mut client, req).await, &["max_attempts", "5", "4", "--max-attempts-limit"]);

    // A negative record timeout.
    let mut req = run_request(records(2));
    req.options = Some(RunOptions {
        record_timeout: Some(prost_types::Duration { seconds: -1, nanos: 0 }),
        ..Default::default()
    });
    assert_invalid(&rejected(&mut client, req).await, &["record_timeout"]);

    assert_eq!(get(&p.stats.records_started), 0, "no refused run reached a processor");

    // At the limits, the same pipeline runs.
    let mut req = run_request(records(5));
    req.options = Some(RunOptions { max_in_flight: 8, max_attempts: 4, ..Default::default() });
    let got = run_ok(&mut client, req).await;
    got.assert_exactly_once(&ids(5));
    assert_eq!(got.status(), proto::RunStatus::Succeeded);
}

/// A request over the pipeline's `--max-message-bytes`. The design wants
/// INVALID_ARGUMENT (or RESOURCE_EXHAUSTED) naming the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_is_refused_naming_the_limit() {
    let p = start_processor(Digest::default()).await;
    let mut cfg = pipeline_config(std::slice::from_ref(&p.url));
    cfg.max_message_bytes = 1024;
    let pipeline = server::start_pipeline(&cfg).await.unwrap();
    let mut client = pipeline_client(&pipeline.url()).await;

    let big = "x".repeat(4096);
    let status = rejected(&mut client, run_request(vec![record_with("big", json!({ "blob": big }))])).await;
    assert_oversize_refused(&status);
    assert_eq!(get(&p.stats.records_started), 0);

    // A request under the limit runs.
    let got = run_ok(&mut client, run_request(records(3))).await;
    assert_eq!(got.status(), proto::RunStatus::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_record_attributes_fail_only_that_record_unretried() {
    let p1 = start_processor(Digest::default()).await;
    let p2 = start_processor(Digest::default()).await;
    let pipeline = start_pipeline(&[p1.url.clone(), p2.url.clone()]).await;
    let mut client = pipeline_client(&pipeline.url()).await;

    let bad: [(&str, Value); 4] = [
        ("units-zero", json!(0)),
        ("units-big", json!(10001)),
        ("units-frac", json!(2.5)),
        ("units-str", json!("3")),
    ];
    let mut recs = records(6);
    for (id, units) in &bad {
        recs.push(record_with(id, json!({ "units": units })));
    }
    let ids: Vec<String> = recs.iter().map(|r| r.id.clone()).collect();
    let got = run_ok(&mut client, run_request(recs)).await;
    got.assert_exactly_once(&ids);
    assert_eq!(got.status(), proto::RunStatus::PartiallyFailed);
    for (id, _) in &bad {
        assert_failed(got.record(id), Code::InvalidArgument, &[id, "attributes.units"], 1);
        assert_eq!(got.record(id).error.as_ref().unwrap().code, 3);
    }
    for r in got.records.iter().filter(|r| r.record_id.starts_with("rec-")) {
        assert_output(r, &expected(&r.record_id, None, ROUNDS));
        assert_eq!(r.attempts, 1);
    }
    let s = got.summary();
    assert_eq!((s.records_succeeded, s.records_failed, s.retries), (6, 4, 0));
    let calls = get(&p1.stats.records_started) + get(&p2.stats.records_started);
    assert_eq!(calls, 10, "invalid records are sent once, never retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_params_fail_every_record_unretried() {
    let p = start_processor(Digest::default()).await;
    let pipeline = start_pipeline(std::slice::from_ref(&p.url)).await;
    let mut client = pipeline_client(&pipeline.url()).await;
    for bad in [json!(-1), json!("x")] {
        let mut req = run_request(records(3));
        req.params = Some(pb_struct(json!({ "rounds": bad })));
        let got = run_ok(&mut client, req).await;
        got.assert_exactly_once(&ids(3));
        assert_eq!(got.status(), proto::RunStatus::Failed, "every record failed");
        for r in &got.records {
            assert_failed(r, Code::InvalidArgument, &[&r.record_id, "params.rounds"], 1);
        }
        assert_eq!(got.summary().retries, 0);
    }
    assert_eq!(get(&p.stats.records_started), 6);
    assert_eq!(get(&p.stats.units_started), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_over_the_processor_unit_limit_fail_unretried() {
    let cfg = ProcessorConfig { max_units_per_record: 5, ..processor_config() };
    let p = start_processor_with(&cfg, Digest::default()).await;
    let pipeline = start_pipeline(std::slice::from_ref(&p.url)).await;
    let mut client = pipeline_client(&pipeline.url()).await;
    let recs = vec![record_with("ok", json!({ "units": 5 })), record_with("wide", json!({ "units": 6 }))];
    let got = run_ok(&mut client, run_request(recs)).await;
    got.assert_exactly_once(&["ok".into(), "wide".into()]);
    assert_output(got.record("ok"), &expected("ok", Some(5), ROUNDS));
    assert_failed(got.record("wide"), Code::InvalidArgument, &["wide", "--max-units-per-record"], 1);
    assert_eq!(got.status(), proto::RunStatus::PartiallyFailed);
}
