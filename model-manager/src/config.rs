//! Diffusers/transformers config files, parsed and validated.
//!
//! Each struct mirrors one JSON file of a diffusers pipeline. Fields keep diffusers' names and
//! defaults; anything this engine does not implement is rejected by `validate` with an error
//! naming the file, the field and the value, instead of being silently ignored.

use crate::error::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::path::Path;

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
}

impl ModelIndex {
    /// Checks that this is a pipeline family the engine runs.
    pub fn validate(&self) -> Result<()> {
        const SUPPORTED: [&str; 3] = [
            "StableDiffusionPipeline",
            "StableDiffusionImg2ImgPipeline",
            "StableDiffusionInpaintPipeline",
        ];
        require(
            SUPPORTED.contains(&self.class_name.as_str()),
            "model_index.json",
            "_class_name",
            &self.class_name,
            "this engine runs Stable Diffusion 1.x/2.x pipelines (StableDiffusionPipeline)",
        )?;
        if let Some((_, Some(class))) = &self.text_encoder {
            require(
                class == "CLIPTextModel",
                "model_index.json",
                "text_encoder",
                class,
                "only CLIPTextModel text encoders are supported",
            )?;
        }
        Ok(())
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
    /// Rejects values this implementation does not compute.
    pub fn validate(&self) -> Result<()> {
        const FILE: &str = "text_encoder/config.json";
        require(
            matches!(self.hidden_act.as_str(), "quick_gelu" | "gelu"),
            FILE,
            "hidden_act",
            &self.hidden_act,
            "supported: quick_gelu, gelu",
        )?;
        require(
            self.num_attention_heads > 0
                && self.hidden_size.is_multiple_of(self.num_attention_heads),
            FILE,
            "num_attention_heads",
            self.num_attention_heads,
            "hidden_size must be divisible by num_attention_heads",
        )
    }
}

/// `unet/config.json` of a diffusers `UNet2DConditionModel`.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    /// Default latent size (image size / VAE scale factor).
    #[serde(default)]
    pub sample_size: Option<usize>,
    /// Latent channels in.
    #[serde(default = "four")]
    pub in_channels: usize,
    /// Latent channels out.
    #[serde(default = "four")]
    pub out_channels: usize,
    /// Whether to map the input from [0,1] to [-1,1].
    #[serde(default)]
    pub center_input_sample: bool,
    /// Order of the sinusoidal timestep embedding halves.
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the timestep embedding.
    #[serde(default)]
    pub freq_shift: f64,
    /// Down block class names.
    pub down_block_types: Vec<String>,
    /// Mid block class name (`null` = no mid block).
    #[serde(default = "default_mid_block")]
    pub mid_block_type: Option<String>,
    /// Up block class names.
    pub up_block_types: Vec<String>,
    /// Cross-attention only (no self-attention) per block.
    #[serde(default)]
    pub only_cross_attention: Option<PerBlock<bool>>,
    /// Output channels of each block.
    pub block_out_channels: Vec<usize>,
    /// ResNet layers per down block (up blocks use one more).
    #[serde(default = "two_per_block")]
    pub layers_per_block: PerBlock<usize>,
    /// Padding of the strided downsampling convolution.
    #[serde(default = "one")]
    pub downsample_padding: usize,
    /// Output scale of the mid block's resnets.
    #[serde(default = "one_f")]
    pub mid_block_scale_factor: f64,
    /// Activation (only `silu`).
    #[serde(default = "silu")]
    pub act_fn: String,
    /// GroupNorm groups.
    #[serde(default = "default_groups")]
    pub norm_num_groups: Option<usize>,
    /// GroupNorm/ResNet epsilon.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Width of the text embeddings attended to.
    pub cross_attention_dim: PerBlock<usize>,
    /// Transformer depth per block.
    #[serde(default = "one_per_block")]
    pub transformer_layers_per_block: PerBlock<usize>,
    /// Up-block transformer depths when they differ from the reversed down ones.
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    /// Historically misnamed: the number of heads per block when `num_attention_heads` is unset.
    #[serde(default = "eight_per_block")]
    pub attention_head_dim: PerBlock<usize>,
    /// Heads per block.
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    /// Linear (instead of 1×1 conv) projections in and out of each transformer.
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Upcast attention to f32 (SD 2.1); attention always runs in f32 here.
    #[serde(default)]
    pub upcast_attention: bool,
    /// Dual cross attention (unsupported).
    #[serde(default)]
    pub dual_cross_attention: bool,
    /// Class embedding type (unsupported unless null).
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// Additional embedding type (`text_time` is SDXL; unsupported here).
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Encoder hidden projection (unsupported unless null).
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    /// Time embedding kind (only `positional`).
    #[serde(default = "positional")]
    pub time_embedding_type: String,
    /// Width of the time embedding (default 4 × first block width).
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    /// Activation after the time embedding (unsupported unless null).
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    /// Activation after the time embedding MLP (unsupported unless null).
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    /// LCM guidance conditioning (unsupported unless null).
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    /// ResNet time conditioning (only `default`).
    #[serde(default = "default_str")]
    pub resnet_time_scale_shift: String,
    /// ResNet output scale in down/up blocks.
    #[serde(default = "one_f")]
    pub resnet_out_scale_factor: f64,
    /// Skip activation before the time projection (unsupported if true).
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    /// Input conv kernel (only 3).
    #[serde(default = "three")]
    pub conv_in_kernel: usize,
    /// Output conv kernel (only 3).
    #[serde(default = "three")]
    pub conv_out_kernel: usize,
    /// Attention type (only `default`).
    #[serde(default = "default_str")]
    pub attention_type: String,
    /// Cross-attention norm (unsupported unless null).
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    /// Mid block cross-attention only (unsupported if true).
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
}

