//! diffusers `UNet2DConditionModel`, built from `unet/config.json` (see [`UNetConfig::plan`]).
//! Its encoder half ([`encoder`]) is shared with the ControlNet; ControlNet residuals
//! ([`ControlResiduals`]) enter through [`UNet2DConditionModel::forward_with_residuals`].

mod encoder;
mod residuals;
mod transformer;

use crate::config::{AddedConditioningSpec, UNetConfig, UNetPlan};
use crate::layers::{conv2d, group_norm, Conv2d, GroupNorm, ResnetBlock2D, Upsample2D};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
pub use encoder::AddedConditioning;
use encoder::BlockCommon;
pub(crate) use encoder::Encoder;
pub use residuals::ControlResiduals;
use transformer::Transformer2D;

/// `UpBlock2D` or `CrossAttnUpBlock2D`.
#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            let skip = skips
                .pop()
                .ok_or_else(|| candle_core::Error::Msg("UNet skip connections exhausted".into()))?;
            // The popped skip goes with the concatenation (before the resnet runs).
            xs = Tensor::cat(&[&xs, &skip], 1)?;
            drop(skip);
            xs = resnet.forward(xs, Some(temb))?;
            if let Some(attn) = self.attentions.get(j) {
                xs = attn.forward(&xs, context)?;
            }
        }
        match &self.upsampler {
            Some(up) => up.forward(xs, upsample_size),
            None => Ok(xs),
        }
    }
}

/// The denoising UNet.
#[derive(Debug)]
pub struct UNet2DConditionModel {
    encoder: Encoder,
    up: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    config: UNetConfig,
}

impl UNet2DConditionModel {
    /// Builds the UNet described by `config` from the weights in `vb`.
    pub fn new(config: &UNetConfig, vb: VarBuilder) -> crate::Result<Self> {
        let plan: UNetPlan = config.plan()?;
        let first = config.block_out_channels[0];
        Ok(Self {
            encoder: Encoder::new(config, &plan, &vb)?,
            up: Self::up_blocks(config, &plan, &vb)?,
            conv_norm_out: group_norm(plan.groups, first, config.norm_eps, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(first, config.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
            config: config.clone(),
        })
    }

    fn up_blocks(config: &UNetConfig, plan: &UNetPlan, vb: &VarBuilder) -> Result<Vec<UpBlock>> {
        let common = BlockCommon::of(config, plan);
        let ch = &config.block_out_channels;
        let n = ch.len();
        let mut up = Vec::with_capacity(n);
        let mut out_channels = ch[n - 1];
        for (i, spec) in plan.up.iter().enumerate() {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let prev_out = out_channels;
            out_channels = spec.out_channels;
            // diffusers: input_channel = reversed_block_out_channels[min(i + 1, n - 1)]
            let skip_in = ch[n - 1 - (i + 1).min(n - 1)];
            let resnets = (0..spec.num_layers)
                .map(|j| {
                    let skip = if j + 1 == spec.num_layers {
                        skip_in
                    } else {
                        out_channels
                    };
                    let input = if j == 0 { prev_out } else { out_channels };
                    common.resnet(input + skip, out_channels, vb.pp(format!("resnets.{j}")))
                })
                .collect::<Result<Vec<_>>>()?;
            let upsampler = if i + 1 < n {
                Some(Upsample2D::new(out_channels, vb.pp("upsamplers.0"))?)
            } else {
                None
            };
            up.push(UpBlock {
                resnets,
                attentions: common.attentions(spec, vb.clone())?,
                upsampler,
            });
        }
        Ok(up)
    }

    /// The config this UNet was built from.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The `text_time` conditioning this UNet needs, if any.
    pub fn added_conditioning(&self) -> Option<AddedConditioningSpec> {
        self.encoder.added_conditioning()
    }

    /// Number of skip connections, i.e. of the down residuals a ControlNet must supply.
    pub fn skip_count(&self) -> usize {
        self.encoder.skip_count()
    }

    /// Predicts noise (or v) for `sample` `[B, C, h, w]` at `timesteps` `[B]` (f32, fractional
    /// allowed) given the text embeddings `context` `[B, L, D]`. For UNets without added
    /// conditioning; see [`UNet2DConditionModel::forward_with`].
    pub fn forward(&self, sample: &Tensor, timesteps: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.forward_with_residuals(sample, timesteps, context, None, None)
    }

    /// [`UNet2DConditionModel::forward`] with SDXL's added conditioning, which a `text_time`
    /// UNet requires.
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<&AddedConditioning>,
    ) -> Result<Tensor> {
        self.forward_with_residuals(sample, timesteps, context, added, None)
    }

    /// [`UNet2DConditionModel::forward_with`] steered by ControlNet `residuals` (diffusers'
    /// `down_block_additional_residuals` and `mid_block_additional_residual`): `down[i]` is
    /// added to skip connection `i`, `mid` to the mid block's output. The residuals must be in
    /// the sample's dtype, one per skip connection ([`UNet2DConditionModel::skip_count`]),
    /// each of its skip's shape (or `[B, C, 1, 1]`, broadcast over space).
    pub fn forward_with_residuals(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<&AddedConditioning>,
        residuals: Option<&ControlResiduals>,
    ) -> Result<Tensor> {
        let (_, _, h, w) = sample.dims4()?;
        let up_factor = 1usize << (self.up.len() - 1);
        let forward_upsample_size = h % up_factor != 0 || w % up_factor != 0;

        let sample = if self.config.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        let temb = self.encoder.embed_time(timesteps, added, sample.dtype())?;
        let (mut xs, mut skips) = self.encoder.forward(&sample, &temb, context, None)?;
        if let Some(r) = residuals {
            xs = r.add_to(xs, &mut skips)?;
        }
        let n = self.up.len();
        for (i, block) in self.up.iter().enumerate() {
            let remaining = skips.len() - block.resnets.len();
            let upsample_size = if i + 1 < n && forward_upsample_size {
                let (_, _, sh, sw) = skips[remaining - 1].dims4()?;
                Some((sh, sw))
            } else {
                None
            };
            xs = block.forward(&xs, &temb, context, &mut skips, upsample_size)?;
        }
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}
