//! Stable Diffusion pipelines — SD 1.x/2.x and SD-Turbo (`StableDiffusionPipeline`), SDXL and
//! SDXL-Turbo (`StableDiffusionXLPipeline`): every component is loaded from the checkpoint's own
//! config files, then txt2img / img2img run with classifier-free guidance exactly as diffusers'
//! pipelines compute them.

mod control;
mod generate;
mod residency;
mod resolve;

pub use control::MAX_CONTROLNETS;
pub use resolve::{RequestLimits, MAX_IMAGES, MAX_SIDE, MAX_STEPS};

use crate::config::{
    read_json, ClipTextConfig, ModelIndex, PipelineKind, UNetConfig, UNetPlan, VaeConfig,
};
use crate::device::working_dtype;
use crate::error::{Error, Result};
use crate::noise::RngKind;
pub use crate::params::DefaultsOverride;
use crate::params::*;
use crate::scheduler::{self, SchedulerConfig};
use crate::sharing::{SharedWeights, Sharing};
use crate::source::ModelSource;
use crate::text::{PromptEmbeddings, TextConditioner};
use crate::unet::UNet2DConditionModel;
use crate::vae::AutoencoderKL;
use crate::weights;
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// diffusers' default number of steps.
pub const DEFAULT_STEPS: usize = 50;
use crate::family::ModelFamily;
pub use crate::family::{DEFAULT_GUIDANCE, DEFAULT_GUIDANCE_XL};

const SCHEDULER_FILE: &str = "scheduler/scheduler_config.json";

/// Adversarially distilled checkpoints whose model cards prescribe 1–4 steps without guidance.
/// diffusers' pipeline defaults (50 steps, CFG) would give them broken images.
const TURBO_REPOS: &[&str] = &["stabilityai/sd-turbo", "stabilityai/sdxl-turbo"];
/// Steps used by default for turbo checkpoints.
pub const TURBO_STEPS: usize = 1;

/// How to load a pipeline beyond its own files.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Use this VAE instead of the checkpoint's (e.g. the fp16-fix VAE for SDXL): a diffusers
    /// `AutoencoderKL` folder/repository (config.json at its root) or a pipeline with `vae/`.
    pub vae: Option<ModelSource>,
    /// Operator overrides of the model's defaults (e.g. a turbo checkpoint in a plain folder).
    pub defaults: DefaultsOverride,
    /// LoRA adapters merged into the UNet and text encoders as they load.
    pub loras: Vec<crate::lora::LoraAdapter>,
    /// The layers of the base pipeline (its [`StableDiffusionPipeline::shared_weights`]): a
    /// variant takes every layer its adapters leave untouched from there instead of loading
    /// its own copy.
    pub share_with: Option<Arc<SharedWeights>>,
    /// The GPU the `torch-cuda` generator lays its draws out for (the Python worker's).
    pub torch_cuda_grid: crate::noise::CudaGrid,
    /// How long the mapped CPU weights stay in the resident set (no effect on a GPU).
    pub residency: crate::weights::WeightResidency,
}

/// A loaded pipeline, ready to generate.
pub struct StableDiffusionPipeline {
    name: String,
    kind: PipelineKind,
    text: TextConditioner,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    scheduler_config: SchedulerConfig,
    device: Device,
    dtype: DType,
    vae_dtype: DType,
    description: ModelDescription,
    weight_bytes: u64,
    shared: Arc<SharedWeights>,
    shared_bytes: u64,
    torch_cuda_grid: crate::noise::CudaGrid,
    pages: residency::StagePages,
}

impl std::fmt::Debug for StableDiffusionPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StableDiffusionPipeline")
            .field("name", &self.name)
            .field("family", &self.description.family)
            .field("device", &self.device)
            .field("dtype", &self.dtype)
            .finish_non_exhaustive()
    }
}

/// Where the VAE comes from: the checkpoint's `vae/`, or an override's root or `vae/`.
fn vae_location(
    source: &ModelSource,
    options: &LoadOptions,
) -> Result<(ModelSource, &'static str)> {
    match &options.vae {
        None => Ok((source.clone(), "vae")),
        Some(v) => {
            if v.optional_file("config.json")?.is_some() {
                Ok((v.clone(), ""))
            } else if v.optional_file("vae/config.json")?.is_some() {
                Ok((v.clone(), "vae"))
            } else {
                Err(Error::MissingFile {
                    source_name: v.to_string(),
                    file: "config.json (an AutoencoderKL folder) or vae/config.json (a pipeline)"
                        .into(),
                })
            }
        }
    }
}

