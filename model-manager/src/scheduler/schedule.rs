//! Shared schedule maths: betas and `alphas_cumprod` rounded the way torch builds them in
//! float32, numpy's `linspace`/`arange`/`interp`/`round` as diffusers calls them, Karras sigmas,
//! and the f32 tensor helpers the step functions use.

use candle_core::{DType, Tensor};

use super::config::{BetaSchedule, Common, Spacing};
use crate::error::Result;

/// `alphas_cumprod` as diffusers' constructors build it in float32 (betas → optional zero-SNR
/// rescale → `cumprod(1 - betas)`), before Euler's/DPM's zero-SNR tail fix-up.
///
/// A float64 schedule differs from torch's by up to 1e-5 (scaled_linear) and 8e-5 (linear)
/// relative in sigma near t = 0, where `1 - alphas_cumprod` cancels; this path reproduces
/// torch's float32 values bit for bit.
pub(super) fn alphas_cumprod(common: &Common) -> Vec<f32> {
    let n = common.num_train;
    let mut betas: Vec<f32> = match &common.betas {
        BetaSchedule::Trained(b) => b.iter().map(|&v| v as f32).collect(),
        BetaSchedule::Linear { start, end } => torch_linspace_f32(*start, *end, n),
        BetaSchedule::ScaledLinear { start, end } => {
            torch_linspace_f32(start.sqrt(), end.sqrt(), n)
                .into_iter()
                .map(|b| b * b)
                .collect()
        }
        BetaSchedule::SquaredCosCapV2 => cosine_betas(n),
    };
    if common.rescale_zero_snr {
        betas = rescale_zero_terminal_snr(&betas);
    }
    cumprod(&betas.iter().map(|b| 1.0 - b).collect::<Vec<f32>>())
}

/// [`alphas_cumprod`] with the fix-up Euler, DPM-Solver and UniPC apply under zero-SNR
/// rescaling: the last value becomes 2⁻²⁴ so that the last training sigma stays finite.
pub(super) fn alphas_cumprod_finite(common: &Common) -> Vec<f32> {
    let mut alphas = alphas_cumprod(common);
    if common.rescale_zero_snr {
        alphas[common.num_train - 1] = 2f32.powi(-24);
    }
    alphas
}

/// The multistep solvers' (DPM-Solver, UniPC, DEIS) `linspace`/`leading`/`trailing` timesteps
/// over the training timesteps `0..last` (DPM's `lambda_min_clipped` may cut `last` below
/// `num_train`), as float64 integers; `trailing` keeps numpy's extra point (61 steps → 62).
pub(super) fn multistep_timesteps(common: &Common, last: usize, n: usize) -> Vec<f64> {
    match common.spacing {
        Spacing::Linspace => {
            let mut t: Vec<f64> = np_linspace(0.0, last as f64 - 1.0, n + 1)
                .into_iter()
                .rev()
                .map(f64::round_ties_even)
                .collect();
            t.pop();
            t
        }
        Spacing::Leading => {
            let ratio = last / (n + 1);
            (1..=n)
                .rev()
                .map(|i| (i * ratio + common.steps_offset) as f64)
                .collect()
        }
        Spacing::Trailing => trailing(last, common.num_train, n),
    }
}

/// The multistep solvers' Karras schedule: float64 sigmas from `sigma_max` (the config's, else
/// the last training sigma) down to `sigma_min` (the config's, else the first), and their
/// timesteps mapped back to training timesteps and rounded to the nearest — or truncated, as
/// DPM-Solver's int64 cast does for cosine schedules (`truncate`).
pub(super) fn multistep_karras(
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    train: &[f32],
    n: usize,
    truncate: bool,
) -> (Vec<f64>, Vec<f64>) {
    let sigmas = karras(
        sigma_min.unwrap_or(train[0] as f64),
        sigma_max.unwrap_or(train[train.len() - 1] as f64),
        n,
    );
    let logs = log_sigmas(train);
    let timesteps = sigmas
        .iter()
        .map(|&s| {
            let t = sigma_to_t(s, &logs);
            if truncate {
                t.trunc()
            } else {
                t.round_ties_even()
            }
        })
        .collect();
    (timesteps, sigmas)
}

/// `torch.linspace(start, end, n, dtype=float32)` on CPU: float32 endpoints and step, the first
/// half counted up from `start`, the second half down from `end`. The compiler fuses torch's
/// `start + step * i` into one FMA, so we do too (unfused, a fifth of the betas differ by an ulp).
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    (0..n)
        .map(|i| {
            if i < n / 2 {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - i - 1) as f32, end)
            }
        })
        .collect()
}

