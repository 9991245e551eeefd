//! The encoder half of a diffusers UNet — conv_in, the time embedding (plus SDXL's added
//! embedding), the down blocks and the mid block — shared by [`super::UNet2DConditionModel`]
//! and [`crate::controlnet::ControlNetModel`], whose weights use the same names.

use super::transformer::{Transformer2D, Transformer2DConfig};
use crate::config::{AddedConditioningSpec, BlockKind, UNetBlockSpec, UNetConfig, UNetPlan};
use crate::layers::{
    self, conv2d, timestep_embedding, Conv2d, ConvAddend, Downsample2D, Linear, ResnetBlock2D,
    ResnetConfig,
};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// Shared numerics of every block of one UNet.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockCommon {
    temb: usize,
    groups: usize,
    eps: f64,
    resnet_scale: f64,
    linear_projection: bool,
    upcast_attention: bool,
}

impl BlockCommon {
    /// The numerics of the blocks of the UNet `config` describes.
    pub(crate) fn of(config: &UNetConfig, plan: &UNetPlan) -> Self {
        Self {
            temb: plan.time_embed_dim,
            groups: plan.groups,
            eps: config.norm_eps,
            resnet_scale: config.resnet_out_scale_factor,
            linear_projection: config.use_linear_projection,
            upcast_attention: config.upcast_attention,
        }
    }

    pub(crate) fn resnet(
        &self,
        in_channels: usize,
        out_channels: usize,
        vb: VarBuilder,
    ) -> Result<ResnetBlock2D> {
        ResnetBlock2D::new(
            ResnetConfig {
                in_channels,
                out_channels,
                temb_channels: Some(self.temb),
                groups: self.groups,
                eps: self.eps,
                output_scale_factor: self.resnet_scale,
            },
            vb,
        )
    }

    fn transformer(
        &self,
        channels: usize,
        heads: usize,
        depth: usize,
        context_dim: usize,
        vb: VarBuilder,
    ) -> Result<Transformer2D> {
        Transformer2D::new(
            Transformer2DConfig {
                channels,
                heads,
                depth,
                context_dim,
                groups: self.groups,
                use_linear_projection: self.linear_projection,
                upcast_attention: self.upcast_attention,
            },
            vb,
        )
    }

    pub(crate) fn attentions(
        &self,
        spec: &UNetBlockSpec,
        vb: VarBuilder,
    ) -> Result<Vec<Transformer2D>> {
        if spec.kind == BlockKind::Plain {
            return Ok(Vec::new());
        }
        (0..spec.num_layers)
            .map(|j| {
                self.transformer(
                    spec.out_channels,
                    spec.num_heads,
                    spec.transformer_depth,
                    spec.cross_attention_dim,
                    vb.pp(format!("attentions.{j}")),
                )
            })
            .collect()
    }
}

/// `DownBlock2D` or `CrossAttnDownBlock2D`.
#[derive(Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            xs = resnet.forward(xs, Some(temb))?;
            if let Some(attn) = self.attentions.get(j) {
                xs = attn.forward(&xs, context)?;
            }
            skips.push(xs.clone());
        }
        if let Some(down) = &self.downsampler {
            xs = down.forward(&xs)?;
            skips.push(xs.clone());
        }
        Ok(xs)
    }
}

/// `UNetMidBlock2DCrossAttn` with one attention layer.
#[derive(Debug)]
struct MidBlock {
    resnet_in: ResnetBlock2D,
    attention: Transformer2D,
    resnet_out: ResnetBlock2D,
}

/// SDXL's extra conditioning, one row per batch item: the pooled, projected text embedding of
/// the second text encoder and the six size/crop ids.
#[derive(Debug, Clone)]
pub struct AddedConditioning {
    /// `[B, P]` pooled text embeddings.
    pub text_embeds: Tensor,
    /// `[B, 6]` (original h, w, crop top, left, target h, w).
    pub time_ids: Tensor,
}

/// `add_time_proj` + `add_embedding` of a `text_time` UNet.
#[derive(Debug)]
struct AddedEmbedding {
    spec: AddedConditioningSpec,
    linear_1: Linear,
    linear_2: Linear,
}

impl AddedEmbedding {
    fn new(spec: AddedConditioningSpec, temb: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            spec,
            linear_1: layers::linear(spec.in_dim, temb, true, vb.pp("linear_1"))?,
            linear_2: layers::linear(temb, temb, true, vb.pp("linear_2"))?,
        })
    }
}

/// The sinusoidal projection of the timesteps (diffusers' `Timesteps`).
#[derive(Debug, Clone, Copy)]
struct TimeProjection {
    channels: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
}

/// conv_in, time/added embedding, down blocks and mid block of a UNet or ControlNet.
#[derive(Debug)]
pub(crate) struct Encoder {
    conv_in: Conv2d,
    time_proj: TimeProjection,
    time_linear_1: Linear,
    time_linear_2: Linear,
    add_embedding: Option<AddedEmbedding>,
    down: Vec<DownBlock>,
    mid: Option<MidBlock>,
}

