//! The PostgreSQL job store (`serve --job-store postgres://…`): one durable queue shared by
//! every replica. A job is accepted once its row commits; `request_id` is unique across pods;
//! an idle engine claims the oldest queued job with `FOR UPDATE SKIP LOCKED` under a lease it
//! renews while it runs, and every write of a running job is fenced by the claim's attempt
//! number, so a pod that lost its lease cannot overwrite the rerun. Events go to an
//! append-only log that any pod streams from, so any pod answers for any job.

mod claim;
mod events;
mod sql;
mod wake;

#[cfg(test)]
mod tests;

use crate::serve::api::convert::Limits;
use crate::serve::engine::models::ModelTable;
use crate::serve::job::backend::{Accepted, JobBackend, JobEvents, JobView};
use crate::serve::job::error::JobError;
use crate::serve::job::source::JobSource;
use claim::PgSource;
use sqlx::postgres::{PgPool, PgPoolOptions};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How the shared queue is run.
#[derive(Debug, Clone, Copy)]
pub struct PgConfig {
    /// Most jobs queued across all replicas; more are refused with RESOURCE_EXHAUSTED.
    pub max_queue: usize,
    /// Finished jobs are deleted this long after they end.
    pub result_ttl: Duration,
    /// At most this many finished jobs are kept (the oldest go first).
    pub max_retained_jobs: usize,
    /// At most this many bytes of finished jobs' events (their images) are kept.
    pub max_retained_bytes: u64,
    /// A running job's lease; a pod renews it every third of this, and a job whose lease
    /// expires goes back to the queue.
    pub lease: Duration,
    /// Lost leases after which a job fails instead of going back to the queue.
    pub max_attempts: u32,
    /// How often an idle engine looks for work and a watcher for new events.
    pub poll: Duration,
}

/// The PostgreSQL store behind the gRPC service.
pub struct PgJobs {
    pool: PgPool,
    config: PgConfig,
    source: Arc<PgSource>,
    wake: Arc<wake::Wake>,
    draining: AtomicBool,
}

/// A database error as the client sees it: the store is unavailable, retry.
fn unavailable(e: sqlx::Error) -> JobError {
    tracing::warn!(error = %e, "job store error");
    JobError::Unavailable(e.to_string())
}

impl PgJobs {
    /// Connects to `url`, runs the embedded migrations (safe from many pods at once: sqlx
    /// takes an advisory lock) and starts the maintenance task (expired leases, retention,
    /// queue gauges). The engine re-validates each claimed request with `models` and `limits`.
    pub async fn connect(
        url: &str,
        config: PgConfig,
        models: Arc<ModelTable>,
        limits: Limits,
    ) -> anyhow::Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(|e| anyhow::anyhow!("connecting to the job store: {e}"))?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(|e| anyhow::anyhow!("migrating the job store: {e}"))?;
        let wake = wake::Wake::listen(&pool);
        let source = Arc::new(PgSource::new(
            pool.clone(),
            tokio::runtime::Handle::current(),
            config,
            wake.clone(),
            models,
            limits,
        ));
        tokio::spawn(maintain(pool.clone(), config));
        tracing::info!(pod = %source.pod(), "job store: PostgreSQL");
        Ok(Self {
            pool,
            config,
            source,
            wake,
            draining: AtomicBool::new(false),
        })
    }

    /// Inserts the job unless its `request_id` exists; returns its id and whether it is new.
    async fn insert(&self, job: &Accepted) -> Result<(String, bool), JobError> {
        let rid = &job.request.request_id;
        if !rid.is_empty() {
            if let Some(id) = sql::job_by_request_id(&self.pool, rid)
                .await
                .map_err(unavailable)?
            {
                return Ok((id, false));
            }
        }
        if self.draining.load(Ordering::SeqCst) {
            return Err(JobError::Draining);
        }
        let queued = sql::queued_count(&self.pool).await.map_err(unavailable)?;
        if queued >= self.config.max_queue as i64 {
            return Err(JobError::QueueFull {
                max_queue: self.config.max_queue,
            });
        }
        let id = uuid::Uuid::new_v4().to_string();
        let deadline_in = job
            .request
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()).as_secs_f64());
        let row = sql::NewJob {
            id: &id,
            request_id: (!rid.is_empty()).then_some(rid.as_str()),
            model: &job.request.model,
            request: job.wire.clone(),
            seed: job.request.params.seed.unwrap_or_default() as i64,
            deadline_in,
        };
        match sql::insert_job(&self.pool, &row)
            .await
            .map_err(unavailable)?
        {
            true => Ok((id, true)),
            // Another pod inserted the same request id between our check and our insert.
            false => sql::job_by_request_id(&self.pool, rid)
                .await
                .map_err(unavailable)?
                .map(|id| (id, false))
                .ok_or(JobError::Conflict),
        }
    }
}

