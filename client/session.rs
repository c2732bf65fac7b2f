//! Driving one run: send the request (whole with `Run`, or streamed with
//! `RunStream`), follow the events with a progress bar, return the report.

use crate::input::Batches;
use anyhow::{Context, Result, anyhow, bail};
use fanout::convert::code_name;
use fanout::proto::pipeline_client::PipelineClient;
use fanout::proto::{self, RecordStatus, run_event::Event, run_input::Input};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::Path;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Receive window of each call: bounds the unread events held in memory.
const STREAM_WINDOW: u32 = 512 << 10;
/// Receive window of the whole connection (see `connect`).
const CONNECTION_WINDOW: u32 = 32 << 20;
/// Bound on the TCP connect, and on the TLS handshake after it.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// HTTP/2 pings while a call is open, every this often...
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(20);
/// ...each to be answered within this, or the connection (and call) fails.
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Connects to a pipeline at `url` (`http://host:port`, `https://host:port`
/// or `host:port`).
pub async fn connect(url: &str) -> Result<PipelineClient<Channel>> {
    connect_tls(url, &fanout::tls::ClientTlsArgs::default()).await
}

/// [`connect`] with TLS settings: https when any is given or the URL is
/// `https://` (see [`fanout::tls::ClientTlsArgs::for_url`]).
pub async fn connect_tls(url: &str, tls: &fanout::tls::ClientTlsArgs) -> Result<PipelineClient<Channel>> {
    let (url, tls) = tls.for_url(url)?;
    let mut endpoint = Channel::from_shared(url.clone()).with_context(|| format!("pipeline URL {url:?}"))?;
    if let Some(tls) = tls {
        // tonic's connect timeout covers the TCP connect only: without its
        // own bound, a server that never answers the handshake holds
        // `fanout run` forever.
        endpoint = endpoint
            .tls_config(tls.timeout(CONNECT_TIMEOUT))
            .with_context(|| format!("TLS settings for {url}"))?;
    }
    let channel = endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        // h2 ends a connection (GOAWAY ENHANCE_YOUR_CALM "too_many_data_frames")
        // whose unread small DATA frames cost more than half its connection
        // window, each costing up to 256 bytes less its payload. A pipeline
        // faster than this client sends small event frames (a few dozen
        // bytes each) up to the stream window: at hyper's defaults (2 MiB
        // stream, 5 MiB connection) some 12,000 unread events end the call.
        // A 512 KiB stream window under a 32 MiB connection window keeps
        // any one call's unread frames within budget down to 8-byte frames.
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        // While a call is open, a peer that stops answering (a host gone
        // without a reset, a port that never speaks HTTP/2) is found within
        // about 30 s instead of waiting forever. Only with a call open, as
        // servers and proxies expect (grpc-go refuses idle pings).
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(false)
        .connect()
        .await
        .map_err(|e| match fanout::tls::connect_error_reason(&e) {
            Some(why) => anyhow!("connecting to the pipeline at {url}: {why}"),
            None => anyhow::Error::new(e).context(format!("connecting to the pipeline at {url}")),
        })?;
    Ok(PipelineClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX))
}

/// The chain of errors under `status` (the transport's own words, e.g.
/// "keep-alive timed out"), each after ": ".
fn causes(status: &tonic::Status) -> String {
    let mut text = String::new();
    for e in fanout::error::chain(status).skip(1) {
        let s = e.to_string();
        if !text.contains(&s) && !status.message().contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
    }
    text
}

/// Runs `request` through the unary-request `Run` (the bench's path; `fanout
/// run` streams) and follows its events to the report. When the pipeline
/// left the per-record results out of the report (it would not have fit in
/// one 4 MiB message), they are put back from the `record` events, in input
/// order, so the report is whole either way.
pub async fn run(
    client: &mut PipelineClient<Channel>,
    request: proto::RunRequest,
) -> Result<proto::RunReport> {
    let keep = !request.options.as_ref().is_some_and(|o| o.summary_only);
    let mut results = Vec::new();
    let mut request = tonic::Request::new(request);
    fanout::otel::inject_current(request.metadata_mut());
    let mut stream = client
        .run(request)
        .await
        .map_err(|s| anyhow!("Run failed: {}: {}", code_name(s.code()), s.message()))?
        .into_inner();
    let mut report = loop {
        let event = stream
            .message()
            .await
            .map_err(|s| anyhow!("run stream failed: {}: {}", code_name(s.code()), s.message()))?
            .context("the pipeline closed the stream before the report")?;
        match event.event {
            Some(Event::Record(r)) if keep => results.push(r),
            Some(Event::Report(r)) => break r,
            Some(_) => {}
            None => bail!("the pipeline sent an empty event"),
        }
    };
    if report.results_omitted {
        results.sort_by_key(|r| r.index);
        report.results = results;
        report.results_omitted = false;
    }
    Ok(report)
}

