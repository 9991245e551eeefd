//! Linear multistep (order 4), as diffusers' `LMSDiscreteScheduler`: k-diffusion's sigma
//! schedule (Euler's), and a step that integrates the Lagrange polynomial through the last four
//! derivatives over `[sigma_i, sigma_{i+1}]`.
//!
//! diffusers integrates with `scipy.integrate.quad`, whose Gauss–Kronrod rule is exact for
//! these cubic polynomials; we integrate them exactly with three-point Gauss–Legendre in f64.
//! The class reads no `rescale_betas_zero_snr` and no `sigma_min`/`sigma_max`.

use std::collections::VecDeque;

use candle_core::{DType, Tensor};

use super::config::{refuse_flag, Common, PredictionType, SchedulerConfig, Spacing};
use super::euler::{predict_x0, sigma_schedule_delegates, SigmaOptions, SigmaSchedule};
use super::schedule::{div, f32_of, mul};
use super::Scheduler;
use crate::error::Result;

/// The pipelines call `step` with the default `order = 4`.
const ORDER: usize = 4;

/// diffusers' `LMSDiscreteScheduler`.
#[derive(Debug, Clone)]
pub(super) struct Lms {
    schedule: SigmaSchedule,
    prediction: PredictionType,
    /// The last [`ORDER`] derivatives, the newest first (f32).
    derivatives: VecDeque<Tensor>,
}

impl Lms {
    /// Resolves `config` with `LMSDiscreteScheduler`'s defaults (`karras`, when given,
    /// overrides `use_karras_sigmas`) and sets `n` timesteps.
    pub fn new(
        config: &SchedulerConfig,
        n: usize,
        karras: Option<bool>,
        file: &str,
    ) -> Result<Self> {
        let mut common = Common::resolve(config, Spacing::Linspace, file)?;
        common.rescale_zero_snr = false;
        refuse_flag(
            config.use_exponential_sigmas,
            "use_exponential_sigmas",
            file,
        )?;
        refuse_flag(config.use_beta_sigmas, "use_beta_sigmas", file)?;
        let opts = SigmaOptions {
            karras: karras.or(config.use_karras_sigmas).unwrap_or(false),
            ..SigmaOptions::default()
        };
        Ok(Lms {
            schedule: SigmaSchedule::new(&common, n, opts),
            prediction: common.prediction,
            derivatives: VecDeque::with_capacity(ORDER),
        })
    }

    /// `∫ from sigmas[t] to sigmas[t+1]` of the Lagrange basis polynomial of node
    /// `t − current` through the nodes `t, t−1, …, t−order+1` (diffusers' `get_lms_coefficient`).
    fn coefficient(&self, order: usize, t: usize, current: usize) -> f64 {
        let s = |i: usize| self.schedule.sigmas[i] as f64;
        let basis = |tau: f64| {
            (0..order)
                .filter(|&k| k != current)
                .map(|k| (tau - s(t - k)) / (s(t - current) - s(t - k)))
                .product::<f64>()
        };
        let (a, b) = (s(t), s(t + 1));
        let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
        let x = (0.6f64).sqrt();
        let sum = 5.0 * basis(mid - half * x) + 8.0 * basis(mid) + 5.0 * basis(mid + half * x);
        half * sum / 9.0
    }
}

impl Scheduler for Lms {
    sigma_schedule_delegates!();

    /// diffusers' step: the polynomial's order is `min(step_index + 1, 4)` even when fewer
    /// derivatives exist (an img2img run's first steps), and only as many coefficients as
    /// derivatives are used.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn FnMut(DType) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let sigma = self.schedule.sigma(step_index)?;
        let (mo, x) = (f32_of(model_output)?, f32_of(sample)?);
        let x0 = predict_x0(self.prediction, &mo, &x, sigma)?;
        let derivative = div(&(&x - x0)?, sigma)?;
        self.derivatives.push_front(derivative);
        self.derivatives.truncate(ORDER);
        let order = (step_index + 1).min(ORDER);
        let mut sum: Option<Tensor> = None;
        for (current, d) in self.derivatives.iter().enumerate().take(order) {
            let term = mul(d, self.coefficient(order, step_index, current) as f32)?;
            sum = Some(match sum {
                None => term,
                Some(acc) => (acc + term)?,
            });
        }
        let prev = match sum {
            Some(sum) => (x + sum)?,
            None => x,
        };
        Ok(prev.to_dtype(model_output.dtype())?)
    }
}