impl StableDiffusionPipeline {
    /// Loads every component of `source` onto `device` (f32 on CPU, f16 on CUDA).
    pub fn load(source: &ModelSource, device: &Device) -> Result<Self> {
        Self::load_with(source, device, &LoadOptions::default())
    }

    /// [`StableDiffusionPipeline::load`] with options (a VAE override).
    pub fn load_with(source: &ModelSource, device: &Device, options: &LoadOptions) -> Result<Self> {
        let dtype = working_dtype(device);
        let Configs {
            index,
            kind,
            unet: unet_cfg,
            plan,
            vae_source,
            vae_folder,
            vae: vae_cfg,
            scheduler: scheduler_config,
            description,
        } = read_configs(source, options)?;
        let lora = crate::lora::LoraPlan::build(&options.loras, source, kind)?;
        let share = Sharing {
            donor: options.share_with.clone(),
            record: Arc::new(SharedWeights::default()),
        };
        let (text, text_bytes, text_shared) = TextConditioner::load(
            source,
            kind,
            &index,
            (dtype, device, options.residency),
            &lora,
            &share,
        )?;
        let context_dim: usize = text
            .encoders()
            .iter()
            .map(|e| e.model().hidden_size())
            .sum();
        let attended: Vec<usize> = plan
            .down
            .iter()
            .chain(&plan.up)
            .filter(|b| b.kind == crate::config::BlockKind::CrossAttn)
            .map(|b| b.cross_attention_dim)
            .chain(plan.mid.map(|(_, _, dim)| dim))
            .collect();
        if let Some(bad) = attended.iter().find(|&&d| d != context_dim) {
            return Err(Error::unsupported(
                "unet/config.json",
                "cross_attention_dim",
                bad.to_string(),
                format!("the text encoders produce {context_dim}-wide states"),
            ));
        }
        if let Some(spec) = plan.added {
            let pooled = text.pooled_dim().unwrap_or(0);
            let expected = spec.text_embeds_dim(6);
            if expected != Some(pooled) {
                return Err(Error::unsupported(
                    "unet/config.json",
                    "projection_class_embeddings_input_dim",
                    spec.in_dim.to_string(),
                    format!(
                        "expected {pooled} (text_encoder_2 projection_dim) + 6 × \
                         addition_time_embed_dim {}",
                        spec.time_embed_dim
                    ),
                ));
            }
        }
        let w = weights::load_merged(
            source,
            "unet",
            "diffusion_pytorch_model",
            dtype,
            device,
            lora.deltas("unet"),
        )?;
        let (unet, unet_shared) = share.build("unet", lora.deltas("unet"), || {
            weights::with_file(&w.file, UNet2DConditionModel::new(&unet_cfg, w.vb.clone()))
        });
        let unet = unet?;
        let unet_pages = w.pages();
        let unet_bytes = w.bytes.saturating_sub(unet_shared);
        let vae_dtype = vae_dtype(kind, &vae_cfg, dtype);
        let w = weights::load(
            &vae_source,
            vae_folder,
            "diffusion_pytorch_model",
            vae_dtype,
            device,
        )?;
        // No adapter touches the VAE: a variant shares all of it.
        let no_deltas: Option<&std::collections::HashMap<String, ()>> = None;
        let (vae, vae_shared) = share.build("vae", no_deltas, || {
            weights::with_file(&w.file, AutoencoderKL::new(&vae_cfg, w.vb.clone()))
        });
        let vae = vae?;
        let vae_bytes = w.bytes.saturating_sub(vae_shared);
        let pages = residency::StagePages {
            policy: options.residency,
            text: text.pages().clone(),
            unet: unet_pages,
            vae: w.pages(),
        };
        pages.enter(residency::Stage::Idle, &[]);

        let name = match &options.vae {
            Some(v) => format!("{source} (vae: {v})"),
            None => source.to_string(),
        };
        Ok(Self {
            name,
            kind,
            text,
            unet,
            vae,
            scheduler_config,
            device: device.clone(),
            dtype,
            vae_dtype,
            description,
            weight_bytes: text_bytes + unet_bytes + vae_bytes,
            shared: share.record,
            shared_bytes: text_shared + unet_shared + vae_shared,
            torch_cuda_grid: options.torch_cuda_grid,
            pages,
        })
    }

