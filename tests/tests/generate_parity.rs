//! `jhakaas-worker generate … --latents …` reproduces diffusers' image for every committed
//! fixture case: mean absolute difference ≤ 0.5 and max ≤ 6 on 0–255.

use jhakaas_tests::{fixtures, image_diff, run_worker, scratch_dir};
use serde::Deserialize;

const MAX_MEAN: f64 = 0.5;
const MAX_MAX: u8 = 6;

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    pipeline: String,
    prompt: String,
    negative_prompt: Option<String>,
    width: usize,
    height: usize,
    steps: usize,
    guidance_scale: f64,
    scheduler: String,
    num_images: usize,
    strength: Option<f64>,
    init_image: Option<String>,
    /// SDXL size conditioning, `[height, width]` / `[top, left]` as diffusers takes them.
    #[serde(default)]
    original_size: Option<[usize; 2]>,
    #[serde(default)]
    crops_coords_top_left: Option<[usize; 2]>,
    #[serde(default)]
    target_size: Option<[usize; 2]>,
    noise: String,
    image: serde_json::Value,
}

fn run_pipeline_cases(pipeline: &str) {
    run_cases(pipeline, 10);
}

fn run_cases(pipeline: &str, min_cases: usize) {
    let ref_dir = fixtures().join("reference").join(pipeline);
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(ref_dir.join("cases.json")).unwrap())
            .unwrap();
    assert!(
        cases.len() >= min_cases,
        "{pipeline}: expected the full case list"
    );
    let out_dir = scratch_dir(pipeline);
    let mut failures = Vec::new();
    for case in &cases {
        assert_eq!(case.pipeline, pipeline);
        let out = out_dir.join(format!("{}.png", case.name));
        let mut args: Vec<String> = vec![
            "generate".into(),
            "--model".into(),
            fixtures()
                .join("models")
                .join(pipeline)
                .display()
                .to_string(),
            "--prompt".into(),
            case.prompt.clone(),
            "--width".into(),
            case.width.to_string(),
            "--height".into(),
            case.height.to_string(),
            "--steps".into(),
            case.steps.to_string(),
            "--guidance-scale".into(),
            case.guidance_scale.to_string(),
            "--scheduler".into(),
            case.scheduler.clone(),
            "--num-images".into(),
            case.num_images.to_string(),
            "--latents".into(),
            ref_dir.join(&case.noise).display().to_string(),
            "--device".into(),
            "cpu".into(),
            "--seed".into(),
            "0".into(),
            "--output".into(),
            out.display().to_string(),
        ];
        if let Some(neg) = &case.negative_prompt {
            args.extend(["--negative-prompt".into(), neg.clone()]);
        }
        if let Some([h, w]) = case.original_size {
            args.extend(["--original-size".into(), format!("{w}x{h}")]);
        }
        if let Some([top, left]) = case.crops_coords_top_left {
            args.extend(["--crop-top-left".into(), format!("{top},{left}")]);
        }
        if let Some([h, w]) = case.target_size {
            args.extend(["--target-size".into(), format!("{w}x{h}")]);
        }
        if let (Some(init), Some(strength)) = (&case.init_image, case.strength) {
            args.extend([
                "--init-image".into(),
                ref_dir.join(init).display().to_string(),
                "--strength".into(),
                strength.to_string(),
            ]);
        }
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
                "{pipeline}/{} image {i}: mean |diff| {mean:.4}, max {max}",
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
    run_cases("sdxl-turbo-tiny", 6);
}

/// SD-Turbo: SD 2.1 architecture with a trailing Euler config, every scheduler at 1-4 steps.
#[test]
fn sd_turbo_tiny_matches_diffusers_for_every_case() {
    run_cases("sd-turbo-tiny", 9);
}
