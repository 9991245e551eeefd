//! The `jhakaas.worker.v1.Worker` gRPC service: thin handlers over the job store.

use super::convert::{self, Limits};
use super::jobs::{Job, JobEvent, JobStore, SubmitError};
use super::models::ModelTable;
use jhakaas_proto::v1 as pb;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// The service state.
#[derive(Debug, Clone)]
pub struct WorkerService {
    /// All jobs.
    pub store: Arc<JobStore>,
    /// Registered models.
    pub models: Arc<ModelTable>,
    /// Request limits.
    pub limits: Limits,
}

/// Maps a refused submission to its status code.
fn submit_status(e: SubmitError) -> Status {
    match e {
        SubmitError::QueueFull { max_queue } => {
            Status::resource_exhausted(format!("the queue is full ({max_queue} jobs); retry later"))
        }
        SubmitError::Draining => {
            Status::unavailable("the worker is shutting down; retry on another replica")
        }
    }
}

/// The client's deadline from the `grpc-timeout` header (e.g. `500m`, `2S`): at most 8 digits
/// and a unit, as the gRPC spec allows, so no value overflows. A malformed header is refused
/// naming it; one too far in the future to represent means no deadline.
fn grpc_deadline<T>(req: &Request<T>) -> Result<Option<Instant>, Status> {
    let Some(v) = req.metadata().get("grpc-timeout") else {
        return Ok(None);
    };
    let bad = || {
        Status::invalid_argument(
            "invalid grpc-timeout: expected 1 to 8 digits and a unit (H, M, S, m, u, n)",
        )
    };
    let v = v.to_str().map_err(|_| bad())?;
    parse_grpc_timeout(v)
        .ok_or_else(bad)
        .map(|d| Instant::now().checked_add(d))
}

/// `grpc-timeout`'s value as a duration (`None` if malformed).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if !v.is_ascii() {
        return None;
    }
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    if num.is_empty() || num.len() > 8 || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn find(store: &JobStore, id: &str) -> Result<Arc<Job>, Status> {
    store.get(id).ok_or_else(|| {
        Status::not_found(format!(
            "invalid job_id: no job `{id}` (unknown or expired)"
        ))
    })
}

type EventStream = ReceiverStream<Result<pb::JobEvent, Status>>;

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
                    None if snapshot.state == super::jobs::JobState::Running => {
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

#[tonic::async_trait]
impl pb::worker_server::Worker for WorkerService {
    type GenerateStream = EventStream;
    type WatchJobStream = EventStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let deadline = grpc_deadline(&request)?;
        let req = convert::job_request(request.into_inner(), &self.models, &self.limits, deadline)?;
        let submitted = self.store.submit(req).map_err(submit_status)?;
        let existing = submitted.events.is_none();
        tracing::info!(job_id = %submitted.job.id, existing, "generate");
        // A repeated request id attaches to the original job without owning it.
        Ok(Response::new(stream_events(
            self.store.clone(),
            submitted.job,
            submitted.events,
            !existing,
        )))
    }

    async fn submit_job(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let req = convert::job_request(request.into_inner(), &self.models, &self.limits, None)?;
        let submitted = self.store.submit(req).map_err(submit_status)?;
        let job = submitted.job;
        tracing::info!(job_id = %job.id, existing = submitted.events.is_none(), "submit");
        Ok(Response::new(convert::job(&job, &job.snapshot())))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let job = find(&self.store, &request.into_inner().job_id)?;
        Ok(Response::new(convert::job(&job, &job.snapshot())))
    }

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let job = find(&self.store, &request.into_inner().job_id)?;
        Ok(Response::new(stream_events(
            self.store.clone(),
            job,
            None,
            false,
        )))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let job = find(&self.store, &request.into_inner().job_id)?;
        self.store.cancel(&job, "cancelled by client");
        Ok(Response::new(convert::job(&job, &job.snapshot())))
    }

    async fn list_models(
        &self,
        _: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let models = self
            .models
            .specs()
            .iter()
            .map(|spec| {
                let s = self.models.status(&spec.name);
                let d = s.description.as_ref().map(|d| &d.defaults);
                pb::ModelInfo {
                    name: spec.name.clone(),
                    source: spec.source.to_string(),
                    family: s
                        .description
                        .as_ref()
                        .map(|d| d.family.to_string())
                        .unwrap_or_default(),
                    default_width: d.map_or(0, |d| d.width as u32),
                    default_height: d.map_or(0, |d| d.height as u32),
                    default_steps: d.map_or(0, |d| d.steps as u32),
                    default_scheduler: d.map(|d| d.scheduler.to_string()).unwrap_or_default(),
                    loaded: s.loaded,
                    loaded_bytes: s.loaded_bytes,
                    default_guidance_scale: d.map_or(0.0, |d| d.guidance_scale as f32),
                    vae: spec.vae.as_ref().map(|v| v.to_string()).unwrap_or_default(),
                }
            })
            .collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_parsing_is_bounded() {
        assert_eq!(parse_grpc_timeout("500m"), Some(Duration::from_millis(500)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_grpc_timeout("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        for bad in [
            "",
            "S",
            "123456789S",
            "1x",
            "-1S",
            "+1S",
            "1.5S",
            "１S",
            "1１",
            "18446744073709551616n",
        ] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
        // The largest value does not overflow an Instant: no deadline rather than a panic.
        let d = parse_grpc_timeout("99999999H").unwrap();
        let _ = Instant::now().checked_add(d);
    }
}