    /// Bytes of this pipeline's mapped CPU weights in the process's resident set now (under
    /// [`crate::weights::WeightResidency::Stage`], 0 between jobs); weights copied at load
    /// are not counted.
    pub fn resident_mapped_bytes(&self) -> usize {
        self.pages.resident_bytes()
    }

    /// Values used for unset request fields.
    pub fn defaults(&self) -> &ModelDefaults {
        &self.description.defaults
    }

    /// Model family: `sd1`, `sd2` or `sdxl`.
    pub fn family(&self) -> ModelFamily {
        self.description.family
    }

    /// What the model is and the rules its requests follow (from its config files).
    pub fn description(&self) -> &ModelDescription {
        &self.description
    }

    /// Whether this is an SDXL-family pipeline.
    pub fn is_xl(&self) -> bool {
        self.kind == PipelineKind::StableDiffusionXl
    }

    /// Bytes of weights this pipeline holds on its own on the device (in the dtypes they
    /// were loaded in; for a LoRA variant, without the layers it shares with its base).
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// Bytes of the layers a LoRA variant takes from its base instead of holding them (0 for
    /// a base model).
    pub fn bytes_shared_with_base(&self) -> u64 {
        self.shared_bytes
    }

    /// Its layers, for loading LoRA variants that share them ([`LoadOptions::share_with`]).
    pub fn shared_weights(&self) -> Arc<SharedWeights> {
        self.shared.clone()
    }

    /// The source this pipeline was loaded from.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Pixels per latent along each axis.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config().scale_factor()
    }

    /// Dtype the VAE runs in (see [`vae_dtype`]).
    pub fn vae_dtype(&self) -> DType {
        self.vae_dtype
    }

    /// Token ids of `text` for the first tokenizer, warning when the prompt is cut.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        self.text.encoders()[0].tokenize(text)
    }

    /// Cross-attention context for a batch of prompts `[B, 77, D]` (SDXL: both encoders'
    /// penultimate states concatenated).
    pub fn encode_text(&self, prompts: &[&str]) -> Result<Tensor> {
        Ok(self.text.encode(prompts, &self.device)?.context)
    }

    /// Context and (SDXL) pooled embedding for a batch of prompts.
    pub fn encode_prompts_full(&self, prompts: &[&str]) -> Result<PromptEmbeddings> {
        self.text.encode(prompts, &self.device)
    }

    /// The text encoders, for component tests.
    pub fn text_conditioner(&self) -> &TextConditioner {
        &self.text
    }

    /// The UNet, for component tests and benchmarks.
    pub fn unet(&self) -> &UNet2DConditionModel {
        &self.unet
    }

    /// The VAE, for component tests and benchmarks.
    pub fn vae(&self) -> &AutoencoderKL {
        &self.vae
    }

    /// The dtype its UNet runs in (f16/bf16 on CUDA, f32 on the CPU); ControlNets load in it.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device it runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }
}

/// Whether `source` is a known turbo checkpoint: by hub id, or a folder inside an HF cache
/// entry of one (`…/models--stabilityai--sd-turbo/snapshots/<commit>`).
fn is_turbo(source: &ModelSource) -> bool {
    match source {
        ModelSource::Hub { repo, .. } => TURBO_REPOS.contains(&repo.as_str()),
        ModelSource::Local(path) => path.components().any(|c| {
            let c = c.as_os_str().to_string_lossy();
            TURBO_REPOS
                .iter()
                .any(|r| c == format!("models--{}", r.replace('/', "--")))
        }),
    }
}

/// What a checkpoint is and the defaults it applies, known from its config files alone.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelDescription {
    /// `sd1`, `sd2` or `sdxl`.
    pub family: ModelFamily,
    /// Values used for unset request fields.
    pub defaults: ModelDefaults,
    /// Pixels per latent along each axis (the VAE's downsampling).
    pub vae_scale_factor: usize,
    /// Channels of the latents (the VAE's).
    pub latent_channels: usize,
    /// The UNet is an inpainting UNet: it takes the mask and the masked image's latents beside
    /// the latents (`in_channels = 2 × latent + 1`, e.g. 9), so every request needs a mask.
    pub inpainting_unet: bool,
    /// The UNet's config (which ControlNets fit it is decided from it).
    pub unet: UNetConfig,
}

