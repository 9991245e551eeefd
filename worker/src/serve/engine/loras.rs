//! The LoRA adapters this worker can apply: the `.safetensors` files of `--lora-dir`, named by
//! their file stem. Requests name adapters, never paths; the folder is read when asked, so
//! adapters added to it are served without a restart.

use crate::serve::job::error::RequestError;
use std::path::PathBuf;

/// Most adapters one request may merge.
pub const MAX_LORAS_PER_REQUEST: usize = 8;

/// One adapter the worker can apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraInfo {
    /// The name requests use (the file stem).
    pub name: String,
    /// The file's size.
    pub bytes: u64,
}

/// The adapter folder (none: requests with adapters are refused).
#[derive(Debug, Clone, Default)]
pub struct LoraLibrary {
    dir: Option<PathBuf>,
}

impl LoraLibrary {
    /// Adapters from `dir`.
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    /// The file of adapter `name`; `field` names it in errors (`loras[0].name`).
    pub fn find(&self, name: &str, field: &str) -> Result<PathBuf, RequestError> {
        let Some(dir) = &self.dir else {
            return Err(RequestError::invalid(
                field,
                "this worker serves no LoRA adapters (no --lora-dir)",
            ));
        };
        let plain = !name.is_empty()
            && name.len() <= 128
            && !name.starts_with('.')
            && !name.contains(['/', '\\', '\0']);
        if !plain {
            return Err(RequestError::invalid(
                field,
                format!("`{name}` is not an adapter name (a file stem, no path)"),
            ));
        }
        let path = dir.join(format!("{name}.safetensors"));
        if !path.is_file() {
            return Err(RequestError::unknown(
                field,
                format!("no LoRA adapter `{name}` here (see ListLoras)"),
            ));
        }
        Ok(path)
    }

    /// Every adapter, sorted by name.
    pub fn list(&self) -> Vec<LoraInfo> {
        let Some(dir) = &self.dir else {
            return Vec::new();
        };
        let mut loras: Vec<LoraInfo> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let path = e.path();
                if path.extension()? != "safetensors" {
                    return None;
                }
                let name = path.file_stem()?.to_str()?.to_string();
                let bytes = e.metadata().ok()?.len();
                Some(LoraInfo { name, bytes })
            })
            .collect();
        loras.sort_by(|a, b| a.name.cmp(&b.name));
        loras
    }
}
