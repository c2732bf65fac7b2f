//! `RecordProcessor.ProcessRecord` called directly: outputs, input errors
//! naming the record and field, the units limit, and panics.

mod common;

use common::*;
use fanout::config::ProcessorConfig;
use fanout::proto::{self, UnitMode};
use fanout::workload::Digest;
use serde_json::{Value, json};
use std::sync::Arc;
use tonic::Code;

async fn call(
    client: &mut fanout::proto::record_processor_client::RecordProcessorClient<tonic::transport::Channel>,
    req: proto::ProcessRecordRequest,
) -> Result<proto::ProcessRecordResponse, tonic::Status> {
    tokio::time::timeout(WAIT, client.process_record(req))
        .await
        .expect("ProcessRecord timed out")
        .map(|r| r.into_inner())
}

fn assert_response(resp: &proto::ProcessRecordResponse, id: &str, want: &Expected) {
    assert_eq!(resp.record_id, id);
    assert_eq!(u64::from(resp.units_processed), want.unit_count);
    let out = json(resp.output.as_ref().expect("output"));
    assert_eq!(out["unit_count"].as_f64(), Some(want.unit_count as f64));
    assert_eq!(out["xor_digest"].as_str(), Some(want.xor_digest.as_str()));
    assert_eq!(out["min_unit"].as_str(), Some(want.min_unit.as_str()));
    assert_eq!(out["max_unit"].as_str(), Some(want.max_unit.as_str()));
    assert!(resp.elapsed.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_record_outputs_match_in_both_modes() {
    let mut cfg = processor_config();
    cfg.name = Some("proc-under-test".into());
    let p = start_processor_with(&cfg, Digest::default()).await;
    let mut client = processor_client(&p.url).await;
    for mode in [UnitMode::Sequential, UnitMode::Parallel, UnitMode::Unspecified] {
        for (id, units) in [("alpha", None), ("beta", Some(1)), ("gamma", Some(64))] {
            let rec = match units {
                Some(u) => record_with(id, json!({ "units": u })),
                None => record(id),
            };
            let resp = call(&mut client, process_request(rec, mode)).await.unwrap();
            assert_response(&resp, id, &expected(id, units, ROUNDS));
            assert_eq!(resp.processor, "proc-under-test", "the configured name is reported");
        }
    }
    assert_eq!(get(&p.stats.records_succeeded), 9);
    let units = 3 * (expected("alpha", None, ROUNDS).unit_count + 1 + 64);
    assert_eq!(get(&p.stats.units_started), units);
    assert_eq!(get(&p.stats.units_finished), units);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_record_input_is_invalid_argument_naming_record_and_field() {
    let p = start_processor(Digest::default()).await;
    let mut client = processor_client(&p.url).await;
    let bad_units: [Value; 4] = [json!(0), json!(10001), json!(2.5), json!("3")];
    for (k, bad) in bad_units.iter().enumerate() {
        let id = format!("bad-units-{k}");
        let req = process_request(record_with(&id, json!({ "units": bad })), UnitMode::Parallel);
        let status = call(&mut client, req).await.expect_err(&format!("units = {bad} must be refused"));
        assert_status(&status, Code::InvalidArgument, &[&id, "attributes.units"]);
    }
    let bad_rounds: [Value; 2] = [json!(-1), json!("x")];
    for (k, bad) in bad_rounds.iter().enumerate() {
        let id = format!("bad-rounds-{k}");
        let mut req = process_request(record(&id), UnitMode::Sequential);
        req.params = Some(pb_struct(json!({ "rounds": bad })));
        let status = call(&mut client, req).await.expect_err(&format!("rounds = {bad} must be refused"));
        assert_status(&status, Code::InvalidArgument, &[&id, "params.rounds"]);
    }
    // Malformed requests: no record, empty id, unknown unit mode.
    let mut req = process_request(record("x"), UnitMode::Parallel);
    req.record = None;
    assert_status(&call(&mut client, req).await.unwrap_err(), Code::InvalidArgument, &["record"]);
    let req = process_request(record(""), UnitMode::Parallel);
    assert_status(&call(&mut client, req).await.unwrap_err(), Code::InvalidArgument, &["id"]);
    let mut req = process_request(record("x"), UnitMode::Parallel);
    req.unit_mode = 7;
    assert_status(&call(&mut client, req).await.unwrap_err(), Code::InvalidArgument, &["unit_mode", "7"]);

    assert_eq!(get(&p.stats.units_started), 0, "no unit of a refused record runs");
    // Valid input still works on the same processor.
    let resp = call(&mut client, process_request(record("ok"), UnitMode::Parallel)).await.unwrap();
    assert_response(&resp, "ok", &expected("ok", None, ROUNDS));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_units_than_the_processor_limit_is_invalid_argument_naming_the_flag() {
    let cfg = ProcessorConfig { max_units_per_record: 5, ..processor_config() };
    let p = start_processor_with(&cfg, Digest::default()).await;
    let mut client = processor_client(&p.url).await;

    let req = process_request(record_with("wide", json!({ "units": 6 })), UnitMode::Parallel);
    let status = call(&mut client, req).await.unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["wide", "--max-units-per-record", "6", "5"]);
    assert_eq!(get(&p.stats.units_started), 0);

    let req = process_request(record_with("narrow", json!({ "units": 5 })), UnitMode::Parallel);
    let resp = call(&mut client, req).await.expect("at the limit is fine");
    assert_response(&resp, "narrow", &expected("narrow", Some(5), ROUNDS));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_unit_is_internal_naming_the_unit_and_the_processor_survives() {
    let script = Arc::new(Script::new().panic_at("boom", 2));
    let p = start_processor(TestWorkload::new("A", &script)).await;
    let mut client = processor_client(&p.url).await;
    for mode in [UnitMode::Sequential, UnitMode::Parallel] {
        let req = process_request(record_with("boom", json!({ "units": 12 })), mode);
        let status = call(&mut client, req).await.expect_err("a panicking unit fails the record");
        assert_status(
            &status,
            Code::Internal,
            &["\"boom\"", "unit 3/12 panicked", "injected panic in boom/2"],
        );

        let resp = call(&mut client, process_request(record("fine"), mode)).await.expect("next call");
        assert_response(&resp, "fine", &expected("fine", None, ROUNDS));
    }
    assert_eq!(get(&p.stats.records_failed), 2);
    assert_eq!(get(&p.stats.records_succeeded), 2);
    // Units of the failed record already running finish on their own.
    wait_until("every started unit to finish", || {
        get(&p.stats.units_finished) == get(&p.stats.units_started)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_is_refused_naming_the_limit() {
    let cfg = ProcessorConfig { max_message_bytes: 1024, ..processor_config() };
    let p = start_processor_with(&cfg, Digest::default()).await;
    let mut client = processor_client(&p.url).await;
    let big = "x".repeat(4096);
    let req = process_request(record_with("big", json!({ "blob": big })), UnitMode::Parallel);
    let status = call(&mut client, req).await.expect_err("over --max-message-bytes");
    assert_oversize_refused(&status);
    assert_eq!(get(&p.stats.records_started), 0);
    let resp = call(&mut client, process_request(record("small"), UnitMode::Parallel)).await.unwrap();
    assert_response(&resp, "small", &expected("small", None, ROUNDS));
}
