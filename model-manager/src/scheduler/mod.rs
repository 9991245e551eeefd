//! Noise schedulers, configured from a checkpoint's `scheduler_config.json` exactly the way
//! diffusers' `SchedulerClass.from_config(config)` does: keys the class does not know are
//! ignored, keys that are missing take that class's own defaults.
//!
//! The oracle is diffusers 0.42.1: timesteps, sigmas and every step are reimplemented to give
//! the same numbers (see `tests.rs`, which replays trajectories recorded from diffusers by
//! `tests/fixtures/scheduler_reference.py`). Schedules are computed with diffusers' float32
//! roundings (torch builds `alphas_cumprod` and sigmas in float32); the step maths runs on f32
//! tensors with the scalar coefficients rounded to f32 in the same order torch does, and casts
//! the result back to the model output's dtype. Config values that would change the maths and
//! are not implemented are refused with [`Error::Unsupported`](crate::error::Error::Unsupported),
//! never approximated.

mod config;
mod ddim;
mod deis;
mod dpmpp;
mod euler;
mod euler_ancestral;
mod k_dpm2;
mod lcm;
mod lms;
mod pndm;
mod schedule;
mod unipc;

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use candle_core::{DType, Tensor};

pub use config::SchedulerConfig;

/// The schedulers a request can name, each a diffusers class (some with one option forced).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// `ddim`: diffusers `DDIMScheduler`, eta = 0.
    Ddim,
    /// `pndm`: diffusers `PNDMScheduler` (PLMS with `skip_prk_steps`, as SD 1.x ships it).
    Pndm,
    /// `euler`: diffusers `EulerDiscreteScheduler` as the config sets it up.
    Euler,
    /// `euler-karras`: the same with `use_karras_sigmas = true`.
    EulerKarras,
    /// `euler-a`: diffusers `EulerAncestralDiscreteScheduler` (draws noise every step).
    EulerAncestral,
    /// `lms`: diffusers `LMSDiscreteScheduler` (linear multistep, order 4) as the config sets it up.
    Lms,
    /// `lms-karras`: the same with `use_karras_sigmas = true`.
    LmsKarras,
    /// `heun`: diffusers `HeunDiscreteScheduler` (two model evaluations per step).
    Heun,
    /// `dpm2`: diffusers `KDPM2DiscreteScheduler` (two model evaluations per step).
    Dpm2,
    /// `dpm2-a`: diffusers `KDPM2AncestralDiscreteScheduler` (draws noise on its second
    /// evaluations).
    Dpm2Ancestral,
    /// `dpmpp-2m`: diffusers `DPMSolverMultistepScheduler` (dpmsolver++, order 2).
    DpmPp2m,
    /// `dpmpp-2m-karras`: the same with `use_karras_sigmas = true`.
    DpmPp2mKarras,
    /// `dpmpp-2m-sde`: `DPMSolverMultistepScheduler` with `sde-dpmsolver++` (draws noise every
    /// step).
    DpmPp2mSde,
    /// `dpmpp-2m-sde-karras`: the same with `use_karras_sigmas = true`.
    DpmPp2mSdeKarras,
    /// `unipc`: diffusers `UniPCMultistepScheduler` (bh2 predictor-corrector).
    UniPc,
    /// `deis`: diffusers `DEISMultistepScheduler` (log-rho).
    Deis,
    /// `lcm`: diffusers `LCMScheduler` (latent consistency models; draws noise every step
    /// but the last).
    Lcm,
}

impl SchedulerKind {
    /// Every kind, in the order they are listed to users.
    pub const ALL: [SchedulerKind; 17] = [
        SchedulerKind::Ddim,
        SchedulerKind::Pndm,
        SchedulerKind::Euler,
        SchedulerKind::EulerKarras,
        SchedulerKind::EulerAncestral,
        SchedulerKind::Lms,
        SchedulerKind::LmsKarras,
        SchedulerKind::Heun,
        SchedulerKind::Dpm2,
        SchedulerKind::Dpm2Ancestral,
        SchedulerKind::DpmPp2m,
        SchedulerKind::DpmPp2mKarras,
        SchedulerKind::DpmPp2mSde,
        SchedulerKind::DpmPp2mSdeKarras,
        SchedulerKind::UniPc,
        SchedulerKind::Deis,
        SchedulerKind::Lcm,
    ];

