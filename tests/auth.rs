//! Bearer tokens and the reflection switch: both servers refuse calls
//! without a valid token (UNAUTHENTICATED) and keep health open; token files
//! rotate while serving; the pipeline sends its processors their token and
//! names the processor when one refuses it; reflection can be turned off;
//! tokens never reach the logs.

mod common;

use common::auth::*;
use common::*;
use fanout::auth::Switch;
use fanout::proto::{self, DescribeRequest};
use fanout::server;
use fanout::workload::Digest;
use std::process::{Command, Stdio};
use std::time::Duration;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn channel(url: &str) -> Channel {
    tokio::time::timeout(WAIT, Channel::from_shared(url.to_owned()).unwrap().connect())
        .await
        .expect("connect timed out")
        .expect("connect")
}

fn one_record() -> proto::ProcessRecordRequest {
    process_request(record("r-1"), proto::UnitMode::Sequential)
}

/// A processor requiring the tokens of `file`.
async fn processor_with_tokens(file: &std::path::Path) -> Proc {
    let mut cfg = processor_config();
    cfg.access.auth_token_file = Some(file.to_owned());
    start_processor_with(&cfg, Digest::default()).await
}

/// A processor call with `token` (none when `None`): Ok, or its status.
async fn process(url: &str, token: Option<&str>) -> Result<(), tonic::Status> {
    let mut client = processor_client(url).await;
    let req = match token {
        Some(t) => with_token(one_record(), t),
        None => tonic::Request::new(one_record()),
    };
    client.process_record(req).await.map(drop)
}

async fn health(url: &str, service: &str) -> Result<ServingStatus, tonic::Status> {
    let mut client = HealthClient::new(channel(url).await);
    let resp = client.check(HealthCheckRequest { service: service.into() }).await?;
    Ok(resp.into_inner().status())
}

/// Lists services over reflection `v1` or `v1alpha`, with `token` if given.
async fn reflect(url: &str, alpha: bool, token: Option<&str>) -> Result<Vec<String>, tonic::Status> {
    macro_rules! list {
        ($v:ident) => {{
            use tonic_reflection::pb::$v::ServerReflectionRequest;
            use tonic_reflection::pb::$v::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$v::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$v::server_reflection_response::MessageResponse;
            let req = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let stream = futures::stream::iter([req]);
            let req = match token {
                Some(t) => with_token(stream, t),
                None => tonic::Request::new(stream),
            };
            let mut client = ServerReflectionClient::new(channel(url).await);
            let mut resp = client.server_reflection_info(req).await?.into_inner();
            match resp.message().await?.and_then(|r| r.message_response) {
                Some(MessageResponse::ListServicesResponse(l)) => {
                    Ok(l.service.into_iter().map(|s| s.name).collect())
                }
                other => panic!("unexpected reflection answer {other:?}"),
            }
        }};
    }
    let call = async { if alpha { list!(v1alpha) } else { list!(v1) } };
    tokio::time::timeout(WAIT, call).await.expect("reflection timed out")
}

fn run_req(n: usize) -> proto::RunRequest {
    let mut req = run_request(records(n));
    req.params = Some(rounds(ROUNDS));
    req
}

#[tokio::test]
async fn processor_refuses_missing_and_wrong_tokens_and_keeps_health_open() {
    let dir = TempDir::new("auth-proc");
    let file = dir.write("tokens", "# processor tokens\n\nproc-token-1\n");
    let p = processor_with_tokens(&file).await;
    let missing = process(&p.url, None).await.unwrap_err();
    assert_status(&missing, Code::Unauthenticated, &["authorization: Bearer <token>", "has none"]);
    let wrong = process(&p.url, Some("proc-token-2")).await.unwrap_err();
    assert_status(&wrong, Code::Unauthenticated, &["not one this server accepts"]);
    assert!(!wrong.message().contains("proc-token"), "the token is not echoed: {wrong:?}");
    let mut client = processor_client(&p.url).await;
    let mut basic = tonic::Request::new(one_record());
    basic.metadata_mut().insert("authorization", "Basic cHJvYy10b2tlbi0x".parse().unwrap());
    let basic = client.process_record(basic).await.unwrap_err();
    assert_status(&basic, Code::Unauthenticated, &["Bearer <token>"]);
    process(&p.url, Some("proc-token-1")).await.expect("the right token is accepted");
    // Describe is the service's too.
    let describe = client.describe(DescribeRequest {}).await.unwrap_err();
    assert_eq!(describe.code(), Code::Unauthenticated);
    client.describe(with_token(DescribeRequest {}, "proc-token-1")).await.expect("Describe with the token");
    // Health is open to probes.
    assert_eq!(health(&p.url, "fanout.v1.RecordProcessor").await.unwrap(), ServingStatus::Serving);
    assert_eq!(health(&p.url, "").await.unwrap(), ServingStatus::Serving);
    assert_eq!(get(&p.stats.records_started), 1, "only the authorized call reached the engine");
}

