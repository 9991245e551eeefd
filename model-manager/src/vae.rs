//! diffusers `AutoencoderKL`: encoder (img2img) and decoder, built from `vae/config.json`.

use crate::config::VaeConfig;
use crate::kernels::layout::transpose_last_two;
use crate::layers::{
    attention, conv2d, group_norm, linear, AttentionPrecision, Conv2d, Downsample2D, GroupNorm,
    Linear, ResnetBlock2D, ResnetConfig, Upsample2D,
};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use std::sync::OnceLock;

/// Single-head self-attention over the mid-block feature map. Accepts both the current
/// (`to_q`/`to_k`/`to_v`/`to_out.0`) and the legacy (`query`/`key`/`value`/`proj_attn`) key names.
#[derive(Debug)]
struct VaeAttention {
    group_norm: GroupNorm,
    /// `to_q`, `to_k` and `to_v` as one gemm.
    qkv: Linear,
    to_out: Linear,
}

impl VaeAttention {
    fn new(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let name = |new: &'static str, old: &'static str| if legacy { old } else { new };
        let lin = |n: &str| linear(channels, channels, true, vb.pp(n));
        Ok(Self {
            group_norm: group_norm(groups, channels, 1e-6, vb.pp("group_norm"))?,
            qkv: Linear::concat(&[
                lin(name("to_q", "query"))?,
                lin(name("to_k", "key"))?,
                lin(name("to_v", "value"))?,
            ])?,
            to_out: lin(name("to_out.0", "proj_attn"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let tokens = transpose_last_two(&self.group_norm.forward(xs)?.reshape((b, c, h * w))?)?;
        let qkv = self.qkv.forward(&tokens)?;
        let (q, k, v) = (
            qkv.narrow(2, 0, c)?,
            qkv.narrow(2, c, c)?,
            qkv.narrow(2, 2 * c, c)?,
        );
        let out = attention(&q, &k, &v, 1, false, AttentionPrecision::Native)?;
        let out = self.to_out.forward(&out)?;
        let out = transpose_last_two(&out)?.reshape((b, c, h, w))?;
        out + xs
    }
}

/// `UNetMidBlock2D` without time conditioning: resnet, optional attention, resnet.
#[derive(Debug)]
struct VaeMidBlock {
    resnet_in: ResnetBlock2D,
    attention: Option<VaeAttention>,
    resnet_out: ResnetBlock2D,
}

impl VaeMidBlock {
    fn new(channels: usize, groups: usize, add_attention: bool, vb: VarBuilder) -> Result<Self> {
        let cfg = resnet_cfg(channels, channels, groups);
        Ok(Self {
            resnet_in: ResnetBlock2D::new(cfg, vb.pp("resnets.0"))?,
            attention: if add_attention {
                Some(VaeAttention::new(channels, groups, vb.pp("attentions.0"))?)
            } else {
                None
            },
            resnet_out: ResnetBlock2D::new(cfg, vb.pp("resnets.1"))?,
        })
    }

    fn forward(&self, xs: Tensor) -> Result<Tensor> {
        let mut xs = self.resnet_in.forward(xs, None)?;
        if let Some(attn) = &self.attention {
            xs = attn.forward(&xs)?;
        }
        self.resnet_out.forward(xs, None)
    }
}

fn resnet_cfg(in_channels: usize, out_channels: usize, groups: usize) -> ResnetConfig {
    ResnetConfig {
        in_channels,
        out_channels,
        temb_channels: None,
        groups,
        eps: 1e-6,
        output_scale_factor: 1.0,
    }
}

fn resnets(
    count: usize,
    in_channels: usize,
    out_channels: usize,
    groups: usize,
    vb: VarBuilder,
) -> Result<Vec<ResnetBlock2D>> {
    (0..count)
        .map(|j| {
            let input = if j == 0 { in_channels } else { out_channels };
            ResnetBlock2D::new(
                resnet_cfg(input, out_channels, groups),
                vb.pp(format!("resnets.{j}")),
            )
        })
        .collect()
}

/// Image → latent distribution parameters.
#[derive(Debug)]
struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    mid: VaeMidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let n = ch.len();
        let mut blocks = Vec::with_capacity(n);
        let mut out = ch[0];
        for (i, &channels) in ch.iter().enumerate() {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let input = out;
            out = channels;
            let down = if i + 1 < n {
                Some(Downsample2D::new(out, 0, vb.pp("downsamplers.0"))?)
            } else {
                None
            };
            blocks.push((resnets(cfg.layers_per_block, input, out, g, vb)?, down));
        }
        let last = ch[n - 1];
        Ok(Self {
            conv_in: conv2d(cfg.in_channels, ch[0], 3, 1, 1, vb.pp("conv_in"))?,
            blocks,
            mid: VaeMidBlock::new(last, g, cfg.mid_block_add_attention, vb.pp("mid_block"))?,
            norm_out: group_norm(g, last, 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(last, 2 * cfg.latent_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.conv_in.forward(xs)?;
        for (resnets, down) in &self.blocks {
            for r in resnets {
                xs = r.forward(xs, None)?;
            }
            if let Some(d) = down {
                xs = d.forward(&xs)?;
            }
        }
        let xs = self.mid.forward(xs)?;
        self.conv_out.forward(&self.norm_out.forward_silu(&xs)?)
    }
}

/// Latents → image.
#[derive(Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid: VaeMidBlock,
    blocks: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let n = ch.len();
        let last = ch[n - 1];
        let mut blocks = Vec::with_capacity(n);
        let mut out = last;
        for i in 0..n {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let prev = out;
            out = ch[n - 1 - i];
            let up = if i + 1 < n {
                Some(Upsample2D::new(out, vb.pp("upsamplers.0"))?)
            } else {
                None
            };
            blocks.push((resnets(cfg.layers_per_block + 1, prev, out, g, vb)?, up));
        }
        Ok(Self {
            conv_in: conv2d(cfg.latent_channels, last, 3, 1, 1, vb.pp("conv_in"))?,
            mid: VaeMidBlock::new(last, g, cfg.mid_block_add_attention, vb.pp("mid_block"))?,
            blocks,
            norm_out: group_norm(g, ch[0], 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(ch[0], cfg.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.conv_in.forward(xs)?;
        let mut xs = self.mid.forward(xs)?;
        for (resnets, up) in &self.blocks {
            for r in resnets {
                xs = r.forward(xs, None)?;
            }
            if let Some(u) = up {
                xs = u.forward(xs, None)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&xs)?)
    }
}

/// The diagonal Gaussian the encoder predicts for each latent.
#[derive(Debug)]
pub struct LatentDistribution {
    /// Mean `[B, C, h, w]`.
    pub mean: Tensor,
    /// Log-variance, clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor,
}

impl LatentDistribution {
    /// `mean + std · noise`, diffusers' `latent_dist.sample()` with externally drawn noise.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        let std = (&self.logvar * 0.5)?.exp()?;
        self.mean.clone() + std.mul(noise)?
    }
}

/// The encoder, built from its weights on first use (img2img): a server that only turns
/// text into images never reads or holds it (0.13 GB of SD 1.5's f32 weights). Its bytes stay
/// counted in the model's, so the cache budgets for it either way; a VAE file without an
/// encoder serves text-to-image and fails img2img jobs with the reason.
struct LazyEncoder {
    /// The weights under `encoder.`.
    vb: VarBuilder<'static>,
    built: OnceLock<Encoder>,
}

impl LazyEncoder {
    /// The encoder `config` describes, built now if it is not yet.
    fn get(&self, config: &VaeConfig) -> Result<&Encoder> {
        if let Some(e) = self.built.get() {
            return Ok(e);
        }
        let started = std::time::Instant::now();
        let encoder = Encoder::new(config, self.vb.clone()).map_err(|e| {
            candle_core::Error::Msg(format!(
                "the VAE's encoder (needed for img2img) cannot be built from its weights: {e}"
            ))
        })?;
        tracing::info!(elapsed = ?started.elapsed(), "VAE encoder loaded on first use");
        Ok(self.built.get_or_init(|| encoder))
    }
}

impl std::fmt::Debug for LazyEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyEncoder")
            .field("built", &self.built.get().is_some())
            .finish()
    }
}

/// The VAE.
#[derive(Debug)]
pub struct AutoencoderKL {
    encoder: LazyEncoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    decoder: Decoder,
    config: VaeConfig,
}

impl AutoencoderKL {
    /// Builds the VAE described by `config` from the weights in `vb` (the encoder on first
    /// use).
    pub fn new(config: &VaeConfig, vb: VarBuilder<'static>) -> crate::Result<Self> {
        config.validate()?;
        let l = config.latent_channels;
        Ok(Self {
            encoder: LazyEncoder {
                vb: vb.pp("encoder"),
                built: OnceLock::new(),
            },
            quant_conv: if config.use_quant_conv {
                Some(conv2d(2 * l, 2 * l, 1, 1, 0, vb.pp("quant_conv"))?)
            } else {
                None
            },
            post_quant_conv: if config.use_post_quant_conv {
                Some(conv2d(l, l, 1, 1, 0, vb.pp("post_quant_conv"))?)
            } else {
                None
            },
            decoder: Decoder::new(config, vb.pp("decoder"))?,
            config: config.clone(),
        })
    }

    /// The config this VAE was built from.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Encodes an image in [-1, 1] `[B, 3, H, W]` to its latent distribution.
    pub fn encode(&self, image: &Tensor) -> Result<LatentDistribution> {
        let h = self.encoder.get(&self.config)?.forward(image)?;
        let moments = match &self.quant_conv {
            Some(q) => q.forward(&h)?,
            None => h,
        };
        let halves = moments.chunk(2, 1)?;
        Ok(LatentDistribution {
            mean: halves[0].clone(),
            logvar: halves[1].clamp(-30f32, 20f32)?,
        })
    }

    /// Decodes (unscaled) latents to an image in roughly [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(latents)?,
            None => latents.clone(),
        };
        self.decoder.forward(&z)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::ModelSource;
    use candle_core::{DType, Device};
    use std::path::{Path, PathBuf};

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/sd1-tiny")
    }

    fn vae(root: &Path) -> AutoencoderKL {
        let cfg: VaeConfig =
            crate::config::read_json(&fixture().join("vae/config.json"), "config.json").unwrap();
        let source = ModelSource::Local(root.to_path_buf());
        let w = crate::weights::load(
            &source,
            "vae",
            "diffusion_pytorch_model",
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        AutoencoderKL::new(&cfg, w.vb).unwrap()
    }

    fn image() -> Tensor {
        Tensor::randn(0f32, 0.5, (1, 3, 32, 32), &Device::Cpu).unwrap()
    }

    #[test]
    fn the_encoder_is_built_on_the_first_encode_only() {
        let vae = vae(&fixture());
        let latents = Tensor::randn(0f32, 1.0, (1, 4, 4, 4), &Device::Cpu).unwrap();
        vae.decode(&latents).unwrap();
        assert!(
            vae.encoder.built.get().is_none(),
            "decoding built the encoder"
        );
        let first = vae.encode(&image()).unwrap().mean;
        assert!(vae.encoder.built.get().is_some());
        let again = vae.encode(&image()).unwrap().mean;
        assert_eq!(first.dims(), again.dims());
    }

    #[test]
    fn a_vae_file_without_an_encoder_decodes_and_refuses_to_encode() {
        let dir =
            std::env::temp_dir().join(format!("jhakaas-vae-decoder-only-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("vae")).unwrap();
        let file = "vae/diffusion_pytorch_model.safetensors";
        let tensors: std::collections::HashMap<_, _> =
            candle_core::safetensors::load(fixture().join(file), &Device::Cpu)
                .unwrap()
                .into_iter()
                .filter(|(k, _)| !k.starts_with("encoder."))
                .collect();
        candle_core::safetensors::save(&tensors, dir.join(file)).unwrap();
        let vae = vae(&dir);
        let latents = Tensor::zeros((1, 4, 4, 4), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(vae.decode(&latents).unwrap().dims(), &[1, 3, 32, 32]);
        let err = vae.encode(&image()).unwrap_err().to_string();
        assert!(err.contains("encoder (needed for img2img)"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
