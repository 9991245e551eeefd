//! Blocks shared by the UNet and the VAE (resnets, down/upsamplers, the timestep embedding),
//! written to match diffusers' modules operation for operation, with `VarBuilder` paths that
//! mirror the checkpoint keys.

use super::{conv2d, group_norm, Conv2d, ConvAddend, GroupNorm, Linear};
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// diffusers `ResnetBlock2D` (`time_embedding_norm = "default"`, SiLU).
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    time_emb_proj: Option<Linear>,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

/// Shape and numerics of one [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Width of the time embedding, if the block is time-conditioned.
    pub temb_channels: Option<usize>,
    /// GroupNorm groups.
    pub groups: usize,
    /// GroupNorm epsilon.
    pub eps: f64,
    /// The output is divided by this.
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    /// Builds the block from `vb` (keys `norm1`, `conv1`, `time_emb_proj`, …).
    pub fn new(cfg: ResnetConfig, vb: VarBuilder) -> Result<Self> {
        let (i, o) = (cfg.in_channels, cfg.out_channels);
        let conv_shortcut = if i != o {
            Some(conv2d(i, o, 1, 1, 0, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(cfg.groups, i, cfg.eps, vb.pp("norm1"))?,
            conv1: conv2d(i, o, 3, 1, 1, vb.pp("conv1"))?,
            norm2: group_norm(cfg.groups, o, cfg.eps, vb.pp("norm2"))?,
            conv2: conv2d(o, o, 3, 1, 1, vb.pp("conv2"))?,
            time_emb_proj: match cfg.temb_channels {
                Some(t) => Some(super::linear(t, o, true, vb.pp("time_emb_proj"))?),
                None => None,
            },
            conv_shortcut,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// Runs the block; `temb` is the (un-activated) time embedding `[B, T]`. The time
    /// embedding and the residual are added inside the convolutions (fused on the CPU).
    /// Takes `xs` so that it is freed as soon as the shortcut no longer needs it, and each
    /// intermediate as soon as the next exists: at the VAE's full-resolution blocks, where the
    /// decode peaks, that is one input-sized tensor less held at once.
    pub fn forward(&self, xs: Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let time = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => Some(ConvAddend::PerChannel(proj.forward(&t.silu()?)?)),
            _ => None,
        };
        let conv1 = self
            .conv1
            .forward_add(&self.norm1.forward_silu(&xs)?, time)?;
        let h = self.norm2.forward_silu(&conv1)?;
        drop(conv1);
        let shortcut = match &self.conv_shortcut {
            Some(c) => {
                let s = c.forward(&xs)?;
                drop(xs);
                s
            }
            None => xs,
        };
        if self.output_scale_factor == 1.0 {
            self.conv2.forward_add(&h, Some(ConvAddend::Full(shortcut)))
        } else {
            (shortcut + self.conv2.forward(&h)?)? / self.output_scale_factor
        }
    }
}

/// diffusers `Downsample2D` with a convolution (`downsamplers.0.conv`).
#[derive(Debug)]
pub struct Downsample2D {
    conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample2D {
    /// `padding = 0` pads one pixel right and bottom first, as diffusers does.
    pub fn new(channels: usize, padding: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv2d(channels, channels, 3, 2, padding, vb.pp("conv"))?,
            pad_right_bottom: padding == 0,
        })
    }

    /// Halves height and width.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = if self.pad_right_bottom {
            xs.pad_with_zeros(D::Minus1, 0, 1)?
                .pad_with_zeros(D::Minus2, 0, 1)?
        } else {
            xs.clone()
        };
        self.conv.forward(&xs)
    }
}

/// diffusers `Upsample2D` with a convolution (`upsamplers.0.conv`): nearest ×2 then 3×3 conv.
#[derive(Debug)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    /// Builds the upsampler.
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv2d(channels, channels, 3, 1, 1, vb.pp("conv"))?,
        })
    }

    /// Doubles height and width, or resizes to `size` when the skip connection needs it.
    /// Takes `xs` so that it is freed once upsampled, before the convolution's output exists.
    pub fn forward(&self, xs: Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        let up = crate::kernels::layout::upsample_nearest(&xs, th, tw)?;
        drop(xs);
        self.conv.forward(&up)
    }
}

/// Sinusoidal timestep embedding, diffusers' `get_timestep_embedding` (computed in f32).
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let device = timesteps.device();
    let exponent: Vec<f32> = (0..half)
        .map(|i| (-(10000f32.ln()) * i as f32) / (half as f32 - freq_shift as f32))
        .collect();
    let freqs = Tensor::new(exponent, device)?.exp()?.unsqueeze(0)?;
    let t = timesteps.to_dtype(DType::F32)?.unsqueeze(1)?;
    let args = t.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], D::Minus1)?
    } else {
        Tensor::cat(&[sin, cos], D::Minus1)?
    };
    if dim % 2 == 1 {
        emb.pad_with_zeros(D::Minus1, 0, 1)
    } else {
        Ok(emb)
    }
}
