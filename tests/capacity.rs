//! Capacity-aware dispatch under load: processors advertise their slots and
//! refuse what is past them as "not started"; the pipeline never exceeds
//! them, shares work by capacity, starts an attempt's timeout at dispatch,
//! and keeps every healthy record succeeding however many runs or records
//! in flight it is given.

mod common;

use common::*;
use fanout::proto::{self, DescribeRequest};
use fanout::workload::Digest;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tonic::Code;

/// [`run`] with a bound of our own, for runs bigger than most.
async fn run_within(
    client: &mut fanout::proto::pipeline_client::PipelineClient<tonic::transport::Channel>,
    req: proto::RunRequest,
    limit: Duration,
) -> Collected {
    run_for(client, req, limit).await.expect("Run rejected")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_reports_capacity_and_a_full_processor_refuses_not_started() {
    let script = Arc::new(Script::new());
    let gate = Gate::closed();
    let _open = gate.open_on_drop();
    let mut cfg = processor_config_with(1, 1);
    cfg.queue = Some(0);
    let p = start_processor_with(&cfg, TestWorkload::new("A", &script).gated(&gate)).await;
    let mut client = processor_client(&p.url).await;

    let d = client.describe(DescribeRequest {}).await.unwrap().into_inner();
    assert_eq!((d.slots, d.queue, d.unit_threads), (1, 0, 1), "{d:?}");
    assert_eq!(d.workload, "test-digest");
    assert_eq!(d.max_units_per_record, 10_000);
    assert!(!d.version.is_empty());

    // One record in the only slot, blocked on the gate.
    let call = |id: &str| {
        let mut c = client.clone();
        let req = process_request(record_with(id, json!({ "units": 1 })), proto::UnitMode::Parallel);
        tokio::spawn(async move { c.process_record(req).await })
    };
    let first = call("a");
    wait_until("the first record to start", || get(&p.stats.records_started) == 1).await;
    // The next finds slot and queue full: refused at once, not started.
    let refused = match tokio::time::timeout(WAIT, call("b")).await.unwrap().unwrap() {
        Err(status) => status,
        Ok(resp) => panic!("a record past slots and queue was processed: {resp:?}"),
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(fanout::processor::is_not_started(&refused), "marked not started: {:?}", refused.metadata());
    for needle in ["--slots", "--queue", "not started"] {
        assert!(refused.message().contains(needle), "{needle} in {:?}", refused.message());
    }
    assert_eq!(get(&p.stats.records_started), 1, "the refused record never reached the engine");
    gate.open();
    assert!(first.await.unwrap().is_ok());
    // With the slot free again, the same record goes through.
    assert!(call("b").await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_queue_holds_records_until_a_slot_frees() {
    let script = Arc::new(Script::new());
    let gate = Gate::closed();
    let _open = gate.open_on_drop();
    let mut cfg = processor_config_with(1, 1);
    cfg.queue = Some(4);
    let p = start_processor_with(&cfg, TestWorkload::new("A", &script).gated(&gate)).await;
    let client = processor_client(&p.url).await;
    let calls: Vec<_> = (0..5)
        .map(|i| {
            let mut c = client.clone();
            let req = process_request(
                record_with(&format!("q{i}"), json!({ "units": 1 })),
                proto::UnitMode::Parallel,
            );
            tokio::spawn(async move { c.process_record(req).await })
        })
        .collect();
    wait_until("one record to start", || get(&p.stats.records_started) == 1).await;
    gate.open();
    for c in calls {
        assert!(c.await.unwrap().is_ok(), "slot + queue = 5 records, all processed");
    }
    assert_eq!(get(&p.stats.records_succeeded), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_keeps_within_slots_and_shares_work_by_capacity() {
    let timed = || Tracked::slow(Duration::from_millis(10));
    let (small, big) = (timed(), timed());
    // No queue: a call beyond a processor's slots would be refused (not
    // started), and its metrics would count the refusal.
    let strict = |threads, slots| {
        let mut cfg = processor_config_with(threads, slots);
        cfg.queue = Some(0);
        cfg.metrics.metrics_listen = Some("127.0.0.1:0".into());
        cfg
    };
    let p1 = start_processor_with(&strict(1, 1), small.clone()).await;
    let p2 = start_processor_with(&strict(2, 2), big.clone()).await;
    let pipeline = start_pipeline(&[p1.url.clone(), p2.url.clone()]).await;
    let mut client = pipeline_client(&pipeline.url()).await;

    // Far more in flight than the fleet's 3 slots; each record a few ms of work.
    let n = 150;
    let mut req = run_request((0..n).map(|i| record_with(&format!("r{i}"), json!({ "units": 1 }))).collect());
    req.params = Some(rounds(10));
    req.options = Some(proto::RunOptions { max_in_flight: 4096, ..Default::default() });
    let got = run_within(&mut client, req, Duration::from_secs(60)).await;
    assert_eq!(got.status(), proto::RunStatus::Succeeded, "{:#?}", got.failures());
    assert_eq!(got.summary().retries, 0);
    assert!(
        small.peak.load(Ordering::SeqCst) <= 1,
        "1-slot processor had {} at once",
        small.peak.load(Ordering::SeqCst)
    );
    assert!(
        big.peak.load(Ordering::SeqCst) <= 2,
        "2-slot processor had {} at once",
        big.peak.load(Ordering::SeqCst)
    );
    let (a, b) = (small.total.load(Ordering::SeqCst), big.total.load(Ordering::SeqCst));
    assert_eq!(a + b, n, "every record processed once");
    // The pipeline never sent an instance more than its slots: no call was
    // refused for want of one, and every call was a record processed.
    for (p, done) in [(&p1, a), (&p2, b)] {
        let at = p.running.metrics_addr.expect("metrics on");
        let calls = |code| {
            metric_sum(
                at,
                "grpc_server_handled_total",
                &[("grpc_method", "ProcessRecord"), ("grpc_code", code)],
            )
        };
        assert_eq!(calls("RESOURCE_EXHAUSTED"), 0.0, "{} was sent more than its slots", p.addr);
        assert_eq!(calls("OK"), done as f64, "{}", p.addr);
    }
    let share = b as f64 / a as f64;
    eprintln!("records: 1-slot {a}, 2-slot {b}");
    assert!(
        (1.4..=2.8).contains(&share),
        "a 2-slot processor gets about twice a 1-slot one's records: {b} vs {a}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_thousand_records_in_flight_on_one_thread_processors_all_succeed() {
    let p1 = start_processor_with(&processor_config_with(1, 4), Digest::default()).await;
    let p2 = start_processor_with(&processor_config_with(1, 4), Digest::default()).await;
    let pipeline = start_pipeline(&[p1.url.clone(), p2.url.clone()]).await;
    let mut client = pipeline_client(&pipeline.url()).await;
    let n = 4096;
    let ids: Vec<String> = (0..n).map(|i| format!("r{i:04}")).collect();
    let mut req = run_request(ids.iter().map(|id| record_with(id, json!({ "units": 300 }))).collect());
    req.params = Some(rounds(1));
    req.options = Some(proto::RunOptions {
        max_in_flight: 4096,
        record_timeout: Some(prost_types::Duration { seconds: 5, nanos: 0 }),
        summary_only: true,
        ..Default::default()
    });
    let got = run_within(&mut client, req, Duration::from_secs(240)).await;
    got.assert_exactly_once(&ids);
    assert_eq!(
        got.status(),
        proto::RunStatus::Succeeded,
        "{:#?}",
        &got.failures()[..got.failures().len().min(5)]
    );
    assert_eq!(got.summary().retries, 0, "no timeouts, no retries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_runs_are_all_accepted_and_succeed() {
    let p1 = start_processor_with(&processor_config_with(1, 4), Digest::default()).await;
    let p2 = start_processor_with(&processor_config_with(1, 4), Digest::default()).await;
    let pipeline = start_pipeline(&[p1.url.clone(), p2.url.clone()]).await;
    let client = pipeline_client(&pipeline.url()).await;
    let (runs, per_run) = (200, 100);
    let started = Instant::now();
    let tasks: Vec<_> = (0..runs)
        .map(|r| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let ids: Vec<String> = (0..per_run).map(|i| format!("run{r}-{i}")).collect();
                let mut req = run_request(ids.iter().map(|id| record(id)).collect());
                req.params = Some(rounds(1));
                let got = run_within(&mut client, req, Duration::from_secs(240)).await;
                got.assert_exactly_once(&ids);
                (
                    got.status(),
                    got.summary().records_failed,
                    got.failures().into_iter().take(3).collect::<Vec<_>>(),
                )
            })
        })
        .collect();
    for t in tasks {
        let (status, failed, failures) = t.await.unwrap();
        assert_eq!((status, failed), (proto::RunStatus::Succeeded, 0), "{failures:#?}");
    }
    eprintln!("{runs} runs x {per_run} records in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_run_is_not_starved_by_a_big_one() {
    // A big run fills every slot and queues 2,000 more attempts; a 1-record
    // run started after it gets a slot within a few records' time, not after
    // the big run's queue.
    let p = start_processor_with(&processor_config_with(1, 1), Digest::default()).await;
    let pipeline = start_pipeline(std::slice::from_ref(&p.url)).await;
    let mut big_client = pipeline_client(&pipeline.url()).await;
    let mut req =
        run_request((0..2000).map(|i| record_with(&format!("b{i}"), json!({ "units": 1 }))).collect());
    req.params = Some(rounds(20_000));
    req.options = Some(proto::RunOptions { max_in_flight: 4096, summary_only: true, ..Default::default() });
    let mut big = big_client.run(req).await.unwrap().into_inner();
    let first = tokio::time::timeout(WAIT, big.message()).await.unwrap().unwrap().unwrap();
    assert!(matches!(first.event, Some(proto::run_event::Event::Started(_))));
    // Wait until the big run has records done (so its queue is full).
    let _ = tokio::time::timeout(WAIT, big.message()).await.unwrap().unwrap().unwrap();

    let mut small_client = pipeline_client(&pipeline.url()).await;
    let mut small = run_request(vec![record_with("small", json!({ "units": 1 }))]);
    small.params = Some(rounds(20_000));
    let got = run_ok(&mut small_client, small).await;
    assert_eq!(got.status(), proto::RunStatus::Succeeded, "{:#?}", got.failures());
    // Most of the big run is still to do: the small one did not wait for it.
    assert!(get(&p.stats.records_started) < 1000, "{} big records ran first", get(&p.stats.records_started));
    drop(big);
}