/// Runs a streamed run: sends `header`, then the records of `batches` as
/// they come, then `done` with their count, while following the events to
/// the report. Keeps no per-record state, so memory does not grow with the
/// run; the report carries the failed records only (see `RunReport`).
/// Shows a progress bar on stderr when `progress` is set and stderr is a
/// terminal; writes each record's result to `output` as NDJSON when given,
/// and hands the events to `timeline` when given.
///
/// A bad input (an error from `batches`) cancels the call and returns that
/// error, which names the input position. `token` (`Bearer …`), when given,
/// goes as the call's `authorization` metadata.
pub async fn run_stream(
    client: &mut PipelineClient<Channel>,
    header: proto::RunHeader,
    mut batches: Batches,
    progress: bool,
    output: Option<&Path>,
    token: Option<&tonic::metadata::AsciiMetadataValue>,
    mut timeline: Option<&mut crate::timeline::Recorder>,
) -> Result<proto::RunReport> {
    // The first batch before the call, so an input empty or bad from its
    // start opens no run at all.
    let first = match batches.recv().await {
        Some(Ok(batch)) => batch,
        Some(Err(e)) => return Err(e.context("bad input: no run was started")),
        None => bail!("the input ended without records"),
    };
    let mut output = create_output(output)?;
    // Input goes out from a task of its own, so sending and reading events
    // always run concurrently: the pipeline reads input only as fast as it
    // dispatches records, so a client that sent everything before reading
    // would stall both ways on HTTP/2 flow control.
    let (tx, rx) = mpsc::channel(2);
    tx.try_send(proto::RunInput { input: Some(Input::Header(header)) }).expect("a new channel has room");
    let mut feeder = AbortOnDrop(tokio::spawn(feed(first, batches, tx)));
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(token) = token {
        request.metadata_mut().insert(fanout::auth::AUTHORIZATION, token.clone());
    }
    fanout::otel::inject_current(request.metadata_mut());
    let mut stream = match client.run_stream(request).await {
        Ok(response) => response.into_inner(),
        Err(s) => {
            // A bad input ends the request stream, which the pipeline may
            // refuse before any event; the input's own error says more.
            if feeder.0.is_finished()
                && let Ok(Fed::Bad { error, sent }) = (&mut feeder.0).await
            {
                return Err(cancelled(error, sent, 0));
            }
            // A refused TLS session (mTLS) shows up here, not at connect.
            let message = match fanout::tls::connect_error_reason(&s) {
                Some(why) => why,
                // With TLS 1.3 a refused client certificate may also just
                // close the connection under the first call.
                None if std::error::Error::source(&s).is_some() => format!(
                    "{}{} (the connection closed; if the pipeline requires a client certificate, check --cert \
                     and --key)",
                    s.message(),
                    causes(&s)
                ),
                None => s.message().to_owned(),
            };
            bail!("RunStream failed: {}: {message}", code_name(s.code()));
        }
    };
    let bar = progress_bar(None, progress);
    let (mut arrived, mut failed) = (0u64, 0u64);
    let mut fed = false;
    let report = async {
        loop {
            tokio::select! {
                // Input first: a bad input ends the request stream, and the
                // pipeline's answer to that must not hide the input's error.
                biased;
                outcome = &mut feeder.0, if !fed => {
                    fed = true;
                    match outcome.context("the input task failed")? {
                        Fed::All(total) => set_total(&bar, total),
                        // The call ended; the event stream says how.
                        Fed::Closed => {}
                        Fed::Bad { error, sent } => return Err(cancelled(error, sent, arrived)),
                    }
                }
                event = stream.message() => {
                    let event = event
                        .map_err(|s| {
                            anyhow!(
                                "RunStream failed: {}: {} ({arrived} record events had arrived)",
                                code_name(s.code()),
                                s.message()
                            )
                        })?
                        .with_context(|| {
                            format!(
                                "the pipeline closed the stream before the report \
                                 ({arrived} record events had arrived)"
                            )
                        })?;
                    match event.event {
                        Some(Event::Started(s)) => {
                            if let Some(t) = timeline.as_deref_mut() {
                                t.started(&s);
                            }
                            // The id to look the run up by in a trace viewer, or in the logs.
                            if !s.trace_id.is_empty() {
                                bar.suspend(|| eprintln!("trace id: {}", s.trace_id));
                            }
                            bar.set_prefix(s.run_id)
                        }
                        Some(Event::Record(r)) => {
                            if let Some(t) = timeline.as_deref_mut() {
                                t.record(&r);
                            }
                            arrived += 1;
                            if r.status() != RecordStatus::Succeeded {
                                failed += 1;
                                bar.set_message(format!("{failed} failed"));
                            }
                            bar.inc(1);
                            write_result(&mut output, &r)?;
                        }
                        Some(Event::Report(r)) => {
                            if let Some(t) = timeline.as_deref_mut() {
                                t.report(&r);
                            }
                            return Ok(r);
                        }
                        // The bar counts records itself; progress keeps the stream alive.
                        Some(Event::Progress(_)) => {}
                        None => bail!("the pipeline sent an empty event"),
                    }
                }
            }
        }
    }
    .await;
    // Dropping the event stream (on any error) cancels the call; dropping
    // the feeder stops the input reader.
    drop(stream);
    drop(feeder);
    bar.finish_and_clear();
    let report = report?;
    flush_output(output)?;
    Ok(report)
}

