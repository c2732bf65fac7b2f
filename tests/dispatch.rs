//! Attempt timing: an attempt's `record_timeout` starts when it has a slot,
//! not while it waits in the pipeline. In a test binary of its own, so no
//! heavy test shares the CPU with it.

mod common;

use common::*;
use fanout::proto;
use fanout::workload::Digest;
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_timeout_starts_when_the_attempt_is_dispatched() {
    // One slot: records wait their turn in the pipeline, each ~30-100 ms of
    // work; the whole run takes many times the record timeout, yet no
    // attempt times out, because none is timed while it waits.
    let p = start_processor_with(&processor_config_with(1, 1), Digest::default()).await;
    let pipeline = start_pipeline(std::slice::from_ref(&p.url)).await;
    let mut client = pipeline_client(&pipeline.url()).await;
    let n = 40;
    let mut req = run_request((0..n).map(|i| record_with(&format!("r{i}"), json!({ "units": 1 }))).collect());
    req.params = Some(rounds(100_000));
    req.options = Some(proto::RunOptions {
        max_in_flight: 64,
        record_timeout: Some(prost_types::Duration { seconds: 1, nanos: 0 }),
        ..Default::default()
    });
    let started = Instant::now();
    let got = run_for(&mut client, req, Duration::from_secs(60)).await.expect("Run rejected");
    got.assert_exactly_once(&(0..n).map(|i| format!("r{i}")).collect::<Vec<_>>());
    assert_eq!(got.status(), proto::RunStatus::Succeeded, "{:#?}", got.failures());
    assert_eq!(got.summary().retries, 0, "no attempt was retried");
    // The premise: had an attempt's timer started while its record waited,
    // it would have fired (the run outlasts the record timeout; it takes
    // about 3.4 s in a debug build here).
    let took = started.elapsed();
    assert!(
        took > Duration::from_secs(1),
        "{n} records took {took:?}, under the record timeout: nothing was tested"
    );
}
