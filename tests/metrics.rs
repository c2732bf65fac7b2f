//! Prometheus metrics: both servers with `--metrics-listen` on port 0, a run
//! with failures and retries, then `/metrics` scraped over HTTP and parsed;
//! every count must match the run's report exactly.

mod common;

use common::*;
use fanout::proto;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;

/// One sample of the text format: name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of a scrape (a small parser of the Prometheus text format,
/// version 0.0.4: comments skipped, labels with `\\`, `\"` and `\n`
/// escapes).
#[derive(Debug)]
struct Scrape {
    samples: Vec<Sample>,
    text: String,
}

impl Scrape {
    fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, rest) = match line.find(['{', ' ']) {
                Some(i) => line.split_at(i),
                None => panic!("sample line without a value: {line:?}"),
            };
            let mut labels = BTreeMap::new();
            let rest = if let Some(body) = rest.strip_prefix('{') {
                let mut chars = body.char_indices().peekable();
                let end = loop {
                    // key
                    let (start, c) = chars.next().expect("label set closed");
                    if c == '}' {
                        break start + 1;
                    }
                    let c = if c == ',' { chars.next().expect("label after comma").1 } else { c };
                    if c == '}' {
                        break start + 2;
                    }
                    let mut key = String::from(c);
                    for (_, c) in chars.by_ref() {
                        if c == '=' {
                            break;
                        }
                        key.push(c);
                    }
                    assert_eq!(chars.next().map(|x| x.1), Some('"'), "label value quoted in {line:?}");
                    let mut value = String::new();
                    loop {
                        match chars.next().expect("label value closed").1 {
                            '"' => break,
                            '\\' => match chars.next().expect("escape").1 {
                                'n' => value.push('\n'),
                                c => value.push(c),
                            },
                            c => value.push(c),
                        }
                    }
                    assert!(labels.insert(key, value).is_none(), "label twice in {line:?}");
                };
                &body[end..]
            } else {
                rest
            };
            let value = rest.trim().split(' ').next().expect("a value");
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or_else(|e| panic!("value {v:?} in {line:?}: {e}")),
            };
            samples.push(Sample { name: name.to_owned(), labels, value });
        }
        Self { samples, text: text.to_owned() }
    }

    /// The sum of the samples named `name` whose labels include `want`.
    fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name && want.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// Like [`Scrape::sum`], as a count.
    fn count(&self, name: &str, want: &[(&str, &str)]) -> u64 {
        let v = self.sum(name, want);
        assert!(v >= 0.0 && v.fract() == 0.0, "{name}{want:?} = {v} is not a count");
        v as u64
    }

    fn names(&self) -> std::collections::BTreeSet<&str> {
        self.samples.iter().map(|s| s.name.as_str()).collect()
    }
}

/// One HTTP/1.1 request to `addr`; the status code and body.
fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics listener");
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read the response");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header end in {raw:?}"));
    let code =
        head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("status in {head:?}"));
    if code == 200 {
        assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    }
    (code, body.to_owned())
}

fn scrape(addr: SocketAddr) -> Scrape {
    let (code, body) = http(addr, "GET", "/metrics");
    assert_eq!(code, 200, "{body}");
    Scrape::parse(&body)
}

fn metrics_addr(running: &fanout::server::Running) -> SocketAddr {
    running.metrics_addr.expect("metrics on")
}

/// The expected attempts by code name from a run's results: each record's
/// final code once, and, before it, one `UNAVAILABLE` per retry (only
/// transient failures are retried here).
fn expected_attempts(records: &[proto::RecordResult]) -> BTreeMap<String, u64> {
    let mut by_code = BTreeMap::new();
    for r in records {
        let last = match &r.error {
            None => "OK".to_owned(),
            Some(e) => e.code_name.clone(),
        };
        *by_code.entry(last).or_insert(0) += 1;
        if r.attempts > 1 {
            *by_code.entry("UNAVAILABLE".to_owned()).or_insert(0) += u64::from(r.attempts - 1);
        }
    }
    by_code
}

