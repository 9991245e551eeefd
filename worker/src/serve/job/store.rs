//! The job store: a bounded FIFO queue in front of the engine thread, every job's state and
//! event stream, idempotency by `request_id`, cancellation, and expiry after the result TTL.
//!
//! Locking: the store's lock guards the queue and the maps; each job's own lock guards its
//! snapshot, and events are sent while holding it so a watcher that subscribes under the same
//! lock never misses or duplicates an event.

use super::events::{lock, EventBus};
pub use super::events::{EncodedImage, JobEvent, JobSnapshot, JobState, JobTimings};
use jhakaas_model_manager::pipeline::RequestLimits;
use jhakaas_model_manager::{GenerateParams, ImageFormat};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

/// Events a job emits besides its progress (queued, model loading, started, terminal), plus
/// slack; a job's event channel holds these plus one per step, so a subscriber that keeps up
/// never lags (one that does not resumes from the job's snapshot).
const EVENT_SLACK: usize = 8;
/// Channel size when a request's step count is unknown (bounded by the server's max steps).
const EVENT_BUFFER_DEFAULT: usize = 160;

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
    /// LoRA adapters merged into the model for this job (none: the base model).
    pub loras: Vec<jhakaas_model_manager::lora::LoraAdapter>,
    /// Encoding of the result images.
    pub format: ImageFormat,
    /// When the client stops caring (gRPC deadline).
    pub deadline: Option<Instant>,
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
    bus: EventBus,
}

impl Job {
    /// A job with a fresh id, queued at `position`.
    fn new(request: JobRequest, position: u32) -> Self {
        Self::with_id(
            uuid::Uuid::new_v4().to_string(),
            request,
            Instant::now(),
            position,
        )
    }

