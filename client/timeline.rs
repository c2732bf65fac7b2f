//! `--timeline FILE.html`: a run's attempts as a self-contained HTML page.
//!
//! The run asks the pipeline for each record's attempt log
//! (`RunOptions.attempt_log`); [`Recorder`] keeps what it needs of each
//! `record` event as it arrives (counts of everything, and the first
//! [`MAX_DRAWN`] attempts compactly) and [`Recorder::write`] writes the
//! page: inline CSS and JavaScript, no network access, the data in a
//! `<script type="application/json" id="timeline-data">` block that the
//! script renders as SVG (one lane per processor instance, a bar per
//! attempt, a summary above).
//!
//! The data block, for tools and tests:
//! - `run_id`, `started_at` (RFC 3339), `status` (`RUN_STATUS_…`, null
//!   without a report), `ended_with` (why the run ended without a report,
//!   or null);
//! - `summary`: `records`, `succeeded`, `failed` (cancelled included),
//!   `cancelled`, `attempts`, `retries`, `wall_seconds`,
//!   `records_per_second`, `unlogged_records` (records with attempts but no
//!   attempt log: a pipeline that does not keep one);
//! - `lanes`: one per processor, in order of first appearance: `name`,
//!   `attempts`, `succeeded`, `retried`, `failed`, `cancelled`, `records`
//!   (records whose last attempt ran there), `busy_seconds`;
//! - `bars`: one array per drawn attempt, fields named by `bar_fields`:
//!   `record` (index into `ids`), `attempt`, `lane` (index into `lanes`),
//!   `start_us` (since the run started), `elapsed_us`, `outcome` (index into
//!   `outcomes`), `error` (index into `errors`, -1 for none), `batch_size`;
//! - `drawn_limit`, `not_drawn` (attempts counted but not drawn).
//!
//! Record ids and error messages are user input: the JSON is escaped so no
//! `</script>` or `<!--` can end the block, the title is HTML-escaped, and
//! the script only ever sets text and attributes (never markup).

use anyhow::{Context, Result};
use fanout::convert::code_name;
use fanout::proto::{self, RecordStatus};
use serde_json::json;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// Attempts drawn at most: the page stays quick to open (each is an SVG
/// element) and the client's memory bounded; the summary counts them all.
pub const MAX_DRAWN: usize = 50_000;

/// Longest error text kept per distinct error (the tooltip's), in bytes.
const MAX_ERROR_TEXT: usize = 300;

/// How one attempt ended, as the page colours it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AttemptOutcome {
    /// The record succeeded with it.
    Succeeded = 0,
    /// It failed and the record was tried again.
    Retried = 1,
    /// It failed and was the record's last.
    Failed = 2,
    /// The run stopped while it was in flight.
    Cancelled = 3,
}

/// Names of [`AttemptOutcome`]s, by their number (the page's `outcomes`).
pub const OUTCOMES: [&str; 4] = ["succeeded", "retried", "failed", "cancelled"];

impl AttemptOutcome {
    /// Attempt `a`, the last of its record when `last`.
    fn of(a: &proto::Attempt, last: bool) -> Self {
        match &a.error {
            None => Self::Succeeded,
            Some(e) if e.code == tonic::Code::Cancelled as i32 => Self::Cancelled,
            Some(_) if last => Self::Failed,
            Some(_) => Self::Retried,
        }
    }
}

/// One processor's lane and its counts (of every attempt, drawn or not).
#[derive(Debug, Default)]
struct Lane {
    name: String,
    by_outcome: [u64; 4],
    records: u64,
    busy_us: u64,
}

/// One drawn attempt.
#[derive(Debug)]
struct Bar {
    record: u32,
    attempt: u32,
    lane: u32,
    start_us: u64,
    elapsed_us: u64,
    outcome: AttemptOutcome,
    error: Option<u32>,
    batch_size: u32,
}

