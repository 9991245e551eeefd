//! `jhakaas-worker generate` reproduces diffusers' image for every committed fixture case —
//! with diffusers' noise replayed (`--latents`), and from the case's seed alone
//! (`--rng torch-cpu --seed S`, no noise file): mean absolute difference ≤ 0.5 and max ≤ 6 on
//! 0–255.

use jhakaas_tests::cases::CaseNoise;
use jhakaas_tests::{fixtures, image_diff, run_worker, scratch_dir};

const MAX_MEAN: f64 = 0.5;
const MAX_MAX: u8 = 6;

fn run_pipeline_cases(pipeline: &str) {
    run_cases(pipeline, 10, CaseNoise::Replayed);
}

fn run_cases(pipeline: &str, min_cases: usize, noise: CaseNoise) {
    check_cases(
        pipeline,
        jhakaas_tests::cases::load(pipeline),
        min_cases,
        noise,
    );
}

fn check_cases(
    pipeline: &str,
    cases: Vec<jhakaas_tests::cases::FixtureCase>,
    min_cases: usize,
    noise: CaseNoise,
) {
    let ref_dir = fixtures().join("reference").join(pipeline);
    assert!(
        cases.len() >= min_cases,
        "{pipeline}: expected the full case list"
    );
    let out_dir = scratch_dir(&format!("{pipeline}-{noise:?}"));
    let mut failures = Vec::new();
    for case in &cases {
        assert_eq!(case.pipeline, pipeline);
        let out = out_dir.join(format!("{}.png", case.name));
        let args = case.cli_args_with(&out, noise);
        let output = run_worker(&args);
        assert!(
            output.status.success(),
            "{pipeline}/{}: generate failed: {}",
            case.name,
            String::from_utf8_lossy(&output.stderr)
        );
        let expected: Vec<String> = match &case.image {
            serde_json::Value::String(s) => vec![s.clone()],
            serde_json::Value::Array(a) => {
                a.iter().map(|v| v.as_str().unwrap().to_string()).collect()
            }
            other => panic!("bad image field {other}"),
        };
        assert_eq!(expected.len(), case.num_images);
        for (i, want) in expected.iter().enumerate() {
            let ours_path = if case.num_images > 1 {
                out_dir.join(format!("{}-{i}.png", case.name))
            } else {
                out.clone()
            };
            let ours = image::open(&ours_path)
                .unwrap_or_else(|e| panic!("{}: {e}", ours_path.display()))
                .to_rgb8();
            let theirs = image::open(ref_dir.join(want)).unwrap().to_rgb8();
            let (mean, max) = image_diff(&ours, &theirs);
            eprintln!(
                "{pipeline}/{} ({noise:?}) image {i}: mean |diff| {mean:.4}, max {max}",
                case.name
            );
            if mean > MAX_MEAN || max > MAX_MAX {
                failures.push(format!("{}/{i}: mean {mean:.3} max {max}", case.name));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{pipeline}: cases off diffusers: {failures:?}"
    );
}

#[test]
fn sd1_tiny_matches_diffusers_for_every_case() {
    run_pipeline_cases("sd1-tiny");
}

#[test]
fn sd2_tiny_matches_diffusers_for_every_case() {
    run_pipeline_cases("sd2-tiny");
}

/// SDXL: two text encoders (penultimate states, pooled projection), text_time conditioning,
/// a force_upcast VAE with scaling_factor 0.13025, every scheduler, CFG with a negative prompt,
/// CFG with all-zero negative embeddings, no CFG, non-square, batch, micro-conditioning, img2img.
#[test]
fn sdxl_tiny_matches_diffusers_for_every_case() {
    run_pipeline_cases("sdxl-tiny");
}

/// A second SDXL-family architecture (three blocks, other widths, first-eos pooling) with
/// SDXL-Turbo's trailing Euler-ancestral config: 1-4 steps without guidance.
#[test]
fn sdxl_turbo_tiny_matches_diffusers_for_every_case() {
    run_cases("sdxl-turbo-tiny", 6, CaseNoise::Replayed);
}

/// SD-Turbo: SD 2.1 architecture with a trailing Euler config, every scheduler at 1-4 steps.
#[test]
fn sd_turbo_tiny_matches_diffusers_for_every_case() {
    run_cases("sd-turbo-tiny", 9, CaseNoise::Replayed);
}

/// The schedulers added with the torch generators, each against diffusers run with
/// `generator=torch.Generator("cpu").manual_seed(S)` (`tests/fixtures/generate_seed_cases.py`):
/// SD 1.x's own PNDM as the default request, and PNDM without guidance, in a batch of 2, for
/// img2img, non-square, with SD 2's v-prediction and on SDXL; every other scheduler on SD 1.5's
/// config, the noise-drawing ones (DPM2-a, DPM++ 2M SDE, LCM) in a batch of 2 and for img2img,
/// Heun for img2img, LCM without guidance, and some of them with v-prediction and on SDXL.
#[test]
fn every_seed_case_matches_diffusers() {
    for (pipeline, min_cases) in [("sd1-tiny", 24), ("sd2-tiny", 5), ("sdxl-tiny", 5)] {
        let cases = jhakaas_tests::cases::load_seed_cases(pipeline);
        check_cases(pipeline, cases, min_cases, CaseNoise::FromSeed);
    }
}

/// Inpainting and outpainting from the seed alone, against diffusers' inpainting pipelines
/// (`tests/fixtures/generate_inpaint_fixtures.py`): a 9-channel inpainting UNet at strength 1
/// (no init-image draw) and 0.75, in a batch with SDE step noise and without guidance; SD's
/// and SDXL's ordinary 4-channel UNets with diffusers' latent blending (Heun's half steps, a
/// batch); outpainting, which must be the image of inpainting the extended canvas; a
/// `padding_mask_crop` region of both kinds of UNet, pasted back.
#[test]
fn every_inpaint_case_matches_diffusers() {
    for (pipeline, min_cases) in [("sd1-inpaint-tiny", 5), ("sd1-tiny", 7), ("sdxl-tiny", 2)] {
        let cases = jhakaas_tests::cases::load_inpaint_cases(pipeline);
        check_cases(pipeline, cases, min_cases, CaseNoise::FromSeed);
    }
}

/// ControlNets from the seed alone, against diffusers' ControlNet pipelines
/// (`tests/fixtures/generate_controlnet_cases.py`): SD at several scales, a guidance window,
/// two nets at once (one reading BGR), without guidance, a batch, with img2img and with
/// inpainting; SDXL at two scales.
#[test]
fn every_controlnet_case_matches_diffusers() {
    for (pipeline, min_cases) in [("sd1-tiny", 8), ("sdxl-tiny", 2)] {
        let cases = jhakaas_tests::cases::load_controlnet_cases(pipeline);
        check_cases(pipeline, cases, min_cases, CaseNoise::FromSeed);
    }
}

/// `--outpaint` is inpainting the extended canvas with the new area's mask, pixel for pixel.
#[test]
fn outpainting_is_inpainting_the_extended_canvas() {
    let cases = jhakaas_tests::cases::load_inpaint_cases("sd1-tiny");
    let dir = scratch_dir("outpaint-identity");
    let mut images = Vec::new();
    for name in ["outpaint", "outpaint-canvas"] {
        let case = cases.iter().find(|c| c.name == name).expect(name);
        let out = dir.join(format!("{name}.png"));
        let output = run_worker(case.cli_args_with(&out, CaseNoise::FromSeed));
        assert!(
            output.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        images.push(image::open(&out).unwrap().to_rgb8());
    }
    assert_eq!(images[0].dimensions(), (88, 72));
    assert!(
        images[0] == images[1],
        "--outpaint differs from inpainting its canvas"
    );
}

/// From the seed alone: every case of every fixture pipeline (SD 1, SD 2 v-prediction, SDXL,
/// both turbos; every scheduler, guidance on and off, batches of 2, img2img with its posterior
/// draw first) run with `--rng torch-cpu --seed S` and no noise file gives the image diffusers
/// made with `generator=torch.Generator("cpu").manual_seed(S)`.
#[test]
fn every_fixture_case_matches_diffusers_from_its_seed_alone() {
    for (pipeline, min_cases) in [
        ("sd1-tiny", 10),
        ("sd2-tiny", 10),
        ("sdxl-tiny", 10),
        ("sdxl-turbo-tiny", 6),
        ("sd-turbo-tiny", 9),
    ] {
        run_cases(pipeline, min_cases, CaseNoise::FromSeed);
    }
}