impl Encoder {
    /// Builds the encoder of the UNet `config` describes (`plan` is its expansion) from the
    /// weights under `vb` (`conv_in`, `time_embedding`, `add_embedding`, `down_blocks`,
    /// `mid_block`).
    pub(crate) fn new(config: &UNetConfig, plan: &UNetPlan, vb: &VarBuilder) -> Result<Self> {
        let common = BlockCommon::of(config, plan);
        let first = config.block_out_channels[0];
        let temb = plan.time_embed_dim;
        let add_embedding = match plan.added {
            Some(spec) => Some(AddedEmbedding::new(spec, temb, vb.pp("add_embedding"))?),
            None => None,
        };
        let mut down = Vec::with_capacity(plan.down.len());
        let mut out_channels = first;
        for (i, spec) in plan.down.iter().enumerate() {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let in_channels = out_channels;
            out_channels = spec.out_channels;
            let resnets = (0..spec.num_layers)
                .map(|j| {
                    let input = if j == 0 { in_channels } else { out_channels };
                    common.resnet(input, out_channels, vb.pp(format!("resnets.{j}")))
                })
                .collect::<Result<Vec<_>>>()?;
            let downsampler = if i + 1 < plan.down.len() {
                let padding = config.downsample_padding;
                Some(Downsample2D::new(
                    out_channels,
                    padding,
                    vb.pp("downsamplers.0"),
                )?)
            } else {
                None
            };
            down.push(DownBlock {
                resnets,
                attentions: common.attentions(spec, vb.clone())?,
                downsampler,
            });
        }
        Ok(Self {
            conv_in: conv2d(config.in_channels, first, 3, 1, 1, vb.pp("conv_in"))?,
            time_proj: TimeProjection {
                channels: first,
                flip_sin_to_cos: config.flip_sin_to_cos,
                freq_shift: config.freq_shift,
            },
            time_linear_1: layers::linear(first, temb, true, vb.pp("time_embedding.linear_1"))?,
            time_linear_2: layers::linear(temb, temb, true, vb.pp("time_embedding.linear_2"))?,
            add_embedding,
            down,
            mid: Self::mid_block(config, plan, common, vb)?,
        })
    }

    fn mid_block(
        config: &UNetConfig,
        plan: &UNetPlan,
        common: BlockCommon,
        vb: &VarBuilder,
    ) -> Result<Option<MidBlock>> {
        let Some((heads, depth, context_dim)) = plan.mid else {
            return Ok(None);
        };
        let last = *config.block_out_channels.last().unwrap_or(&0);
        let vb = vb.pp("mid_block");
        let common = BlockCommon {
            resnet_scale: config.mid_block_scale_factor,
            ..common
        };
        Ok(Some(MidBlock {
            resnet_in: common.resnet(last, last, vb.pp("resnets.0"))?,
            attention: common.transformer(
                last,
                heads,
                depth,
                context_dim,
                vb.pp("attentions.0"),
            )?,
            resnet_out: common.resnet(last, last, vb.pp("resnets.1"))?,
        }))
    }

    /// The `text_time` conditioning this encoder needs, if any.
    pub(crate) fn added_conditioning(&self) -> Option<AddedConditioningSpec> {
        self.add_embedding.as_ref().map(|a| a.spec)
    }

    /// Number of skip connections [`Encoder::forward`] returns.
    pub(crate) fn skip_count(&self) -> usize {
        1 + self
            .down
            .iter()
            .map(|b| b.resnets.len() + usize::from(b.downsampler.is_some()))
            .sum::<usize>()
    }

    /// The time embedding `[B, T]` (plus the added embedding of a `text_time` encoder, which
    /// then requires `added`) in `dtype`.
    pub(crate) fn embed_time(
        &self,
        timesteps: &Tensor,
        added: Option<&AddedConditioning>,
        dtype: DType,
    ) -> Result<Tensor> {
        let p = self.time_proj;
        let t_emb = timestep_embedding(timesteps, p.channels, p.flip_sin_to_cos, p.freq_shift)?
            .to_dtype(dtype)?;
        let temb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(&t_emb)?.silu()?)?;
        let (a, cond) =
            match (&self.add_embedding, added) {
                (None, _) => return Ok(temb),
                (Some(_), None) => return Err(candle_core::Error::Msg(
                    "this model (addition_embed_type \"text_time\") needs text_embeds and time_ids"
                        .into(),
                )),
                (Some(a), Some(cond)) => (a, cond),
            };
        let (b, n_ids) = cond.time_ids.dims2()?;
        let time_embeds = timestep_embedding(
            &cond.time_ids.flatten_all()?,
            a.spec.time_embed_dim,
            p.flip_sin_to_cos,
            p.freq_shift,
        )?
        .reshape((b, n_ids * a.spec.time_embed_dim))?;
        let add = Tensor::cat(&[&cond.text_embeds.to_dtype(DType::F32)?, &time_embeds], 1)?
            .to_dtype(dtype)?;
        let aug = a.linear_2.forward(&a.linear_1.forward(&add)?.silu()?)?;
        temb + aug
    }

    /// Runs conv_in (plus `hint`, the ControlNet's embedded control image, added to its
    /// output), the down blocks and the mid block. Returns the mid block's output and the
    /// skip connections in diffusers' order (conv_in's output first).
    pub(crate) fn forward(
        &self,
        sample: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        hint: Option<&Tensor>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut xs = self
            .conv_in
            .forward_add(sample, hint.map(|h| ConvAddend::Full(h.clone())))?;
        let mut skips = Vec::with_capacity(self.skip_count());
        skips.push(xs.clone());
        for block in &self.down {
            xs = block.forward(&xs, temb, context, &mut skips)?;
        }
        if let Some(mid) = &self.mid {
            xs = mid.resnet_in.forward(xs, Some(temb))?;
            xs = mid.attention.forward(&xs, context)?;
            xs = mid.resnet_out.forward(xs, Some(temb))?;
        }
        Ok((xs, skips))
    }
}
