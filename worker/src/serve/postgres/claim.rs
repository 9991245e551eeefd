//! The engine's side of the shared queue: claim a job under a lease, run it as a local
//! [`Job`] whose events a publisher task writes to the log (renewing the lease and picking up
//! cancellation as it goes), and record its end fenced by the claim's attempt.

use super::wake::Wake;
use super::{sql, PgConfig};
use crate::serve::api::convert::{self, Limits};
use crate::serve::api::job_wire;
use crate::serve::engine::models::ModelTable;
use crate::serve::job::events::lock;
use crate::serve::job::source::JobSource;
use crate::serve::job::store::{Job, JobEvent};
use jhakaas_proto::v1 as pb;
use prost::Message;
use sqlx::postgres::PgPool;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::runtime::Handle;
use tokio::sync::{broadcast, oneshot};

/// Reason a released job's engine run is stopped with (it resumes on another pod).
const RELEASED: &str = "worker shutting down; the job goes back to the queue";

/// The job this pod's engine is running.
struct Running {
    id: String,
    job: Arc<Job>,
    /// Set when the drain hands the job back instead of ending it.
    release: Arc<AtomicBool>,
    /// Fires once the publisher recorded the job's end.
    recorded: Option<oneshot::Receiver<()>>,
}

/// The shared queue as the engine's [`JobSource`].
pub struct PgSource {
    pool: PgPool,
    rt: Handle,
    config: PgConfig,
    wake: Arc<Wake>,
    models: Arc<ModelTable>,
    limits: Limits,
    pod: String,
    claiming: AtomicBool,
    /// Claimed and not yet done (running, or its images encoding).
    running: Mutex<Vec<Running>>,
}

impl PgSource {
    /// A source claiming from `pool` on behalf of this pod.
    pub fn new(
        pool: PgPool,
        rt: Handle,
        config: PgConfig,
        wake: Arc<Wake>,
        models: Arc<ModelTable>,
        limits: Limits,
    ) -> Self {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into());
        Self {
            pool,
            rt,
            config,
            wake,
            models,
            limits,
            pod: format!("{host}/{}", uuid::Uuid::new_v4()),
            claiming: AtomicBool::new(true),
            running: Mutex::new(Vec::new()),
        }
    }

    /// This pod's lease owner name.
    pub fn pod(&self) -> &str {
        &self.pod
    }

    /// Stops claiming new jobs (drain or shutdown).
    pub fn stop_claiming(&self) {
        self.claiming.store(false, Ordering::SeqCst);
    }

    /// Whether the engine holds a job (running, or its images encoding).
    pub fn is_running(&self) -> bool {
        !lock(&self.running).is_empty()
    }

    /// Stops the running job at its next step and hands it back to the queue (a job already
    /// encoding its images just completes).
    pub fn release_running(&self) {
        for r in lock(&self.running).iter() {
            r.release.store(true, Ordering::SeqCst);
            r.job.request_cancel(RELEASED);
        }
    }

    /// Turns a claimed row into a job for the engine, or fails it if this pod cannot run it.
    fn start(&self, claimed: sql::Claimed) -> Option<Arc<Job>> {
        let sql::Claimed {
            id,
            attempt,
            request,
            waited,
            deadline_in,
            cancel_reason,
        } = claimed;
        let now = Instant::now();
        let deadline = deadline_in.map(|s| {
            now.checked_add(Duration::from_secs_f64(s.max(0.0)))
                .unwrap_or(now)
        });
        let validated = pb::GenerateRequest::decode(request.as_slice())
            .map_err(|e| format!("the stored request does not decode: {e}"))
            .and_then(|wire| {
                convert::job_request(&wire, &self.models, &self.limits, deadline)
                    .map_err(|e| e.to_string())
            });
        let request = match validated {
            Ok(r) => r,
            Err(reason) => {
                tracing::error!(job_id = %id, %reason, "a claimed job cannot run on this worker");
                let failed = self
                    .rt
                    .block_on(sql::fail_claimed(&self.pool, &id, attempt, &reason, waited));
                if let Err(e) = failed {
                    tracing::warn!(job_id = %id, error = %e, "recording the failure failed");
                }
                return None;
            }
        };
        let submitted = now
            .checked_sub(Duration::from_secs_f64(waited.max(0.0)))
            .unwrap_or(now);
        let job = Arc::new(Job::with_id(id.clone(), request, submitted, 0));
        if let Some(reason) = cancel_reason {
            job.request_cancel(&reason);
        }
        let (_, events) = job.subscribe();
        let release = Arc::new(AtomicBool::new(false));
        let (recorded_tx, recorded) = oneshot::channel();
        let publisher = Publisher {
            pool: self.pool.clone(),
            job: job.clone(),
            attempt,
            lease: self.config.lease,
            release: release.clone(),
        };
        self.rt.spawn(publisher.run(events, recorded_tx));
        lock(&self.running).push(Running {
            id,
            job: job.clone(),
            release,
            recorded: Some(recorded),
        });
        Some(job)
    }
}

