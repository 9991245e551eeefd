//! The models this worker serves: every `--model NAME=SOURCE` is registered; loaded pipelines
//! live on the engine thread, least-recently-used beyond `--max-loaded-models` are evicted.
//! A shared status table lets `ListModels` answer without touching the engine.

use jhakaas_model_manager::{ModelDefaults, ModelSource, StableDiffusionPipeline};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// One registered model.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// Name clients use.
    pub name: String,
    /// Where its files are.
    pub source: ModelSource,
}

/// What `ListModels` reports for a model.
#[derive(Debug, Clone, Default)]
pub struct ModelStatus {
    /// Loaded on the engine right now.
    pub loaded: bool,
    /// `sd1`/`sd2`, known once loaded.
    pub family: Option<String>,
    /// Defaults, known once loaded.
    pub defaults: Option<ModelDefaults>,
    /// Bytes of weights held while loaded.
    pub loaded_bytes: u64,
    /// Last load error, if any.
    pub error: Option<String>,
}

/// Registered models and their status, shared between the engine and the service.
#[derive(Debug)]
pub struct ModelTable {
    specs: Vec<ModelSpec>,
    default_model: String,
    status: Mutex<HashMap<String, ModelStatus>>,
}

impl ModelTable {
    /// Registers `specs`; `default_model` names the one used when a request leaves `model` empty.
    pub fn new(specs: Vec<ModelSpec>, default_model: String) -> Self {
        let status = specs
            .iter()
            .map(|s| (s.name.clone(), ModelStatus::default()))
            .collect();
        Self {
            specs,
            default_model,
            status: Mutex::new(status),
        }
    }

    /// Every registered model, in registration order.
    pub fn specs(&self) -> &[ModelSpec] {
        &self.specs
    }

    /// The spec named `name`.
    pub fn spec(&self, name: &str) -> Option<&ModelSpec> {
        self.specs.iter().find(|s| s.name == name)
    }

    /// The default model's name.
    pub fn default_model(&self) -> &str {
        &self.default_model
    }

    /// A copy of `name`'s status.
    pub fn status(&self, name: &str) -> ModelStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut ModelStatus)) {
        let mut all = self.status.lock().unwrap_or_else(|e| e.into_inner());
        f(all.entry(name.to_string()).or_default());
        let loaded = all.values().filter(|s| s.loaded).count();
        metrics::gauge!("jhakaas_models_loaded").set(loaded as f64);
    }
}

/// Loaded pipelines, owned by the engine thread.
pub struct LoadedModels {
    table: Arc<ModelTable>,
    device: jhakaas_model_manager::Device,
    max_loaded: usize,
    /// Most recently used last.
    loaded: Vec<(String, Arc<StableDiffusionPipeline>)>,
}

impl LoadedModels {
    /// An empty cache holding at most `max_loaded` pipelines on `device`.
    pub fn new(
        table: Arc<ModelTable>,
        device: jhakaas_model_manager::Device,
        max_loaded: usize,
    ) -> Self {
        Self {
            table,
            device,
            max_loaded: max_loaded.max(1),
            loaded: Vec::new(),
        }
    }

    /// Whether `name` is loaded.
    pub fn is_loaded(&self, name: &str) -> bool {
        self.loaded.iter().any(|(n, _)| n == name)
    }

    /// The pipeline for `name`, loading it (and evicting the least recently used) if needed.
    pub fn get(&mut self, name: &str) -> Result<Arc<StableDiffusionPipeline>, String> {
        if let Some(i) = self.loaded.iter().position(|(n, _)| n == name) {
            let entry = self.loaded.remove(i);
            let pipeline = entry.1.clone();
            self.loaded.push(entry);
            return Ok(pipeline);
        }
        let spec = self
            .table
            .spec(name)
            .ok_or_else(|| format!("model `{name}` is not registered"))?
            .clone();
        while self.loaded.len() >= self.max_loaded {
            let (evicted, _) = self.loaded.remove(0);
            tracing::info!(model = %evicted, "evicting least recently used model");
            self.table.update(&evicted, |s| {
                s.loaded = false;
                s.loaded_bytes = 0;
            });
        }
        let started = std::time::Instant::now();
        match StableDiffusionPipeline::load(&spec.source, &self.device) {
            Ok(p) => {
                let p = Arc::new(p);
                tracing::info!(model = %name, source = %spec.source, elapsed = ?started.elapsed(), "model loaded");
                self.table.update(name, |s| {
                    s.loaded = true;
                    s.family = Some(p.family().to_string());
                    s.defaults = Some(p.defaults().clone());
                    s.loaded_bytes = p.weight_bytes();
                    s.error = None;
                });
                self.loaded.push((name.to_string(), p.clone()));
                Ok(p)
            }
            Err(e) => {
                let msg = format!("model `{name}` failed to load: {e}");
                tracing::error!(model = %name, error = %e, "model failed to load");
                self.table.update(name, |s| s.error = Some(msg.clone()));
                Err(msg)
            }
        }
    }
}
