//! Why a request is refused, in domain terms. The faces map it to their codes in one place each
//! (`api::convert::status` for gRPC).

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
