//! The models this worker serves: every `--model NAME=SOURCE` is registered; loaded pipelines
//! live on the engine thread, and the least recently used are evicted when another model needs
//! room — beyond `--max-loaded-models`, or beyond `--memory-budget` bytes of weights.
//! A shared status table lets `ListModels` answer without touching the engine.

use super::loras::LoraLibrary;
use crate::serve::job::events::lock;
use jhakaas_model_manager::config::{read_json, ControlNetConfig, PipelineKind};
use jhakaas_model_manager::controlnet::ControlNetModel;
use jhakaas_model_manager::lora::{LoraAdapter, LoraTargets};
use jhakaas_model_manager::noise::CudaGrid;
use jhakaas_model_manager::pipeline::{
    describe, estimate_loaded_bytes, DefaultsOverride, ModelDescription,
};
use jhakaas_model_manager::weights::WeightResidency;
use jhakaas_model_manager::{LoadOptions, ModelSource, StableDiffusionPipeline};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// One registered model.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// Name clients use.
    pub name: String,
    /// Where its files are.
    pub source: ModelSource,
    /// A VAE to use instead of the model's own (`--model-vae NAME=SOURCE`).
    pub vae: Option<ModelSource>,
    /// Operator overrides of the model's defaults (`--model-defaults NAME=…`).
    pub defaults: DefaultsOverride,
}

impl ModelSpec {
    /// How the engine loads this model.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            vae: self.vae.clone(),
            defaults: self.defaults,
            ..Default::default()
        }
    }
}

/// One registered ControlNet (`--controlnet NAME=SOURCE`).
#[derive(Debug, Clone)]
pub struct ControlNetSpec {
    /// Name requests use.
    pub name: String,
    /// Where its files are.
    pub source: ModelSource,
    /// Its config, read at start-up when its files are on disk (requests are then checked
    /// against the model before queueing); else why not.
    pub config: Result<ControlNetConfig, String>,
}

impl ControlNetSpec {
    /// Registers `source` as `name`, reading its config if the files are there.
    pub fn read(name: &str, source: ModelSource) -> Self {
        let config = ["config.json", "controlnet/config.json"]
            .iter()
            .find_map(|f| source.optional_file(f).ok().flatten().map(|p| (p, *f)))
            .ok_or_else(|| "no config.json on disk yet".to_string())
            .and_then(|(path, file)| read_json(&path, file).map_err(|e| e.to_string()));
        if let Err(reason) = &config {
            tracing::warn!(controlnet = %name, source = %source, %reason, "ControlNet config not read at start-up");
        }
        ControlNetSpec {
            name: name.to_string(),
            source,
            config,
        }
    }
}