impl JobSource for PgSource {
    fn next(&self) -> Option<Arc<Job>> {
        let mut backoff = self.config.poll;
        while self.claiming.load(Ordering::SeqCst) {
            let seen = self.wake.queue_generation();
            match self
                .rt
                .block_on(sql::claim(&self.pool, &self.pod, self.config.lease))
            {
                Ok(Some(claimed)) => {
                    backoff = self.config.poll;
                    if let Some(job) = self.start(claimed) {
                        return Some(job);
                    }
                }
                Ok(None) => self.wake.wait_queue(seen, self.config.poll),
                Err(e) => {
                    tracing::warn!(error = %e, "claiming from the job store failed; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        None
    }

    fn done(&self, job: &Arc<Job>) {
        let recorded = lock(&self.running)
            .iter_mut()
            .find(|r| r.id == job.id)
            .and_then(|r| r.recorded.take());
        if let Some(recorded) = recorded {
            // The publisher retries until it records the end or the lease is lost; past the
            // lease the job reruns elsewhere anyway.
            let wait = self.config.lease + Duration::from_secs(5);
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(wait, recorded).await });
        }
        lock(&self.running).retain(|r| r.id != job.id);
    }

    fn close(&self) {
        self.stop_claiming();
    }
}

/// Writes one running job's events to the log, renewing its lease.
struct Publisher {
    pool: PgPool,
    job: Arc<Job>,
    attempt: i32,
    lease: Duration,
    release: Arc<AtomicBool>,
}

impl Publisher {
    async fn run(self, mut events: broadcast::Receiver<JobEvent>, recorded: oneshot::Sender<()>) {
        let mut renew = tokio::time::interval(self.lease / 3);
        renew.tick().await;
        loop {
            tokio::select! {
                event = events.recv() => {
                    let event = match event {
                        Ok(e) => e,
                        // Missed events: the snapshot's terminal event, if the job ended.
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            match self.job.snapshot().terminal {
                                Some(t) => t,
                                None => continue,
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    };
                    if event.is_terminal() {
                        self.finish(&event).await;
                        let _ = recorded.send(());
                        return;
                    }
                    self.append(&event).await;
                }
                _ = renew.tick() => {
                    let r = sql::renew(&self.pool, &self.job.id, self.attempt, self.lease).await;
                    self.after_write(r);
                }
            }
        }
    }

    /// Acts on what a lease-holding write returned: cancellation, or a lost lease.
    fn after_write(&self, r: sqlx::Result<Option<Option<String>>>) {
        match r {
            Ok(Some(Some(reason))) => {
                self.job.request_cancel(&reason);
            }
            Ok(Some(None)) => {}
            Ok(None) => {
                if self
                    .job
                    .request_cancel("the job's lease was lost; it runs elsewhere")
                {
                    tracing::warn!(job_id = %self.job.id, "lease lost; stopping this run");
                }
            }
            Err(e) => tracing::warn!(job_id = %self.job.id, error = %e, "job store write failed"),
        }
    }

    async fn append(&self, event: &JobEvent) {
        if matches!(event, JobEvent::Queued { .. }) {
            return;
        }
        let wire = job_wire::event(&self.job.id, event);
        let r = sql::append(&self.pool, &self.job.id, self.attempt, self.lease, &wire).await;
        self.after_write(r);
    }

    /// Records the end: the terminal state and event, or (released by a drain) the job back
    /// in the queue. Retries until written or the claim is gone.
    async fn finish(&self, event: &JobEvent) {
        let released = self.release.load(Ordering::SeqCst)
            && matches!(event, JobEvent::Cancelled { reason, .. } if reason == RELEASED);
        let wire = job_wire::event(&self.job.id, event);
        let (state, error) = match event {
            JobEvent::Completed { .. } => ("succeeded", String::new()),
            JobEvent::Failed { reason, .. } => ("failed", reason.clone()),
            JobEvent::Cancelled { reason, .. } => ("cancelled", reason.clone()),
            // Only terminal events end a job.
            _ => return,
        };
        let give_up = Instant::now() + self.lease;
        let mut backoff = Duration::from_millis(50);
        loop {
            let written = if released {
                sql::release(&self.pool, &self.job.id, self.attempt).await
            } else {
                let (pool, id) = (&self.pool, &self.job.id);
                sql::finish(pool, id, self.attempt, state, &error, &wire).await
            };
            match written {
                Ok(true) => return,
                Ok(false) => {
                    tracing::warn!(job_id = %self.job.id, "the job's claim was gone; its rerun owns it");
                    return;
                }
                Err(e) if Instant::now() < give_up => {
                    tracing::warn!(job_id = %self.job.id, error = %e, "recording the job's end failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    tracing::error!(job_id = %self.job.id, error = %e, "could not record the job's end; its lease will expire and it reruns");
                    return;
                }
            }
        }
    }
}
