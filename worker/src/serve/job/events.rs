//! A job's event bus: its lifecycle events, the snapshot they fold into, and the broadcast
//! every watcher subscribes to. The engine publishes here whichever store the job came from.

use jhakaas_model_manager::Progress;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

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

/// Locks `m`, ignoring poisoning: a panic while holding a job lock must not take the whole
/// server down with it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One job's events: the snapshot they fold into and the broadcast to its watchers. Events
/// are sent while the snapshot's lock is held, so a watcher that subscribes under the same lock
/// never misses or duplicates one.
#[derive(Debug)]
pub struct EventBus {
    state: Mutex<JobSnapshot>,
    sender: broadcast::Sender<JobEvent>,
    finished: Mutex<Option<Instant>>,
}

impl EventBus {
    /// A bus for a job queued at `position`, buffering `capacity` events per watcher.
    pub fn new(capacity: usize, position: u32) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        Self {
            state: Mutex::new(JobSnapshot {
                state: JobState::Queued,
                queue_position: position,
                progress: None,
                images: Arc::new(Vec::new()),
                timings: None,
                error: String::new(),
                terminal: None,
            }),
            sender,
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
        (guard.clone(), self.sender.subscribe())
    }

    /// When the terminal event was published.
    pub fn finished_at(&self) -> Option<Instant> {
        *lock(&self.finished)
    }

    /// Records and broadcasts an event. Ignored once the job is terminal.
    pub fn publish(&self, event: JobEvent) {
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
        let _ = self.sender.send(event);
    }
}