fn four() -> usize {
    4
}
fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn one_f() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn silu() -> String {
    "silu".into()
}
fn positional() -> String {
    "positional".into()
}
fn default_str() -> String {
    "default".into()
}
fn default_groups() -> Option<usize> {
    Some(32)
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn two_per_block() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn one_per_block() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn eight_per_block() -> PerBlock<usize> {
    PerBlock::One(8)
}

/// Kind of a UNet block as named by diffusers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// `DownBlock2D` / `UpBlock2D`: resnets only.
    Plain,
    /// `CrossAttnDownBlock2D` / `CrossAttnUpBlock2D`: resnets with transformers.
    CrossAttn,
}

/// Everything one UNet down (or up) block needs, resolved from the config.
#[derive(Debug, Clone)]
pub struct UNetBlockSpec {
    /// Plain or cross-attention block.
    pub kind: BlockKind,
    /// Output channels.
    pub out_channels: usize,
    /// Number of resnets (down: layers_per_block, up: layers_per_block + 1).
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Transformer depth per attention.
    pub transformer_depth: usize,
    /// Width of the text context.
    pub cross_attention_dim: usize,
}

/// A UNet config with every per-block list expanded and checked.
#[derive(Debug, Clone)]
pub struct UNetPlan {
    /// Down blocks in order.
    pub down: Vec<UNetBlockSpec>,
    /// Up blocks in order (the deepest first).
    pub up: Vec<UNetBlockSpec>,
    /// Mid block: `Some((num_heads, transformer_depth, cross_attention_dim))` or none.
    pub mid: Option<(usize, usize, usize)>,
    /// Time embedding width.
    pub time_embed_dim: usize,
    /// GroupNorm groups.
    pub groups: usize,
}