#[tokio::test]
async fn pipeline_refuses_missing_and_wrong_tokens_and_keeps_health_open() {
    let dir = TempDir::new("auth-pipe");
    let p = start_processor(Digest::default()).await;
    let file = dir.write("tokens", "pipe-token-1\n");
    let mut cfg = pipeline_config(std::slice::from_ref(&p.url));
    cfg.access.auth_token_file = Some(file);
    let pipe = server::start_pipeline(&cfg).await.unwrap();
    let mut client = pipeline_client(&pipe.url()).await;
    let missing = run_collect(&mut client, tonic::Request::new(run_req(2))).await.unwrap_err();
    assert_status(&missing, Code::Unauthenticated, &["has none"]);
    let wrong = run_collect(&mut client, with_token(run_req(2), "pipe-token-2")).await.unwrap_err();
    assert_status(&wrong, Code::Unauthenticated, &["not one this server accepts"]);
    // RunStream too.
    let input = futures::stream::iter(stream_of(&ids(1), 1, proto::RunOptions::default()));
    let streamed = client.run_stream(input).await.unwrap_err();
    assert_eq!(streamed.code(), Code::Unauthenticated, "{streamed:?}");
    let (records, report) = run_collect(&mut client, with_token(run_req(2), "pipe-token-1")).await.unwrap();
    assert_eq!(report.status(), proto::RunStatus::Succeeded, "{report:?}");
    assert_eq!(records.len(), 2);
    // Health is open without a token.
    assert_eq!(health(&pipe.url(), "").await.unwrap(), ServingStatus::Serving);
    assert_eq!(health(&pipe.url(), "fanout.v1.Pipeline").await.unwrap(), ServingStatus::Serving);
    // Reflection is behind the token.
    let refl = reflect(&pipe.url(), false, None).await.unwrap_err();
    assert_eq!(refl.code(), Code::Unauthenticated, "{refl:?}");
    let services = reflect(&pipe.url(), true, Some("pipe-token-1")).await.unwrap();
    assert!(services.iter().any(|s| s == "fanout.v1.Pipeline"), "{services:?}");
}

#[tokio::test]
async fn token_files_without_a_token_are_a_startup_error_naming_the_file() {
    let dir = TempDir::new("auth-empty");
    let empty = dir.write("empty-tokens", "# nothing yet\n\n");
    let mut cfg = processor_config();
    cfg.access.auth_token_file = Some(empty.clone());
    let err = server::start_processor(&cfg, Digest::default()).await.unwrap_err().to_string();
    assert!(err.contains("empty-tokens") && err.contains("no token"), "{err}");
    let mut cfg = pipeline_config(&["127.0.0.1:1".to_owned()]);
    cfg.processor_token.processor_token_file = Some(dir.0.join("missing"));
    let err = server::start_pipeline(&cfg).await.unwrap_err().to_string();
    assert!(err.contains("missing"), "{err}");
}

