//! Euler ancestral, as diffusers' `EulerAncestralDiscreteScheduler`.

use candle_core::{DType, Tensor};

use super::config::{Common, PredictionType, SchedulerConfig, Spacing};
use super::euler::{predict_x0, sigma_schedule_delegates, SigmaOptions, SigmaSchedule};
use super::schedule::{check_noise_shape, div, f32_of, mul};
use super::Scheduler;
use crate::error::{Error, Result};

/// diffusers' `EulerAncestralDiscreteScheduler`: an Euler step down to `sigma_down`, then fresh
/// noise up to the next sigma. The class has no Karras or final-sigma options.
#[derive(Debug, Clone)]
pub(super) struct EulerAncestral {
    schedule: SigmaSchedule,
    prediction: PredictionType,
}

impl EulerAncestral {
    /// Resolves `config` with `EulerAncestralDiscreteScheduler`'s defaults and sets `n` timesteps.
    pub fn new(config: &SchedulerConfig, n: usize, file: &str) -> Result<Self> {
        let common = Common::resolve(config, Spacing::Linspace, file)?;
        if common.prediction == PredictionType::Sample {
            // diffusers raises NotImplementedError for it.
            let hint = "euler-a supports epsilon and v_prediction";
            return Err(Error::unsupported(file, "prediction_type", "sample", hint));
        }
        Ok(EulerAncestral {
            schedule: SigmaSchedule::new(&common, n, SigmaOptions::default()),
            prediction: common.prediction,
        })
    }
}

impl Scheduler for EulerAncestral {
    sigma_schedule_delegates!();

    /// Calls `noise` exactly once per step, the last one included (where its weight is 0), so a
    /// seeded stream stays aligned with diffusers' generator.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn FnMut(DType) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let sigma = self.schedule.sigma(step_index)?;
        let sigma_to = self.schedule.sigmas[step_index + 1];
        let (mo, x) = (f32_of(model_output)?, f32_of(sample)?);
        let x0 = predict_x0(self.prediction, &mo, &x, sigma)?;
        let (from2, to2) = (sigma * sigma, sigma_to * sigma_to);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        let derivative = div(&(&x - x0)?, sigma)?;
        let prev = (x + mul(&derivative, sigma_down - sigma)?)?;
        let fresh = f32_of(&noise(model_output.dtype())?)?;
        check_noise_shape(&fresh, &prev)?;
        let prev = (prev + mul(&fresh, sigma_up)?)?;
        Ok(prev.to_dtype(model_output.dtype())?)
    }
}
