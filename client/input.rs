//! Reading records incrementally: a JSON array or NDJSON (one record per
//! line) from a file or stdin, or generated ones, handed out in bounded
//! batches so a run of any size never sits in memory whole.

use anyhow::{Context, Result, anyhow};
use fanout::convert::json_to_struct;
use fanout::domain::JsonMap;
use fanout::proto;
use prost::Message;
use serde::Deserialize;
use serde::de::{self, Deserializer as _, SeqAccess, Visitor};
use std::io::{BufRead, BufReader, Read};
use tokio::sync::mpsc;

/// One input record as users write it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputRecord {
    id: String,
    #[serde(default)]
    attributes: JsonMap,
}

impl From<InputRecord> for proto::Record {
    fn from(r: InputRecord) -> Self {
        proto::Record { id: r.id, attributes: Some(json_to_struct(r.attributes)) }
    }
}

/// How big one batch of records may grow.
#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    /// Most records per batch.
    pub max_records: usize,
    /// About the most encoded bytes per batch; a single record bigger than
    /// this goes alone.
    pub max_bytes: usize,
}

impl Default for BatchLimits {
    /// 1024 records or 64 KiB: big enough that per-message costs vanish,
    /// small enough that no encode buffer along the way gets large (large
    /// buffers freed on other threads cost RSS under mimalloc), and far
    /// within the pipeline's default 8 MiB message limit.
    fn default() -> Self {
        BatchLimits { max_records: 1024, max_bytes: 64 << 10 }
    }
}

/// Batches waiting between the reader and the session: a few, so reading
/// stays ahead of sending while memory stays bounded.
const QUEUED_BATCHES: usize = 4;

/// Batches of records in input order, ending after the last one, or with
/// one error (naming the input position) after which nothing follows.
pub type Batches = mpsc::Receiver<Result<Vec<proto::Record>>>;

/// Opens the file at `path`, or stdin when `path` is `-`, for [`read_batches`].
pub fn open(path: &str) -> Result<Box<dyn BufRead + Send>> {
    if path == "-" {
        return Ok(Box::new(BufReader::with_capacity(1 << 16, std::io::stdin())));
    }
    let file = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
    Ok(Box::new(BufReader::with_capacity(1 << 16, file)))
}

/// Reads records from `reader` on a thread of its own and hands them out in
/// batches within `limits`. The input is a JSON array of `{"id": …,
/// "attributes": {…}}` objects (when its first non-whitespace byte is `[`)
/// or the same objects one per line (blank lines skipped). Reading stops
/// when the receiver is dropped.
pub fn read_batches(reader: impl BufRead + Send + 'static, limits: BatchLimits) -> Batches {
    spawn_source(limits, move |batcher| read_records(reader, batcher))
}

/// `n` generated records `rec-00000`, `rec-00001`, … with no attributes (as
/// [`generated_records`]), made batch by batch so `n` may be any size.
pub fn generated_batches(n: usize, limits: BatchLimits) -> Batches {
    spawn_source(limits, move |batcher| (0..n).try_for_each(|i| batcher.push(generated_record(i))))
}

/// `n` generated records `rec-00000`, `rec-00001`, … with no attributes
/// (so the digest workload gives each 10..=30 units).
pub fn generated_records(n: usize) -> Vec<proto::Record> {
    (0..n).map(generated_record).collect()
}

/// The `i`th generated record.
fn generated_record(i: usize) -> proto::Record {
    proto::Record { id: format!("rec-{i:05}"), attributes: None }
}

/// Longest NDJSON line read: twice the pipeline's default message limit
/// (8 MiB), so no record it could take is refused here, and a file without
/// line breaks is not read whole.
const MAX_LINE_BYTES: u64 = 16 << 20;

/// Why a source stopped early: the receiver is gone, or the input is bad.
enum Stop {
    /// The receiver was dropped (the run ended): nothing more to read for.
    Closed,
    /// The input is bad; the error names where.
    Bad(anyhow::Error),
}

impl From<anyhow::Error> for Stop {
    fn from(e: anyhow::Error) -> Self {
        Stop::Bad(e)
    }
}

