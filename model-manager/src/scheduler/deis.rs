//! DEIS (Zhang & Chen 2022), as diffusers' `DEISMultistepScheduler`: the log-rho multistep
//! exponential integrator of orders 1 to 3 on the noise prediction.
//!
//! diffusers' DEIS has no `rescale_betas_zero_snr`, `final_sigmas_type` or
//! `lambda_min_clipped` parameter: those keys are ignored, as `from_config` ignores them. The
//! last sigma is the first training sigma (or the last Karras sigma), never zero.

use candle_core::{DType, Tensor};

use super::config::{refuse_flag, Common, PredictionType, SchedulerConfig, Spacing};
use super::schedule::{
    alpha_sigma, alphas_cumprod, div, f32_of, interp, mul, multistep_karras, multistep_timesteps,
    past_end, train_sigmas,
};
use super::Scheduler;
use crate::error::{Error, Result};

/// The `algorithm_type` values diffusers accepts (`dpmsolver`/`dpmsolver++` become `deis`).
const ALGORITHMS: [&str; 3] = ["deis", "dpmsolver", "dpmsolver++"];
/// The `solver_type` values diffusers accepts (the DPM/UniPC ones become `logrho`).
const SOLVERS: [&str; 5] = ["logrho", "midpoint", "heun", "bh1", "bh2"];

/// diffusers' `DEISMultistepScheduler` (`algorithm_type = "deis"`, `solver_type = "logrho"`).
#[derive(Debug, Clone)]
pub(super) struct Deis {
    /// Integer timesteps (as float64), one per step.
    timesteps: Vec<f64>,
    /// float32 sigmas, one more than timesteps.
    sigmas: Vec<f32>,
    /// What the model predicts.
    prediction: PredictionType,
    /// `solver_order`: 1, 2 or 3.
    order: usize,
    /// Lower-order last steps for runs under 15 steps (default true).
    lower_order_final: bool,
    /// The noise predictions of the last `order` steps, oldest first (f32; diffusers'
    /// `model_outputs`).
    model_outputs: Vec<Tensor>,
    /// Steps taken so far, saturating at `order` (diffusers' `lower_order_nums`).
    lower_order_nums: usize,
}

impl Deis {
    /// Resolves `config` with `DEISMultistepScheduler`'s defaults and sets `n` timesteps.
    pub fn new(config: &SchedulerConfig, n: usize, file: &str) -> Result<Self> {
        let mut common = Common::resolve(config, Spacing::Linspace, file)?;
        let order = Self::check(config, file)?;
        // Not a DEIS parameter: diffusers' from_config drops it.
        common.rescale_zero_snr = false;
        let train = train_sigmas(&alphas_cumprod(&common));
        let (timesteps, mut sigmas) = if config.use_karras_sigmas == Some(true) {
            multistep_karras(config.sigma_min, config.sigma_max, &train, n, false)
        } else {
            let timesteps = multistep_timesteps(&common, common.num_train, n);
            let sigmas = timesteps.iter().map(|&t| interp(t, &train)).collect();
            (timesteps, sigmas)
        };
        let last = if config.use_karras_sigmas == Some(true) {
            sigmas.last().copied().unwrap_or(train[0] as f64)
        } else {
            train[0] as f64
        };
        sigmas.push(last);
        Ok(Deis {
            timesteps,
            sigmas: sigmas.into_iter().map(|s| s as f32).collect(),
            prediction: common.prediction,
            order,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            model_outputs: Vec::with_capacity(order),
            lower_order_nums: 0,
        })
    }

    /// Refuses what diffusers refuses and what is not implemented; returns `solver_order`.
    fn check(c: &SchedulerConfig, file: &str) -> Result<usize> {
        let algorithm = c.algorithm_type.as_deref().unwrap_or("deis");
        if !ALGORITHMS.contains(&algorithm) {
            let hint = format!("supported: {}", ALGORITHMS.join(", "));
            return Err(Error::unsupported(file, "algorithm_type", algorithm, hint));
        }
        let solver = c.solver_type.as_deref().unwrap_or("logrho");
        if !SOLVERS.contains(&solver) {
            let hint = format!("supported: {}", SOLVERS.join(", "));
            return Err(Error::unsupported(file, "solver_type", solver, hint));
        }
        let order = c.solver_order.unwrap_or(2);
        if !(1..=3).contains(&order) {
            let hint = "supported: 1, 2, 3";
            return Err(Error::unsupported(file, "solver_order", order, hint));
        }
        refuse_flag(c.thresholding, "thresholding", file)?;
        refuse_flag(c.use_exponential_sigmas, "use_exponential_sigmas", file)?;
        refuse_flag(c.use_beta_sigmas, "use_beta_sigmas", file)?;
        refuse_flag(c.use_flow_sigmas, "use_flow_sigmas", file)?;
        refuse_flag(c.use_dynamic_shifting, "use_dynamic_shifting", file)?;
        Ok(order)
    }

    /// The sigma at `step_index`, or an error past the last timestep.
    fn sigma(&self, step_index: usize) -> Result<f32> {
        if step_index >= self.timesteps.len() {
            return Err(past_end(step_index, self.timesteps.len()));
        }
        Ok(self.sigmas[step_index])
    }

