//! The job store: a bounded FIFO queue in front of the engine thread, every job's state and
//! event stream, idempotency by `request_id`, cancellation, and expiry after the result TTL.
//!
//! Locking: the store's lock guards the queue and the maps; each job's own lock guards its
//! snapshot, and events are sent while holding it so a watcher that subscribes under the same
//! lock never misses or duplicates an event.

use jhakaas_model_manager::pipeline::RequestLimits;
use jhakaas_model_manager::{GenerateParams, ImageFormat, Progress};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

/// Events buffered per watcher; a job emits at most steps + a handful, and a lagging watcher
/// falls back to the job's snapshot.
const EVENT_BUFFER: usize = 1024;

/// What a client asked for, validated.
#[derive(Debug, Clone)]
pub struct JobRequest {
    /// Client idempotency key (may be empty).
    pub request_id: String,
    /// Registered model name.
    pub model: String,
    /// Engine parameters (the seed fixed at acceptance).
    pub params: GenerateParams,
    /// The server's limits the job was accepted under; the engine checks them again on the
    /// resolved request.
    pub limits: RequestLimits,
    /// Encoding of the result images.
    pub format: ImageFormat,
    /// When the client stops caring (gRPC deadline).
    pub deadline: Option<Instant>,
}

/// An encoded result image.
#[derive(Debug, Clone)]
pub struct EncodedImage {
    /// Encoded bytes.
    pub data: Vec<u8>,
    /// MIME type of `data`.
    pub mime_type: &'static str,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// The seed that reproduces it.
    pub seed: u64,
}

/// Per-stage durations reported with every terminal event.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct JobTimings {
    /// Waiting in the queue.
    pub queue: Duration,
    /// Prompt encoding.
    pub text_encode: Duration,
    /// The denoising loop.
    pub denoise: Duration,
    /// VAE decode.
    pub decode: Duration,
    /// PNG/JPEG/WebP encoding.
    pub image_encode: Duration,
    /// Submit to terminal event.
    pub total: Duration,
}

/// Lifecycle state of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Waiting for the engine.
    Queued,
    /// On the engine.
    Running,
    /// Finished with images.
    Succeeded,
    /// Finished with an error.
    Failed,
    /// Stopped by a client, a disconnect, a deadline or shutdown.
    Cancelled,
}

impl JobState {
    /// Whether no further event will follow.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

/// One event in a job's life.
#[derive(Debug, Clone)]
pub enum JobEvent {
    /// Queued at this position (0 = next).
    Queued { position: u32 },
    /// The engine is loading the job's model first.
    ModelLoading { model: String },
    /// The engine started the job.
    Started,
    /// One denoising step finished.
    Progress(Progress),
    /// Terminal: images are ready.
    Completed {
        images: Arc<Vec<EncodedImage>>,
        timings: JobTimings,
    },
    /// Terminal: the job failed.
    Failed { reason: String, timings: JobTimings },
    /// Terminal: the job was cancelled.
    Cancelled { reason: String, timings: JobTimings },
}

impl JobEvent {
    /// Whether this ends the job's stream.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            JobEvent::Completed { .. } | JobEvent::Failed { .. } | JobEvent::Cancelled { .. }
        )
    }
}

/// A job's state at one moment.
#[derive(Debug, Clone)]
pub struct JobSnapshot {
    /// Lifecycle state.
    pub state: JobState,
    /// Position in the queue while queued.
    pub queue_position: u32,
    /// Last progress event.
    pub progress: Option<Progress>,
    /// Result images once succeeded.
    pub images: Arc<Vec<EncodedImage>>,
    /// Timings once terminal.
    pub timings: Option<JobTimings>,
    /// Failure or cancellation reason.
    pub error: String,
    /// The terminal event, replayed to late watchers.
    pub terminal: Option<JobEvent>,
}

