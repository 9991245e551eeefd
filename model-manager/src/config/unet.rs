//! `unet/config.json`: the UNet config and its expansion into a per-block plan.

use super::{require, PerBlock};
use crate::error::{Error, Result};
use serde::Deserialize;

/// `unet/config.json` of a diffusers `UNet2DConditionModel`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
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
    /// Additional embedding type: `null`, or SDXL's `text_time` (pooled text + size/crop ids).
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Width of the sinusoidal embedding of each `text_time` id.
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Input width of `add_embedding` (pooled text width + 6 × `addition_time_embed_dim`).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
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

pub(super) fn four() -> usize {
    4
}
pub(super) fn three() -> usize {
    3
}
pub(super) fn one() -> usize {
    1
}
pub(super) fn one_f() -> f64 {
    1.0
}
pub(super) fn yes() -> bool {
    true
}
pub(super) fn silu() -> String {
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

/// SDXL's `text_time` added conditioning, resolved from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddedConditioningSpec {
    /// Sinusoidal embedding width of each of the time ids.
    pub time_embed_dim: usize,
    /// Input width of `add_embedding.linear_1`.
    pub in_dim: usize,
}

impl AddedConditioningSpec {
    /// Width of the pooled text embedding the UNet expects with `n_time_ids` ids.
    pub fn text_embeds_dim(&self, n_time_ids: usize) -> Option<usize> {
        self.in_dim.checked_sub(n_time_ids * self.time_embed_dim)
    }
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
    /// SDXL's `text_time` conditioning, if the UNet has it.
    pub added: Option<AddedConditioningSpec>,
}

impl UNetConfig {
    /// Validates the config and expands it into a per-block plan.
    pub fn plan(&self) -> Result<UNetPlan> {
        self.plan_in("unet/config.json")
    }

