//! Connections: handshake and idle timeouts, accepting while out of file
//! descriptors, and requests that cannot be decoded.
//!
//! A tonic `Channel` hides a closed connection by reconnecting, so the
//! timeout tests speak HTTP/2 themselves over a raw socket ([`RawH2`]) and
//! observe the server closing it.

mod common;

use common::*;
use fanout::proto;
use fanout::workload::Digest;
use prost::Message;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// The handshake and idle timeouts of the servers under test.
const SHORT: Duration = Duration::from_millis(300);
/// By when a connection past [`SHORT`] must have been closed: well before the
/// default timeouts (5 s, 5 min), with room for a loaded machine.
const CLOSED_BY: Duration = Duration::from_secs(3);

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

async fn channel(url: &str) -> Channel {
    tokio::time::timeout(WAIT, Channel::from_shared(url.to_owned()).unwrap().connect())
        .await
        .expect("connect timed out")
        .expect("connect")
}

/// Reads (and discards) what the server sends until it closes the
/// connection; panics if it is still open after `limit`. Returns how long
/// that took.
async fn closed_within(sock: &mut TcpStream, limit: Duration, what: &str) -> Duration {
    let start = Instant::now();
    let drain = async {
        let mut buf = [0u8; 4096];
        // Each read returns data (bounded: the server sends a few frames at
        // most), EOF or a reset.
        while let Ok(1..) = sock.read(&mut buf).await {}
    };
    tokio::time::timeout(limit, drain).await.unwrap_or_else(|_| panic!("{what}: still open after {limit:?}"));
    start.elapsed()
}

// ------------------------------------------------------------ raw HTTP/2

/// One HTTP/2 frame.
#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// A bare HTTP/2 client on a raw socket: enough for gRPC calls with tiny
/// messages, and to see the server close the connection.
struct RawH2 {
    sock: TcpStream,
}

impl RawH2 {
    /// Connects and sends the preface and an empty SETTINGS frame.
    async fn connect(addr: SocketAddr) -> Self {
        let sock = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        let mut h2 = RawH2 { sock };
        h2.sock.write_all(PREFACE).await.expect("write preface");
        h2.write_frame(SETTINGS, 0, 0, &[]).await;
        h2
    }

