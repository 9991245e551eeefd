//! PNDM (Liu et al. 2022), as diffusers' `PNDMScheduler`: SD 1.x's own scheduler.
//!
//! With `skip_prk_steps` (SD 1.5's config) it is PLMS: a linear multistep method over the
//! model outputs seen so far, whose second evaluation repeats the first interval with the
//! average of two outputs — so `n` steps evaluate the model `n + 1` times (the timestep list has
//! the second one twice). Without it, four Runge–Kutta (PRK) steps of three evaluations each
//! come first, then PLMS. Like diffusers, the state (the counter, the last model outputs, the
//! sample an interval started from) lives in the scheduler, which is why a run needs a fresh one.

use candle_core::{DType, Tensor};

use super::config::{Common, PredictionType, SchedulerConfig, Spacing};
use super::schedule::{
    alphas_cumprod, ddpm_add_noise, div, f32_of, mul, np_linspace, past_end, trailing,
};
use super::Scheduler;
use crate::error::{Error, Result};

/// Python's `1 / 6` and `1 / 3` (doubles) as torch applies them to a float32 tensor.
const SIXTH: f32 = (1.0f64 / 6.0) as f32;
const THIRD: f32 = (1.0f64 / 3.0) as f32;

/// diffusers' `PNDMScheduler`.
#[derive(Debug, Clone)]
pub(super) struct Pndm {
    /// The timesteps the pipeline feeds the model, PRK ones first.
    timesteps: Vec<f64>,
    steps: Vec<i64>,
    /// How many of `steps` are PRK steps (0 with `skip_prk_steps`).
    prk_len: usize,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    /// `num_train_timesteps // num_inference_steps`.
    ratio: i64,
    v_prediction: bool,
    /// Model evaluations stepped so far.
    counter: usize,
    /// The last model outputs PLMS combines (at most 4).
    ets: Vec<Tensor>,
    /// The sample the interval being refined started from.
    cur_sample: Option<Tensor>,
    /// PRK's running weighted sum of model outputs.
    cur_model_output: Option<Tensor>,
}

