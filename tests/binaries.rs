//! The real binaries: two `fanout-processor`s and a `fanout-pipeline` on
//! ephemeral ports, a processor SIGKILLed or SIGSTOPped mid-run, and SIGTERM
//! draining the pipeline.

mod common;

use common::*;
use fanout::proto::run_event::Event;
use fanout::proto::{self, RunOptions};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn processor() -> Server {
    let exe = env!("CARGO_BIN_EXE_fanout-processor");
    Server::start(exe, "fanout-processor", &["--listen", "127.0.0.1:0", "--unit-threads", "1"])
}

fn pipeline(processors: &[String], drain: &str) -> Server {
    let exe = env!("CARGO_BIN_EXE_fanout-pipeline");
    let list = processors.join(",");
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--processors",
        &list,
        "--backoff-base",
        "10ms",
        "--drain-timeout",
        drain,
    ];
    Server::start(exe, "fanout-pipeline", &args)
}

/// Runs `req`, calls `mid_run` once its third result is in, and collects
/// the whole stream (checked for shape, as [`run`] does).
async fn run_interrupted(
    client: &mut fanout::proto::pipeline_client::PipelineClient<tonic::transport::Channel>,
    req: proto::RunRequest,
    mid_run: impl FnOnce(),
) -> Collected {
    let mut stream = client.run(req).await.expect("Run").into_inner();
    let first = stream.message().await.unwrap().expect("started");
    let Some(Event::Started(started)) = first.event else { panic!("first event: {first:?}") };
    let (mut records, mut progress) = (Vec::new(), Vec::new());
    let mut mid_run = Some(mid_run);
    let report = loop {
        match stream.message().await.expect("stream").expect("report").event.unwrap() {
            Event::Record(r) => records.push(r),
            Event::Report(r) => break r,
            Event::Started(_) => panic!("second started"),
            Event::Progress(p) => progress.push(p),
        }
        if records.len() == 3
            && let Some(act) = mid_run.take()
        {
            act();
        }
    };
    assert!(mid_run.is_none(), "the run ended before the interruption");
    Collected { started, records, report, progress }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_killed_mid_run_loses_no_record() {
    let a = processor();
    let mut b = processor();
    let (a_url, b_url) = (a.url(), b.url());
    // Results name the instance by its address.
    let (a_addr, b_addr) = (a.addr.to_string(), b.addr.to_string());
    let pipeline = pipeline(&[a_url.clone(), b_url.clone()], "5s");
    let mut client = pipeline_client(&pipeline.url()).await;

    // Enough work that the run is still going when B is killed.
    const N: usize = 40;
    const ROUNDS: u64 = 100;
    let ids = ids(N);
    let mut req = run_request(records(N));
    req.params = Some(rounds(ROUNDS));
    req.options = Some(RunOptions { max_in_flight: 8, ..Default::default() });
    // Mid-run: after a few results, SIGKILL processor B.
    let kill_b = || b.child.kill().expect("SIGKILL processor B");
    let collect = run_interrupted(&mut client, req, kill_b);
    let got = tokio::time::timeout(WAIT, collect).await.expect("run timed out");
    b.wait_exit(WAIT);

    got.assert_exactly_once(&ids);
    assert_eq!(
        got.status(),
        proto::RunStatus::Succeeded,
        "every record succeeds despite the crash: {:#?}",
        got.failures()
    );
    for (i, r) in got.report.results.iter().enumerate() {
        assert_output(r, &expected(&ids[i], None, ROUNDS));
        assert!(r.processor == a_addr || r.processor == b_addr, "{}: {}", r.record_id, r.processor);
        if r.attempts >= 2 {
            assert_eq!(r.processor, a_addr, "{}: retried onto the surviving processor", r.record_id);
        }
    }
    assert!(got.summary().retries >= 1, "the records in flight on B were retried");

    // The pipeline keeps working on the survivor.
    let got = run_ok(&mut client, run_request(records(5))).await;
    assert_eq!(got.status(), proto::RunStatus::Succeeded, "{:#?}", got.failures());
    assert!(got.records.iter().all(|r| r.processor == a_addr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_frozen_mid_run_loses_no_record() {
    let a = processor();
    let b = processor();
    let (a_url, b_url) = (a.url(), b.url());
    // Results name the instance by its address.
    let (a_addr, b_addr) = (a.addr.to_string(), b.addr.to_string());
    let pipeline = pipeline(&[a_url.clone(), b_url.clone()], "5s");
    let mut client = pipeline_client(&pipeline.url()).await;

    const N: usize = 40;
    let ids = ids(N);
    let mut req = run_request(records(N));
    req.params = Some(rounds(100));
    // The default record_timeout (60 s): the frozen instance must be found
    // lost by its failed health probe, not by the attempts' timeouts.
    req.options = Some(RunOptions { max_in_flight: 8, ..Default::default() });
    let started = Instant::now();
    let signal = |sig: &str, server: &Server| {
        let ok = Command::new("kill").args([sig, &server.pid()]).status().expect("kill").success();
        assert!(ok, "kill {sig} {}", server.pid());
    };
    // Mid-run: SIGSTOP processor B, which then neither answers nor closes
    // its connections.
    let collect = run_interrupted(&mut client, req, || signal("-STOP", &b));
    let got = tokio::time::timeout(WAIT, collect).await.expect("run timed out");
    // Found by its failed probe: a probe interval (2 s) plus the probe's
    // own timeout (2 s) after the stop, with room for the run around it,
    // and far below the 60 s record timeout that would otherwise decide.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the lost host was found in {:?}",
        started.elapsed()
    );
    got.assert_exactly_once(&ids);
    assert_eq!(got.status(), proto::RunStatus::Succeeded, "every record succeeds: {:#?}", got.failures());
    for r in &got.records {
        if r.attempts >= 2 {
            assert_eq!(r.processor, a_addr, "{}: retried onto the live processor", r.record_id);
        }
    }
    // The pipeline keeps working, on A, while B stays frozen.
    let got = run_ok(&mut client, run_request(records(5))).await;
    assert_eq!(got.status(), proto::RunStatus::Succeeded, "{:#?}", got.failures());
    assert!(got.records.iter().all(|r| r.processor == a_addr), "every record ends on the live instance");
    signal("-CONT", &b);
    drop((b_url, b_addr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    let mut a = processor();
    let mut pipeline = pipeline(&[a.url()], "2s");
    let mut client = pipeline_client(&pipeline.url()).await;
    let got = run_ok(&mut client, run_request(records(5))).await;
    got.assert_exactly_once(&ids(5));
    assert_eq!(got.status(), proto::RunStatus::Succeeded, "{:#?}", got.failures());

    for server in [&mut pipeline, &mut a] {
        let term = Command::new("kill").args(["-TERM", &server.pid()]).status().expect("run kill");
        assert!(term.success(), "kill -TERM {}", server.pid());
        // Drain timeout 2 s (10 s for the processor) plus margin; an idle
        // server exits at once.
        let status = server.wait_exit(Duration::from_secs(14));
        assert_eq!(status.code(), Some(0), "exit status after SIGTERM: {status:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_run_writes_each_result_to_an_ndjson_file_as_it_arrives() {
    let a = processor();
    let pipeline = pipeline(&[a.url()], "2s");
    let dir = std::env::temp_dir().join(format!("fanout-output-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (input, output) = (dir.join("in.ndjson"), dir.join("out.ndjson"));
    let lines: Vec<String> = ids(25).iter().map(|id| format!("{{\"id\": \"{id}\"}}")).collect();
    std::fs::write(&input, lines.join("\n")).unwrap();

    let exe = env!("CARGO_BIN_EXE_fanout");
    let run = Command::new(exe)
        .args(["run", "--quiet", "--params", "{\"rounds\": 10}", "--output"])
        .arg(&output)
        .args(["--pipeline", &pipeline.url()])
        .arg(&input)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run the client");
    assert!(run.status.success(), "fanout run: {}", String::from_utf8_lossy(&run.stderr));

    let written = std::fs::read_to_string(&output).unwrap();
    let mut seen: Vec<String> = written
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("one JSON object per line");
            assert_eq!(v["status"], "RECORD_STATUS_SUCCEEDED", "{l}");
            v["record_id"].as_str().unwrap().to_owned()
        })
        .collect();
    seen.sort();
    assert_eq!(seen, ids(25), "every record's result, once");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_run_and_record_ids_as_fields() {
    let dir = std::env::temp_dir().join(format!("fanout-json-logs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (proc_log, pipe_log) = (dir.join("processor.log"), dir.join("pipeline.log"));
    let file = |p: &std::path::Path| Stdio::from(std::fs::File::create(p).unwrap());
    let json = ["--log-format", "json"];
    let exe = env!("CARGO_BIN_EXE_fanout-processor");
    let args = [&["--listen", "127.0.0.1:0"][..], &json].concat();
    let mut p = Server::start_logging(exe, "fanout-processor", &args, "debug", file(&proc_log));
    let exe = env!("CARGO_BIN_EXE_fanout-pipeline");
    let url = p.url();
    let args = [&["--listen", "127.0.0.1:0", "--processors", &url][..], &json].concat();
    let mut pipe = Server::start_logging(exe, "fanout-pipeline", &args, "info", file(&pipe_log));
    let mut client = pipeline_client(&pipe.url()).await;
    let mut req = run_request(records(3));
    req.run_id = "json-run".into();
    req.params = Some(rounds(ROUNDS));
    let got = run_ok(&mut client, req).await;
    assert_eq!(got.status(), proto::RunStatus::Succeeded);
    drop(client);
    for s in [&mut pipe, &mut p] {
        let _ = Command::new("kill").args(["-TERM", &s.pid()]).status();
        s.wait_exit(Duration::from_secs(10));
    }
    // The pipeline: "run finished" as a JSON line, its run id a field of the run's span.
    let pipe_lines = json_lines(&pipe_log);
    let finished = pipe_lines.iter().find(|l| l["message"] == "run finished").expect("a run finished line");
    assert!(in_span(finished, "run_id", "json-run"), "{finished}");
    assert_eq!(finished["level"], "INFO");
    // The processor: each record's lines carry the run id, record id and attempt.
    let proc_lines = json_lines(&proc_log);
    for id in ids(3) {
        let done = proc_lines
            .iter()
            .find(|l| l["message"] == "record done" && in_span(l, "record_id", &id))
            .unwrap_or_else(|| panic!("no `record done` line for {id}"));
        assert!(in_span(done, "run_id", "json-run"), "{done}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGHUP means "reload" to an operator: a server without TLS files logs it
/// and goes on serving (its default action would end the process), and one
/// signalled the moment it announces its address is already handling it.
#[tokio::test]
async fn sighup_reloads_and_never_ends_a_server() {
    let log = std::env::temp_dir().join(format!("fanout-sighup-{}.log", std::process::id()));
    let stderr = Stdio::from(std::fs::File::create(&log).unwrap());
    let exe = env!("CARGO_BIN_EXE_fanout-processor");
    // A short drain: this (current-thread) test blocks while it waits for the
    // exit, so its client's connection is not closed for the server to see.
    let args = ["--listen", "127.0.0.1:0", "--drain-timeout", "1s"];
    let mut p = Server::start_logging(exe, "fanout-processor", &args, "info", stderr);
    for _ in 0..2 {
        assert!(Command::new("kill").args(["-HUP", &p.pid()]).status().expect("kill").success());
    }
    // The log line is the signal that both were handled.
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.matches("SIGHUP: nothing to reload").count() >= 2 {
            break;
        }
        assert!(p.child.try_wait().unwrap().is_none(), "SIGHUP ended the processor:\n{text}");
        assert!(Instant::now() < deadline, "no SIGHUP line in the log:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut client = processor_client(&p.url()).await;
    client.describe(proto::DescribeRequest {}).await.expect("still serving after SIGHUP");
    drop(client);
    assert!(Command::new("kill").args(["-TERM", &p.pid()]).status().expect("kill").success());
    assert_eq!(p.wait_exit(Duration::from_secs(10)).code(), Some(0));
    let _ = std::fs::remove_file(&log);
}

/// A "pipeline" that accepts the connection and then never says a word
/// (no HTTP/2 settings, no answer to pings): `fanout run` gives up, naming
/// the address, instead of waiting forever.
#[test]
fn fanout_run_gives_up_on_a_pipeline_that_never_answers() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    // Accepted connections are held open, unread, until the test ends.
    let held = std::thread::spawn(move || silent.incoming().take(4).collect::<Vec<_>>());
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(["run", "--pipeline", &url, "--quiet", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fanout run");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, r#"{{"id": "a"}}"#).unwrap();
    }
    // Keepalive: a ping every 20 s, answered within 10 s, or the call fails.
    let deadline = started + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("fanout run still waiting on a silent pipeline after 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("127.0.0.1"), "names the pipeline: {stderr}");
    eprintln!("gave up after {:?}: {stderr}", started.elapsed());
    drop(held);
}
