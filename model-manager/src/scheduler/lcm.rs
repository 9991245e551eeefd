//! Latent consistency models' multistep sampling, as diffusers' `LCMScheduler`.
//!
//! The timesteps are a subset of the distillation schedule (`original_inference_steps` evenly
//! spaced training timesteps), not of `timestep_spacing`. Each step maps the model output to
//! the consistency function's estimate (`c_skip · x + c_out · x0`) and, except at the last step,
//! re-noises it to the next timestep with a fresh draw — with or without guidance.

use candle_core::{DType, Tensor};

use super::config::{refuse_flag, BetaDefaults, Common, PredictionType, SchedulerConfig, Spacing};
use super::schedule::{
    alphas_cumprod, check_noise_shape, ddpm_add_noise, div, f32_of, mul, past_end,
};
use super::Scheduler;
use crate::error::{Error, Result};

/// The consistency models' `sigma_data`.
const SIGMA_DATA: f32 = 0.5;

/// diffusers' `LCMScheduler`.
#[derive(Debug, Clone)]
pub(super) struct Lcm {
    timesteps: Vec<f64>,
    /// The training timestep of every step.
    steps: Vec<usize>,
    alphas_cumprod: Vec<f32>,
    prediction: PredictionType,
    clip: Option<f32>,
    timestep_scaling: f32,
}

impl Lcm {
    /// Resolves `config` with `LCMScheduler`'s defaults and sets `n` timesteps; more steps than
    /// `original_inference_steps` is an invalid `steps`, as diffusers refuses it.
    pub fn new(config: &SchedulerConfig, n: usize, file: &str) -> Result<Self> {
        let common = Common::resolve_with(config, BetaDefaults::SD_SCALED, Spacing::Leading, file)?;
        refuse_flag(config.thresholding, "thresholding", file)?;
        let num_train = common.num_train;
        let original = config.original_inference_steps.unwrap_or(50);
        if original == 0 || original > num_train {
            let hint = format!("must be between 1 and num_train_timesteps = {num_train}");
            return Err(Error::unsupported(
                file,
                "original_inference_steps",
                original,
                hint,
            ));
        }
        if n > original {
            return Err(Error::invalid(
                "steps",
                format!("lcm takes at most the model's {original} original inference steps"),
            ));
        }
        // The distillation schedule, noisiest first, and `n` of its entries evenly picked.
        let k = num_train / original;
        let origin: Vec<usize> = (1..=original).rev().map(|i| i * k - 1).collect();
        let ratio = original as f64 / n as f64;
        let steps: Vec<usize> = (0..n)
            .map(|i| origin[(i as f64 * ratio).floor() as usize])
            .collect();
        let clip = match config.clip_sample.unwrap_or(false) {
            true => Some(config.clip_sample_range.unwrap_or(1.0) as f32),
            false => None,
        };
        Ok(Lcm {
            timesteps: steps.iter().map(|&t| t as f64).collect(),
            steps,
            alphas_cumprod: alphas_cumprod(&common),
            prediction: common.prediction,
            clip,
            timestep_scaling: config.timestep_scaling.unwrap_or(10.0) as f32,
        })
    }

    /// The training timestep of `step_index`, or an error naming the step past the end.
    fn timestep(&self, step_index: usize) -> Result<usize> {
        self.steps
            .get(step_index)
            .copied()
            .ok_or_else(|| past_end(step_index, self.steps.len()))
    }

    /// The boundary-condition scalings `(c_skip, c_out)` at training timestep `t`, in f32.
    fn scalings(&self, t: usize) -> (f32, f32) {
        let scaled = t as f32 * self.timestep_scaling;
        let data2 = SIGMA_DATA * SIGMA_DATA;
        let c_skip = data2 / (scaled * scaled + data2);
        let c_out = scaled / (scaled * scaled + data2).sqrt();
        (c_skip, c_out)
    }
}

impl Scheduler for Lcm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// Calls `noise` at every step but the last, as diffusers draws.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn FnMut(DType) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let t = self.timestep(step_index)?;
        let alpha = self.alphas_cumprod[t];
        let (a_sqrt, b_sqrt) = (alpha.sqrt(), (1.0 - alpha).sqrt());
        let (mo, x) = (f32_of(model_output)?, f32_of(sample)?);
        let mut x0 = match self.prediction {
            PredictionType::Epsilon => div(&(&x - mul(&mo, b_sqrt)?)?, a_sqrt)?,
            PredictionType::Sample => mo,
            PredictionType::VPrediction => (mul(&x, a_sqrt)? - mul(&mo, b_sqrt)?)?,
        };
        if let Some(range) = self.clip {
            x0 = x0.clamp(-range, range)?;
        }
        let (c_skip, c_out) = self.scalings(t);
        let denoised = (mul(&x0, c_out)? + mul(&x, c_skip)?)?;
        let prev = match self.steps.get(step_index + 1) {
            None => denoised,
            Some(&next) => {
                let fresh = f32_of(&noise(model_output.dtype())?)?;
                check_noise_shape(&fresh, &denoised)?;
                let alpha_prev = self.alphas_cumprod[next];
                (mul(&denoised, alpha_prev.sqrt())? + mul(&fresh, (1.0 - alpha_prev).sqrt())?)?
            }
        };
        Ok(prev.to_dtype(model_output.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let alpha = self.alphas_cumprod[self.timestep(step_index)?];
        ddpm_add_noise(original, noise, alpha)
    }
}
