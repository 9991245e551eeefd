//! `scheduler_config.json`: every field optional, resolved per scheduler class like diffusers'
//! `Class.from_config(config)`.

use serde::{de::Error as _, Deserialize, Deserializer};

use super::SchedulerKind;
use crate::error::{Error, Result};

/// A diffusers `scheduler_config.json` as written, every field optional.
///
/// Missing keys (and `null`s, and keys listed in diffusers' `_use_default_values`) resolve to the
/// defaults of whichever scheduler class is built from it, exactly like
/// `Class.from_config(config)`; keys no implemented class reads are ignored.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// `_class_name`: the diffusers class the checkpoint ships with.
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    /// Length of the training noise schedule (default 1000).
    pub num_train_timesteps: Option<usize>,
    /// First beta of `linear`/`scaled_linear` (default 0.0001).
    #[serde(deserialize_with = "de_f64")]
    pub beta_start: Option<f64>,
    /// Last beta of `linear`/`scaled_linear` (default 0.02).
    #[serde(deserialize_with = "de_f64")]
    pub beta_end: Option<f64>,
    /// `linear` (default), `scaled_linear` or `squaredcos_cap_v2`.
    pub beta_schedule: Option<String>,
    /// Explicit betas; override `beta_schedule` when present.
    pub trained_betas: Option<Vec<f64>>,
    /// DDIM: clamp the predicted x0 (DDIM default true).
    pub clip_sample: Option<bool>,
    /// DDIM: clamp range for `clip_sample` (default 1.0).
    #[serde(deserialize_with = "de_f64")]
    pub clip_sample_range: Option<f64>,
    /// DDIM: the final step goes to alpha = 1 instead of `alphas_cumprod[0]` (default true).
    pub set_alpha_to_one: Option<bool>,
    /// Offset added to `leading` timesteps (default 0).
    pub steps_offset: Option<usize>,
    /// `epsilon` (default), `v_prediction` or `sample`.
    pub prediction_type: Option<String>,
    /// Dynamic thresholding (not implemented: must be false).
    pub thresholding: Option<bool>,
    /// Dynamic thresholding ratio (only read with `thresholding`).
    #[serde(deserialize_with = "de_f64")]
    pub dynamic_thresholding_ratio: Option<f64>,
    /// Dynamic thresholding maximum (only read with `thresholding`).
    #[serde(deserialize_with = "de_f64")]
    pub sample_max_value: Option<f64>,
    /// `leading`, `trailing` or `linspace` (DDIM default `leading`, the others `linspace`).
    pub timestep_spacing: Option<String>,
    /// Rescale betas to zero terminal SNR (default false).
    pub rescale_betas_zero_snr: Option<bool>,
    /// Euler: sigma interpolation, `linear` (default; `log_linear` is not implemented).
    pub interpolation_type: Option<String>,
    /// Euler / DPM: Karras sigmas (default false).
    pub use_karras_sigmas: Option<bool>,
    /// Exponential sigmas (not implemented: must be false).
    pub use_exponential_sigmas: Option<bool>,
    /// Beta sigmas (not implemented: must be false).
    pub use_beta_sigmas: Option<bool>,
    /// Karras `sigma_min` override (default: the schedule's own).
    #[serde(deserialize_with = "de_f64")]
    pub sigma_min: Option<f64>,
    /// Karras `sigma_max` override (default: the schedule's own).
    #[serde(deserialize_with = "de_f64")]
    pub sigma_max: Option<f64>,
    /// Euler: `discrete` (default) or `continuous`.
    pub timestep_type: Option<String>,
    /// Euler / DPM: last sigma, `zero` (default) or `sigma_min`.
    pub final_sigmas_type: Option<String>,
    /// DPM: solver order (only 2 is implemented).
    pub solver_order: Option<usize>,
    /// DPM: `dpmsolver++` (default; the others are not implemented).
    pub algorithm_type: Option<String>,
    /// DPM: `midpoint` (default; `heun` is not implemented).
    pub solver_type: Option<String>,
    /// DPM: first-order final steps for short runs (default true).
    pub lower_order_final: Option<bool>,
    /// DPM: Euler final step (not implemented: must be false).
    pub euler_at_final: Option<bool>,
    /// DPM: uniform-logSNR steps (not implemented: must be false).
    pub use_lu_lambdas: Option<bool>,
    /// DPM: flow-matching sigmas (not implemented: must be false).
    pub use_flow_sigmas: Option<bool>,
    /// DPM: flow shift (only read with flow sigmas).
    #[serde(deserialize_with = "de_f64")]
    pub flow_shift: Option<f64>,
    /// DPM: clip the timestep range where lambda(t) falls below this (default -inf).
    #[serde(deserialize_with = "de_f64")]
    pub lambda_min_clipped: Option<f64>,
    /// DPM: `learned`/`learned_range` variance outputs (not implemented).
    pub variance_type: Option<String>,
    /// DPM: dynamic shifting (not implemented: must be false).
    pub use_dynamic_shifting: Option<bool>,
    /// PNDM: skip the Runge–Kutta warm-up (pure PLMS, as SD 1.x ships it).
    pub skip_prk_steps: Option<bool>,
    /// UniPC: predict x0 (default true; the noise-predicting variant is UniPC's `bh1`/`bh2` on
    /// epsilon).
    pub predict_x0: Option<bool>,
    /// UniPC: the step indices whose corrector is skipped (default none).
    pub disable_corrector: Option<Vec<usize>>,
    /// LCM: the inference steps of the distillation schedule (default 50).
    pub original_inference_steps: Option<usize>,
    /// LCM: the boundary-condition timestep scaling (default 10).
    #[serde(deserialize_with = "de_f64")]
    pub timestep_scaling: Option<f64>,
}