    async fn write_frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = (payload.len() as u32).to_be_bytes();
        let mut frame = vec![len[1], len[2], len[3], kind, flags];
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        self.sock.write_all(&frame).await.expect("write frame");
    }

    /// The next frame, answering SETTINGS and PING as a client must; `None`
    /// once the server has closed the connection.
    async fn frame(&mut self) -> Option<Frame> {
        let mut head = [0u8; 9];
        self.sock.read_exact(&mut head).await.ok()?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        self.sock.read_exact(&mut payload).await.ok()?;
        let frame = Frame { kind: head[3], flags: head[4], stream, payload };
        if frame.flags & ACK == 0 {
            match frame.kind {
                SETTINGS => self.write_frame(SETTINGS, ACK, 0, &[]).await,
                PING => self.write_frame(PING, ACK, 0, &frame.payload.clone()).await,
                _ => {}
            }
        }
        Some(frame)
    }

    /// Starts a gRPC call to `path` on `stream` with one request message
    /// (headers as HPACK literals without indexing).
    async fn call(&mut self, stream: u32, path: &str, message: &[u8]) {
        let authority = self.sock.peer_addr().unwrap().to_string();
        let mut block = Vec::new();
        for (name, value) in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", authority.as_str()),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ] {
            block.push(0);
            block.push(name.len() as u8);
            block.extend_from_slice(name.as_bytes());
            block.push(value.len() as u8);
            block.extend_from_slice(value.as_bytes());
        }
        self.write_frame(HEADERS, END_HEADERS, stream, &block).await;
        let mut data = vec![0];
        data.extend_from_slice(&(message.len() as u32).to_be_bytes());
        data.extend_from_slice(message);
        self.write_frame(DATA, END_STREAM, stream, &data).await;
    }

    /// The next response message on `stream` (frames of other streams are
    /// skipped); panics if the stream ends first or the connection closes.
    async fn message<M: Message + Default>(&mut self, stream: u32) -> M {
        let next = async {
            loop {
                let f = self.frame().await.expect("the server closed the connection");
                if f.stream != stream {
                    continue;
                }
                match f.kind {
                    DATA if f.payload.len() >= 5 => return M::decode(&f.payload[5..]).expect("a response"),
                    RST_STREAM => panic!("stream {stream} was reset: {f:?}"),
                    HEADERS if f.flags & END_STREAM != 0 => panic!("stream {stream} ended without a message"),
                    _ => {}
                }
            }
        };
        tokio::time::timeout(WAIT, next).await.expect("no response message in time")
    }

    /// A health `Check` of the overall status on `stream`.
    async fn check(&mut self, stream: u32) -> ServingStatus {
        let req = HealthCheckRequest { service: String::new() }.encode_to_vec();
        self.call(stream, "/grpc.health.v1.Health/Check", &req).await;
        self.message::<HealthCheckResponse>(stream).await.status()
    }

    /// Asserts that for `window` the connection stays open, and so does
    /// `stream` if given (frames that arrive meanwhile are read and dropped).
    async fn stays_open(&mut self, window: Duration, stream: Option<u32>) {
        let watch = async {
            loop {
                let f = self.frame().await.expect("the server closed the connection");
                let ends = f.kind == RST_STREAM || (f.kind == HEADERS && f.flags & END_STREAM != 0);
                assert!(!(ends && Some(f.stream) == stream), "stream {} ended: {f:?}", f.stream);
            }
        };
        assert!(tokio::time::timeout(window, watch).await.is_err());
    }

    /// Waits (under `limit`) for the server to close the connection.
    async fn closed_within(&mut self, limit: Duration, what: &str) -> Duration {
        closed_within(&mut self.sock, limit, what).await
    }
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_an_http2_handshake_are_closed() {
    let mut cfg = processor_config();
    cfg.connections.handshake_timeout = SHORT;
    let p = start_processor_with(&cfg, Digest::default()).await;
    let mut pcfg = pipeline_config(std::slice::from_ref(&p.url));
    pcfg.connections.handshake_timeout = SHORT;
    let pipeline = fanout::server::start_pipeline(&pcfg).await.expect("start pipeline");

    for addr in [p.running.addr, pipeline.addr] {
        for (what, sent) in [("a silent connection", &PREFACE[..0]), ("half a preface", &PREFACE[..12])] {
            let mut sock = TcpStream::connect(addr).await.expect("connect");
            sock.write_all(sent).await.expect("write");
            let took = closed_within(&mut sock, CLOSED_BY, what).await;
            assert!(took >= SHORT / 2, "{what} on {addr}: closed after {took:?}, before the timeout");
        }
        // A client that completes its handshake is not cut by that timeout:
        // a call after twice the timeout is answered on the same connection.
        let mut h2 = RawH2::connect(addr).await;
        assert_eq!(h2.check(1).await, ServingStatus::Serving);
        h2.stays_open(SHORT * 2, None).await;
        assert_eq!(h2.check(3).await, ServingStatus::Serving);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_open_calls_is_closed_after_the_idle_timeout() {
    let mut cfg = processor_config();
    cfg.connections.idle_timeout = SHORT;
    let p = start_processor_with(&cfg, Digest::default()).await;

    let mut h2 = RawH2::connect(p.running.addr).await;
    assert_eq!(h2.check(1).await, ServingStatus::Serving);
    let took = h2.closed_within(CLOSED_BY, "an idle connection").await;
    assert!(took >= SHORT / 2, "closed {took:?} after its call, before the idle timeout");

    // Idle from the start: closed too.
    let mut h2 = RawH2::connect(p.running.addr).await;
    h2.closed_within(CLOSED_BY, "a connection that never made a call").await;

    // The server itself still serves.
    let mut health = HealthClient::new(channel(&p.url).await);
    let req = HealthCheckRequest { service: String::new() };
    let resp = tokio::time::timeout(WAIT, health.check(req)).await.expect("check timed out").expect("check");
    assert_eq!(resp.into_inner().status(), ServingStatus::Serving);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_holding_an_open_stream_is_not_idle() {
    let p = start_processor(Digest::default()).await;
    let mut cfg = pipeline_config(std::slice::from_ref(&p.url));
    cfg.connections.idle_timeout = SHORT;
    cfg.connections.handshake_timeout = SHORT;
    let pipeline = fanout::server::start_pipeline(&cfg).await.expect("start pipeline");

    let mut h2 = RawH2::connect(pipeline.addr).await;
    // The pipeline's readiness, which follows its processors.
    let watch = HealthCheckRequest { service: "fanout.v1.Pipeline".into() }.encode_to_vec();
    h2.call(1, "/grpc.health.v1.Health/Watch", &watch).await;
    // NOT_SERVING until its first probe of the processor has answered.
    while h2.message::<HealthCheckResponse>(1).await.status() != ServingStatus::Serving {}

    // Held for three idle timeouts: the connection stays open and answers.
    h2.stays_open(SHORT * 3, Some(1)).await;
    assert_eq!(h2.check(3).await, ServingStatus::Serving);

    // The watch still gets status changes: every processor down.
    p.running.abort();
    assert_eq!(h2.message::<HealthCheckResponse>(1).await.status(), ServingStatus::NotServing);

    // Once the watch is cancelled, nothing is open: closed after the timeout.
    h2.write_frame(RST_STREAM, 0, 1, &8u32.to_be_bytes()).await;
    let took = h2.closed_within(CLOSED_BY, "the connection after its watch ended").await;
    assert!(took >= SHORT / 2, "closed {took:?} after the watch ended, before the idle timeout");
}

// ------------------------------------------------------ descriptor limit

/// CPU time (user + system) of process `pid` so far.
#[cfg(target_os = "linux")]
fn cpu_time(pid: u32, tick: Duration) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name (which may hold spaces), from field 3.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u32 = fields[11].parse::<u32>().unwrap() + fields[12].parse::<u32>().unwrap();
    tick * ticks
}

#[cfg(target_os = "linux")]
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_a_server_backs_off_and_recovers() {
    use std::process::Command;

    const LIMIT: usize = 64;
    let exe = env!("CARGO_BIN_EXE_fanout-pipeline");
    let script = format!("ulimit -n {LIMIT} && exec \"$0\" \"$@\"");
    let args = ["-c", &script, exe, "--listen", "127.0.0.1:0", "--processors", "http://127.0.0.1:1"];
    // The real binary, under a descriptor limit set by a shell.
    let server = Server::start("sh", "fanout-pipeline", &args);
    let (pid, addr) = (server.child.id(), server.addr);

    // More connections than descriptors: the kernel completes them all (the
    // backlog is 1024) and the server accepts until it runs out.
    let mut socks = Vec::new();
    for _ in 0..100 {
        socks.push(TcpStream::connect(addr).await.expect("connect"));
    }
    wait_until("the server to run out of descriptors", || open_fds(pid) >= LIMIT - 4).await;

    let tick = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse::<u64>().ok())
        .map_or(Duration::from_millis(10), |hz| Duration::from_secs(1) / hz as u32);
    let before = cpu_time(pid, tick);
    // A measurement window, not a wait for a signal.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let spent = cpu_time(pid, tick) - before;
    assert!(
        spent < Duration::from_millis(300),
        "out of descriptors, the server used {spent:?} of CPU in 1 s: it spins on accept"
    );

    // Descriptors back: the server accepts again and answers.
    drop(socks);
    let mut health = HealthClient::new(channel(&format!("http://{addr}")).await);
    let req = HealthCheckRequest { service: String::new() };
    let answer =
        tokio::time::timeout(WAIT, health.check(req)).await.expect("no health answer after recovery");
    answer.expect("health check after recovery");
    let mut server = server;
    assert!(server.child.try_wait().unwrap().is_none(), "the server is still running");
}

// ------------------------------------------------- undecodable requests

/// `fanout.v1.Record` with `bytes` where the real one has `string`.
#[derive(Clone, PartialEq, Message)]
struct LooseRecord {
    #[prost(bytes = "vec", tag = "1")]
    id: Vec<u8>,
    #[prost(message, optional, tag = "2")]
    attributes: Option<prost_types::Struct>,
}

/// `fanout.v1.RunRequest`, records only.
#[derive(Clone, PartialEq, Message)]
struct LooseRunRequest {
    #[prost(message, repeated, tag = "2")]
    records: Vec<LooseRecord>,
}

/// `fanout.v1.ProcessRecordRequest`, record only.
#[derive(Clone, PartialEq, Message)]
struct LooseProcessRecordRequest {
    #[prost(message, optional, tag = "2")]
    record: Option<LooseRecord>,
}

/// A `Struct` nested `depth` levels deep: `{"a": {"a": ...}}`.
fn nested(depth: usize) -> prost_types::Struct {
    use prost_types::value::Kind;
    let mut s = prost_types::Struct::default();
    for _ in 0..depth {
        let mut outer = prost_types::Struct::default();
        outer.fields.insert("a".into(), prost_types::Value { kind: Some(Kind::StructValue(s)) });
        s = outer;
    }
    s
}

/// The records tried: an id that is not UTF-8, attributes nested 200 deep.
fn bad_records() -> [(LooseRecord, &'static str); 2] {
    [
        (LooseRecord { id: vec![b'a', 0xff, 0xfe], attributes: None }, "UTF-8"),
        (LooseRecord { id: b"deep".to_vec(), attributes: Some(nested(200)) }, "nested too deeply"),
    ]
}

/// Calls `path` with `req`, expecting a status before any response.
async fn refused<Req, Resp>(url: &str, path: &'static str, req: Req, streaming: bool) -> tonic::Status
where
    Req: Message + Send + Sync + 'static,
    Resp: Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel(url).await);
    let call = async {
        grpc.ready().await.expect("ready");
        let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
        let path = PathAndQuery::from_static(path);
        match streaming {
            true => grpc.server_streaming(tonic::Request::new(req), path, codec).await.err(),
            false => grpc.unary(tonic::Request::new(req), path, codec).await.err(),
        }
    };
    tokio::time::timeout(WAIT, call).await.expect("call timed out").expect("the request was accepted")
}

fn assert_undecodable(status: &tonic::Status, why: &str, what: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    for needle in ["could not be decoded", why] {
        assert!(status.message().contains(needle), "{what}: {:?} lacks {needle:?}", status.message());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_requests_are_invalid_argument() {
    let p = start_processor(Digest::default()).await;
    let pipeline = start_pipeline(std::slice::from_ref(&p.url)).await;

    for (record, why) in bad_records() {
        let req = LooseRunRequest { records: vec![record.clone()] };
        let status =
            refused::<_, proto::RunEvent>(&pipeline.url(), "/fanout.v1.Pipeline/Run", req, true).await;
        assert_undecodable(&status, why, "Run");

        let req = LooseProcessRecordRequest { record: Some(record) };
        let path = "/fanout.v1.RecordProcessor/ProcessRecord";
        let status = refused::<_, proto::ProcessRecordResponse>(&p.url, path, req, false).await;
        assert_undecodable(&status, why, "ProcessRecord");
    }
    // Both servers keep serving.
    let got = run_ok(&mut pipeline_client(&pipeline.url()).await, run_request(records(2))).await;
    assert_eq!(got.status(), proto::RunStatus::Succeeded, "{:#?}", got.failures());
}

/// `--max-connection-age`: past it the server sends GOAWAY; a call open on
/// the old connection still finishes, and the next ones go on a new
/// connection (counted by the client's connector), so rotated certificates
/// and rebalanced load reach long-lived clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aged_connection_is_replaced_without_failing_its_calls() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    // Room for a loaded machine: the long call must be sent well within the
    // age (its timer starts at accept), and then outlive it.
    const AGE: Duration = Duration::from_secs(1);
    let mut cfg = processor_config();
    cfg.connections.max_connection_age = AGE;
    let slow = Tracked::slow(AGE * 2);
    let p = start_processor_with(&cfg, slow).await;
    let dials = Arc::new(AtomicUsize::new(0));
    let (counted, addr) = (dials.clone(), p.addr.clone());
    let connector = tower::service_fn(move |_: tonic::codegen::http::Uri| {
        counted.fetch_add(1, Ordering::SeqCst);
        let addr = addr.clone();
        async move { TcpStream::connect(addr).await.map(hyper_util::rt::TokioIo::new) }
    });
    let channel =
        Channel::from_shared(p.url.clone()).unwrap().connect_with_connector(connector).await.unwrap();
    let mut client = proto::record_processor_client::RecordProcessorClient::new(channel);
    let mut request =
        process_request(record_with("long", serde_json::json!({ "units": 1 })), proto::UnitMode::Parallel);
    request.params = Some(rounds(1));
    let started = Instant::now();
    let long = client.process_record(request.clone()).await.expect("a call open at the age finishes");
    assert!(started.elapsed() > AGE, "the premise: the call outlived the connection's age");
    assert_eq!(long.into_inner().record_id, "long");
    assert_eq!(dials.load(Ordering::SeqCst), 1);
    // The next calls find the old connection going away and dial again. A
    // call racing the GOAWAY may be refused unstarted (the caller's to send
    // again, as the pipeline does); what must hold is the new connection.
    let deadline = Instant::now() + WAIT;
    while dials.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "no new connection after the age");
        let _ = client.describe(proto::DescribeRequest {}).await;
    }
    client.describe(proto::DescribeRequest {}).await.expect("calls on the new connection succeed");
}
