//! DPM-Solver++(2M) (Lu et al. 2022), as diffusers' `DPMSolverMultistepScheduler` with
//! `algorithm_type = "dpmsolver++"` or, for the stochastic variant, `"sde-dpmsolver++"`
//! (`solver_order = 2`, `solver_type = "midpoint"`).

use candle_core::{DType, Tensor};

use super::config::{
    final_sigma_min, refuse_flag, require_one_of, BetaSchedule, Common, PredictionType,
    SchedulerConfig, Spacing,
};
use super::schedule::{
    alpha_sigma, alphas_cumprod_finite, check_noise_shape, div, f32_of, interp, mul,
    multistep_karras, multistep_timesteps, past_end, train_sigmas,
};
use super::Scheduler;
use crate::error::{Error, Result};

/// diffusers' `DPMSolverMultistepScheduler` (dpmsolver++ or sde-dpmsolver++, second order,
/// midpoint).
#[derive(Debug, Clone)]
pub(super) struct DpmPp2m {
    /// `sde-dpmsolver++`: every step draws noise (the last one too).
    sde: bool,
    timesteps: Vec<f64>,
    /// float32 sigmas, one more than timesteps.
    sigmas: Vec<f32>,
    prediction: PredictionType,
    lower_order_final: bool,
    final_sigma_zero: bool,
    /// The previous step's x0 prediction (f32), the multistep history.
    previous_x0: Option<Tensor>,
    /// How many steps this run has taken, saturating at 2 (diffusers' `lower_order_nums`).
    lower_order_nums: usize,
}

impl DpmPp2m {
    /// Resolves `config` with `DPMSolverMultistepScheduler`'s defaults, `use_karras_sigmas`
    /// forced to `karras` and `algorithm_type` to `sde-dpmsolver++` (`sde`) or `dpmsolver++`,
    /// and sets `n` timesteps.
    pub fn new(
        config: &SchedulerConfig,
        n: usize,
        karras_sigmas: bool,
        sde: bool,
        file: &str,
    ) -> Result<Self> {
        let common = Common::resolve(config, Spacing::Linspace, file)?;
        Self::check(config, file)?;
        let final_sigma_is_min = final_sigma_min(config, file)?;
        let num_train = common.num_train;
        let alphas = alphas_cumprod_finite(&common);
        let train = train_sigmas(&alphas);

        // lambda_min_clipped: drop the tail of training timesteps whose log-SNR is below it.
        let clip = config.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY) as f32;
        let clipped = alphas
            .iter()
            .filter(|&&a| a.sqrt().ln() - (1.0 - a).sqrt().ln() < clip)
            .count();
        let last = num_train - clipped.min(num_train);
        let (timesteps, mut sigmas) = if karras_sigmas {
            // Cosine schedules' fractional timesteps are truncated by diffusers' int64 cast.
            let cosine = common.betas == BetaSchedule::SquaredCosCapV2;
            multistep_karras(config.sigma_min, config.sigma_max, &train, n, cosine)
        } else {
            let spaced = multistep_timesteps(&common, last, n);
            let sigmas = spaced.iter().map(|&t| interp(t, &train)).collect();
            (spaced, sigmas)
        };
        if timesteps.is_empty() {
            let hint = "it clips away every training timestep";
            return Err(Error::unsupported(file, "lambda_min_clipped", clip, hint));
        }
        sigmas.push(if final_sigma_is_min {
            train[0] as f64
        } else {
            0.0
        });
        Ok(DpmPp2m {
            sde,
            timesteps,
            sigmas: sigmas.into_iter().map(|s| s as f32).collect(),
            prediction: common.prediction,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            final_sigma_zero: !final_sigma_is_min,
            previous_x0: None,
            lower_order_nums: 0,
        })
    }

    /// Refuses every DPM option that would change the maths and is not implemented
    /// (`algorithm_type` is not among them: the scheduler's name sets it).
    fn check(c: &SchedulerConfig, file: &str) -> Result<()> {
        // diffusers maps the DEIS/UniPC solver names to midpoint.
        let solvers = ["midpoint", "logrho", "bh1", "bh2"];
        require_one_of(
            c.solver_type.as_deref(),
            "midpoint",
            &solvers,
            "solver_type",
            file,
        )?;
        if let Some(order) = c.solver_order.filter(|&o| o != 2) {
            return Err(Error::unsupported(
                file,
                "solver_order",
                order,
                "supported: 2",
            ));
        }
        if let Some(v @ ("learned" | "learned_range")) = c.variance_type.as_deref() {
            let hint = "learned variances are not implemented";
            return Err(Error::unsupported(file, "variance_type", v, hint));
        }
        refuse_flag(c.thresholding, "thresholding", file)?;
        refuse_flag(c.euler_at_final, "euler_at_final", file)?;
        refuse_flag(c.use_lu_lambdas, "use_lu_lambdas", file)?;
        refuse_flag(c.use_exponential_sigmas, "use_exponential_sigmas", file)?;
        refuse_flag(c.use_beta_sigmas, "use_beta_sigmas", file)?;
        refuse_flag(c.use_flow_sigmas, "use_flow_sigmas", file)?;
        refuse_flag(c.use_dynamic_shifting, "use_dynamic_shifting", file)
    }

    fn sigma(&self, step_index: usize) -> Result<f32> {
        if step_index >= self.timesteps.len() {
            return Err(past_end(step_index, self.timesteps.len()));
        }
        Ok(self.sigmas[step_index])
    }
}

