//! DDIM (Song et al. 2020) with eta = 0, as diffusers' `DDIMScheduler`.

use candle_core::{DType, Tensor};

use super::config::{refuse_flag, Common, PredictionType, SchedulerConfig, Spacing};
use super::schedule::{
    alphas_cumprod, ddpm_add_noise, div, f32_of, mul, np_linspace, past_end, trailing,
};
use super::Scheduler;
use crate::error::{Error, Result};

/// diffusers' `DDIMScheduler` (deterministic, eta = 0).
#[derive(Debug, Clone)]
pub(super) struct Ddim {
    timesteps: Vec<f64>,
    /// Integer timesteps, each a valid index into `alphas_cumprod`.
    steps: Vec<usize>,
    alphas_cumprod: Vec<f32>,
    /// Alpha the last step lands on (1, or `alphas_cumprod[0]` without `set_alpha_to_one`).
    final_alpha_cumprod: f32,
    /// `num_train_timesteps / num_inference_steps`: DDIM's "previous timestep" is always this
    /// far back, whatever the spacing (a diffusers quirk for `trailing`/`linspace`).
    gap: usize,
    prediction: PredictionType,
    clip: Option<f32>,
}

impl Ddim {
    /// Resolves `config` with `DDIMScheduler`'s defaults and sets `n` timesteps.
    pub fn new(config: &SchedulerConfig, n: usize, file: &str) -> Result<Self> {
        let common = Common::resolve(config, Spacing::Leading, file)?;
        refuse_flag(config.thresholding, "thresholding", file)?;
        let num_train = common.num_train;
        let raw: Vec<i64> = match common.spacing {
            Spacing::Linspace => np_linspace(0.0, (num_train - 1) as f64, n)
                .into_iter()
                .rev()
                .map(|t| t.round_ties_even() as i64)
                .collect(),
            Spacing::Leading => (0..n)
                .rev()
                .map(|i| (i * (num_train / n) + common.steps_offset) as i64)
                .collect(),
            Spacing::Trailing => trailing(num_train, num_train, n)
                .into_iter()
                .map(|t| t as i64)
                .collect(),
        };
        if let Some(&bad) = raw.iter().find(|&&t| t < 0 || t >= num_train as i64) {
            return Err(Error::invalid(
                "steps",
                format!(
                    "{n} steps put DDIM timestep {bad} outside 0..{num_train} with this \
                     scheduler config (diffusers would index past its schedule); choose another \
                     step count"
                ),
            ));
        }
        let alphas_cumprod = alphas_cumprod(&common);
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let clip = config
            .clip_sample
            .unwrap_or(true)
            .then(|| config.clip_sample_range.unwrap_or(1.0) as f32);
        Ok(Ddim {
            timesteps: raw.iter().map(|&t| t as f64).collect(),
            steps: raw.iter().map(|&t| t as usize).collect(),
            alphas_cumprod,
            final_alpha_cumprod,
            gap: num_train / n,
            prediction: common.prediction,
            clip,
        })
    }

    fn timestep(&self, step_index: usize) -> Result<usize> {
        self.steps
            .get(step_index)
            .copied()
            .ok_or_else(|| past_end(step_index, self.steps.len()))
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn FnMut(DType) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let t = self.timestep(step_index)?;
        let alpha_t = self.alphas_cumprod[t];
        let alpha_prev = match t.checked_sub(self.gap) {
            Some(prev) => self.alphas_cumprod[prev],
            None => self.final_alpha_cumprod,
        };
        let beta_t = 1.0 - alpha_t;
        let (sqrt_a, sqrt_b) = (alpha_t.sqrt(), beta_t.sqrt());
        let (mo, x) = (f32_of(model_output)?, f32_of(sample)?);
        let (x0, eps) = match self.prediction {
            PredictionType::Epsilon => (div(&(&x - mul(&mo, sqrt_b)?)?, sqrt_a)?, mo),
            PredictionType::Sample => {
                let eps = div(&(&x - mul(&mo, sqrt_a)?)?, sqrt_b)?;
                (mo, eps)
            }
            PredictionType::VPrediction => (
                (mul(&x, sqrt_a)? - mul(&mo, sqrt_b)?)?,
                (mul(&mo, sqrt_a)? + mul(&x, sqrt_b)?)?,
            ),
        };
        let x0 = match self.clip {
            Some(r) => x0.clamp(-r, r)?,
            None => x0,
        };
        // eta = 0: the noise term vanishes, but keep diffusers' arithmetic (0 * sqrt(variance)),
        // so a degenerate schedule gives the same NaNs rather than a different answer.
        let variance = ((1.0 - alpha_prev) / beta_t) * (1.0 - alpha_t / alpha_prev);
        let std_dev = 0.0 * variance.sqrt();
        let direction = mul(&eps, (1.0 - alpha_prev - std_dev * std_dev).sqrt())?;
        let prev = (mul(&x0, alpha_prev.sqrt())? + direction)?;
        Ok(prev.to_dtype(model_output.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let alpha = self.alphas_cumprod[self.timestep(step_index)?];
        ddpm_add_noise(original, noise, alpha)
    }
}
