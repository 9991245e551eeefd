//! `generate --lora` reproduces diffusers' `load_lora_weights` images on the tiny SD1 and SDXL
//! fixtures: a diffusers/PEFT file and a kohya file (UNet linear, 1×1 and 3×3 conv LoRAs,
//! text-encoder LoRAs — both SDXL encoders — and alpha), at several weights and two at once,
//! within mean ≤ 0.5 and max ≤ 6 of 255.
//! Files that do not fit are refused naming the keys.

use jhakaas_tests::{fixtures, image_diff, run_worker, scratch_dir};
use serde::Deserialize;
use std::path::{Path, PathBuf};

const MAX_MEAN: f64 = 0.5;
const MAX_MAX: u8 = 6;

#[derive(Debug, Deserialize)]
struct Lora {
    file: String,
    weight: f64,
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    base_case: String,
    loras: Vec<Lora>,
    image: String,
    mean_abs_diff_vs_base: f64,
}

fn lora_dir(pipeline: &str) -> PathBuf {
    fixtures()
        .join("reference")
        .join(format!("lora-{pipeline}"))
}

#[test]
fn sd1_lora_images_match_diffusers_in_both_formats_at_every_weight() {
    run_cases("sd1-tiny");
}

#[test]
fn sdxl_lora_images_match_diffusers_with_both_text_encoders() {
    run_cases("sdxl-tiny");
}

fn run_cases(pipeline: &str) {
    let cases: Vec<Case> = serde_json::from_str(
        &std::fs::read_to_string(lora_dir(pipeline).join("cases.json")).unwrap(),
    )
    .unwrap();
    assert!(cases.len() >= 4, "expected the full case list");
    let out_dir = scratch_dir(&format!("lora-{pipeline}"));
    let mut failures = Vec::new();
    for case in &cases {
        // The adapters change the image a lot, so matching it is no accident.
        assert!(case.mean_abs_diff_vs_base > 2.0, "{}", case.name);
        let base = jhakaas_tests::cases::find(pipeline, &case.base_case);
        let out = out_dir.join(format!("{}.png", case.name));
        let mut args = base.cli_args(&out);
        for l in &case.loras {
            args.extend([
                "--lora".into(),
                format!(
                    "{}:{}",
                    lora_dir(pipeline).join(&l.file).display(),
                    l.weight
                ),
            ]);
        }
        let output = run_worker(&args);
        assert!(
            output.status.success(),
            "{}: generate failed: {}",
            case.name,
            String::from_utf8_lossy(&output.stderr)
        );
        let ours = image::open(&out).unwrap().to_rgb8();
        let theirs = image::open(lora_dir(pipeline).join(&case.image))
            .unwrap()
            .to_rgb8();
        let (mean, max) = image_diff(&ours, &theirs);
        eprintln!(
            "lora/{pipeline}/{}: mean |diff| {mean:.4}, max {max}",
            case.name
        );
        if mean > MAX_MEAN || max > MAX_MAX {
            failures.push(format!("{}: mean {mean:.3} max {max}", case.name));
        }
    }
    assert!(failures.is_empty(), "LoRA parity failures: {failures:?}");
}

/// A safetensors file of f32 tensors, written by hand.
fn write_safetensors(path: &Path, tensors: &[(&str, Vec<usize>)]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * 4;
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let header = serde_json::to_vec(&header).unwrap();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header);
    out.extend(std::iter::repeat_n(0u8, offset));
    std::fs::write(path, out).unwrap();
}

/// A refused adapter: its name, its tensors and what the error must say.
type RefusedCase = (&'static str, Vec<(&'static str, Vec<usize>)>, &'static str);

#[test]
fn adapters_that_do_not_fit_are_refused_naming_the_keys() {
    let base = jhakaas_tests::cases::find("sd1-tiny", "ddim-cfg");
    let dir = scratch_dir("lora-refused");
    let out = dir.join("x.png");
    let cases: [RefusedCase; 4] = [
        (
            "unknown",
            // An SDXL adapter's second text encoder: nothing of the kind in an SD1 model.
            vec![
                ("lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", vec![4, 32]),
                ("lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", vec![37, 4]),
            ],
            "lora_te2_text_model_encoder_layers_0_mlp_fc1",
        ),
        (
            "shape",
            vec![
                (
                    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
                    vec![4, 64],
                ),
                (
                    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight",
                    vec![32, 4],
                ),
            ],
            "does not fit",
        ),
        (
            "loha",
            vec![("lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a", vec![4, 4])],
            "LoHa",
        ),
        ("empty", vec![("something_else", vec![1])], "something_else"),
    ];
    for (name, tensors, needle) in cases {
        let file = dir.join(format!("{name}.safetensors"));
        write_safetensors(&file, &tensors);
        let mut args = base.cli_args(&out);
        args.extend(["--lora".into(), file.display().to_string()]);
        let output = run_worker(&args);
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{name}: accepted");
        assert!(
            err.contains("lora") && err.contains(needle),
            "{name}: {err}"
        );
        assert!(!err.contains("panicked"), "{name}: {err}");
    }
}
