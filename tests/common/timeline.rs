//! Helpers of the timeline tests: the `fanout` client binary run to its
//! end, the data block of the page it writes, and a workload that holds a
//! record in flight until another has failed.

use super::WAIT;
use fanout::domain::{JsonMap, Record};
use fanout::workload::digest::DigestUnit;
use fanout::workload::{Cancel, Digest, Workload, WorkloadError};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A scratch directory of one test, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A fresh directory named after the test.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("fanout-timeline-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// A path inside it.
    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `records` (`(id, attributes)`) to `path` as NDJSON.
pub fn write_ndjson(path: &Path, records: &[(String, Value)]) {
    let text: String = records
        .iter()
        .map(|(id, attributes)| format!("{}\n", serde_json::json!({"id": id, "attributes": attributes})))
        .collect();
    std::fs::write(path, text).unwrap();
}

/// The `fanout` binary in a child process, killed when dropped.
pub struct Client(Child);

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `fanout ARGS` (stdout and stderr to files in `dir`) to its end,
/// waiting without blocking the runtime (the servers it talks to may run
/// on it); its exit status and stderr. Panics after twice [`WAIT`].
pub async fn run_client(dir: &Scratch, args: &[&str]) -> (ExitStatus, String) {
    let (out, err) = (dir.path("stdout"), dir.path("stderr"));
    let child = Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("spawn fanout");
    let mut client = Client(child);
    let deadline = Instant::now() + 2 * WAIT;
    let status = loop {
        if let Some(status) = client.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "fanout {args:?} did not exit in time");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    (status, std::fs::read_to_string(err).unwrap_or_default())
}

/// The JSON data block of a timeline page.
pub fn embedded(page: &str) -> Value {
    let open = r#"<script type="application/json" id="timeline-data">"#;
    let start = page.find(open).expect("the page has its data block") + open.len();
    let end = start + page[start..].find("</script>").expect("the data block ends");
    serde_json::from_str(&page[start..end]).expect("the data block is JSON")
}

/// One drawn attempt, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    pub attempt: u64,
    pub lane: String,
    pub outcome: String,
    pub error: Option<String>,
    pub start_us: u64,
    pub elapsed_us: u64,
    pub batch_size: u64,
}

/// Every drawn attempt of the page's data, by record id, in attempt order.
pub fn bars_by_record(data: &Value) -> HashMap<String, Vec<Bar>> {
    let field = |name: &str| {
        data["bar_fields"].as_array().unwrap().iter().position(|f| f == name).expect("a bar field")
    };
    let (record, attempt, lane, start, elapsed, outcome, error, batch) = (
        field("record"),
        field("attempt"),
        field("lane"),
        field("start_us"),
        field("elapsed_us"),
        field("outcome"),
        field("error"),
        field("batch_size"),
    );
    let mut by: HashMap<String, Vec<Bar>> = HashMap::new();
    for b in data["bars"].as_array().unwrap() {
        let id = data["ids"][b[record].as_u64().unwrap() as usize].as_str().unwrap().to_owned();
        let e = b[error].as_i64().unwrap();
        by.entry(id).or_default().push(Bar {
            attempt: b[attempt].as_u64().unwrap(),
            lane: data["lanes"][b[lane].as_u64().unwrap() as usize]["name"].as_str().unwrap().to_owned(),
            outcome: data["outcomes"][b[outcome].as_u64().unwrap() as usize].as_str().unwrap().to_owned(),
            error: (e >= 0).then(|| data["errors"][e as usize].as_str().unwrap().to_owned()),
            start_us: b[start].as_u64().unwrap(),
            elapsed_us: b[elapsed].as_u64().unwrap(),
            batch_size: b[batch].as_u64().unwrap(),
        });
    }
    for bars in by.values_mut() {
        bars.sort_by_key(|b| b.attempt);
    }
    by
}

/// Digest, except: the units of record `hold` run until they are
/// cancelled (bounded by [`WAIT`]); the units of record `fail` fail
/// permanently, once a unit of `hold` is running. So when `fail` fails,
/// `hold` is certainly in flight.
pub struct HoldThenFail {
    pub hold: String,
    pub fail: String,
    pub holding: Arc<AtomicBool>,
}

impl Workload for HoldThenFail {
    type Unit = DigestUnit;
    type Output = u64;

    fn name(&self) -> &str {
        "hold-then-fail"
    }

    fn extract(&self, record: &Record, params: &JsonMap) -> Result<Vec<DigestUnit>, WorkloadError> {
        Digest::default().extract(record, params)
    }

    fn process(&self, unit: DigestUnit, cancel: &Cancel) -> Result<u64, WorkloadError> {
        let deadline = Instant::now() + WAIT;
        if unit.input.starts_with(&format!("{}/", self.hold)) {
            self.holding.store(true, Ordering::SeqCst);
            while Instant::now() < deadline {
                cancel.check()?;
                std::thread::sleep(Duration::from_millis(1));
            }
            panic!("{} was never cancelled", self.hold);
        }
        if unit.input.starts_with(&format!("{}/", self.fail)) {
            while !self.holding.load(Ordering::SeqCst) {
                assert!(Instant::now() < deadline, "{} never started", self.hold);
                std::thread::sleep(Duration::from_millis(1));
            }
            return Err(WorkloadError::permanent(format!("{} fails while {} runs", self.fail, self.hold)));
        }
        Digest::default().process(unit, cancel)
    }

    fn aggregate(&self, record: &Record, outputs: Vec<u64>) -> Result<JsonMap, WorkloadError> {
        Digest::default().aggregate(record, outputs)
    }
}
