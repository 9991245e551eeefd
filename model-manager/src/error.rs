//! The engine's error type: every failure names what was wrong and where.

/// Result alias used across the model manager.
pub type Result<T> = std::result::Result<T, Error>;

/// Errors raised while resolving, loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file the model needs is not present in its source.
    #[error("model source `{source_name}` has no file `{file}`")]
    MissingFile { source_name: String, file: String },

    /// A model source could not be resolved (bad hub id, cache miss offline, network failure).
    #[error("cannot resolve model source `{source_name}`: {reason}")]
    Source { source_name: String, reason: String },

    /// A config file could not be read or parsed.
    #[error("cannot read config `{file}`: {reason}")]
    Config { file: String, reason: String },

    /// A config value this engine does not implement: never guessed around.
    #[error("unsupported config in `{file}`: {field} = {value} ({hint})")]
    Unsupported {
        file: String,
        field: String,
        value: String,
        hint: String,
    },

    /// A request parameter is invalid; `field` names it.
    #[error("invalid {field}: {reason}")]
    InvalidParam { field: &'static str, reason: String },

    /// The run was cancelled between two denoising steps.
    #[error("cancelled")]
    Cancelled,

    /// Image encoding or decoding failed.
    #[error("image error: {0}")]
    Image(String),

    /// The requested device is not available in this build or on this machine.
    #[error("device error: {0}")]
    Device(String),

    /// An error from candle while building or running a model.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),

    /// An I/O error with the path it concerns.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Shorthand for [`Error::InvalidParam`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidParam {
            field,
            reason: reason.into(),
        }
    }

    /// Whether the device is beyond recovery: a CUDA driver error other than out-of-memory
    /// leaves the context unusable (an illegal address, a launch failure), so the process must
    /// restart; out-of-memory only fails the job. Always false on the CPU.
    pub fn is_device_fatal(&self) -> bool {
        match self {
            Error::Candle(e) => candle_device_fatal(e),
            _ => false,
        }
    }

    /// Shorthand for [`Error::Unsupported`].
    pub fn unsupported(
        file: impl Into<String>,
        field: impl Into<String>,
        value: impl std::fmt::Display,
        hint: impl Into<String>,
    ) -> Self {
        Error::Unsupported {
            file: file.into(),
            field: field.into(),
            value: value.to_string(),
            hint: hint.into(),
        }
    }
}

/// Whether candle's error is a CUDA driver error other than out-of-memory (looking through
/// its backtrace and context wrappers).
fn candle_device_fatal(e: &candle_core::Error) -> bool {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_device_fatal(inner),
        candle_core::Error::Context { inner, .. } => candle_device_fatal(inner),
        #[cfg(feature = "cuda")]
        candle_core::Error::Cuda(inner) => {
            use candle_core::cuda_backend::cudarc::driver::sys::CUresult;
            use candle_core::cuda_backend::CudaError;
            matches!(
                inner.downcast_ref::<CudaError>(),
                Some(CudaError::Cuda(d)) if d.0 != CUresult::CUDA_ERROR_OUT_OF_MEMORY
            )
        }
        _ => false,
    }
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;
    use candle_core::cuda_backend::cudarc::driver::{sys::CUresult, DriverError};
    use candle_core::cuda_backend::CudaError;

    fn driver(code: CUresult) -> Error {
        Error::Candle(candle_core::Error::Cuda(Box::new(CudaError::Cuda(DriverError(code)))).bt())
    }

    #[test]
    fn a_lost_context_is_fatal_and_out_of_memory_is_not() {
        assert!(driver(CUresult::CUDA_ERROR_ILLEGAL_ADDRESS).is_device_fatal());
        assert!(driver(CUresult::CUDA_ERROR_LAUNCH_FAILED).is_device_fatal());
        assert!(!driver(CUresult::CUDA_ERROR_OUT_OF_MEMORY).is_device_fatal());
        assert!(!Error::invalid("steps", "zero").is_device_fatal());
    }
}
