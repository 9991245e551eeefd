//! UniPC (Zhao et al. 2023), as diffusers' `UniPCMultistepScheduler`: a multistep predictor
//! (UniP) followed, at the next step, by a corrector (UniC) that reuses the model output
//! evaluated at the predicted sample. B(h) variants `bh1`/`bh2`, on data (`predict_x0`) or
//! noise predictions, of order 1 to 3.

use std::collections::VecDeque;

use candle_core::{DType, Tensor};

use super::config::{
    final_sigma_min, refuse_flag, Common, PredictionType, SchedulerConfig, Spacing,
};
use super::schedule::{
    alpha_sigma, alphas_cumprod_finite, div, f32_of, interp, mul, multistep_karras,
    multistep_timesteps, past_end, train_sigmas,
};
use super::Scheduler;
use crate::error::{Error, Result};

/// The highest `solver_order` implemented (diffusers accepts any, recommends 2 or 3).
const MAX_ORDER: usize = 3;

/// UniPC's choice of B(h), the step-size function the order conditions are scaled by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    /// `B(h) = h` (recommended by the paper for unconditional sampling under 10 steps).
    Bh1,
    /// `B(h) = e^h - 1` (diffusers' default).
    Bh2,
}

/// diffusers' `UniPCMultistepScheduler` (no `solver_p`, no thresholding, VP sigmas).
#[derive(Debug, Clone)]
pub(super) struct UniPc {
    timesteps: Vec<f64>,
    /// float32 sigmas, one more than timesteps.
    sigmas: Vec<f32>,
    prediction: PredictionType,
    /// Solve on x0 predictions (`true`, diffusers' default) or on noise predictions.
    predict_x0: bool,
    solver_type: SolverType,
    solver_order: usize,
    /// Lower the order of the last steps so that it never exceeds the steps left.
    lower_order_final: bool,
    /// Step indices whose *following* step skips the corrector (diffusers' list).
    disable_corrector: Vec<usize>,
    /// The converted (x0 or epsilon) f32 model outputs of the last `solver_order` steps,
    /// oldest first (diffusers' `model_outputs`).
    model_outputs: VecDeque<Tensor>,
    /// The (corrected) f32 sample the last predictor started from.
    last_sample: Option<Tensor>,
    /// The order of the last predictor, which the next corrector reuses.
    this_order: usize,
    /// Steps taken this run, saturating at `solver_order` (the multistep warm-up).
    lower_order_nums: usize,
    /// The step index the history expects next (`None` before the first step).
    next_step: Option<usize>,
}

/// The scalar coefficients of one UniP or UniC update from sigma index `s0` to `t`, computed
/// in float32 as diffusers' `multistep_uni_{p,c}_bh_update` computes them on 0-d tensors.
struct Update {
    /// Multiplies the sample: `sigma_t / sigma_s0` (x0) or `alpha_t / alpha_s0` (epsilon).
    c_x: f32,
    /// Multiplies the newest model output: `alpha_t · hφ₁` or `sigma_t · hφ₁`.
    c_m0: f32,
    /// Multiplies the higher-order residual: `alpha_t · B(h)` or `sigma_t · B(h)`.
    c_res: f32,
    /// `r_k = (λ_{s_k} − λ_{s0}) / h` for the history, newest first, then 1.
    rks: Vec<f32>,
    /// The order conditions' right-hand side `b`.
    b: Vec<f32>,
}

impl UniPc {
    /// Resolves `config` with `UniPCMultistepScheduler`'s defaults and sets `n` timesteps.
    pub fn new(config: &SchedulerConfig, n: usize, file: &str) -> Result<Self> {
        let common = Common::resolve(config, Spacing::Linspace, file)?;
        let final_is_min = final_sigma_min(config, file)?;
        let (solver_type, solver_order) = Self::check(config, n, final_is_min, file)?;
        let (timesteps, sigmas) = schedule(config, &common, n, final_is_min);
        Ok(UniPc {
            timesteps,
            sigmas,
            prediction: common.prediction,
            predict_x0: config.predict_x0.unwrap_or(true),
            solver_type,
            solver_order,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            disable_corrector: config.disable_corrector.clone().unwrap_or_default(),
            model_outputs: VecDeque::with_capacity(solver_order),
            last_sample: None,
            this_order: 0,
            lower_order_nums: 0,
            next_step: None,
        })
    }

