//! One request through the pipeline: text conditioning, initial latents (txt2img noise or an
//! encoded init image), the denoising loop with classifier-free guidance, and the VAE decode.

use super::{StableDiffusionPipeline, SCHEDULER_FILE};
use crate::error::{Error, Result};
use crate::image_io::{image_to_tensor, tensor_to_images};
use crate::noise::{self, NormalStream};
use crate::params::*;
use crate::scheduler;
use crate::unet::AddedConditioning;
use candle_core::{DType, Tensor};
use std::ops::ControlFlow;
use std::time::Instant;

impl StableDiffusionPipeline {
    /// Runs one step of a tiny real generation through every stage (text encoders, the UNet
    /// at every resolution level, with classifier-free guidance when the model defaults to it,
    /// the VAE decode) so first-use costs are paid before serving: kernel loading and
    /// compilation on a GPU, first-touch allocations. The image is the smallest the UNet
    /// accepts, `vae scale × 2^(down blocks − 1)` pixels square.
    pub fn warm_up(&self) -> Result<std::time::Duration> {
        let started = Instant::now();
        let levels = self.unet.config().block_out_channels.len().max(1);
        let side = self.vae_scale_factor() << (levels - 1);
        let params = GenerateParams {
            prompt: "warm-up".into(),
            width: Some(side),
            height: Some(side),
            steps: Some(1),
            seed: Some(0),
            scheduler: Some(scheduler::SchedulerKind::Ddim),
            ..Default::default()
        };
        self.generate(&params, &mut |_| ControlFlow::Continue(()))?;
        Ok(started.elapsed())
    }

    /// Runs one request. `on_progress` is called after every denoising step; returning
    /// `ControlFlow::Break` cancels the run before the next step ([`Error::Cancelled`]).
    pub fn generate(
        &self,
        p: &GenerateParams,
        on_progress: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<Generation> {
        self.generate_within(p, &super::RequestLimits::default(), on_progress)
    }

    /// [`StableDiffusionPipeline::generate`] refusing requests beyond an operator's `limits`.
    pub fn generate_within(
        &self,
        p: &GenerateParams,
        limits: &super::RequestLimits,
        on_progress: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let rp = self.resolve_within(p, limits)?;
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
        let (context, added) = self.condition(
            &p.prompt,
            p.negative_prompt.as_deref(),
            cfg,
            n,
            rp.size_conditioning,
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
                let dist = {
                    let _tf32 = crate::device::allow_tf32(dev);
                    self.vae.encode(&image)?
                };
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
                .forward_with(&model_in, &t, &context, added.as_ref())?
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
        let decoded = {
            let _tf32 = crate::device::allow_tf32(dev);
            self.vae.decode(&z)?
        };
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

    /// UNet conditioning for one request: the context `[uncond × n, cond × n]` with guidance,
    /// `[cond × n]` without, and for SDXL the matching pooled embeddings and time ids. An absent
    /// negative prompt is "" — or, for SDXL with `force_zeros_for_empty_prompt`, all-zero
    /// embeddings — as in diffusers.
    fn condition(
        &self,
        prompt: &str,
        negative: Option<&str>,
        cfg: bool,
        n: usize,
        size: Option<ResolvedSizeConditioning>,
    ) -> Result<(Tensor, Option<AddedConditioning>)> {
        let zero_negative = cfg && negative.is_none() && self.text.zeros_for_absent_negative();
        let rows: Vec<&str> = if cfg && !zero_negative {
            vec![negative.unwrap_or(""), prompt]
        } else {
            vec![prompt]
        };
        let embeddings = self.text.encode(&rows, &self.device)?;
        let with_zero_row = |t: Tensor| -> Result<Tensor> {
            if zero_negative {
                Ok(Tensor::cat(&[&t.zeros_like()?, &t], 0)?)
            } else {
                Ok(t)
            }
        };
        let context = repeat_rows(&with_zero_row(embeddings.context)?, n)?.to_dtype(self.dtype)?;
        let added = match (self.unet.added_conditioning(), embeddings.pooled, size) {
            (None, _, _) => None,
            (Some(_), Some(pooled), Some(size)) => {
                let text_embeds = repeat_rows(&with_zero_row(pooled)?, n)?.to_dtype(self.dtype)?;
                let b = text_embeds.dim(0)?;
                let ids: Vec<f32> = (0..b).flat_map(|_| size.time_ids()).collect();
                let time_ids = Tensor::from_vec(ids, (b, 6), &self.device)?;
                Some(AddedConditioning {
                    text_embeds,
                    time_ids,
                })
            }
            (Some(_), _, _) => {
                return Err(Error::Config {
                    file: "model_index.json".into(),
                    reason: "the UNet needs a pooled text embedding and size conditioning, \
                             which only an SDXL pipeline provides"
                        .into(),
                })
            }
        };
        Ok((context, added))
    }
}

/// Repeats every row of `t` (`[B, …]`) `n` times in place: `[r0, r0, r1, r1, …]`.
fn repeat_rows(t: &Tensor, n: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let mut expanded = dims.clone();
    expanded.insert(1, n);
    let mut flat = dims;
    flat[0] *= n;
    Ok(t.unsqueeze(1)?.broadcast_as(expanded)?.reshape(flat)?)
}
