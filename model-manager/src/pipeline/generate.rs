//! One request through the pipeline, as diffusers' `__call__` reads: plan (resolve, scheduler,
//! noise) → condition (text encoders) → initial latents (txt2img noise or an encoded init
//! image) → denoise (classifier-free guidance in one `predict`) → decode.

use super::control::{self, ActiveControl, CallConditioning};
use super::residency::Stage;
use super::{StableDiffusionPipeline, SCHEDULER_FILE};
use crate::controlnet::ControlNetModel;
use crate::error::{Error, Result};
use crate::image_io::{image_to_tensor, tensor_to_images};
use crate::inpaint;
use crate::noise::RequestNoise;
use crate::params::*;
use crate::scheduler;
use crate::unet::AddedConditioning;
use candle_core::{DType, Tensor};
use std::ops::ControlFlow;
use std::sync::Arc;
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
        self.generate_with_nets(p, limits, &[], on_progress)
    }

    /// [`StableDiffusionPipeline::generate_within`] steered by `nets`, the loaded ControlNets
    /// of `p.controlnets` in the same order (each must fit this model:
    /// [`ControlNetModel::check_compatible`]).
    pub fn generate_with_nets(
        &self,
        p: &GenerateParams,
        limits: &super::RequestLimits,
        nets: &[Arc<ControlNetModel>],
        on_progress: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<Generation> {
        if let Some(cropped) = self.crop_inpaint(p, limits, nets, on_progress)? {
            return Ok(cropped);
        }
        if p.controlnets.len() != nets.len() {
            return Err(Error::invalid(
                "controlnets",
                format!("{} requested, {} loaded", p.controlnets.len(), nets.len()),
            ));
        }
        for net in nets {
            net.check_compatible(self.unet.config(), self.vae_scale_factor())?;
        }
        let mut plan = self.plan(p, limits)?;
        let frame = (plan.rp.width, plan.rp.height, plan.rp.num_images);
        for (net, request) in nets.iter().zip(&p.controlnets) {
            let active = ActiveControl::new(
                net.clone(),
                request,
                frame,
                plan.cfg,
                self.dtype,
                &self.device,
            )?;
            plan.inputs.controls.push(active);
        }
        let t0 = Instant::now();
        self.pages.enter(Stage::Text, nets);
        let cond = self.condition(
            &p.prompt,
            p.negative_prompt.as_deref(),
            plan.cfg,
            plan.rp.num_images,
            plan.rp.size_conditioning,
        )?;
        let text_encode = t0.elapsed();
        let t1 = Instant::now();
        self.pages.enter(Stage::Vae, nets);
        let (start, latents) = self.initial_latents(p, &mut plan)?;
        self.pages.enter(Stage::Denoise, nets);
        let latents = self.denoise(p, &mut plan, &cond, start, latents, on_progress)?;
        let denoise = t1.elapsed();
        let t2 = Instant::now();
        self.pages.enter(Stage::Vae, nets);
        let images = self.decode(&latents, &plan.rp)?;
        self.pages.enter(Stage::Idle, nets);
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

    /// diffusers' `padding_mask_crop`: when the request asks for it, inpaints only the
    /// mask's padded bounding box (at the resolved output size) and pastes each image back
    /// into the full init image; `None` for every other request.
    fn crop_inpaint(
        &self,
        p: &GenerateParams,
        limits: &super::RequestLimits,
        nets: &[Arc<ControlNetModel>],
        on_progress: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<Option<Generation>> {
        let Some(init) = &p.init_image else {
            return Ok(None);
        };
        let (Some(mask), Some(pad)) = (&init.mask, init.mask_crop_padding) else {
            return Ok(None);
        };
        // The rules (a mask of the image's size, with something to repaint) are resolve's.
        let rp = self.resolve_within(p, limits)?;
        let region = inpaint::CropRegion::of(mask, rp.width, rp.height, pad)?;
        let cropped = GenerateParams {
            width: Some(rp.width),
            height: Some(rp.height),
            seed: Some(rp.seed),
            init_image: Some(InitImage {
                image: region.crop(&init.image),
                strength: init.strength,
                mask: Some(region.crop(mask)),
                mask_crop_padding: None,
            }),
            ..p.clone()
        };
        let mut generation = self.generate_with_nets(&cropped, limits, nets, on_progress)?;
        for img in &mut generation.images {
            img.image = region.paste_back(&img.image, &init.image, mask);
        }
        Ok(Some(generation))
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
            self.description.latent_channels,
            rp.height / scale,
            rp.width / scale,
        );
        Ok(Plan {
            cfg: rp.guidance_scale > 1.0,
            sched,
            noise: NoiseSource {
                draws: RequestNoise::new(rp.rng, rp.seed, rp.num_images, self.torch_cuda_grid),
                shape,
                device: self.device.clone(),
                replayed_steps: 0,
            },
            inputs: DenoiserInputs::default(),
            blend: None,
            rp,
        })
    }

    /// txt2img: scaled noise from step 0. img2img: the encoded init image noised to the step
    /// its strength starts at. Inpainting: see [`Self::inpaint_latents`]. Returns the first
    /// timestep index (diffusers' `t_start × order`) and the latents.
    fn initial_latents(&self, p: &GenerateParams, plan: &mut Plan) -> Result<(usize, Tensor)> {
        let replay = p.noise.as_ref();
        let (Some(init), Some(strength)) = (&p.init_image, plan.rp.strength) else {
            let n = plan.noise.latents(replay.map(|r| &r.latents), self.dtype)?;
            return Ok((0, (n * plan.sched.init_noise_sigma())?));
        };
        let steps = plan.rp.steps;
        let start = (steps - ((steps as f64 * strength) as usize).min(steps)) * plan.sched.order();
        let image = image_to_tensor(&init.image, plan.rp.width, plan.rp.height, &self.device)?;
        if let Some(mask) = &init.mask {
            let latents = self.inpaint_latents(&image, mask, strength, start, plan)?;
            return Ok((start, latents));
        }
        let encoder_noise = replay.and_then(|r| r.encoder_noise.as_ref());
        let init_latents = self.encode_sample(&image, plan, encoder_noise)?;
        let n = plan.noise.latents(replay.map(|r| &r.latents), self.dtype)?;
        Ok((start, plan.sched.add_noise(&init_latents, &n, start)?))
    }

    /// Inpainting, in diffusers' order of draws: the init image's posterior sample (4-channel
    /// UNets, or strength < 1), the initial noise, the masked image's posterior sample (always,
    /// as diffusers draws it even where a 4-channel UNet never uses it). A 9-channel UNet gets
    /// the latent mask ⊕ masked-image latents as extra input channels; a 4-channel UNet's
    /// latents are blended with the re-noised init latents after every step ([`Blend`]).
    fn inpaint_latents(
        &self,
        image: &Tensor,
        mask: &image::GrayImage,
        strength: f64,
        start: usize,
        plan: &mut Plan,
    ) -> Result<Tensor> {
        let nine = self.description.inpainting_unet;
        let full = strength >= 1.0;
        let image_latents = match !nine || !full {
            true => Some(self.encode_sample(image, plan, None)?),
            false => None,
        };
        let noise = plan.noise.latents(None, self.dtype)?;
        let latents = match &image_latents {
            Some(init) if !full => plan.sched.add_noise(init, &noise, start)?,
            _ => (&noise * plan.sched.init_noise_sigma())?,
        };
        let (w, h) = (plan.rp.width, plan.rp.height);
        let mask_px = inpaint::mask_tensor(mask, w, h, &self.device)?;
        // The init image where the mask keeps, 0 where it repaints.
        let masked_image = image.broadcast_mul(&(1.0 - &mask_px)?)?;
        let masked_latents = self.encode_sample(&masked_image, plan, None)?;
        let (n, _, lh, lw) = plan.noise.shape;
        let latent_mask = inpaint::latent_mask(&mask_px, self.vae_scale_factor())?
            .broadcast_as((n, 1, lh, lw))?
            .contiguous()?;
        match image_latents {
            Some(image_latents) if !nine => {
                plan.blend = Some(Blend {
                    image_latents,
                    noise,
                    mask: latent_mask,
                })
            }
            _ => {
                let concat = Tensor::cat(&[&latent_mask, &masked_latents], 1)?;
                plan.inputs.concat = Some(concat.to_dtype(self.dtype)?);
            }
        }
        Ok(latents)
    }

    /// The VAE posterior sample of `image` (`[1, 3, H, W]` in [-1, 1]) for every image of the
    /// batch, scaled: one draw of the request's generator (or `replay`'s noise).
    fn encode_sample(
        &self,
        image: &Tensor,
        plan: &mut Plan,
        replay: Option<&HostTensor>,
    ) -> Result<Tensor> {
        let dev = &self.device;
        let image = image.to_dtype(self.vae_dtype)?;
        let dist = {
            let _tf32 = crate::device::allow_tf32(dev);
            self.vae.encode(&image)?
        };
        let shape = plan.noise.shape;
        // diffusers draws one posterior sample for the image before repeating it for the
        // batch (replay files may hold one for the whole batch); `chacha` draws one per image.
        let enc_noise = match replay {
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
        Ok((dist.sample(&enc_noise)? * self.vae.config().scaling_factor)?)
    }

    /// The UNet's noise prediction for latents `x` at timestep `t`, with classifier-free
    /// guidance when `guidance` is given (the batch runs the unconditional and conditional
    /// halves at once). LoRA-merged weights, ControlNet residuals and batching plug in here.
    /// `step` is the evaluation's index in the run and the run's length (ControlNets steer a
    /// window of it).
    fn predict(
        &self,
        x: &Tensor,
        t: f64,
        cond: &Conditioning,
        inputs: &DenoiserInputs,
        guidance: Option<f64>,
        step: (usize, usize),
    ) -> Result<Tensor> {
        let x = x.to_dtype(self.dtype)?;
        let rows = x.dim(0)? * if guidance.is_some() { 2 } else { 1 };
        let t = Tensor::full(t as f32, rows, &self.device)?;
        let call = CallConditioning {
            context: &cond.context,
            added: cond.added.as_ref(),
        };
        let residuals =
            control::residuals(&inputs.controls, &x, &t, &call, guidance.is_some(), step)?;
        let x = match &inputs.concat {
            Some(extra) => Tensor::cat(&[&x, extra], 1)?,
            None => x,
        };
        let model_in = match guidance {
            Some(_) => Tensor::cat(&[&x, &x], 0)?,
            None => x,
        };
        let pred = self
            .unet
            .forward_with_residuals(
                &model_in,
                &t,
                &cond.context,
                cond.added.as_ref(),
                residuals.as_ref(),
            )?
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
            inputs,
            blend,
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
            let pred = self.predict(&x, timesteps[i], cond, inputs, guidance, (k, evaluations))?;
            // Only a stochastic scheduler (euler-a, dpm2-a, the SDEs, lcm) draws.
            let mut draw = |dtype: DType| noise.step(replay, dtype);
            latents = sched.step(&pred, i, &latents, &mut draw)?;
            if let Some(blend) = blend {
                let next = (i + 1 < timesteps.len()).then_some(i + 1);
                latents = blend.apply(sched.as_ref(), &latents, next)?;
            }
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
    /// What the UNet takes besides latents, timestep and text.
    inputs: DenoiserInputs,
    /// 4-channel inpainting's blend after every step.
    blend: Option<Blend>,
}

/// The UNet's inputs besides the latents, timestep and text, for every call of one request:
/// the one place a new conditioning plugs in ([`StableDiffusionPipeline::predict`]).
#[derive(Default)]
struct DenoiserInputs {
    /// Channels appended to the scaled latents (9-channel inpainting: the latent mask ⊕ the
    /// masked image's latents), `[N, c, h, w]` in the UNet's dtype.
    concat: Option<Tensor>,
    /// ControlNets, whose summed residuals the UNet adds to its skip connections.
    controls: Vec<ActiveControl>,
}

/// 4-channel inpainting (diffusers' `num_channels_unet == 4` branch): after each step the
/// latents keep the init image's latents — noised to the next timestep with the initial
/// noise, clean after the last step — where the mask keeps.
struct Blend {
    image_latents: Tensor,
    noise: Tensor,
    /// `[N, 1, h, w]`, 1 = repaint.
    mask: Tensor,
}

impl Blend {
    /// `(1 − mask) · init + mask · latents`, `init` noised to timestep index `next`.
    fn apply(
        &self,
        sched: &dyn scheduler::Scheduler,
        latents: &Tensor,
        next: Option<usize>,
    ) -> Result<Tensor> {
        let init = match next {
            Some(j) => sched.add_noise(&self.image_latents, &self.noise, j)?,
            None => self.image_latents.clone(),
        };
        let mask = self.mask.to_dtype(latents.dtype())?;
        let keep = (1.0 - &mask)?.broadcast_mul(&init.to_dtype(latents.dtype())?)?;
        Ok((keep + mask.broadcast_mul(latents)?)?)
    }
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