impl Pndm {
    /// Resolves `config` with `PNDMScheduler`'s defaults and sets `n` timesteps.
    pub fn new(config: &SchedulerConfig, n: usize, file: &str) -> Result<Self> {
        let mut common = Common::resolve(config, Spacing::Leading, file)?;
        // PNDMScheduler takes no zero-SNR option: from_config drops the key.
        common.rescale_zero_snr = false;
        let num_train = common.num_train;
        let base: Vec<i64> = match common.spacing {
            Spacing::Linspace => np_linspace(0.0, (num_train - 1) as f64, n)
                .into_iter()
                .map(|t| t.round_ties_even() as i64)
                .collect(),
            Spacing::Leading => (0..n)
                .map(|i| (i * (num_train / n) + common.steps_offset) as i64)
                .collect(),
            Spacing::Trailing => trailing(num_train, num_train, n)
                .into_iter()
                .rev()
                .map(|t| t as i64)
                .collect(),
        };
        let ratio = (num_train / n) as i64;
        let skip_prk = config.skip_prk_steps.unwrap_or(false);
        let (prk, plms): (Vec<i64>, Vec<i64>) = if skip_prk {
            // [t0 … t(n-2), t(n-2), t(n-1)] reversed: the second timestep comes twice.
            let mut plms: Vec<i64> = base[..n - 1].to_vec();
            plms.extend(base[n.saturating_sub(2)..n - 1].iter());
            plms.push(base[n - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            if n < 4 {
                let hint = "PNDM's Runge-Kutta warm-up needs at least 4 steps (diffusers fails \
                            below that); use skip_prk_steps or more steps";
                return Err(Error::invalid("steps", format!("{n} steps: {hint}")));
            }
            // The last four timesteps, each with its midpoint, each entry doubled but the
            // ends, reversed: 12 PRK evaluations.
            let half = ratio / 2;
            let pairs: Vec<i64> = base[n - 4..].iter().flat_map(|&t| [t, t + half]).collect();
            let doubled: Vec<i64> = pairs[..pairs.len() - 1]
                .iter()
                .flat_map(|&t| [t, t])
                .collect();
            let mut prk = doubled[1..doubled.len() - 1].to_vec();
            prk.reverse();
            let mut plms = base[..n - 3].to_vec();
            plms.reverse();
            (prk, plms)
        };
        let steps: Vec<i64> = prk.iter().chain(plms.iter()).copied().collect();
        if let Some(&bad) = steps.iter().find(|&&t| t < 0 || t >= num_train as i64) {
            return Err(Error::invalid(
                "steps",
                format!(
                    "{n} steps put PNDM timestep {bad} outside 0..{num_train} with this \
                     scheduler config; choose another step count"
                ),
            ));
        }
        // Checked after the timesteps, in diffusers' order (it fails in `step`).
        let v_prediction = match common.prediction {
            PredictionType::Epsilon => false,
            PredictionType::VPrediction => true,
            PredictionType::Sample => {
                let hint = "pndm supports epsilon and v_prediction";
                return Err(Error::unsupported(file, "prediction_type", "sample", hint));
            }
        };
        let alphas_cumprod = alphas_cumprod(&common);
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(false) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Pndm {
            timesteps: steps.iter().map(|&t| t as f64).collect(),
            prk_len: prk.len(),
            steps,
            alphas_cumprod,
            final_alpha_cumprod,
            ratio,
            v_prediction,
            counter: 0,
            ets: Vec::new(),
            cur_sample: None,
            cur_model_output: None,
        })
    }

    fn alpha(&self, t: i64) -> f32 {
        if t >= 0 {
            self.alphas_cumprod[t as usize]
        } else {
            self.final_alpha_cumprod
        }
    }

    /// diffusers' `_get_prev_sample`: formula (9) of the PNDM paper from `t` to `prev`, in
    /// float32 with torch's operation order.
    fn prev_sample(&self, sample: &Tensor, t: i64, prev: i64, output: &Tensor) -> Result<Tensor> {
        let a_t = self.alpha(t);
        let a_prev = self.alpha(prev);
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let output = if self.v_prediction {
            (mul(output, a_t.sqrt())? + mul(sample, b_t.sqrt())?)?
        } else {
            output.clone()
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        let eps_term = div(&mul(&output, a_prev - a_t)?, denom)?;
        Ok((mul(sample, sample_coeff)? - eps_term)?)
    }

    /// One Runge–Kutta evaluation (`step_prk`).
    fn step_prk(&mut self, output: &Tensor, t: i64, sample: &Tensor) -> Result<Tensor> {
        let diff_to_prev = if self.counter % 2 == 1 {
            0
        } else {
            self.ratio / 2
        };
        let prev = t - diff_to_prev;
        let t = self.steps[self.counter / 4 * 4];
        let sum = |cur: &Option<Tensor>, weighted: Tensor| -> Result<Tensor> {
            Ok(match cur {
                Some(c) => (c + weighted)?,
                None => weighted,
            })
        };
        let output = match self.counter % 4 {
            0 => {
                self.cur_model_output = Some(sum(&self.cur_model_output, mul(output, SIXTH)?)?);
                self.ets.push(output.clone());
                self.cur_sample = Some(sample.clone());
                output.clone()
            }
            1 | 2 => {
                self.cur_model_output = Some(sum(&self.cur_model_output, mul(output, THIRD)?)?);
                output.clone()
            }
            _ => {
                let combined = sum(&self.cur_model_output, mul(output, SIXTH)?)?;
                self.cur_model_output = None;
                combined
            }
        };
        let start = self.cur_sample.clone().unwrap_or_else(|| sample.clone());
        self.prev_sample(&start, t, prev, &output)
    }

    /// One linear multistep evaluation (`step_plms`).
    fn step_plms(&mut self, output: &Tensor, t: i64, sample: &Tensor) -> Result<Tensor> {
        let (mut t, mut prev) = (t, t - self.ratio);
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(output.clone());
        } else {
            prev = t;
            t += self.ratio;
        }
        let mut sample = sample.clone();
        match (self.ets.len(), self.counter) {
            (1, 0) => self.cur_sample = Some(sample.clone()),
            (1, 1) => {
                if let Some(s) = self.cur_sample.take() {
                    sample = s;
                }
            }
            _ => {}
        }
        let e = |k: usize| &self.ets[self.ets.len() - k];
        let output = match (self.ets.len(), self.counter) {
            (1, 0) => output.clone(),
            (1, 1) => div(&(output + e(1))?, 2.0)?,
            (2, _) => div(&(mul(e(1), 3.0)? - e(2))?, 2.0)?,
            (3, _) => div(
                &((mul(e(1), 23.0)? - mul(e(2), 16.0)?)? + mul(e(3), 5.0)?)?,
                12.0,
            )?,
            _ => {
                let combo = (((mul(e(1), 55.0)? - mul(e(2), 59.0)?)? + mul(e(3), 37.0)?)?
                    - mul(e(4), 9.0)?)?;
                mul(&combo, (1.0f64 / 24.0) as f32)?
            }
        };
        self.prev_sample(&sample, t, prev, &output)
    }
}

impl Scheduler for Pndm {
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
        let t = *self
            .steps
            .get(step_index)
            .ok_or_else(|| past_end(step_index, self.steps.len()))?;
        let (output, x) = (f32_of(model_output)?, f32_of(sample)?);
        let prev = if self.counter < self.prk_len {
            self.step_prk(&output, t, &x)?
        } else {
            self.step_plms(&output, t, &x)?
        };
        self.counter += 1;
        Ok(prev.to_dtype(model_output.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let t = self.steps[step_index];
        let alpha = self.alpha(t);
        ddpm_add_noise(original, noise, alpha)
    }
}
