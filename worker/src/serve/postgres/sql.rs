//! Every statement the PostgreSQL store runs, in one place. Writes of a running job are
//! fenced by `attempt`: they match only while the row is still running under that claim.

use crate::serve::api::job_wire;
use crate::serve::job::backend::JobView;
use jhakaas_model_manager::Progress;
use jhakaas_proto::v1 as pb;
use prost::Message;
use sqlx::postgres::PgPool;
use sqlx::Row;
use std::time::Duration;

/// A job row to insert.
pub struct NewJob<'a> {
    pub id: &'a str,
    pub request_id: Option<&'a str>,
    pub model: &'a str,
    pub request: Vec<u8>,
    pub seed: i64,
    /// Seconds from now until the client's deadline.
    pub deadline_in: Option<f64>,
}

/// A job an engine just claimed.
pub struct Claimed {
    pub id: String,
    pub attempt: i32,
    /// The wire `GenerateRequest`.
    pub request: Vec<u8>,
    /// Seconds since it was accepted.
    pub waited: f64,
    /// Seconds until its deadline (negative: passed).
    pub deadline_in: Option<f64>,
    pub cancel_reason: Option<String>,
}

/// The id of the job with this `request_id`.
pub async fn job_by_request_id(pool: &PgPool, rid: &str) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar("SELECT id FROM jhakaas_jobs WHERE request_id = $1")
        .bind(rid)
        .fetch_optional(pool)
        .await
}

/// Jobs queued across the fleet.
pub async fn queued_count(pool: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM jhakaas_jobs WHERE state = 'queued'")
        .fetch_one(pool)
        .await
}

/// Queued and running jobs across the fleet.
pub async fn counts(pool: &PgPool) -> sqlx::Result<(i64, i64)> {
    let row = sqlx::query(
        "SELECT count(*) FILTER (WHERE state = 'queued') AS queued, \
                count(*) FILTER (WHERE state = 'running') AS running \
         FROM jhakaas_jobs WHERE state IN ('queued', 'running')",
    )
    .fetch_one(pool)
    .await?;
    Ok((row.try_get("queued")?, row.try_get("running")?))
}

/// Inserts a job; false when its `request_id` already exists (the insert commits or nothing
/// happens: accepted means committed).
pub async fn insert_job(pool: &PgPool, job: &NewJob<'_>) -> sqlx::Result<bool> {
    let r = sqlx::query(
        "INSERT INTO jhakaas_jobs (id, request_id, model, request, seed, deadline_at) \
         VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6)) \
         ON CONFLICT (request_id) DO NOTHING",
    )
    .bind(job.id)
    .bind(job.request_id)
    .bind(job.model)
    .bind(&job.request)
    .bind(job.seed)
    .bind(job.deadline_in)
    .execute(pool)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// A job as the faces report it: the row, its queue position and its terminal event (with
/// its images and timings).
pub async fn job(pool: &PgPool, id: &str) -> sqlx::Result<Option<JobView>> {
    let Some(row) = sqlx::query(
        "SELECT j.id, j.request_id, j.model, j.seed, j.state, j.error, \
                j.progress_step, j.progress_total, j.progress_timestep, \
                (SELECT e.event FROM jhakaas_job_events e \
                  WHERE e.job_id = j.id AND e.terminal ORDER BY e.n DESC LIMIT 1) AS terminal, \
                CASE WHEN j.state = 'queued' THEN (SELECT count(*) FROM jhakaas_jobs q \
                  WHERE q.state = 'queued' AND q.seq < j.seq) ELSE 0 END AS queue_position \
         FROM jhakaas_jobs j WHERE j.id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let progress = match (
        row.try_get::<Option<i32>, _>("progress_step")?,
        row.try_get::<Option<i32>, _>("progress_total")?,
        row.try_get::<Option<f64>, _>("progress_timestep")?,
    ) {
        (Some(step), Some(total), Some(timestep)) => Some(Progress {
            step: step as usize,
            total_steps: total as usize,
            timestep,
        }),
        _ => None,
    };
    let terminal = row
        .try_get::<Option<Vec<u8>>, _>("terminal")?
        .and_then(|b| pb::JobEvent::decode(b.as_slice()).ok())
        .and_then(job_wire::event_from_wire);
    let snapshot = job_wire::snapshot_from_row(
        job_wire::state_from_row(row.try_get::<&str, _>("state")?),
        row.try_get::<i64, _>("queue_position")? as u32,
        progress,
        row.try_get("error")?,
        terminal,
    );
    Ok(Some(JobView {
        id: row.try_get("id")?,
        request_id: row
            .try_get::<Option<String>, _>("request_id")?
            .unwrap_or_default(),
        model: row.try_get("model")?,
        seed: row.try_get::<i64, _>("seed")? as u64,
        snapshot,
    }))
}

/// The terminal event of a job ended by the store itself (never run, or lost), with the
/// time since it was accepted as its queue and total time.
fn ended_event(id: &str, state: &str, reason: &str, age: f64) -> pb::JobEvent {
    use pb::job_event::Event;
    let timings = Some(pb::Timings {
        queue_seconds: age,
        total_seconds: age,
        ..Default::default()
    });
    let reason = reason.to_string();
    let event = match state {
        "cancelled" => Event::Cancelled(pb::Cancelled { reason, timings }),
        _ => Event::Failed(pb::Failed { reason, timings }),
    };
    pb::JobEvent {
        job_id: id.to_string(),
        event: Some(event),
    }
}

async fn insert_event(
    tx: &mut sqlx::PgConnection,
    id: &str,
    event: &pb::JobEvent,
    terminal: bool,
) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO jhakaas_job_events (job_id, terminal, event) VALUES ($1, $2, $3)")
        .bind(id)
        .bind(terminal)
        .bind(event.encode_to_vec())
        .execute(tx)
        .await?;
    Ok(())
}

