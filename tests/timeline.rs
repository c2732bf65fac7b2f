//! `fanout run --timeline`: the real client binary against in-process
//! servers, its page's embedded data checked against what the processors
//! saw (every attempt, its processor and outcome), record ids escaped, and
//! a page written for a run that failed.

mod common;

use common::timeline::*;
use common::*;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// What an id inside a page must never appear as: it would end the data
/// block and inject markup.
const INJECTION: &str = "</script><b>x";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeline_holds_every_attempt_with_its_processor_and_outcome() {
    let script = Arc::new(
        Script::new()
            .transient("flaky", 2) // fails twice, then succeeds on its third attempt
            .transient("doomed", 5) // fails all of its 3 attempts
            .permanent("bad") // fails once, never retried
            .transient(INJECTION, 1),
    );
    let a = start_processor(TestWorkload::new("a", &script)).await;
    let b = start_processor(TestWorkload::new("b", &script)).await;
    let pipeline = start_pipeline(&[a.url.clone(), b.url.clone()]).await;
    let dir = Scratch::new("attempts");
    let mut ids: Vec<String> = (0..30).map(|i| format!("rec-{i:02}")).collect();
    ids.extend(["flaky", "doomed", "bad", INJECTION].map(String::from));
    let input: Vec<_> = ids.iter().map(|id| (id.clone(), json!({"units": 2}))).collect();
    write_ndjson(&dir.path("in.ndjson"), &input);
    let (page, input) = (dir.path("t.html"), dir.path("in.ndjson"));
    let args = [
        "run",
        input.to_str().unwrap(),
        "--pipeline",
        &pipeline.url(),
        "--params",
        r#"{"rounds": 10}"#,
        "--max-attempts",
        "3",
        "--max-in-flight",
        "8",
        "--quiet",
        "--timeline",
        page.to_str().unwrap(),
    ];
    let (status, stderr) = run_client(&dir, &args).await;
    assert_eq!(status.code(), Some(3), "PARTIALLY_FAILED: {stderr}");
    let html = std::fs::read_to_string(&page).expect("the page was written");
    assert!(!html.contains(INJECTION), "the id appears unescaped in the page");
    assert!(!html.contains("<b>"), "markup from an id reached the page");
    let data = embedded(&html);
    assert_eq!(data["status"], "RUN_STATUS_PARTIALLY_FAILED");
    let s = &data["summary"];
    assert_eq!(
        (s["records"].as_u64(), s["succeeded"].as_u64(), s["failed"].as_u64()),
        (Some(34), Some(32), Some(2))
    );
    // flaky 2 retries, doomed 2, the injected id 1.
    assert_eq!((s["attempts"].as_u64(), s["retries"].as_u64()), (Some(34 + 5), Some(5)));
    assert_eq!(data["not_drawn"], 0);

    // Lanes are the two instances, named by address as results name them.
    let label = HashMap::from([("a", a.addr.as_str()), ("b", b.addr.as_str())]);
    let lanes: Vec<&str> =
        data["lanes"].as_array().unwrap().iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(lanes.len(), 2, "{lanes:?}");
    assert!(
        lanes.iter().all(|l| l.starts_with(a.addr.as_str()) || l.starts_with(b.addr.as_str())),
        "{lanes:?}"
    );

    let bars = bars_by_record(&data);
    assert_eq!(bars.len(), ids.len(), "every record has its attempts drawn");
    for id in &ids {
        let got = &bars[id];
        // The processors saw the same attempts, on the same instances, in order.
        let seen: Vec<&str> = script.attempts_of(id).iter().map(|l| label[l.as_str()]).collect();
        let lanes: Vec<&str> = got.iter().map(|b| b.lane.as_str()).collect();
        assert_eq!(seen.len(), lanes.len(), "{id}: {got:?}");
        for (lane, addr) in lanes.iter().zip(&seen) {
            assert!(lane.starts_with(addr), "{id}: drawn on {lane}, ran on {addr}");
        }
        let numbers: Vec<u64> = got.iter().map(|b| b.attempt).collect();
        assert_eq!(numbers, (1..=got.len() as u64).collect::<Vec<_>>(), "{id}");
        for pair in got.windows(2) {
            assert!(
                pair[1].start_us >= pair[0].start_us + pair[0].elapsed_us,
                "{id}: attempts overlap: {got:?}"
            );
        }
        let outcomes: Vec<&str> = got.iter().map(|b| b.outcome.as_str()).collect();
        let want: &[&str] = match id.as_str() {
            "flaky" => &["retried", "retried", "succeeded"],
            "doomed" => &["retried", "retried", "failed"],
            "bad" => &["failed"],
            INJECTION => &["retried", "succeeded"],
            _ => &["succeeded"],
        };
        assert_eq!(outcomes, want, "{id}");
    }
    let doomed = bars["doomed"][2].error.as_deref().unwrap();
    assert!(doomed.starts_with("UNAVAILABLE: ") && doomed.contains("injected transient failure"), "{doomed}");
    let bad = bars["bad"][0].error.as_deref().unwrap();
    assert!(bad.starts_with("FAILED_PRECONDITION: ") && bad.contains("injected permanent"), "{bad}");
    assert!(bars["flaky"][2].error.is_none());
}

