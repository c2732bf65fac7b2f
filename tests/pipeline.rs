//! The pipeline's happy path: every record comes back exactly once with the
//! right output, in both unit modes, spread over every processor.

mod common;

use common::*;
use fanout::engine::EngineStats;
use fanout::proto::{self, RunOptions, UnitMode};
use fanout::workload::Digest;
use serde_json::json;
use std::collections::HashSet;

/// Records `rec-000`.. with a few explicit unit counts mixed in.
fn mixed_records(n: usize) -> (Vec<proto::Record>, Vec<Option<u64>>) {
    let units = |i: usize| match i % 10 {
        3 => Some(1),
        7 => Some(37),
        _ => None,
    };
    let records = ids(n)
        .iter()
        .enumerate()
        .map(|(i, id)| match units(i) {
            Some(u) => record_with(id, json!({ "units": u, "note": "explicit" })),
            None => record(id),
        })
        .collect();
    (records, (0..n).map(units).collect())
}

async fn run_mode(
    client: &mut fanout::proto::pipeline_client::PipelineClient<tonic::transport::Channel>,
    mode: UnitMode,
    urls: &[String],
) -> Collected {
    const N: usize = 50;
    let (records, units) = mixed_records(N);
    let ids = ids(N);
    let mut req = run_request(records);
    req.unit_mode = mode as i32;
    req.run_id = format!("exactly-once-{}", mode.as_str_name());
    let got = run_ok(client, req).await;

    // started
    assert_eq!(got.started.run_id, format!("exactly-once-{}", mode.as_str_name()));
    assert_eq!(got.started.record_count, N as u64);
    assert_eq!(got.started.processor_count, urls.len() as u32);
    assert_recent(got.started.started_at.as_ref().expect("started_at"), "started_at");

    // one record event per input record; the report holds them in input order
    got.assert_exactly_once(&ids);
    assert_eq!(got.report.results.len(), N);
    let mut total_units = 0;
    for (i, r) in got.report.results.iter().enumerate() {
        let want = expected(&ids[i], units[i], ROUNDS);
        total_units += want.unit_count;
        assert_output(r, &want);
        assert_eq!(r.attempts, 1, "{}: attempts", r.record_id);
        assert!(
            urls.iter().any(|u| u.strip_prefix("http://") == Some(r.processor.as_str())),
            "{}: processor {:?} is not configured",
            r.record_id,
            r.processor
        );
        assert!(r.elapsed.is_some(), "{}: elapsed", r.record_id);
    }

    // report
    assert_eq!(got.report.run_id, got.started.run_id);
    assert_eq!(got.status(), proto::RunStatus::Succeeded, "{:#?}", got.failures());
    let s = got.summary();
    assert_eq!(s.total_records_processed, N as u64);
    assert_eq!(s.records_succeeded, N as u64);
    assert_eq!(s.records_failed, 0);
    assert_eq!(s.retries, 0);
    assert_eq!(s.total_units_processed, total_units);
    let avg = total_units as f64 / N as f64;
    assert!(
        (s.average_units_per_record - avg).abs() < 1e-9,
        "average {} != {avg}",
        s.average_units_per_record
    );
    assert_recent(got.report.generated_at.as_ref().expect("generated_at"), "generated_at");
    assert!(got.report.elapsed.is_some(), "report.elapsed");
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_comes_back_exactly_once_in_both_unit_modes() {
    let p1 = start_processor(Digest::default()).await;
    let p2 = start_processor(Digest::default()).await;
    let urls = vec![p1.url.clone(), p2.url.clone()];
    let pipeline = start_pipeline(&urls).await;
    let mut client = pipeline_client(&pipeline.url()).await;

    let seq = run_mode(&mut client, UnitMode::Sequential, &urls).await;
    let par = run_mode(&mut client, UnitMode::Parallel, &urls).await;
    let outputs = |c: &Collected| c.report.results.iter().map(|r| r.output.clone()).collect::<Vec<_>>();
    assert_eq!(outputs(&seq), outputs(&par), "sequential and parallel outputs differ");

    // Both processors did some of the 100 records, and nothing ran twice.
    let done = EngineStats::get(&p1.stats.records_succeeded) + EngineStats::get(&p2.stats.records_succeeded);
    assert_eq!(done, 100);
    assert_eq!(EngineStats::get(&p1.stats.records_failed) + EngineStats::get(&p2.stats.records_failed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unspecified_unit_mode_and_generated_run_id() {
    let p = start_processor(Digest::default()).await;
    let pipeline = start_pipeline(std::slice::from_ref(&p.url)).await;
    let mut client = pipeline_client(&pipeline.url()).await;
    let ids = ids(5);
    let got = run_ok(&mut client, run_request(records(5))).await;
    got.assert_exactly_once(&ids);
    assert!(!got.started.run_id.is_empty(), "a run id is generated when the request has none");
    assert_eq!(got.report.run_id, got.started.run_id);
    for (i, r) in got.report.results.iter().enumerate() {
        assert_output(r, &expected(&ids[i], None, ROUNDS));
    }
    // Default rounds (no params) is 10000: check one record against it too.
    let mut req = run_request(vec![record_with("default-rounds", json!({ "units": 2 }))]);
    req.params = None;
    let got = run_ok(&mut client, req).await;
    assert_output(&got.report.results[0], &expected("default-rounds", Some(2), 10_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summary_only_leaves_results_out_but_keeps_the_summary() {
    let p = start_processor(Digest::default()).await;
    let pipeline = start_pipeline(std::slice::from_ref(&p.url)).await;
    let mut client = pipeline_client(&pipeline.url()).await;
    const N: usize = 20;
    let ids = ids(N);
    let mut req = run_request(records(N));
    req.options = Some(RunOptions { summary_only: true, ..Default::default() });
    let got = run_ok(&mut client, req).await;

    assert!(got.report.results.is_empty(), "summary_only: results must be empty");
    got.assert_exactly_once(&ids);
    let total: u64 = ids.iter().map(|id| expected(id, None, ROUNDS).unit_count).sum();
    for r in &got.records {
        assert_output(r, &expected(&r.record_id, None, ROUNDS));
    }
    let s = got.summary();
    assert_eq!(got.status(), proto::RunStatus::Succeeded, "{:#?}", got.failures());
    assert_eq!(s.total_records_processed, N as u64);
    assert_eq!(s.records_succeeded, N as u64);
    assert_eq!(s.total_units_processed, total);
    assert!((s.average_units_per_record - total as f64 / N as f64).abs() < 1e-9);
    assert_eq!((s.records_failed, s.retries), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processors_all_receive_work() {
    let procs = [
        start_processor(Digest::default()).await,
        start_processor(Digest::default()).await,
        start_processor(Digest::default()).await,
    ];
    let urls: Vec<String> = procs.iter().map(|p| p.url.clone()).collect();
    let pipeline = start_pipeline(&urls).await;
    let mut client = pipeline_client(&pipeline.url()).await;
    const N: usize = 30;
    let got = run_ok(&mut client, run_request(records(N))).await;
    got.assert_exactly_once(&ids(N));
    assert_eq!(got.started.processor_count, 3);
    assert_eq!(got.status(), proto::RunStatus::Succeeded, "{:#?}", got.failures());

    let used: HashSet<&String> = got.report.results.iter().map(|r| &r.processor).collect();
    assert_eq!(used, procs.iter().map(|p| &p.addr).collect(), "every processor appears in the results");
    let mut total = 0;
    for p in &procs {
        let n = EngineStats::get(&p.stats.records_succeeded);
        assert!(n > 0, "processor {} processed nothing", p.url);
        let reported = got.report.results.iter().filter(|r| r.processor == p.addr).count() as u64;
        assert_eq!(n, reported, "processor {} counters match the report", p.url);
        total += n;
    }
    assert_eq!(total, N as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_events_come_at_the_interval_with_the_counts_so_far() {
    let script = std::sync::Arc::new(common::Script::new());
    let gate = common::Gate::closed();
    let _open = gate.open_on_drop();
    let p = start_processor(common::TestWorkload::new("A", &script).gated(&gate)).await;
    let mut cfg = common::pipeline_config(std::slice::from_ref(&p.url));
    cfg.progress_interval = std::time::Duration::from_millis(100);
    let pipeline = fanout::server::start_pipeline(&cfg).await.unwrap();
    let mut client = pipeline_client(&pipeline.url()).await;

    // Every unit waits on the gate: the run is quiet but for progress.
    let mut req = run_request(records(6));
    req.options = Some(proto::RunOptions { max_in_flight: 4, ..Default::default() });
    let mut stream = client.run(req).await.unwrap().into_inner();
    let mut quiet = Vec::new();
    while quiet.len() < 3 {
        let ev = tokio::time::timeout(WAIT, stream.message()).await.unwrap().unwrap().unwrap();
        match ev.event.unwrap() {
            proto::run_event::Event::Progress(p) => quiet.push(p),
            proto::run_event::Event::Started(_) => {}
            other => panic!("nothing but progress while the gate is shut: {other:?}"),
        }
    }
    let last = quiet.last().unwrap();
    assert_eq!((last.records_dispatched, last.records_in_flight), (4, 4), "{last:?}");
    assert_eq!((last.records_succeeded, last.records_failed, last.record_count), (0, 0, 6));
    let secs = |p: &proto::RunProgress| {
        let d = p.elapsed.unwrap();
        d.seconds as f64 + f64::from(d.nanos) / 1e9
    };
    assert!(quiet.windows(2).all(|w| secs(&w[0]) < secs(&w[1])), "elapsed grows");
    gate.open();
    let mut records = 0;
    loop {
        let ev = tokio::time::timeout(WAIT, stream.message()).await.unwrap().unwrap().unwrap();
        match ev.event.unwrap() {
            proto::run_event::Event::Record(_) => records += 1,
            proto::run_event::Event::Report(r) => {
                assert_eq!(r.status(), proto::RunStatus::Succeeded);
                break;
            }
            _ => {}
        }
    }
    assert_eq!(records, 6);
    assert!(stream.message().await.unwrap().is_none(), "nothing after the report");
}