/// Cancels a job: a queued one ends now, a running one is flagged for its engine, which
/// sees the flag with its next progress write or lease renewal. False if there is no such job.
pub async fn cancel(pool: &PgPool, id: &str, reason: &str) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    let Some(row) = sqlx::query(
        "SELECT state, extract(epoch FROM now() - submitted_at)::float8 AS age \
         FROM jhakaas_jobs WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?
    else {
        return Ok(false);
    };
    match row.try_get::<&str, _>("state")? {
        "queued" => {
            sqlx::query(
                "UPDATE jhakaas_jobs SET state = 'cancelled', cancel_reason = $2, error = $2, \
                 finished_at = now() WHERE id = $1",
            )
            .bind(id)
            .bind(reason)
            .execute(&mut *tx)
            .await?;
            let event = ended_event(id, "cancelled", reason, row.try_get("age")?);
            insert_event(&mut tx, id, &event, true).await?;
        }
        "running" => {
            sqlx::query(
                "UPDATE jhakaas_jobs SET cancel_reason = coalesce(cancel_reason, $2) WHERE id = $1",
            )
            .bind(id)
            .bind(reason)
            .execute(&mut *tx)
            .await?;
        }
        _ => {}
    }
    tx.commit().await?;
    Ok(true)
}

/// Claims the oldest queued job for `pod` under a lease of `lease`.
pub async fn claim(pool: &PgPool, pod: &str, lease: Duration) -> sqlx::Result<Option<Claimed>> {
    let row = sqlx::query(
        "UPDATE jhakaas_jobs SET state = 'running', attempt = attempt + 1, lease_owner = $1, \
                lease_until = now() + make_interval(secs => $2), started_at = now(), \
                progress_step = NULL, progress_total = NULL, progress_timestep = NULL \
         WHERE id = (SELECT id FROM jhakaas_jobs WHERE state = 'queued' ORDER BY seq \
                     FOR UPDATE SKIP LOCKED LIMIT 1) \
         RETURNING id, attempt, request, cancel_reason, \
                   extract(epoch FROM now() - submitted_at)::float8 AS waited, \
                   extract(epoch FROM deadline_at - now())::float8 AS deadline_in",
    )
    .bind(pod)
    .bind(lease.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    row.map(|r| {
        Ok(Claimed {
            id: r.try_get("id")?,
            attempt: r.try_get("attempt")?,
            request: r.try_get("request")?,
            waited: r.try_get("waited")?,
            deadline_in: r.try_get("deadline_in")?,
            cancel_reason: r.try_get("cancel_reason")?,
        })
    })
    .transpose()
}

/// Renews a running job's lease. `None`: the lease is lost (the job was requeued and may
/// run elsewhere); otherwise the cancellation reason, if a client asked.
pub async fn renew(
    pool: &PgPool,
    id: &str,
    attempt: i32,
    lease: Duration,
) -> sqlx::Result<Option<Option<String>>> {
    sqlx::query_scalar(
        "UPDATE jhakaas_jobs SET lease_until = now() + make_interval(secs => $3) \
         WHERE id = $1 AND attempt = $2 AND state = 'running' RETURNING cancel_reason",
    )
    .bind(id)
    .bind(attempt)
    .bind(lease.as_secs_f64())
    .fetch_optional(pool)
    .await
}

/// Appends a non-terminal event of a running job, recording progress and renewing its lease.
/// Returns as [`renew`] does.
pub async fn append(
    pool: &PgPool,
    id: &str,
    attempt: i32,
    lease: Duration,
    event: &pb::JobEvent,
) -> sqlx::Result<Option<Option<String>>> {
    let progress = match &event.event {
        Some(pb::job_event::Event::Progress(p)) => Some(p),
        _ => None,
    };
    let mut tx = pool.begin().await?;
    let cancel: Option<Option<String>> = sqlx::query_scalar(
        "UPDATE jhakaas_jobs SET lease_until = now() + make_interval(secs => $3), \
                progress_step = coalesce($4, progress_step), \
                progress_total = coalesce($5, progress_total), \
                progress_timestep = coalesce($6, progress_timestep) \
         WHERE id = $1 AND attempt = $2 AND state = 'running' RETURNING cancel_reason",
    )
    .bind(id)
    .bind(attempt)
    .bind(lease.as_secs_f64())
    .bind(progress.map(|p| p.step as i32))
    .bind(progress.map(|p| p.total_steps as i32))
    .bind(progress.map(|p| p.timestep))
    .fetch_optional(&mut *tx)
    .await?;
    if cancel.is_some() {
        insert_event(&mut tx, id, event, false).await?;
    }
    tx.commit().await?;
    Ok(cancel)
}

/// Ends a running job with its terminal event; false if the claim no longer holds (the
/// rerun owns the job now).
pub async fn finish(
    pool: &PgPool,
    id: &str,
    attempt: i32,
    state: &str,
    error: &str,
    event: &pb::JobEvent,
) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    let r = sqlx::query(
        "UPDATE jhakaas_jobs SET state = $3, error = $4, finished_at = now(), \
                lease_owner = NULL, lease_until = NULL \
         WHERE id = $1 AND attempt = $2 AND state = 'running'",
    )
    .bind(id)
    .bind(attempt)
    .bind(state)
    .bind(error)
    .execute(&mut *tx)
    .await?;
    if r.rows_affected() != 1 {
        return Ok(false);
    }
    insert_event(&mut tx, id, event, true).await?;
    tx.commit().await?;
    Ok(true)
}