#[tokio::test]
async fn a_rotated_token_file_is_reloaded_with_overlap() {
    let dir = TempDir::new("auth-rotate");
    let file = dir.write("tokens", "old-token\n");
    let p = processor_with_tokens(&file).await;
    let tokens = p.running.auth_tokens().expect("the processor's token file").clone();
    process(&p.url, Some("old-token")).await.expect("old token before rotation");
    assert_eq!(process(&p.url, Some("new-token")).await.unwrap_err().code(), Code::Unauthenticated);
    // Overlap: both lines are accepted.
    let before = reloads(&tokens);
    replace(&file, "old-token\n# rotating\nnew-token\n");
    wait_reload(&tokens, "overlap", |r| r.applied > before.applied).await;
    process(&p.url, Some("old-token")).await.expect("old token during the overlap");
    process(&p.url, Some("new-token")).await.expect("new token during the overlap");
    // The old one is retired.
    let before = reloads(&tokens);
    replace(&file, "new-token\n");
    wait_reload(&tokens, "retire the old token", |r| r.applied > before.applied).await;
    assert_eq!(process(&p.url, Some("old-token")).await.unwrap_err().code(), Code::Unauthenticated);
    process(&p.url, Some("new-token")).await.expect("new token after rotation");
    // A change that leaves no token keeps the tokens in force.
    let before = reloads(&tokens);
    replace(&file, "# emptied by mistake\n");
    wait_reload(&tokens, "a failed reload", |r| r.failed > before.failed).await;
    assert_eq!(reloads(&tokens).applied, before.applied, "a failed read is not applied");
    process(&p.url, Some("new-token")).await.expect("the previous tokens stay after a failed reload");
}

#[tokio::test]
async fn the_pipeline_sends_its_processor_token_and_names_a_refusing_processor() {
    let dir = TempDir::new("auth-fleet");
    let proc_file = dir.write("processor-tokens", "fleet-a\n");
    let p = processor_with_tokens(&proc_file).await;
    let pipe_file = dir.write("pipeline-processor-token", "# for the processors\nfleet-a\n");
    let mut cfg = pipeline_config(std::slice::from_ref(&p.url));
    cfg.processor_token.processor_token_file = Some(pipe_file.clone());
    // No periodic probe during the test: the pipeline learns of the
    // processor's new token from a record call first.
    cfg.health_interval = Duration::from_secs(60);
    let pipe = server::start_pipeline(&cfg).await.unwrap();
    let mut client = pipeline_client(&pipe.url()).await;
    let got = run_ok(&mut client, run_req(3)).await;
    assert_eq!(got.status(), proto::RunStatus::Succeeded, "{:?}", got.failures());

    // The processor moves to another token; the pipeline still sends the old.
    let proc_tokens = p.running.auth_tokens().unwrap().clone();
    let before = reloads(&proc_tokens);
    replace(&proc_file, "fleet-b\n");
    wait_reload(&proc_tokens, "the processor's new token", |r| r.applied > before.applied).await;
    // Refused, the records are not the processor's to fail: they wait for
    // another instance, and with none they fail UNAVAILABLE saying why.
    let got = run_ok(&mut client, run_req(3)).await;
    assert_eq!(got.status(), proto::RunStatus::Failed);
    for r in &got.records {
        assert_failed(
            r,
            Code::Unavailable,
            &[&p.addr, "refused the pipeline's credentials", "--processor-token-file"],
            3,
        );
    }

    // While the pipeline's token is wrong, a run is refused up front,
    // naming the processor and why.
    let refused = run(&mut client, run_req(1)).await.unwrap_err();
    assert_status(&refused, Code::Unavailable, &[&p.addr, "UNAUTHENTICATED", "--processor-token-file"]);

    // The pipeline's file follows: runs work again.
    let pipe_token = pipe.processor_token().expect("the pipeline's processor token").clone();
    let before = reloads(&pipe_token);
    replace(&pipe_file, "fleet-b\n");
    wait_reload(&pipe_token, "the pipeline's new processor token", |r| r.applied > before.applied).await;
    let got = run_ok(&mut client, run_req(3)).await;
    assert_eq!(got.status(), proto::RunStatus::Succeeded, "{:?}", got.failures());
}

