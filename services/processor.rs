//! The `RecordProcessor` gRPC service: admits a record (or refuses it as
//! "not started" when full), converts the request once, runs it through the
//! [`Engine`], converts the result back; and `Describe`, which tells a
//! pipeline how many records the instance takes at once.

use crate::budget::HeldBudget;
use crate::convert;
use crate::engine::Engine;
use crate::proto;
use crate::workload::Workload;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// Response metadata key marking a refusal as "the record was not started":
/// the caller may send it again without counting an attempt.
pub const NOT_STARTED_KEY: &str = "fanout-not-started";

/// Largest `ProcessBatch` response: results past it are left out, each
/// failed `RESOURCE_EXHAUSTED` (retried by a pipeline).
pub const MAX_BATCH_RESPONSE_BYTES: usize = 32 * 1024 * 1024;

/// How many records a processor works on at once and lets wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Records processed at once.
    pub slots: usize,
    /// Records allowed to wait for a slot; more are refused at once.
    pub queue: usize,
}

/// Admission control: `slots` records at once, `queue` more waiting, the
/// rest refused with `RESOURCE_EXHAUSTED` marked not started. A pipeline
/// never sends more than `slots` (it reads them from `Describe`); the queue
/// absorbs the moment between a pipeline freeing a slot and the processor
/// noticing, and the sum of several pipelines sharing the instance.
#[derive(Debug)]
pub struct Admission {
    capacity: Capacity,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
}

impl Admission {
    /// Admission for `capacity`.
    pub fn new(capacity: Capacity) -> Self {
        let slots = Arc::new(Semaphore::new(capacity.slots.max(1)));
        Self { capacity, slots, waiting: AtomicUsize::new(0) }
    }

    /// A slot, at once or after waiting in the queue; `Err` (not started)
    /// when the queue is full. Dropping the future leaves the queue.
    pub async fn admit(&self) -> Result<OwnedSemaphorePermit, Status> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.capacity.queue {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(self.full());
        }
        let _left = LeaveQueue(&self.waiting);
        self.slots.clone().acquire_owned().await.map_err(|_| Status::unavailable("processor shutting down"))
    }

    /// The refusal: `RESOURCE_EXHAUSTED`, marked not started, with a
    /// pushback hint.
    fn full(&self) -> Status {
        let mut status = not_started(Status::resource_exhausted(format!(
            "processor at capacity: {} records in progress and {} waiting (set by --slots and --queue); \
             the record was not started",
            self.capacity.slots, self.capacity.queue
        )));
        status.metadata_mut().insert("grpc-retry-pushback-ms", "10".parse().expect("ascii"));
        status
    }
}

struct LeaveQueue<'a>(&'a AtomicUsize);

impl Drop for LeaveQueue<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether a failed call's status is a processor's "not started" refusal
/// (full: `RESOURCE_EXHAUSTED`; shutting down: `UNAVAILABLE`).
pub fn is_not_started(status: &Status) -> bool {
    status.metadata().get(NOT_STARTED_KEY).is_some_and(|v| v.as_bytes() == b"true")
}

/// `status` marked not started.
pub(crate) fn not_started(mut status: Status) -> Status {
    status.metadata_mut().insert(NOT_STARTED_KEY, "true".parse().expect("ascii"));
    status
}

/// What `Describe` answers besides the engine's own figures.
#[derive(Debug, Clone)]
pub struct Description {
    /// The instance's name.
    pub name: String,
    /// Unit threads.
    pub unit_threads: usize,
    /// Most units per record.
    pub max_units_per_record: usize,
    /// Largest request accepted.
    pub max_message_bytes: usize,
}

/// The `RecordProcessor` service over an engine.
pub struct ProcessorService<W> {
    engine: Arc<Engine<W>>,
    admission: Admission,
    description: Description,
    draining: CancellationToken,
}

impl<W: Workload> ProcessorService<W> {
    /// A service over `engine` admitting records as `capacity` allows. Once
    /// `draining` is cancelled (shutdown began) it refuses new records as
    /// not started, and finishes those it has.
    pub fn new(
        engine: Arc<Engine<W>>,
        capacity: Capacity,
        description: Description,
        draining: CancellationToken,
    ) -> Self {
        Self { engine, admission: Admission::new(capacity), description, draining }
    }
}

