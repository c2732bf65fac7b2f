//! Where a run's records come from: all at once in a `Run` request, or read
//! from a `RunStream` as dispatch needs them.
//!
//! A stream is read only while the run's buffer of received records is
//! short of its prefetch (about `max_in_flight`): the rest of the input
//! waits in the client's HTTP/2 window, so a fast client with a slow fleet
//! costs the pipeline a bounded buffer, whatever the run's size. Every
//! record is checked as it is read (its id, and that no earlier record had
//! it); the first fault ends the run, naming the record's position.

use crate::budget::MemoryBudget;
use crate::convert;
use crate::domain::RunRecord;
use crate::error::Error;
use crate::proto;
use futures::{Stream, StreamExt};
use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::pin::Pin;
use tokio::sync::OwnedSemaphorePermit;

/// A `RunStream`'s input messages after its header.
pub type InputStream = Pin<Box<dyn Stream<Item = Result<proto::RunInput, tonic::Status>> + Send>>;

/// A run's records, in input order, each with its position.
pub enum Source {
    /// All of a `Run` request's records.
    Whole {
        /// Records not dispatched yet.
        records: std::vec::IntoIter<RunRecord>,
        /// The next one's position.
        next: u64,
        /// The run's size.
        total: u64,
    },
    /// A `RunStream`'s input.
    Stream(StreamInput),
}

impl Source {
    /// The records of a `Run` request.
    pub fn whole(records: Vec<RunRecord>) -> Self {
        let total = records.len() as u64;
        Source::Whole { records: records.into_iter(), next: 0, total }
    }

    /// The next record ready to dispatch, with its position.
    pub fn pop(&mut self) -> Option<(u64, RunRecord)> {
        match self {
            Source::Whole { records, next, .. } => {
                let r = records.next()?;
                *next += 1;
                Some((*next - 1, r))
            }
            Source::Stream(s) => s.buffer.pop_front(),
        }
    }

    /// The number of records in the run, once known.
    pub fn total(&self) -> Option<u64> {
        match self {
            Source::Whole { total, .. } => Some(*total),
            Source::Stream(s) => s.total,
        }
    }

    /// Records read from the input so far.
    pub fn received(&self) -> u64 {
        match self {
            Source::Whole { total, .. } => *total,
            Source::Stream(s) => s.received,
        }
    }

    /// Whether every record has been popped and no more will come.
    pub fn exhausted(&self) -> bool {
        match self {
            Source::Whole { records, .. } => records.len() == 0,
            Source::Stream(s) => s.total.is_some() && s.buffer.is_empty(),
        }
    }

    /// Whether the run should read more input now: a stream not at its
    /// end, with fewer than `prefetch` records waiting.
    pub fn wants_input(&self, prefetch: usize) -> bool {
        match self {
            Source::Whole { .. } => false,
            Source::Stream(s) => s.total.is_none() && s.buffer.len() < prefetch,
        }
    }

    /// Received records not dispatched yet, taken out (to report them
    /// cancelled when the run ends early).
    pub fn drain_received(&mut self) -> Vec<(u64, RunRecord)> {
        match self {
            Source::Whole { records, next, .. } => {
                let first = *next;
                let rest: Vec<_> = records.by_ref().collect();
                *next += rest.len() as u64;
                (first..).zip(rest).collect()
            }
            Source::Stream(s) => s.buffer.drain(..).collect(),
        }
    }

    /// The stream to read from, when there is one.
    pub fn stream(&mut self) -> Option<&mut StreamInput> {
        match self {
            Source::Whole { .. } => None,
            Source::Stream(s) => Some(s),
        }
    }
}

/// Budget bytes the id index takes per record it can hold: a 64-bit
/// fingerprint and a control byte, at the table's load factor of 7/8.
const INDEX_BYTES_PER_ID: usize = 11;