impl SchedulerConfig {
    /// Parses a `scheduler_config.json`; `file_name` names it in errors.
    ///
    /// Accepts the bare `Infinity`/`-Infinity`/`NaN` tokens Python's `json.dumps` writes (diffusers
    /// saves `"lambda_min_clipped": -Infinity`), and drops the keys listed in
    /// `_use_default_values`, as diffusers does before handing a config to another class.
    pub fn from_json_str(text: &str, file_name: &str) -> Result<Self> {
        let config_err = |reason: String| Error::Config {
            file: file_name.to_string(),
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_str(&quote_non_finite(text)).map_err(|e| config_err(e.to_string()))?;
        let serde_json::Value::Object(mut map) = value else {
            return Err(config_err("expected a JSON object".into()));
        };
        if let Some(serde_json::Value::Array(defaults)) = map.remove("_use_default_values") {
            for key in defaults.iter().filter_map(|k| k.as_str()) {
                map.remove(key);
            }
        }
        serde_json::from_value(serde_json::Value::Object(map))
            .map_err(|e| config_err(e.to_string()))
    }

    /// The scheduler the checkpoint ships with, if we implement its class (`None` for
    /// `DDPMScheduler`, `KarrasVeScheduler`, …: the pipeline then uses [`super::FALLBACK`]).
    pub fn native_kind(&self) -> Option<SchedulerKind> {
        use SchedulerKind as K;
        let karras = self.use_karras_sigmas == Some(true);
        // The DPM names run dpmsolver++ or its SDE; the old noise-predicting algorithms
        // (`dpmsolver`, `sde-dpmsolver`) are not implemented.
        let sde = match self.algorithm_type.as_deref() {
            None | Some("dpmsolver++") => false,
            Some("sde-dpmsolver++") => true,
            Some(_) => return None,
        };
        Some(match self.class_name.as_deref()? {
            "DDIMScheduler" => K::Ddim,
            "PNDMScheduler" => K::Pndm,
            "EulerDiscreteScheduler" if karras => K::EulerKarras,
            "EulerDiscreteScheduler" => K::Euler,
            "EulerAncestralDiscreteScheduler" => K::EulerAncestral,
            "LMSDiscreteScheduler" if karras => K::LmsKarras,
            "LMSDiscreteScheduler" => K::Lms,
            "HeunDiscreteScheduler" => K::Heun,
            "KDPM2DiscreteScheduler" => K::Dpm2,
            "KDPM2AncestralDiscreteScheduler" => K::Dpm2Ancestral,
            "DPMSolverMultistepScheduler" => match (sde, karras) {
                (false, false) => K::DpmPp2m,
                (false, true) => K::DpmPp2mKarras,
                (true, false) => K::DpmPp2mSde,
                (true, true) => K::DpmPp2mSdeKarras,
            },
            "UniPCMultistepScheduler" => K::UniPc,
            "DEISMultistepScheduler" => K::Deis,
            "LCMScheduler" => K::Lcm,
            _ => return None,
        })
    }
}

/// Accepts a JSON number, `null`, or one of the words [`quote_non_finite`] quoted.
fn de_f64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumOrWord {
        Num(f64),
        Word(String),
    }
    match Option::<NumOrWord>::deserialize(d)? {
        None => Ok(None),
        Some(NumOrWord::Num(v)) => Ok(Some(v)),
        Some(NumOrWord::Word(w)) => match w.as_str() {
            "Infinity" => Ok(Some(f64::INFINITY)),
            "-Infinity" => Ok(Some(f64::NEG_INFINITY)),
            "NaN" => Ok(Some(f64::NAN)),
            _ => Err(D::Error::custom(format!("expected a number, got \"{w}\""))),
        },
    }
}