impl<W: Workload> ProcessorService<W> {
    /// Takes a call in: its share of the memory budget (what decoding it
    /// took stays taken while it waits and is worked on) and a slot; refused
    /// as not started while shutting down (a pipeline sends the `what`
    /// elsewhere, without counting an attempt) or when full.
    async fn admit<T>(
        &self,
        request: &Request<T>,
        what: &str,
    ) -> Result<(Option<OwnedSemaphorePermit>, OwnedSemaphorePermit), Status> {
        let budget = request.extensions().get::<HeldBudget>().and_then(HeldBudget::take);
        if self.draining.is_cancelled() {
            return Err(not_started(Status::unavailable(format!(
                "processor {} is shutting down: the {what} was not started",
                self.description.name
            ))));
        }
        Ok((budget, self.admission.admit().await?))
    }
}

#[tonic::async_trait]
impl<W: Workload> proto::record_processor_server::RecordProcessor for ProcessorService<W> {
    async fn process_record(
        &self,
        request: Request<proto::ProcessRecordRequest>,
    ) -> Result<Response<proto::ProcessRecordResponse>, Status> {
        let parent = crate::otel::Parent::from_metadata(request.metadata());
        let _held = self.admit(&request, "record").await?;
        let task = convert::record_task_from_proto(request.into_inner())?;
        let record_id = task.record.id.clone();
        let span = crate::otel::record_span(&parent, &task.run_id, &record_id, task.attempt);
        // If the caller cancels (or the call's deadline passes), tonic drops
        // this future, and with it the engine's: the record's units that
        // have not started never start, and running ones see their flag.
        let output = self.engine.process(task).instrument(span).await?;
        Ok(Response::new(convert::record_output_to_proto(record_id, output, &self.description.name)))
    }

    async fn process_batch(
        &self,
        request: Request<proto::ProcessBatchRequest>,
    ) -> Result<Response<proto::ProcessBatchResponse>, Status> {
        // One slot for the call, as a pipeline counts it.
        let parent = crate::otel::Parent::from_metadata(request.metadata());
        let _held = self.admit(&request, "batch").await?;
        let request = request.into_inner();
        let timeout = match &request.record_timeout {
            None => None,
            Some(d) => Some(convert::duration_from_proto(d).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "record_timeout: must be a non-negative duration within protobuf's range, got {}s {}ns",
                    d.seconds, d.nanos
                ))
            })?)
            .filter(|d| !d.is_zero()),
        };
        let tasks = convert::batch_tasks_from_proto(request)?;
        // Every record on its own: its units join the shared unit threads,
        // its failure and its deadline are its own.
        let parent = &parent;
        let results = futures::future::join_all(tasks.into_iter().map(|task| async move {
            let task = task?;
            let record_id = task.record.id.clone();
            let span = crate::otel::record_span(parent, &task.run_id, &record_id, task.attempt);
            let work = self.engine.process(task).instrument(span);
            let output = match timeout {
                None => work.await?,
                Some(t) => tokio::time::timeout(t, work).await.map_err(|_| {
                    crate::Error::DeadlineExceeded(format!(
                        "record {record_id:?}: over its record_timeout of {t:?}"
                    ))
                })??,
            };
            Ok::<_, crate::Error>(convert::record_output_to_proto(record_id, output, &self.description.name))
        }))
        .await;
        let mut bytes = 0;
        let results = results
            .into_iter()
            .map(|r| {
                let outcome = match r {
                    Ok(processed) => {
                        bytes += prost::Message::encoded_len(&processed);
                        if bytes <= MAX_BATCH_RESPONSE_BYTES {
                            proto::batch_item::Outcome::Processed(processed)
                        } else {
                            proto::batch_item::Outcome::Error(proto::Error {
                                code: tonic::Code::ResourceExhausted as i32,
                                code_name: "RESOURCE_EXHAUSTED".into(),
                                message: format!(
                                    "the batch's response reached {MAX_BATCH_RESPONSE_BYTES} bytes: this record's \
                                     result was left out (send it again, or in smaller batches)"
                                ),
                            })
                        }
                    }
                    Err(e) => proto::batch_item::Outcome::Error(convert::error_to_proto(&e)),
                };
                proto::BatchItem { outcome: Some(outcome) }
            })
            .collect();
        Ok(Response::new(proto::ProcessBatchResponse { results }))
    }

    async fn describe(
        &self,
        _request: Request<proto::DescribeRequest>,
    ) -> Result<Response<proto::DescribeResponse>, Status> {
        let d = &self.description;
        let c = self.admission.capacity;
        Ok(Response::new(proto::DescribeResponse {
            name: d.name.clone(),
            workload: self.engine.workload_name().to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            unit_threads: d.unit_threads as u32,
            slots: c.slots as u32,
            queue: c.queue as u32,
            max_units_per_record: d.max_units_per_record as u32,
            max_message_bytes: d.max_message_bytes as u64,
            max_batch_size: crate::domain::MAX_BATCH_SIZE as u32,
        }))
    }
}