impl ModelDescription {
    /// Fails with [`Error::InvalidParam`] (`controlnet`) unless the ControlNet `config`
    /// (named `name`) can steer this model's UNet.
    pub fn check_controlnet(
        &self,
        name: &str,
        config: &crate::config::ControlNetConfig,
    ) -> Result<()> {
        config
            .plan()?
            .check_compatible(name, &self.unet, self.vae_scale_factor)
    }
}

/// Every config file of a pipeline, parsed and checked against each other.
struct Configs {
    index: ModelIndex,
    kind: PipelineKind,
    unet: UNetConfig,
    plan: UNetPlan,
    vae_source: ModelSource,
    vae_folder: &'static str,
    vae: VaeConfig,
    scheduler: SchedulerConfig,
    description: ModelDescription,
}

fn read_configs(source: &ModelSource, options: &LoadOptions) -> Result<Configs> {
    let index: ModelIndex = read_json(&source.file("model_index.json")?, "model_index.json")?;
    let kind = index.validate()?;
    let unet: UNetConfig = read_json(&source.file("unet/config.json")?, "unet/config.json")?;
    let plan = unet.plan()?;
    match (kind, plan.added) {
        (PipelineKind::StableDiffusionXl, None) => {
            return Err(Error::unsupported(
                "unet/config.json",
                "addition_embed_type",
                "null",
                "an SDXL pipeline's UNet needs \"text_time\" conditioning",
            ))
        }
        (PipelineKind::StableDiffusion, Some(_)) => {
            return Err(Error::unsupported(
                "unet/config.json",
                "addition_embed_type",
                "\"text_time\"",
                "a StableDiffusionPipeline cannot feed text_time conditioning; \
                 model_index.json should name StableDiffusionXLPipeline",
            ))
        }
        _ => {}
    }
    let (vae_source, vae_folder) = vae_location(source, options)?;
    let vae_cfg_file = if vae_folder.is_empty() {
        "config.json".to_string()
    } else {
        format!("{vae_folder}/config.json")
    };
    let vae: VaeConfig = read_json(&vae_source.file(&vae_cfg_file)?, &vae_cfg_file)?;
    vae.validate()?;
    let sched_text =
        std::fs::read_to_string(source.file(SCHEDULER_FILE)?).map_err(|e| Error::Config {
            file: SCHEDULER_FILE.into(),
            reason: e.to_string(),
        })?;
    let scheduler = SchedulerConfig::from_json_str(&sched_text, SCHEDULER_FILE)?;
    let te: ClipTextConfig = read_json(
        &source.file("text_encoder/config.json")?,
        "text_encoder/config.json",
    )?;
    let family = ModelFamily::detect(kind, &te.hidden_act);
    let size = unet.sample_size.unwrap_or(kind.default_sample_size()) * vae.scale_factor();
    let turbo = is_turbo(source);
    let mut defaults = ModelDefaults {
        width: size,
        height: size,
        steps: if turbo { TURBO_STEPS } else { DEFAULT_STEPS },
        guidance_scale: if turbo {
            0.0
        } else {
            family.default_guidance()
        },
        scheduler: scheduler.native_kind().unwrap_or(scheduler::FALLBACK),
        rng: RngKind::default(),
    };
    options.defaults.apply(&mut defaults);
    let (vae_scale_factor, latent_channels) = (vae.scale_factor(), vae.latent_channels);
    let inpainting_unet = match unet.in_channels {
        c if c == latent_channels => false,
        c if c == 2 * latent_channels + 1 => true,
        c => {
            return Err(Error::unsupported(
                "unet/config.json",
                "in_channels",
                c,
                format!(
                    "a UNet takes the VAE's {latent_channels} latent channels, or {} for \
                     inpainting (latents, mask, masked-image latents)",
                    2 * latent_channels + 1
                ),
            ))
        }
    };
    let unet_for_description = unet.clone();
    Ok(Configs {
        index,
        kind,
        unet,
        plan,
        vae_source,
        vae_folder,
        vae,
        scheduler,
        description: ModelDescription {
            family,
            defaults,
            vae_scale_factor,
            latent_channels,
            inpainting_unet,
            unet: unet_for_description,
        },
    })
}

