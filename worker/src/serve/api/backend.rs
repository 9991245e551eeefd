//! What the gRPC service asks of a job store, whichever it is: accept a job, report it, stream
//! its events, cancel it, and drain. [`MemoryJobs`] is the embedded store of one process; the
//! PostgreSQL store (`serve/postgres/`) shares one durable queue between replicas.

use super::convert;
use crate::serve::job::source::JobSource;
use crate::serve::job::store::{Job, JobEvent, JobRequest, JobState, JobStore, SubmitError};
use jhakaas_proto::v1 as pb;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

/// A job's events as the API streams them.
pub type EventStream = ReceiverStream<Result<pb::JobEvent, Status>>;

/// A validated request ready to be accepted: the engine's form and the wire form (with its
/// seed fixed), which a durable store keeps so any replica can run it.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The validated request.
    pub request: JobRequest,
    /// The request as received, its seed set to the one fixed at acceptance.
    pub wire: pb::GenerateRequest,
}

/// The job store behind the gRPC service.
#[tonic::async_trait]
pub trait JobBackend: Send + Sync + 'static {
    /// Accepts a job (or returns the existing one for a repeated `request_id`).
    async fn submit(&self, job: Accepted) -> Result<pb::Job, Status>;
    /// Accepts a job and streams its events to its terminal one; a new job is cancelled when
    /// the client goes away or its deadline passes. A repeated `request_id` attaches to the
    /// existing job without owning it.
    async fn generate(&self, job: Accepted) -> Result<EventStream, Status>;
    /// The job with this id.
    async fn get(&self, id: &str) -> Result<pb::Job, Status>;
    /// Streams a job's events from its current state to its terminal event.
    async fn watch(&self, id: &str) -> Result<EventStream, Status>;
    /// Cancels a job: a queued one at once, a running one at its next step.
    async fn cancel(&self, id: &str) -> Result<pb::Job, Status>;
    /// The source the engine takes this store's jobs from.
    fn source(&self) -> Arc<dyn JobSource>;
    /// Shutdown: stop accepting, let the running job finish within `timeout`, then end (or,
    /// with a shared queue, hand back) what remains, and close the engine's source.
    async fn drain(&self, timeout: Duration);
}

/// Maps a refused submission to its status code.
pub fn submit_status(e: SubmitError) -> Status {
    match e {
        SubmitError::QueueFull { max_queue } => {
            Status::resource_exhausted(format!("the queue is full ({max_queue} jobs); retry later"))
        }
        SubmitError::Draining => {
            Status::unavailable("the worker is shutting down; retry on another replica")
        }
    }
}

/// No such job (or it expired).
pub fn not_found(id: &str) -> Status {
    Status::not_found(format!(
        "invalid job_id: no job `{id}` (unknown or expired)"
    ))
}

/// The embedded in-memory store: one process, nothing to set up.
#[derive(Debug, Clone)]
pub struct MemoryJobs {
    /// All jobs of this process.
    pub store: Arc<JobStore>,
}

impl MemoryJobs {
    /// Serves `store`, sweeping finished jobs every `sweep_every`.
    pub fn new(store: Arc<JobStore>, sweep_every: Duration) -> Self {
        let sweeper = store.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(sweep_every);
            loop {
                tick.tick().await;
                sweeper.sweep();
            }
        });
        Self { store }
    }

    fn find(&self, id: &str) -> Result<Arc<Job>, Status> {
        self.store.get(id).ok_or_else(|| not_found(id))
    }
}

#[tonic::async_trait]
impl JobBackend for MemoryJobs {
    async fn submit(&self, job: Accepted) -> Result<pb::Job, Status> {
        let submitted = self.store.submit(job.request).map_err(submit_status)?;
        let job = submitted.job;
        tracing::info!(job_id = %job.id, existing = submitted.events.is_none(), "submit");
        Ok(convert::job(&job, &job.snapshot()))
    }

    async fn generate(&self, job: Accepted) -> Result<EventStream, Status> {
        let submitted = self.store.submit(job.request).map_err(submit_status)?;
        let existing = submitted.events.is_none();
        tracing::info!(job_id = %submitted.job.id, existing, "generate");
        Ok(stream_events(
            self.store.clone(),
            submitted.job,
            submitted.events,
            !existing,
        ))
    }

