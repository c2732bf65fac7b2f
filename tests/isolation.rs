//! Runs are isolated: clients that never read their stream slow only their
//! own runs (which are cancelled after the stalled-client timeout), while
//! other runs succeed and the pipeline stays SERVING.

mod common;

use common::*;
use fanout::proto::{self, run_event::Event};
use fanout::workload::Digest;
use std::time::Duration;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_slow_only_their_own_runs() {
    let p1 = start_processor(Digest::default()).await;
    let p2 = start_processor(Digest::default()).await;
    let mut cfg = pipeline_config(&[p1.url.clone(), p2.url.clone()]);
    cfg.stalled_client_timeout = Duration::from_secs(3);
    let pipeline = fanout::server::start_pipeline(&cfg).await.unwrap();

    // 20 clients, each on its own connection, start a big run and read only
    // its `started` event.
    let mut stalled = Vec::new();
    for c in 0..20 {
        let mut client = small_window_client(&pipeline.url()).await;
        let ids: Vec<String> = (0..3000).map(|i| format!("c{c}-{i:04}-{}", "x".repeat(100))).collect();
        let req = run_request(ids.iter().map(|id| record(id)).collect());
        let mut stream = client.run(req).await.unwrap().into_inner();
        let first = tokio::time::timeout(WAIT, stream.message()).await.unwrap().unwrap().unwrap();
        assert!(matches!(first.event, Some(Event::Started(_))));
        stalled.push((client, stream));
    }
    // A normal run from another client succeeds meanwhile...
    let mut client = pipeline_client(&pipeline.url()).await;
    let got = run_ok(&mut client, run_request(records(50))).await;
    got.assert_exactly_once(&ids(50));
    assert_eq!(got.status(), proto::RunStatus::Succeeded, "{:#?}", got.failures());
    // ...and the pipeline's health stays SERVING.
    let ch = Channel::from_shared(pipeline.url()).unwrap().connect().await.unwrap();
    let health = HealthClient::new(ch)
        .check(HealthCheckRequest { service: "fanout.v1.Pipeline".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status(), ServingStatus::Serving);

    // After the stalled-client timeout their runs are cancelled...
    wait_until("the stalled runs to be cancelled", || pipeline.active_runs() == 0).await;
    // ...having stopped starting records once their clients were full. Each
    // can have started what fits its client's 16 KiB window (~70 events),
    // the 32-event channel, the 64-event outbox, and 64 more in flight:
    // about 230 of its 3,000 (4,558 in all, with the normal run, when this
    // was written).
    let started = get(&p1.stats.records_started) + get(&p2.stats.records_started);
    assert!(started < 20 * 400, "stalled runs stopped starting records ({started} started)");
    // ...so, read now, each stream ends without a report.
    for (_client, mut stream) in stalled {
        assert_ends_without_report(&mut stream).await;
    }
}