impl UNetConfig {
    /// Validates the config and expands it into a per-block plan.
    pub fn plan(&self) -> Result<UNetPlan> {
        const F: &str = "unet/config.json";
        let n = self.block_out_channels.len();
        require(
            n > 0,
            F,
            "block_out_channels",
            &self.block_out_channels,
            "needs at least one block",
        )?;
        require(
            self.down_block_types.len() == n,
            F,
            "down_block_types",
            &self.down_block_types,
            "one per block_out_channels entry",
        )?;
        require(
            self.up_block_types.len() == n,
            F,
            "up_block_types",
            &self.up_block_types,
            "one per block_out_channels entry",
        )?;
        require(
            self.act_fn == "silu",
            F,
            "act_fn",
            &self.act_fn,
            "only silu",
        )?;
        require(
            !self.dual_cross_attention,
            F,
            "dual_cross_attention",
            true,
            "not supported",
        )?;
        require(
            self.class_embed_type.is_none(),
            F,
            "class_embed_type",
            &self.class_embed_type,
            "class-conditioned UNets are not supported",
        )?;
        require(
            self.addition_embed_type.is_none(),
            F,
            "addition_embed_type",
            &self.addition_embed_type,
            "added text/time conditioning (SDXL) is not supported by this engine yet",
        )?;
        require(
            self.encoder_hid_dim.is_none(),
            F,
            "encoder_hid_dim",
            self.encoder_hid_dim,
            "not supported",
        )?;
        require(
            self.time_embedding_type == "positional",
            F,
            "time_embedding_type",
            &self.time_embedding_type,
            "only positional",
        )?;
        require(
            self.time_embedding_act_fn.is_none(),
            F,
            "time_embedding_act_fn",
            &self.time_embedding_act_fn,
            "not supported",
        )?;
        require(
            self.timestep_post_act.is_none(),
            F,
            "timestep_post_act",
            &self.timestep_post_act,
            "not supported",
        )?;
        require(
            self.time_cond_proj_dim.is_none(),
            F,
            "time_cond_proj_dim",
            self.time_cond_proj_dim,
            "guidance-embedding (LCM) UNets are not supported",
        )?;
        require(
            self.resnet_time_scale_shift == "default",
            F,
            "resnet_time_scale_shift",
            &self.resnet_time_scale_shift,
            "only default",
        )?;
        require(
            !self.resnet_skip_time_act,
            F,
            "resnet_skip_time_act",
            true,
            "not supported",
        )?;
        require(
            self.conv_in_kernel == 3,
            F,
            "conv_in_kernel",
            self.conv_in_kernel,
            "only 3",
        )?;
        require(
            self.conv_out_kernel == 3,
            F,
            "conv_out_kernel",
            self.conv_out_kernel,
            "only 3",
        )?;
        require(
            self.attention_type == "default",
            F,
            "attention_type",
            &self.attention_type,
            "only default",
        )?;
        require(
            self.cross_attention_norm.is_none(),
            F,
            "cross_attention_norm",
            &self.cross_attention_norm,
            "not supported",
        )?;
        require(
            self.mid_block_only_cross_attention != Some(true),
            F,
            "mid_block_only_cross_attention",
            true,
            "not supported",
        )?;
        require(
            self.reverse_transformer_layers_per_block
                .as_ref()
                .is_none_or(|v| v.is_null()),
            F,
            "reverse_transformer_layers_per_block",
            &self.reverse_transformer_layers_per_block,
            "not supported",
        )?;
        if let Some(only) = &self.only_cross_attention {
            let only = only.expand(n, F, "only_cross_attention")?;
            require(
                only.iter().all(|o| !o),
                F,
                "only_cross_attention",
                &only,
                "not supported",
            )?;
        }
        let groups = self.norm_num_groups.ok_or_else(|| {
            Error::unsupported(
                F,
                "norm_num_groups",
                "null",
                "GroupNorm-free UNets are not supported",
            )
        })?;
        for (i, c) in self.block_out_channels.iter().enumerate() {
            require(
                c % groups == 0,
                F,
                "block_out_channels",
                &self.block_out_channels,
                &format!("block {i} is not divisible by norm_num_groups = {groups}"),
            )?;
        }
        let layers = self.layers_per_block.expand(n, F, "layers_per_block")?;
        let depth =
            self.transformer_layers_per_block
                .expand(n, F, "transformer_layers_per_block")?;
        let cross = self
            .cross_attention_dim
            .expand(n, F, "cross_attention_dim")?;
        let heads = match &self.num_attention_heads {
            Some(h) => h.expand(n, F, "num_attention_heads")?,
            None => self.attention_head_dim.expand(n, F, "attention_head_dim")?,
        };
        let kind_of = |name: &str, down: bool| -> Result<BlockKind> {
            let (plain, attn) = if down {
                ("DownBlock2D", "CrossAttnDownBlock2D")
            } else {
                ("UpBlock2D", "CrossAttnUpBlock2D")
            };
            if name == plain {
                Ok(BlockKind::Plain)
            } else if name == attn {
                Ok(BlockKind::CrossAttn)
            } else {
                Err(Error::unsupported(
                    F,
                    if down {
                        "down_block_types"
                    } else {
                        "up_block_types"
                    },
                    name,
                    format!("supported: {plain}, {attn}"),
                ))
            }
        };
        let spec = |i: usize, kind: BlockKind, num_layers: usize| -> Result<UNetBlockSpec> {
            let out_channels = self.block_out_channels[i];
            if kind == BlockKind::CrossAttn {
                require(
                    heads[i] > 0 && out_channels.is_multiple_of(heads[i]),
                    F,
                    "attention_head_dim",
                    &heads,
                    &format!(
                        "block {i}: {out_channels} channels are not divisible by {} heads",
                        heads[i]
                    ),
                )?;
            }
            Ok(UNetBlockSpec {
                kind,
                out_channels,
                num_layers,
                num_heads: heads[i],
                transformer_depth: depth[i],
                cross_attention_dim: cross[i],
            })
        };
        let down = (0..n)
            .map(|i| spec(i, kind_of(&self.down_block_types[i], true)?, layers[i]))
            .collect::<Result<Vec<_>>>()?;
        let up = (0..n)
            .map(|i| {
                let r = n - 1 - i;
                spec(r, kind_of(&self.up_block_types[i], false)?, layers[r] + 1)
            })
            .collect::<Result<Vec<_>>>()?;
        let mid = match self.mid_block_type.as_deref() {
            None => None,
            Some("UNetMidBlock2DCrossAttn") => {
                let last = n - 1;
                require(
                    heads[last] > 0 && self.block_out_channels[last].is_multiple_of(heads[last]),
                    F,
                    "attention_head_dim",
                    &heads,
                    "mid block channels are not divisible by its heads",
                )?;
                Some((heads[last], depth[last], cross[last]))
            }
            Some(other) => {
                return Err(Error::unsupported(
                    F,
                    "mid_block_type",
                    other,
                    "supported: UNetMidBlock2DCrossAttn or null",
                ))
            }
        };
        Ok(UNetPlan {
            down,
            up,
            mid,
            time_embed_dim: self
                .time_embedding_dim
                .unwrap_or(self.block_out_channels[0] * 4),
            groups,
        })
    }
}

