//! `RunStream`: records streamed in, read only as fast as they are
//! dispatched, each accounted for exactly once; bad input mid-stream ends
//! the run naming the record; a failure share judged on a stream.

mod common;

use common::*;
use fanout::proto::pipeline_client::PipelineClient;
use fanout::proto::{self, run_event::Event};
use fanout::workload::Digest;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tonic::Code;
use tonic::transport::Channel;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_run_accounts_for_every_record_exactly_once() {
    let p1 = start_processor(Digest::default()).await;
    let p2 = start_processor(Digest::default()).await;
    let pipeline = start_pipeline(&[p1.url.clone(), p2.url.clone()]).await;
    let mut client = pipeline_client(&pipeline.url()).await;
    let ids = ids(3000);
    let got = run_stream(&mut client, stream_of(&ids, 250, Default::default()), None).await.unwrap();
    got.assert_exactly_once(&ids);
    let report = got.report();
    assert_eq!(report.status(), proto::RunStatus::Succeeded);
    assert!(report.results.is_empty(), "a stream's report carries failures only");
    for r in got.records.iter().step_by(97) {
        assert_output(r, &expected(&r.record_id, None, ROUNDS));
    }
}

/// A fleet that dispatches nothing until `gate` opens (one gated
/// processor; opened on drop), its pipeline sending progress every 20 ms.
struct Blocked {
    gate: Arc<Gate>,
    _open: OpenOnDrop,
    _p: Proc,
    _pipeline: fanout::server::Running,
    client: PipelineClient<Channel>,
}