/// Collects a run's events for its timeline, in bounded memory.
#[derive(Debug)]
pub struct Recorder {
    limit: usize,
    run_id: String,
    started_at: Option<String>,
    processor_count: u32,
    status: Option<String>,
    wall_us: Option<u64>,
    /// The latest attempt end seen: the wall time when no report came.
    last_end_us: u64,
    records: u64,
    succeeded: u64,
    failed: u64,
    cancelled: u64,
    attempts: u64,
    retries: u64,
    unlogged: u64,
    lanes: Vec<Lane>,
    lane_index: HashMap<String, u32>,
    /// Ids of the records with drawn attempts.
    ids: Vec<String>,
    errors: Vec<String>,
    error_index: HashMap<String, u32>,
    bars: Vec<Bar>,
    not_drawn: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

fn micros(d: &Option<prost_types::Duration>) -> u64 {
    d.as_ref().map_or(0, |d| d.seconds.max(0) as u64 * 1_000_000 + (d.nanos.max(0) as u64) / 1000)
}

impl Recorder {
    /// A recorder drawing at most [`MAX_DRAWN`] attempts.
    pub fn new() -> Self {
        Self::with_limit(MAX_DRAWN)
    }

    /// A recorder drawing at most `limit` attempts.
    pub fn with_limit(limit: usize) -> Self {
        Self {
            limit,
            run_id: String::new(),
            started_at: None,
            processor_count: 0,
            status: None,
            wall_us: None,
            last_end_us: 0,
            records: 0,
            succeeded: 0,
            failed: 0,
            cancelled: 0,
            attempts: 0,
            retries: 0,
            unlogged: 0,
            lanes: Vec::new(),
            lane_index: HashMap::new(),
            ids: Vec::new(),
            errors: Vec::new(),
            error_index: HashMap::new(),
            bars: Vec::new(),
            not_drawn: 0,
        }
    }

    /// The run started.
    pub fn started(&mut self, s: &proto::RunStarted) {
        self.run_id = s.run_id.clone();
        self.started_at = s.started_at.as_ref().map(|t| t.to_string());
        self.processor_count = s.processor_count;
    }

    /// One record's result, with its attempt log.
    pub fn record(&mut self, r: &proto::RecordResult) {
        self.records += 1;
        match r.status() {
            RecordStatus::Succeeded => self.succeeded += 1,
            _ => {
                self.failed += 1;
                if r.error.as_ref().is_some_and(|e| e.code == tonic::Code::Cancelled as i32) {
                    self.cancelled += 1;
                }
            }
        }
        self.attempts += u64::from(r.attempts);
        self.retries += u64::from(r.attempts.saturating_sub(1));
        if r.attempts > 0 && r.attempt_log.is_empty() {
            self.unlogged += 1;
        }
        let mut record = None;
        for (i, a) in r.attempt_log.iter().enumerate() {
            let last = i + 1 == r.attempt_log.len();
            let outcome = AttemptOutcome::of(a, last);
            let lane = self.lane(&a.processor);
            let (start_us, elapsed_us) = (micros(&a.start), micros(&a.elapsed));
            let l = &mut self.lanes[lane as usize];
            l.by_outcome[outcome as usize] += 1;
            l.busy_us += elapsed_us;
            l.records += u64::from(last);
            self.last_end_us = self.last_end_us.max(start_us + elapsed_us);
            if self.bars.len() >= self.limit {
                self.not_drawn += 1;
                continue;
            }
            let record = *record.get_or_insert_with(|| {
                self.ids.push(r.record_id.clone());
                self.ids.len() as u32 - 1
            });
            let error = a.error.as_ref().map(|e| self.error(e));
            self.bars.push(Bar {
                record,
                attempt: a.attempt,
                lane,
                start_us,
                elapsed_us,
                outcome,
                error,
                batch_size: a.batch_size,
            });
        }
    }

    /// The run's report.
    pub fn report(&mut self, r: &proto::RunReport) {
        self.status = Some(r.status().as_str_name().to_owned());
        self.wall_us = r.elapsed.is_some().then(|| micros(&r.elapsed));
    }

    fn lane(&mut self, processor: &str) -> u32 {
        if let Some(&i) = self.lane_index.get(processor) {
            return i;
        }
        let i = self.lanes.len() as u32;
        let name = if processor.is_empty() { "(no processor up)" } else { processor };
        self.lanes.push(Lane { name: name.to_owned(), ..Lane::default() });
        self.lane_index.insert(processor.to_owned(), i);
        i
    }

    /// The index of error `e`'s text, kept once however many attempts share it.
    fn error(&mut self, e: &proto::Error) -> u32 {
        let name = if e.code_name.is_empty() { code_name(e.code.into()) } else { &e.code_name };
        let mut text = format!("{name}: {}", e.message);
        if text.len() > MAX_ERROR_TEXT {
            let mut end = MAX_ERROR_TEXT;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            text.push('…');
        }
        if let Some(&i) = self.error_index.get(&text) {
            return i;
        }
        let i = self.errors.len() as u32;
        self.errors.push(text.clone());
        self.error_index.insert(text, i);
        i
    }

