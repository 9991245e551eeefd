//! Diffusers/transformers config files, parsed and validated.
//!
//! Each struct mirrors one JSON file of a diffusers pipeline. Fields keep diffusers' names and
//! defaults; anything this engine does not implement is rejected by `validate` with an error
//! naming the file, the field and the value, instead of being silently ignored.

use crate::error::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::path::Path;

mod controlnet;
mod unet;
mod vae;

pub use controlnet::{skip_connections, ControlNetConfig, ControlNetPlan, Skip, CONTROLNET_CONFIG};
pub use unet::{AddedConditioningSpec, BlockKind, UNetBlockSpec, UNetConfig, UNetPlan};
pub use vae::VaeConfig;

/// A value that diffusers accepts either as a scalar (applied to every block) or as a list.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock<T> {
    /// One value for every block.
    One(T),
    /// One value per block.
    Many(Vec<T>),
}

impl<T: Clone + std::fmt::Debug> PerBlock<T> {
    /// Expands to exactly `n` values, failing if a list has another length.
    pub fn expand(&self, n: usize, file: &str, field: &str) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Many(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Many(v) => Err(Error::unsupported(
                file,
                field,
                format!("{v:?}"),
                format!("expected one value or a list of {n} (one per block)"),
            )),
        }
    }
}

/// Reads and parses a JSON config file, naming it in any error.
pub fn read_json<T: DeserializeOwned>(path: &Path, display_name: &str) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
        file: display_name.to_string(),
        reason: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        file: display_name.to_string(),
        reason: e.to_string(),
    })
}

/// Fails with [`Error::Unsupported`] unless `ok`.
pub(crate) fn require(
    ok: bool,
    file: &str,
    field: &str,
    value: impl std::fmt::Debug,
    hint: &str,
) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::unsupported(file, field, format!("{value:?}"), hint))
    }
}

/// `model_index.json`: which class implements each component.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelIndex {
    /// The pipeline class, e.g. `StableDiffusionPipeline`.
    #[serde(rename = "_class_name")]
    pub class_name: String,
    /// `[library, class]` of the text encoder.
    #[serde(default)]
    pub text_encoder: Option<(Option<String>, Option<String>)>,
    /// `[library, class]` of the UNet.
    #[serde(default)]
    pub unet: Option<(Option<String>, Option<String>)>,
    /// `[library, class]` of the VAE.
    #[serde(default)]
    pub vae: Option<(Option<String>, Option<String>)>,
    /// `[library, class]` of the scheduler.
    #[serde(default)]
    pub scheduler: Option<(Option<String>, Option<String>)>,
    /// `[library, class]` of the tokenizer.
    #[serde(default)]
    pub tokenizer: Option<(Option<String>, Option<String>)>,
    /// `[library, class]` of SDXL's second text encoder.
    #[serde(default)]
    pub text_encoder_2: Option<(Option<String>, Option<String>)>,
    /// `[library, class]` of SDXL's second tokenizer.
    #[serde(default)]
    pub tokenizer_2: Option<(Option<String>, Option<String>)>,
    /// SDXL: an absent negative prompt gives all-zero negative embeddings (diffusers' default).
    #[serde(default = "yes")]
    pub force_zeros_for_empty_prompt: bool,
    /// SDXL refiner: the UNet is conditioned on an aesthetic score (not supported).
    #[serde(default)]
    pub requires_aesthetics_score: bool,
}

fn yes() -> bool {
    true
}

/// Which family of diffusers pipeline a checkpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipelineKind {
    /// `StableDiffusionPipeline` (SD 1.x/2.x, SD-Turbo): one CLIP text encoder.
    StableDiffusion,
    /// `StableDiffusionXLPipeline` (SDXL, SDXL-Turbo): two text encoders and text/time
    /// conditioning.
    StableDiffusionXl,
}

impl ModelIndex {
    /// Checks that this is a pipeline family the engine runs, and says which.
    pub fn validate(&self) -> Result<PipelineKind> {
        const F: &str = "model_index.json";
        let kind = match self.class_name.as_str() {
            "StableDiffusionPipeline"
            | "StableDiffusionImg2ImgPipeline"
            | "StableDiffusionInpaintPipeline" => PipelineKind::StableDiffusion,
            "StableDiffusionXLPipeline"
            | "StableDiffusionXLImg2ImgPipeline"
            | "StableDiffusionXLInpaintPipeline" => PipelineKind::StableDiffusionXl,
            other => {
                return Err(Error::unsupported(
                    F,
                    "_class_name",
                    format!("{other:?}"),
                    "this engine runs StableDiffusionPipeline (SD 1.x/2.x, SD-Turbo) and \
                     StableDiffusionXLPipeline (SDXL, SDXL-Turbo) checkpoints",
                ))
            }
        };
        let class = |c: &Option<(Option<String>, Option<String>)>| {
            c.as_ref().and_then(|(_, class)| class.clone())
        };
        if let Some(c) = class(&self.text_encoder) {
            require(
                c == "CLIPTextModel",
                F,
                "text_encoder",
                &c,
                "only CLIPTextModel text encoders are supported",
            )?;
        }
        if kind == PipelineKind::StableDiffusionXl {
            let c2 = class(&self.text_encoder_2);
            require(
                c2.as_deref() == Some("CLIPTextModelWithProjection"),
                F,
                "text_encoder_2",
                &c2,
                "SDXL pipelines need a CLIPTextModelWithProjection as text_encoder_2 \
                 (refiner-only checkpoints are not supported)",
            )?;
            require(
                class(&self.text_encoder).is_some(),
                F,
                "text_encoder",
                "null",
                "SDXL pipelines without the first text encoder (refiners) are not supported",
            )?;
            require(
                !self.requires_aesthetics_score,
                F,
                "requires_aesthetics_score",
                true,
                "aesthetic-score conditioning (the SDXL refiner) is not supported",
            )?;
        }
        Ok(kind)
    }
}

/// `text_encoder/config.json` of a transformers `CLIPTextModel`.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Maximum sequence length (77 for every SD checkpoint).
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// `quick_gelu` (SD 1.x) or `gelu` (SD 2.x).
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// LayerNorm epsilon.
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    /// Width of `text_projection` (CLIPTextModelWithProjection).
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// End-of-text token id. transformers pools at `argmax(input_ids)` when this is the stale
    /// value 2 that SD checkpoints carry, else at the first occurrence of this id.
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
}

fn default_eos() -> u32 {
    49407
}

fn default_max_positions() -> usize {
    77
}
fn default_hidden_act() -> String {
    "quick_gelu".into()
}
fn default_ln_eps() -> f64 {
    1e-5
}

impl ClipTextConfig {
    /// Rejects values this implementation does not compute; `file` names the config in errors.
    pub fn validate(&self, file: &str) -> Result<()> {
        require(
            matches!(self.hidden_act.as_str(), "quick_gelu" | "gelu"),
            file,
            "hidden_act",
            &self.hidden_act,
            "supported: quick_gelu, gelu",
        )?;
        require(
            self.num_attention_heads > 0
                && self.hidden_size.is_multiple_of(self.num_attention_heads),
            file,
            "num_attention_heads",
            self.num_attention_heads,
            "hidden_size must be divisible by num_attention_heads",
        )?;
        require(
            self.projection_dim.is_none_or(|d| d > 0),
            file,
            "projection_dim",
            self.projection_dim,
            "must be positive",
        )
    }
}