/// `torch.cumprod` on a float32 CPU tensor: accumulates in f64, stores every prefix as f32.
fn cumprod(values: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine transform, capped at 0.999 (computed in
/// float64 by Python, stored as float32).
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// Rescales betas to zero terminal SNR (Lin et al. 2023, algorithm 1), in float32 as torch does.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let cum = cumprod(&betas.iter().map(|b| 1.0 - b).collect::<Vec<f32>>());
    let sqrt: Vec<f32> = cum.iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt[0], sqrt[sqrt.len() - 1]);
    let scale = first / (first - last);
    let bar: Vec<f32> = sqrt
        .iter()
        .map(|s| {
            let s = (s - last) * scale;
            s * s
        })
        .collect();
    (0..bar.len())
        .map(|i| 1.0 - if i == 0 { bar[0] } else { bar[i] / bar[i - 1] })
        .collect()
}

/// Karras-space sigmas `sqrt((1 - a) / a)` per training timestep, in float32.
pub(super) fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// `np.linspace(start, stop, num)` in float64: `i * step + start`, the last point exactly `stop`.
pub(super) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut out: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    out[num - 1] = stop;
    out
}

/// `np.arange(start, stop, step)` in float64. numpy sizes it `ceil((stop - start) / step)`,
/// which can be one more than intended (e.g. `arange(1000, 0, -1000 / 61)` has 62 points), and
/// fills it as `start + i * ((start + step) - start)`.
pub(super) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.arange(start, 0, -num_train / n).round() - 1`: the `trailing` timesteps, as float64.
pub(super) fn trailing(start: usize, num_train: usize, n: usize) -> Vec<f64> {
    let ratio = num_train as f64 / n as f64;
    np_arange(start as f64, 0.0, -ratio)
        .into_iter()
        .map(|t| t.round_ties_even() - 1.0)
        .collect()
}

/// `np.interp(x, arange(len(fp)), fp)`: linear interpolation, clamped at both ends.
pub(super) fn interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return f64::NAN;
    }
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    let (lo, hi) = (fp[j] as f64, fp[j + 1] as f64);
    (hi - lo) * (x - j as f64) + lo
}

/// Karras et al. (2022) sigmas, rho = 7, from `sigma_max` down to `sigma_min` (float64).
pub(super) fn karras(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// `np.log` of the float32 training sigmas (a float32 array).
pub(super) fn log_sigmas(sigmas: &[f32]) -> Vec<f32> {
    sigmas.iter().map(|s| s.ln()).collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose sigma is `sigma`,
/// interpolating linearly in log-sigma between the neighbouring training timesteps.
pub(super) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // numpy: argmax of cumsum(log_sigma - log_sigmas >= 0), i.e. the last index at or below.
    let low = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l as f64 >= 0.0)
        .unwrap_or(0)
        .min(log_sigmas.len() - 2);
    let (lo, hi) = (log_sigmas[low] as f64, log_sigmas[low + 1] as f64);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// diffusers' `_sigma_to_alpha_sigma_t` in float32: `alpha = 1 / sqrt(sigma² + 1)`,
/// `sigma_t = sigma * alpha`.
pub(super) fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// DDPM's `add_noise` at `alphas_cumprod` value `alpha`: `sqrt(alpha) · x + sqrt(1 − alpha) · noise`
/// in f32, returned in `original`'s dtype (DDIM, PNDM, LCM).
pub(super) fn ddpm_add_noise(original: &Tensor, noise: &Tensor, alpha: f32) -> Result<Tensor> {
    let noisy =
        (mul(&f32_of(original)?, alpha.sqrt())? + mul(&f32_of(noise)?, (1.0 - alpha).sqrt())?)?;
    Ok(noisy.to_dtype(original.dtype())?)
}

/// Fails (`noise`) unless a step's fresh noise is shaped like the sample it perturbs.
pub(super) fn check_noise_shape(noise: &Tensor, sample: &Tensor) -> Result<()> {
    if noise.dims() == sample.dims() {
        return Ok(());
    }
    Err(crate::error::Error::invalid(
        "noise",
        format!(
            "step noise has shape {:?}, the sample {:?}",
            noise.dims(),
            sample.dims()
        ),
    ))
}

/// The error for a step index past a run's `len` timesteps (field `steps`).
pub(super) fn past_end(step_index: usize, len: usize) -> crate::error::Error {
    crate::error::Error::invalid(
        "steps",
        format!("step index {step_index} is past the {len} timesteps"),
    )
}

/// The tensor as f32 (step maths runs in f32 whatever the model's dtype).
pub(super) fn f32_of(t: &Tensor) -> Result<Tensor> {
    Ok(if t.dtype() == DType::F32 {
        t.clone()
    } else {
        t.to_dtype(DType::F32)?
    })
}

/// `t * s` for an f32 tensor (exact f32 product, like torch's scalar-tensor multiply).
pub(super) fn mul(t: &Tensor, s: f32) -> Result<Tensor> {
    Ok(t.affine(s as f64, 0.0)?)
}

/// `t / s` for an f32 tensor as a true division (not a multiply by `1 / s`), like torch.
pub(super) fn div(t: &Tensor, s: f32) -> Result<Tensor> {
    Ok(t.broadcast_div(&Tensor::new(s, t.device())?)?)
}
