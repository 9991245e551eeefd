//! diffusers `ControlNetModel` (SD 1.x/2.x and SDXL): the UNet's encoder half
//! ([`crate::unet`]'s, shared) fed the latents plus an embedded control image, whose skip
//! connections and mid output, each through a 1×1 conv and scaled, become the residuals
//! ([`ControlResiduals`]) that [`UNet2DConditionModel::forward_with_residuals`] adds.
//! Built from the checkpoint's `config.json` ([`ControlNetConfig`]); computes what diffusers'
//! `ControlNetModel.forward` computes, guess mode and `global_pool_conditions` included.
//!
//! [`UNet2DConditionModel::forward_with_residuals`]:
//!     crate::unet::UNet2DConditionModel::forward_with_residuals

use crate::config::{
    read_json, skip_connections, ControlNetConfig, ControlNetPlan, UNetConfig, CONTROLNET_CONFIG,
};
use crate::error::{Error, Result};
use crate::layers::{conv2d, Conv2d};
use crate::source::ModelSource;
use crate::unet::{AddedConditioning, Encoder};
use crate::weights;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

pub use crate::unet::ControlResiduals;

/// The weights file stem of a ControlNet folder.
const WEIGHTS_STEM: &str = "diffusion_pytorch_model";

/// `ControlNetConditioningEmbedding`: conv_in, pairs of 3×3 convs (the second of each pair
/// strided), conv_out, SiLU after every conv but the last.
#[derive(Debug)]
struct ConditioningEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl ConditioningEmbedding {
    fn new(
        plan: &ControlNetPlan,
        out_channels: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let ch = &plan.embedding_channels;
        let conv_in = conv2d(plan.conditioning_channels, ch[0], 3, 1, 1, vb.pp("conv_in"))?;
        let mut blocks = Vec::with_capacity(2 * (ch.len() - 1));
        for (i, pair) in ch.windows(2).enumerate() {
            let (c_in, c_out) = (pair[0], pair[1]);
            blocks.push(conv2d(
                c_in,
                c_in,
                3,
                1,
                1,
                vb.pp(format!("blocks.{}", 2 * i)),
            )?);
            let strided = vb.pp(format!("blocks.{}", 2 * i + 1));
            blocks.push(conv2d(c_in, c_out, 3, 2, 1, strided)?);
        }
        let last = ch[ch.len() - 1];
        let conv_out = conv2d(last, out_channels, 3, 1, 1, vb.pp("conv_out"))?;
        Ok(Self {
            conv_in,
            blocks,
            conv_out,
        })
    }

    fn forward(&self, image: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = self.conv_in.forward(image)?.silu()?;
        for block in &self.blocks {
            xs = block.forward(&xs)?.silu()?;
        }
        self.conv_out.forward(&xs)
    }
}

/// What one ControlNet is conditioned on in one call.
#[derive(Debug, Clone, Copy)]
pub struct ControlInput<'a> {
    /// The control image `[B, C, H, W]`, values in [0, 1], RGB (as diffusers' control image
    /// processor gives it: no normalisation to [-1, 1]), `H × W` = the latents' size times
    /// [`ControlNetModel::image_scale`]; one per batch item of the sample.
    pub image: &'a Tensor,
    /// diffusers' `conditioning_scale`: every residual is multiplied by it.
    pub scale: f64,
    /// diffusers' `guess_mode`: residual `k` of `n` down ones is scaled by
    /// `scale · 10^(k/n − 1)` (the mid one by `scale`) instead of `scale`.
    pub guess_mode: bool,
}

/// A loaded ControlNet.
#[derive(Debug)]
pub struct ControlNetModel {
    name: String,
    config: ControlNetConfig,
    plan: ControlNetPlan,
    encoder: Encoder,
    embedding: ConditioningEmbedding,
    down_convs: Vec<Conv2d>,
    mid_conv: Conv2d,
    weight_bytes: u64,
    pages: crate::mapped::WeightPages,
}

