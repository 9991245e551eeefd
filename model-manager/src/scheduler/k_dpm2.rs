//! The two-evaluation k-diffusion samplers, as diffusers' `HeunDiscreteScheduler`,
//! `KDPM2DiscreteScheduler` and `KDPM2AncestralDiscreteScheduler`.
//!
//! Each step of `n` takes two model evaluations except the last, so a run has `2n − 1`
//! timesteps (`order() == 2`). Evaluation `2k` is the first-order half of step `k` at sigma
//! `s_k`; evaluation `2k + 1` is its correction: Heun re-evaluates at `s_{k+1}` and averages the
//! derivatives, DPM2 evaluates at the midpoint `sqrt(s_k · s_{k+1})` (geometric mean, in log
//! space), DPM2-a at the midpoint towards its `sigma_down` and adds fresh noise `sigma_up`. The
//! last step is a plain Euler step to sigma 0. None of these classes reads
//! `rescale_betas_zero_snr` (diffusers ignores it for them, so do we).

use candle_core::{DType, Tensor};

use super::config::{refuse_flag, BetaDefaults, Common, PredictionType, SchedulerConfig, Spacing};
use super::euler::{predict_x0, SigmaOptions, SigmaSchedule};
use super::schedule::{
    alphas_cumprod, check_noise_shape, div, f32_of, log_sigmas, mul, past_end, sigma_to_t,
    train_sigmas,
};
use super::Scheduler;
use crate::error::{Error, Result};

/// Which of the three samplers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Variant {
    /// `HeunDiscreteScheduler`.
    Heun,
    /// `KDPM2DiscreteScheduler`.
    Dpm2,
    /// `KDPM2AncestralDiscreteScheduler` (draws noise on its second evaluations).
    Dpm2Ancestral,
}

/// Per step `k` (0..n) of the run: the sigmas one step uses, all float32 as diffusers keeps them.
#[derive(Debug, Clone, Copy)]
struct StepSigmas {
    /// `s_k`, where the step starts.
    from: f32,
    /// Where the first half goes and the second half evaluates: `s_{k+1}` (Heun), the log-space
    /// midpoint (DPM2, DPM2-a).
    mid: f32,
    /// Where the step ends: `s_{k+1}` (Heun, DPM2), `sigma_down` (DPM2-a).
    to: f32,
    /// Fresh noise added at the end of the step (DPM2-a; 0 otherwise).
    up: f32,
}

/// What the first half of a step leaves for the second (diffusers' `self.sample`, `self.dt`,
/// `self.prev_derivative`).
#[derive(Debug, Clone)]
struct FirstHalf {
    sample: Tensor,
    derivative: Tensor,
}

/// Heun, DPM2 or DPM2-a for one run.
#[derive(Debug, Clone)]
pub(super) struct SecondOrder {
    variant: Variant,
    prediction: PredictionType,
    /// Heun's `clip_sample_range` when `clip_sample` is on.
    clip: Option<f32>,
    timesteps: Vec<f64>,
    steps: Vec<StepSigmas>,
    init_noise_sigma: f64,
    first_half: Option<FirstHalf>,
}

impl SecondOrder {
    /// Resolves `config` with the class's defaults (Stable Diffusion's linear betas) and sets
    /// `n` steps (`2n − 1` timesteps).
    pub fn new(config: &SchedulerConfig, n: usize, variant: Variant, file: &str) -> Result<Self> {
        let mut common =
            Common::resolve_with(config, BetaDefaults::SD_LINEAR, Spacing::Linspace, file)?;
        common.rescale_zero_snr = false;
        refuse_flag(
            config.use_exponential_sigmas,
            "use_exponential_sigmas",
            file,
        )?;
        refuse_flag(config.use_beta_sigmas, "use_beta_sigmas", file)?;
        if variant != Variant::Heun && common.prediction == PredictionType::Sample {
            // diffusers raises NotImplementedError for it.
            let hint = "dpm2 and dpm2-a support epsilon and v_prediction";
            return Err(Error::unsupported(file, "prediction_type", "sample", hint));
        }
        let karras = config.use_karras_sigmas.unwrap_or(false);
        let opts = SigmaOptions {
            karras,
            ..SigmaOptions::default()
        };
        let schedule = SigmaSchedule::new(&common, n, opts);
        let mut t = schedule.timesteps.clone();
        if karras && variant != Variant::Heun {
            t.iter_mut().for_each(|t| *t = t.round_ties_even());
        }
        // numpy's `arange` can make one more trailing timestep than asked for (61 → 62).
        let n = t.len();
        let s = &schedule.sigmas; // n + 1 values, the last 0.
        let logs = log_sigmas(&train_sigmas(&alphas_cumprod(&common)));
        let (steps, mids): (Vec<StepSigmas>, Vec<f32>) = match variant {
            Variant::Heun => (0..n)
                .map(|k| {
                    let to = s[k + 1];
                    (
                        StepSigmas {
                            from: s[k],
                            mid: to,
                            to,
                            up: 0.0,
                        },
                        to,
                    )
                })
                .unzip(),
            Variant::Dpm2 => (0..n)
                .map(|k| {
                    let mid = log_midpoint(s[k + 1], s[k]);
                    (
                        StepSigmas {
                            from: s[k],
                            mid,
                            to: s[k + 1],
                            up: 0.0,
                        },
                        mid,
                    )
                })
                .unzip(),
            Variant::Dpm2Ancestral => (0..n)
                .map(|k| {
                    let (from, next) = (s[k], s[k + 1]);
                    let up = (next * next * (from * from - next * next) / (from * from)).sqrt();
                    // diffusers' square root goes NaN where rounding makes this negative (cosine
                    // betas, sigma_max ~2e4); zero is the value it rounds away from.
                    let down = (next * next - up * up).max(0.0).sqrt();
                    // diffusers zeroes the last two midpoints: the final step goes to 0.
                    let mid = if k + 1 >= n {
                        0.0
                    } else {
                        log_midpoint(from, down)
                    };
                    (
                        StepSigmas {
                            from,
                            mid,
                            to: down,
                            up,
                        },
                        mid,
                    )
                })
                .unzip(),
        };
        // Evaluation 2k + 1 runs at the timestep of step k's midpoint (Heun: t_{k+1} itself).
        let mut timesteps = vec![t[0]];
        for k in 1..n {
            let mid_t = match variant {
                Variant::Heun => t[k],
                _ => sigma_to_t(mids[k - 1] as f64, &logs) as f32 as f64,
            };
            timesteps.extend([mid_t, t[k]]);
        }
        let clip = match config.clip_sample.unwrap_or(false) && variant == Variant::Heun {
            true => Some(config.clip_sample_range.unwrap_or(1.0) as f32),
            false => None,
        };
        Ok(SecondOrder {
            variant,
            prediction: common.prediction,
            clip,
            timesteps,
            steps,
            init_noise_sigma: schedule.init_noise_sigma,
            first_half: None,
        })
    }