/// Runs `source` on a thread of its own (its reads block), feeding its
/// records through a [`Batcher`] into a bounded channel.
fn spawn_source(
    limits: BatchLimits,
    source: impl FnOnce(&mut Batcher) -> Result<(), Stop> + Send + 'static,
) -> Batches {
    let (tx, rx) = mpsc::channel(QUEUED_BATCHES);
    std::thread::Builder::new()
        .name("fanout-input".into())
        .spawn(move || {
            let mut batcher = Batcher { limits, tx, batch: Vec::new(), bytes: 0, count: 0 };
            let outcome = source(&mut batcher).and_then(|()| batcher.finish());
            if let Err(Stop::Bad(e)) = outcome {
                // Nothing to do when the receiver is gone too.
                let _ = batcher.tx.blocking_send(Err(e));
            }
        })
        .expect("spawning the input thread");
    rx
}

/// Groups records into batches within the limits and sends each when full.
struct Batcher {
    limits: BatchLimits,
    tx: mpsc::Sender<Result<Vec<proto::Record>>>,
    batch: Vec<proto::Record>,
    /// Encoded size of `batch` inside a `RecordBatch`.
    bytes: usize,
    /// Records pushed so far.
    count: u64,
}

impl Batcher {
    /// Adds `record`, sending the batch first when the record would take it
    /// past the byte cap, and after when it reaches the record cap.
    fn push(&mut self, record: proto::Record) -> Result<(), Stop> {
        let len = record.encoded_len();
        // Field tag (1 byte) + length prefix + the record, as in `RecordBatch`.
        let size = 1 + prost::encoding::encoded_len_varint(len as u64) + len;
        if !self.batch.is_empty() && self.bytes + size > self.limits.max_bytes {
            self.flush()?;
        }
        self.batch.push(record);
        self.bytes += size;
        self.count += 1;
        if self.batch.len() >= self.limits.max_records {
            self.flush()?;
        }
        Ok(())
    }

    /// Sends the batch, waiting while the channel is full.
    fn flush(&mut self) -> Result<(), Stop> {
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(self.limits.max_records.min(1024)));
        self.bytes = 0;
        self.tx.blocking_send(Ok(batch)).map_err(|_| Stop::Closed)
    }

    /// Sends the last partial batch; an input without records is an error.
    fn finish(&mut self) -> Result<(), Stop> {
        if self.count == 0 {
            return Err(Stop::Bad(anyhow!(
                "no records in the input (expected a JSON array or one JSON object per line)"
            )));
        }
        if self.batch.is_empty() { Ok(()) } else { self.flush() }
    }
}

/// Reads `reader` as a JSON array or NDJSON, by its first non-whitespace byte.
fn read_records(mut reader: impl BufRead, batcher: &mut Batcher) -> Result<(), Stop> {
    // Skip leading whitespace to see the first byte, counting the lines
    // skipped so NDJSON line numbers stay right.
    let mut lines_skipped = 0u64;
    let first = loop {
        let buf = reader.fill_buf().context("reading the input")?;
        if buf.is_empty() {
            break None;
        }
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(i) => {
                lines_skipped += buf[..i].iter().filter(|&&b| b == b'\n').count() as u64;
                let first = buf[i];
                reader.consume(i);
                break Some(first);
            }
            None => {
                let n = buf.len();
                lines_skipped += buf.iter().filter(|&&b| b == b'\n').count() as u64;
                reader.consume(n);
            }
        }
    };
    match first {
        None => Ok(()),
        Some(b'[') => read_array(reader, batcher),
        Some(_) => read_ndjson(reader, lines_skipped, batcher),
    }
}

/// One record per line; blank lines skipped. `line` is the number of lines
/// already consumed.
fn read_ndjson(mut reader: impl BufRead, mut line: u64, batcher: &mut Batcher) -> Result<(), Stop> {
    // One buffer for every line: no allocation per line beyond the record's own.
    let mut buf = Vec::new();
    loop {
        if buf.capacity() > 1 << 20 {
            // After a long line, back to a small buffer.
            buf = Vec::new();
        }
        buf.clear();
        let read = reader
            .by_ref()
            .take(MAX_LINE_BYTES + 1)
            .read_until(b'\n', &mut buf)
            .with_context(|| format!("reading line {}", line + 1))?;
        if read == 0 {
            return Ok(());
        }
        line += 1;
        if buf.len() as u64 > MAX_LINE_BYTES {
            return Err(Stop::Bad(anyhow!(
                "line {line} is over {MAX_LINE_BYTES} bytes (one record per line)"
            )));
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let record: InputRecord =
            serde_json::from_slice(&buf).with_context(|| format!("reading the record on line {line}"))?;
        batcher.push(record.into())?;
    }
}

/// A JSON array, one element at a time (never the whole array in memory).
fn read_array(reader: impl BufRead, batcher: &mut Batcher) -> Result<(), Stop> {
    let mut de = serde_json::Deserializer::from_reader(reader);
    let mut state = ArrayState { batcher, stop: None };
    let parsed = de.deserialize_seq(Elements(&mut state));
    // A stop raised in the visitor (bad element, receiver gone) travelled as
    // a placeholder serde error; the real reason is in `state`.
    if let Some(stop) = state.stop.take() {
        return Err(stop);
    }
    parsed.map_err(|e| {
        anyhow!(e).context(format!("reading the JSON array after element {}", state.batcher.count))
    })?;
    de.end().map_err(|e| anyhow!(e).context("reading after the JSON array's closing `]`"))?;
    Ok(())
}

/// What the array visitor carries between elements.
struct ArrayState<'a> {
    /// Counts the elements read so far too.
    batcher: &'a mut Batcher,
    /// Why the visitor stopped early, when it did.
    stop: Option<Stop>,
}