/// Bytes of the layers `loras` change, from the weight and adapter files' headers: each
/// changed weight, times three for the fused projection (q, k and v) it may be part of.
fn estimate_variant_bytes(
    source: &ModelSource,
    kind: PipelineKind,
    dtype: DType,
    loras: &[crate::lora::LoraAdapter],
) -> Result<u64> {
    let targets = crate::lora::LoraTargets::of(source, kind)?;
    let elements = crate::lora::LoraPlan::changed_elements(loras, &targets)?;
    Ok(3 * elements * dtype.size_in_bytes() as u64)
}

/// Family and defaults of `source` from its config files, without loading any weights.
pub fn describe(source: &ModelSource, options: &LoadOptions) -> Result<ModelDescription> {
    Ok(read_configs(source, options)?.description)
}

/// Estimates the bytes `source` will take once loaded on `device`, from the weight files'
/// headers alone (nothing is loaded). Used to make room in a memory-budgeted cache first.
/// A LoRA variant sharing its base's layers ([`LoadOptions::share_with`]) counts only the
/// layers its adapters change.
pub fn estimate_loaded_bytes(
    source: &ModelSource,
    device: &Device,
    options: &LoadOptions,
) -> Result<u64> {
    let dtype = working_dtype(device);
    let configs = read_configs(source, options)?;
    if options.share_with.is_some() && !options.loras.is_empty() {
        return estimate_variant_bytes(source, configs.kind, dtype, &options.loras);
    }
    // Every weight file of the family but the VAE's, which may come from elsewhere.
    // (source, stem, dtype, whether it is a text encoder's).
    let is_text = |folder: &str| {
        configs
            .kind
            .text_encoders()
            .iter()
            .any(|t| t.folder == folder)
    };
    let mut parts: Vec<(ModelSource, String, DType, bool)> = configs
        .kind
        .weight_files()
        .into_iter()
        .filter(|(folder, _)| *folder != "vae")
        .map(|(folder, stem)| {
            let stem_path = format!("{folder}/{stem}");
            (source.clone(), stem_path, dtype, is_text(folder))
        })
        .collect();
    let vae_folder = configs.vae_folder;
    let vae_dtype = vae_dtype(configs.kind, &configs.vae, dtype);
    let vae_source = configs.vae_source;
    let vae_stem = if vae_folder.is_empty() {
        "diffusion_pytorch_model".to_string()
    } else {
        format!("{vae_folder}/diffusion_pytorch_model")
    };
    parts.push((vae_source, vae_stem, vae_dtype, false));
    let mut total = 0;
    for (src, stem, dt, text) in parts {
        let path = src.first_of(&[
            &format!("{stem}.safetensors"),
            &format!("{stem}.fp16.safetensors"),
        ])?;
        let bytes = if text {
            crate::text::weights_scope(|| weights::loaded_bytes(&path, dt, device))
        } else {
            weights::loaded_bytes(&path, dt, device)
        };
        total += bytes.map_err(|reason| Error::Config {
            file: format!("{stem}.safetensors"),
            reason,
        })?;
    }
    Ok(total)
}

/// The dtype a pipeline's VAE runs in, as diffusers' pipelines choose it: the SDXL pipeline
/// decodes a `force_upcast` VAE in f32 on half-precision devices (SDXL's VAE overflows in f16;
/// a fixed VAE with `force_upcast: false` runs in the working dtype), while the SD 1.x/2.x
/// pipeline decodes in the working dtype whatever the VAE config says.
pub fn vae_dtype(kind: PipelineKind, vae: &VaeConfig, working: DType) -> DType {
    match kind {
        PipelineKind::StableDiffusionXl if working != DType::F32 && vae.force_upcast => DType::F32,
        _ => working,
    }
}

/// A fresh seed for a request that has none (drawn once, when the request is accepted).
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() >> 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turbo_checkpoints_are_known_by_hub_id_and_by_hf_cache_path() {
        assert!(is_turbo(
            &ModelSource::parse("stabilityai/sdxl-turbo").unwrap()
        ));
        assert!(is_turbo(&ModelSource::Local(
            "/hf/hub/models--stabilityai--sd-turbo/snapshots/abc".into()
        )));
        assert!(!is_turbo(
            &ModelSource::parse("stabilityai/stable-diffusion-2-1").unwrap()
        ));
        assert!(!is_turbo(&ModelSource::Local(
            "/models/sd-turbo-copy".into()
        )));
    }
}
