//! Streaming a job's events from the shared log, from any pod: every logged event once and in
//! order, plus the queue position while the job waits.

use super::sql;
use super::wake::{Notice, Wake};
use crate::serve::api::job_wire;
use crate::serve::job::backend::JobEvents;
use crate::serve::job::error::JobError;
use crate::serve::job::events::JobEvent;
use jhakaas_proto::v1 as pb;
use prost::Message;
use sqlx::postgres::PgPool;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

/// A stream that owns its job (`Generate`): the job is cancelled when the client goes away or
/// the deadline passes.
pub struct Owner {
    /// The client's deadline.
    pub deadline: Option<Instant>,
}

/// Streams job `id`'s events until its terminal one, reading the log when a notice concerns
/// the job (a `NOTIFY` for its events, or a queue change while it waits) and at least every
/// `poll`.
pub fn stream(
    pool: PgPool,
    id: String,
    owner: Option<Owner>,
    mut notices: broadcast::Receiver<Notice>,
    poll: Duration,
) -> JobEvents {
    let (tx, rx) = mpsc::channel(64);
    let job_id = id.clone();
    tokio::spawn(async move {
        let deadline = owner.as_ref().and_then(|o| o.deadline);
        let owns = owner.is_some();
        let cancel = |reason: &'static str| {
            let (pool, id) = (pool.clone(), id.clone());
            async move {
                if let Err(e) = sql::cancel(&pool, &id, reason).await {
                    tracing::warn!(job_id = %id, error = %e, "cancelling in the job store failed");
                }
            }
        };
        let mut last_n = 0i64;
        let mut last_position = None;
        let mut expired = false;
        loop {
            let queued = match forward(&pool, &id, &mut last_n, &mut last_position, &tx).await {
                Ok(Forwarded::Terminal { cancelled }) => {
                    if owns
                        && cancelled
                        && (expired || deadline.is_some_and(|d| Instant::now() >= d))
                    {
                        let _ = tx.send(Err(JobError::DeadlineExceeded)).await;
                    }
                    return;
                }
                Ok(Forwarded::More { queued }) => queued,
                Ok(Forwarded::ClientGone) => {
                    if owns {
                        cancel("client disconnected").await;
                    }
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            if owns && !expired && deadline.is_some_and(|d| Instant::now() >= d) {
                expired = true;
                cancel("deadline exceeded").await;
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = Wake::until_relevant(&mut notices, &id, queued) => {}
                _ = tx.closed() => {
                    if owns {
                        cancel("client disconnected").await;
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

enum Forwarded {
    /// The terminal event went out (`cancelled`: it was a cancellation).
    Terminal { cancelled: bool },
    /// The job goes on (`queued`: it still waits in the queue).
    More { queued: bool },
    /// The client stopped listening.
    ClientGone,
}

/// Sends the events logged since `last_n`, then the queue position if it changed.
async fn forward(
    pool: &PgPool,
    id: &str,
    last_n: &mut i64,
    last_position: &mut Option<i64>,
    tx: &mpsc::Sender<Result<JobEvent, JobError>>,
) -> Result<Forwarded, JobError> {
    let events = sql::events_after(pool, id, *last_n)
        .await
        .map_err(super::unavailable)?;
    for (n, bytes, terminal) in events {
        *last_n = n;
        // The log keeps events in wire form; an undecodable or empty one is skipped.
        let Some(event) = pb::JobEvent::decode(bytes.as_slice())
            .ok()
            .and_then(job_wire::event_from_wire)
        else {
            continue;
        };
        let cancelled = matches!(event, JobEvent::Cancelled { .. });
        if matches!(event, JobEvent::Started) {
            *last_position = None;
        }
        if tx.send(Ok(event)).await.is_err() {
            return Ok(Forwarded::ClientGone);
        }
        if terminal {
            return Ok(Forwarded::Terminal { cancelled });
        }
    }
    let Some((state, position)) = sql::position(pool, id).await.map_err(super::unavailable)? else {
        return Err(JobError::NotFound(id.to_string()));
    };
    if state == "queued" && *last_position != Some(position) {
        *last_position = Some(position);
        let event = JobEvent::Queued {
            position: position as u32,
        };
        if tx.send(Ok(event)).await.is_err() {
            return Ok(Forwarded::ClientGone);
        }
    }
    Ok(Forwarded::More {
        queued: state == "queued",
    })
}
