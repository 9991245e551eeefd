//! Streaming a job's events from the shared log, from any pod: every logged event once and in
//! order, plus the queue position while the job waits.

use super::sql;
use super::wake::{Notice, Wake};
use crate::serve::api::backend::EventStream;
use jhakaas_proto::v1 as pb;
use prost::Message;
use sqlx::postgres::PgPool;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

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
) -> EventStream {
    let (tx, rx) = mpsc::channel(64);
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
                        let _ = tx
                            .send(Err(Status::deadline_exceeded(
                                "the request's deadline passed",
                            )))
                            .await;
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
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
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
    ReceiverStream::new(rx)
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
    tx: &mpsc::Sender<Result<pb::JobEvent, Status>>,
) -> Result<Forwarded, Status> {
    let events = sql::events_after(pool, id, *last_n)
        .await
        .map_err(super::unavailable)?;
    for (n, bytes, terminal) in events {
        *last_n = n;
        let Ok(event) = pb::JobEvent::decode(bytes.as_slice()) else {
            continue;
        };
        let cancelled = matches!(event.event, Some(pb::job_event::Event::Cancelled(_)));
        if matches!(event.event, Some(pb::job_event::Event::Started(_))) {
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
        return Err(crate::serve::api::backend::not_found(id));
    };
    if state == "queued" && *last_position != Some(position) {
        *last_position = Some(position);
        let event = pb::JobEvent {
            job_id: id.to_string(),
            event: Some(pb::job_event::Event::Queued(pb::Queued {
                queue_position: position as u32,
            })),
        };
        if tx.send(Ok(event)).await.is_err() {
            return Ok(Forwarded::ClientGone);
        }
    }
    Ok(Forwarded::More {
        queued: state == "queued",
    })
}
