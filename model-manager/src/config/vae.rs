//! `vae/config.json`: the AutoencoderKL config.

use super::require;
use super::unet::{four, one, silu, three, yes};
use crate::error::Result;
use serde::Deserialize;

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
    /// Per-channel latent mean (Playground v2.5-style VAEs; must be null here).
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    /// Per-channel latent std (must be null here).
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
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
            self.latents_mean.is_none() && self.latents_std.is_none(),
            F,
            "latents_mean",
            &self.latents_mean,
            "per-channel latent normalisation is not supported",
        )?;
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
