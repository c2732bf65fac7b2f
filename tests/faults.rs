//! Faults: transient failures retried elsewhere, permanent failures, panics,
//! a crashed processor, failure tolerance, client cancellation, and no
//! reachable processor. Faults come from the test workload, never from
//! timing.

mod common;

use common::*;
use fanout::proto::run_event::Event;
use fanout::proto::{self, RunOptions, UnitMode};
use fanout::workload::Digest;
use serde_json::json;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_on_another_instance() {
    let script = Arc::new(Script::new().transient("rec-005", 1).transient("rec-011", 2));
    let a = start_processor(TestWorkload::new("A", &script)).await;
    let b = start_processor(TestWorkload::new("B", &script)).await;
    let url_of = |label: &str| if label == "A" { a.addr.clone() } else { b.addr.clone() };
    let pipeline = start_pipeline(&[a.url.clone(), b.url.clone()]).await;
    let mut client = pipeline_client(&pipeline.url()).await;

    const N: usize = 20;
    let ids = ids(N);
    let got = run_ok(&mut client, run_request(records(N))).await;
    got.assert_exactly_once(&ids);
    assert_eq!(got.status(), proto::RunStatus::Succeeded, "{:#?}", got.failures());
    for r in &got.report.results {
        assert_output(r, &expected(&r.record_id, None, ROUNDS));
    }

    for (id, attempts) in [("rec-005", 2), ("rec-011", 3)] {
        let r = got.record(id);
        assert_eq!(r.attempts, attempts, "{id} attempts");
        let seen = script.attempts_of(id);
        assert_eq!(seen.len(), attempts as usize, "{id} attempts seen by processors: {seen:?}");
        for pair in seen.windows(2) {
            assert_ne!(pair[0], pair[1], "{id}: a retry must go to another instance: {seen:?}");
        }
        assert_eq!(r.processor, url_of(seen.last().unwrap()), "{id}: processor of the last attempt");
    }
    for r in got.records.iter().filter(|r| r.record_id != "rec-005" && r.record_id != "rec-011") {
        assert_eq!(r.attempts, 1, "{} was not flaky", r.record_id);
    }
    assert_eq!(got.summary().retries, 1 + 2);
    assert_eq!(got.summary().records_failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failure_exhausting_max_attempts_fails_the_record() {
    let script = Arc::new(Script::new().transient("rec-001", 5));
    let a = start_processor(TestWorkload::new("A", &script)).await;
    let b = start_processor(TestWorkload::new("B", &script)).await;
    let pipeline = start_pipeline(&[a.url.clone(), b.url.clone()]).await;
    let mut client = pipeline_client(&pipeline.url()).await;
    let mut req = run_request(records(4));
    req.options = Some(RunOptions { max_attempts: 2, ..Default::default() });
    let got = run_ok(&mut client, req).await;
    got.assert_exactly_once(&ids(4));
    assert_failed(got.record("rec-001"), Code::Unavailable, &["rec-001", "injected transient"], 2);
    assert_eq!(script.attempts_of("rec-001").len(), 2, "max_attempts bounds the attempts");
    assert_eq!(got.status(), proto::RunStatus::PartiallyFailed);
    assert_eq!(got.summary().retries, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failure_is_reported_while_the_rest_succeed() {
    let script = Arc::new(Script::new().permanent("rec-004"));
    let a = start_processor(TestWorkload::new("A", &script)).await;
    let b = start_processor(TestWorkload::new("B", &script)).await;
    let pipeline = start_pipeline(&[a.url.clone(), b.url.clone()]).await;
    let mut client = pipeline_client(&pipeline.url()).await;

    const N: usize = 10;
    let got = run_ok(&mut client, run_request(records(N))).await;
    got.assert_exactly_once(&ids(N));
    assert_eq!(got.status(), proto::RunStatus::PartiallyFailed);
    let bad = got.record("rec-004");
    assert_failed(bad, Code::FailedPrecondition, &["rec-004", "injected permanent failure"], 1);
    assert_eq!(bad.error.as_ref().unwrap().code, 9);
    assert!(bad.output.is_none(), "no output on failure");
    assert_eq!(script.attempts_of("rec-004").len(), 1, "a permanent failure is not retried");
    for r in got.records.iter().filter(|r| r.record_id != "rec-004") {
        assert_output(r, &expected(&r.record_id, None, ROUNDS));
        assert_eq!(r.attempts, 1);
    }
    let s = got.summary();
    assert_eq!((s.records_failed, s.records_succeeded, s.retries), (1, 9, 0));
    let units: u64 = got.records.iter().map(|r| u64::from(r.units_processed)).sum();
    assert_eq!(s.total_units_processed, units);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_unit_fails_its_record_and_the_processor_keeps_serving() {
    let script = Arc::new(Script::new().panic_at("boom", 2));
    let p = start_processor(TestWorkload::new("A", &script)).await;
    let pipeline = start_pipeline(std::slice::from_ref(&p.url)).await;
    let mut client = pipeline_client(&pipeline.url()).await;

    let mut recs = records(4);
    recs.push(record_with("boom", json!({ "units": 12 })));
    let mut req = run_request(recs);
    req.options = Some(RunOptions { max_attempts: 2, ..Default::default() });
    let got = run_ok(&mut client, req).await;
    let mut ids = ids(4);
    ids.push("boom".into());
    got.assert_exactly_once(&ids);
    assert_eq!(got.status(), proto::RunStatus::PartiallyFailed);
    // INTERNAL is transient (retried), so the panic is seen max_attempts times.
    assert_failed(
        got.record("boom"),
        Code::Internal,
        &["\"boom\"", "unit 3/12 panicked", "injected panic"],
        2,
    );
    for r in got.records.iter().filter(|r| r.record_id != "boom") {
        assert_output(r, &expected(&r.record_id, None, ROUNDS));
    }

    // The same processor serves the next run.
    let got = run_ok(&mut client, run_request(records(4))).await;
    got.assert_exactly_once(&ids[..4]);
    assert_eq!(got.status(), proto::RunStatus::Succeeded, "{:#?}", got.failures());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_outside_units_fails_the_record_not_the_processor() {
    let script = Arc::new(Script::new().panic_in_extract("bad"));
    let a = start_processor(TestWorkload::new("A", &script)).await;
    let b = start_processor(TestWorkload::new("B", &script)).await;
    let pipeline = start_pipeline(&[a.url.clone(), b.url.clone()]).await;
    let mut client = pipeline_client(&pipeline.url()).await;

    let mut recs = records(6);
    recs.push(record("bad"));
    let mut req = run_request(recs);
    req.options = Some(RunOptions { max_attempts: 2, ..Default::default() });
    let got = run_ok(&mut client, req).await;
    assert_eq!(got.status(), proto::RunStatus::PartiallyFailed);
    assert_failed(got.record("bad"), Code::Internal, &["\"bad\"", "extracting units panicked"], 2);

    // Neither processor was taken for dead: a later run still uses both.
    let later: Vec<String> = (0..20).map(|i| format!("later-{i}")).collect();
    let got = run_ok(&mut client, run_request(later.iter().map(|id| record(id)).collect())).await;
    assert_eq!(got.status(), proto::RunStatus::Succeeded, "{:#?}", got.failures());
    let used: HashSet<String> = later.iter().flat_map(|id| script.attempts_of(id)).collect();
    assert_eq!(used.len(), 2, "both processors serve after the panic: {used:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_a_crashed_processor_finish_elsewhere() {
    let script = Arc::new(Script::new());
    let gate = Gate::closed();
    let _open = gate.open_on_drop();
    let a = start_processor(TestWorkload::new("A", &script).gated(&gate)).await;
    let b = start_processor(TestWorkload::new("B", &script)).await;
    let (a_url, b_url) = (a.url.clone(), b.url.clone());
    let b_addr = b.addr.clone();
    let pipeline = start_pipeline(&[a_url.clone(), b_url.clone()]).await;
    let mut client = pipeline_client(&pipeline.url()).await;

    const N: usize = 12;
    let mut req = run_request(records(N));
    req.options = Some(RunOptions { max_in_flight: 4, ..Default::default() });
    let handle = tokio::spawn(async move { run(&mut client, req).await });

    // A is stuck mid-record (its units block on the gate): crash it.
    wait_until("processor A to start units", || get(&a.stats.units_started) > 0).await;
    let a_stats = a.stats.clone();
    a.running.abort();

    let got = handle.await.unwrap().expect("Run rejected");
    got.assert_exactly_once(&ids(N));
    assert_eq!(
        got.status(),
        proto::RunStatus::Succeeded,
        "every record finishes elsewhere: {:#?}",
        got.failures()
    );
    let mut moved = 0;
    for r in &got.report.results {
        assert_output(r, &expected(&r.record_id, None, ROUNDS));
        if r.attempts >= 2 {
            moved += 1;
            assert_eq!(r.processor, b_addr, "{}: retried onto the surviving processor", r.record_id);
        }
    }
    assert!(moved >= 1, "the records in flight on A were retried");
    assert_eq!(get(&a_stats.records_succeeded), 0, "A never finished a record");
}

/// An attempt that outlives `record_timeout` (its processor is stuck) is
/// cancelled there and retried on another instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_over_record_timeout_is_retried_elsewhere() {
    let script = Arc::new(Script::new());
    let gate = Gate::closed();
    let _open = gate.open_on_drop();
    let a = start_processor(TestWorkload::new("A", &script).gated(&gate)).await;
    let b = start_processor(TestWorkload::new("B", &script)).await;
    let pipeline = start_pipeline(&[a.url.clone(), b.url.clone()]).await;
    let mut client = pipeline_client(&pipeline.url()).await;

    const N: usize = 4;
    let mut req = run_request(records(N));
    req.options = Some(RunOptions {
        record_timeout: Some(prost_types::Duration { seconds: 0, nanos: 300_000_000 }),
        max_attempts: 4,
        ..Default::default()
    });
    let got = run_ok(&mut client, req).await;
    got.assert_exactly_once(&ids(N));
    assert_eq!(got.status(), proto::RunStatus::Succeeded, "{:#?}", got.failures());
    // A can never finish a record, so every record ends on B, and those A
    // saw took more than one attempt.
    let mut seen_by_a = 0;
    for r in &got.records {
        assert_eq!(r.processor, b.addr, "{}: only B can finish", r.record_id);
        assert_output(r, &expected(&r.record_id, None, ROUNDS));
        let on_a = script.attempts_of(&r.record_id).iter().filter(|p| *p == "A").count();
        if on_a > 0 {
            assert!(r.attempts as usize > on_a, "{}: {} attempts, {on_a} on A", r.record_id, r.attempts);
        }
        seen_by_a += on_a as u64;
    }
    assert!(seen_by_a > 0, "some attempt went to A");
    // Every timed-out call was cancelled on A, not left running.
    wait_until("A to see its calls cancelled", || get(&a.stats.records_cancelled) == seen_by_a).await;
    assert_eq!(get(&a.stats.records_succeeded), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_failures_cancel_the_rest_and_fail_the_run() {
    let failing = ["rec-003", "rec-007", "rec-011", "rec-015", "rec-019"];
    let script = Arc::new(failing.iter().fold(Script::new(), |s, id| s.permanent(id)));
    let p = start_processor(TestWorkload::new("A", &script)).await;
    let pipeline = start_pipeline(std::slice::from_ref(&p.url)).await;
    let mut client = pipeline_client(&pipeline.url()).await;

    const N: usize = 20;
    let ids = ids(N);
    let mut req = run_request(records(N));
    req.options = Some(RunOptions { tolerated_failures: Some(1), max_in_flight: 1, ..Default::default() });
    let got = run_ok(&mut client, req).await;
    got.assert_exactly_once(&ids);
    assert_eq!(got.status(), proto::RunStatus::Failed);

    // One at a time in input order: rec-003 fails (tolerated), rec-007 is
    // the second failure, so rec-008.. are cancelled without an attempt.
    for (i, r) in got.report.results.iter().enumerate() {
        match i {
            3 | 7 => assert_failed(r, Code::FailedPrecondition, &[&ids[i]], 1),
            0..7 => assert_output(r, &expected(&ids[i], None, ROUNDS)),
            _ => {
                assert_failed(r, Code::Cancelled, &["tolerated_failures"], 0);
                assert_eq!(r.error.as_ref().unwrap().code, 1);
            }
        }
    }
    let cancelled = got.records.iter().filter(|r| r.error.as_ref().is_some_and(|e| e.code == 1)).count();
    assert_eq!(cancelled, 12);
    let s = got.summary();
    assert_eq!(s.records_failed, 2 + 12, "records_failed counts the cancelled ones");
    assert_eq!(s.records_succeeded, 6);
    assert!(!script.seen_ids().contains("rec-008"), "cancelled records never reached a processor");
    assert_eq!(script.seen_ids().len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_percentage_is_judged_as_records_finish() {
    // 20 records, 5 failing (25 %), one at a time in input order.
    let failing = ["rec-003", "rec-007", "rec-011", "rec-015", "rec-019"];
    let script = Arc::new(failing.iter().fold(Script::new(), |s, id| s.permanent(id)));
    let p = start_processor(TestWorkload::new("A", &script)).await;
    let pipeline = start_pipeline(std::slice::from_ref(&p.url)).await;
    let mut client = pipeline_client(&pipeline.url()).await;
    let ids = ids(20);
    let run_with = |pct: f64| {
        let mut req = run_request(records(20));
        req.options = Some(RunOptions {
            tolerated_failure_percentage: Some(pct),
            max_in_flight: 1,
            ..Default::default()
        });
        req
    };

    // 25 % tolerated: all 5 failures are within it.
    let got = run_ok(&mut client, run_with(25.0)).await;
    got.assert_exactly_once(&ids);
    assert_eq!(got.status(), proto::RunStatus::PartiallyFailed);
    assert_eq!(got.summary().records_failed, 5);

    // 10 % of 20 = 2 tolerated: the third failure (rec-011) is certain to
    // exceed the share, so the run stops there, without waiting for the end.
    let got = run_ok(&mut client, run_with(10.0)).await;
    got.assert_exactly_once(&ids);
    assert_eq!(got.status(), proto::RunStatus::Failed);
    for (i, r) in got.report.results.iter().enumerate() {
        match i {
            3 | 7 | 11 => assert_failed(r, Code::FailedPrecondition, &[&ids[i]], 1),
            0..11 => assert_output(r, &expected(&ids[i], None, ROUNDS)),
            _ => assert_failed(
                r,
                Code::Cancelled,
                &["tolerated_failure_percentage = 10%", "the 2 tolerated"],
                0,
            ),
        }
    }

    // Both set: the stricter applies (1 failure < 25 %).
    let mut req = run_with(25.0);
    req.options.as_mut().unwrap().tolerated_failures = Some(1);
    let got = run_ok(&mut client, req).await;
    assert_eq!(got.status(), proto::RunStatus::Failed);
    // tolerated_failures = 1: the second permanent failure stops the run.
    let permanent = |r: &&proto::RecordResult| {
        r.error.as_ref().is_some_and(|e| e.code == Code::FailedPrecondition as i32)
    };
    assert_eq!(got.records.iter().filter(permanent).count(), 2);

    // Out of range or not a number: INVALID_ARGUMENT naming the field.
    for bad in [-1.0, 100.5, f64::NAN] {
        let status = client.run(run_with(bad)).await.unwrap_err();
        assert_status(&status, Code::InvalidArgument, &["options.tolerated_failure_percentage", "0 to 100"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cancellation_stops_processor_work() {
    let script = Arc::new(Script::new());
    let gate = Gate::closed();
    let _open = gate.open_on_drop();
    let p = start_processor(TestWorkload::new("A", &script).gated(&gate)).await;
    let pipeline = start_pipeline(std::slice::from_ref(&p.url)).await;
    let mut client = pipeline_client(&pipeline.url()).await;

    let mut req = run_request(vec![record_with("big", json!({ "units": 50 }))]);
    req.unit_mode = UnitMode::Parallel as i32;
    let mut stream = tokio::time::timeout(WAIT, client.run(req)).await.unwrap().unwrap().into_inner();
    let first = tokio::time::timeout(WAIT, stream.message()).await.unwrap().unwrap().unwrap();
    assert!(matches!(first.event, Some(Event::Started(_))), "{first:?}");

    // Two unit threads: two units run (blocked on the gate), 48 wait.
    wait_until("two units to start", || get(&p.stats.units_started) == 2).await;
    drop(stream);
    drop(client);
    wait_until("the processor to see the call cancelled", || get(&p.stats.records_cancelled) == 1).await;

    gate.open();
    wait_until("the running units to finish", || get(&p.stats.units_finished) == get(&p.stats.units_started))
        .await;
    assert_eq!(get(&p.stats.units_started), 2, "units that had not started never ran");
    assert_eq!(get(&p.stats.records_started), 1);
    assert_eq!(get(&p.stats.records_succeeded), 0);

    // Nothing is left holding the processor: a new run goes through.
    let mut client = pipeline_client(&pipeline.url()).await;
    let got = run_ok(&mut client, run_request(records(3))).await;
    got.assert_exactly_once(&ids(3));
    assert_eq!(got.status(), proto::RunStatus::Succeeded, "{:#?}", got.failures());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_processors_unreachable_is_unavailable_promptly() {
    // Bind and drop to find ports with nothing listening.
    let free_port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (p1, p2) = (free_port(), free_port());
    let urls = [format!("http://127.0.0.1:{p1}"), format!("127.0.0.1:{p2}")];
    let pipeline = start_pipeline(&urls).await;
    let mut client = pipeline_client(&pipeline.url()).await;

    let started = Instant::now();
    let call = client.run(run_request(records(3)));
    let status = match tokio::time::timeout(Duration::from_secs(5), call).await {
        Err(_) => panic!("Run did not answer within 5 s with no processor reachable"),
        Ok(Ok(_)) => panic!("Run accepted with no processor reachable"),
        Ok(Err(status)) => status,
    };
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    for port in [p1, p2] {
        assert!(status.message().contains(&port.to_string()), "message names {port}: {}", status.message());
    }
    assert!(started.elapsed() < Duration::from_secs(5));

    // Once a processor is there, the same pipeline config works.
    let p = start_processor(Digest::default()).await;
    let pipeline = start_pipeline(&[urls[0].clone(), p.url.clone()]).await;
    let mut client = pipeline_client(&pipeline.url()).await;
    let got = run_ok(&mut client, run_request(records(4))).await;
    got.assert_exactly_once(&ids(4));
    assert_eq!(got.status(), proto::RunStatus::Succeeded, "{:#?}", got.failures());
}
