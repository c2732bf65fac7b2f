//! Distributed tracing through the real binaries: `fanout-processor` and
//! `fanout-pipeline` export spans over OTLP/gRPC to an in-process collector
//! (tests/common/otlp.rs); runs carry a known `traceparent`, and the spans
//! must form one trace: client span → pipeline `run` → `attempt` →
//! processor `process`. Also the trace id in `RunStarted`, in JSON logs and
//! printed by `fanout run`, with no collector at all.

mod common;

use common::otlp::{Collector, Span};
use common::*;
use fanout::proto::{self, RunOptions};
use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The client's trace and span, as a caller would send them.
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Attempt spans a run may make in these tests (`--trace-attempts-per-run`).
const CAP: usize = 5;

fn traced(req: proto::RunRequest, traceparent: &str) -> tonic::Request<proto::RunRequest> {
    let mut req = tonic::Request::new(req);
    req.metadata_mut().insert("traceparent", traceparent.parse().unwrap());
    req
}

fn signal_and_wait(server: &mut Server) {
    let term = Command::new("kill").args(["-TERM", &server.pid()]).status().expect("kill");
    assert!(term.success());
    // The drain (idle: at once) plus the bounded span flush on exit.
    let status = server.wait_exit(Duration::from_secs(12));
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_a_run_form_one_trace_across_the_three_processes() {
    let collector = Collector::start().await;
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")];
    let exe = env!("CARGO_BIN_EXE_fanout-processor");
    let args = ["--listen", "127.0.0.1:0", "--unit-threads", "1"];
    let mut processor = Server::start_with_env(exe, "fanout-processor", &args, &env, "warn", Stdio::null());
    let exe = env!("CARGO_BIN_EXE_fanout-pipeline");
    let url = processor.url();
    let cap = CAP.to_string();
    let args = ["--listen", "127.0.0.1:0", "--processors", &url, "--trace-attempts-per-run", &cap];
    let mut pipeline = Server::start_with_env(exe, "fanout-pipeline", &args, &env, "warn", Stdio::null());
    let mut client = pipeline_client(&pipeline.url()).await;

    // One record per call, under the client's trace.
    let mut req = run_request(records(3));
    req.run_id = "traced".into();
    req.params = Some(rounds(ROUNDS));
    let got = run(&mut client, traced(req, TRACEPARENT)).await.expect("run");
    assert_eq!(got.status(), proto::RunStatus::Succeeded, "{:#?}", got.failures());
    assert_eq!(got.started.trace_id, TRACE, "RunStarted carries the caller's trace id");

    // Batches of 4 (ProcessBatch), same trace.
    let mut req = run_request(records(8));
    req.run_id = "batched".into();
    req.params = Some(rounds(ROUNDS));
    req.options = Some(RunOptions { max_batch_size: 4, max_in_flight: 8, ..Default::default() });
    let got = run(&mut client, traced(req, TRACEPARENT)).await.expect("run");
    assert_eq!(got.status(), proto::RunStatus::Succeeded, "{:#?}", got.failures());

    // More attempts than the cap, no traceparent: a new trace, sampled by
    // the default (parent-based, always on) sampler.
    const MANY: usize = 12;
    let mut req = run_request(records(MANY));
    req.run_id = "capped".into();
    req.params = Some(rounds(ROUNDS));
    let capped = run(&mut client, req).await.expect("run");
    assert_eq!(capped.status(), proto::RunStatus::Succeeded);
    let capped_trace = capped.started.trace_id.clone();
    assert_eq!(capped_trace.len(), 32, "{capped_trace:?}");
    assert_ne!(capped_trace, TRACE);

    // Exiting flushes every buffered span (bounded), so all are in now.
    drop(client);
    signal_and_wait(&mut pipeline);
    signal_and_wait(&mut processor);
    let spans = collector.spans();
    let find = |pred: &dyn Fn(&Span) -> bool| spans.iter().filter(|s| pred(s)).cloned().collect::<Vec<_>>();
    let run_span = |run_id: &str| {
        let runs = find(&|s| s.name == "run" && s.attr("run_id") == run_id);
        assert_eq!(runs.len(), 1, "one run span for {run_id}: {spans:#?}");
        runs[0].clone()
    };

    for (run_id, n) in [("traced", 3), ("batched", 8)] {
        let run = run_span(run_id);
        assert_eq!(run.service, "fanout-pipeline");
        assert_eq!(run.trace_id, TRACE, "{run:?}");
        assert_eq!(run.parent_span_id, CLIENT_SPAN, "the run is the client span's child: {run:?}");
        assert_eq!(run.attr("trace_id"), TRACE, "{run:?}");
        let attempts = find(&|s| s.name == "attempt" && s.parent_span_id == run.span_id);
        assert!(!attempts.is_empty(), "{run_id}: no attempt spans");
        for a in &attempts {
            assert_eq!((a.service.as_str(), a.trace_id.as_str()), ("fanout-pipeline", TRACE), "{a:?}");
        }
        let attempt_ids: HashSet<&str> = attempts.iter().map(|a| a.span_id.as_str()).collect();
        let processed: Vec<Span> =
            find(&|s| s.name == "process" && s.attr("run_id") == run_id && s.service == "fanout-processor");
        let mut ids: Vec<String> = processed.iter().map(|s| s.attr("record_id").to_owned()).collect();
        ids.sort();
        assert_eq!(ids, common::ids(n), "{run_id}: one processor span per record");
        for p in &processed {
            assert_eq!(p.trace_id, TRACE, "{p:?}");
            assert!(attempt_ids.contains(p.parent_span_id.as_str()), "{p:?} is not a child of an attempt");
        }
        if run_id == "batched" {
            assert!(
                attempts.iter().any(|a| a.attr("records").parse::<usize>().unwrap_or(0) > 1),
                "batched records share an attempt: {attempts:#?}"
            );
        }
    }

    // The cap: CAP attempt spans of the MANY attempts, the rest counted,
    // and no processor span for an untraced attempt.
    let run = run_span("capped");
    assert_eq!(run.trace_id, capped_trace);
    assert_eq!(run.parent_span_id, "", "a run without a caller's trace is a root");
    let attempts = find(&|s| s.name == "attempt" && s.trace_id == capped_trace);
    assert_eq!(attempts.len(), CAP, "{attempts:#?}");
    assert_eq!(run.attr("attempts_untraced"), (MANY - CAP).to_string(), "{run:?}");
    let processed = find(&|s| s.name == "process" && s.trace_id == capped_trace);
    assert_eq!(processed.len(), CAP, "{processed:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_run_sends_traceparent_and_prints_the_trace_id() {
    let collector = Collector::start().await;
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")];
    let exe = env!("CARGO_BIN_EXE_fanout-processor");
    let processor =
        Server::start(exe, "fanout-processor", &["--listen", "127.0.0.1:0", "--unit-threads", "1"]);
    let exe = env!("CARGO_BIN_EXE_fanout-pipeline");
    let url = processor.url();
    let args = ["--listen", "127.0.0.1:0", "--processors", &url];
    let mut pipeline = Server::start_with_env(exe, "fanout-pipeline", &args, &env, "warn", Stdio::null());
    let input: String = ids(4).iter().map(|id| format!("{{\"id\": \"{id}\"}}\n")).collect();
    let fanout = |env: &[(&str, &str)]| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fanout"))
            .args(["run", "--quiet", "--params", "{\"rounds\": 10}", "--pipeline", &pipeline.url()])
            .env_remove("TRACEPARENT")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the client");
        use std::io::Write;
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "fanout run: {stderr}");
        let line = stderr.lines().find_map(|l| l.strip_prefix("trace id: ")).map(str::to_owned);
        line.unwrap_or_else(|| panic!("no `trace id:` line in {stderr}"))
    };
    // TRACEPARENT (RunStream): the run joins that trace.
    assert_eq!(fanout(&[("TRACEPARENT", TRACEPARENT)]), TRACE);
    // Exporting itself: a client root span, parent of the pipeline's run.
    let own = fanout(&[("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.url), ("OTEL_BSP_SCHEDULE_DELAY", "100")]);
    assert_ne!(own, TRACE);
    signal_and_wait(&mut pipeline);
    let spans = collector.spans();
    let runs: Vec<&Span> = spans.iter().filter(|s| s.name == "run").collect();
    let joined = runs.iter().find(|s| s.trace_id == TRACE).expect("the TRACEPARENT run's span");
    assert_eq!(joined.parent_span_id, CLIENT_SPAN);
    let client =
        spans.iter().find(|s| s.service == "fanout" && s.trace_id == own).expect("the client's span");
    assert_eq!(client.parent_span_id, "", "the client's span is the root");
    let run = runs.iter().find(|s| s.trace_id == own).expect("the run of the exporting client");
    assert_eq!(run.parent_span_id, client.span_id, "the run is the client span's child");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_trace_id_without_any_collector() {
    let dir = std::env::temp_dir().join(format!("fanout-trace-logs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (proc_log, pipe_log) = (dir.join("processor.log"), dir.join("pipeline.log"));
    let file = |p: &std::path::Path| Stdio::from(std::fs::File::create(p).unwrap());
    let json = ["--log-format", "json"];
    let none = [("OTEL_EXPORTER_OTLP_ENDPOINT", "")];
    let exe = env!("CARGO_BIN_EXE_fanout-processor");
    let args = [&["--listen", "127.0.0.1:0"][..], &json].concat();
    let mut p = Server::start_with_env(exe, "fanout-processor", &args, &none, "debug", file(&proc_log));
    let exe = env!("CARGO_BIN_EXE_fanout-pipeline");
    let url = p.url();
    let args = [&["--listen", "127.0.0.1:0", "--processors", &url][..], &json].concat();
    let mut pipe =
        Server::start_with_env(exe, "fanout-pipeline", &args, &none, "info,fanout=debug", file(&pipe_log));
    let mut client = pipeline_client(&pipe.url()).await;
    let mut req = run_request(records(3));
    req.run_id = "with-parent".into();
    let got = run(&mut client, traced(req, TRACEPARENT)).await.expect("run");
    assert_eq!(got.started.trace_id, TRACE, "the caller's trace id, with no tracing configured");
    // rec-000, rec-001, and one record that fails (digest: no units).
    let mut recs = records(2);
    recs.push(record_with("bad-0", serde_json::json!({"units": 0})));
    let mut req = run_request(recs);
    req.run_id = "without".into();
    let fresh = run(&mut client, req).await.expect("run").started.trace_id;
    assert!(fresh.len() == 32 && fresh != TRACE && fresh != "0".repeat(32), "{fresh:?}");
    drop(client);
    for s in [&mut pipe, &mut p] {
        signal_and_wait(s);
    }
    let pipe_lines = json_lines(&pipe_log);
    for (run_id, trace) in [("with-parent", TRACE), ("without", fresh.as_str())] {
        let finished = pipe_lines
            .iter()
            .find(|l| l["message"] == "run finished" && in_span(l, "run_id", run_id))
            .unwrap_or_else(|| panic!("no `run finished` line for {run_id}"));
        assert!(in_span(finished, "trace_id", trace), "{finished}");
    }
    // A record's own events carry its id as a plain string, as the
    // processor's spans do, so the two logs join on it.
    let failed = pipe_lines
        .iter()
        .find(|l| l["message"] == "record failed")
        .unwrap_or_else(|| panic!("no `record failed` line in {}", pipe_log.display()));
    assert_eq!(failed["record_id"], "bad-0", "{failed}");
    // The processor learns the trace id from the (unsampled) traceparent,
    // which a run sends on when it came with one; a run in no trace at all
    // sends none (nothing per call when tracing is off), and the processor's
    // lines still carry the run id.
    let proc_lines = json_lines(&proc_log);
    for (run_id, trace) in [("with-parent", Some(TRACE)), ("without", None)] {
        for id in ids(2) {
            let done = proc_lines
                .iter()
                .find(|l| {
                    l["message"] == "record done"
                        && in_span(l, "record_id", &id)
                        && in_span(l, "run_id", run_id)
                })
                .unwrap_or_else(|| panic!("no `record done` line for {run_id}/{id}"));
            match trace {
                Some(trace) => assert!(in_span(done, "trace_id", trace), "{done}"),
                None => assert!(!done.to_string().contains(fresh.as_str()), "{done}"),
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