    /// A job the engine runs under an id given elsewhere (a durable store's row), accepted
    /// at `submitted`.
    pub fn with_id(id: String, request: JobRequest, submitted: Instant, position: u32) -> Self {
        let steps = request
            .params
            .steps
            .or(request.limits.max_steps)
            .unwrap_or(EVENT_BUFFER_DEFAULT);
        let capacity = steps.min(EVENT_BUFFER_DEFAULT * 8) + EVENT_SLACK;
        Self {
            id,
            request,
            submitted,
            cancel: AtomicBool::new(false),
            cancel_reason: Mutex::new(String::new()),
            bus: EventBus::new(capacity, position),
        }
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> JobSnapshot {
        self.bus.snapshot()
    }

    /// The snapshot plus a receiver for every later event, atomically.
    pub fn subscribe(&self) -> (JobSnapshot, broadcast::Receiver<JobEvent>) {
        self.bus.subscribe()
    }

    /// Whether cancellation was requested (checked by the engine between steps).
    pub fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Why cancellation was requested.
    pub fn cancel_reason(&self) -> String {
        lock(&self.cancel_reason).clone()
    }

    /// Asks the engine to stop this job at its next step; the first reason given wins.
    /// Returns whether this call was the first.
    ///
    /// The reason is written before the flag is raised (both under the reason's lock), so
    /// whoever sees [`Job::cancel_requested`] reads the reason given: the engine ends the job
    /// with it, and a drain's hand-back is told from a client's cancel by it.
    pub fn request_cancel(&self, reason: &str) -> bool {
        let mut stored = lock(&self.cancel_reason);
        if self.cancel.load(Ordering::SeqCst) {
            return false;
        }
        *stored = reason.to_string();
        self.cancel.store(true, Ordering::SeqCst);
        true
    }

    /// Publishes an event on the job's bus. Ignored once the job is terminal.
    pub fn emit(&self, event: JobEvent) {
        self.bus.publish(event);
    }

    /// When the job's terminal event was published.
    pub fn finished_at(&self) -> Option<Instant> {
        self.bus.finished_at()
    }

    /// Bytes this job holds while retained: its encoded images and its decoded init image.
    pub fn retained_bytes(&self) -> u64 {
        let images: u64 = self
            .snapshot()
            .images
            .iter()
            .map(|i| i.data.len() as u64)
            .sum();
        let init = self
            .request
            .params
            .init_image
            .as_ref()
            .map_or(0, |i| i.image.width() as u64 * i.image.height() as u64 * 3);
        images + init
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

impl From<SubmitError> for super::error::JobError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull { max_queue } => Self::QueueFull { max_queue },
            SubmitError::Draining => Self::Draining,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    jobs: HashMap<String, Arc<Job>>,
    by_request: HashMap<String, String>,
    queue: VecDeque<Arc<Job>>,
    /// Taken by the engine and not yet done (running, or its images encoding).
    running: Vec<Arc<Job>>,
    draining: bool,
    closed: bool,
}

/// How long and how much the store keeps of finished jobs.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Finished jobs are forgotten this long after they end.
    pub ttl: Duration,
    /// At most this many finished jobs are kept (the oldest go first).
    pub max_jobs: usize,
    /// At most this many bytes of results (encoded images, decoded init images) are kept.
    pub max_bytes: u64,
}

/// All jobs of this worker.
#[derive(Debug)]
pub struct JobStore {
    inner: Mutex<Inner>,
    wake: Condvar,
    max_queue: usize,
    retention: Retention,
}

impl JobStore {
    /// A store whose queue holds at most `max_queue` jobs and which keeps finished jobs as
    /// `retention` says.
    pub fn new(max_queue: usize, retention: Retention) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            wake: Condvar::new(),
            max_queue,
            retention,
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
        let (_, events) = job.subscribe();
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
        job.request_cancel(reason);
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
                inner.running.push(job.clone());
                metrics::gauge!("jhakaas_jobs_running").set(inner.running.len() as f64);
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
        inner.running.retain(|r| r.id != job.id);
        metrics::gauge!("jhakaas_jobs_running").set(inner.running.len() as f64);
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
        inner.queue.len() + inner.running.len()
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
                .chain(inner.running.iter().cloned())
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
            if inner.queue.is_empty() && inner.running.is_empty() {
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

    /// Forgets finished jobs older than the result TTL, then the oldest finished ones while
    /// more are kept than the retention's count or bytes allow; returns how many went.
    pub fn sweep(&self) -> usize {
        let mut inner = lock(&self.inner);
        let ttl = self.retention.ttl;
        let mut finished: Vec<(Instant, String, u64)> = inner
            .jobs
            .values()
            .filter_map(|j| {
                j.finished_at()
                    .map(|t| (t, j.id.clone(), j.retained_bytes()))
            })
            .collect();
        finished.sort();
        let mut bytes: u64 = finished.iter().map(|f| f.2).sum();
        let mut count = finished.len();
        let mut expired = Vec::new();
        for (t, id, b) in finished {
            let over = count > self.retention.max_jobs || bytes > self.retention.max_bytes;
            if !over && t.elapsed() < ttl {
                continue;
            }
            count -= 1;
            bytes -= b;
            expired.push(id);
        }
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

impl super::source::JobSource for JobStore {
    fn next(&self) -> Option<Arc<Job>> {
        JobStore::next(self)
    }

    fn done(&self, job: &Arc<Job>) {
        JobStore::done(self, job)
    }

    fn close(&self) {
        JobStore::close(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jhakaas_model_manager::Progress;

    fn request(id: &str) -> JobRequest {
        JobRequest {
            request_id: id.into(),
            model: "m".into(),
            params: GenerateParams {
                prompt: "p".into(),
                steps: Some(4),
                ..Default::default()
            },
            limits: RequestLimits::default(),
            loras: Vec::new(),
            format: ImageFormat::Png,
            deadline: None,
        }
    }

    fn store(max_queue: usize, retention: Retention) -> JobStore {
        JobStore::new(max_queue, retention)
    }

    const KEEP: Retention = Retention {
        ttl: Duration::from_secs(600),
        max_jobs: 100,
        max_bytes: 1 << 30,
    };

    fn complete(job: &Job, bytes: usize) {
        job.emit(JobEvent::Started);
        job.emit(JobEvent::Completed {
            images: Arc::new(vec![EncodedImage {
                data: vec![0; bytes],
                mime_type: "image/png",
                width: 1,
                height: 1,
                seed: 0,
            }]),
            timings: JobTimings::default(),
        });
    }

    #[test]
    fn a_repeated_request_id_returns_the_same_job_and_a_full_queue_refuses() {
        let s = store(2, KEEP);
        let a = s.submit(request("x")).unwrap().job;
        let again = s.submit(request("x")).unwrap();
        assert_eq!(again.job.id, a.id);
        assert!(
            again.events.is_none(),
            "no second subscription for a duplicate"
        );
        s.submit(request("")).unwrap();
        assert!(matches!(
            s.submit(request("")),
            Err(SubmitError::QueueFull { max_queue: 2 })
        ));
        // A duplicate is answered even when the queue is full.
        assert_eq!(s.submit(request("x")).unwrap().job.id, a.id);
    }

    #[test]
    fn cancelling_a_queued_job_ends_it_once_and_renumbers_the_rest() {
        let s = store(8, KEEP);
        let jobs: Vec<_> = (0..3).map(|_| s.submit(request("")).unwrap().job).collect();
        let (_, mut rx) = jobs[2].subscribe();
        s.cancel(&jobs[0], "no longer needed");
        assert_eq!(jobs[0].snapshot().state, JobState::Cancelled);
        assert_eq!(jobs[1].snapshot().queue_position, 0);
        assert_eq!(jobs[2].snapshot().queue_position, 1);
        assert!(matches!(
            rx.try_recv(),
            Ok(JobEvent::Queued { position: 1 })
        ));
        // A second cancel and later events change nothing: exactly one terminal event.
        s.cancel(&jobs[0], "again");
        jobs[0].emit(JobEvent::Started);
        assert_eq!(jobs[0].snapshot().state, JobState::Cancelled);
        assert_eq!(jobs[0].snapshot().error, "no longer needed");
        let next = s.next().unwrap();
        assert_eq!(next.id, jobs[1].id, "the cancelled job is never run");
    }

    #[test]
    fn a_running_job_is_cancelled_at_the_engine_s_next_check() {
        let s = store(8, KEEP);
        let job = s.submit(request("")).unwrap().job;
        let running = s.next().unwrap();
        running.emit(JobEvent::Started);
        s.cancel(&job, "stop");
        assert!(running.cancel_requested());
        assert_eq!(running.cancel_reason(), "stop");
        assert_eq!(
            running.snapshot().state,
            JobState::Running,
            "the engine ends it"
        );
        assert_eq!(s.in_flight(), 1);
        s.done(&running);
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn whoever_sees_a_cancel_reads_its_reason() {
        // The engine checks the flag from its own thread while another thread (a client's
        // cancel, a drain) raises it: the reason must already be there. Two racing reasons:
        // exactly one wins, and every reader sees that one.
        for _ in 0..500 {
            let job = Arc::new(Job::new(request(""), 0));
            let engine = {
                let job = job.clone();
                std::thread::spawn(move || {
                    while !job.cancel_requested() {
                        std::hint::spin_loop();
                    }
                    job.cancel_reason()
                })
            };
            let other = {
                let job = job.clone();
                std::thread::spawn(move || job.request_cancel("drain"))
            };
            let mine = job.request_cancel("client");
            let theirs = other.join().unwrap();
            assert!(mine != theirs, "exactly one request is the first");
            let seen = engine.join().unwrap();
            assert_eq!(seen, if mine { "client" } else { "drain" });
            assert_eq!(job.cancel_reason(), seen);
        }
    }

    #[test]
    fn draining_refuses_new_jobs_and_waits_for_queued_ones() {
        let s = Arc::new(store(8, KEEP));
        let job = s.submit(request("")).unwrap().job;
        s.start_draining();
        assert!(matches!(s.submit(request("")), Err(SubmitError::Draining)));
        assert!(!s.wait_idle(Duration::from_millis(20)));
        let engine = {
            let s = s.clone();
            std::thread::spawn(move || {
                let j = s.next().unwrap();
                complete(&j, 1);
                s.done(&j);
            })
        };
        assert!(s.wait_idle(Duration::from_secs(5)));
        engine.join().unwrap();
        assert_eq!(job.snapshot().state, JobState::Succeeded);
        s.close();
        assert!(s.next().is_none());
    }

    #[test]
    fn finished_jobs_go_after_their_ttl_or_when_the_caps_are_reached() {
        let ttl = store(
            8,
            Retention {
                ttl: Duration::ZERO,
                ..KEEP
            },
        );
        let j = ttl.submit(request("a")).unwrap().job;
        complete(&j, 10);
        assert_eq!(ttl.sweep(), 1);
        assert!(ttl.get(&j.id).is_none());
        // The request id can be used again once its job is forgotten.
        assert_ne!(ttl.submit(request("a")).unwrap().job.id, j.id);

        let count = store(
            8,
            Retention {
                max_jobs: 2,
                ..KEEP
            },
        );
        let jobs: Vec<_> = (0..3)
            .map(|_| count.submit(request("")).unwrap().job)
            .collect();
        for j in &jobs {
            complete(j, 10);
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(count.sweep(), 1);
        assert!(count.get(&jobs[0].id).is_none(), "the oldest goes first");
        assert!(count.get(&jobs[2].id).is_some());

        let bytes = store(
            8,
            Retention {
                max_bytes: 250,
                ..KEEP
            },
        );
        let jobs: Vec<_> = (0..3)
            .map(|_| bytes.submit(request("")).unwrap().job)
            .collect();
        for j in &jobs {
            complete(j, 100);
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(bytes.sweep(), 1);
        assert!(bytes.get(&jobs[0].id).is_none());
        // Queued jobs are never swept.
        let queued = bytes.submit(request("")).unwrap().job;
        bytes.sweep();
        assert!(bytes.get(&queued.id).is_some());
    }

    #[test]
    fn a_job_s_event_channel_holds_every_event_of_its_steps() {
        let s = store(8, KEEP);
        let sub = s.submit(request("")).unwrap();
        let mut rx = sub.events.unwrap();
        let job = sub.job;
        for step in 1..=4 {
            job.emit(JobEvent::Progress(Progress {
                step,
                total_steps: 4,
                timestep: 0.0,
            }));
        }
        // complete() emits Started, then Completed.
        complete(&job, 1);
        let mut received = Vec::new();
        while let Ok(e) = rx.try_recv() {
            received.push(e);
        }
        // Queued, 4 × Progress, Started, Completed — none lost to a lagging channel, which
        // holds 4 steps + EVENT_SLACK events for this request.
        assert_eq!(received.len(), 7, "{received:?}");
        assert!(received.last().unwrap().is_terminal());
    }
}
