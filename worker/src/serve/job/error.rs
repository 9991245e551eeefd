//! The worker's one error type, [`JobError`] (a refused request is one of its cases), in domain
//! terms. Each face maps it to its codes in one place: `api::job_wire::status` for gRPC,
//! `http::HttpError`'s `From<JobError>` for HTTP.

/// A refusal that names what the client must change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A field's value cannot be served.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field, as the API names it (`loras[0].name`).
        field: String,
        /// Why.
        reason: String,
    },
    /// A field names something this worker does not have (a model, an adapter).
    #[error("invalid {field}: {reason}")]
    Unknown {
        /// The field, as the API names it.
        field: String,
        /// What is missing.
        reason: String,
    },
    /// The engine refuses the request as a whole.
    #[error("{0}")]
    Refused(String),
}

impl RequestError {
    /// `field` has a value that cannot be served, because `reason`.
    pub fn invalid(field: &str, reason: impl std::fmt::Display) -> Self {
        Self::Invalid {
            field: field.to_string(),
            reason: reason.to_string(),
        }
    }

    /// `field` names something this worker does not have.
    pub fn unknown(field: &str, reason: impl std::fmt::Display) -> Self {
        Self::Unknown {
            field: field.to_string(),
            reason: reason.to_string(),
        }
    }
}

/// Why the worker refused or could not serve a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// The request cannot be served as it is.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The queue is at its bound.
    #[error("the queue is full ({max_queue} jobs); retry later")]
    QueueFull {
        /// The bound.
        max_queue: usize,
    },
    /// The worker is shutting down.
    #[error("the worker is shutting down; retry on another replica")]
    Draining,
    /// No such job (never accepted, or expired).
    #[error("invalid job_id: no job `{0}` (unknown or expired)")]
    NotFound(String),
    /// The client's deadline passed before the job ended.
    #[error("the request's deadline passed")]
    DeadlineExceeded,
    /// A repeated `request_id` raced with its job's expiry.
    #[error("the job with this request_id just expired")]
    Conflict,
    /// The shared job store cannot be reached.
    #[error("the job store is unavailable: {0}")]
    Unavailable(String),
}