#[async_trait::async_trait]
impl JobBackend for PgJobs {
    async fn submit(&self, job: Accepted) -> Result<JobView, JobError> {
        let (id, new) = self.insert(&job).await?;
        tracing::info!(job_id = %id, existing = !new, "submit");
        self.get(&id).await
    }

    async fn generate(&self, job: Accepted) -> Result<JobEvents, JobError> {
        let deadline = job.request.deadline;
        let (id, new) = self.insert(&job).await?;
        tracing::info!(job_id = %id, existing = !new, "generate");
        Ok(events::stream(
            self.pool.clone(),
            id,
            new.then_some(events::Owner { deadline }),
            self.wake.notices(),
            self.config.poll,
        ))
    }

    async fn get(&self, id: &str) -> Result<JobView, JobError> {
        sql::job(&self.pool, id)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| JobError::NotFound(id.to_string()))
    }

    async fn watch(&self, id: &str) -> Result<JobEvents, JobError> {
        // Refuse an unknown id up front, as the memory store does.
        self.get(id).await?;
        Ok(events::stream(
            self.pool.clone(),
            id.to_string(),
            None,
            self.wake.notices(),
            self.config.poll,
        ))
    }

    async fn cancel(&self, id: &str) -> Result<JobView, JobError> {
        if !sql::cancel(&self.pool, id, "cancelled by client")
            .await
            .map_err(unavailable)?
        {
            return Err(JobError::NotFound(id.to_string()));
        }
        self.get(id).await
    }

    fn source(&self) -> Arc<dyn JobSource> {
        self.source.clone()
    }

    async fn drain(&self, timeout: Duration) {
        // Queued jobs stay in the shared queue for the other replicas: nothing is cancelled.
        self.draining.store(true, Ordering::SeqCst);
        self.source.stop_claiming();
        tracing::info!(running = self.source.is_running(), "draining");
        let deadline = Instant::now() + timeout;
        while self.source.is_running() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if self.source.is_running() {
            tracing::warn!("drain timeout passed; handing the running job back to the queue");
            self.source.release_running();
            let deadline = Instant::now() + Duration::from_secs(30);
            while self.source.is_running() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        self.source.close();
    }
}

/// Every pod's housekeeping: jobs whose lease expired go back to the queue (or fail after
/// `max_attempts` lost leases), finished jobs past the TTL or the count cap are deleted, and
/// the queue gauges count the whole fleet's jobs.
async fn maintain(pool: PgPool, config: PgConfig) {
    let every = (config.lease / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if let Err(e) = maintain_once(&pool, &config).await {
            tracing::warn!(error = %e, "job store maintenance failed; retrying");
        }
    }
}

async fn maintain_once(pool: &PgPool, config: &PgConfig) -> Result<(), sqlx::Error> {
    let lost = sql::expire_leases(pool, config.max_attempts).await?;
    for (id, failed) in lost {
        tracing::warn!(job_id = %id, failed, "a job's lease expired; its worker is gone");
    }
    sql::sweep(
        pool,
        config.result_ttl,
        config.max_retained_jobs,
        config.max_retained_bytes,
    )
    .await?;
    let (queued, running) = sql::counts(pool).await?;
    metrics::gauge!("jhakaas_queue_depth").set(queued as f64);
    metrics::gauge!("jhakaas_jobs_running").set(running as f64);
    Ok(())
}