    /// The step evaluation `index` belongs to and whether it is that step's first half.
    fn locate(&self, index: usize) -> Result<(StepSigmas, bool)> {
        if index >= self.timesteps.len() {
            return Err(past_end(index, self.timesteps.len()));
        }
        Ok((self.steps[index / 2], index.is_multiple_of(2)))
    }
}

/// `exp(lerp(ln a, ln b, 0.5))` as torch computes it in float32 (`end − (end − start) · 0.5`).
fn log_midpoint(start: f32, end: f32) -> f32 {
    let (start, end) = (start.ln(), end.ln());
    (end - (end - start) * 0.5).exp()
}

impl Scheduler for SecondOrder {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: Tensor, step_index: usize) -> Result<Tensor> {
        let (s, first) = self.locate(step_index)?;
        let sigma = if first { s.from } else { s.mid };
        let scaled = div(&f32_of(&sample)?, (sigma * sigma + 1.0).sqrt())?;
        Ok(scaled.to_dtype(sample.dtype())?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn FnMut(DType) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (s, first) = self.locate(step_index)?;
        let (mo, x) = (f32_of(model_output)?, f32_of(sample)?);
        let sigma_in = if first { s.from } else { s.mid };
        let mut x0 = predict_x0(self.prediction, &mo, &x, sigma_in)?;
        if let Some(range) = self.clip {
            x0 = x0.clamp(-range, range)?;
        }
        let derivative = div(&(&x - x0)?, sigma_in)?;
        let prev = if first {
            let prev = (&x + mul(&derivative, s.mid - s.from)?)?;
            self.first_half = Some(FirstHalf {
                sample: x,
                derivative,
            });
            prev
        } else {
            let half = self.first_half.take().ok_or_else(|| {
                Error::invalid(
                    "steps",
                    format!("step index {step_index} is a second half with no first half"),
                )
            })?;
            match self.variant {
                Variant::Heun => {
                    let averaged = ((half.derivative + derivative)? / 2.0)?;
                    (half.sample + mul(&averaged, s.to - s.from)?)?
                }
                Variant::Dpm2 => (half.sample + mul(&derivative, s.to - s.from)?)?,
                Variant::Dpm2Ancestral => {
                    let prev = (half.sample + mul(&derivative, s.to - s.from)?)?;
                    let fresh = f32_of(&noise(model_output.dtype())?)?;
                    check_noise_shape(&fresh, &prev)?;
                    (prev + mul(&fresh, s.up)?)?
                }
            }
        };
        Ok(prev.to_dtype(model_output.dtype())?)
    }

    /// `original + noise · sigmas[step_index]` with diffusers' interleaved sigmas: evaluation
    /// `2k` is at `s_k`, its second half `2k + 1` at `s_{k+1}` (what inpainting's blend noises
    /// to after a first half).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let (s, first) = self.locate(step_index)?;
        let sigma = match first {
            true => s.from,
            false => self
                .steps
                .get(step_index / 2 + 1)
                .map_or(0.0, |next| next.from),
        };
        let noisy = (f32_of(original)? + mul(&f32_of(noise)?, sigma)?)?;
        Ok(noisy.to_dtype(original.dtype())?)
    }

    fn order(&self) -> usize {
        2
    }
}
