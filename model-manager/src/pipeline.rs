//! The Stable Diffusion 1.x/2.x pipeline: load every component from the checkpoint's own config
//! files, then txt2img / img2img with classifier-free guidance, exactly as diffusers'
//! `StableDiffusionPipeline` and `StableDiffusionImg2ImgPipeline` compute them.

use crate::clip::ClipTextModel;
use crate::config::{read_json, ClipTextConfig, ModelIndex, UNetConfig, VaeConfig};
use crate::device::working_dtype;
use crate::error::{Error, Result};
use crate::image_io::{image_to_tensor, tensor_to_images};
use crate::noise::{self, NormalStream};
use crate::params::*;
use crate::scheduler::{self, SchedulerConfig};
use crate::source::ModelSource;
use crate::tokenizer::ClipTokenizer;
use crate::unet::UNet2DConditionModel;
use crate::vae::AutoencoderKL;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::ops::ControlFlow;
use std::path::Path;
use std::time::Instant;

/// diffusers' default number of steps.
pub const DEFAULT_STEPS: usize = 50;
/// diffusers' default guidance scale.
pub const DEFAULT_GUIDANCE: f64 = 7.5;

const SCHEDULER_FILE: &str = "scheduler/scheduler_config.json";

/// A loaded pipeline, ready to generate.
pub struct StableDiffusionPipeline {
    name: String,
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextModel,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    scheduler_config: SchedulerConfig,
    device: Device,
    dtype: DType,
    vae_dtype: DType,
    defaults: ModelDefaults,
    family: &'static str,
    weight_bytes: u64,
}

impl std::fmt::Debug for StableDiffusionPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StableDiffusionPipeline")
            .field("name", &self.name)
            .field("device", &self.device)
            .field("dtype", &self.dtype)
            .finish_non_exhaustive()
    }
}

fn weights(
    source: &ModelSource,
    component: &str,
    stem: &str,
    dtype: DType,
    device: &Device,
) -> Result<(VarBuilder<'static>, String, u64)> {
    let plain = format!("{component}/{stem}.safetensors");
    let fp16 = format!("{component}/{stem}.fp16.safetensors");
    let path = source.first_of(&[&plain, &fp16])?;
    // SAFETY: the file is memory-mapped read-only; checkpoints are not modified while loaded.
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&[&path], dtype, device) }.map_err(|e| {
            Error::Config {
                file: plain.clone(),
                reason: e.to_string(),
            }
        })?;
    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    Ok((vb, plain, bytes))
}

fn with_file<T>(file: &str, r: Result<T>) -> Result<T> {
    r.map_err(|e| match e {
        Error::Candle(c) => Error::Config {
            file: file.to_string(),
            reason: format!("weights do not match the config: {c}"),
        },
        other => other,
    })
}

