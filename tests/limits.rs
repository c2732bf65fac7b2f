//! Limits that keep callers from taking the service down: work that can be
//! stopped, runs and bytes refused up front, reports that fit default
//! clients, ids that cannot forge logs, values that are named when wrong.

mod common;

use common::*;
use fanout::proto::{self, RunOptions};
use fanout::workload::Digest;
use serde_json::json;
use std::time::{Duration, Instant};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_attempt_stops_its_running_units() {
    // Rounds far past any record timeout, allowed by this processor.
    let p = start_processor(Digest::with_max_rounds(u64::MAX)).await;
    let pipeline = start_pipeline(std::slice::from_ref(&p.url)).await;
    let mut client = pipeline_client(&pipeline.url()).await;
    let mut req = run_request(vec![record_with("forever", json!({ "units": 2 }))]);
    req.params = Some(pb_struct(json!({ "rounds": 1e12 })));
    req.options = Some(RunOptions {
        max_attempts: 2,
        record_timeout: Some(prost_types::Duration { seconds: 0, nanos: 300_000_000 }),
        ..Default::default()
    });
    let got = run_ok(&mut client, req).await;
    let r = got.record("forever");
    assert_failed(r, Code::DeadlineExceeded, &["timed out"], 2);
    // Both attempts' units were running; within about a second of the run's
    // end none is.
    let ended = Instant::now();
    wait_until("the running units to stop", || {
        get(&p.stats.units_finished) == get(&p.stats.units_started) && get(&p.stats.units_started) > 0
    })
    .await;
    assert!(ended.elapsed() < Duration::from_secs(2), "units stopped after {:?}", ended.elapsed());
    // The processor is free again.
    let got = run_ok(&mut client, run_request(records(4))).await;
    assert_eq!(got.status(), proto::RunStatus::Succeeded, "{:#?}", got.failures());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_over_the_workload_limit_fail_naming_it() {
    let p = start_processor(Digest::default()).await;
    let pipeline = start_pipeline(std::slice::from_ref(&p.url)).await;
    let mut client = pipeline_client(&pipeline.url()).await;
    let mut req = run_request(records(2));
    req.params = Some(pb_struct(json!({ "rounds": 1e12 })));
    let got = run_ok(&mut client, req).await;
    for r in &got.records {
        assert_failed(r, Code::InvalidArgument, &["params.rounds", "--max-rounds", "1000000"], 1);
    }
    assert_eq!(get(&p.stats.units_started), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_past_max_concurrent_runs_are_refused_up_front() {
    let script = std::sync::Arc::new(Script::new());
    let gate = Gate::closed();
    let _open = gate.open_on_drop();
    let p = start_processor(TestWorkload::new("A", &script).gated(&gate)).await;
    let mut cfg = pipeline_config(std::slice::from_ref(&p.url));
    cfg.max_concurrent_runs = 2;
    let pipeline = fanout::server::start_pipeline(&cfg).await.unwrap();
    let mut client = pipeline_client(&pipeline.url()).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = client.run(run_request(records(1))).await.unwrap().into_inner();
        s.message().await.unwrap().unwrap();
        held.push(s);
    }
    let refused = client.run(run_request(records(1))).await.unwrap_err();
    assert_status(&refused, Code::ResourceExhausted, &["--max-concurrent-runs", "2"]);
    gate.open();
    for mut s in held {
        while let Some(ev) = tokio::time::timeout(WAIT, s.message()).await.unwrap().unwrap() {
            drop(ev);
        }
    }
    // Room again once they finished.
    let got = run_ok(&mut client, run_request(records(1))).await;
    assert_eq!(got.status(), proto::RunStatus::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_run_memory_budget_is_refused_before_it_is_decoded() {
    let p = start_processor(Digest::default()).await;
    let mut cfg = pipeline_config(std::slice::from_ref(&p.url));
    cfg.run_memory_budget = 256 * 1024;
    let pipeline = fanout::server::start_pipeline(&cfg).await.unwrap();
    let mut client = pipeline_client(&pipeline.url()).await;
    // ~60 KB on the wire: over the budget once each byte counts 64 while decoding.
    let big = run_request((0..2000).map(|i| record(&format!("record-{i:06}-padding-padding"))).collect());
    let refused = client.run(big).await.unwrap_err();
    assert_status(&refused, Code::ResourceExhausted, &["--run-memory-budget"]);
    // A run that fits still goes through: the refused one gave its bytes back.
    let got = run_ok(&mut client, run_request(records(20))).await;
    assert_eq!(got.status(), proto::RunStatus::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_too_big_for_default_clients_leaves_its_results_to_the_events() {
    let p1 = start_processor(Digest::default()).await;
    let p2 = start_processor(Digest::default()).await;
    let pipeline = start_pipeline(&[p1.url.clone(), p2.url.clone()]).await;
    // tonic's default receive limit is 4 MiB, as grpc-go's, grpc-java's,
    // grpcio's and grpcurl's.
    let mut client = pipeline_client(&pipeline.url()).await;
    let n = 9000;
    let ids: Vec<String> = (0..n).map(|i| format!("{i:05}-{}", "x".repeat(440))).collect();
    let mut req = run_request(ids.iter().map(|id| record_with(id, json!({ "units": 1 }))).collect());
    req.params = Some(rounds(0));
    req.options = Some(RunOptions { max_in_flight: 256, ..Default::default() });
    let got = tokio::time::timeout(Duration::from_secs(120), async { run_ok(&mut client, req).await })
        .await
        .unwrap();
    got.assert_exactly_once(&ids);
    assert_eq!(got.status(), proto::RunStatus::Succeeded);
    assert!(got.report.results.is_empty() && got.report.results_omitted, "results left to the events");
    // A small run's report still carries them.
    let got = run_ok(&mut client, run_request(records(3))).await;
    assert_eq!(got.report.results.len(), 3);
    assert!(!got.report.results_omitted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_that_could_forge_logs_and_out_of_range_values_are_invalid() {
    let p = start_processor(Digest::default()).await;
    let pipeline = start_pipeline(std::slice::from_ref(&p.url)).await;
    let mut client = pipeline_client(&pipeline.url()).await;
    let bad = |mut req: proto::RunRequest, f: fn(&mut proto::RunRequest)| {
        f(&mut req);
        req
    };
    let cases: Vec<(proto::RunRequest, &[&str])> = vec![
        (bad(run_request(records(1)), |r| r.run_id = "run\nINFO forged line".into()), &["run_id", "control"]),
        (bad(run_request(records(1)), |r| r.run_id = "r".repeat(129)), &["run_id", "129 bytes", "128"]),
        (
            bad(run_request(records(1)), |r| r.records[0].id = "a\u{1b}[2J".into()),
            &["record 0", "id", "control"],
        ),
        (bad(run_request(records(1)), |r| r.records[0].id = "x".repeat(513)), &["record 0", "id", "512"]),
        (
            bad(run_request(records(1)), |r| {
                r.options = Some(RunOptions {
                    record_timeout: Some(prost_types::Duration { seconds: 315_576_000_001, nanos: 0 }),
                    ..Default::default()
                })
            }),
            &["options.record_timeout", "315576000000"],
        ),
    ];
    for (req, needles) in cases {
        let status = client.run(req).await.unwrap_err();
        assert_status(&status, Code::InvalidArgument, needles);
    }
    // NaN and Infinity are named as such, not as "null".
    for (value, name) in [(f64::NAN, "NaN"), (f64::INFINITY, "Infinity"), (f64::NEG_INFINITY, "-Infinity")] {
        let mut req = run_request(records(1));
        req.params = Some(pb_struct(json!({})));
        req.params.as_mut().unwrap().fields.insert(
            "rounds".into(),
            prost_types::Value { kind: Some(prost_types::value::Kind::NumberValue(value)) },
        );
        let got = run_ok(&mut client, req).await;
        assert_failed(&got.records[0], Code::InvalidArgument, &["params.rounds", name], 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_processor_url_beside_an_https_one_is_refused_at_startup() {
    // https:// turns TLS to processors on; plaintext beside it would be a
    // silent downgrade (see tests/tls.rs for TLS itself).
    let cfg = pipeline_config(&["https://127.0.0.1:1".to_owned(), "http://127.0.0.1:2".to_owned()]);
    let err = fanout::server::start_pipeline(&cfg).await.unwrap_err();
    assert!(err.to_string().contains("http://127.0.0.1:2") && err.to_string().contains("TLS"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_is_not_accepted_on_stale_health() {
    let p = start_processor(Digest::default()).await;
    let mut cfg = pipeline_config(std::slice::from_ref(&p.url));
    // Probes far apart: after the processor dies, no probe says so.
    cfg.health_interval = Duration::from_millis(500);
    let pipeline = fanout::server::start_pipeline(&cfg).await.unwrap();
    let mut client = pipeline_client(&pipeline.url()).await;
    run_ok(&mut client, run_request(records(2))).await;
    p.running.abort();
    // Once the last good answer is older than a probe interval, a new run
    // is checked against a fresh probe and refused.
    let died = Instant::now();
    let status = loop {
        match client.run(run_request(records(2))).await {
            Err(status) => break status,
            Ok(stream) => {
                // Accepted on health younger than the interval (plus a
                // probe's timeout): allowed; only acceptance is checked here.
                drop(stream);
                assert!(died.elapsed() < Duration::from_secs(3), "accepted on stale health");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_status(&status, Code::Unavailable, &[&p.url.replace("http://", "")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_keeps_what_a_record_takes_of_its_memory_budget_until_it_is_done() {
    let script = std::sync::Arc::new(Script::new());
    let gate = Gate::closed();
    let _open = gate.open_on_drop();
    let mut cfg = processor_config();
    // One ~700-byte record takes ~45 KB (64 per byte): room for one at a time.
    cfg.memory_budget = 64 * 1024;
    let p = start_processor_with(&cfg, TestWorkload::new("A", &script).gated(&gate)).await;
    let client = processor_client(&p.url).await;
    let call = |id: &str| {
        let mut c = client.clone();
        let padded = record_with(id, json!({ "units": 1, "pad": "p".repeat(600) }));
        let req = process_request(padded, proto::UnitMode::Parallel);
        tokio::spawn(async move { c.process_record(req).await })
    };
    let first = call("first");
    wait_until("the first record to start", || get(&p.stats.records_started) == 1).await;
    let refused = call("second").await.unwrap().unwrap_err();
    assert_status(&refused, Code::ResourceExhausted, &["--memory-budget", "not started"]);
    assert!(fanout::processor::is_not_started(&refused), "a pipeline sends it again without an attempt");
    gate.open();
    assert!(first.await.unwrap().is_ok());
    // Done with the first: its budget is back.
    assert!(call("second").await.unwrap().is_ok());
}