    /// Refuses every UniPC option that would change the maths and is not implemented, and
    /// the settings whose last step diffusers computes as NaN; returns the solver type and
    /// order.
    fn check(
        c: &SchedulerConfig,
        n: usize,
        final_is_min: bool,
        file: &str,
    ) -> Result<(SolverType, usize)> {
        // diffusers maps the DPM-Solver/DEIS names to bh2 and raises on anything else.
        let solver_type = match c.solver_type.as_deref().unwrap_or("bh2") {
            "bh1" => SolverType::Bh1,
            "bh2" | "midpoint" | "heun" | "logrho" => SolverType::Bh2,
            other => {
                let hint = "supported: bh1, bh2 (midpoint, heun, logrho read as bh2)";
                return Err(Error::unsupported(file, "solver_type", other, hint));
            }
        };
        let order = c.solver_order.unwrap_or(2);
        if !(1..=MAX_ORDER).contains(&order) {
            return Err(Error::unsupported(
                file,
                "solver_order",
                order,
                "supported: 1, 2, 3",
            ));
        }
        refuse_flag(c.thresholding, "thresholding", file)?;
        refuse_flag(c.use_exponential_sigmas, "use_exponential_sigmas", file)?;
        refuse_flag(c.use_beta_sigmas, "use_beta_sigmas", file)?;
        refuse_flag(c.use_flow_sigmas, "use_flow_sigmas", file)?;
        refuse_flag(c.use_dynamic_shifting, "use_dynamic_shifting", file)?;
        if !final_is_min {
            // The last step lands on sigma = 0, where log-SNR is infinite: diffusers turns
            // these settings into NaN (0 · ∞) or a singular system there.
            let nan = "diffusers' last step to sigma = 0 gives NaN with it; set \
                       final_sigmas_type to sigma_min";
            if c.predict_x0 == Some(false) {
                return Err(Error::unsupported(file, "predict_x0", false, nan));
            }
            if solver_type == SolverType::Bh1 {
                return Err(Error::unsupported(file, "solver_type", "bh1", nan));
            }
            if c.lower_order_final == Some(false) && order >= 2 && n >= 2 {
                return Err(Error::unsupported(file, "lower_order_final", false, nan));
            }
        }
        Ok((solver_type, order))
    }

    /// Refuses a step index past the schedule or out of the run's order.
    fn check_index(&self, step_index: usize) -> Result<()> {
        let len = self.timesteps.len();
        if step_index >= len {
            return Err(past_end(step_index, len));
        }
        if self.next_step.is_some_and(|next| next != step_index) {
            return Err(Error::invalid(
                "steps",
                format!("UniPC steps must run in order; got step {step_index} out of turn"),
            ));
        }
        Ok(())
    }

    /// diffusers' `convert_model_output`: the model output as an x0 prediction
    /// (`predict_x0`) or as a noise prediction, at sigma index `i`.
    fn convert(&self, mo: &Tensor, x: &Tensor, i: usize) -> Result<Tensor> {
        let (alpha, sigma) = alpha_sigma(self.sigmas[i]);
        Ok(match (self.predict_x0, self.prediction) {
            (true, PredictionType::Epsilon) => div(&(x - mul(mo, sigma)?)?, alpha)?,
            (true, PredictionType::VPrediction) => (mul(x, alpha)? - mul(mo, sigma)?)?,
            (true, PredictionType::Sample) | (false, PredictionType::Epsilon) => mo.clone(),
            (false, PredictionType::Sample) => div(&(x - mul(mo, alpha)?)?, sigma)?,
            (false, PredictionType::VPrediction) => (mul(mo, alpha)? + mul(x, sigma)?)?,
        })
    }

    /// The coefficients of an update of `order` from sigma index `s0` to `t`, the history at
    /// sigma indices `s0 - 1, s0 - 2, …`.
    fn update(&self, t: usize, s0: usize, order: usize) -> Update {
        let lambda = |i: usize| {
            let (alpha, sigma) = alpha_sigma(self.sigmas[i]);
            (alpha, sigma, ln(alpha) - ln(sigma))
        };
        let (alpha_t, sigma_t, lambda_t) = lambda(t);
        let (alpha_s0, sigma_s0, lambda_s0) = lambda(s0);
        let h = lambda_t - lambda_s0;
        let mut rks: Vec<f32> = (1..order)
            .map(|k| (lambda(s0 - k).2 - lambda_s0) / h)
            .collect();
        rks.push(1.0);
        let hh = if self.predict_x0 { -h } else { h };
        let h_phi_1 = exp_m1(hh);
        let b_h = match self.solver_type {
            SolverType::Bh1 => hh,
            SolverType::Bh2 => exp_m1(hh),
        };
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1u32;
        let mut b = Vec::with_capacity(order);
        for i in 1..=order as u32 {
            b.push(h_phi_k * factorial as f32 / b_h);
            factorial *= i + 1;
            // Python's `1 / factorial_i` is a float64, rounded to f32 by the tensor op.
            h_phi_k = h_phi_k / hh - (1.0 / factorial as f64) as f32;
        }
        let (c_x, c_m0, c_res) = if self.predict_x0 {
            (sigma_t / sigma_s0, alpha_t * h_phi_1, alpha_t * b_h)
        } else {
            (alpha_t / alpha_s0, sigma_t * h_phi_1, sigma_t * b_h)
        };
        Update {
            c_x,
            c_m0,
            c_res,
            rks,
            b,
        }
    }