impl StableDiffusionPipeline {
    /// Loads every component of `source` onto `device` (f32 on CPU, f16 on CUDA).
    pub fn load(source: &ModelSource, device: &Device) -> Result<Self> {
        let dtype = working_dtype(device);
        let index: ModelIndex = read_json(&source.file("model_index.json")?, "model_index.json")?;
        index.validate()?;

        let te_cfg: ClipTextConfig = read_json(
            &source.file("text_encoder/config.json")?,
            "text_encoder/config.json",
        )?;
        let unet_cfg: UNetConfig =
            read_json(&source.file("unet/config.json")?, "unet/config.json")?;
        unet_cfg.plan()?;
        let vae_cfg: VaeConfig = read_json(&source.file("vae/config.json")?, "vae/config.json")?;
        vae_cfg.validate()?;
        let sched_text =
            std::fs::read_to_string(source.file(SCHEDULER_FILE)?).map_err(|e| Error::Config {
                file: SCHEDULER_FILE.into(),
                reason: e.to_string(),
            })?;
        let scheduler_config = SchedulerConfig::from_json_str(&sched_text, SCHEDULER_FILE)?;

        // Tokenizer files live side by side (in the HF cache: in one snapshot folder).
        let vocab = source.optional_file("tokenizer/vocab.json")?;
        let tokenizer_json = source.optional_file("tokenizer/tokenizer.json")?;
        let tok_dir = match (&vocab, &tokenizer_json) {
            (Some(v), _) => {
                source.file("tokenizer/merges.txt")?;
                v.parent().map(Path::to_path_buf)
            }
            (None, Some(t)) => t.parent().map(Path::to_path_buf),
            (None, None) => None,
        }
        .ok_or_else(|| Error::MissingFile {
            source_name: source.to_string(),
            file: "tokenizer/vocab.json (+ merges.txt) or tokenizer/tokenizer.json".into(),
        })?;
        for optional in [
            "tokenizer/special_tokens_map.json",
            "tokenizer/tokenizer_config.json",
        ] {
            source.optional_file(optional)?;
        }
        let tokenizer = ClipTokenizer::from_dir(&tok_dir, te_cfg.max_position_embeddings)?;

        let (vb, file, te_bytes) = weights(source, "text_encoder", "model", dtype, device)?;
        let text_encoder = with_file(&file, ClipTextModel::new(&te_cfg, vb))?;
        let (vb, file, unet_bytes) =
            weights(source, "unet", "diffusion_pytorch_model", dtype, device)?;
        let unet = with_file(&file, UNet2DConditionModel::new(&unet_cfg, vb))?;
        let vae_dtype = if dtype != DType::F32 && vae_cfg.force_upcast {
            DType::F32
        } else {
            dtype
        };
        let (vb, file, vae_bytes) =
            weights(source, "vae", "diffusion_pytorch_model", vae_dtype, device)?;
        let vae = with_file(&file, AutoencoderKL::new(&vae_cfg, vb))?;

        let size = unet_cfg.sample_size.unwrap_or(64) * vae_cfg.scale_factor();
        let defaults = ModelDefaults {
            width: size,
            height: size,
            steps: DEFAULT_STEPS,
            guidance_scale: DEFAULT_GUIDANCE,
            scheduler: scheduler_config
                .native_kind()
                .unwrap_or(scheduler::FALLBACK),
        };
        Ok(Self {
            name: source.to_string(),
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler_config,
            device: device.clone(),
            dtype,
            vae_dtype,
            defaults,
            // SD 2.x text encoders (OpenCLIP ViT-H) use exact GELU, SD 1.x (OpenAI CLIP) quick GELU.
            family: if te_cfg.hidden_act == "gelu" {
                "sd2"
            } else {
                "sd1"
            },
            weight_bytes: te_bytes + unet_bytes + vae_bytes,
        })
    }

    /// Values used for unset request fields.
    pub fn defaults(&self) -> &ModelDefaults {
        &self.defaults
    }