    /// The page's data block (see the module docs).
    pub fn data(&self, ended_with: Option<&str>) -> serde_json::Value {
        // The report's clock starts a moment after the attempts' clock.
        let wall_us = self.wall_us.unwrap_or(0).max(self.last_end_us);
        let wall = wall_us as f64 / 1e6;
        let lanes: Vec<_> = self
            .lanes
            .iter()
            .map(|l| {
                let [succeeded, retried, failed, cancelled] = l.by_outcome;
                json!({
                    "name": l.name,
                    "attempts": succeeded + retried + failed + cancelled,
                    "succeeded": succeeded,
                    "retried": retried,
                    "failed": failed,
                    "cancelled": cancelled,
                    "records": l.records,
                    "busy_seconds": l.busy_us as f64 / 1e6,
                })
            })
            .collect();
        let bars: Vec<_> = self
            .bars
            .iter()
            .map(|b| {
                json!([
                    b.record,
                    b.attempt,
                    b.lane,
                    b.start_us,
                    b.elapsed_us,
                    b.outcome as u8,
                    b.error.map_or(-1, i64::from),
                    b.batch_size
                ])
            })
            .collect();
        json!({
            "run_id": self.run_id,
            "started_at": self.started_at,
            "processor_count": self.processor_count,
            "status": self.status,
            "ended_with": ended_with,
            "summary": {
                "records": self.records,
                "succeeded": self.succeeded,
                "failed": self.failed,
                "cancelled": self.cancelled,
                "attempts": self.attempts,
                "retries": self.retries,
                "wall_seconds": wall,
                "records_per_second": if wall > 0.0 { self.records as f64 / wall } else { 0.0 },
                "unlogged_records": self.unlogged,
            },
            "lanes": lanes,
            "ids": self.ids,
            "errors": self.errors,
            "outcomes": OUTCOMES,
            "bar_fields": ["record", "attempt", "lane", "start_us", "elapsed_us", "outcome", "error", "batch_size"],
            "bars": bars,
            "drawn_limit": self.limit,
            "not_drawn": self.not_drawn,
        })
    }

    /// The whole page; `ended_with` says why the run ended without a report.
    pub fn html(&self, ended_with: Option<&str>) -> String {
        let data = script_json(&self.data(ended_with).to_string());
        let title =
            format!("fanout run {}", if self.run_id.is_empty() { "(not started)" } else { &self.run_id });
        let (head, rest) = TEMPLATE.split_once("__TITLE__").expect("the template has a title");
        let (middle, tail) = rest.split_once("__DATA__").expect("the template has a data block");
        let mut page = String::with_capacity(TEMPLATE.len() + data.len() + title.len());
        page.push_str(head);
        page.push_str(&html_escape(&title));
        page.push_str(middle);
        page.push_str(&data);
        page.push_str(tail);
        page
    }

