//! Parity with diffusers 0.42.1: replays the cases recorded by
//! `tests/fixtures/scheduler_reference.py` (committed JSON + safetensors; no Python needed).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::{build, Scheduler, SchedulerConfig, SchedulerKind};
use crate::error::{Error, Result};

const REFERENCE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/reference/");

/// Trajectory tolerance, on `|rust - torch| / (1 + |torch|)` per element.
///
/// Both sides run float32 tensors, and we replay torch's operation order with the same
/// f32-rounded scalar coefficients and a bit-exact float32 `alphas_cumprod`, so 90% of the cases
/// agree bit for bit. The rest comes from torch's float32 `sqrt` (and `** 0.5`), which on this
/// x86 MKL build is 1 ulp low for ~0.5% of inputs where we use the correctly rounded IEEE sqrt:
/// a training sigma, a zero-SNR rescale value or a step coefficient then differs by one ulp, and
/// steps carry that along (measured worst: 3.3e-6, zero-SNR euler-a where sigma starts at 4096).
/// The `1 + |torch|` denominator keeps large-sigma samples (up to ~2e4 for cosine betas) from
/// demanding more digits than f32 has. 1e-5 is ~100 ulp of a unit value: a wrong coefficient,
/// sigma or timestep anywhere is orders of magnitude larger.
const TRAJECTORY_TOL: f64 = 1e-5;
/// Float timesteps and `init_noise_sigma`: relative, floored at 1 (Karras `sigma_to_t` can give
/// values like 6e-7 where only absolute agreement is meaningful).
const FLOAT_TOL: f64 = 1e-4;

#[derive(Deserialize)]
struct Fixture {
    configs: HashMap<String, String>,
    cases: Vec<Case>,
    timesteps_only: Vec<TimestepsOnly>,
}

#[derive(Deserialize)]
struct Case {
    config: String,
    kind: String,
    steps: usize,
    error: Option<String>,
    /// The field our refusal names: `prediction_type`, or `steps` (PNDM's Runge-Kutta
    /// warm-up below 4 steps).
    error_field: Option<String>,
    timesteps: Option<Vec<f64>>,
    init_noise_sigma: Option<f64>,
    trajectory: Option<Recorded>,
    img2img: Option<Img2Img>,
}

#[derive(Deserialize)]
struct Recorded {
    tensor: String,
    /// Indices into the timesteps of the rows stored in `tensor`.
    steps: Vec<usize>,
}

#[derive(Deserialize)]
struct Img2Img {
    begin: usize,
    noised: String,
    trajectory: Recorded,
}

#[derive(Deserialize)]
struct TimestepsOnly {
    config: String,
    kind: String,
    steps: usize,
    /// `null` where diffusers' own value is NaN (DPM2-a's midpoint at a huge `sigma_max`).
    #[serde(default)]
    timesteps: Vec<Option<f64>>,
    #[serde(default)]
    init_noise_sigma: f64,
    /// diffusers fails to set these timesteps (PNDM's warm-up below 4 steps).
    error_field: Option<String>,
    #[serde(default)]
    negative_timestep: bool,
}

fn load() -> (Fixture, HashMap<String, Tensor>) {
    let json = std::fs::read_to_string(format!("{REFERENCE_DIR}schedulers.json"))
        .expect("tests/fixtures/reference/schedulers.json");
    let fixture: Fixture = serde_json::from_str(&json).expect("fixture JSON");
    let tensors = candle_core::safetensors::load(
        format!("{REFERENCE_DIR}schedulers.safetensors"),
        &Device::Cpu,
    )
    .expect("tests/fixtures/reference/schedulers.safetensors");
    (fixture, tensors)
}

fn config(fixture: &Fixture, name: &str) -> SchedulerConfig {
    SchedulerConfig::from_json_str(&fixture.configs[name], name).expect("fixture config parses")
}

/// Worst `|a - b| / (1 + |b|)` over the elements.
fn scaled_err(a: &Tensor, b: &Tensor) -> f64 {
    let a: Vec<f32> = a
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(&x, &y)| (x as f64 - y as f64).abs() / (1.0 + (y as f64).abs()))
        .fold(0.0, f64::max)
}

fn check_timesteps(what: &str, kind: SchedulerKind, got: &[f64], want: &[f64]) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: timesteps {got:?} vs diffusers {want:?}"
    );
    use SchedulerKind as K;
    // The k-diffusion style classes keep fractional timesteps; the others are integers.
    let integer = !matches!(
        kind,
        K::Euler
            | K::EulerKarras
            | K::EulerAncestral
            | K::Lms
            | K::LmsKarras
            | K::Heun
            | K::Dpm2
            | K::Dpm2Ancestral
    );
    for (g, w) in got.iter().zip(want) {
        if integer {
            assert_eq!(g, w, "{what}: timesteps {got:?} vs diffusers {want:?}");
        } else {
            assert!(
                (g - w).abs() <= FLOAT_TOL * w.abs().max(1.0),
                "{what}: timesteps {got:?} vs {want:?}"
            );
        }
    }
}

