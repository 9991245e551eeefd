//! Errors of the HTTP face in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`:
//! the one place the domain's errors get HTTP statuses.

use crate::serve::job::error::{JobError, RequestError};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// A refusal of the HTTP face.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpError {
    /// The status.
    pub status: StatusCode,
    /// OpenAI's error type (`invalid_request_error`, `authentication_error`, …).
    pub kind: &'static str,
    /// What went wrong.
    pub message: String,
    /// The request field at fault, as this API names it.
    pub param: Option<String>,
    /// A short machine-readable code.
    pub code: Option<&'static str>,
}

impl HttpError {
    /// 400 naming `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param: Some(param.to_string()),
            code: None,
        }
    }

    /// 401: the bearer token is missing or wrong.
    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            kind: "authentication_error",
            message: "missing or wrong bearer token".into(),
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    /// 413: the body is over the limit (it was not read past it).
    pub fn too_large(limit: usize) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            kind: "invalid_request_error",
            message: format!("the request body is over {limit} bytes"),
            param: None,
            code: Some("request_too_large"),
        }
    }

    /// 500: the job failed on the engine.
    pub fn failed(reason: &str) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "server_error",
            message: format!("the job failed: {reason}"),
            param: None,
            code: None,
        }
    }

    /// 503: the job was cancelled (shutdown, or the engine gave up on it).
    pub fn cancelled(reason: &str) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "server_error",
            message: format!("the job was cancelled: {reason}"),
            param: None,
            code: None,
        }
    }

    /// 503: the worker is not ready yet (or no longer).
    pub fn not_ready() -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "server_error",
            message: "the worker is not ready".into(),
            param: None,
            code: None,
        }
    }
}

/// The HTTP API's name for a field the validation names as the wire (gRPC) spells it.
fn param(wire_field: &str) -> String {
    match wire_field {
        "width" | "height" => "size".into(),
        "num_images" => "n".into(),
        other => other.to_string(),
    }
}

impl From<RequestError> for HttpError {
    fn from(e: RequestError) -> Self {
        Self::from(JobError::from(e))
    }
}

impl From<JobError> for HttpError {
    /// The one place the worker's errors get HTTP statuses.
    fn from(e: JobError) -> Self {
        let message = e.to_string();
        let (status, kind, code) = match e {
            JobError::Request(RequestError::Invalid { field, .. }) => {
                return Self::invalid(&param(&field), message)
            }
            JobError::Request(RequestError::Unknown { field, .. }) => {
                return Self {
                    status: StatusCode::NOT_FOUND,
                    kind: "invalid_request_error",
                    message,
                    code: Some(if field == "model" {
                        "model_not_found"
                    } else {
                        "not_found"
                    }),
                    param: Some(param(&field)),
                };
            }
            JobError::Request(RequestError::Refused(_)) => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", None)
            }
            JobError::QueueFull { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("queue_full"),
            ),
            JobError::Draining | JobError::Unavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "server_error", None)
            }
            JobError::NotFound(_) => (StatusCode::NOT_FOUND, "invalid_request_error", None),
            JobError::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "server_error", None),
            JobError::Conflict => (StatusCode::CONFLICT, "invalid_request_error", None),
        };
        Self {
            status,
            kind,
            message,
            param: None,
            code,
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        });
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            // The queue drains a job at a time: a second is the shortest useful wait.
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
