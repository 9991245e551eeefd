//! The `jhakaas.worker.v1.Worker` gRPC service: thin handlers over the job store
//! ([`JobBackend`]), converting its domain answers to the wire ([`job_wire`]).

use super::convert::{self, Limits};
use super::job_wire;
use crate::serve::engine::models::ModelTable;
use crate::serve::job::backend::{Accepted, JobBackend, JobEvents, JobView};
use crate::serve::job::error::JobError;
use jhakaas_model_manager::{RngKind, SchedulerKind};
use jhakaas_proto::v1 as pb;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

/// A job's events as the API streams them.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

/// The domain stream on the wire: each event tagged with its job, an error as its status.
fn wire_events(e: JobEvents) -> EventStream {
    let id = e.job_id;
    Box::pin(e.events.map(move |r| {
        r.map(|event| job_wire::event(&id, &event))
            .map_err(job_wire::status)
    }))
}

/// A store's answer about one job, on the wire.
fn wire_job(r: Result<JobView, JobError>) -> Result<Response<pb::Job>, Status> {
    r.map(|v| Response::new(job_wire::job(&v)))
        .map_err(job_wire::status)
}

impl WorkerService {
    /// [`convert::accept`] off the async threads (an init image is decoded there).
    async fn accept(
        &self,
        wire: pb::GenerateRequest,
        deadline: Option<Instant>,
    ) -> Result<Accepted, Status> {
        let (models, limits) = (self.models.clone(), self.limits);
        tokio::task::spawn_blocking(move || {
            convert::accept(wire, &models, &limits, deadline)
                .map_err(|e| job_wire::status(e.into()))
        })
        .await
        .map_err(|e| Status::internal(format!("request validation stopped: {e}")))?
    }
}

/// The service state.
#[derive(Clone)]
pub struct WorkerService {
    /// The job store (in-memory or PostgreSQL).
    pub jobs: Arc<dyn JobBackend>,
    /// Registered models.
    pub models: Arc<ModelTable>,
    /// Request limits.
    pub limits: Limits,
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

#[tonic::async_trait]
impl pb::worker_server::Worker for WorkerService {
    type GenerateStream = EventStream;
    type WatchJobStream = EventStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let deadline = grpc_deadline(&request)?;
        let accepted = self.accept(request.into_inner(), deadline).await?;
        let events = self
            .jobs
            .generate(accepted)
            .await
            .map_err(job_wire::status)?;
        Ok(Response::new(wire_events(events)))
    }

    async fn submit_job(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let accepted = self.accept(request.into_inner(), None).await?;
        wire_job(self.jobs.submit(accepted).await)
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        wire_job(self.jobs.get(&request.into_inner().job_id).await)
    }

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let events = self
            .jobs
            .watch(&request.into_inner().job_id)
            .await
            .map_err(job_wire::status)?;
        Ok(Response::new(wire_events(events)))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        wire_job(self.jobs.cancel(&request.into_inner().job_id).await)
    }

    async fn list_loras(
        &self,
        _: Request<pb::ListLorasRequest>,
    ) -> Result<Response<pb::ListLorasResponse>, Status> {
        let loras = self.models.loras().clone();
        let loras = tokio::task::spawn_blocking(move || loras.list())
            .await
            .map_err(|e| Status::internal(format!("listing adapters stopped: {e}")))?;
        Ok(Response::new(pb::ListLorasResponse {
            loras: loras.into_iter().map(convert::lora_info).collect(),
        }))
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
                    default_rng: d.map(|d| d.rng.to_string()).unwrap_or_default(),
                }
            })
            .collect();
        Ok(Response::new(pb::ListModelsResponse {
            models,
            schedulers: SchedulerKind::ALL.iter().map(|k| k.to_string()).collect(),
            rngs: RngKind::ALL.iter().map(|k| k.to_string()).collect(),
            controlnets: self
                .models
                .controlnets()
                .iter()
                .map(|c| {
                    let bytes = self.models.controlnet_loaded_bytes(&c.name);
                    pb::ControlNetInfo {
                        name: c.name.clone(),
                        source: c.source.to_string(),
                        loaded: bytes.is_some(),
                        loaded_bytes: bytes.unwrap_or(0),
                        error: c.config.as_ref().err().cloned().unwrap_or_default(),
                    }
                })
                .collect(),
        }))
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