/// What `ListModels` reports for a model.
#[derive(Debug, Clone, Default)]
pub struct ModelStatus {
    /// Loaded on the engine right now.
    pub loaded: bool,
    /// Family, defaults and request rules, known once its config files are on disk.
    pub description: Option<ModelDescription>,
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
    loras: LoraLibrary,
    /// Per model, the weights LoRA adapters may update (read once, on the first request with
    /// adapters).
    lora_targets: Mutex<HashMap<String, Arc<LoraTargets>>>,
    controlnets: Vec<ControlNetSpec>,
    /// Bytes each loaded ControlNet holds (absent: not loaded).
    controlnet_bytes: Mutex<HashMap<String, u64>>,
    /// The GPU `torch-cuda` lays draws out for (`--torch-cuda-gpu`).
    torch_cuda_grid: CudaGrid,
    /// How long loaded CPU weights stay resident (`--weights-residency`).
    residency: WeightResidency,
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
            loras: LoraLibrary::default(),
            lora_targets: Mutex::new(HashMap::new()),
            controlnets: Vec::new(),
            controlnet_bytes: Mutex::new(HashMap::new()),
            torch_cuda_grid: CudaGrid::default(),
            residency: WeightResidency::default(),
        }
    }

    /// The same table, its models holding their CPU weights resident as `residency` says.
    pub fn with_residency(mut self, residency: WeightResidency) -> Self {
        self.residency = residency;
        self
    }

    /// The same table, `torch-cuda` drawing as on a `grid`-sized GPU.
    pub fn with_torch_cuda_grid(mut self, grid: CudaGrid) -> Self {
        self.torch_cuda_grid = grid;
        self
    }

    /// The same table, with the ControlNets requests may name.
    pub fn with_controlnets(mut self, controlnets: Vec<ControlNetSpec>) -> Self {
        self.controlnets = controlnets;
        self
    }

    /// Every registered ControlNet, in registration order.
    pub fn controlnets(&self) -> &[ControlNetSpec] {
        &self.controlnets
    }

    /// The ControlNet named `name`.
    pub fn controlnet(&self, name: &str) -> Option<&ControlNetSpec> {
        self.controlnets.iter().find(|c| c.name == name)
    }

    /// Bytes ControlNet `name` holds while loaded (`None`: not loaded).
    pub fn controlnet_loaded_bytes(&self, name: &str) -> Option<u64> {
        lock(&self.controlnet_bytes).get(name).copied()
    }

    /// The same table, with the LoRA adapters requests may name.
    pub fn with_loras(mut self, loras: LoraLibrary) -> Self {
        self.loras = loras;
        self
    }

    /// The LoRA adapters requests may name.
    pub fn loras(&self) -> &LoraLibrary {
        &self.loras
    }

    /// The weights of model `name` (a `kind` pipeline) that adapters may update, read from
    /// its headers the first time and kept.
    pub fn lora_targets(
        &self,
        name: &str,
        kind: PipelineKind,
    ) -> jhakaas_model_manager::Result<Arc<LoraTargets>> {
        if let Some(t) = lock(&self.lora_targets).get(name) {
            return Ok(t.clone());
        }
        let spec = self
            .spec(name)
            .ok_or_else(|| jhakaas_model_manager::Error::invalid("model", "not registered"))?;
        let targets = Arc::new(LoraTargets::of(&spec.source, kind)?);
        lock(&self.lora_targets).insert(name.to_string(), targets.clone());
        Ok(targets)
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

    /// The description of `name`, when its config files have been read.
    pub fn description(&self, name: &str) -> Option<ModelDescription> {
        self.status(name).description
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

    /// Fills in family and defaults from the config files of every model whose files are
    /// already on disk (never downloads), so `ListModels` shows them before the first load.
    pub fn describe_available(&self) {
        let on_disk = |source: &ModelSource| {
            jhakaas_model_manager::fetch::check(source).is_ok_and(|r| r.is_complete())
        };
        for spec in &self.specs {
            if !on_disk(&spec.source) || spec.vae.as_ref().is_some_and(|v| !on_disk(v)) {
                continue;
            }
            match describe(&spec.source, &spec.load_options()) {
                Ok(d) => self.update(&spec.name, |s| s.description = Some(d)),
                Err(e) => {
                    tracing::warn!(model = %spec.name, error = %e, "model config cannot be read")
                }
            }
        }
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut ModelStatus)) {
        let mut all = self.status.lock().unwrap_or_else(|e| e.into_inner());
        f(all.entry(name.to_string()).or_default());
        let loaded = all.values().filter(|s| s.loaded).count();
        metrics::gauge!("jhakaas_models_loaded").set(loaded as f64);
    }
}

/// A loaded pipeline: a model, merged with a set of LoRA adapters (none for the base).
#[derive(Debug, Clone, PartialEq)]
struct VariantKey {
    model: String,
    /// Adapter files and weights, in request order.
    loras: Vec<(std::path::PathBuf, u64)>,
}

impl VariantKey {
    fn new(model: &str, loras: &[LoraAdapter]) -> Self {
        Self {
            model: model.to_string(),
            loras: loras
                .iter()
                .map(|l| (l.path.clone(), l.weight.to_bits()))
                .collect(),
        }
    }