/// The input of a `RunStream` after its header.
pub struct StreamInput {
    input: InputStream,
    /// Checked records not dispatched yet.
    buffer: VecDeque<(u64, RunRecord)>,
    received: u64,
    /// Set by `done`.
    total: Option<u64>,
    /// Keyed 64-bit fingerprints of the ids seen (exact ids would make the
    /// index grow with the ids' length).
    ids: HashSet<u64, BuildHasherDefault<Fingerprint>>,
    keys: RandomState,
    budget: MemoryBudget,
    held: Option<OwnedSemaphorePermit>,
}

/// A fingerprint is already a keyed hash: the table uses it as it is.
#[derive(Default)]
struct Fingerprint(u64);

impl Hasher for Fingerprint {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl StreamInput {
    /// Reads `input`; the index of ids takes from `budget` as it grows.
    pub fn new(input: InputStream, budget: MemoryBudget) -> Self {
        Self {
            input,
            buffer: VecDeque::new(),
            received: 0,
            total: None,
            ids: HashSet::default(),
            keys: RandomState::new(),
            budget,
            held: None,
        }
    }

    /// The next input message. Cancel-safe: a message is either returned or
    /// left in the stream.
    pub async fn next_message(&mut self) -> Option<Result<proto::RunInput, tonic::Status>> {
        self.input.next().await
    }

    /// Takes in one input message (`None`: the client closed its side).
    /// Its records join the buffer up to the first at fault, whose error is
    /// returned (the records before it stay, to be reported).
    pub fn accept(&mut self, message: Option<Result<proto::RunInput, tonic::Status>>) -> Result<(), Error> {
        use proto::run_input::Input;
        let after = self.received;
        let message = match message {
            None => {
                return Err(Error::InvalidArgument(format!(
                    "the input ended after {after} records without `done` (an InputDone with the record count)"
                )));
            }
            Some(Err(status)) => return Err(self.read_error(status)),
            Some(Ok(m)) => m,
        };
        match message.input {
            None => Err(Error::InvalidArgument(format!(
                "input message after record {after} holds nothing (expected `records` or `done`)"
            ))),
            Some(Input::Header(_)) => Err(Error::InvalidArgument(format!(
                "a second `header` after {after} records (a stream has one, first)"
            ))),
            Some(Input::Done(done)) if done.record_count != after => Err(Error::InvalidArgument(format!(
                "done.record_count is {} but {after} records were sent",
                done.record_count
            ))),
            Some(Input::Done(_)) => {
                self.total = Some(after);
                Ok(())
            }
            Some(Input::Records(batch)) => {
                for record in batch.records {
                    let position = self.received;
                    convert::check_record_id(position, &record.id)?;
                    self.remember(position, &record.id)?;
                    self.received += 1;
                    self.buffer.push_back((position, convert::run_record(record)));
                }
                Ok(())
            }
        }
    }

    /// What a failure to read the input means for the client: tonic's own
    /// answers to an oversized or undecodable message say nothing of where;
    /// a message refused by the memory budget names it.
    fn read_error(&self, status: tonic::Status) -> Error {
        let after = self.received;
        match status.code() {
            tonic::Code::OutOfRange if status.message().contains("message length too large") => {
                Error::InvalidArgument(format!(
                    "input message after record {after} is over the limit (set by --max-message-bytes): {}",
                    status.message()
                ))
            }
            tonic::Code::Internal if status.message().starts_with("failed to decode") => {
                Error::InvalidArgument(format!(
                    "input message after record {after} could not be decoded: {}",
                    status.message()
                ))
            }
            tonic::Code::ResourceExhausted => Error::Exhausted {
                what: format!("input message after record {after}: {}", status.message()),
                limit: self.budget.total() as u64,
                setting: "--run-memory-budget",
            },
            _ => Error::Cancelled(format!(
                "reading the input after record {after} failed: {}",
                status.message()
            )),
        }
    }