/// A run failed by its tolerance still gets its page: the record in
/// flight when the run stopped shows a cancelled attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_still_writes_its_timeline_with_cancelled_attempts() {
    let workload =
        HoldThenFail { hold: "hold".into(), fail: "fail".into(), holding: Arc::new(AtomicBool::new(false)) };
    let p = start_processor(workload).await;
    let pipeline = start_pipeline(std::slice::from_ref(&p.url)).await;
    let dir = Scratch::new("cancelled");
    let input = [("hold".to_string(), json!({"units": 1})), ("fail".to_string(), json!({"units": 1}))];
    write_ndjson(&dir.path("in.ndjson"), &input);
    let (page, input) = (dir.path("t.html"), dir.path("in.ndjson"));
    let args = [
        "run",
        input.to_str().unwrap(),
        "--pipeline",
        &pipeline.url(),
        "--tolerated-failures",
        "0",
        "--max-in-flight",
        "2",
        "--quiet",
        "--timeline",
        page.to_str().unwrap(),
    ];
    let (status, stderr) = run_client(&dir, &args).await;
    assert_eq!(status.code(), Some(4), "FAILED: {stderr}");
    let data = embedded(&std::fs::read_to_string(&page).expect("the page was written"));
    assert_eq!(data["status"], "RUN_STATUS_FAILED");
    assert_eq!(data["summary"]["cancelled"], 1);
    let bars = bars_by_record(&data);
    assert_eq!(bars["fail"].iter().map(|b| b.outcome.as_str()).collect::<Vec<_>>(), ["failed"]);
    let hold = &bars["hold"];
    assert_eq!(hold.iter().map(|b| b.outcome.as_str()).collect::<Vec<_>>(), ["cancelled"], "{hold:?}");
    assert!(hold[0].error.as_deref().unwrap().starts_with("CANCELLED: "), "{hold:?}");
    assert!(hold[0].lane.starts_with(&p.addr), "{hold:?}");
}

/// Batched calls (`ProcessBatch`) log an attempt per record too, with the
/// size of the call it went in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_attempts_are_logged_per_record() {
    let script = Arc::new(Script::new().transient("rec-05", 1));
    let a = start_processor(TestWorkload::new("a", &script)).await;
    let pipeline = start_pipeline(std::slice::from_ref(&a.url)).await;
    let dir = Scratch::new("batched");
    let ids: Vec<String> = (0..40).map(|i| format!("rec-{i:02}")).collect();
    let input: Vec<_> = ids.iter().map(|id| (id.clone(), json!({"units": 1}))).collect();
    write_ndjson(&dir.path("in.ndjson"), &input);
    let (page, input) = (dir.path("t.html"), dir.path("in.ndjson"));
    let args = [
        "run",
        input.to_str().unwrap(),
        "--pipeline",
        &pipeline.url(),
        "--batch-size",
        "8",
        "--max-in-flight",
        "16",
        "--quiet",
        "--timeline",
        page.to_str().unwrap(),
    ];
    let (status, stderr) = run_client(&dir, &args).await;
    assert_eq!(status.code(), Some(0), "SUCCEEDED: {stderr}");
    let bars = bars_by_record(&embedded(&std::fs::read_to_string(&page).unwrap()));
    for id in &ids {
        assert_eq!(bars[id].len(), script.attempts_of(id).len(), "{id}: {:?}", bars[id]);
        assert!(bars[id].iter().all(|b| (1..=8).contains(&b.batch_size)), "{id}: {:?}", bars[id]);
    }
    let outcomes: Vec<&str> = bars["rec-05"].iter().map(|b| b.outcome.as_str()).collect();
    assert_eq!(outcomes, ["retried", "succeeded"]);
    // 40 records, at most 16 in flight: some calls carried several.
    assert!(bars.values().flatten().any(|b| b.batch_size > 1), "no batched call: {bars:?}");
}