    /// The name requests use for this kind (`ddim`, `euler-a`, `dpmpp-2m-sde-karras`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerKarras => "euler-karras",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::Lms => "lms",
            SchedulerKind::LmsKarras => "lms-karras",
            SchedulerKind::Heun => "heun",
            SchedulerKind::Dpm2 => "dpm2",
            SchedulerKind::Dpm2Ancestral => "dpm2-a",
            SchedulerKind::DpmPp2m => "dpmpp-2m",
            SchedulerKind::DpmPp2mKarras => "dpmpp-2m-karras",
            SchedulerKind::DpmPp2mSde => "dpmpp-2m-sde",
            SchedulerKind::DpmPp2mSdeKarras => "dpmpp-2m-sde-karras",
            SchedulerKind::UniPc => "unipc",
            SchedulerKind::Deis => "deis",
            SchedulerKind::Lcm => "lcm",
        }
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;

    /// Parses a request's scheduler name (ASCII case-insensitive, surrounding spaces ignored).
    fn from_str(s: &str) -> Result<Self> {
        let wanted = s.trim();
        SchedulerKind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(wanted))
            .ok_or_else(|| {
                let valid: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.as_str()).collect();
                Error::invalid(
                    "scheduler",
                    format!("unknown scheduler `{s}`; valid names: {}", valid.join(", ")),
                )
            })
    }
}

/// The scheduler used when a checkpoint's own scheduler class is not one we implement
/// (`SchedulerConfig::native_kind()` is `None`, e.g. `DDPMScheduler`).
///
/// DDIM is the closest stand-in for those checkpoints: it reads the same
/// `alphas_cumprod` parametrisation (beta schedule, `set_alpha_to_one`, `steps_offset`) and
/// defaults to `leading` timestep spacing, like the SD 1.x schedulers. It is deterministic
/// (eta = 0) and first order, so it never needs noise draws or multistep state.
pub const FALLBACK: SchedulerKind = SchedulerKind::Ddim;

/// One configured scheduler for one run of `num_inference_steps` steps.
///
/// `step_index` is always an index into [`Scheduler::timesteps`]. A txt2img run calls
/// `step` for 0..len; an img2img run starts at `begin` (diffusers' `set_begin_index`) and calls
/// `add_noise(.., begin)` first. Build a new scheduler for every run: multistep schedulers keep
/// the history of the run in progress.
pub trait Scheduler: Send {
    /// The timesteps to feed the UNet, in order (fractional where the scheduler makes them so).
    fn timesteps(&self) -> &[f64];
    /// Factor the initial noise is multiplied by for txt2img (1 for the variance-preserving
    /// schedulers: DDIM, PNDM, the DPM/UniPC/DEIS solvers, LCM).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// Scale the (CFG-duplicated) latents before the UNet call at `step_index` (unchanged
    /// for the variance-preserving schedulers; the k-diffusion ones divide by
    /// `sqrt(sigma² + 1)`).
    fn scale_model_input(&self, sample: Tensor, _step_index: usize) -> Result<Tensor> {
        Ok(sample)
    }
    /// One denoising step; `noise(dtype)` is called (only by the schedulers that draw) for a
    /// standard normal tensor shaped like `sample`, drawn from the request's own RNG as a
    /// tensor of `dtype` (the model output's, or f32 where diffusers draws f32 regardless).
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn FnMut(DType) -> Result<Tensor>,
    ) -> Result<Tensor>;
    /// Noise clean latents to the level of `step_index` (img2img).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor>;
    /// Model evaluations per step, diffusers' `scheduler.order`: an img2img run starting at
    /// step `k` starts at timestep index `k × order`, and progress counts steps, not
    /// evaluations (see [`counts_as_step`]).
    fn order(&self) -> usize {
        1
    }
}