    /// [`UNetConfig::plan`], errors naming `file` (a ControlNet's encoder is read with this
    /// parser too).
    pub(crate) fn plan_in(&self, file: &str) -> Result<UNetPlan> {
        let n = self.block_out_channels.len();
        require(
            n > 0,
            file,
            "block_out_channels",
            &self.block_out_channels,
            "needs at least one block",
        )?;
        require(
            self.down_block_types.len() == n,
            file,
            "down_block_types",
            &self.down_block_types,
            "one per block_out_channels entry",
        )?;
        require(
            self.up_block_types.len() == n,
            file,
            "up_block_types",
            &self.up_block_types,
            "one per block_out_channels entry",
        )?;
        require(
            self.act_fn == "silu",
            file,
            "act_fn",
            &self.act_fn,
            "only silu",
        )?;
        require(
            !self.dual_cross_attention,
            file,
            "dual_cross_attention",
            true,
            "not supported",
        )?;
        require(
            self.class_embed_type.is_none(),
            file,
            "class_embed_type",
            &self.class_embed_type,
            "class-conditioned UNets are not supported",
        )?;
        let added = match self.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let time_embed_dim = self.addition_time_embed_dim.ok_or_else(|| {
                    Error::unsupported(
                        file,
                        "addition_time_embed_dim",
                        "null",
                        "addition_embed_type \"text_time\" needs it",
                    )
                })?;
                let in_dim = self.projection_class_embeddings_input_dim.ok_or_else(|| {
                    Error::unsupported(
                        file,
                        "projection_class_embeddings_input_dim",
                        "null",
                        "addition_embed_type \"text_time\" needs it",
                    )
                })?;
                require(
                    time_embed_dim > 0 && in_dim > 6 * time_embed_dim,
                    file,
                    "projection_class_embeddings_input_dim",
                    in_dim,
                    &format!("must exceed 6 × addition_time_embed_dim ({time_embed_dim})"),
                )?;
                Some(AddedConditioningSpec {
                    time_embed_dim,
                    in_dim,
                })
            }
            Some(other) => {
                return Err(Error::unsupported(
                    file,
                    "addition_embed_type",
                    format!("{other:?}"),
                    "supported: null, \"text_time\" (SDXL)",
                ))
            }
        };
        require(
            self.encoder_hid_dim.is_none(),
            file,
            "encoder_hid_dim",
            self.encoder_hid_dim,
            "not supported",
        )?;
        require(
            self.time_embedding_type == "positional",
            file,
            "time_embedding_type",
            &self.time_embedding_type,
            "only positional",
        )?;
        require(
            self.time_embedding_act_fn.is_none(),
            file,
            "time_embedding_act_fn",
            &self.time_embedding_act_fn,
            "not supported",
        )?;
        require(
            self.timestep_post_act.is_none(),
            file,
            "timestep_post_act",
            &self.timestep_post_act,
            "not supported",
        )?;
        require(
            self.time_cond_proj_dim.is_none(),
            file,
            "time_cond_proj_dim",
            self.time_cond_proj_dim,
            "guidance-embedding (LCM) UNets are not supported",
        )?;
        require(
            self.resnet_time_scale_shift == "default",
            file,
            "resnet_time_scale_shift",
            &self.resnet_time_scale_shift,
            "only default",
        )?;
        require(
            !self.resnet_skip_time_act,
            file,
            "resnet_skip_time_act",
            true,
            "not supported",
        )?;
        require(
            self.conv_in_kernel == 3,
            file,
            "conv_in_kernel",
            self.conv_in_kernel,
            "only 3",
        )?;
        require(
            self.conv_out_kernel == 3,
            file,
            "conv_out_kernel",
            self.conv_out_kernel,
            "only 3",
        )?;
        require(
            self.attention_type == "default",
            file,
            "attention_type",
            &self.attention_type,
            "only default",
        )?;
        require(
            self.cross_attention_norm.is_none(),
            file,
            "cross_attention_norm",
            &self.cross_attention_norm,
            "not supported",
        )?;
        require(
            self.mid_block_only_cross_attention != Some(true),
            file,
            "mid_block_only_cross_attention",
            true,
            "not supported",
        )?;
        require(
            self.reverse_transformer_layers_per_block
                .as_ref()
                .is_none_or(|v| v.is_null()),
            file,
            "reverse_transformer_layers_per_block",
            &self.reverse_transformer_layers_per_block,
            "not supported",
        )?;
        if let Some(only) = &self.only_cross_attention {
            let only = only.expand(n, file, "only_cross_attention")?;
            require(
                only.iter().all(|o| !o),
                file,
                "only_cross_attention",
                &only,
                "not supported",
            )?;
        }
        let groups = self.norm_num_groups.ok_or_else(|| {
            Error::unsupported(
                file,
                "norm_num_groups",
                "null",
                "GroupNorm-free UNets are not supported",
            )
        })?;
        for (i, c) in self.block_out_channels.iter().enumerate() {
            require(
                c % groups == 0,
                file,
                "block_out_channels",
                &self.block_out_channels,
                &format!("block {i} is not divisible by norm_num_groups = {groups}"),
            )?;
        }
        let layers = self.layers_per_block.expand(n, file, "layers_per_block")?;
        let depth =
            self.transformer_layers_per_block
                .expand(n, file, "transformer_layers_per_block")?;
        let cross = self
            .cross_attention_dim
            .expand(n, file, "cross_attention_dim")?;
        let heads = match &self.num_attention_heads {
            Some(h) => h.expand(n, file, "num_attention_heads")?,
            None => self
                .attention_head_dim
                .expand(n, file, "attention_head_dim")?,
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
                    file,
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
                    file,
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
                    file,
                    "attention_head_dim",
                    &heads,
                    "mid block channels are not divisible by its heads",
                )?;
                Some((heads[last], depth[last], cross[last]))
            }
            Some(other) => {
                return Err(Error::unsupported(
                    file,
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
            added,
        })
    }
}