/// `vae/config.json` of a diffusers `AutoencoderKL`.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    /// Image channels in.
    #[serde(default = "three")]
    pub in_channels: usize,
    /// Image channels out.
    #[serde(default = "three")]
    pub out_channels: usize,
    /// Encoder block class names.
    #[serde(default)]
    pub down_block_types: Vec<String>,
    /// Decoder block class names.
    #[serde(default)]
    pub up_block_types: Vec<String>,
    /// Channels of each block.
    pub block_out_channels: Vec<usize>,
    /// ResNets per encoder block (decoder: one more).
    #[serde(default = "one")]
    pub layers_per_block: usize,
    /// Activation (only `silu`).
    #[serde(default = "silu")]
    pub act_fn: String,
    /// Latent channels.
    #[serde(default = "four")]
    pub latent_channels: usize,
    /// GroupNorm groups.
    #[serde(default = "default_groups_usize")]
    pub norm_num_groups: usize,
    /// Image size the model was trained at.
    #[serde(default)]
    pub sample_size: Option<usize>,
    /// Latents are divided by this before decoding.
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    /// Latents are shifted by this before decoding (SD3/Flux; must be null here).
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Decode in f32 on half-precision devices.
    #[serde(default = "yes")]
    pub force_upcast: bool,
    /// 1×1 conv after the encoder.
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    /// 1×1 conv before the decoder.
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    /// Attention in the mid blocks.
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
}

fn default_groups_usize() -> usize {
    32
}
fn default_scaling() -> f64 {
    0.18215
}

impl VaeConfig {
    /// Rejects values this implementation does not compute.
    pub fn validate(&self) -> Result<()> {
        const F: &str = "vae/config.json";
        let n = self.block_out_channels.len();
        require(
            n > 0,
            F,
            "block_out_channels",
            &self.block_out_channels,
            "needs at least one block",
        )?;
        require(
            self.act_fn == "silu",
            F,
            "act_fn",
            &self.act_fn,
            "only silu",
        )?;
        require(
            self.shift_factor.is_none(),
            F,
            "shift_factor",
            self.shift_factor,
            "latent shift is not used by SD 1.x/2.x VAEs",
        )?;
        for t in &self.down_block_types {
            require(
                t == "DownEncoderBlock2D",
                F,
                "down_block_types",
                t,
                "only DownEncoderBlock2D",
            )?;
        }
        for t in &self.up_block_types {
            require(
                t == "UpDecoderBlock2D",
                F,
                "up_block_types",
                t,
                "only UpDecoderBlock2D",
            )?;
        }
        require(
            self.down_block_types.is_empty() || self.down_block_types.len() == n,
            F,
            "down_block_types",
            &self.down_block_types,
            "one per block_out_channels entry",
        )?;
        require(
            self.up_block_types.is_empty() || self.up_block_types.len() == n,
            F,
            "up_block_types",
            &self.up_block_types,
            "one per block_out_channels entry",
        )?;
        for c in &self.block_out_channels {
            require(
                c % self.norm_num_groups == 0,
                F,
                "norm_num_groups",
                self.norm_num_groups,
                "must divide every block_out_channels entry",
            )?;
        }
        Ok(())
    }

    /// Pixels per latent along each axis: 2^(blocks − 1).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}