    /// The divided differences `(m_k − m0) / r_k` of the `order − 1` history outputs before
    /// the newest one in `model_outputs`, newest first.
    fn differences(&self, rks: &[f32], order: usize) -> Result<Vec<Tensor>> {
        let newest = self.model_outputs.len() - 1;
        let m0 = &self.model_outputs[newest];
        (1..order)
            .map(|k| div(&(&self.model_outputs[newest - k] - m0)?, rks[k - 1]))
            .collect()
    }

    /// diffusers' `multistep_uni_p_bh_update` from the (corrected) sample `x` at step `i`,
    /// the step's converted output already the newest of `model_outputs`.
    fn predict(&self, x: &Tensor, i: usize, order: usize) -> Result<Tensor> {
        let u = self.update(i + 1, i, order);
        let m0 = &self.model_outputs[self.model_outputs.len() - 1];
        let x_t = (mul(x, u.c_x)? - mul(m0, u.c_m0)?)?;
        if order == 1 {
            return Ok(x_t);
        }
        let rhos = if order == 2 {
            vec![0.5]
        } else {
            solve(&powers(&u.rks[..order - 1]), &u.b[..order - 1])?
        };
        let residual = weighted_sum(&rhos, &self.differences(&u.rks, order)?)?;
        Ok((x_t - mul(&residual, u.c_res)?)?)
    }

    /// diffusers' `multistep_uni_c_bh_update`: corrects the sample of step `i` (predicted from
    /// `last` at step `i - 1`) with its converted model output `model_t`, before that output
    /// joins `model_outputs`.
    fn correct(&self, model_t: &Tensor, last: &Tensor, i: usize, order: usize) -> Result<Tensor> {
        let u = self.update(i, i - 1, order);
        let m0 = &self.model_outputs[self.model_outputs.len() - 1];
        let x_t = (mul(last, u.c_x)? - mul(m0, u.c_m0)?)?;
        let rhos = if order == 1 {
            vec![0.5]
        } else {
            solve(&powers(&u.rks), &u.b)?
        };
        let newest = mul(&(model_t - m0)?, rhos[order - 1])?;
        let residual = if order == 1 {
            newest
        } else {
            let d1s = self.differences(&u.rks, order)?;
            (weighted_sum(&rhos[..order - 1], &d1s)? + newest)?
        };
        Ok((x_t - mul(&residual, u.c_res)?)?)
    }
}

/// diffusers' `set_timesteps` without custom sigmas: the timesteps and the float32 sigmas,
/// one more than the timesteps (the last `0` or `sigma_min`).
fn schedule(
    config: &SchedulerConfig,
    common: &Common,
    n: usize,
    final_is_min: bool,
) -> (Vec<f64>, Vec<f32>) {
    let train = train_sigmas(&alphas_cumprod_finite(common));
    let (timesteps, mut sigmas) = if config.use_karras_sigmas == Some(true) {
        multistep_karras(config.sigma_min, config.sigma_max, &train, n, false)
    } else {
        let timesteps = multistep_timesteps(common, common.num_train, n);
        let sigmas = timesteps.iter().map(|&t| interp(t, &train)).collect();
        (timesteps, sigmas)
    };
    // Karras runs end on their own last sigma, the others on the first training sigma.
    let last = match (final_is_min, config.use_karras_sigmas == Some(true)) {
        (false, _) => 0.0,
        (true, true) => sigmas.last().copied().unwrap_or(train[0] as f64),
        (true, false) => train[0] as f64,
    };
    sigmas.push(last);
    (timesteps, sigmas.into_iter().map(|s| s as f32).collect())
}