/// Hands a running job back to the queue (drain); false if the claim no longer holds.
pub async fn release(pool: &PgPool, id: &str, attempt: i32) -> sqlx::Result<bool> {
    let r = sqlx::query(
        "UPDATE jhakaas_jobs SET state = 'queued', lease_owner = NULL, lease_until = NULL, \
                progress_step = NULL, progress_total = NULL, progress_timestep = NULL \
         WHERE id = $1 AND attempt = $2 AND state = 'running'",
    )
    .bind(id)
    .bind(attempt)
    .execute(pool)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Running jobs whose lease expired go back to the queue, or fail once they lost
/// `max_attempts` leases. Returns each job's id and whether it failed.
pub async fn expire_leases(pool: &PgPool, max_attempts: u32) -> sqlx::Result<Vec<(String, bool)>> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(
        "WITH expired AS (SELECT id FROM jhakaas_jobs \
                          WHERE state = 'running' AND lease_until < now() \
                          FOR UPDATE SKIP LOCKED) \
         UPDATE jhakaas_jobs j SET failures = j.failures + 1, \
                lease_owner = NULL, lease_until = NULL, \
                progress_step = NULL, progress_total = NULL, progress_timestep = NULL, \
                state = CASE WHEN j.failures + 1 >= $1 THEN 'failed' ELSE 'queued' END, \
                error = CASE WHEN j.failures + 1 >= $1 \
                        THEN 'the job was lost with its worker ' || (j.failures + 1) || ' times' \
                        ELSE j.error END, \
                finished_at = CASE WHEN j.failures + 1 >= $1 THEN now() ELSE NULL END \
         FROM expired WHERE j.id = expired.id \
         RETURNING j.id, j.state, j.error, extract(epoch FROM now() - j.submitted_at)::float8 AS age",
    )
    .bind(max_attempts as i32)
    .fetch_all(&mut *tx)
    .await?;
    let mut lost = Vec::with_capacity(rows.len());
    for r in rows {
        let id: String = r.try_get("id")?;
        let failed = r.try_get::<&str, _>("state")? == "failed";
        if failed {
            let event = ended_event(&id, "failed", r.try_get("error")?, r.try_get("age")?);
            insert_event(&mut tx, &id, &event, true).await?;
        }
        lost.push((id, failed));
    }
    tx.commit().await?;
    Ok(lost)
}