/// Where a ControlNet's files are in `source`: its root (a ControlNet repository, as
/// published) or `controlnet/` (a ControlNet pipeline).
fn folder_of(source: &ModelSource) -> Result<&'static str> {
    if source.optional_file("config.json")?.is_some() {
        Ok("")
    } else if source.optional_file("controlnet/config.json")?.is_some() {
        Ok("controlnet")
    } else {
        Err(Error::MissingFile {
            source_name: source.to_string(),
            file: "config.json (a ControlNetModel folder) or controlnet/config.json".into(),
        })
    }
}

fn in_folder(folder: &str, file: &str) -> String {
    if folder.is_empty() {
        file.to_string()
    } else {
        format!("{folder}/{file}")
    }
}

impl ControlNetModel {
    /// Loads the ControlNet in `source` (a diffusers `ControlNetModel` folder or hub
    /// repository, `config.json` + `diffusion_pytorch_model[.fp16].safetensors` at its root
    /// or under `controlnet/`) onto `device` in `dtype` (the pipeline's working dtype),
    /// through the loader the pipeline's UNet uses (mapped or read per
    /// [`weights::weights_io`]).
    pub fn load(source: &ModelSource, device: &Device, dtype: DType) -> Result<Self> {
        let folder = folder_of(source)?;
        let config_path = source.file(&in_folder(folder, "config.json"))?;
        let config: ControlNetConfig = read_json(&config_path, CONTROLNET_CONFIG)?;
        let w = weights::load(source, folder, WEIGHTS_STEM, dtype, device)?;
        let mut model = weights::with_file(&w.file, Self::new(&config, w.vb.clone()))?;
        model.name = source.to_string();
        model.weight_bytes = w.bytes;
        model.pages = w.pages();
        Ok(model)
    }

    /// The bytes [`ControlNetModel::load`] will hold for `source` on `device` in `dtype`, from
    /// the weights file's header alone (for a byte-budgeted model cache).
    pub fn estimate_loaded_bytes(
        source: &ModelSource,
        device: &Device,
        dtype: DType,
    ) -> Result<u64> {
        let folder = folder_of(source)?;
        let plain = in_folder(folder, &format!("{WEIGHTS_STEM}.safetensors"));
        let fp16 = in_folder(folder, &format!("{WEIGHTS_STEM}.fp16.safetensors"));
        let path = source.first_of(&[&plain, &fp16])?;
        weights::loaded_bytes(&path, dtype, device).map_err(|reason| Error::Config {
            file: plain,
            reason,
        })
    }

