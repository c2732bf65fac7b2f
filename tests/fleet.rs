//! A fleet that changes while runs go on: instances joining and leaving
//! through the resolver (driven here through its seam), work shared by
//! capacity as the fleet changes, and a processor draining mid-run.

mod common;

use common::*;
use fanout::pipeline::discovery::Resolve;
use fanout::proto;
use futures::future::BoxFuture;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A name server the test edits: every name has the addresses set last.
#[derive(Clone, Default)]
struct Dns {
    addrs: Arc<Mutex<Vec<SocketAddr>>>,
    /// Lookups answered so far.
    lookups: Arc<AtomicUsize>,
}

impl Dns {
    fn set(&self, procs: &[&Proc]) {
        *self.addrs.lock().unwrap() = procs.iter().map(|p| p.running.addr).collect();
    }

    /// Waits until the pipeline has applied what was set last: the
    /// resolver looks names up one round at a time, so once a second
    /// lookup has begun since now, the round that saw the set is applied.
    async fn applied(&self) {
        let now = self.lookups.load(Ordering::SeqCst);
        wait_until("the resolver to apply the change", || self.lookups.load(Ordering::SeqCst) >= now + 2)
            .await;
    }
}

impl Resolve for Dns {
    fn resolve(&self, _host: &str, _port: u16) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
        let addrs = self.addrs.lock().unwrap().clone();
        self.lookups.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move { Ok(addrs) })
    }
}

/// A processor whose every unit also takes `unit_time` of wall time, so a
/// run lasts long enough to change the fleet under it.
async fn slow_processor(threads: usize, slots: usize, unit_time: Duration) -> Proc {
    start_processor_with(&processor_config_with(threads, slots), Tracked::slow(unit_time)).await
}

/// A pipeline over `dns:///procs` resolved by `dns`, looked up every 50 ms.
async fn pipeline_over(dns: &Dns) -> fanout::server::Running {
    let mut cfg = pipeline_config(&["dns:///procs:50052".to_owned()]);
    cfg.resolve_interval = Duration::from_millis(50);
    fanout::server::start_pipeline_with_resolver(&cfg, Arc::new(dns.clone())).await.expect("start pipeline")
}

fn one_unit_records(n: usize) -> (Vec<String>, proto::RunRequest) {
    let ids = ids(n);
    let mut req = run_request(ids.iter().map(|id| record_with(id, json!({ "units": 1 }))).collect());
    req.options = Some(proto::RunOptions { max_in_flight: 256, ..Default::default() });
    (ids, req)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_join_and_leave_mid_run_through_the_resolver() {
    let unit = Duration::from_millis(10);
    let (p1, p2) = (slow_processor(1, 2, unit).await, slow_processor(1, 2, unit).await);
    let dns = Dns::default();
    dns.set(&[&p1]);
    let pipeline = pipeline_over(&dns).await;
    let mut client = pipeline_client(&pipeline.url()).await;
    let (ids, req) = one_unit_records(150);
    let run = tokio::spawn(async move { run_for(&mut client, req, Duration::from_secs(60)).await });

    wait_until("p1 to work", || get(&p1.stats.records_started) >= 5).await;
    assert_eq!(get(&p2.stats.records_started), 0, "p2 is not in the resolved set yet");
    // p2 joins mid-run: the run in progress uses it.
    dns.set(&[&p1, &p2]);
    wait_until("p2 to get records", || get(&p2.stats.records_started) >= 5).await;
    // p1 leaves: no new attempts; its in-flight records finish there.
    dns.set(&[&p2]);
    dns.applied().await;
    wait_until("p1 to be idle", || get(&p1.stats.records_started) == get(&p1.stats.records_succeeded)).await;
    let p1_done = get(&p1.stats.records_started);
    let got = run.await.unwrap().expect("Run accepted");

    got.assert_exactly_once(&ids);
    assert_eq!(got.started.processor_count, 1, "one instance when the run started");
    assert_eq!(got.status(), proto::RunStatus::Succeeded, "{:#?}", got.failures());
    assert_eq!(got.summary().retries, 0, "nothing failed or was redone as the fleet changed");
    assert_eq!(get(&p1.stats.records_started), p1_done, "p1 got no record after it left");
    assert_eq!(
        get(&p1.stats.records_started) + get(&p2.stats.records_started),
        150,
        "each record computed once"
    );
    let on = |p: &Proc| got.records.iter().filter(|r| r.processor == p.addr).count() as u64;
    assert_eq!((on(&p1), on(&p2)), (p1_done, 150 - p1_done), "results name the instance that did the work");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_is_shared_by_capacity_as_the_fleet_changes() {
    let unit = Duration::from_millis(10);
    let small = slow_processor(1, 1, unit).await;
    let big = slow_processor(2, 2, unit).await;
    let dns = Dns::default();
    dns.set(&[&small]);
    let pipeline = pipeline_over(&dns).await;
    let mut client = pipeline_client(&pipeline.url()).await;
    let (ids, req) = one_unit_records(150);
    let run = tokio::spawn(async move { run_for(&mut client, req, Duration::from_secs(60)).await });

    wait_until("the small one to work", || get(&small.stats.records_started) >= 10).await;
    dns.set(&[&small, &big]);
    wait_until("the big one to be described and used", || get(&big.stats.records_started) >= 1).await;
    let small_before = get(&small.stats.records_started);
    let got = run.await.unwrap().expect("Run accepted");
    got.assert_exactly_once(&ids);
    assert_eq!(got.status(), proto::RunStatus::Succeeded, "{:#?}", got.failures());
    let small_after = get(&small.stats.records_started) - small_before;
    let big_after = get(&big.stats.records_started);
    eprintln!("after the join: 1-slot {small_after}, 2-slot {big_after}");
    let share = big_after as f64 / small_after.max(1) as f64;
    assert!(
        (1.4..=2.8).contains(&share),
        "2 slots beside 1 get about twice the records: {big_after} vs {small_after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_draining_mid_run_fails_no_record_and_recomputes_none() {
    let unit = Duration::from_millis(10);
    let (p1, p2) = (slow_processor(1, 2, unit).await, slow_processor(1, 2, unit).await);
    let pipeline = start_pipeline(&[p1.url.clone(), p2.url.clone()]).await;
    let mut client = pipeline_client(&pipeline.url()).await;
    let (ids, req) = one_unit_records(120);
    let run = tokio::spawn(async move { run_for(&mut client, req, Duration::from_secs(60)).await });

    wait_until("p2 to work", || get(&p2.stats.records_started) >= 5).await;
    // A rollout or scale-down: SIGTERM, as a graceful stop.
    let stopping = p2.running.stop_token();
    stopping.cancel();
    let got = run.await.unwrap().expect("Run accepted");

    got.assert_exactly_once(&ids);
    assert_eq!(got.status(), proto::RunStatus::Succeeded, "{:#?}", got.failures());
    assert_eq!(got.summary().records_failed, 0);
    let computed = get(&p1.stats.records_started) + get(&p2.stats.records_started);
    assert_eq!(computed, 120, "no record was computed twice: p2 finished what it had");
    assert_eq!(get(&p2.stats.records_cancelled), 0, "nothing on p2 was cut short");
    assert_eq!(got.summary().retries, 0, "records p2 refused were not started, so not retried");
}