#[tokio::test]
async fn records_refused_by_a_misconfigured_processor_go_to_the_others() {
    let dir = TempDir::new("auth-mixed");
    let good = processor_with_tokens(&dir.write("good", "fleet-a\n")).await;
    let bad_file = dir.write("bad", "fleet-a\n");
    let bad = processor_with_tokens(&bad_file).await;
    let mut cfg = pipeline_config(&[good.url.clone(), bad.url.clone()]);
    cfg.processor_token.processor_token_file = Some(dir.write("pipeline-processor-token", "fleet-a\n"));
    // No periodic probe during the test: records meet the refusal first.
    cfg.health_interval = Duration::from_secs(60);
    let pipe = server::start_pipeline(&cfg).await.unwrap();
    let mut client = pipeline_client(&pipe.url()).await;
    let got = run_ok(&mut client, run_req(40)).await;
    assert_eq!(got.status(), proto::RunStatus::Succeeded, "{:?}", got.failures());
    let on_bad = got.records.iter().filter(|r| r.processor.starts_with(&bad.addr)).count();
    assert!(on_bad > 0, "the premise: both instances take records");

    // One instance moves to another token: records sent to it are refused
    // there, and go to the other without failing or counting an attempt.
    let tokens = bad.running.auth_tokens().unwrap().clone();
    let before = reloads(&tokens);
    replace(&bad_file, "fleet-other\n");
    wait_reload(&tokens, "the misconfigured processor's token", |r| r.applied > before.applied).await;
    let got = run_ok(&mut client, run_req(40)).await;
    assert_eq!(got.status(), proto::RunStatus::Succeeded, "{:?}", got.failures());
    for r in &got.records {
        assert_eq!(r.attempts, 1, "{r:?}");
        assert!(r.processor.starts_with(&good.addr), "{r:?}");
    }
}

#[tokio::test]
async fn reflection_off_is_unimplemented_on_both_servers() {
    let mut pcfg = processor_config();
    pcfg.access.reflection = Switch::Off;
    let p = start_processor_with(&pcfg, Digest::default()).await;
    let mut cfg = pipeline_config(std::slice::from_ref(&p.url));
    cfg.access.reflection = Switch::Off;
    let pipe = server::start_pipeline(&cfg).await.unwrap();
    for url in [&p.url, &pipe.url()] {
        for alpha in [false, true] {
            let s = reflect(url, alpha, None).await.unwrap_err();
            assert_eq!(s.code(), Code::Unimplemented, "{url} v1alpha={alpha}: {s:?}");
        }
        assert_eq!(health(url, "").await.unwrap(), ServingStatus::Serving, "health stays");
    }
    // The services still work.
    let mut client = pipeline_client(&pipe.url()).await;
    assert_eq!(run_ok(&mut client, run_req(2)).await.status(), proto::RunStatus::Succeeded);
    // On (the default), it answers.
    let on = start_processor(Digest::default()).await;
    let services = reflect(&on.url, false, None).await.unwrap();
    assert!(services.iter().any(|s| s == "fanout.v1.RecordProcessor"), "{services:?}");
}