fn check_init_sigma(what: &str, got: f64, want: f64) {
    assert!(
        (got - want).abs() <= FLOAT_TOL * want.abs().max(1.0),
        "{what}: init_noise_sigma {got} vs {want}"
    );
}

/// Runs the steps `begin..` with the fixture's fake model (`0.5 * bank[i] + 0.5 * scaled input`)
/// and euler-a noise from `noise_bank` in draw order; returns the sample after every step.
fn run(
    sched: &mut dyn Scheduler,
    mut latents: Tensor,
    begin: usize,
    t: &HashMap<String, Tensor>,
) -> Result<Vec<Tensor>> {
    let (bank, noise_bank) = (&t["bank"], &t["noise_bank"]);
    let mut draws = 0usize;
    let mut out = Vec::new();
    for i in begin..sched.timesteps().len() {
        let scaled = sched.scale_model_input(latents.clone(), i)?;
        let model_output = ((bank.get(i)? * 0.5)? + (scaled * 0.5)?)?;
        let mut noise = |_: DType| -> Result<Tensor> {
            draws += 1;
            Ok(noise_bank.get(draws - 1)?)
        };
        latents = sched.step(&model_output, i, &latents, &mut noise)?;
        out.push(latents.clone());
    }
    Ok(out)
}

/// Compares the recorded rows of a trajectory; returns the worst scaled error.
fn check_trajectory(
    what: &str,
    got: &[Tensor],
    begin: usize,
    rec: &Recorded,
    t: &HashMap<String, Tensor>,
) -> f64 {
    let want = &t[&rec.tensor];
    let mut worst = 0.0f64;
    for (row, &step) in rec.steps.iter().enumerate() {
        let err = scaled_err(
            &got[step - begin],
            &want.get(row).unwrap().unsqueeze(0).unwrap(),
        );
        assert!(
            err <= TRAJECTORY_TOL,
            "{what}: step {step} differs from diffusers by {err:e}"
        );
        worst = worst.max(err);
    }
    worst
}

/// Checks one recorded case (refusal, timesteps, trajectory, img2img); returns the worst
/// scaled error, panicking on a mismatch.
fn check_case(fixture: &Fixture, case: &Case, t: &HashMap<String, Tensor>) -> f64 {
    let what = format!("{} / {} / {} steps", case.config, case.kind, case.steps);
    let kind: SchedulerKind = case.kind.parse().unwrap();
    let cfg = config(fixture, &case.config);
    if let Some(error) = &case.error {
        // diffusers raises (prediction_type "sample" for euler-a and pndm, PNDM's warm-up
        // below 4 steps): we refuse it naming the field.
        let want = case.error_field.as_deref().unwrap_or("prediction_type");
        match build(kind, &cfg, case.steps, "cfg") {
            Err(Error::Unsupported { field, .. }) => assert_eq!(field, want, "{what}"),
            Err(Error::InvalidParam { field, .. }) => assert_eq!(field, want, "{what}"),
            Err(e) => panic!("{what}: wrong error {e}"),
            Ok(_) => panic!("{what}: diffusers refuses this ({error}), we built it"),
        }
        return 0.0;
    }
    let mut sched = build(kind, &cfg, case.steps, "cfg").unwrap_or_else(|e| panic!("{what}: {e}"));
    check_timesteps(
        &what,
        kind,
        sched.timesteps(),
        case.timesteps.as_ref().unwrap(),
    );
    check_init_sigma(
        &what,
        sched.init_noise_sigma(),
        case.init_noise_sigma.unwrap(),
    );
    let latents = (&t["base"] * sched.init_noise_sigma()).unwrap();
    let got = run(sched.as_mut(), latents, 0, t).unwrap();
    let mut err = check_trajectory(&what, &got, 0, case.trajectory.as_ref().unwrap(), t);

    if let Some(img) = &case.img2img {
        let what = format!("{what} / img2img from {}", img.begin);
        let mut sched = build(kind, &cfg, case.steps, "cfg").unwrap();
        let noised = sched
            .add_noise(&t["clean"], &t["img_noise"], img.begin)
            .unwrap();
        let e = scaled_err(&noised, &t[&img.noised]);
        assert!(e <= TRAJECTORY_TOL, "{what}: add_noise differs by {e:e}");
        let got = run(sched.as_mut(), noised, img.begin, t).unwrap();
        err = err
            .max(e)
            .max(check_trajectory(&what, &got, img.begin, &img.trajectory, t));
    }
    err
}

