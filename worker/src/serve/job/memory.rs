//! The embedded job store behind the faces: [`JobStore`] in one process, nothing to set up,
//! and its event streams (a new job owned by its stream is cancelled when the client goes away
//! or its deadline passes).

use super::backend::{Accepted, JobBackend, JobEvents, JobView};
use super::error::JobError;
use super::source::JobSource;
use super::store::{Job, JobEvent, JobState, JobStore};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

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

    fn find(&self, id: &str) -> Result<Arc<Job>, JobError> {
        self.store
            .get(id)
            .ok_or_else(|| JobError::NotFound(id.to_string()))
    }

    fn view(job: &Job) -> JobView {
        JobView::of(job, job.snapshot())
    }
}

#[async_trait::async_trait]
impl JobBackend for MemoryJobs {
    async fn submit(&self, job: Accepted) -> Result<JobView, JobError> {
        let submitted = self.store.submit(job.request)?;
        let job = submitted.job;
        tracing::info!(job_id = %job.id, existing = submitted.events.is_none(), "submit");
        Ok(Self::view(&job))
    }

    async fn generate(&self, job: Accepted) -> Result<JobEvents, JobError> {
        let submitted = self.store.submit(job.request)?;
        let existing = submitted.events.is_none();
        tracing::info!(job_id = %submitted.job.id, existing, "generate");
        Ok(stream_events(
            self.store.clone(),
            submitted.job,
            submitted.events,
            !existing,
        ))
    }

    async fn get(&self, id: &str) -> Result<JobView, JobError> {
        let job = self.find(id)?;
        Ok(Self::view(&job))
    }

    async fn watch(&self, id: &str) -> Result<JobEvents, JobError> {
        Ok(stream_events(
            self.store.clone(),
            self.find(id)?,
            None,
            false,
        ))
    }

    async fn cancel(&self, id: &str) -> Result<JobView, JobError> {
        let job = self.find(id)?;
        self.store.cancel(&job, "cancelled by client");
        Ok(Self::view(&job))
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
) -> JobEvents {
    let (tx, rx) = mpsc::channel(64);
    let job_id = job.id.clone();
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
                if tx.send(Ok(e.clone())).await.is_err() {
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
                        let _ = tx.send(Err(JobError::DeadlineExceeded)).await;
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
                        let _ = tx.send(Err(JobError::DeadlineExceeded)).await;
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
    JobEvents {
        job_id,
        events: ReceiverStream::new(rx),
    }
}
