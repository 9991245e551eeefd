//! Reading a noise-replay file: a safetensors file with `latents` and optionally `step_noise`
//! and `encoder_noise`, the exact noise another implementation used (see [`NoiseReplay`]).

use crate::error::{Error, Result};
use crate::params::{HostTensor, NoiseReplay};
use safetensors::{Dtype, SafeTensors};
use std::path::Path;

impl NoiseReplay {
    /// Loads `path`; every tensor must be f32.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .map_err(|e| Error::invalid("latents", format!("{}: {e}", path.display())))?;
        Self::from_bytes(&bytes).map_err(|e| match e {
            Error::InvalidParam { field, reason } => {
                Error::invalid(field, format!("{}: {reason}", path.display()))
            }
            other => other,
        })
    }

    /// Parses safetensors bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| Error::invalid("latents", format!("not a safetensors file: {e}")))?;
        let get = |name: &str| -> Result<Option<HostTensor>> {
            let view = match st.tensor(name) {
                Ok(v) => v,
                Err(_) => return Ok(None),
            };
            if view.dtype() != Dtype::F32 {
                return Err(Error::invalid(
                    "latents",
                    format!("tensor `{name}` is {:?}, expected F32", view.dtype()),
                ));
            }
            let data = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Ok(Some(HostTensor {
                data,
                shape: view.shape().to_vec(),
            }))
        };
        let latents = get("latents")?
            .ok_or_else(|| Error::invalid("latents", "the file has no tensor named `latents`"))?;
        if latents.shape.len() != 4 {
            return Err(Error::invalid(
                "latents",
                format!(
                    "`latents` has shape {:?}, expected [N, C, H/8, W/8]",
                    latents.shape
                ),
            ));
        }
        Ok(Self {
            latents,
            step_noise: get("step_noise")?,
            encoder_noise: get("encoder_noise")?,
        })
    }
}