/// The binaries at debug level, with tokens on both hops and calls with
/// missing, wrong and right tokens: no token appears on stderr; `fanout run`
/// sends its token from `--token-file` or `FANOUT_TOKEN`.
// Multi-threaded: the client's connection must close (on a runtime thread)
// while this one waits for the servers to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binaries_keep_tokens_out_of_their_logs() {
    let dir = TempDir::new("auth-logs");
    let (client_token, proc_token, wrong) =
        ("CLIENT-SECRET-7f3a", "PROCESSOR-SECRET-91bc", "WRONG-SECRET-55de");
    let pipe_tokens = dir.write("pipeline-tokens", &format!("{client_token}\n"));
    let proc_tokens = dir.write("processor-tokens", &format!("{proc_token}\n"));
    let (proc_log, pipe_log) = (dir.0.join("processor.log"), dir.0.join("pipeline.log"));
    let file = |p: &std::path::Path| Stdio::from(std::fs::File::create(p).unwrap());
    let exe = env!("CARGO_BIN_EXE_fanout-processor");
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--unit-threads",
        "1",
        "--auth-token-file",
        proc_tokens.to_str().unwrap(),
    ];
    let mut p = Server::start_logging(exe, "fanout-processor", &args, "debug", file(&proc_log));
    let exe = env!("CARGO_BIN_EXE_fanout-pipeline");
    let url = p.url();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--processors",
        &url,
        "--auth-token-file",
        pipe_tokens.to_str().unwrap(),
        "--processor-token-file",
        proc_tokens.to_str().unwrap(),
    ];
    let mut pipe = Server::start_logging(exe, "fanout-pipeline", &args, "debug", file(&pipe_log));
    let mut client = pipeline_client(&pipe.url()).await;
    assert_eq!(
        run_collect(&mut client, tonic::Request::new(run_req(1))).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        run_collect(&mut client, with_token(run_req(1), wrong)).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(process(&url, Some(wrong)).await.unwrap_err().code(), Code::Unauthenticated);
    let (_, report) = run_collect(&mut client, with_token(run_req(2), client_token)).await.unwrap();
    assert_eq!(report.status(), proto::RunStatus::Succeeded);

    // `fanout run`: no token, --token-file, FANOUT_TOKEN.
    let input = dir.write("records.ndjson", "{\"id\": \"a\"}\n{\"id\": \"b\"}\n");
    let client_file = dir.write("client-token", &format!("# mine\n{client_token}\n"));
    let fanout_run = |extra: &[&str], env: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fanout"));
        cmd.args(["run", "--quiet", "--params", "{\"rounds\": 10}", "--pipeline", &pipe.url()])
            .args(extra)
            .arg(&input)
            .env_remove("FANOUT_TOKEN")
            .stdin(Stdio::null());
        if let Some(t) = env {
            cmd.env("FANOUT_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    let out = fanout_run(&[], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("UNAUTHENTICATED"), "{stderr}");
    let out = fanout_run(&["--token-file", client_file.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let out = fanout_run(&[], Some(client_token));
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    // --token-file wins over FANOUT_TOKEN.
    let out = fanout_run(&["--token-file", client_file.to_str().unwrap()], Some(wrong));
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let out = fanout_run(&[], Some(wrong));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains(wrong), "the client does not echo its token: {stderr}");

    drop(client);
    for s in [&mut pipe, &mut p] {
        let _ = Command::new("kill").args(["-TERM", &s.pid()]).status();
        s.wait_exit(Duration::from_secs(10));
    }
    for (log, read_line) in [(&proc_log, "token file read"), (&pipe_log, "token file read")] {
        let text = std::fs::read_to_string(log).unwrap();
        // The capture works: the lines around the tokens are there.
        assert!(text.contains(read_line), "{}: {text}", log.display());
        assert!(
            text.contains("UNAUTHENTICATED") || text.contains("Unauthenticated"),
            "{}: {text}",
            log.display()
        );
        for secret in [client_token, proc_token, wrong] {
            assert!(!text.contains(secret), "{} shows a token ({secret})", log.display());
        }
    }
}

/// Calls `path` with an empty message (as a health check request), with
/// `token` if given: the status it ends with.
async fn raw_call(url: &str, path: &'static str, token: Option<&str>) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel(url).await);
    grpc.ready().await.expect("ready");
    let req = match token {
        Some(t) => with_token(HealthCheckRequest::default(), t),
        None => tonic::Request::new(HealthCheckRequest::default()),
    };
    let codec =
        tonic_prost::ProstCodec::<HealthCheckRequest, tonic_health::pb::HealthCheckResponse>::default();
    let at = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    grpc.unary(req, at, codec).await.expect_err(path)
}

/// No path gets past the token guard by not being a known method: unknown
/// methods and services, and look-alikes of the open health prefix, are
/// UNAUTHENTICATED without a token (they would otherwise tell what exists);
/// a path under the health prefix reaches only the health service.
#[tokio::test]
async fn unknown_and_look_alike_paths_are_behind_the_token_too() {
    let dir = TempDir::new("auth-paths");
    let p = start_processor(Digest::default()).await;
    let mut cfg = pipeline_config(std::slice::from_ref(&p.url));
    cfg.access.auth_token_file = Some(dir.write("tokens", "paths-token\n"));
    let pipe = server::start_pipeline(&cfg).await.unwrap();
    let url = pipe.url();
    for path in [
        "/fanout.v1.Pipeline/NoSuchMethod",
        "/no.such.Service/Method",
        "/GRPC.HEALTH.V1.HEALTH/Check",
        "/grpc.health.v1.Health",
        "/grpc.health.v1.HealthX/Check",
        "/x/grpc.health.v1.Health/Check",
    ] {
        let s = raw_call(&url, path, None).await;
        assert_eq!(s.code(), Code::Unauthenticated, "{path}: {s:?}");
        let s = raw_call(&url, path, Some("paths-token")).await;
        assert_eq!(s.code(), Code::Unimplemented, "{path} with the token: {s:?}");
    }
    // Under the open prefix, only health's own methods answer.
    for path in ["/grpc.health.v1.Health/../fanout.v1.Pipeline/Run", "/grpc.health.v1.Health/Run"] {
        let s = raw_call(&url, path, None).await;
        assert_eq!(s.code(), Code::Unimplemented, "{path}: {s:?}");
    }
    assert_eq!(get(&p.stats.records_started), 0);
}
