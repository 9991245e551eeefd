//! Euler (Karras et al. 2022, algorithm 2 without churn), as diffusers'
//! `EulerDiscreteScheduler`; also the sigma schedule `euler-a` shares.

use candle_core::{DType, Tensor};

use super::config::{
    final_sigma_min, refuse_flag, require_one_of, Common, PredictionType, SchedulerConfig, Spacing,
};
use super::schedule::{
    alphas_cumprod_finite, div, f32_of, interp, karras, log_sigmas, mul, np_linspace, past_end,
    sigma_to_t, trailing, train_sigmas,
};
use super::Scheduler;
use crate::error::{Error, Result};

/// The [`super::Scheduler`] methods a scheduler with a `schedule: SigmaSchedule` field takes
/// from it unchanged (Euler, Euler-a, LMS): timesteps, initial sigma, input scaling, add_noise.
macro_rules! sigma_schedule_delegates {
    () => {
        fn timesteps(&self) -> &[f64] {
            &self.schedule.timesteps
        }

        fn init_noise_sigma(&self) -> f64 {
            self.schedule.init_noise_sigma
        }

        fn scale_model_input(&self, sample: Tensor, step_index: usize) -> Result<Tensor> {
            self.schedule.scale_model_input(sample, step_index)
        }

        fn add_noise(
            &self,
            original: &Tensor,
            noise: &Tensor,
            step_index: usize,
        ) -> Result<Tensor> {
            self.schedule.add_noise(original, noise, step_index)
        }
    };
}
pub(super) use sigma_schedule_delegates;

/// Timesteps and float32 sigmas (one more sigma than timesteps) of a k-diffusion style schedule.
#[derive(Debug, Clone)]
pub(super) struct SigmaSchedule {
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f32>,
    pub init_noise_sigma: f64,
}

/// The knobs of [`SigmaSchedule::new`] only `EulerDiscreteScheduler` has.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct SigmaOptions {
    pub karras: bool,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub final_sigma_min: bool,
}

impl SigmaSchedule {
    /// Euler's `set_timesteps(n)`: float32 timesteps, sigmas interpolated (linearly in t) from
    /// the training sigmas, optionally respaced Karras-style, plus the final sigma.
    pub fn new(common: &Common, n: usize, opts: SigmaOptions) -> Self {
        let num_train = common.num_train;
        let train = train_sigmas(&alphas_cumprod_finite(common));
        let mut timesteps: Vec<f32> = match common.spacing {
            Spacing::Linspace => np_linspace(0.0, (num_train - 1) as f64, n)
                .into_iter()
                .rev()
                .map(|t| t as f32)
                .collect(),
            Spacing::Leading => (0..n)
                .rev()
                .map(|i| (i * (num_train / n)) as f32 + common.steps_offset as f32)
                .collect(),
            Spacing::Trailing => trailing(num_train, num_train, n)
                .into_iter()
                .map(|t| t as f32)
                .collect(),
        };
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| interp(t as f64, &train))
            .collect();
        if opts.karras {
            let lo = opts.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let hi = opts.sigma_max.unwrap_or(sigmas[0]);
            sigmas = karras(lo, hi, n);
            let logs = log_sigmas(&train);
            timesteps = sigmas
                .iter()
                .map(|&s| sigma_to_t(s, &logs) as f32)
                .collect();
        }
        let last = if opts.final_sigma_min {
            train[0] as f64
        } else {
            0.0
        };
        sigmas.push(last);
        let sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match common.spacing {
            Spacing::Linspace | Spacing::Trailing => max,
            Spacing::Leading => (max * max + 1.0).sqrt(),
        };
        SigmaSchedule {
            timesteps: timesteps.into_iter().map(f64::from).collect(),
            sigmas,
            init_noise_sigma: init_noise_sigma as f64,
        }
    }

    /// `sigmas[step_index]`, or an error naming the step past the end.
    pub fn sigma(&self, step_index: usize) -> Result<f32> {
        if step_index >= self.timesteps.len() {
            return Err(past_end(step_index, self.timesteps.len()));
        }
        Ok(self.sigmas[step_index])
    }

    /// `sample / sqrt(sigma² + 1)`, computed in f32, returned in `sample`'s dtype.
    pub fn scale_model_input(&self, sample: Tensor, step_index: usize) -> Result<Tensor> {
        let sigma = self.sigma(step_index)?;
        let scaled = div(&f32_of(&sample)?, (sigma * sigma + 1.0).sqrt())?;
        Ok(scaled.to_dtype(sample.dtype())?)
    }

    /// `original + noise * sigma` (img2img), in `original`'s dtype.
    pub fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> Result<Tensor> {
        let sigma = self.sigma(step_index)?;
        let noisy = (f32_of(original)? + mul(&f32_of(noise)?, sigma)?)?;
        Ok(noisy.to_dtype(original.dtype())?)
    }
}