const CODES: [&str; 5] = ["OK", "UNAVAILABLE", "FAILED_PRECONDITION", "CANCELLED", "INTERNAL"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scraped_counts_match_the_run_report_exactly() {
    let script =
        Arc::new(Script::new().transient("rec-001", 1).transient("rec-002", 10).permanent("rec-003"));
    let mut pcfg = processor_config();
    pcfg.metrics.metrics_listen = Some("127.0.0.1:0".into());
    let p1 = start_processor_with(&pcfg, TestWorkload::new("p1", &script)).await;
    let p2 = start_processor_with(&pcfg, TestWorkload::new("p2", &script)).await;
    let mut cfg = pipeline_config(&[p1.url.clone(), p2.url.clone()]);
    cfg.metrics.metrics_listen = Some("127.0.0.1:0".into());
    let pipeline = fanout::server::start_pipeline(&cfg).await.expect("start pipeline");
    let (pm, m1, m2) = (metrics_addr(&pipeline), metrics_addr(&p1.running), metrics_addr(&p2.running));

    // Other paths and methods.
    assert_eq!(http(pm, "GET", "/").0, 404);
    assert_eq!(http(pm, "GET", "/metricsx").0, 404);
    assert_eq!(http(pm, "POST", "/metrics").0, 405);
    assert_eq!(http(m1, "DELETE", "/metrics").0, 405);

    let n = 30;
    let options = proto::RunOptions { max_attempts: 3, max_batch_size: 1, ..Default::default() };
    let mut client = pipeline_client(&pipeline.url()).await;
    let run1 = run(&mut client, proto::RunRequest { options: Some(options), ..run_request(records(n)) })
        .await
        .expect("run");
    run1.assert_exactly_once(&ids(n));
    let failed: Vec<_> = run1.records.iter().filter(|r| r.error.is_some()).collect();
    assert_eq!(failed.len(), 2, "rec-002 (retries used up) and rec-003 (permanent): {:?}", run1.failures());
    assert_eq!(run1.record("rec-001").attempts, 2);
    assert_eq!(run1.record("rec-002").attempts, 3);

    let pipe = scrape(pm);
    let (s1, s2) = (scrape(m1), scrape(m2));
    let s = run1.summary();
    // Records and runs.
    assert_eq!(
        pipe.count("fanout_records_total", &[("status", "succeeded")]),
        s.records_succeeded,
        "{}",
        pipe.text
    );
    assert_eq!(pipe.count("fanout_records_total", &[("status", "failed")]), s.records_failed);
    assert_eq!(pipe.count("fanout_record_duration_seconds_count", &[]), n as u64);
    assert_eq!(pipe.count("fanout_record_duration_seconds_bucket", &[("le", "+Inf")]), n as u64);
    let status = run1.status().as_str_name().trim_start_matches("RUN_STATUS_").to_owned();
    assert_eq!(pipe.count("fanout_runs_total", &[("status", &status)]), 1, "{}", pipe.text);
    assert_eq!(pipe.count("fanout_runs_total", &[]), 1);
    assert_eq!(pipe.count("fanout_runs_active", &[]), 0);

    // Attempts: by code, summed over the processors, as the results say.
    let attempts: u64 = run1.records.iter().map(|r| u64::from(r.attempts)).sum();
    assert_eq!(pipe.count("fanout_record_attempts_total", &[]), attempts, "{}", pipe.text);
    let want = expected_attempts(&run1.records);
    for code in CODES {
        let got = pipe.count("fanout_record_attempts_total", &[("grpc_code", code)]);
        assert_eq!(got, want.get(code).copied().unwrap_or(0), "attempts with {code}: {}", pipe.text);
    }
    assert_eq!(pipe.count("fanout_record_attempt_duration_seconds_count", &[]), attempts);
    for p in [&p1, &p2] {
        let on_p = pipe.count("fanout_record_attempts_total", &[("processor", &p.addr)]);
        let landed = run1.records.iter().filter(|r| r.processor == p.addr).count() as u64;
        assert!(on_p >= landed, "{} had {on_p} attempts, fewer than the {landed} results it gave", p.addr);
        assert_eq!(pipe.count("fanout_processor_up", &[("processor", &p.addr)]), 1);
        assert_eq!(pipe.count("fanout_processor_in_flight", &[("processor", &p.addr)]), 0);
    }

    // gRPC on the pipeline: one Run, handled OK.
    let run_labels =
        [("grpc_service", "fanout.v1.Pipeline"), ("grpc_method", "Run"), ("grpc_type", "server_stream")];
    assert_eq!(pipe.count("grpc_server_started_total", &run_labels), 1, "{}", pipe.text);
    let mut ok = run_labels.to_vec();
    ok.push(("grpc_code", "OK"));
    assert_eq!(pipe.count("grpc_server_handled_total", &ok), 1);
    assert_eq!(pipe.count("grpc_server_handling_seconds_count", &run_labels), 1);
    assert_eq!(pipe.count("grpc_server_started_total", &[("grpc_method", "RunStream")]), 0);

    // gRPC on the processors: one ProcessRecord per attempt, each handled
    // with the attempt's code.
    let pr = [("grpc_method", "ProcessRecord"), ("grpc_type", "unary")];
    let started = s1.count("grpc_server_started_total", &pr) + s2.count("grpc_server_started_total", &pr);
    assert_eq!(started, attempts, "{}\n{}", s1.text, s2.text);
    for code in CODES {
        let mut l = pr.to_vec();
        l.push(("grpc_code", code));
        let got = s1.count("grpc_server_handled_total", &l) + s2.count("grpc_server_handled_total", &l);
        assert_eq!(got, want.get(code).copied().unwrap_or(0), "ProcessRecord handled with {code}");
    }
    let units = get(&p1.stats.units_finished) + get(&p2.stats.units_finished);
    assert_eq!(s1.count("fanout_units_total", &[]) + s2.count("fanout_units_total", &[]), units);
    assert!(units > 0);
    assert_eq!(
        s1.count("fanout_unit_duration_seconds_count", &[])
            + s2.count("fanout_unit_duration_seconds_count", &[]),
        units
    );
    assert_eq!(s1.count("fanout_unit_threads", &[]), 2);
    for s in [&s1, &s2] {
        assert_eq!(s.count("fanout_unit_threads_busy", &[]), 0);
        assert_eq!(s.count("fanout_unit_queue_depth", &[]), 0);
        // A processor serves no Pipeline methods: none are listed.
        assert_eq!(s.count("grpc_server_started_total", &[("grpc_service", "fanout.v1.Pipeline")]), 0);
        assert!(s.names().contains("grpc_server_handling_seconds_bucket"));
    }

    // More work, in batches this time: the counts grow by exactly that.
    let m = 12;
    let options = proto::RunOptions { max_batch_size: 4, ..Default::default() };
    let recs: Vec<_> = (0..m).map(|i| record(&format!("more-{i}"))).collect();
    let run2 = run(&mut client, proto::RunRequest { options: Some(options), ..run_request(recs) })
        .await
        .expect("run");
    assert_eq!(run2.summary().records_succeeded, m as u64, "{:?}", run2.failures());
    let pipe2 = scrape(pm);
    assert_eq!(
        pipe2.count("fanout_records_total", &[("status", "succeeded")]),
        s.records_succeeded + m as u64
    );
    assert_eq!(
        pipe2.count("fanout_runs_total", &[("status", "SUCCEEDED")]),
        pipe.count("fanout_runs_total", &[("status", "SUCCEEDED")]) + 1
    );
    assert_eq!(pipe2.count("grpc_server_started_total", &run_labels), 2);
    assert_eq!(pipe2.count("fanout_record_attempts_total", &[("grpc_code", "OK")]), want["OK"] + m as u64);
    let (b1, b2) = (scrape(m1), scrape(m2));
    let batches = b1.count("grpc_server_started_total", &[("grpc_method", "ProcessBatch")])
        + b2.count("grpc_server_started_total", &[("grpc_method", "ProcessBatch")]);
    let singles = b1.count("grpc_server_started_total", &pr) + b2.count("grpc_server_started_total", &pr);
    assert!(batches >= 1, "batched run used ProcessBatch: {}", b1.text);
    // Every record of the second run went in a batch or alone.
    assert!(batches + (singles - started) >= (m as u64).div_ceil(4));
    assert!(batches + (singles - started) <= m as u64);
    let handled_batches = b1
        .count("grpc_server_handled_total", &[("grpc_method", "ProcessBatch"), ("grpc_code", "OK")])
        + b2.count("grpc_server_handled_total", &[("grpc_method", "ProcessBatch"), ("grpc_code", "OK")]);
    assert_eq!(handled_batches, batches);

    pipeline.shutdown().await.unwrap();
    // The listener goes with its server.
    assert!(TcpStream::connect(pm).is_err() || http_fails(pm), "metrics still served after shutdown");
}

/// Whether a request to `addr` gets no answer (connection reset or closed).
fn http_fails(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else { return true };
    s.set_read_timeout(Some(WAIT)).unwrap();
    let _ = write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut buf = [0u8; 16];
    !matches!(s.read(&mut buf), Ok(n) if n > 0)
}

#[tokio::test]
async fn no_metrics_listen_means_no_listener() {
    let p = start_processor(fanout::workload::Digest::default()).await;
    assert_eq!(p.running.metrics_addr, None);
    let pipeline = start_pipeline(std::slice::from_ref(&p.url)).await;
    assert_eq!(pipeline.metrics_addr, None);
}

#[tokio::test]
async fn a_taken_metrics_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = processor_config();
    cfg.metrics.metrics_listen = Some(taken.local_addr().unwrap().to_string());
    let err = fanout::server::start_processor(&cfg, fanout::workload::Digest::default()).await.unwrap_err();
    assert!(err.to_string().contains("--metrics-listen"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_methods_share_one_series_and_a_dropped_stream_is_cancelled() {
    let mut cfg = processor_config();
    cfg.metrics.metrics_listen = Some("127.0.0.1:0".into());
    let p = start_processor_with(&cfg, fanout::workload::Digest::default()).await;
    let ch = tonic::transport::Channel::from_shared(p.url.clone()).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    for path in ["/no.Such/Method", "/fanout.v1.Pipeline/Run", "/x/y"] {
        grpc.ready().await.unwrap();
        let status = grpc
            .unary::<(), (), _>(
                tonic::Request::new(()),
                tonic::codegen::http::uri::PathAndQuery::from_static(path),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unimplemented, "{path}");
    }
    // A health Watch dropped by its client counts as CANCELLED.
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().expect("the first status");
    drop(watch);
    let addr = metrics_addr(&p.running);
    let watch_labels = [("grpc_method", "Watch"), ("grpc_type", "server_stream"), ("grpc_code", "CANCELLED")];
    let mut cancelled = 0;
    wait_until("the dropped Watch to be counted", || {
        cancelled = scrape(addr).count("grpc_server_handled_total", &watch_labels);
        cancelled == 1
    })
    .await;
    let s = scrape(addr);
    let unknown = [("grpc_service", "unknown"), ("grpc_method", "unknown")];
    assert_eq!(s.count("grpc_server_started_total", &unknown), 3, "{}", s.text);
    let mut l = unknown.to_vec();
    l.push(("grpc_code", "UNIMPLEMENTED"));
    assert_eq!(s.count("grpc_server_handled_total", &l), 3);
    let services: std::collections::BTreeSet<_> = s
        .samples
        .iter()
        .filter(|x| x.name == "grpc_server_started_total")
        .map(|x| x.labels["grpc_service"].clone())
        .collect();
    assert!(!services.iter().any(|v| v.contains("no.Such") || v == "x"), "{services:?}");
}

/// A processor that refuses its first `refusals` records as "not started"
/// (as a full processor shared with other pipelines does), then fails every
/// record for good.
struct Refuser {
    calls: std::sync::atomic::AtomicU32,
    refusals: u32,
}

#[tonic::async_trait]
impl proto::record_processor_server::RecordProcessor for Refuser {
    async fn process_record(
        &self,
        _: tonic::Request<proto::ProcessRecordRequest>,
    ) -> Result<tonic::Response<proto::ProcessRecordResponse>, tonic::Status> {
        let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if n < self.refusals {
            let mut status = tonic::Status::resource_exhausted("full: not started");
            status.metadata_mut().insert(fanout::processor::NOT_STARTED_KEY, "true".parse().unwrap());
            return Err(status);
        }
        Err(tonic::Status::failed_precondition("this record never works"))
    }

    async fn process_batch(
        &self,
        _: tonic::Request<proto::ProcessBatchRequest>,
    ) -> Result<tonic::Response<proto::ProcessBatchResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("no batches"))
    }

    async fn describe(
        &self,
        _: tonic::Request<proto::DescribeRequest>,
    ) -> Result<tonic::Response<proto::DescribeResponse>, tonic::Status> {
        Ok(tonic::Response::new(proto::DescribeResponse { slots: 1, unit_threads: 1, ..Default::default() }))
    }
}

/// Refusals past the "not started" limit count as one attempt; a real
/// failure right after that many refusals is one attempt too, not two (in
/// the record's `attempts`, its attempt log and `fanout_record_attempts_total`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_after_many_refusals_is_one_attempt() {
    // The pipeline's limit of refusals in a row (run.rs MAX_NOT_STARTED).
    const REFUSALS: u32 = 20;
    let refuser = Arc::new(Refuser { calls: Default::default(), refusals: REFUSALS });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(
            fanout::pipeline::balancer::PROCESSOR_SERVICE,
            tonic_health::ServingStatus::Serving,
        )
        .await;
    let service = proto::record_processor_server::RecordProcessorServer::from_arc(refuser.clone());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut cfg = pipeline_config(&[format!("http://{addr}")]);
    cfg.metrics.metrics_listen = Some("127.0.0.1:0".into());
    let pipeline = fanout::server::start_pipeline(&cfg).await.expect("start pipeline");
    let mut client = pipeline_client(&pipeline.url()).await;
    let options = proto::RunOptions { max_attempts: 3, attempt_log: true, ..Default::default() };
    let got = run(&mut client, proto::RunRequest { options: Some(options), ..run_request(records(1)) })
        .await
        .expect("run");
    let r = &got.records[0];
    assert_eq!(r.error.as_ref().map(|e| e.code_name.as_str()), Some("FAILED_PRECONDITION"), "{r:?}");
    assert_eq!(refuser.calls.load(std::sync::atomic::Ordering::SeqCst), REFUSALS + 1);
    assert_eq!(r.attempts, 1, "one real attempt after {REFUSALS} refusals: {r:?}");
    assert_eq!(r.attempt_log.len(), 1, "{:?}", r.attempt_log);
    let pipe = scrape(metrics_addr(&pipeline));
    assert_eq!(pipe.count("fanout_record_attempts_total", &[]), 1, "{}", pipe.text);
    assert_eq!(pipe.count("fanout_record_attempts_total", &[("grpc_code", "FAILED_PRECONDITION")]), 1);
    server.abort();
}

