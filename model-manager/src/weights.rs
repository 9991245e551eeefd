//! Memory-mapping one component's safetensors weights, and knowing how many bytes they take
//! once loaded in the working dtype (what the model cache budgets with).

use crate::error::{Error, Result};
use crate::source::ModelSource;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use std::path::Path;

/// A component's weights, ready to build a model from.
pub struct LoadedWeights {
    /// Tensors, converted to the requested dtype on the requested device when used.
    pub vb: VarBuilder<'static>,
    /// The file name as errors show it (`unet/diffusion_pytorch_model.safetensors`).
    pub file: String,
    /// Bytes the floating-point tensors take in the requested dtype.
    pub bytes: u64,
}

/// Relative path of `stem.safetensors` in `folder` (`""` = the repository root).
fn in_folder(folder: &str, name: &str) -> String {
    if folder.is_empty() {
        name.to_string()
    } else {
        format!("{folder}/{name}")
    }
}

/// Memory-maps `folder/stem.safetensors` (or its `.fp16` variant) of `source`.
pub fn load(
    source: &ModelSource,
    folder: &str,
    stem: &str,
    dtype: DType,
    device: &Device,
) -> Result<LoadedWeights> {
    let plain = in_folder(folder, &format!("{stem}.safetensors"));
    let fp16 = in_folder(folder, &format!("{stem}.fp16.safetensors"));
    let path = source.first_of(&[&plain, &fp16])?;
    let config_error = |reason: String| Error::Config {
        file: plain.clone(),
        reason,
    };
    let bytes = loaded_bytes(&path, dtype).map_err(config_error)?;
    // SAFETY: the file is memory-mapped read-only; checkpoints are not modified while loaded.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&path], dtype, device) }
        .map_err(|e| config_error(e.to_string()))?;
    Ok(LoadedWeights {
        vb,
        file: plain,
        bytes,
    })
}

/// Turns a shape mismatch while building a model into a config error naming `file`.
pub fn with_file<T>(file: &str, r: Result<T>) -> Result<T> {
    r.map_err(|e| match e {
        Error::Candle(c) => Error::Config {
            file: file.to_string(),
            reason: format!("weights do not match the config: {c}"),
        },
        other => other,
    })
}

/// Bytes of the floating-point tensors of a safetensors file once converted to `dtype`, read
/// from its header alone.
pub fn loaded_bytes(path: &Path, dtype: DType) -> std::result::Result<u64, String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| "shorter than a safetensors header".to_string())?;
    let header_len = u64::from_le_bytes(n);
    if header_len > 100 << 20 {
        return Err(format!("implausible header length {header_len}"));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(|e| e.to_string())?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| format!("header is not JSON: {e}"))?;
    let mut total = 0u64;
    for (name, t) in header.iter().filter(|(k, _)| k.as_str() != "__metadata__") {
        let is_float = matches!(
            t.get("dtype").and_then(|d| d.as_str()),
            Some("F16" | "BF16" | "F32" | "F64")
        );
        if !is_float {
            continue;
        }
        let elements: u64 = t
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| format!("tensor `{name}` has no shape"))?
            .iter()
            .map(|d| d.as_u64().unwrap_or(0))
            .product();
        total += elements * dtype.size_in_bytes() as u64;
    }
    Ok(total)
}