    /// How logs and errors name it: `sd` or `sd + style:0.7`.
    fn label(&self) -> String {
        let mut s = self.model.clone();
        for (path, w) in &self.loras {
            let name = path.file_stem().unwrap_or_default().to_string_lossy();
            s.push_str(&format!(" + {name}:{}", f64::from_bits(*w)));
        }
        s
    }
}

/// The pipelines loaded on the engine thread, least recently used first: base models and
/// their LoRA variants, all in one budget.
pub struct LoadedModels {
    table: Arc<ModelTable>,
    device: jhakaas_model_manager::Device,
    max_loaded: usize,
    memory_budget: Option<u64>,
    loaded: Vec<(VariantKey, Arc<StableDiffusionPipeline>)>,
    /// Loaded ControlNets, least recently used first; their bytes count in the budget.
    nets: Vec<(String, Arc<ControlNetModel>)>,
    failures: HashMap<String, LoadFailure>,
}

#[derive(Debug, Clone)]
struct LoadFailure {
    reason: String,
    attempts: u32,
    retry_at: std::time::Instant,
}

/// Back-off after a failed load: the first retry waits this long, then twice as long per
/// failure, up to [`LOAD_RETRY_MAX`].
const LOAD_RETRY_FIRST: std::time::Duration = std::time::Duration::from_secs(5);
const LOAD_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(300);

impl LoadedModels {
    /// An empty set of loaded models on `device`, bounded by `max_loaded` and
    /// `memory_budget` bytes of weights.
    pub fn new(
        table: Arc<ModelTable>,
        device: jhakaas_model_manager::Device,
        max_loaded: usize,
        memory_budget: Option<u64>,
    ) -> Self {
        Self {
            table,
            device,
            max_loaded: max_loaded.max(1),
            memory_budget,
            loaded: Vec::new(),
            nets: Vec::new(),
            failures: HashMap::new(),
        }
    }

    /// Bytes of weights loaded now, models and ControlNets.
    pub fn loaded_bytes(&self) -> u64 {
        let models: u64 = self.loaded.iter().map(|(_, p)| p.weight_bytes()).sum();
        models + self.nets.iter().map(|(_, n)| n.weight_bytes()).sum::<u64>()
    }

