//! Serving: health, reflection (v1 and v1alpha) and graceful shutdown of
//! both servers.

mod common;

use common::*;
use fanout::proto::run_event::Event;
use fanout::proto::{self, RunOptions};
use fanout::server::{PIPELINE_SERVICE, Running};
use fanout::workload::Digest;
use prost::Message;
use std::sync::Arc;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

const PROCESSOR_SERVICE: &str = "fanout.v1.RecordProcessor";

async fn channel(url: &str) -> Channel {
    tokio::time::timeout(WAIT, Channel::from_shared(url.to_owned()).unwrap().connect())
        .await
        .expect("connect timed out")
        .expect("connect")
}

async fn check(health: &mut HealthClient<Channel>, service: &str) -> Result<ServingStatus, tonic::Status> {
    let req = HealthCheckRequest { service: service.into() };
    let resp = tokio::time::timeout(WAIT, health.check(req)).await.expect("health check timed out")?;
    Ok(resp.into_inner().status())
}

/// What reflection answers, the same for v1 and v1alpha.
struct Reflected {
    services: Vec<String>,
    symbol_files: Vec<prost_types::FileDescriptorProto>,
}

/// `reflect_v1` / `reflect_v1alpha`: list the services and fetch the file of
/// `symbol` over one reflection stream. The two versions are the same protocol
/// in different generated modules, hence one macro for both.
macro_rules! reflect_fn {
    ($name:ident, $version:ident) => {
        async fn $name(ch: Channel, symbol: &str) -> Reflected {
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
            use tonic_reflection::pb::$version::{ServerReflectionRequest, ServerReflectionResponse};
            let reqs = [
                MessageRequest::ListServices(String::new()),
                MessageRequest::FileContainingSymbol(symbol.into()),
            ]
            .map(|m| ServerReflectionRequest { host: String::new(), message_request: Some(m) });
            let mut client = ServerReflectionClient::new(ch);
            let call = async {
                let mut stream =
                    client.server_reflection_info(futures::stream::iter(reqs)).await?.into_inner();
                let mut out = Vec::new();
                while let Some(r) = stream.message().await? {
                    out.push(r);
                }
                Ok::<Vec<ServerReflectionResponse>, tonic::Status>(out)
            };
            let resps = tokio::time::timeout(WAIT, call)
                .await
                .expect("reflection timed out")
                .expect(concat!("reflection ", stringify!($version)));
            assert_eq!(resps.len(), 2, "one response per request");
            let mut got = Reflected { services: vec![], symbol_files: vec![] };
            for r in resps {
                match r.message_response.expect("a response") {
                    MessageResponse::ListServicesResponse(l) => {
                        got.services = l.service.into_iter().map(|s| s.name).collect()
                    }
                    MessageResponse::FileDescriptorResponse(f) => {
                        got.symbol_files = f.file_descriptor_proto.iter().map(|b| decode(b)).collect()
                    }
                    other => panic!("unexpected reflection response: {other:?}"),
                }
            }
            got
        }
    };
}

reflect_fn!(reflect_v1, v1);
reflect_fn!(reflect_v1alpha, v1alpha);

fn decode(bytes: &[u8]) -> prost_types::FileDescriptorProto {
    prost_types::FileDescriptorProto::decode(bytes).expect("a FileDescriptorProto")
}

fn assert_reflected(r: &Reflected, service: &str, version: &str) {
    for s in [service, "grpc.health.v1.Health"] {
        assert!(r.services.iter().any(|n| n == s), "{version} list_services {:?} lacks {s}", r.services);
    }
    let short = service.rsplit('.').next().unwrap();
    let file = r
        .symbol_files
        .iter()
        .find(|f| f.package() == "fanout.v1")
        .unwrap_or_else(|| panic!("{version}: no fanout.v1 file for {service}"));
    assert_eq!(file.name(), "fanout/v1/fanout.proto");
    assert!(file.service.iter().any(|s| s.name() == short), "{version}: {service} is described");
    assert!(file.message_type.iter().any(|m| m.name() == "RunRequest"), "{version}: messages are described");
}