    /// Builds the ControlNet `config` describes from the weights in `vb` (keys as diffusers
    /// saves them). [`ControlNetModel::load`] is the usual door.
    pub fn new(config: &ControlNetConfig, vb: VarBuilder) -> Result<Self> {
        let plan = config.plan()?;
        let encoder = Encoder::new(&config.encoder, &plan.encoder, &vb)?;
        let first = config.encoder.block_out_channels[0];
        let embedding =
            ConditioningEmbedding::new(&plan, first, vb.pp("controlnet_cond_embedding"))?;
        let down_convs = skip_connections(&plan.encoder)
            .into_iter()
            .enumerate()
            .map(|(k, (c, _))| conv2d(c, c, 1, 1, 0, vb.pp(format!("controlnet_down_blocks.{k}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let last = *config.encoder.block_out_channels.last().unwrap_or(&first);
        let mid_conv = conv2d(last, last, 1, 1, 0, vb.pp("controlnet_mid_block"))?;
        if down_convs.len() != encoder.skip_count() {
            return Err(Error::Config {
                file: CONTROLNET_CONFIG.into(),
                reason: format!(
                    "{} controlnet_down_blocks for {} skip connections",
                    down_convs.len(),
                    encoder.skip_count()
                ),
            });
        }
        Ok(Self {
            name: "controlnet".into(),
            config: config.clone(),
            plan,
            encoder,
            embedding,
            down_convs,
            mid_conv,
            weight_bytes: 0,
            pages: Default::default(),
        })
    }

    /// The source it was loaded from (`controlnet` when built with [`ControlNetModel::new`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The config it was built from.
    pub fn config(&self) -> &ControlNetConfig {
        &self.config
    }

    /// Bytes its weights take once loaded (0 when built with [`ControlNetModel::new`]).
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// The mapped file this net's weights lie in.
    pub fn pages(&self) -> &crate::mapped::WeightPages {
        &self.pages
    }

    /// How many times larger than the latents the control image is (the VAE's scale factor
    /// for a ControlNet that fits the pipeline).
    pub fn image_scale(&self) -> usize {
        self.plan.image_scale()
    }

    /// Fails with [`Error::InvalidParam`] (field `controlnet`) unless this ControlNet can
    /// steer the UNet built from `unet` in a pipeline whose VAE scales by `vae_scale_factor`
    /// (see [`ControlNetPlan::check_compatible`]).
    pub fn check_compatible(&self, unet: &UNetConfig, vae_scale_factor: usize) -> Result<()> {
        self.plan
            .check_compatible(&self.name, unet, vae_scale_factor)
    }

    /// diffusers' `ControlNetModel.forward`: the residuals for `sample` `[B, C, h, w]` at
    /// `timesteps` `[B]` with text states `context` `[B, L, D]` (and SDXL's `added`
    /// conditioning, required by a `text_time` ControlNet), steered by `control`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<&AddedConditioning>,
        control: &ControlInput,
    ) -> Result<ControlResiduals> {
        let image = self.prepare_image(sample, control.image)?;
        let temb = self.encoder.embed_time(timesteps, added, sample.dtype())?;
        let hint = self.embedding.forward(&image)?;
        let (mid, skips) = self.encoder.forward(sample, &temb, context, Some(&hint))?;
        let down = skips
            .iter()
            .zip(&self.down_convs)
            .map(|(skip, conv)| conv.forward(skip))
            .collect::<candle_core::Result<Vec<_>>>()?;
        drop(skips);
        let mid = self.mid_conv.forward(&mid)?;
        Ok(self.scale(down, mid, control)?)
    }

    /// Checks the control image against the sample and brings it to the sample's dtype and
    /// the ControlNet's channel order.
    fn prepare_image(&self, sample: &Tensor, image: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = sample.dims4()?;
        let f = self.image_scale();
        let want = (b, self.plan.conditioning_channels, h * f, w * f);
        let got = image.dims();
        if got != [want.0, want.1, want.2, want.3] {
            return Err(Error::invalid(
                "control_image",
                format!(
                    "ControlNet `{}` needs {want:?} (batch, channels, {f}× the latents' height \
                     and width), got {got:?}",
                    self.name
                ),
            ));
        }
        let image = image.to_dtype(sample.dtype())?;
        if !self.plan.bgr {
            return Ok(image);
        }
        let reversed: Vec<u32> = (0..want.1 as u32).rev().collect();
        let index = Tensor::new(reversed, image.device())?;
        Ok(image.index_select(&index, 1)?)
    }

    /// `conditioning_scale` (per residual in guess mode), then the spatial mean of
    /// `global_pool_conditions`.
    fn scale(
        &self,
        down: Vec<Tensor>,
        mid: Tensor,
        control: &ControlInput,
    ) -> candle_core::Result<ControlResiduals> {
        let n = down.len();
        let guess = control.guess_mode && !self.plan.global_pool;
        // torch.logspace(-1, 0, n + 1), in f32 as torch computes it.
        let factor = |k: usize| -> f64 {
            if guess {
                let step = 1.0f32 / n as f32;
                (10f32.powf(-1.0 + step * k as f32) * control.scale as f32) as f64
            } else {
                control.scale
            }
        };
        let pool = |t: Tensor| -> candle_core::Result<Tensor> {
            if self.plan.global_pool {
                t.mean_keepdim(3)?.mean_keepdim(2)
            } else {
                Ok(t)
            }
        };
        let down = down
            .into_iter()
            .enumerate()
            .map(|(k, t)| pool((t * factor(k))?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mid = pool((mid * factor(n))?)?;
        Ok(ControlResiduals { down, mid })
    }
}
