//! diffusers `UNet2DConditionModel`, built from `unet/config.json` (see [`UNetConfig::plan`]).

mod transformer;

use crate::config::{AddedConditioningSpec, BlockKind, UNetBlockSpec, UNetConfig, UNetPlan};
use crate::layers::{
    self, conv2d, group_norm, timestep_embedding, Conv2d, Downsample2D, GroupNorm, Linear,
    ResnetBlock2D, ResnetConfig, Upsample2D,
};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use transformer::{Transformer2D, Transformer2DConfig};

/// Shared numerics of every block of one UNet.
#[derive(Debug, Clone, Copy)]
struct BlockCommon {
    temb: usize,
    groups: usize,
    eps: f64,
    resnet_scale: f64,
    linear_projection: bool,
    upcast_attention: bool,
}

impl BlockCommon {
    fn resnet(
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

    fn attentions(&self, spec: &UNetBlockSpec, vb: VarBuilder) -> Result<Vec<Transformer2D>> {
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

/// The denoising UNet.
#[derive(Debug)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    add_embedding: Option<AddedEmbedding>,
    down: Vec<DownBlock>,
    mid: Option<MidBlock>,
    up: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    config: UNetConfig,
}

impl UNet2DConditionModel {
    /// Builds the UNet described by `config` from the weights in `vb`.
    pub fn new(config: &UNetConfig, vb: VarBuilder) -> crate::Result<Self> {
        let plan: UNetPlan = config.plan()?;
        let ch = &config.block_out_channels;
        let n = ch.len();
        let first = ch[0];
        let common = BlockCommon {
            temb: plan.time_embed_dim,
            groups: plan.groups,
            eps: config.norm_eps,
            resnet_scale: config.resnet_out_scale_factor,
            linear_projection: config.use_linear_projection,
            upcast_attention: config.upcast_attention,
        };
        let conv_in = conv2d(config.in_channels, first, 3, 1, 1, vb.pp("conv_in"))?;
        let time_linear_1 = layers::linear(
            first,
            plan.time_embed_dim,
            true,
            vb.pp("time_embedding.linear_1"),
        )?;
        let time_linear_2 = layers::linear(
            plan.time_embed_dim,
            plan.time_embed_dim,
            true,
            vb.pp("time_embedding.linear_2"),
        )?;

        let add_embedding = match plan.added {
            Some(spec) => Some(AddedEmbedding {
                spec,
                linear_1: layers::linear(
                    spec.in_dim,
                    plan.time_embed_dim,
                    true,
                    vb.pp("add_embedding.linear_1"),
                )?,
                linear_2: layers::linear(
                    plan.time_embed_dim,
                    plan.time_embed_dim,
                    true,
                    vb.pp("add_embedding.linear_2"),
                )?,
            }),
            None => None,
        };

        let mut down = Vec::with_capacity(n);
        let mut out_channels = first;
        for (i, spec) in plan.down.iter().enumerate() {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let in_channels = out_channels;
            out_channels = spec.out_channels;
            let resnets = (0..spec.num_layers)
                .map(|j| {
                    common.resnet(
                        if j == 0 { in_channels } else { out_channels },
                        out_channels,
                        vb.pp(format!("resnets.{j}")),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let downsampler = if i + 1 < n {
                Some(Downsample2D::new(
                    out_channels,
                    config.downsample_padding,
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

        let last = ch[n - 1];
        let mid = match plan.mid {
            Some((heads, depth, context_dim)) => {
                let vb = vb.pp("mid_block");
                let mid_common = BlockCommon {
                    resnet_scale: config.mid_block_scale_factor,
                    ..common
                };
                Some(MidBlock {
                    resnet_in: mid_common.resnet(last, last, vb.pp("resnets.0"))?,
                    attention: mid_common.transformer(
                        last,
                        heads,
                        depth,
                        context_dim,
                        vb.pp("attentions.0"),
                    )?,
                    resnet_out: mid_common.resnet(last, last, vb.pp("resnets.1"))?,
                })
            }
            None => None,
        };

        let mut up = Vec::with_capacity(n);
        let mut out_channels = last;
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

        Ok(Self {
            conv_in,
            time_linear_1,
            time_linear_2,
            add_embedding,
            down,
            mid,
            up,
            conv_norm_out: group_norm(plan.groups, first, config.norm_eps, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(first, config.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
            config: config.clone(),
        })
    }

    /// The config this UNet was built from.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The `text_time` conditioning this UNet needs, if any.
    pub fn added_conditioning(&self) -> Option<AddedConditioningSpec> {
        self.add_embedding.as_ref().map(|a| a.spec)
    }

    /// Predicts noise (or v) for `sample` `[B, C, h, w]` at `timesteps` `[B]` (f32, fractional
    /// allowed) given the text embeddings `context` `[B, L, D]`. For UNets without added
    /// conditioning; see [`UNet2DConditionModel::forward_with`].
    pub fn forward(&self, sample: &Tensor, timesteps: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.forward_with(sample, timesteps, context, None)
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
        let (_, _, h, w) = sample.dims4()?;
        let up_factor = 1usize << (self.up.len() - 1);
        let forward_upsample_size = h % up_factor != 0 || w % up_factor != 0;

        let sample = if self.config.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        let t_emb = timestep_embedding(
            timesteps,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )?
        .to_dtype(sample.dtype())?;
        let temb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(&t_emb)?.silu()?)?;
        let temb = match (&self.add_embedding, added) {
            (None, _) => temb,
            (Some(_), None) => {
                return Err(candle_core::Error::Msg(
                    "this UNet (addition_embed_type \"text_time\") needs text_embeds and time_ids"
                        .into(),
                ))
            }
            (Some(a), Some(cond)) => {
                let (b, n_ids) = cond.time_ids.dims2()?;
                let time_embeds = timestep_embedding(
                    &cond.time_ids.flatten_all()?,
                    a.spec.time_embed_dim,
                    self.config.flip_sin_to_cos,
                    self.config.freq_shift,
                )?
                .reshape((b, n_ids * a.spec.time_embed_dim))?;
                let add = Tensor::cat(&[&cond.text_embeds.to_dtype(DType::F32)?, &time_embeds], 1)?
                    .to_dtype(sample.dtype())?;
                let aug = a.linear_2.forward(&a.linear_1.forward(&add)?.silu()?)?;
                (temb + aug)?
            }
        };

        let mut xs = self.conv_in.forward(&sample)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down {
            xs = block.forward(&xs, &temb, context, &mut skips)?;
        }
        if let Some(mid) = &self.mid {
            xs = mid.resnet_in.forward(xs, Some(&temb))?;
            xs = mid.attention.forward(&xs, context)?;
            xs = mid.resnet_out.forward(xs, Some(&temb))?;
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