/// Wraps the non-standard tokens `-Infinity`, `Infinity` and `NaN` found outside JSON strings
/// in quotes, so that `serde_json` can read what Python's `json.dumps` writes.
fn quote_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(word) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|w| rest.starts_with(w))
        {
            out.push('"');
            out.push_str(word);
            out.push('"');
            rest = &rest[word.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

/// How inference timesteps are spread over the training schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

/// Where the betas come from.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum BetaSchedule {
    Trained(Vec<f64>),
    Linear { start: f64, end: f64 },
    ScaledLinear { start: f64, end: f64 },
    SquaredCosCapV2,
}

/// A class's defaults for the beta schedule keys (they differ between diffusers classes).
#[derive(Debug, Clone, Copy)]
pub(super) struct BetaDefaults {
    pub start: f64,
    pub end: f64,
    pub schedule: &'static str,
}

impl BetaDefaults {
    /// DDIM, PNDM, Euler, LMS, DPM-Solver, UniPC, DEIS: `linear` from 0.0001 to 0.02.
    pub const DDPM: BetaDefaults = BetaDefaults {
        start: 0.0001,
        end: 0.02,
        schedule: "linear",
    };
    /// Heun, DPM2, DPM2-a: `linear` from 0.00085 to 0.012 (Stable Diffusion's range).
    pub const SD_LINEAR: BetaDefaults = BetaDefaults {
        start: 0.00085,
        end: 0.012,
        schedule: "linear",
    };
    /// LCM: `scaled_linear` from 0.00085 to 0.012 (Stable Diffusion's own schedule).
    pub const SD_SCALED: BetaDefaults = BetaDefaults {
        start: 0.00085,
        end: 0.012,
        schedule: "scaled_linear",
    };
}

/// The fields every class shares, resolved with one class's defaults and validated.
#[derive(Debug, Clone)]
pub(super) struct Common {
    pub num_train: usize,
    pub betas: BetaSchedule,
    pub prediction: PredictionType,
    pub spacing: Spacing,
    pub steps_offset: usize,
    pub rescale_zero_snr: bool,
}

impl Common {
    /// Resolves the shared fields with the DDPM beta defaults; `default_spacing` is the class's
    /// own default.
    pub fn resolve(c: &SchedulerConfig, default_spacing: Spacing, file: &str) -> Result<Self> {
        Self::resolve_with(c, BetaDefaults::DDPM, default_spacing, file)
    }

    /// Resolves the shared fields with a class's own beta and spacing defaults.
    pub fn resolve_with(
        c: &SchedulerConfig,
        beta_defaults: BetaDefaults,
        default_spacing: Spacing,
        file: &str,
    ) -> Result<Self> {
        let num_train = c.num_train_timesteps.unwrap_or(1000);
        if num_train < 2 {
            let hint = "need at least 2 training timesteps";
            return Err(Error::unsupported(
                file,
                "num_train_timesteps",
                num_train,
                hint,
            ));
        }
        let start = c.beta_start.unwrap_or(beta_defaults.start);
        let end = c.beta_end.unwrap_or(beta_defaults.end);
        let betas = match (
            &c.trained_betas,
            c.beta_schedule.as_deref().unwrap_or(beta_defaults.schedule),
        ) {
            (Some(b), _) if b.len() != num_train => {
                let hint = format!("must hold num_train_timesteps = {num_train} values");
                return Err(Error::unsupported(
                    file,
                    "trained_betas",
                    format!("{} values", b.len()),
                    hint,
                ));
            }
            (Some(b), _) => BetaSchedule::Trained(b.clone()),
            (None, "linear") => BetaSchedule::Linear { start, end },
            (None, "scaled_linear") => BetaSchedule::ScaledLinear { start, end },
            (None, "squaredcos_cap_v2") => BetaSchedule::SquaredCosCapV2,
            (None, other) => {
                let hint = "supported: linear, scaled_linear, squaredcos_cap_v2, trained_betas";
                return Err(Error::unsupported(file, "beta_schedule", other, hint));
            }
        };
        let prediction = match c.prediction_type.as_deref().unwrap_or("epsilon") {
            "epsilon" => PredictionType::Epsilon,
            "v_prediction" => PredictionType::VPrediction,
            "sample" => PredictionType::Sample,
            other => {
                let hint = "supported: epsilon, v_prediction, sample";
                return Err(Error::unsupported(file, "prediction_type", other, hint));
            }
        };
        let spacing = match c.timestep_spacing.as_deref() {
            None => default_spacing,
            Some("leading") => Spacing::Leading,
            Some("trailing") => Spacing::Trailing,
            Some("linspace") => Spacing::Linspace,
            Some(other) => {
                let hint = "supported: leading, trailing, linspace";
                return Err(Error::unsupported(file, "timestep_spacing", other, hint));
            }
        };
        Ok(Common {
            num_train,
            betas,
            prediction,
            spacing,
            steps_offset: c.steps_offset.unwrap_or(0),
            rescale_zero_snr: c.rescale_betas_zero_snr.unwrap_or(false),
        })
    }
}

/// Refuses a boolean option that is set to `true` (an unimplemented feature).
pub(super) fn refuse_flag(value: Option<bool>, field: &str, file: &str) -> Result<()> {
    if value == Some(true) {
        return Err(Error::unsupported(
            file,
            field,
            true,
            "not implemented; set it to false",
        ));
    }
    Ok(())
}

/// Refuses `value` (`default` when missing) unless it is one of `allowed`.
pub(super) fn require_one_of(
    value: Option<&str>,
    default: &str,
    allowed: &[&str],
    field: &str,
    file: &str,
) -> Result<()> {
    let value = value.unwrap_or(default);
    if allowed.contains(&value) {
        return Ok(());
    }
    let hint = format!("supported: {}", allowed.join(", "));
    Err(Error::unsupported(file, field, value, hint))
}

/// Resolves `final_sigmas_type`: `true` for `sigma_min`, `false` for `zero` (the default).
pub(super) fn final_sigma_min(c: &SchedulerConfig, file: &str) -> Result<bool> {
    match c.final_sigmas_type.as_deref().unwrap_or("zero") {
        "zero" => Ok(false),
        "sigma_min" => Ok(true),
        other => Err(Error::unsupported(
            file,
            "final_sigmas_type",
            other,
            "supported: zero, sigma_min",
        )),
    }
}