    /// Adds `id` to the index; `Err` if an earlier record had it, or the
    /// index cannot grow within the run memory budget.
    fn remember(&mut self, position: u64, id: &str) -> Result<(), Error> {
        if self.ids.len() == self.ids.capacity() {
            let before = self.ids.capacity();
            self.ids.reserve(before.max(1024));
            let bytes = (self.ids.capacity() - before) * INDEX_BYTES_PER_ID;
            match self.budget.try_take(bytes) {
                Some(Some(more)) => match &mut self.held {
                    Some(held) => held.merge(more),
                    None => self.held = Some(more),
                },
                Some(None) => {}
                None => {
                    return Err(Error::Exhausted {
                        what: format!(
                            "at record {position}, the run's index of record ids (which catches a repeated \
                             id) needs {bytes} more bytes and {} are free",
                            self.budget.available()
                        ),
                        limit: self.budget.total() as u64,
                        setting: "--run-memory-budget",
                    });
                }
            }
        }
        if !self.ids.insert(self.keys.hash_one(id)) {
            return Err(Error::invalid_record(position, id, "id", "repeats the id of an earlier record"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::run_input::Input;

    fn batch(ids: &[&str]) -> Option<Result<proto::RunInput, tonic::Status>> {
        let records = ids.iter().map(|id| proto::Record { id: id.to_string(), attributes: None }).collect();
        Some(Ok(proto::RunInput { input: Some(Input::Records(proto::RecordBatch { records })) }))
    }

    fn done(n: u64) -> Option<Result<proto::RunInput, tonic::Status>> {
        Some(Ok(proto::RunInput { input: Some(Input::Done(proto::InputDone { record_count: n })) }))
    }

    fn input() -> StreamInput {
        StreamInput::new(
            Box::pin(futures::stream::empty()),
            MemoryBudget::new(1 << 30, "--run-memory-budget"),
        )
    }

    #[test]
    fn records_are_numbered_across_batches_and_counted_at_done() {
        let mut s = input();
        s.accept(batch(&["a", "b"])).unwrap();
        s.accept(batch(&[])).unwrap();
        s.accept(batch(&["c"])).unwrap();
        let mut source = Source::Stream(s);
        assert!(source.wants_input(10));
        assert_eq!(source.pop().map(|(i, r)| (i, r.id)), Some((0, "a".into())));
        let s = source.stream().unwrap();
        let err = s.accept(done(4)).unwrap_err().to_string();
        assert!(err.contains("done.record_count is 4 but 3 records were sent"), "{err}");
        s.accept(done(3)).unwrap();
        assert_eq!(source.total(), Some(3));
        assert!(!source.wants_input(10));
        assert!(!source.exhausted());
        let rest: Vec<_> = source.drain_received().into_iter().map(|(i, _)| i).collect();
        assert_eq!(rest, [1, 2]);
        assert!(source.exhausted());
    }

    #[test]
    fn faults_name_the_position_and_keep_the_records_before() {
        let mut s = input();
        s.accept(batch(&["a", "b"])).unwrap();
        let err = s.accept(batch(&["c", "a", "d"])).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.to_string().contains("record 3 (id \"a\"): id: repeats"), "{err}");
        assert_eq!(s.buffer.len(), 3, "a, b and c were received");
        let err = s.accept(batch(&[""])).unwrap_err().to_string();
        assert!(err.contains("record 3: id: must not be empty"), "{err}");
        let err = s.accept(None).unwrap_err().to_string();
        assert!(err.contains("ended after 3 records without `done`"), "{err}");
        let header = Some(Ok(proto::RunInput { input: Some(Input::Header(Default::default())) }));
        assert!(s.accept(header).unwrap_err().to_string().contains("second `header`"));
    }

    #[test]
    fn the_id_index_takes_from_the_budget() {
        let budget = MemoryBudget::new(20_000, "--run-memory-budget");
        let mut s = StreamInput::new(Box::pin(futures::stream::empty()), budget.clone());
        let ids: Vec<String> = (0..1000).map(|i| format!("r{i}")).collect();
        s.accept(batch(&ids.iter().map(String::as_str).collect::<Vec<_>>())).unwrap();
        assert!(budget.available() < 20_000 - 1000 * INDEX_BYTES_PER_ID);
        let more: Vec<String> = (1000..3000).map(|i| format!("r{i}")).collect();
        let err = s.accept(batch(&more.iter().map(String::as_str).collect::<Vec<_>>())).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.to_string().contains("--run-memory-budget"), "{err}");
        drop(s);
        assert_eq!(budget.available(), 20_000);
    }
}