/// How the task feeding a `RunStream` call ended.
enum Fed {
    /// Every record and `done` were sent: the number of records.
    All(u64),
    /// The call stopped taking input (it ended; its status says why).
    Closed,
    /// The input was bad after `sent` records had been sent.
    Bad { error: anyhow::Error, sent: u64 },
}

/// The error of a run cancelled for its bad input.
fn cancelled(error: anyhow::Error, sent: u64, arrived: u64) -> anyhow::Error {
    error.context(format!(
        "the run was cancelled: bad input after {sent} records were sent ({arrived} record events had arrived)"
    ))
}

/// Sends `first`, then each batch as it comes, as `records` messages, then `done`.
async fn feed(first: Vec<proto::Record>, mut batches: Batches, tx: mpsc::Sender<proto::RunInput>) -> Fed {
    let mut sent = 0u64;
    let mut next = Some(Ok(first));
    while let Some(batch) = next {
        let records = match batch {
            Ok(records) => records,
            Err(error) => return Fed::Bad { error, sent },
        };
        let n = records.len() as u64;
        let input = Input::Records(proto::RecordBatch { records });
        if tx.send(proto::RunInput { input: Some(input) }).await.is_err() {
            return Fed::Closed;
        }
        sent += n;
        next = batches.recv().await;
    }
    let done = Input::Done(proto::InputDone { record_count: sent });
    match tx.send(proto::RunInput { input: Some(done) }).await {
        Ok(()) => Fed::All(sent),
        Err(_) => Fed::Closed,
    }
}

/// Aborts the task when dropped, so no path out of a run leaves it running.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The `--output` file, when asked for.
fn create_output(path: Option<&Path>) -> Result<Option<BufWriter<File>>> {
    path.map(|p| File::create(p).map(BufWriter::new).with_context(|| format!("creating {}", p.display())))
        .transpose()
}

/// Writes one record's result to the `--output` file, one JSON object per line.
fn write_result(output: &mut Option<BufWriter<File>>, r: &proto::RecordResult) -> Result<()> {
    if let Some(out) = output {
        serde_json::to_writer(&mut *out, &crate::render::result_json(r))?;
        out.write_all(b"\n").context("writing the results file")?;
    }
    Ok(())
}

fn flush_output(output: Option<BufWriter<File>>) -> Result<()> {
    if let Some(mut out) = output {
        out.flush().context("writing the results file")?;
    }
    Ok(())
}