/// `torch.log` of a float32 scalar, correctly rounded (through f64) rather than by the
/// platform's `logf`, so that results do not depend on the libm. torch's own (MKL) float32
/// log is off by an ulp for ~10% of inputs; at order 3 with many steps UniPC's coefficients
/// amplify such ulps to ~3e-5 of the sample.
fn ln(x: f32) -> f32 {
    (x as f64).ln() as f32
}

/// `torch.expm1` of a float32 scalar, correctly rounded (through f64), like [`ln`].
fn exp_m1(x: f32) -> f32 {
    (x as f64).exp_m1() as f32
}

/// diffusers' `R`: row `p` holds `r_k^p` (`torch.pow` of the f32 `rks`).
fn powers(rks: &[f32]) -> Vec<Vec<f32>> {
    (0..rks.len())
        .map(|p| {
            rks.iter()
                .map(|&r| match p {
                    0 => 1.0,
                    1 => r,
                    2 => r * r,
                    _ => r * r * r,
                })
                .collect()
        })
        .collect()
}

/// `torch.linalg.solve(a, b)` in float32 as LAPACK's `sgesv` computes it: LU with partial
/// pivoting (multipliers scaled by the pivot's reciprocal), then forward and back
/// substitution. Fails on a singular system, as torch does.
fn solve(a: &[Vec<f32>], b: &[f32]) -> Result<Vec<f32>> {
    let n = b.len();
    let (mut a, mut x) = (a.to_vec(), b.to_vec());
    for j in 0..n {
        let p = (j..n).fold(j, |p, i| if a[i][j].abs() > a[p][j].abs() { i } else { p });
        if a[p][j] == 0.0 || !a[p][j].is_finite() {
            return Err(Error::invalid(
                "steps",
                "UniPC's order conditions are singular at this step (repeated sigmas?)",
            ));
        }
        a.swap(j, p);
        x.swap(j, p);
        let reciprocal = 1.0 / a[j][j];
        for i in j + 1..n {
            a[i][j] *= reciprocal;
            for k in j + 1..n {
                a[i][k] -= a[i][j] * a[j][k];
            }
        }
    }
    for k in 0..n {
        for i in k + 1..n {
            x[i] -= x[k] * a[i][k];
        }
    }
    for k in (0..n).rev() {
        x[k] /= a[k][k];
        for i in 0..k {
            x[i] -= x[k] * a[i][k];
        }
    }
    Ok(x)
}

/// `einsum("k,bk…->b…", weights, terms)`: `Σ weights[k] · terms[k]`, in order.
fn weighted_sum(weights: &[f32], terms: &[Tensor]) -> Result<Tensor> {
    let mut sum = mul(&terms[0], weights[0])?;
    for (term, &w) in terms.iter().zip(weights).skip(1) {
        sum = (sum + mul(term, w)?)?;
    }
    Ok(sum)
}

impl Scheduler for UniPc {
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
        self.check_index(step_index)?;
        let (mo, mut x) = (f32_of(model_output)?, f32_of(sample)?);
        let converted = self.convert(&mo, &x, step_index)?;
        let corrector_on = step_index > 0 && !self.disable_corrector.contains(&(step_index - 1));
        if let Some(last) = self.last_sample.as_ref().filter(|_| corrector_on) {
            x = self.correct(&converted, last, step_index, self.this_order)?;
        }
        if self.model_outputs.len() == self.solver_order {
            self.model_outputs.pop_front();
        }
        self.model_outputs.push_back(converted);

        let steps_left = self.timesteps.len() - step_index;
        let order = if self.lower_order_final {
            self.solver_order.min(steps_left)
        } else {
            self.solver_order
        };
        // Warm-up: never more history than this run has made.
        self.this_order = order.min(self.lower_order_nums + 1);
        let prev = self.predict(&x, step_index, self.this_order)?;
        self.last_sample = Some(x);
        self.lower_order_nums = (self.lower_order_nums + 1).min(self.solver_order);
        self.next_step = Some(step_index + 1);
        Ok(prev.to_dtype(model_output.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        if step_index >= self.timesteps.len() {
            return Err(past_end(step_index, self.timesteps.len()));
        }
        let (alpha, sigma) = alpha_sigma(self.sigmas[step_index]);
        let noisy = (mul(&f32_of(original)?, alpha)? + mul(&f32_of(noise)?, sigma)?)?;
        Ok(noisy.to_dtype(original.dtype())?)
    }
}