/// Deletes finished jobs past the TTL, then the oldest beyond `max_jobs`, then the oldest
/// while their events (images included) take more than `max_bytes`.
pub async fn sweep(
    pool: &PgPool,
    ttl: Duration,
    max_jobs: usize,
    max_bytes: u64,
) -> sqlx::Result<u64> {
    let old = sqlx::query(
        "DELETE FROM jhakaas_jobs WHERE finished_at < now() - make_interval(secs => $1)",
    )
    .bind(ttl.as_secs_f64())
    .execute(pool)
    .await?;
    let over = sqlx::query(
        "DELETE FROM jhakaas_jobs WHERE id IN (SELECT id FROM jhakaas_jobs \
         WHERE finished_at IS NOT NULL ORDER BY finished_at DESC OFFSET $1)",
    )
    .bind(max_jobs as i64)
    .execute(pool)
    .await?;
    let heavy = sqlx::query(
        "DELETE FROM jhakaas_jobs WHERE id IN ( \
           SELECT id FROM ( \
             SELECT j.id, sum(b.bytes) OVER (ORDER BY j.finished_at DESC, j.id) AS kept \
             FROM jhakaas_jobs j \
             JOIN (SELECT job_id, sum(octet_length(event)) AS bytes \
                   FROM jhakaas_job_events GROUP BY job_id) b ON b.job_id = j.id \
             WHERE j.finished_at IS NOT NULL) t \
           WHERE t.kept > $1)",
    )
    .bind(i64::try_from(max_bytes).unwrap_or(i64::MAX))
    .execute(pool)
    .await?;
    Ok(old.rows_affected() + over.rows_affected() + heavy.rows_affected())
}

/// Events of job `id` after `after`, oldest first, as `(n, event, terminal)`.
pub async fn events_after(
    pool: &PgPool,
    id: &str,
    after: i64,
) -> sqlx::Result<Vec<(i64, Vec<u8>, bool)>> {
    sqlx::query_as(
        "SELECT n, event, terminal FROM jhakaas_job_events \
         WHERE job_id = $1 AND n > $2 ORDER BY n",
    )
    .bind(id)
    .bind(after)
    .fetch_all(pool)
    .await
}

/// A job's state and queue position (`None`: no such job).
pub async fn position(pool: &PgPool, id: &str) -> sqlx::Result<Option<(String, i64)>> {
    sqlx::query_as(
        "SELECT j.state, CASE WHEN j.state = 'queued' THEN (SELECT count(*) FROM jhakaas_jobs q \
                WHERE q.state = 'queued' AND q.seq < j.seq) ELSE 0 END \
         FROM jhakaas_jobs j WHERE j.id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Fails a claimed job that this pod cannot run (its request no longer validates here).
pub async fn fail_claimed(
    pool: &PgPool,
    id: &str,
    attempt: i32,
    reason: &str,
    age: f64,
) -> sqlx::Result<bool> {
    let event = ended_event(id, "failed", reason, age);
    finish(pool, id, attempt, "failed", reason, &event).await
}