    /// diffusers' `convert_model_output`: x0 from the prediction, then the noise
    /// `(x - alpha * x0) / sigma` that DEIS integrates (f32, in torch's order).
    fn to_noise(&self, model_output: Tensor, x: &Tensor, step_index: usize) -> Result<Tensor> {
        let (alpha, sigma) = alpha_sigma(self.sigmas[step_index]);
        let x0 = match self.prediction {
            PredictionType::Epsilon => div(&(x - mul(&model_output, sigma)?)?, alpha)?,
            PredictionType::VPrediction => (mul(x, alpha)? - mul(&model_output, sigma)?)?,
            PredictionType::Sample => model_output,
        };
        div(&(x - mul(&x0, alpha)?)?, sigma)
    }

    /// `deis_first_order_update` (DDIM): `(α_t/α_s) x − σ_t (e^h − 1) ε`.
    fn first_order(&self, eps: &Tensor, x: &Tensor, i: usize) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[i]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        let c_eps = sigma_t * (h.exp() - 1.0);
        Ok((mul(x, alpha_t / alpha_s)? - mul(eps, c_eps)?)?)
    }

    /// `multistep_deis_second_order_update`: log-rho Lagrange interpolation through the last
    /// two noise predictions.
    fn second_order(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        let (alpha_t, rho_t) = alpha_rho(self.sigmas[i + 1]);
        let (alpha_s0, rho_s0) = alpha_rho(self.sigmas[i]);
        let (_, rho_s1) = alpha_rho(self.sigmas[i - 1]);
        let m = &self.model_outputs;
        let (m0, m1) = (&m[m.len() - 1], &m[m.len() - 2]);
        let coef1 = ind2(rho_t, rho_s0, rho_s1) - ind2(rho_s0, rho_s0, rho_s1);
        let coef2 = ind2(rho_t, rho_s1, rho_s0) - ind2(rho_s0, rho_s1, rho_s0);
        let inner = ((div(x, alpha_s0)? + mul(m0, coef1)?)? + mul(m1, coef2)?)?;
        mul(&inner, alpha_t)
    }

    /// `multistep_deis_third_order_update`: log-rho Lagrange interpolation through the last
    /// three noise predictions.
    fn third_order(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        let (alpha_t, rho_t) = alpha_rho(self.sigmas[i + 1]);
        let (alpha_s0, s0) = alpha_rho(self.sigmas[i]);
        let (_, s1) = alpha_rho(self.sigmas[i - 1]);
        let (_, s2) = alpha_rho(self.sigmas[i - 2]);
        let m = &self.model_outputs;
        let (m0, m1, m2) = (&m[m.len() - 1], &m[m.len() - 2], &m[m.len() - 3]);
        let coef1 = ind3(rho_t, s0, s1, s2) - ind3(s0, s0, s1, s2);
        let coef2 = ind3(rho_t, s1, s2, s0) - ind3(s0, s1, s2, s0);
        let coef3 = ind3(rho_t, s2, s0, s1) - ind3(s0, s2, s0, s1);
        let inner = (div(x, alpha_s0)? + mul(m0, coef1)?)?;
        let inner = ((inner + mul(m1, coef2)?)? + mul(m2, coef3)?)?;
        mul(&inner, alpha_t)
    }
}

/// log-SNR `log(alpha) - log(sigma)` in f32.
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// `(alpha_t, rho = sigma_t / alpha_t)` for a sigma, in f32.
fn alpha_rho(sigma: f32) -> (f32, f32) {
    let (alpha, sigma) = alpha_sigma(sigma);
    (alpha, sigma / alpha)
}

/// diffusers' second-order `ind_fn(t, b, c)`: ∫ (log t − log c) / (log b − log c) dt, in f32.
fn ind2(t: f32, b: f32, c: f32) -> f32 {
    let (lt, lb, lc) = (t.ln(), b.ln(), c.ln());
    t * (-lc + lt - 1.0) / (lb - lc)
}

/// diffusers' third-order `ind_fn(t, b, c, d)`:
/// ∫ (log t − log c)(log t − log d) / ((log b − log c)(log b − log d)) dt, in f32.
fn ind3(t: f32, b: f32, c: f32, d: f32) -> f32 {
    let (lt, lb, lc, ld) = (t.ln(), b.ln(), c.ln(), d.ln());
    let numerator = t * (lc * (ld - lt + 1.0) - ld * lt + ld + lt * lt - 2.0 * lt + 2.0);
    let denominator = (lb - lc) * (lb - ld);
    numerator / denominator
}

impl Scheduler for Deis {
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
        self.sigma(step_index)?;
        let len = self.timesteps.len();
        let short = self.lower_order_final && len < 15;
        let lower_final = short && step_index == len - 1;
        let lower_second = short && step_index + 2 == len;
        let x = f32_of(sample)?;
        let eps = self.to_noise(f32_of(model_output)?, &x, step_index)?;
        if self.model_outputs.len() == self.order {
            self.model_outputs.remove(0);
        }
        self.model_outputs.push(eps.clone());
        // History actually available (a caller skipping indices cannot reach below sigma 0).
        let history = self.lower_order_nums.min(step_index);
        let prev = if self.order == 1 || history < 1 || lower_final {
            self.first_order(&eps, &x, step_index)?
        } else if self.order == 2 || history < 2 || lower_second {
            self.second_order(&x, step_index)?
        } else {
            self.third_order(&x, step_index)?
        };
        self.lower_order_nums = (self.lower_order_nums + 1).min(self.order);
        Ok(prev.to_dtype(model_output.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let (alpha, sigma) = alpha_sigma(self.sigma(step_index)?);
        let noisy = (mul(&f32_of(original)?, alpha)? + mul(&f32_of(noise)?, sigma)?)?;
        Ok(noisy.to_dtype(original.dtype())?)
    }
}