    /// Writes the page to `path`.
    pub fn write(&self, path: &Path, ended_with: Option<&str>) -> Result<()> {
        let mut file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        file.write_all(self.html(ended_with).as_bytes())
            .and_then(|()| file.flush())
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// JSON made safe inside a `<script>` element: `<`, `>` and `&` (which
/// can only occur inside JSON strings) as `\u` escapes, so no `</script>`
/// or `<!--` can appear; U+2028/2029 escaped for old JavaScript parsers.
fn script_json(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

/// Text made safe in HTML content and attribute values.
fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The page: `__TITLE__` and `__DATA__` are filled in.
const TEMPLATE: &str = include_str!("timeline.html");

#[cfg(test)]
mod tests {
    use super::*;

    fn dur(ms: u64) -> Option<prost_types::Duration> {
        Some(fanout::convert::duration_to_proto(std::time::Duration::from_millis(ms)))
    }

    fn attempt(n: u32, processor: &str, start_ms: u64, ms: u64, code: Option<tonic::Code>) -> proto::Attempt {
        proto::Attempt {
            attempt: n,
            processor: processor.into(),
            start: dur(start_ms),
            elapsed: dur(ms),
            error: code.map(|c| proto::Error {
                code: c as i32,
                code_name: code_name(c).into(),
                message: "</script><script>alert(1)</script>".into(),
            }),
            batch_size: 1,
        }
    }

    fn result(id: &str, ok: bool, log: Vec<proto::Attempt>) -> proto::RecordResult {
        let code = log.last().and_then(|a| a.error.clone());
        proto::RecordResult {
            record_id: id.into(),
            status: if ok { RecordStatus::Succeeded } else { RecordStatus::Failed } as i32,
            attempts: log.len() as u32,
            error: code,
            attempt_log: log,
            ..Default::default()
        }
    }

    /// The data block of a page, as the browser's script would read it.
    fn embedded(page: &str) -> serde_json::Value {
        let open = r#"<script type="application/json" id="timeline-data">"#;
        let start = page.find(open).expect("the data block") + open.len();
        let end = start + page[start..].find("</script>").expect("the block's end");
        serde_json::from_str(&page[start..end]).expect("the block is JSON")
    }

    #[test]
    fn outcomes_counts_and_escaping() {
        use tonic::Code::{Cancelled, Unavailable};
        let mut t = Recorder::new();
        t.started(&proto::RunStarted { run_id: "run-<1>".into(), ..Default::default() });
        let evil = "</script><b>x";
        t.record(&result(
            "a",
            true,
            vec![attempt(1, "p1", 0, 10, Some(Unavailable)), attempt(2, "p2", 15, 5, None)],
        ));
        t.record(&result(evil, false, vec![attempt(1, "p1", 1, 3, Some(Unavailable))]));
        t.record(&result("c", false, vec![attempt(1, "", 2, 0, Some(Cancelled))]));
        // Cancelled before any attempt: counted, nothing drawn.
        t.record(&result("d", false, vec![]));
        let page = t.html(None);
        assert!(!page.contains(evil) && !page.contains("<b>") && !page.contains("alert(1)</script>"));
        assert!(page.contains("<title>fanout run run-&lt;1&gt;</title>"), "the title is escaped");
        assert_eq!(page.matches("</script>").count(), 2, "only the data block and the script end");
        let d = embedded(&page);
        assert_eq!(d["ids"], json!(["a", evil, "c"]));
        assert_eq!(d["summary"]["records"], 4);
        assert_eq!(d["summary"]["failed"], 3);
        assert_eq!(d["summary"]["attempts"], 4);
        assert_eq!(d["summary"]["retries"], 1);
        assert_eq!(d["summary"]["wall_seconds"], 0.02, "the last attempt's end without a report");
        let names: Vec<_> = d["lanes"].as_array().unwrap().iter().map(|l| l["name"].clone()).collect();
        assert_eq!(names, [json!("p1"), json!("p2"), json!("(no processor up)")]);
        let outcome = |i: usize| OUTCOMES[d["bars"][i][5].as_u64().unwrap() as usize];
        assert_eq!(
            [outcome(0), outcome(1), outcome(2), outcome(3)],
            ["retried", "succeeded", "failed", "cancelled"]
        );
        assert_eq!(d["bars"][1], json!([0, 2, 1, 15_000, 5000, 0, -1, 1]));
        assert_eq!(d["lanes"][0]["retried"], 1);
        assert_eq!(d["lanes"][0]["failed"], 1);
        assert_eq!(d["lanes"][0]["records"], 1);
        assert_eq!(d["errors"][0], "UNAVAILABLE: </script><script>alert(1)</script>");
    }

    #[test]
    fn draws_a_bounded_number_and_counts_the_rest() {
        let mut t = Recorder::with_limit(3);
        for i in 0..5 {
            t.record(&result(&format!("r{i}"), true, vec![attempt(1, "p", i, 1, None)]));
        }
        t.report(&proto::RunReport { elapsed: dur(2000), ..Default::default() });
        let d = t.data(Some("stream failed"));
        assert_eq!(d["bars"].as_array().unwrap().len(), 3);
        assert_eq!(d["ids"].as_array().unwrap().len(), 3);
        assert_eq!(d["not_drawn"], 2);
        assert_eq!(d["lanes"][0]["attempts"], 5);
        assert_eq!(d["summary"]["records"], 5);
        assert_eq!(d["summary"]["records_per_second"], 2.5);
        assert_eq!(d["ended_with"], "stream failed");
    }
}
