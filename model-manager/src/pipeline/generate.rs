//! One request through the pipeline, as diffusers' `__call__` reads: plan (resolve, scheduler,
//! noise) → condition (text encoders) → initial latents (txt2img noise or an encoded init
//! image) → denoise (classifier-free guidance in one `predict`) → decode.

use super::{StableDiffusionPipeline, SCHEDULER_FILE};
use crate::error::{Error, Result};
use crate::image_io::{image_to_tensor, tensor_to_images};
use crate::noise::RequestNoise;
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
        let mut plan = self.plan(p, limits)?;
        let t0 = Instant::now();
        let cond = self.condition(
            &p.prompt,
            p.negative_prompt.as_deref(),
            plan.cfg,
            plan.rp.num_images,
            plan.rp.size_conditioning,
        )?;
        let text_encode = t0.elapsed();
        let t1 = Instant::now();
        let (start, latents) = self.initial_latents(p, &mut plan)?;
        let latents = self.denoise(p, &mut plan, &cond, start, latents, on_progress)?;
        let denoise = t1.elapsed();
        let t2 = Instant::now();
        let images = self.decode(&latents, &plan.rp)?;
        Ok(Generation {
            images,
            params: plan.rp,
            timings: StageTimings {
                text_encode,
                denoise,
                decode: t2.elapsed(),
            },
        })
    }

    /// The resolved request, its scheduler and its noise generator.
    fn plan(&self, p: &GenerateParams, limits: &super::RequestLimits) -> Result<Plan> {
        let rp = self.resolve_within(p, limits)?;
        let sched = scheduler::build(
            rp.scheduler,
            &self.scheduler_config,
            rp.steps,
            SCHEDULER_FILE,
        )?;
        let scale = self.vae_scale_factor();
        let shape = (
            rp.num_images,
            self.unet.config().in_channels,
            rp.height / scale,
            rp.width / scale,
        );
        Ok(Plan {
            cfg: rp.guidance_scale > 1.0,
            sched,
            noise: NoiseSource {
                draws: RequestNoise::new(rp.rng, rp.seed, rp.num_images),
                shape,
                device: self.device.clone(),
                replayed_steps: 0,
            },
            rp,
        })
    }

    /// txt2img: scaled noise from step 0. img2img: the encoded init image noised to the step
    /// its strength starts at. Returns the first timestep index (diffusers' `t_start × order`)
    /// and the latents.
    fn initial_latents(&self, p: &GenerateParams, plan: &mut Plan) -> Result<(usize, Tensor)> {
        let replay = p.noise.as_ref();
        let (Some(init), Some(strength)) = (&p.init_image, plan.rp.strength) else {
            let n = plan.noise.latents(replay.map(|r| &r.latents), self.dtype)?;
            return Ok((0, (n * plan.sched.init_noise_sigma())?));
        };
        let steps = plan.rp.steps;
        let start = (steps - ((steps as f64 * strength) as usize).min(steps)) * plan.sched.order();
        let dev = &self.device;
        let image = image_to_tensor(&init.image, plan.rp.width, plan.rp.height, dev)?
            .to_dtype(self.vae_dtype)?;
        let dist = {
            let _tf32 = crate::device::allow_tf32(dev);
            self.vae.encode(&image)?
        };
        let shape = plan.noise.shape;
        // diffusers draws one posterior sample for the init image before repeating it for the
        // batch (replay files may hold one for the whole batch); `chacha` draws one per image.
        let enc_noise = match replay.and_then(|r| r.encoder_noise.as_ref()) {
            Some(t) => Tensor::from_vec(t.data.clone(), t.shape.as_slice(), dev)?
                .broadcast_as(shape)?
                .contiguous()?,
            None => plan.noise.posterior(self.vae_dtype)?,
        };
        let widen = |t: &Tensor| -> Result<Tensor> {
            Ok(t.to_dtype(DType::F32)?.broadcast_as(shape)?.contiguous()?)
        };
        let dist = crate::vae::LatentDistribution {
            mean: widen(&dist.mean)?,
            logvar: widen(&dist.logvar)?,
        };
        let init_latents = (dist.sample(&enc_noise)? * self.vae.config().scaling_factor)?;
        let n = plan.noise.latents(replay.map(|r| &r.latents), self.dtype)?;
        Ok((start, plan.sched.add_noise(&init_latents, &n, start)?))
    }

    /// The UNet's noise prediction for latents `x` at timestep `t`, with classifier-free
    /// guidance when `guidance` is given (the batch runs the unconditional and conditional
    /// halves at once). LoRA-merged weights, ControlNet residuals and batching plug in here.
    fn predict(
        &self,
        x: &Tensor,
        t: f64,
        cond: &Conditioning,
        guidance: Option<f64>,
    ) -> Result<Tensor> {
        let model_in = match guidance {
            Some(_) => Tensor::cat(&[x, x], 0)?,
            None => x.clone(),
        }
        .to_dtype(self.dtype)?;
        let t = Tensor::full(t as f32, model_in.dim(0)?, &self.device)?;
        let pred = self
            .unet
            .forward_with(&model_in, &t, &cond.context, cond.added.as_ref())?
            .to_dtype(DType::F32)?;
        match guidance {
            Some(g) => {
                let halves = pred.chunk(2, 0)?;
                Ok((&halves[0] + ((&halves[1] - &halves[0])? * g)?)?)
            }
            None => Ok(pred),
        }
    }

    /// The denoising loop from timestep index `start`, one `on_progress` call per step as
    /// diffusers counts them ([`scheduler::counts_as_step`]: PLMS's first two evaluations make
    /// one step; a second-order scheduler's two evaluations one).
    fn denoise(
        &self,
        p: &GenerateParams,
        plan: &mut Plan,
        cond: &Conditioning,
        start: usize,
        mut latents: Tensor,
        on_progress: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<Tensor> {
        let Plan {
            rp,
            sched,
            noise,
            cfg,
        } = plan;
        let timesteps = sched.timesteps().to_vec();
        let guidance = cfg.then_some(rp.guidance_scale);
        let replay = p.noise.as_ref().and_then(|r| r.step_noise.as_ref());
        let order = sched.order();
        let evaluations = timesteps.len() - start;
        // Steps this run takes: img2img runs the last `start / order` of them.
        let total_steps = rp.steps - start / order;
        let mut done = 0;
        for (k, i) in (start..timesteps.len()).enumerate() {
            let x = sched.scale_model_input(latents.clone(), i)?;
            let pred = self.predict(&x, timesteps[i], cond, guidance)?;
            // Only a stochastic scheduler (euler-a, dpm2-a, the SDEs, lcm) draws.
            let mut draw = |dtype: DType| noise.step(replay, dtype);
            latents = sched.step(&pred, i, &latents, &mut draw)?;
            if !scheduler::counts_as_step(k, evaluations, total_steps, order) {
                continue;
            }
            done += 1;
            let progress = Progress {
                step: done,
                total_steps,
                timestep: timesteps[i],
            };
            if on_progress(&progress).is_break() {
                return Err(Error::Cancelled);
            }
        }
        Ok(latents)
    }

    /// Latents to images, each with its seed.
    fn decode(&self, latents: &Tensor, rp: &ResolvedParams) -> Result<Vec<GeneratedImage>> {
        let z = (latents / self.vae.config().scaling_factor)?.to_dtype(self.vae_dtype)?;
        let decoded = {
            let _tf32 = crate::device::allow_tf32(&self.device);
            self.vae.decode(&z)?
        };
        Ok(tensor_to_images(&decoded)?
            .into_iter()
            .enumerate()
            .map(|(i, image)| GeneratedImage {
                image,
                seed: rp.rng.image_seed(rp.seed, i),
            })
            .collect())
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
    ) -> Result<Conditioning> {
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
        Ok(Conditioning { context, added })
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

/// One request's plan: what it resolved to, its scheduler and its noise.
struct Plan {
    rp: ResolvedParams,
    sched: Box<dyn scheduler::Scheduler>,
    noise: NoiseSource,
    /// Classifier-free guidance runs (guidance > 1).
    cfg: bool,
}

/// Where a request's noise comes from: its generator, or a replay file.
struct NoiseSource {
    draws: RequestNoise,
    /// `[N, C, h, w]` of the latents.
    shape: (usize, usize, usize, usize),
    device: candle_core::Device,
    /// Steps of `step_noise` replayed so far.
    replayed_steps: usize,
}

impl NoiseSource {
    fn per_image(&self) -> usize {
        self.shape.1 * self.shape.2 * self.shape.3
    }

    fn tensor(&self, data: Vec<f32>) -> Result<Tensor> {
        Ok(Tensor::from_vec(data, self.shape, &self.device)?)
    }

    /// A batch of latent-shaped noise: `replay` if given, else drawn by the generator as a
    /// tensor of `dtype` would be (diffusers draws the latents in the UNet's dtype).
    fn latents(&mut self, replay: Option<&HostTensor>, dtype: DType) -> Result<Tensor> {
        let data = match replay {
            Some(r) => r.data.clone(),
            None => self.draws.batch(self.shape.0, self.per_image(), dtype),
        };
        self.tensor(data)
    }

    /// The VAE posterior noise of the init image, for every image of the batch, drawn in the
    /// VAE's `dtype`.
    fn posterior(&mut self, dtype: DType) -> Result<Tensor> {
        let data = self.draws.posterior(self.shape.0, self.per_image(), dtype);
        self.tensor(data)
    }

    /// The noise of one stochastic step: the next step of `replay`, else drawn by the generator
    /// in `dtype`.
    fn step(&mut self, replay: Option<&HostTensor>, dtype: DType) -> Result<Tensor> {
        let Some(s) = replay else {
            return self.latents(None, dtype);
        };
        let (k, len) = (self.replayed_steps, self.shape.0 * self.per_image());
        self.replayed_steps += 1;
        if (k + 1) * len > s.data.len() {
            return Err(Error::invalid(
                "latents",
                format!(
                    "`step_noise` holds {} steps, the run needs more",
                    s.shape[0]
                ),
            ));
        }
        self.tensor(s.data[k * len..(k + 1) * len].to_vec())
    }
}

/// The UNet's conditioning for one request: the cross-attention context (`[uncond × n,
/// cond × n]` with guidance) and, for SDXL, the pooled embeddings and time ids.
struct Conditioning {
    context: Tensor,
    added: Option<AddedConditioning>,
}