    /// The ControlNets `names` for `pipeline` (the job's, kept loaded), loading the missing
    /// ones in its dtype and evicting, to fit the budget, the least recently used ControlNets
    /// the job does not need, then models other than `model`.
    pub fn get_controlnets(
        &mut self,
        names: &[String],
        model: &str,
        loras: &[LoraAdapter],
        pipeline: &StableDiffusionPipeline,
    ) -> Result<Vec<Arc<ControlNetModel>>, String> {
        let keep = VariantKey::new(model, loras);
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            if let Some(i) = self.nets.iter().position(|(n, _)| n == name) {
                let entry = self.nets.remove(i);
                out.push(entry.1.clone());
                self.nets.push(entry);
                continue;
            }
            let spec = self
                .table
                .controlnet(name)
                .ok_or_else(|| format!("ControlNet `{name}` is not registered"))?
                .clone();
            let dtype = pipeline.dtype();
            let fail = |e: jhakaas_model_manager::Error| {
                format!("ControlNet `{name}` failed to load: {e}")
            };
            let needed = ControlNetModel::estimate_loaded_bytes(&spec.source, &self.device, dtype)
                .map_err(fail)?;
            if let Some(budget) = self.memory_budget {
                while self.loaded_bytes() + needed > budget {
                    let spare = self.nets.iter().position(|(n, _)| !names.contains(n));
                    if let Some(i) = spare {
                        let (evicted, net) = self.nets.remove(i);
                        tracing::info!(controlnet = %evicted, bytes = net.weight_bytes(), "evicting least recently used ControlNet");
                        lock(&self.table.controlnet_bytes).remove(&evicted);
                    } else if !self.evict_oldest_except(Some(&keep)) {
                        return Err(format!(
                            "ControlNet `{name}` needs {} of weights; the budget of {} holds \
                             only the model and the job's other ControlNets",
                            human_bytes(needed),
                            human_bytes(budget)
                        ));
                    }
                }
            }
            let started = std::time::Instant::now();
            let net =
                Arc::new(ControlNetModel::load(&spec.source, &self.device, dtype).map_err(fail)?);
            tracing::info!(controlnet = %name, source = %spec.source, elapsed = ?started.elapsed(), "ControlNet loaded");
            lock(&self.table.controlnet_bytes).insert(name.clone(), net.weight_bytes());
            self.nets.push((name.clone(), net.clone()));
            out.push(net);
        }
        Ok(out)
    }

    /// Evicts the least recently used pipeline other than `keep` — a base model together
    /// with its LoRA variants, which share its layers. False when nothing else is loaded.
    fn evict_oldest_except(&mut self, keep: Option<&VariantKey>) -> bool {
        let Some(i) = self.loaded.iter().position(|(k, _)| Some(k) != keep) else {
            return false;
        };
        let (evicted, p) = self.loaded.remove(i);
        tracing::info!(model = %evicted.label(), bytes = p.weight_bytes(), "evicting least recently used model");
        if evicted.loras.is_empty() {
            let model = evicted.model.clone();
            self.loaded.retain(|(k, p)| {
                let variant = k.model == model;
                if variant {
                    tracing::info!(model = %k.label(), bytes = p.weight_bytes(), "evicting a variant with its base");
                }
                !variant
            });
            self.table.update(&evicted.model, |s| {
                s.loaded = false;
                s.loaded_bytes = 0;
            });
        }
        true
    }

    /// Whether `name` with `loras` is loaded.
    pub fn is_loaded(&self, name: &str, loras: &[LoraAdapter]) -> bool {
        let key = VariantKey::new(name, loras);
        self.loaded.iter().any(|(k, _)| *k == key)
    }

    /// The pipeline of `name` merged with `loras` (none: the base model), loading it (and
    /// evicting the least recently used) if needed. A variant is loaded after its base and
    /// takes every layer its adapters leave untouched from it, so it holds (and is budgeted
    /// for) only the layers it changes; it never evicts its own base. A load that failed is
    /// not retried until its back-off passes; nothing is evicted for a load whose files do
    /// not even read.
    pub fn get(
        &mut self,
        name: &str,
        loras: &[LoraAdapter],
    ) -> Result<Arc<StableDiffusionPipeline>, String> {
        let key = VariantKey::new(name, loras);
        let label = key.label();
        if let Some(i) = self.loaded.iter().position(|(k, _)| *k == key) {
            let entry = self.loaded.remove(i);
            let pipeline = entry.1.clone();
            self.loaded.push(entry);
            return Ok(pipeline);
        }
        if let Some(f) = self.failures.get(&label) {
            let now = std::time::Instant::now();
            if now < f.retry_at {
                return Err(format!(
                    "{} (not retried for another {}s)",
                    f.reason,
                    (f.retry_at - now).as_secs() + 1
                ));
            }
        }
        let spec = self
            .table
            .spec(name)
            .ok_or_else(|| format!("model `{name}` is not registered"))?
            .clone();
        let mut options = spec.load_options();
        options.loras = loras.to_vec();
        options.torch_cuda_grid = self.table.torch_cuda_grid;
        options.residency = self.table.residency;
        let base = if loras.is_empty() {
            None
        } else {
            Some(self.get(name, &[])?)
        };
        options.share_with = base.as_ref().map(|b| b.shared_weights());
        let keep = base.as_ref().map(|_| VariantKey::new(name, &[]));
        // Before anything is evicted: the configs and every weight file's header must read
        // (this also sizes the model, or the variant's own layers, for the budget).
        let needed = estimate_loaded_bytes(&spec.source, &self.device, &options)
            .map_err(|e| self.load_failed(&label, e.to_string()))?;
        if let Some(budget) = self.memory_budget {
            let with_base = needed + base.as_ref().map_or(0, |b| b.weight_bytes());
            if with_base > budget {
                return Err(self.load_failed(
                    &label,
                    format!(
                        "it needs {} of weights, more than the whole memory budget of {}",
                        human_bytes(with_base),
                        human_bytes(budget)
                    ),
                ));
            }
            while self.loaded_bytes() + needed > budget && self.evict_oldest_except(keep.as_ref()) {
            }
        }
        while self.loaded.len() >= self.max_loaded && self.evict_oldest_except(keep.as_ref()) {}
        let started = std::time::Instant::now();
        match StableDiffusionPipeline::load_with(&spec.source, &self.device, &options) {
            Ok(p) => {
                let p = Arc::new(p);
                tracing::info!(model = %label, source = %spec.source, elapsed = ?started.elapsed(), "model loaded");
                self.failures.remove(&label);
                if loras.is_empty() {
                    self.table.update(name, |s| {
                        s.loaded = true;
                        s.description = Some(p.description().clone());
                        s.loaded_bytes = p.weight_bytes();
                        s.error = None;
                    });
                }
                self.loaded.push((key, p.clone()));
                Ok(p)
            }
            Err(e) => Err(self.load_failed(&label, e.to_string())),
        }
    }

    /// Records a failed load: the reason for ListModels and the jobs, and when to try again.
    fn load_failed(&mut self, name: &str, reason: String) -> String {
        let msg = format!("model `{name}` failed to load: {reason}");
        let attempts = self.failures.get(name).map_or(0, |f| f.attempts) + 1;
        let wait = LOAD_RETRY_FIRST
            .saturating_mul(1 << (attempts - 1).min(16))
            .min(LOAD_RETRY_MAX);
        tracing::error!(model = %name, error = %reason, attempts, retry_in = ?wait, "model failed to load");
        if self.table.spec(name).is_some() {
            self.table.update(name, |s| s.error = Some(msg.clone()));
        }
        self.failures.insert(
            name.to_string(),
            LoadFailure {
                reason: msg.clone(),
                attempts,
                retry_at: std::time::Instant::now() + wait,
            },
        );
        msg
    }
}