/// Every recorded case, each checked on its own so that one failure reports all the others.
#[test]
fn trajectories_match_diffusers() {
    let (fixture, t) = load();
    let mut worst: HashMap<SchedulerKind, f64> = HashMap::new();
    let mut failed = Vec::new();
    for case in &fixture.cases {
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_case(&fixture, case, &t)
        }));
        match checked {
            Ok(err) => {
                let w = worst.entry(case.kind.parse().unwrap()).or_default();
                *w = w.max(err);
            }
            Err(_) => failed.push(format!("{} / {} / {}", case.config, case.kind, case.steps)),
        }
    }
    for kind in SchedulerKind::ALL {
        println!(
            "worst scaled trajectory error {kind}: {:e}",
            worst.get(&kind).copied().unwrap_or(0.0)
        );
    }
    assert!(
        failed.is_empty(),
        "{} cases differ: {failed:#?}",
        failed.len()
    );
    assert!(
        fixture.cases.len() >= 700,
        "only {} cases",
        fixture.cases.len()
    );
    for kind in SchedulerKind::ALL {
        assert!(
            fixture.cases.iter().any(|c| c.kind == kind.as_str()),
            "no recorded case for {kind}"
        );
    }
}

#[test]
fn timesteps_match_diffusers_for_more_step_counts() {
    let (fixture, _) = load();
    for case in &fixture.timesteps_only {
        let what = format!("{} / {} / {} steps", case.config, case.kind, case.steps);
        let kind: SchedulerKind = case.kind.parse().unwrap();
        let built = build(kind, &config(&fixture, &case.config), case.steps, "cfg");
        if let Some(field) = &case.error_field {
            match built {
                Err(Error::InvalidParam { field: f, .. }) => assert_eq!(f, field, "{what}"),
                _ => panic!("{what}: diffusers refuses this step count, we did not"),
            }
            continue;
        }
        if case.negative_timestep {
            // diffusers would read alphas_cumprod[-1] here; we refuse the step count instead.
            assert!(
                matches!(built, Err(Error::InvalidParam { field: "steps", .. })),
                "{what}"
            );
            continue;
        }
        let sched = built.unwrap_or_else(|e| panic!("{what}: {e}"));
        // Where diffusers' value is NaN, ours must be a real timestep; the others must match.
        let (got, want): (Vec<f64>, Vec<f64>) = sched
            .timesteps()
            .iter()
            .zip(&case.timesteps)
            .filter_map(|(&g, w)| match w {
                Some(w) => Some((g, *w)),
                None => {
                    assert!(g.is_finite(), "{what}: timestep {g}");
                    None
                }
            })
            .unzip();
        assert_eq!(sched.timesteps().len(), case.timesteps.len(), "{what}");
        check_timesteps(&what, kind, &got, &want);
        check_init_sigma(&what, sched.init_noise_sigma(), case.init_noise_sigma);
    }
}

/// f16 and bf16 tensors go through the same f32 maths and come back in their own dtype.
#[test]
fn half_precision_tensors_round_trip() {
    let (fixture, t) = load();
    let cfg = config(&fixture, "sd15_pndm");
    for kind in SchedulerKind::ALL {
        for dtype in [DType::F16, DType::BF16] {
            let mut reference = build(kind, &cfg, 4, "cfg").unwrap();
            let mut half = build(kind, &cfg, 4, "cfg").unwrap();
            let x = (&t["base"] * reference.init_noise_sigma()).unwrap();
            let mo = t["bank"].get(0).unwrap();
            let mut noise = |_: DType| -> Result<Tensor> { Ok(t["noise_bank"].get(0)?) };
            let want = reference.step(&mo, 0, &x, &mut noise).unwrap();
            let scaled = half
                .scale_model_input(x.to_dtype(dtype).unwrap(), 0)
                .unwrap();
            assert_eq!(scaled.dtype(), dtype);
            let got = half
                .step(
                    &mo.to_dtype(dtype).unwrap(),
                    0,
                    &x.to_dtype(dtype).unwrap(),
                    &mut noise,
                )
                .unwrap();
            assert_eq!(got.dtype(), dtype, "{kind}");
            let err = scaled_err(&got, &want);
            assert!(err < 2e-2, "{kind} {dtype:?}: {err}");
        }
    }
}

/// Progress counts steps, not model evaluations, as diffusers' pipelines count them.
#[test]
fn progress_counts_steps_as_diffusers_does() {
    use super::counts_as_step;
    let counted = |evaluations: usize, steps: usize, order: usize| {
        (0..evaluations)
            .filter(|&i| counts_as_step(i, evaluations, steps, order))
            .count()
    };
    // First order: every evaluation is a step.
    assert_eq!(counted(20, 20, 1), 20);
    // PLMS: n + 1 evaluations, the first two make one step.
    assert_eq!(counted(21, 20, 1), 20);
    assert!(!counts_as_step(0, 21, 20, 1) && counts_as_step(1, 21, 20, 1));
    // Second order (Heun, DPM2): 2n - 1 evaluations, every second one and the last.
    assert_eq!(counted(39, 20, 2), 20);
    assert!(counts_as_step(37, 39, 20, 2) && counts_as_step(38, 39, 20, 2));
    assert!(!counts_as_step(36, 39, 20, 2));
}