    /// Model family: `sd1` or `sd2`.
    pub fn family(&self) -> &'static str {
        self.family
    }

    /// Size of the weight files this pipeline was loaded from, in bytes.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// The source this pipeline was loaded from.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Pixels per latent along each axis.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config().scale_factor()
    }

    /// Applies defaults and checks every field, naming the first bad one.
    pub fn resolve(&self, p: &GenerateParams) -> Result<ResolvedParams> {
        let scale = self.vae_scale_factor();
        let from_latents = |axis: usize| p.noise.as_ref().map(|n| n.latents.shape[axis] * scale);
        let (default_w, default_h) = match &p.init_image {
            Some(init) => (
                init.image.width() as usize / scale * scale,
                init.image.height() as usize / scale * scale,
            ),
            None => (
                from_latents(3).unwrap_or(self.defaults.width),
                from_latents(2).unwrap_or(self.defaults.height),
            ),
        };
        let width = p.width.unwrap_or(default_w);
        let height = p.height.unwrap_or(default_h);
        for (field, v) in [("width", width), ("height", height)] {
            if v == 0 || v % 8 != 0 || v % scale != 0 {
                return Err(Error::invalid(
                    field,
                    format!("{v} is not a positive multiple of {}", scale.max(8)),
                ));
            }
        }
        let steps = p.steps.unwrap_or(self.defaults.steps);
        if steps == 0 {
            return Err(Error::invalid("steps", "must be at least 1"));
        }
        let guidance_scale = p.guidance_scale.unwrap_or(self.defaults.guidance_scale);
        if !guidance_scale.is_finite() || !(0.0..=100.0).contains(&guidance_scale) {
            return Err(Error::invalid(
                "guidance_scale",
                format!("{guidance_scale} is not a finite number in [0, 100]"),
            ));
        }
        let num_images = p.num_images.max(1);
        let strength = match &p.init_image {
            Some(init) => {
                let s = init.strength;
                if !(s > 0.0 && s <= 1.0) {
                    return Err(Error::invalid("strength", format!("{s} is not in (0, 1]")));
                }
                if (steps as f64 * s) as usize == 0 {
                    return Err(Error::invalid(
                        "strength",
                        format!("steps × strength = {steps} × {s} < 1: nothing would be denoised"),
                    ));
                }
                Some(s)
            }
            None => None,
        };
        let seed = p.seed.unwrap_or_else(random_seed);
        if let Some(noise) = &p.noise {
            let expect = [
                num_images,
                self.unet.config().in_channels,
                height / scale,
                width / scale,
            ];
            check_shape("latents", &noise.latents.shape, &expect)?;
            if let Some(e) = &noise.encoder_noise {
                let one = [1, expect[1], expect[2], expect[3]];
                if e.shape != one {
                    check_shape("latents", &e.shape, &expect)?;
                }
            }
            if let Some(s) = &noise.step_noise {
                if s.shape.len() != 5 || s.shape[1..] != expect {
                    return Err(Error::invalid(
                        "latents",
                        format!(
                            "`step_noise` has shape {:?}, expected [steps, {}, {}, {}, {}]",
                            s.shape, expect[0], expect[1], expect[2], expect[3]
                        ),
                    ));
                }
            }
        }
        Ok(ResolvedParams {
            width,
            height,
            steps,
            guidance_scale,
            scheduler: p.scheduler.unwrap_or(self.defaults.scheduler),
            seed,
            num_images,
            strength,
        })
    }

    /// Runs one request. `on_progress` is called after every denoising step; returning
    /// `ControlFlow::Break` cancels the run before the next step ([`Error::Cancelled`]).
    pub fn generate(
        &self,
        p: &GenerateParams,
        on_progress: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let rp = self.resolve(p)?;
        let mut sched = scheduler::build(
            rp.scheduler,
            &self.scheduler_config,
            rp.steps,
            SCHEDULER_FILE,
        )?;
        let scale = self.vae_scale_factor();
        let n = rp.num_images;
        let shape = (
            n,
            self.unet.config().in_channels,
            rp.height / scale,
            rp.width / scale,
        );
        let per_image = shape.1 * shape.2 * shape.3;
        let mut streams: Vec<NormalStream> = (0..n as u64)
            .map(|i| NormalStream::new(rp.seed.wrapping_add(i)))
            .collect();
        let dev = &self.device;
        let host = |data: Vec<f32>| Tensor::from_vec(data, shape, dev);

        // 1. Text.
        let t0 = Instant::now();
        let cfg = rp.guidance_scale > 1.0;
        let context = self.encode_prompts(
            &p.prompt,
            p.negative_prompt.as_deref().unwrap_or(""),
            cfg,
            n,
        )?;
        let text_encode = t0.elapsed();

        // 2. Initial latents.
        let t1 = Instant::now();
        let timesteps = sched.timesteps().to_vec();
        let (start, mut latents) = match (&p.init_image, rp.strength) {
            (Some(init), Some(strength)) => {
                let init_steps = ((rp.steps as f64 * strength) as usize).min(rp.steps);
                let start = rp.steps - init_steps;
                let image = image_to_tensor(&init.image, rp.width, rp.height, dev)?
                    .to_dtype(self.vae_dtype)?;
                let dist = self.vae.encode(&image)?;
                // diffusers draws one posterior sample per init image (replay files may hold
                // one for the whole batch); our own noise draws one per image from its seed.
                let enc_noise = match p.noise.as_ref().and_then(|r| r.encoder_noise.as_ref()) {
                    Some(t) => Tensor::from_vec(t.data.clone(), t.shape.as_slice(), dev)?
                        .broadcast_as(shape)?
                        .contiguous()?,
                    None => host(noise::batch(&mut streams, per_image))?,
                };
                let dist = crate::vae::LatentDistribution {
                    mean: dist
                        .mean
                        .to_dtype(DType::F32)?
                        .broadcast_as(shape)?
                        .contiguous()?,
                    logvar: dist
                        .logvar
                        .to_dtype(DType::F32)?
                        .broadcast_as(shape)?
                        .contiguous()?,
                };
                let init_latents = dist.sample(&enc_noise)?;
                let init_latents = (init_latents * self.vae.config().scaling_factor)?;
                let noise = match &p.noise {
                    Some(r) => host(r.latents.data.clone())?,
                    None => host(noise::batch(&mut streams, per_image))?,
                };
                (start, sched.add_noise(&init_latents, &noise, start)?)
            }
            _ => {
                let noise = match &p.noise {
                    Some(r) => host(r.latents.data.clone())?,
                    None => host(noise::batch(&mut streams, per_image))?,
                };
                (0, (noise * sched.init_noise_sigma())?)
            }
        };

        // 3. Denoise.
        let total = timesteps.len() - start;
        let batch = if cfg { 2 * n } else { n };
        let mut replayed_steps = 0usize;
        for (done, i) in (start..timesteps.len()).enumerate() {
            let model_in = if cfg {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let model_in = sched.scale_model_input(model_in, i)?.to_dtype(self.dtype)?;
            let t = Tensor::full(timesteps[i] as f32, batch, dev)?;
            let pred = self
                .unet
                .forward(&model_in, &t, &context)?
                .to_dtype(DType::F32)?;
            let pred = if cfg {
                let halves = pred.chunk(2, 0)?;
                (&halves[0] + ((&halves[1] - &halves[0])? * rp.guidance_scale)?)?
            } else {
                pred
            };
            let mut draw = || -> Result<Tensor> {
                let data = match p.noise.as_ref().and_then(|r| r.step_noise.as_ref()) {
                    Some(s) => {
                        let k = replayed_steps;
                        replayed_steps += 1;
                        if (k + 1) * n * per_image > s.data.len() {
                            return Err(Error::invalid(
                                "latents",
                                format!(
                                    "`step_noise` holds {} steps, the run needs more",
                                    s.shape[0]
                                ),
                            ));
                        }
                        s.data[k * n * per_image..(k + 1) * n * per_image].to_vec()
                    }
                    None => noise::batch(&mut streams, per_image),
                };
                Ok(host(data)?)
            };
            latents = sched.step(&pred, i, &latents, &mut draw)?;
            let progress = Progress {
                step: done + 1,
                total_steps: total,
                timestep: timesteps[i],
            };
            if on_progress(&progress).is_break() {
                return Err(Error::Cancelled);
            }
        }
        let denoise = t1.elapsed();

        // 4. Decode.
        let t2 = Instant::now();
        let z = (latents / self.vae.config().scaling_factor)?.to_dtype(self.vae_dtype)?;
        let decoded = self.vae.decode(&z)?;
        let images = tensor_to_images(&decoded)?
            .into_iter()
            .enumerate()
            .map(|(i, image)| GeneratedImage {
                image,
                seed: rp.seed.wrapping_add(i as u64),
            })
            .collect();
        let decode = t2.elapsed();
        Ok(Generation {
            images,
            params: rp,
            timings: StageTimings {
                text_encode,
                denoise,
                decode,
            },
        })
    }

    /// Token ids for `text`, warning when the prompt is cut at the model's length.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let full = self.tokenizer.untruncated_len(text)?;
        let max = self.text_encoder.max_positions();
        if full > max {
            tracing::warn!(
                tokens = full,
                max,
                "prompt is longer than the text encoder accepts; the end is ignored"
            );
        }
        self.tokenizer.encode(text)
    }

    /// Text-encoder hidden states for a batch of prompts `[B, 77, D]`.
    pub fn encode_text(&self, prompts: &[&str]) -> Result<Tensor> {
        let ids = prompts
            .iter()
            .map(|p| self.tokenize(p))
            .collect::<Result<Vec<_>>>()?;
        let len = ids[0].len();
        let flat: Vec<u32> = ids.into_iter().flatten().collect();
        let ids = Tensor::from_vec(flat, (prompts.len(), len), &self.device)?;
        Ok(self.text_encoder.forward(&ids)?)
    }

    /// `[uncond × n, cond × n]` with guidance, `[cond × n]` without.
    fn encode_prompts(&self, prompt: &str, negative: &str, cfg: bool, n: usize) -> Result<Tensor> {
        let rows: Vec<&str> = if cfg {
            vec![negative, prompt]
        } else {
            vec![prompt]
        };
        let hidden = self.encode_text(&rows)?;
        let (b, l, d) = hidden.dims3()?;
        let repeated = hidden
            .unsqueeze(1)?
            .broadcast_as((b, n, l, d))?
            .reshape((b * n, l, d))?;
        Ok(repeated.to_dtype(self.dtype)?)
    }

    /// The UNet, for component tests and benchmarks.
    pub fn unet(&self) -> &UNet2DConditionModel {
        &self.unet
    }

    /// The VAE, for component tests and benchmarks.
    pub fn vae(&self) -> &AutoencoderKL {
        &self.vae
    }

    /// The device the pipeline runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }
}

fn check_shape(field: &'static str, got: &[usize], expect: &[usize; 4]) -> Result<()> {
    if got != expect {
        return Err(Error::invalid(field, format!("shape {got:?} does not match the request, expected {expect:?} ([num_images, channels, height/8, width/8])")));
    }
    Ok(())
}

/// A fresh seed when the request has none.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() >> 1
}