/// One job.
#[derive(Debug)]
pub struct Job {
    /// Server-assigned id.
    pub id: String,
    /// What to run.
    pub request: JobRequest,
    /// When it was accepted.
    pub submitted: Instant,
    cancel: AtomicBool,
    cancel_reason: Mutex<String>,
    state: Mutex<JobSnapshot>,
    events: broadcast::Sender<JobEvent>,
    finished: Mutex<Option<Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a job lock must not take the whole server down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Job {
    fn new(request: JobRequest, position: u32) -> Self {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Self {
            id: uuid::Uuid::new_v4().to_string(),
            request,
            submitted: Instant::now(),
            cancel: AtomicBool::new(false),
            cancel_reason: Mutex::new(String::new()),
            state: Mutex::new(JobSnapshot {
                state: JobState::Queued,
                queue_position: position,
                progress: None,
                images: Arc::new(Vec::new()),
                timings: None,
                error: String::new(),
                terminal: None,
            }),
            events,
            finished: Mutex::new(None),
        }
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> JobSnapshot {
        lock(&self.state).clone()
    }

    /// The snapshot plus a receiver for every later event, atomically.
    pub fn subscribe(&self) -> (JobSnapshot, broadcast::Receiver<JobEvent>) {
        let guard = lock(&self.state);
        (guard.clone(), self.events.subscribe())
    }

    /// Whether cancellation was requested (checked by the engine between steps).
    pub fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Why cancellation was requested.
    pub fn cancel_reason(&self) -> String {
        lock(&self.cancel_reason).clone()
    }

    /// Records and broadcasts an event. Ignored once the job is terminal.
    pub fn emit(&self, event: JobEvent) {
        let mut s = lock(&self.state);
        if s.state.is_terminal() {
            return;
        }
        match &event {
            JobEvent::Queued { position } => s.queue_position = *position,
            JobEvent::ModelLoading { .. } => {}
            JobEvent::Started => {
                s.state = JobState::Running;
                s.queue_position = 0;
            }
            JobEvent::Progress(p) => s.progress = Some(*p),
            JobEvent::Completed { images, timings } => {
                s.state = JobState::Succeeded;
                s.images = images.clone();
                s.timings = Some(*timings);
            }
            JobEvent::Failed { reason, timings } => {
                s.state = JobState::Failed;
                s.error = reason.clone();
                s.timings = Some(*timings);
            }
            JobEvent::Cancelled { reason, timings } => {
                s.state = JobState::Cancelled;
                s.error = reason.clone();
                s.timings = Some(*timings);
            }
        }
        if event.is_terminal() {
            s.terminal = Some(event.clone());
            *lock(&self.finished) = Some(Instant::now());
        }
        // No receivers is fine: nobody is watching right now.
        let _ = self.events.send(event);
    }

    /// Timings for a job that ends before or without running.
    pub fn timings_so_far(&self, queue: Duration) -> JobTimings {
        JobTimings {
            queue,
            total: self.submitted.elapsed(),
            ..Default::default()
        }
    }
}

/// An accepted submission.
#[derive(Debug)]
pub struct Submitted {
    /// The job (new, or the existing one for a repeated `request_id`).
    pub job: Arc<Job>,
    /// For a new job: every event since before it was queued. `None` for an existing job.
    pub events: Option<broadcast::Receiver<JobEvent>>,
}

/// Why a submission was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue holds `max_queue` jobs already.
    QueueFull { max_queue: usize },
    /// The server is draining.
    Draining,
}

#[derive(Debug, Default)]
struct Inner {
    jobs: HashMap<String, Arc<Job>>,
    by_request: HashMap<String, String>,
    queue: VecDeque<Arc<Job>>,
    running: Option<Arc<Job>>,
    draining: bool,
    closed: bool,
}

/// All jobs of this worker.
#[derive(Debug)]
pub struct JobStore {
    inner: Mutex<Inner>,
    wake: Condvar,
    max_queue: usize,
    result_ttl: Duration,
}

impl JobStore {
    /// A store whose queue holds at most `max_queue` jobs and which forgets finished jobs
    /// `result_ttl` after they end.
    pub fn new(max_queue: usize, result_ttl: Duration) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            wake: Condvar::new(),
            max_queue,
            result_ttl,
        }
    }

    /// Queues a job, or returns the existing one with the same non-empty `request_id`.
    /// A new job comes with a receiver subscribed before it was queued, so its caller sees
    /// every event from `Queued` on (the engine may start it at once).
    pub fn submit(&self, request: JobRequest) -> Result<Submitted, SubmitError> {
        let mut inner = lock(&self.inner);
        if !request.request_id.is_empty() {
            if let Some(job) = inner
                .by_request
                .get(&request.request_id)
                .and_then(|id| inner.jobs.get(id))
            {
                return Ok(Submitted {
                    job: job.clone(),
                    events: None,
                });
            }
        }
        if inner.draining {
            return Err(SubmitError::Draining);
        }
        if inner.queue.len() >= self.max_queue {
            return Err(SubmitError::QueueFull {
                max_queue: self.max_queue,
            });
        }
        let position = inner.queue.len() as u32;
        let job = Arc::new(Job::new(request, position));
        let events = job.events.subscribe();
        if !job.request.request_id.is_empty() {
            inner
                .by_request
                .insert(job.request.request_id.clone(), job.id.clone());
        }
        inner.jobs.insert(job.id.clone(), job.clone());
        inner.queue.push_back(job.clone());
        job.emit(JobEvent::Queued { position });
        metrics::gauge!("jhakaas_queue_depth").set(inner.queue.len() as f64);
        drop(inner);
        self.wake.notify_all();
        Ok(Submitted {
            job,
            events: Some(events),
        })
    }

    /// The job with this id, if it exists and has not expired.
    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        lock(&self.inner).jobs.get(id).cloned()
    }

    /// Cancels a job: a queued one ends at once, a running one at the next step boundary.
    pub fn cancel(&self, job: &Arc<Job>, reason: &str) {
        let mut inner = lock(&self.inner);
        if job.snapshot().state.is_terminal() {
            return;
        }
        if !job.cancel.swap(true, Ordering::SeqCst) {
            *lock(&job.cancel_reason) = reason.to_string();
        }
        if let Some(pos) = inner.queue.iter().position(|j| j.id == job.id) {
            inner.queue.remove(pos);
            Self::renumber(&inner.queue);
            metrics::gauge!("jhakaas_queue_depth").set(inner.queue.len() as f64);
            drop(inner);
            let waited = job.submitted.elapsed();
            job.emit(JobEvent::Cancelled {
                reason: reason.to_string(),
                timings: job.timings_so_far(waited),
            });
            metrics::counter!("jhakaas_jobs_total", "outcome" => "cancelled").increment(1);
        }
    }

    /// Blocks the engine thread until a job is queued; `None` once the store is closed and
    /// the queue is empty.
    pub fn next(&self) -> Option<Arc<Job>> {
        let mut inner = lock(&self.inner);
        loop {
            if let Some(job) = inner.queue.pop_front() {
                Self::renumber(&inner.queue);
                metrics::gauge!("jhakaas_queue_depth").set(inner.queue.len() as f64);
                inner.running = Some(job.clone());
                return Some(job);
            }
            if inner.closed {
                return None;
            }
            inner = self.wake.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The engine finished its current job.
    pub fn done(&self, job: &Arc<Job>) {
        let mut inner = lock(&self.inner);
        if inner.running.as_ref().is_some_and(|r| r.id == job.id) {
            inner.running = None;
        }
        drop(inner);
        self.wake.notify_all();
    }

    fn renumber(queue: &VecDeque<Arc<Job>>) {
        for (i, j) in queue.iter().enumerate() {
            j.emit(JobEvent::Queued { position: i as u32 });
        }
    }

    /// Queued plus running jobs.
    pub fn in_flight(&self) -> usize {
        let inner = lock(&self.inner);
        inner.queue.len() + usize::from(inner.running.is_some())
    }

    /// Stops accepting new jobs (drain); queued and running jobs continue.
    pub fn start_draining(&self) {
        lock(&self.inner).draining = true;
    }

    /// Cancels everything queued or running (end of the drain timeout).
    pub fn cancel_all(&self, reason: &str) {
        let jobs: Vec<Arc<Job>> = {
            let inner = lock(&self.inner);
            inner
                .queue
                .iter()
                .cloned()
                .chain(inner.running.clone())
                .collect()
        };
        for job in jobs {
            self.cancel(&job, reason);
        }
    }

    /// Lets the engine thread exit once the queue is empty.
    pub fn close(&self) {
        lock(&self.inner).closed = true;
        self.wake.notify_all();
    }

    /// Waits until nothing is queued or running, or `timeout` passes; true if idle.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut inner = lock(&self.inner);
        loop {
            if inner.queue.is_empty() && inner.running.is_none() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            inner = self
                .wake
                .wait_timeout(inner, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Forgets finished jobs older than the result TTL; returns how many went.
    pub fn sweep(&self) -> usize {
        let mut inner = lock(&self.inner);
        let ttl = self.result_ttl;
        let expired: Vec<String> = inner
            .jobs
            .values()
            .filter(|j| lock(&j.finished).is_some_and(|t| t.elapsed() >= ttl))
            .map(|j| j.id.clone())
            .collect();
        for id in &expired {
            if let Some(job) = inner.jobs.remove(id) {
                if !job.request.request_id.is_empty() {
                    inner.by_request.remove(&job.request.request_id);
                }
            }
        }
        expired.len()
    }
}
