//! The `RecordProcessor` gRPC service: converts the request once, runs it
//! through the [`Engine`], converts the result back.

use crate::convert;
use crate::engine::Engine;
use crate::proto;
use crate::workload::Workload;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The `RecordProcessor` service over an engine.
pub struct ProcessorService<W> {
    engine: Arc<Engine<W>>,
    name: String,
}

impl<W: Workload> ProcessorService<W> {
    /// A service named `name` (reported in every response) over `engine`.
    pub fn new(engine: Arc<Engine<W>>, name: String) -> Self {
        Self { engine, name }
    }
}

#[tonic::async_trait]
impl<W: Workload> proto::record_processor_server::RecordProcessor for ProcessorService<W> {
    async fn process_record(
        &self,
        request: Request<proto::ProcessRecordRequest>,
    ) -> Result<Response<proto::ProcessRecordResponse>, Status> {
        let task = convert::record_task_from_proto(request.into_inner())?;
        let record_id = task.record.id.clone();
        // If the caller cancels, tonic drops this future, and with it the
        // engine's: the record's units that have not started never start.
        let output = self.engine.process(task).await?;
        Ok(Response::new(convert::record_output_to_proto(record_id, output, &self.name)))
    }
}