/// A progress bar on stderr, or a hidden one when not wanted or stderr is
/// not a terminal; `total` may be unknown until the input has been read.
fn progress_bar(total: Option<u64>, wanted: bool) -> ProgressBar {
    if !wanted || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{prefix} {spinner} {pos} records {msg} [{elapsed_precise}, {per_sec}]")
            .expect("valid template"),
    );
    if let Some(total) = total {
        set_total(&bar, total);
    }
    bar
}

/// Gives the bar its total, with the bar and the ETA that now make sense.
fn set_total(bar: &ProgressBar, total: u64) {
    bar.set_length(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} {bar:30.cyan/blue} {pos}/{len} records {msg} [{elapsed_precise}, {per_sec}, eta {eta}]",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
}

/// The process exit code for a run's status: 0 only when it succeeded.
pub fn exit_code(report: &proto::RunReport) -> i32 {
    match report.status() {
        proto::RunStatus::Succeeded => 0,
        proto::RunStatus::PartiallyFailed => 3,
        proto::RunStatus::Failed => 4,
        proto::RunStatus::Cancelled => 5,
        proto::RunStatus::Unspecified => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::{self, BatchLimits};
    use fanout::proto::pipeline_server::{Pipeline, PipelineServer};
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use tokio::sync::watch;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::{Request, Response, Status, Streaming};

    type Events = Pin<Box<dyn futures::Stream<Item = Result<proto::RunEvent, Status>> + Send>>;

    /// A `Pipeline` serving `RunStream` only: checks the header comes first,
    /// answers each record at once (ids starting with `fail` fail, `boom`
    /// ends the call with INVALID_ARGUMENT), checks `done`'s count, and
    /// reports the failures (at most 2; the rest counted as omitted). Like
    /// the real pipeline it reads input only as fast as its events are read.
    #[derive(Clone)]
    struct Fake {
        /// How the input ended: "done", "ended without done", or the input's error code.
        ended: Arc<watch::Sender<Option<String>>>,
        /// `RunStream` calls received.
        calls: Arc<AtomicUsize>,
        /// Record events sent (taken by the response stream).
        sent: Arc<watch::Sender<usize>>,
    }

    impl Default for Fake {
        fn default() -> Self {
            Self {
                ended: Arc::new(watch::channel(None).0),
                calls: Arc::default(),
                sent: Arc::new(watch::channel(0).0),
            }
        }
    }

    fn event(e: Event) -> Result<proto::RunEvent, Status> {
        Ok(proto::RunEvent { event: Some(e) })
    }

    impl Fake {
        async fn follow(
            &self,
            mut input: Streaming<proto::RunInput>,
            run_id: String,
            tx: mpsc::Sender<Result<proto::RunEvent, Status>>,
        ) {
            let started = proto::RunStarted { run_id: run_id.clone(), ..Default::default() };
            let _ = tx.send(event(Event::Started(started))).await;
            let (mut index, mut failures, mut omitted) = (0u64, Vec::new(), 0u64);
            let ended = loop {
                let batch = match input.message().await {
                    Ok(Some(proto::RunInput { input: Some(Input::Records(b)) })) => b,
                    Ok(Some(proto::RunInput { input: Some(Input::Done(d)) })) => {
                        assert_eq!(d.record_count, index, "done's count");
                        let failed = failures.len() as u64 + omitted;
                        let report = proto::RunReport {
                            run_id,
                            status: if failed == 0 {
                                proto::RunStatus::Succeeded
                            } else {
                                proto::RunStatus::PartiallyFailed
                            } as i32,
                            summary: Some(proto::RunSummary {
                                total_records_processed: index,
                                records_failed: failed,
                                records_succeeded: index - failed,
                                ..Default::default()
                            }),
                            results: failures,
                            failures_omitted: omitted,
                            ..Default::default()
                        };
                        let _ = tx.send(event(Event::Report(report))).await;
                        break "done".to_string();
                    }
                    Ok(Some(other)) => panic!("unexpected input {other:?}"),
                    Ok(None) => {
                        let _ = tx.send(Err(Status::invalid_argument("input ended without done"))).await;
                        break "ended without done".into();
                    }
                    Err(s) => break code_name(s.code()).into(),
                };
                for r in batch.records {
                    if r.id == "boom" {
                        let msg = format!("record {index} ({:?}): boom", r.id);
                        let _ = tx.send(Err(Status::invalid_argument(msg))).await;
                        return;
                    }
                    let fail = r.id.starts_with("fail");
                    let result = proto::RecordResult {
                        record_id: r.id,
                        index,
                        status: if fail { RecordStatus::Failed } else { RecordStatus::Succeeded } as i32,
                        error: fail.then(|| proto::Error {
                            code: 13,
                            code_name: "INTERNAL".into(),
                            message: "failed on purpose".into(),
                        }),
                        ..Default::default()
                    };
                    if fail {
                        if failures.len() < 2 {
                            failures.push(result.clone());
                        } else {
                            omitted += 1;
                        }
                    }
                    if tx.send(event(Event::Record(result))).await.is_err() {
                        return;
                    }
                    self.sent.send_modify(|n| *n += 1);
                    index += 1;
                }
            };
            self.ended.send_replace(Some(ended));
        }
    }

    #[tonic::async_trait]
    impl Pipeline for Fake {
        type RunStream = Events;
        type RunStreamStream = Events;

        async fn run(&self, _: Request<proto::RunRequest>) -> Result<Response<Events>, Status> {
            Err(Status::unimplemented("fake"))
        }

        async fn run_stream(
            &self,
            request: Request<Streaming<proto::RunInput>>,
        ) -> Result<Response<Events>, Status> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let mut input = request.into_inner();
            let header = match input.message().await? {
                Some(proto::RunInput { input: Some(Input::Header(h)) }) => h,
                _ => return Err(Status::invalid_argument("the header must come first")),
            };
            // One event at a time: input is read only as fast as events are.
            let (tx, rx) = mpsc::channel(1);
            let fake = self.clone();
            tokio::spawn(async move { fake.follow(input, header.run_id, tx).await });
            Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
        }
    }

    /// Serves a fresh fake on a loopback port; returns a client and the fake.
    async fn serve() -> (PipelineClient<Channel>, Fake) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let fake = Fake::default();
        let service = PipelineServer::new(fake.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                // Far smaller than a large run's input, so a client that
                // sent everything before reading would deadlock.
                .initial_stream_window_size(64 << 10)
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        (connect(&url).await.unwrap(), fake)
    }

    fn header(run_id: &str) -> proto::RunHeader {
        proto::RunHeader { run_id: run_id.into(), ..Default::default() }
    }

    fn text_batches(text: &str, max_records: usize) -> Batches {
        let reader = std::io::Cursor::new(text.as_bytes().to_vec());
        input::read_batches(reader, BatchLimits { max_records, max_bytes: 1 << 20 })
    }

    /// Waits for the fake to see the end of the input.
    async fn ended(fake: &Fake) -> String {
        let mut rx = fake.ended.subscribe();
        let seen = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(Option::is_some)).await;
        seen.expect("the fake never saw the input end").unwrap().clone().unwrap()
    }

    /// Many small batches through a server that takes input only as fast as
    /// its events are read: finishes only if sending and reading overlap.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_a_large_run() {
        let (mut client, fake) = serve().await;
        let batches = input::generated_batches(50_000, BatchLimits { max_records: 250, max_bytes: 1 << 20 });
        let run = run_stream(&mut client, header("big"), batches, false, None, None, None);
        let report = tokio::time::timeout(Duration::from_secs(60), run).await.expect("no deadlock").unwrap();
        assert_eq!(report.run_id, "big");
        assert_eq!(report.status(), proto::RunStatus::Succeeded);
        assert_eq!(report.summary.unwrap().total_records_processed, 50_000);
        assert!(report.results.is_empty());
        assert_eq!(ended(&fake).await, "done");
    }

    #[tokio::test]
    async fn writes_each_result_and_reports_failures() {
        let (mut client, _) = serve().await;
        let path = std::env::temp_dir().join(format!("fanout-session-{}.ndjson", std::process::id()));
        let text =
            ["a", "fail-1", "b", "fail-2", "fail-3"].map(|id| format!("{{\"id\":\"{id}\"}}\n")).concat();
        let report =
            run_stream(&mut client, header("r"), text_batches(&text, 2), false, Some(&path), None, None)
                .await
                .unwrap();
        assert_eq!(report.status(), proto::RunStatus::PartiallyFailed);
        assert_eq!(
            report.results.iter().map(|r| r.record_id.as_str()).collect::<Vec<_>>(),
            ["fail-1", "fail-2"]
        );
        assert_eq!(report.failures_omitted, 1);
        let written = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let lines: Vec<serde_json::Value> =
            written.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[3]["record_id"], "fail-2");
        assert_eq!(lines[3]["status"], "RECORD_STATUS_FAILED");
        assert_eq!(lines[3]["index"], 3);
    }

    #[tokio::test]
    async fn server_error_names_code_and_records_arrived() {
        let (mut client, _) = serve().await;
        let text = "{\"id\":\"a\"}\n{\"id\":\"b\"}\n{\"id\":\"boom\"}\n{\"id\":\"c\"}\n";
        let e = run_stream(&mut client, header("r"), text_batches(text, 10), false, None, None, None)
            .await
            .unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("INVALID_ARGUMENT") && e.contains("record 2 (\"boom\")"), "{e}");
        assert!(e.contains("2 record events had arrived"), "{e}");
    }

    #[tokio::test]
    async fn input_bad_from_the_start_opens_no_run() {
        let (mut client, fake) = serve().await;
        for (text, want) in [("\n \n", "no records"), ("{\"id\":\"a\"}\n{\"id\"\n", "line 2")] {
            let e = run_stream(&mut client, header("r"), text_batches(text, 10), false, None, None, None)
                .await
                .unwrap_err();
            let e = format!("{e:#}");
            assert!(e.contains("no run was started") && e.contains(want), "{e}");
        }
        // A call the client had opened would have reached the fake before
        // the client's error (its response headers follow the handler).
        assert_eq!(fake.calls.load(Ordering::SeqCst), 0, "no call reached the pipeline");
    }

    #[tokio::test]
    async fn bad_input_cancels_the_run() {
        let (mut client, fake) = serve().await;
        let text = "{\"id\":\"a\"}\n{\"id\":\"b\"}\n{\"id\":\"c\"}\n{\"id\":\n";
        let e = run_stream(&mut client, header("r"), text_batches(text, 2), false, None, None, None)
            .await
            .unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("cancelled") && e.contains("line 4"), "{e}");
        assert!(e.contains("after 2 records were sent"), "{e}");
        // The fake never got `done`: the call was cancelled, or its input
        // ended short of `done`; either way the run cannot complete.
        assert_ne!(ended(&fake).await, "done");
    }

    /// Events left unread pile up as small DATA frames; h2 ends a connection
    /// whose unread small frames exceed its budget, which `connect`'s
    /// windows keep out of reach (hyper's defaults did not).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unread_events_do_not_end_the_connection() {
        const N: usize = 30_000;
        let (mut client, fake) = serve().await;
        let records = input::generated_records(N);
        let mut inputs = vec![proto::RunInput { input: Some(Input::Header(header("slow"))) }];
        for chunk in records.chunks(1000) {
            let batch = proto::RecordBatch { records: chunk.to_vec() };
            inputs.push(proto::RunInput { input: Some(Input::Records(batch)) });
        }
        inputs
            .push(proto::RunInput { input: Some(Input::Done(proto::InputDone { record_count: N as u64 })) });
        let mut events = client.run_stream(tokio_stream::iter(inputs)).await.unwrap().into_inner();
        // Read nothing until 20,000 events wait unread: under hyper's
        // default windows h2 ends the connection before that (it charges
        // each small frame about 230 bytes against half the 5 MiB
        // connection window), and the fake stalls; `connect`'s 512 KiB
        // stream window holds about 22,000 of these ~23-byte events.
        let mut sent = fake.sent.subscribe();
        let piled = tokio::time::timeout(Duration::from_secs(10), sent.wait_for(|&n| n >= 20_000)).await;
        piled.expect("the fake could not send 20,000 events ahead of the client").unwrap();
        let mut arrived = 0;
        while let Some(e) = events.message().await.unwrap() {
            arrived += usize::from(matches!(e.event, Some(Event::Record(_))));
        }
        assert_eq!(arrived, N);
        assert_eq!(ended(&fake).await, "done");
    }
}