/// The denoised estimate x0 at `sigma` (f32 tensors), as Euler and Euler-a compute it.
pub(super) fn predict_x0(
    prediction: PredictionType,
    mo: &Tensor,
    x: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    Ok(match prediction {
        PredictionType::Epsilon => (x - mul(mo, sigma)?)?,
        PredictionType::VPrediction => {
            let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
            (mul(mo, c_out)? + div(x, sigma * sigma + 1.0)?)?
        }
        PredictionType::Sample => mo.clone(),
    })
}

/// diffusers' `EulerDiscreteScheduler` (no churn: `s_churn = 0`).
#[derive(Debug, Clone)]
pub(super) struct Euler {
    schedule: SigmaSchedule,
    prediction: PredictionType,
}

impl Euler {
    /// Resolves `config` with `EulerDiscreteScheduler`'s defaults (`karras`, when given,
    /// overrides `use_karras_sigmas`) and sets `n` timesteps.
    pub fn new(
        config: &SchedulerConfig,
        n: usize,
        karras: Option<bool>,
        file: &str,
    ) -> Result<Self> {
        let common = Common::resolve(config, Spacing::Linspace, file)?;
        let interpolation = config.interpolation_type.as_deref();
        require_one_of(
            interpolation,
            "linear",
            &["linear"],
            "interpolation_type",
            file,
        )?;
        refuse_flag(
            config.use_exponential_sigmas,
            "use_exponential_sigmas",
            file,
        )?;
        refuse_flag(config.use_beta_sigmas, "use_beta_sigmas", file)?;
        match config.timestep_type.as_deref().unwrap_or("discrete") {
            "discrete" => {}
            // Only changes anything for v_prediction (log-sigma timesteps).
            "continuous" if common.prediction != PredictionType::VPrediction => {}
            other => {
                let hint = "supported: discrete (continuous only without v_prediction)";
                return Err(Error::unsupported(file, "timestep_type", other, hint));
            }
        }
        let opts = SigmaOptions {
            karras: karras.or(config.use_karras_sigmas).unwrap_or(false),
            sigma_min: config.sigma_min,
            sigma_max: config.sigma_max,
            final_sigma_min: final_sigma_min(config, file)?,
        };
        Ok(Euler {
            schedule: SigmaSchedule::new(&common, n, opts),
            prediction: common.prediction,
        })
    }
}

impl Scheduler for Euler {
    sigma_schedule_delegates!();

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn FnMut(DType) -> Result<Tensor>,
    ) -> Result<Tensor> {
        // Without churn sigma_hat = sigma.
        let sigma = self.schedule.sigma(step_index)?;
        let (mo, x) = (f32_of(model_output)?, f32_of(sample)?);
        let x0 = predict_x0(self.prediction, &mo, &x, sigma)?;
        let derivative = div(&(&x - x0)?, sigma)?;
        let dt = self.schedule.sigmas[step_index + 1] - sigma;
        let prev = (x + mul(&derivative, dt)?)?;
        Ok(prev.to_dtype(model_output.dtype())?)
    }
}