    async fn get(&self, id: &str) -> Result<pb::Job, Status> {
        let job = self.find(id)?;
        Ok(convert::job(&job, &job.snapshot()))
    }

    async fn watch(&self, id: &str) -> Result<EventStream, Status> {
        Ok(stream_events(
            self.store.clone(),
            self.find(id)?,
            None,
            false,
        ))
    }

    async fn cancel(&self, id: &str) -> Result<pb::Job, Status> {
        let job = self.find(id)?;
        self.store.cancel(&job, "cancelled by client");
        Ok(convert::job(&job, &job.snapshot()))
    }

    fn source(&self) -> Arc<dyn JobSource> {
        self.store.clone()
    }

    async fn drain(&self, timeout: Duration) {
        let store = self.store.clone();
        tracing::info!(in_flight = store.in_flight(), "draining");
        store.start_draining();
        let s = store.clone();
        let idle = tokio::task::spawn_blocking(move || s.wait_idle(timeout))
            .await
            .unwrap_or(false);
        if !idle {
            tracing::warn!("drain timeout passed; cancelling what remains");
            store.cancel_all("worker shutting down");
            let s = store.clone();
            let _ = tokio::task::spawn_blocking(move || s.wait_idle(Duration::from_secs(30))).await;
        }
        store.close();
    }
}

/// Streams a job's events until its terminal event. `subscribed` is a receiver that has seen
/// every event of a job just submitted; without one, the stream starts from the job's current
/// state. With `owns_job`, the job is cancelled when the client goes away or its deadline
/// passes (that is what `Generate` promises).
fn stream_events(
    store: Arc<JobStore>,
    job: Arc<Job>,
    subscribed: Option<broadcast::Receiver<JobEvent>>,
    owns_job: bool,
) -> EventStream {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let (mut pending, mut events) = match subscribed {
            Some(rx) => (Vec::new(), rx),
            None => {
                let (snapshot, rx) = job.subscribe();
                let pending = match &snapshot.terminal {
                    Some(t) => vec![t.clone()],
                    None if snapshot.state == JobState::Running => {
                        let mut v = vec![JobEvent::Started];
                        v.extend(snapshot.progress.map(JobEvent::Progress));
                        v
                    }
                    None => vec![JobEvent::Queued {
                        position: snapshot.queue_position,
                    }],
                };
                (pending, rx)
            }
        };
        let deadline = job.request.deadline.map(tokio::time::Instant::from_std);
        loop {
            for e in pending.drain(..) {
                let terminal = e.is_terminal();
                if tx.send(Ok(convert::event(&job.id, &e))).await.is_err() {
                    if owns_job {
                        store.cancel(&job, "client disconnected");
                    }
                    return;
                }
                if terminal {
                    // A job stopped by its deadline ends the call with DEADLINE_EXCEEDED, whichever
                    // side noticed first (the engine between steps, or this task's timer).
                    let expired = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
                    if owns_job && expired && matches!(e, JobEvent::Cancelled { .. }) {
                        let _ = tx
                            .send(Err(Status::deadline_exceeded(
                                "the request's deadline passed",
                            )))
                            .await;
                    }
                    return;
                }
            }
            let next = async {
                match deadline {
                    Some(d) => tokio::time::timeout_at(d, events.recv()).await.ok(),
                    None => Some(events.recv().await),
                }
            };
            tokio::select! {
                r = next => match r {
                    Some(Ok(e)) => pending.push(e),
                    Some(Err(broadcast::error::RecvError::Lagged(_))) => {
                        // Missed events: resume from the snapshot (terminal if it ended).
                        let s = job.snapshot();
                        match s.terminal {
                            Some(t) => pending.push(t),
                            None => pending.extend(s.progress.map(JobEvent::Progress)),
                        }
                    }
                    Some(Err(broadcast::error::RecvError::Closed)) => return,
                    None => {
                        if owns_job {
                            store.cancel(&job, "deadline exceeded");
                        }
                        let _ = tx.send(Err(Status::deadline_exceeded("the request's deadline passed"))).await;
                        return;
                    }
                },
                _ = tx.closed() => {
                    if owns_job {
                        store.cancel(&job, "client disconnected");
                    }
                    return;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}
