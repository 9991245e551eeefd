//! Jobs and their events between the domain and the wire, both ways (the PostgreSQL store keeps
//! events in wire form and reads them back through here), and the one mapping of the worker's
//! errors to gRPC codes.

use crate::serve::job::backend::JobView;
use crate::serve::job::error::{JobError, RequestError};
use crate::serve::job::events::{EncodedImage, JobEvent, JobSnapshot, JobState, JobTimings};
use jhakaas_model_manager::Progress;
use jhakaas_proto::v1 as pb;
use std::sync::Arc;
use std::time::Duration;
use tonic::Status;

/// The gRPC status of the worker's error: the one place errors get their codes.
pub fn status(e: JobError) -> Status {
    let message = e.to_string();
    match e {
        JobError::Request(RequestError::Unknown { .. }) => Status::not_found(message),
        JobError::Request(RequestError::Invalid { .. } | RequestError::Refused(_)) => {
            Status::invalid_argument(message)
        }
        JobError::QueueFull { .. } => Status::resource_exhausted(message),
        JobError::Draining | JobError::Unavailable(_) => Status::unavailable(message),
        JobError::NotFound(_) => Status::not_found(message),
        JobError::DeadlineExceeded => Status::deadline_exceeded(message),
        JobError::Conflict => Status::aborted(message),
    }
}

fn state(s: JobState) -> pb::JobState {
    match s {
        JobState::Queued => pb::JobState::Queued,
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

fn progress(p: &Progress) -> pb::Progress {
    pb::Progress {
        step: p.step as u32,
        total_steps: p.total_steps as u32,
        timestep: p.timestep,
    }
}

fn timings(t: &JobTimings) -> pb::Timings {
    pb::Timings {
        queue_seconds: t.queue.as_secs_f64(),
        text_encode_seconds: t.text_encode.as_secs_f64(),
        denoise_seconds: t.denoise.as_secs_f64(),
        decode_seconds: t.decode.as_secs_f64(),
        image_encode_seconds: t.image_encode.as_secs_f64(),
        total_seconds: t.total.as_secs_f64(),
    }
}

fn images(imgs: &[EncodedImage]) -> Vec<pb::Image> {
    imgs.iter()
        .map(|i| pb::Image {
            data: i.data.clone(),
            mime_type: i.mime_type.to_string(),
            width: i.width,
            height: i.height,
            seed: i.seed,
        })
        .collect()
}

/// A job as the API reports it.
pub fn job(view: &JobView) -> pb::Job {
    let snap = &view.snapshot;
    pb::Job {
        job_id: view.id.clone(),
        request_id: view.request_id.clone(),
        model: view.model.clone(),
        state: state(snap.state) as i32,
        queue_position: snap.queue_position,
        progress: snap.progress.as_ref().map(progress),
        images: images(&snap.images),
        timings: snap.timings.as_ref().map(timings),
        error: snap.error.clone(),
        seed: view.seed,
    }
}

/// An event as the API streams it.
pub fn event(job_id: &str, e: &JobEvent) -> pb::JobEvent {
    use pb::job_event::Event;
    let event = match e {
        JobEvent::Queued { position } => Event::Queued(pb::Queued {
            queue_position: *position,
        }),
        JobEvent::ModelLoading { model } => Event::ModelLoading(pb::ModelLoading {
            model: model.clone(),
        }),
        JobEvent::Started => Event::Started(pb::Started {}),
        JobEvent::Progress(p) => Event::Progress(progress(p)),
        JobEvent::Completed {
            images: imgs,
            timings: t,
        } => Event::Completed(pb::Completed {
            images: images(imgs),
            timings: Some(timings(t)),
        }),
        JobEvent::Failed { reason, timings: t } => Event::Failed(pb::Failed {
            reason: reason.clone(),
            timings: Some(timings(t)),
        }),
        JobEvent::Cancelled { reason, timings: t } => Event::Cancelled(pb::Cancelled {
            reason: reason.clone(),
            timings: Some(timings(t)),
        }),
    };
    pb::JobEvent {
        job_id: job_id.to_string(),
        event: Some(event),
    }
}

/// A job state as the PostgreSQL store's rows spell it.
pub fn state_from_row(s: &str) -> JobState {
    match s {
        "queued" => JobState::Queued,
        "running" => JobState::Running,
        "succeeded" => JobState::Succeeded,
        "failed" => JobState::Failed,
        _ => JobState::Cancelled,
    }
}

fn seconds(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or_default()
}

fn timings_from_wire(t: Option<pb::Timings>) -> JobTimings {
    let t = t.unwrap_or_default();
    JobTimings {
        queue: seconds(t.queue_seconds),
        text_encode: seconds(t.text_encode_seconds),
        denoise: seconds(t.denoise_seconds),
        decode: seconds(t.decode_seconds),
        image_encode: seconds(t.image_encode_seconds),
        total: seconds(t.total_seconds),
    }
}

/// The MIME types the encoder writes, as the static strings the domain keeps.
fn mime_type(s: &str) -> &'static str {
    match s {
        "image/png" => "image/png",
        "image/jpeg" => "image/jpeg",
        "image/webp" => "image/webp",
        _ => "application/octet-stream",
    }
}

fn images_from_wire(imgs: Vec<pb::Image>) -> Arc<Vec<EncodedImage>> {
    Arc::new(
        imgs.into_iter()
            .map(|i| EncodedImage {
                mime_type: mime_type(&i.mime_type),
                data: i.data,
                width: i.width,
                height: i.height,
                seed: i.seed,
            })
            .collect(),
    )
}

/// A stored wire event back in domain form (`None`: an empty event).
pub fn event_from_wire(e: pb::JobEvent) -> Option<JobEvent> {
    use pb::job_event::Event;
    Some(match e.event? {
        Event::Queued(q) => JobEvent::Queued {
            position: q.queue_position,
        },
        Event::ModelLoading(m) => JobEvent::ModelLoading { model: m.model },
        Event::Started(_) => JobEvent::Started,
        Event::Progress(p) => JobEvent::Progress(Progress {
            step: p.step as usize,
            total_steps: p.total_steps as usize,
            timestep: p.timestep,
        }),
        Event::Completed(c) => JobEvent::Completed {
            images: images_from_wire(c.images),
            timings: timings_from_wire(c.timings),
        },
        Event::Failed(f) => JobEvent::Failed {
            reason: f.reason,
            timings: timings_from_wire(f.timings),
        },
        Event::Cancelled(c) => JobEvent::Cancelled {
            reason: c.reason,
            timings: timings_from_wire(c.timings),
        },
    })
}

/// A job's snapshot from the PostgreSQL store's row fields and its terminal event.
pub fn snapshot_from_row(
    state: JobState,
    queue_position: u32,
    progress: Option<Progress>,
    error: String,
    terminal: Option<JobEvent>,
) -> JobSnapshot {
    let (images, timings) = match &terminal {
        Some(JobEvent::Completed { images, timings }) => (images.clone(), Some(*timings)),
        Some(JobEvent::Failed { timings, .. }) | Some(JobEvent::Cancelled { timings, .. }) => {
            (Arc::new(Vec::new()), Some(*timings))
        }
        _ => (Arc::new(Vec::new()), None),
    };
    JobSnapshot {
        state,
        queue_position,
        progress,
        images,
        timings,
        error,
        terminal,
    }
}