/// Whether evaluation `i` of a run of `evaluations` model calls for `steps` requested steps
/// completes a step, as diffusers' pipelines advance their progress bar: every `order`-th
/// evaluation after the warm-up ones (`evaluations − steps × order`: PLMS's extra first
/// evaluation), and the last.
pub fn counts_as_step(i: usize, evaluations: usize, steps: usize, order: usize) -> bool {
    let warmup = evaluations as i64 - (steps * order) as i64;
    i + 1 == evaluations || ((i + 1) as i64 > warmup && (i + 1).is_multiple_of(order))
}

/// Builds the scheduler `kind` for `num_inference_steps` steps from a checkpoint's scheduler
/// config, resolving missing keys to the defaults of `kind`'s diffusers class.
///
/// The `-karras` names force `use_karras_sigmas = true`; `dpmpp-2m` and `dpmpp-2m-sde` force it
/// `false` and force `algorithm_type` (`dpmsolver++` / `sde-dpmsolver++`); every other field,
/// `euler`'s and `lms`'s Karras flag included, comes from `config`. `config_file` names the config in errors. Fails with
/// [`Error::InvalidParam`] (`steps`) for 0 steps or more steps than training timesteps, and with
/// [`Error::Unsupported`] naming the field for config values that are not implemented.
pub fn build(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    num_inference_steps: usize,
    config_file: &str,
) -> Result<Box<dyn Scheduler>> {
    let num_train = config.num_train_timesteps.unwrap_or(1000);
    if num_inference_steps == 0 {
        return Err(Error::invalid("steps", "must be at least 1"));
    }
    if num_inference_steps > num_train {
        return Err(Error::invalid(
            "steps",
            format!("{num_inference_steps} exceeds the model's {num_train} training timesteps"),
        ));
    }
    use SchedulerKind as K;
    let (n, file) = (num_inference_steps, config_file);
    Ok(match kind {
        K::Ddim => Box::new(ddim::Ddim::new(config, n, file)?),
        K::Pndm => Box::new(pndm::Pndm::new(config, n, file)?),
        K::Euler => Box::new(euler::Euler::new(config, n, None, file)?),
        K::EulerKarras => Box::new(euler::Euler::new(config, n, Some(true), file)?),
        K::EulerAncestral => Box::new(euler_ancestral::EulerAncestral::new(config, n, file)?),
        K::Lms => Box::new(lms::Lms::new(config, n, None, file)?),
        K::LmsKarras => Box::new(lms::Lms::new(config, n, Some(true), file)?),
        K::Heun => Box::new(k_dpm2::SecondOrder::new(
            config,
            n,
            k_dpm2::Variant::Heun,
            file,
        )?),
        K::Dpm2 => Box::new(k_dpm2::SecondOrder::new(
            config,
            n,
            k_dpm2::Variant::Dpm2,
            file,
        )?),
        K::Dpm2Ancestral => Box::new(k_dpm2::SecondOrder::new(
            config,
            n,
            k_dpm2::Variant::Dpm2Ancestral,
            file,
        )?),
        K::DpmPp2m => Box::new(dpmpp::DpmPp2m::new(config, n, false, false, file)?),
        K::DpmPp2mKarras => Box::new(dpmpp::DpmPp2m::new(config, n, true, false, file)?),
        K::DpmPp2mSde => Box::new(dpmpp::DpmPp2m::new(config, n, false, true, file)?),
        K::DpmPp2mSdeKarras => Box::new(dpmpp::DpmPp2m::new(config, n, true, true, file)?),
        K::UniPc => Box::new(unipc::UniPc::new(config, n, file)?),
        K::Deis => Box::new(deis::Deis::new(config, n, file)?),
        K::Lcm => Box::new(lcm::Lcm::new(config, n, file)?),
    })
}

#[cfg(test)]
mod config_tests;
#[cfg(test)]
mod tests;