/// log-SNR `log(alpha) - log(sigma)` in f32 (infinite for sigma = 0).
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

impl Scheduler for DpmPp2m {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn FnMut(DType) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let len = self.timesteps.len();
        let (alpha_s, sigma_s) = alpha_sigma(self.sigma(step_index)?);
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step_index + 1]);
        let (mo, x) = (f32_of(model_output)?, f32_of(sample)?);
        let x0 = match self.prediction {
            PredictionType::Epsilon => div(&(&x - mul(&mo, sigma_s)?)?, alpha_s)?,
            PredictionType::VPrediction => (mul(&x, alpha_s)? - mul(&mo, sigma_s)?)?,
            PredictionType::Sample => mo,
        };
        // The last step is first order when the run is short or ends at sigma = 0.
        let lower_final = step_index == len - 1
            && ((self.lower_order_final && len < 15) || self.final_sigma_zero);
        let previous = self.previous_x0.replace(x0.clone());

        // diffusers draws the SDE's noise before choosing the update, at every step.
        let fresh = match self.sde {
            // Always a float32 draw, whatever the model's dtype (diffusers' `dtype=torch.float32`).
            true => Some(f32_of(&noise(DType::F32)?)?),
            false => None,
        };
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        // x_t = c_x · x + c_d · (D0 + D1 / 2) [+ c_noise · noise], with the f32 coefficients of
        // `dpm_solver_first_order_update` / `multistep_dpm_solver_second_order_update`.
        let (c_x, c_d) = match self.sde {
            true => (
                sigma_t / sigma_s * (-h).exp(),
                alpha_t * (1.0 - (-2.0 * h).exp()),
            ),
            false => (sigma_t / sigma_s, -(alpha_t * ((-h).exp() - 1.0))),
        };
        let mut prev = (mul(&x, c_x)? + mul(&x0, c_d)?)?;
        match previous {
            Some(m1) if self.lower_order_nums >= 1 && !lower_final && step_index > 0 => {
                let (alpha_p, sigma_p) = alpha_sigma(self.sigmas[step_index - 1]);
                let h_0 = lambda(alpha_s, sigma_s) - lambda(alpha_p, sigma_p);
                let r0 = h_0 / h;
                let d1 = mul(&(&x0 - m1)?, 1.0 / r0)?;
                prev = (prev + mul(&d1, 0.5 * c_d)?)?;
            }
            _ => {}
        }
        if let Some(fresh) = fresh {
            check_noise_shape(&fresh, &prev)?;
            let c_noise = sigma_t * (1.0 - (-2.0 * h).exp()).sqrt();
            prev = (prev + mul(&fresh, c_noise)?)?;
        }
        self.lower_order_nums = (self.lower_order_nums + 1).min(2);
        Ok(prev.to_dtype(model_output.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let (alpha, sigma) = alpha_sigma(self.sigma(step_index)?);
        let noisy = (mul(&f32_of(original)?, alpha)? + mul(&f32_of(noise)?, sigma)?)?;
        Ok(noisy.to_dtype(original.dtype())?)
    }
}
