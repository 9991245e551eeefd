//! The HTTP face (`--http-listen`): OpenAI's images API beside gRPC, on the same job store,
//! queue, limits, auth and drain. `POST /v1/images/generations`, `POST /v1/images/edits`
//! (inpainting), `GET /v1/models`, `GET /healthz` (alive), `GET /readyz` (serving). A request is validated by the same code as
//! a gRPC one (it becomes the same wire request, which a durable store keeps), so a job made
//! here is an ordinary job: `GetJob` finds it by the id in the `x-jhakaas-job-id` header.
//! Imports go one way: this face uses `api` (the request's wire form), `engine` and `job`.

mod body;
mod edits;
mod error;

use crate::serve::api::convert::{self, Limits};
use crate::serve::engine::models::ModelTable;
use crate::serve::job::backend::JobBackend;
use crate::serve::job::events::{EncodedImage, JobEvent};
use axum::body::Body;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{DefaultBodyLimit, Multipart, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
pub use error::HttpError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio_stream::StreamExt;

/// What the handlers share.
#[derive(Clone)]
pub struct HttpState {
    /// The job store.
    pub jobs: Arc<dyn JobBackend>,
    /// Registered models.
    pub models: Arc<ModelTable>,
    /// Request limits.
    pub limits: Limits,
    /// The bearer token requests must carry (none: open).
    pub token: Option<String>,
    /// Whether the worker is serving (warmed, not draining).
    pub ready: Arc<AtomicBool>,
    /// Largest request body read.
    pub max_body: usize,
}

/// The HTTP face's routes.
pub fn router(state: HttpState) -> Router {
    let max_body = state.max_body;
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/v1/models", get(models))
        .route("/v1/images/generations", post(generations))
        .route("/v1/images/edits", post(edits))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

async fn readyz(State(s): State<HttpState>) -> Response {
    if s.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready").into_response()
    } else {
        HttpError::not_ready().into_response()
    }
}

/// Admits a request whose `authorization` is `Bearer <token>` (every request when no token
/// is configured), comparing in constant time.
fn authorize(s: &HttpState, headers: &HeaderMap) -> Result<(), HttpError> {
    use subtle::ConstantTimeEq;
    let Some(expected) = &s.token else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(HttpError::unauthorized())
    }
}

async fn models(State(s): State<HttpState>, headers: HeaderMap) -> Result<Response, HttpError> {
    authorize(&s, &headers)?;
    let data: Vec<_> = s
        .models
        .specs()
        .iter()
        .map(|m| {
            serde_json::json!({
                "id": m.name,
                "object": "model",
                "created": 0,
                "owned_by": "jhakaas",
            })
        })
        .collect();
    Ok(Json(serde_json::json!({ "object": "list", "data": data })).into_response())
}

/// Refuses a body that announces more than the bound before a byte of it is read (a chunked
/// body is cut at the bound while it is read).
fn check_length(s: &HttpState, headers: &HeaderMap) -> Result<(), HttpError> {
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match announced {
        Some(n) if n > s.max_body as u64 => Err(HttpError::too_large(s.max_body)),
        _ => Ok(()),
    }
}

async fn generations(
    State(s): State<HttpState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, HttpError> {
    authorize(&s, &headers)?;
    check_length(&s, &headers)?;
    let body = axum::body::to_bytes(body, s.max_body)
        .await
        .map_err(|_| HttpError::too_large(s.max_body))?;
    run(&s, body::generation(&body)?).await
}

async fn edits(
    State(s): State<HttpState>,
    headers: HeaderMap,
    form: Result<Multipart, MultipartRejection>,
) -> Result<Response, HttpError> {
    authorize(&s, &headers)?;
    check_length(&s, &headers)?;
    let form = form.map_err(|e| {
        HttpError::invalid(
            "body",
            format!("invalid body: expected multipart/form-data ({e})"),
        )
    })?;
    run(&s, edits::edit(form, s.max_body).await?).await
}

/// Validates `wire` as a gRPC request is, runs it as a job owned by this call (dropped with
/// the client, as gRPC's Generate) and answers with its images.
async fn run(
    s: &HttpState,
    wire: jhakaas_proto::v1::GenerateRequest,
) -> Result<Response, HttpError> {
    let (models, limits) = (s.models.clone(), s.limits);
    let accepted =
        tokio::task::spawn_blocking(move || convert::accept(wire, &models, &limits, None))
            .await
            .map_err(|e| HttpError::failed(&format!("request validation stopped: {e}")))??;
    let seed = accepted.request.params.seed.unwrap_or_default();
    let mut job = s.jobs.generate(accepted).await?;
    while let Some(event) = job.events.next().await {
        match event? {
            JobEvent::Completed { images, .. } => {
                return Ok(images_response(&job.job_id, seed, &images));
            }
            JobEvent::Failed { reason, .. } => return Err(HttpError::failed(&reason)),
            JobEvent::Cancelled { reason, .. } => return Err(HttpError::cancelled(&reason)),
            _ => {}
        }
    }
    Err(HttpError::cancelled("the job's events ended early"))
}

/// OpenAI's images response, with our job id and seed in headers.
fn images_response(job_id: &str, seed: u64, images: &[EncodedImage]) -> Response {
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let data: Vec<_> = images
        .iter()
        .map(|i| {
            serde_json::json!({
                "b64_json": base64::engine::general_purpose::STANDARD.encode(&i.data),
            })
        })
        .collect();
    let mut response =
        Json(serde_json::json!({ "created": created, "data": data })).into_response();
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(job_id) {
        h.insert("x-jhakaas-job-id", v);
    }
    h.insert("x-jhakaas-seed", HeaderValue::from(seed));
    response
}