impl Blocked {
    async fn start() -> Self {
        let gate = Gate::closed();
        let _open = gate.open_on_drop();
        let script = Arc::new(Script::new());
        let _p = start_processor(TestWorkload::new("p", &script).gated(&gate)).await;
        let mut cfg = pipeline_config(std::slice::from_ref(&_p.url));
        cfg.progress_interval = Duration::from_millis(20);
        let _pipeline = fanout::server::start_pipeline(&cfg).await.unwrap();
        let client = pipeline_client(&_pipeline.url()).await;
        Self { gate, _open, _p, _pipeline, client }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_that_outruns_the_fleet_waits_in_the_client() {
    // One slow record at a time: the client could send 100 MB of records
    // in no time, and the pipeline must not read them ahead.
    let Blocked { gate, _open, _p, _pipeline, mut client } = Blocked::start().await;

    const BATCHES: usize = 200;
    const PER_BATCH: usize = 100;
    let pad = "x".repeat(1000);
    let taken = Arc::new(AtomicUsize::new(0));
    let opts = proto::RunOptions { max_in_flight: 4, ..Default::default() };
    let input = {
        let taken = taken.clone();
        let pad = pad.clone();
        let batches = (0..BATCHES).map(move |b| {
            let records = (0..PER_BATCH)
                .map(|i| record_with(&format!("r{:06}", b * PER_BATCH + i), json!({"pad": pad, "units": 1})))
                .collect();
            batch_msg(records)
        });
        let msgs = std::iter::once(header_msg(opts, rounds(ROUNDS)))
            .chain(batches)
            .chain(std::iter::once(done_msg((BATCHES * PER_BATCH) as u64)))
            .inspect(move |_| {
                taken.fetch_add(1, Ordering::SeqCst);
            });
        tokio_stream::iter(msgs)
    };
    let mut stream = client.run_stream(input).await.unwrap().into_inner();
    // While the gate is closed, nothing finishes: watch 20 progress events.
    let mut seen = 0;
    while seen < 20 {
        let ev = tokio::time::timeout(WAIT, stream.message()).await.unwrap().unwrap().unwrap();
        match ev.event.unwrap() {
            Event::Started(s) => assert_eq!(s.record_count, 0),
            Event::Progress(p) => {
                seen += 1;
                // In flight (4), the buffer (4) and the batch read last.
                assert!(p.records_received <= 4 + 4 + PER_BATCH as u64, "read ahead: {p:?}");
                assert!(p.records_in_flight <= 4, "{p:?}");
            }
            other => panic!("nothing can finish yet: {other:?}"),
        }
    }
    // The rest waits in the client: HTTP/2 flow control stopped its sends
    // after about a window's worth (about 1 MiB; each batch is 100 KB).
    let sent = taken.load(Ordering::SeqCst);
    assert!(sent < 60, "the client sent {sent} of {BATCHES} batches: the pipeline read ahead");
    gate.open();
    let mut n = 0;
    let report = loop {
        let ev =
            tokio::time::timeout(Duration::from_secs(120), stream.message()).await.unwrap().unwrap().unwrap();
        match ev.event.unwrap() {
            Event::Record(r) => {
                assert_eq!(r.status(), proto::RecordStatus::Succeeded, "{r:?}");
                n += 1;
            }
            Event::Report(r) => break r,
            _ => {}
        }
    };
    assert_eq!(n, BATCHES * PER_BATCH);
    assert_eq!(report.summary.unwrap().records_succeeded, (BATCHES * PER_BATCH) as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tiny_record_per_message_to_a_blocked_fleet_keeps_the_connection() {
    // A client that sends each record in its own message, each flushed as
    // its own small DATA frame, while its run cannot dispatch: the unread
    // frames must stay within what h2 lets a peer leave unread (before the
    // pipeline set its receive windows, h2 closed the connection within
    // 0.2 s here).
    let Blocked { gate, _open, _p, _pipeline, mut client } = Blocked::start().await;
    const N: usize = 20_000;
    let opts = proto::RunOptions { max_in_flight: 4, ..Default::default() };
    let ids: Vec<String> = (0..N).map(|i| format!("r{i}")).collect();
    let mut msgs = vec![header_msg(opts, rounds(1))];
    msgs.extend(ids.iter().map(|id| batch_msg(vec![record_with(id, json!({"units": 1}))])));
    msgs.push(done_msg(N as u64));
    // One message at a time, yielding between them, so the client's encoder
    // never packs several into one frame.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        for m in msgs {
            if tx.send(m).await.is_err() {
                return;
            }
            tokio::task::yield_now().await;
        }
    });
    let mut stream =
        client.run_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    // Half a second of the client pushing against a blocked run.
    let mut seen = 0;
    while seen < 25 {
        let ev = tokio::time::timeout(WAIT, stream.message()).await.unwrap();
        match ev.expect("the stream failed while the fleet was blocked").expect("ended").event.unwrap() {
            Event::Progress(_) => seen += 1,
            Event::Started(_) => {}
            other => panic!("nothing can finish yet: {other:?}"),
        }
    }
    gate.open();
    let mut done = 0;
    let report = loop {
        let ev = tokio::time::timeout(Duration::from_secs(120), stream.message()).await.unwrap();
        match ev.expect("the stream failed").expect("ended before the report").event.unwrap() {
            Event::Record(r) => {
                assert_eq!(r.status(), proto::RecordStatus::Succeeded, "{r:?}");
                done += 1;
            }
            Event::Report(r) => break r,
            _ => {}
        }
    };
    assert_eq!(done, N);
    assert_eq!(report.summary.unwrap().records_succeeded, N as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_slows_its_run_and_is_cancelled() {
    let p = start_processor(Digest::default()).await;
    let mut cfg = pipeline_config(std::slice::from_ref(&p.url));
    cfg.stalled_client_timeout = Duration::from_secs(2);
    let pipeline = fanout::server::start_pipeline(&cfg).await.unwrap();
    // Small receive windows, so unread events stop the pipeline's sends soon.
    let mut client = small_window_client(&pipeline.url()).await;
    let ids: Vec<String> = (0..20_000).map(|i| format!("r{i:05}-{}", "y".repeat(100))).collect();
    let input = tokio_stream::iter(stream_of(&ids, 500, Default::default()));
    let mut stream = client.run_stream(input).await.unwrap().into_inner();
    let first = tokio::time::timeout(WAIT, stream.message()).await.unwrap().unwrap().unwrap();
    assert!(matches!(first.event, Some(Event::Started(_))));
    // Reads nothing more: the run stops starting records, then is cancelled.
    wait_until("the unread run to be cancelled", || pipeline.active_runs() == 0).await;
    let started = get(&p.stats.records_started);
    // What an unread run may start: what fits the client's 16 KiB window
    // (~100 events of ~150 bytes), the 32-event channel, the 64-event outbox
    // and 64 in flight, about 260; the bound leaves room for timing, and
    // is a tenth of the run.
    assert!(started < 2000, "{started} of 20,000 records started for a client reading nothing");
    assert_ends_without_report(&mut stream).await;
}

/// Sends `input` and expects the run to end with `code`, naming `needles`,
/// after a record event for each of the first `accepted` records.
async fn assert_ends_with(input: Vec<proto::RunInput>, accepted: usize, code: Code, needles: &[&str]) {
    let p = start_processor(Digest::default()).await;
    let pipeline = start_pipeline(std::slice::from_ref(&p.url)).await;
    let mut client = pipeline_client(&pipeline.url()).await;
    let got = run_stream(&mut client, input, None).await.unwrap();
    let status = got.end.as_ref().expect_err("the run must end with a status");
    assert_status(status, code, needles);
    got.assert_each_once(&ids(accepted));
    // Finished records kept their results; in-flight ones were cancelled.
    for r in &got.records {
        if r.status() != proto::RecordStatus::Succeeded {
            let e = r.error.as_ref().unwrap();
            assert_eq!(e.code, Code::Cancelled as i32, "{r:?}");
            assert!(e.message.contains("bad input"), "{r:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_mid_stream_ends_the_run_naming_the_record() {
    let h = || header_msg(Default::default(), rounds(ROUNDS));
    let batch =
        |from: usize, to: usize| batch_msg((from..to).map(|i| record(&format!("rec-{i:03}"))).collect());
    // A repeated id in the second batch: the records before it are kept.
    let dup = batch_msg(vec![record("rec-010"), record("rec-011"), record("rec-003"), record("rec-013")]);
    assert_ends_with(
        vec![h(), batch(0, 10), dup, done_msg(14)],
        12,
        Code::InvalidArgument,
        &["record 12", "rec-003", "repeats"],
    )
    .await;
    // An empty id.
    let empty = batch_msg(vec![record("rec-005"), record("")]);
    assert_ends_with(vec![h(), batch(0, 5), empty], 6, Code::InvalidArgument, &["record 6", "id", "empty"])
        .await;
    // A count that does not match.
    assert_ends_with(
        vec![h(), batch(0, 7), done_msg(8)],
        7,
        Code::InvalidArgument,
        &["done.record_count is 8", "7 records were sent"],
    )
    .await;
    // A second header.
    assert_ends_with(
        vec![h(), batch(0, 3), h()],
        3,
        Code::InvalidArgument,
        &["second `header`", "3 records"],
    )
    .await;
    // The input closed without `done`.
    assert_ends_with(
        vec![h(), batch(0, 4)],
        4,
        Code::InvalidArgument,
        &["ended after 4 records without `done`"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_header_is_refused_before_the_run_starts() {
    let p = start_processor(Digest::default()).await;
    let pipeline = start_pipeline(std::slice::from_ref(&p.url)).await;
    let mut client = pipeline_client(&pipeline.url()).await;
    let err =
        run_stream(&mut client, vec![batch_msg(vec![record("a")]), done_msg(1)], None).await.unwrap_err();
    assert_status(&err, Code::InvalidArgument, &["first message", "header"]);
    let opts = proto::RunOptions { max_batch_size: 5000, ..Default::default() };
    let err =
        run_stream(&mut client, vec![header_msg(opts, rounds(1)), done_msg(0)], None).await.unwrap_err();
    assert_status(&err, Code::InvalidArgument, &["options.max_batch_size", "1024"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_share_is_judged_on_a_stream_once_enough_finished() {
    // Every 5th record fails: 20%.
    let ids = ids(3000);
    let mut script = Script::new();
    for id in ids.iter().step_by(5) {
        script = script.permanent(id);
    }
    let script = Arc::new(script);
    let p = start_processor(TestWorkload::new("p", &script)).await;
    let pipeline = start_pipeline(std::slice::from_ref(&p.url)).await;
    let mut client = pipeline_client(&pipeline.url()).await;
    // 10% tolerated: the run fails once 1,000 records have finished, without
    // waiting for the end of its input.
    let opts = proto::RunOptions { tolerated_failure_percentage: Some(10.0), ..Default::default() };
    let mut msgs = stream_of(&ids, 100, opts);
    msgs.pop(); // never says `done`: the total is never known
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        for m in msgs {
            let _ = tx.send(m).await;
        }
        // Holds the input open until the run is over.
        tx.closed().await;
    });
    let got = tokio::time::timeout(
        WAIT,
        collect_stream(&mut client, tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .unwrap()
    .unwrap();
    let report = got.report();
    assert_eq!(report.status(), proto::RunStatus::Failed);
    let s = report.summary.unwrap();
    assert!(s.total_records_processed >= 1000, "{s:?}");
    let cancelled =
        got.records.iter().filter(|r| r.error.as_ref().is_some_and(|e| e.code == Code::Cancelled as i32));
    let first = cancelled.clone().next().expect("records left were cancelled");
    assert!(first.error.as_ref().unwrap().message.contains("finished so far failed"), "{first:?}");
    got.assert_each_once(&ids[..s.total_records_processed as usize]);

    // 30% tolerated: the run goes to its end, PARTIALLY_FAILED.
    let opts = proto::RunOptions { tolerated_failure_percentage: Some(30.0), ..Default::default() };
    let got = run_stream(&mut client, stream_of(&ids, 100, opts), None).await.unwrap();
    got.assert_exactly_once(&ids);
    assert_eq!(got.report().status(), proto::RunStatus::PartiallyFailed);
    assert_eq!(got.report().summary.unwrap().records_failed, 600);
    assert_eq!(got.report().results.len(), 600);
}