async fn assert_health_and_reflection(url: &str, service: &str) {
    let ch = channel(url).await;
    let mut health = HealthClient::new(ch.clone());
    assert_eq!(check(&mut health, "").await.unwrap(), ServingStatus::Serving, "{url} overall health");
    assert_eq!(check(&mut health, service).await.unwrap(), ServingStatus::Serving, "{url} {service}");
    let unknown = check(&mut health, "no.such.Service").await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");

    assert_reflected(&reflect_v1(ch.clone(), service).await, service, "v1");
    assert_reflected(&reflect_v1alpha(ch, service).await, service, "v1alpha");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_servers_serve_health_and_reflection() {
    let p = start_processor(Digest::default()).await;
    let pipeline = start_pipeline(std::slice::from_ref(&p.url)).await;
    assert_health_and_reflection(&p.url, PROCESSOR_SERVICE).await;
    assert_health_and_reflection(&pipeline.url(), PIPELINE_SERVICE).await;
}

async fn next(
    w: &mut tonic::Streaming<HealthCheckResponse>,
) -> Result<Option<HealthCheckResponse>, tonic::Status> {
    tokio::time::timeout(WAIT, w.message()).await.expect("health watch timed out")
}

/// Watches `service`'s health, stops the server, and checks the watch turns
/// NOT_SERVING and graceful shutdown completes.
async fn stop_and_watch(running: Running, service: &str) {
    let url = running.url();
    let mut health = HealthClient::new(channel(&url).await);
    let req = HealthCheckRequest { service: service.into() };
    let mut watch = tokio::time::timeout(WAIT, health.watch(req)).await.unwrap().unwrap().into_inner();
    until_serving(&mut watch).await;

    running.stop_token().cancel();
    let status = loop {
        match next(&mut watch).await {
            Ok(Some(s)) if s.status() == ServingStatus::Serving => continue,
            other => break other,
        }
    };
    let status = status.expect("the watch still answers while draining").expect("a status");
    assert_eq!(status.status(), ServingStatus::NotServing, "{service} after stop");
    drop(watch);
    drop(health);
    let stopped = tokio::time::timeout(WAIT, running.wait()).await.expect("graceful shutdown timed out");
    stopped.expect("graceful shutdown returns Ok");

    // Stopped means gone: a new connection is refused.
    let refused = Channel::from_shared(url).unwrap().connect().await;
    assert!(refused.is_err(), "the listener is closed after shutdown");
}

/// Reads `watch` until it says SERVING (a pipeline is ready once its first
/// probe of a processor has answered).
async fn until_serving(w: &mut tonic::Streaming<HealthCheckResponse>) {
    while next(w).await.expect("watch answers").expect("a status").status() != ServingStatus::Serving {}
}

/// The next status on `watch` that differs from `from`.
async fn next_change(w: &mut tonic::Streaming<HealthCheckResponse>, from: ServingStatus) -> ServingStatus {
    loop {
        let s = next(w).await.expect("watch answers").expect("a status").status();
        if s != from {
            return s;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_is_not_serving_while_every_processor_is_down() {
    let p = start_processor(Digest::default()).await;
    let addr = p.running.addr;
    let pipeline = start_pipeline(std::slice::from_ref(&p.url)).await;
    let mut health = HealthClient::new(channel(&pipeline.url()).await);
    let req = HealthCheckRequest { service: PIPELINE_SERVICE.into() };
    let mut watch = tokio::time::timeout(WAIT, health.watch(req)).await.unwrap().unwrap().into_inner();
    until_serving(&mut watch).await;
    // The overall status is the process's liveness: it does not follow the
    // processors, so an outage of theirs never gets pipelines restarted.
    let overall = HealthCheckRequest { service: String::new() };

    p.running.abort();
    assert_eq!(next_change(&mut watch, ServingStatus::Serving).await, ServingStatus::NotServing);
    let alive = health.check(overall).await.unwrap().into_inner();
    assert_eq!(alive.status(), ServingStatus::Serving, "liveness while the processors are down");

    // A processor on the same address brings the pipeline back.
    let cfg = fanout::config::ProcessorConfig { listen: addr.to_string(), ..processor_config() };
    let _back = start_processor_with(&cfg, Digest::default()).await;
    assert_eq!(next_change(&mut watch, ServingStatus::NotServing).await, ServingStatus::Serving);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_processor_turns_health_not_serving_and_shuts_down() {
    let p = start_processor(Digest::default()).await;
    stop_and_watch(p.running, PROCESSOR_SERVICE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_pipeline_turns_health_not_serving_and_shuts_down() {
    let p = start_processor(Digest::default()).await;
    let pipeline = start_pipeline(std::slice::from_ref(&p.url)).await;
    stop_and_watch(pipeline, PIPELINE_SERVICE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_still_going_at_the_drain_timeout_is_cancelled_and_reports_every_record() {
    let script = Arc::new(Script::new());
    let gate = Gate::closed();
    let _open = gate.open_on_drop();
    let p = start_processor(TestWorkload::new("A", &script).gated(&gate)).await;
    let mut cfg = pipeline_config(std::slice::from_ref(&p.url));
    cfg.drain_timeout = std::time::Duration::from_millis(200);
    let pipeline = fanout::server::start_pipeline(&cfg).await.unwrap();
    let mut client = pipeline_client(&pipeline.url()).await;

    const N: usize = 6;
    let mut req = run_request(records(N));
    req.options = Some(RunOptions { max_in_flight: 2, ..Default::default() });
    let mut stream = tokio::time::timeout(WAIT, client.run(req)).await.unwrap().unwrap().into_inner();
    let first = tokio::time::timeout(WAIT, stream.message()).await.unwrap().unwrap().unwrap();
    assert!(matches!(first.event, Some(Event::Started(_))));
    wait_until("the processor to start units", || get(&p.stats.units_started) > 0).await;

    // Stop the pipeline while every record is stuck: after the drain timeout
    // the run is cancelled, and still reports every record.
    let stop = pipeline.stop_token();
    stop.cancel();
    let collect = async {
        let mut records = Vec::new();
        loop {
            let ev = stream.message().await.expect("stream failed").expect("stream ended before report");
            match ev.event.unwrap() {
                Event::Record(r) => records.push(r),
                Event::Report(r) => break (records, r),
                Event::Started(_) => panic!("second started"),
                Event::Progress(_) => {}
            }
        }
    };
    let (records, report) = tokio::time::timeout(WAIT, collect).await.expect("no report after shutdown");
    let got = Collected {
        started: match first.event {
            Some(Event::Started(s)) => s,
            _ => unreachable!(),
        },
        records,
        report,
        progress: Vec::new(),
    };
    got.assert_exactly_once(&ids(N));
    assert_eq!(got.status(), proto::RunStatus::Cancelled);
    for r in &got.records {
        assert_failed(r, Code::Cancelled, &["shutting down"], r.attempts);
    }
    assert_eq!(got.summary().records_failed, N as u64);
    tokio::time::timeout(WAIT, pipeline.wait()).await.expect("shutdown timed out").expect("shutdown Ok");
    wait_until("the processor to see its calls cancelled", || get(&p.stats.records_cancelled) == 2).await;
}