/// `12.3 GiB`-style sizes for messages.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Parses a byte size: a number with an optional unit (`24GiB`, `512MiB`, `20GB`, `1e9`).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a size like 24GiB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "ti" | "tib" => 1024.0f64.powi(4),
        other => return Err(format!("unknown unit `{other}` in `{text}`")),
    };
    let v = num * mult;
    if !v.is_finite() || v < 1.0 {
        return Err(format!("`{text}` is not a positive size"));
    }
    Ok(v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
    }

    fn spec(name: &str) -> ModelSpec {
        ModelSpec {
            name: name.into(),
            source: ModelSource::Local(fixtures().join("models/sd1-tiny")),
            vae: None,
            defaults: DefaultsOverride::default(),
        }
    }

    fn names(m: &LoadedModels) -> Vec<String> {
        m.loaded.iter().map(|(k, _)| k.label()).collect()
    }

    #[test]
    fn a_variant_shares_its_base_never_evicts_it_and_goes_with_it() {
        let table = Arc::new(ModelTable::new(vec![spec("a"), spec("b")], "a".into()));
        let lora = LoraAdapter::parse(
            fixtures()
                .join("reference/lora-sd1-tiny/peft.safetensors")
                .to_str()
                .unwrap(),
        )
        .unwrap();
        // Room for one model only: the variant still loads next to its base.
        let mut m = LoadedModels::new(table, jhakaas_model_manager::Device::Cpu, 1, None);
        let variant = m.get("a", std::slice::from_ref(&lora)).unwrap();
        assert_eq!(names(&m), ["a", "a + peft:1"]);
        let base = m.get("a", &[]).unwrap();
        assert!(variant.bytes_shared_with_base() > 0);
        assert!(variant.weight_bytes() < base.weight_bytes());
        // Another model evicts the base and, with it, its variant.
        m.get("b", &[]).unwrap();
        assert_eq!(names(&m), ["b"]);
    }

    #[test]
    fn byte_sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_bytes("24GiB"), Ok(24 << 30));
        assert_eq!(parse_bytes("512 MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("20GB"), Ok(20_000_000_000));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5 parsecs").is_err());
        assert!(parse_bytes("0").is_err());
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