/// Records a stopped run never dispatched are counted (failed) but have no
/// duration "from first dispatch": they must not pile up as zeros in the
/// histogram.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_never_dispatched_have_no_duration() {
    let script = Arc::new(Script::new().permanent("rec-001").permanent("rec-003"));
    let p = start_processor(TestWorkload::new("A", &script)).await;
    let mut cfg = pipeline_config(std::slice::from_ref(&p.url));
    cfg.metrics.metrics_listen = Some("127.0.0.1:0".into());
    let pipeline = fanout::server::start_pipeline(&cfg).await.expect("start pipeline");
    let mut client = pipeline_client(&pipeline.url()).await;
    const N: usize = 10;
    let options = proto::RunOptions { tolerated_failures: Some(1), max_in_flight: 1, ..Default::default() };
    let got = run(&mut client, proto::RunRequest { options: Some(options), ..run_request(records(N)) })
        .await
        .expect("run");
    assert_eq!(got.status(), proto::RunStatus::Failed);
    // One at a time: rec-000..rec-003 tried, the second failure (rec-003)
    // stops the run, the other six are cancelled without an attempt.
    let dispatched = got.records.iter().filter(|r| r.attempts > 0).count() as u64;
    assert_eq!(dispatched, 4, "{:?}", got.failures());
    let pipe = scrape(metrics_addr(&pipeline));
    assert_eq!(pipe.count("fanout_records_total", &[]), N as u64, "{}", pipe.text);
    assert_eq!(pipe.count("fanout_records_total", &[("status", "failed")]), N as u64 - 2);
    assert_eq!(pipe.count("fanout_record_duration_seconds_count", &[]), dispatched, "{}", pipe.text);
    assert_eq!(pipe.count("fanout_runs_total", &[("status", "FAILED")]), 1);
}

#[test]
fn the_demo_prints_what_its_servers_counted() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(["demo", "--records", "30", "--rounds", "1", "--processors", "2", "--metrics", "--quiet"])
        .output()
        .expect("fanout demo runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // What the pipeline counted, then each processor's calls: together the
    // 30 records, each on one of the two.
    assert!(stderr.contains("fanout_records_total{status=\"succeeded\"} 30"), "{stderr}");
    let calls: u64 = stderr
        .lines()
        .filter(|l| l.contains("grpc_server_handled_total") && l.contains("grpc_method=\"ProcessRecord\""))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
        .sum();
    assert_eq!(calls, 30, "{stderr}");
    assert_eq!(stderr.matches("processor metrics, http://127.0.0.1:").count(), 2, "{stderr}");
    assert!(!stderr.contains("_bucket{"), "buckets are left out");
}