/// Visits the array, pushing each element to the batcher as it is parsed.
struct Elements<'a, 'b>(&'a mut ArrayState<'b>);

impl<'de> Visitor<'de> for Elements<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array of records")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let state = self.0;
        loop {
            let n = state.batcher.count + 1;
            let stop = match seq.next_element::<InputRecord>() {
                Ok(None) => return Ok(()),
                Ok(Some(record)) => match state.batcher.push(record.into()) {
                    Ok(()) => continue,
                    Err(stop) => stop,
                },
                Err(e) => Stop::Bad(
                    anyhow!(e.to_string())
                        .context(format!("reading the JSON array's element {n} (counting from 1)")),
                ),
            };
            state.stop = Some(stop);
            return Err(de::Error::custom("stopped"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every batch from `text` read with `limits`, or the error text.
    fn batches(text: &str, limits: BatchLimits) -> Result<Vec<Vec<proto::Record>>, String> {
        let mut rx = read_batches(std::io::Cursor::new(text.as_bytes().to_vec()), limits);
        let mut out = Vec::new();
        while let Some(b) = rx.blocking_recv() {
            out.push(b.map_err(|e| format!("{e:#}"))?);
        }
        Ok(out)
    }

    fn ids(batches: &[Vec<proto::Record>]) -> Vec<&str> {
        batches.iter().flatten().map(|r| r.id.as_str()).collect()
    }

    #[test]
    fn an_endless_line_is_refused_at_the_cap() {
        let mut text = String::from("{\"id\":\"a\"}\n{\"id\":\"b\",\"attributes\":{\"pad\":\"");
        text.push_str(&"x".repeat(MAX_LINE_BYTES as usize));
        let e = batches(&text, BatchLimits::default()).unwrap_err();
        assert!(e.contains(&format!("line 2 is over {MAX_LINE_BYTES} bytes")), "{e}");
    }

    #[test]
    fn array_and_ndjson() {
        let a = batches(r#"  [{"id":"a","attributes":{"units":3}},{"id":"b"}] "#, BatchLimits::default())
            .unwrap();
        assert_eq!(ids(&a), ["a", "b"]);
        let units = &a[0][0].attributes.as_ref().unwrap().fields["units"];
        assert_eq!(units.kind, Some(prost_types::value::Kind::NumberValue(3.0)));
        let n = batches("\n{\"id\":\"a\"}\n\n  \r\n{\"id\":\"b\",\"attributes\":{}}", BatchLimits::default())
            .unwrap();
        assert_eq!(ids(&n), ["a", "b"]);
    }

    #[test]
    fn errors_name_the_position() {
        let limits = BatchLimits::default();
        // Line 4: two leading blank lines count.
        let e = batches("\n\n{\"id\":\"a\"}\n{\"idd\":\"b\"}\n", limits).unwrap_err();
        assert!(e.contains("line 4") && e.contains("unknown field `idd`"), "{e}");
        let e = batches("{\"id\":\"a\"}\n{\"id\": 7}\n", limits).unwrap_err();
        assert!(e.contains("line 2") && e.contains("invalid type"), "{e}");
        let e = batches("{\"id\":\"a\"}\n{\"id\":\"b\"", limits).unwrap_err();
        assert!(e.contains("line 2") && e.contains("EOF"), "{e}");
        let e = batches(r#"[{"id":"a"}, {"id":"b","x":1}]"#, limits).unwrap_err();
        assert!(e.contains("element 2") && e.contains("unknown field `x`"), "{e}");
        let e = batches(r#"[{"id":"a"}, 5]"#, limits).unwrap_err();
        assert!(e.contains("element 2") && e.contains("invalid type"), "{e}");
        let e = batches(r#"[{"id":"a"} {"id":"b"}]"#, limits).unwrap_err();
        assert!(e.contains("element 2") && e.contains("expected `,` or `]`"), "{e}");
        let e = batches(r#"[{"id":"a"}] x"#, limits).unwrap_err();
        assert!(e.contains("after the JSON array"), "{e}");
        let e = batches(r#"[{"id":"a"}"#, limits).unwrap_err();
        assert!(e.contains("element 2") && e.contains("EOF"), "{e}");
    }

    #[test]
    fn empty_input_is_an_error() {
        for text in ["", " \n\n \t\n", "[]", " [ ] "] {
            let e = batches(text, BatchLimits::default()).unwrap_err();
            assert!(e.contains("no records"), "{text:?}: {e}");
        }
    }

    #[test]
    fn batches_respect_record_and_byte_caps() {
        let text: String = (0..10).map(|i| format!("{{\"id\":\"r{i}\"}}\n")).collect();
        let b = batches(&text, BatchLimits { max_records: 3, max_bytes: 1 << 20 }).unwrap();
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3, 3, 1]);
        assert_eq!(ids(&b), (0..10).map(|i| format!("r{i}")).collect::<Vec<_>>());

        // Each record `{"id":"rN"}` with an empty Struct encodes to 6 bytes,
        // 8 inside a batch: 20 bytes hold two.
        let b = batches(&text, BatchLimits { max_records: 100, max_bytes: 20 }).unwrap();
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 2, 2, 2]);

        // A record bigger than the byte cap goes alone.
        let big = format!("{{\"id\":\"big\",\"attributes\":{{\"pad\":\"{}\"}}}}", "x".repeat(100));
        let text = format!("{{\"id\":\"a\"}}\n{big}\n{{\"id\":\"b\"}}\n");
        let b = batches(&text, BatchLimits { max_records: 100, max_bytes: 50 }).unwrap();
        assert_eq!(
            b.iter().map(|b| ids(std::slice::from_ref(b)).join(",")).collect::<Vec<_>>(),
            ["a", "big", "b"]
        );
    }

    #[test]
    fn generated_batches_match_generated_records() {
        let mut rx = generated_batches(2500, BatchLimits { max_records: 1000, max_bytes: 1 << 20 });
        let mut got = Vec::new();
        while let Some(b) = rx.blocking_recv() {
            let b = b.unwrap();
            assert!(b.len() <= 1000);
            got.extend(b);
        }
        assert_eq!(got, generated_records(2500));
        let e = generated_batches(0, BatchLimits::default()).blocking_recv().unwrap().unwrap_err();
        assert!(e.to_string().contains("no records"));
    }

    /// A file of 200k records, as NDJSON and as an array, comes out whole, in
    /// order, in bounded batches; the reader never runs more than a few
    /// batches ahead of a slow consumer.
    #[test]
    fn large_file_in_bounded_batches() {
        const N: usize = 200_000;
        let dir = std::env::temp_dir();
        for array in [false, true] {
            let path = dir.join(format!("fanout-input-{}-{array}.json", std::process::id()));
            {
                let mut w = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
                use std::io::Write;
                if array {
                    w.write_all(b"[\n").unwrap();
                }
                for i in 0..N {
                    let sep = if array && i + 1 < N { "," } else { "" };
                    writeln!(w, r#"{{"id":"rec-{i}","attributes":{{"units":{}}}}}{sep}"#, i % 30 + 1)
                        .unwrap();
                }
                if array {
                    w.write_all(b"]\n").unwrap();
                }
            }
            let limits = BatchLimits { max_records: 512, max_bytes: 8 << 10 };
            let mut rx = read_batches(open(path.to_str().unwrap()).unwrap(), limits);
            let (mut seen, mut batches) = (0usize, 0usize);
            while let Some(b) = rx.blocking_recv() {
                let b = b.unwrap();
                assert!(!b.is_empty() && b.len() <= limits.max_records);
                let bytes: usize = b.iter().map(|r| r.encoded_len() + 2).sum();
                assert!(bytes <= limits.max_bytes, "{bytes}");
                for r in &b {
                    assert_eq!(r.id, format!("rec-{seen}"));
                    seen += 1;
                }
                batches += 1;
            }
            std::fs::remove_file(&path).unwrap();
            assert_eq!(seen, N, "array: {array}");
            assert!(batches >= N / limits.max_records, "{batches}");
        }
    }
}
