//! What the faces (gRPC, HTTP) ask of a job store, in domain types: accept a job, report it,
//! stream its events, cancel it, drain. [`super::memory::MemoryJobs`] is the embedded store of
//! one process; the PostgreSQL store (`serve/postgres/`) shares one durable queue between
//! replicas.

use super::error::JobError;
use super::events::{JobEvent, JobSnapshot};
use super::source::JobSource;
use super::store::{Job, JobRequest};
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;

/// A validated request ready to be accepted: the engine's form, and the request as the face
/// received it (encoded by the face, its seed fixed at acceptance), which a durable store keeps
/// so that any replica can run it.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The validated request.
    pub request: JobRequest,
    /// The face's encoding of the request as received.
    pub wire: Vec<u8>,
}

/// A job as a face reports it.
#[derive(Debug, Clone)]
pub struct JobView {
    /// Server-assigned id.
    pub id: String,
    /// The client's idempotency key (may be empty).
    pub request_id: String,
    /// The model it runs on.
    pub model: String,
    /// The seed fixed at acceptance.
    pub seed: u64,
    /// Its state now.
    pub snapshot: JobSnapshot,
}

impl JobView {
    /// The in-memory `job` at `snapshot`.
    pub fn of(job: &Job, snapshot: JobSnapshot) -> Self {
        Self {
            id: job.id.clone(),
            request_id: job.request.request_id.clone(),
            model: job.request.model.clone(),
            seed: job.request.params.seed.unwrap_or_default(),
            snapshot,
        }
    }
}

/// A job's events to its terminal one; an error ends the stream (a passed deadline, a lost
/// store).
#[derive(Debug)]
pub struct JobEvents {
    /// The job the events belong to.
    pub job_id: String,
    /// The events.
    pub events: ReceiverStream<Result<JobEvent, JobError>>,
}

/// The job store behind the faces.
#[async_trait::async_trait]
pub trait JobBackend: Send + Sync + 'static {
    /// Accepts a job (or returns the existing one for a repeated `request_id`).
    async fn submit(&self, job: Accepted) -> Result<JobView, JobError>;
    /// Accepts a job and streams its events to its terminal one; a new job is cancelled when
    /// the client goes away or its deadline passes. A repeated `request_id` attaches to the
    /// existing job without owning it.
    async fn generate(&self, job: Accepted) -> Result<JobEvents, JobError>;
    /// The job with this id.
    async fn get(&self, id: &str) -> Result<JobView, JobError>;
    /// Streams a job's events from its current state to its terminal event.
    async fn watch(&self, id: &str) -> Result<JobEvents, JobError>;
    /// Cancels a job: a queued one at once, a running one at its next step.
    async fn cancel(&self, id: &str) -> Result<JobView, JobError>;
    /// The source the engine takes this store's jobs from.
    fn source(&self) -> Arc<dyn JobSource>;
    /// Shutdown: stop accepting, let the running job finish within `timeout`, then end (or,
    /// with a shared queue, hand back) what remains, and close the engine's source.
    async fn drain(&self, timeout: Duration);
}
