//! The `generate` command's contract on bad input: a clear message naming the problem and a
//! non-zero exit, never a panic. Runs the real binary on the committed tiny fixture.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models")
        .join(name)
}

fn generate(extra: &[&str]) -> Output {
    let model = fixture("sd1-tiny");
    let out = std::env::temp_dir().join(format!("jhakaas-cli-{}.png", std::process::id()));
    let mut args = vec![
        "generate".to_string(),
        "--model".into(),
        model.display().to_string(),
        "--prompt".into(),
        "a red cube".into(),
        "--steps".into(),
        "2".into(),
        "--device".into(),
        "cpu".into(),
        "--output".into(),
        out.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Command::new(env!("CARGO_BIN_EXE_jhakaas-worker"))
        .args(&args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("spawn jhakaas-worker")
}

/// Asserts a clean failure whose message contains every needle.
fn assert_fails_with(output: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    assert_ne!(
        output.status.code(),
        Some(101),
        "exit code 101 is a panic: {stderr}"
    );
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks {n:?}: {stderr}");
    }
}

#[test]
fn a_good_request_writes_a_png_and_says_where() {
    let out = generate(&["--seed", "7", "--scheduler", "euler-a"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("seed 7") && stdout.contains(".png"),
        "{stdout}"
    );
}

#[test]
fn width_not_a_multiple_of_8_is_rejected() {
    assert_fails_with(&generate(&["--width", "100"]), &["width", "multiple of 8"]);
}

#[test]
fn zero_steps_is_rejected() {
    assert_fails_with(&generate(&["--steps", "0"]), &["steps"]);
}

#[test]
fn strength_outside_zero_one_is_rejected() {
    let init = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/reference/init.png");
    let init = init.display().to_string();
    for s in ["0", "1.5", "-0.2", "NaN"] {
        let arg = format!("--strength={s}");
        assert_fails_with(&generate(&["--init-image", &init, &arg]), &["strength"]);
    }
}

#[test]
fn unreadable_init_image_is_rejected() {
    let bogus = std::env::temp_dir().join(format!("jhakaas-bogus-{}.png", std::process::id()));
    std::fs::write(&bogus, b"definitely not a png").unwrap();
    assert_fails_with(
        &generate(&["--init-image", bogus.to_str().unwrap(), "--strength", "0.5"]),
        &["init_image"],
    );
    assert_fails_with(
        &generate(&["--init-image", "/nonexistent/init.png", "--strength", "0.5"]),
        &["init_image"],
    );
}

#[test]
fn unknown_scheduler_is_rejected() {
    assert_fails_with(
        &generate(&["--scheduler", "k_lms_2"]),
        &["scheduler", "k_lms_2", "pndm"],
    );
}

#[test]
fn bad_output_extension_is_rejected() {
    let out = generate(&["--output", "/tmp/x.gif"]);
    assert_fails_with(&out, &["output", "gif"]);
}

#[test]
fn latents_of_the_wrong_shape_are_rejected() {
    // A replay file for a 64×96 request does not fit a 64×64 one.
    let latents = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/reference/sd1-tiny/case-nonsquare-64x96.noise.safetensors");
    assert_fails_with(
        &generate(&[
            "--latents",
            latents.to_str().unwrap(),
            "--width",
            "64",
            "--height",
            "64",
        ]),
        &["latents", "shape"],
    );
}

#[test]
fn missing_weights_name_the_file_and_the_source() {
    let dir = std::env::temp_dir().join(format!("jhakaas-noweights-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let src = fixture("sd1-tiny");
    std::fs::create_dir_all(&dir).unwrap();
    for entry in [
        "model_index.json",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "vae",
        "unet",
    ] {
        copy_recursively(&src.join(entry), &dir.join(entry));
    }
    std::fs::remove_file(dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_jhakaas-worker"))
        .args([
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "x",
            "--device",
            "cpu",
        ])
        .output()
        .unwrap();
    assert_fails_with(
        &out,
        &[
            "unet/diffusion_pytorch_model.safetensors",
            dir.to_str().unwrap(),
        ],
    );
}

#[test]
fn unsupported_config_values_are_named() {
    let dir = std::env::temp_dir().join(format!("jhakaas-badcfg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_recursively(&fixture("sd1-tiny"), &dir);
    let cfg_path = dir.join("unet/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["class_embed_type"] = serde_json::json!("timestep");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_jhakaas-worker"))
        .args([
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "x",
            "--device",
            "cpu",
        ])
        .output()
        .unwrap();
    assert_fails_with(&out, &["unet/config.json", "class_embed_type", "timestep"]);
}

#[test]
fn a_model_that_is_neither_folder_nor_hub_id_is_rejected() {
    let out = Command::new(env!("CARGO_BIN_EXE_jhakaas-worker"))
        .args([
            "generate",
            "--model",
            "no such model",
            "--prompt",
            "x",
            "--device",
            "cpu",
        ])
        .output()
        .unwrap();
    assert_fails_with(&out, &["model", "no such model"]);
}

#[test]
fn cuda_without_cuda_support_is_a_clear_error() {
    if cfg!(feature = "cuda") {
        return;
    }
    assert_fails_with(&generate(&["--device", "cuda"]), &["CUDA"]);
}

fn copy_recursively(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            copy_recursively(&e.path(), &to.join(e.file_name()));
        }
    } else {
        std::fs::copy(from, to).unwrap();
    }
}

#[test]
fn size_conditioning_is_refused_for_sd_and_malformed_sizes_are_named() {
    assert_fails_with(
        &generate(&["--original-size", "1024x1024"]),
        &["invalid original_size", "SDXL"],
    );
    let xl = fixture("sdxl-tiny");
    let xl = xl.to_str().unwrap();
    assert_fails_with(
        &generate(&["--model", xl, "--target-size", "1024"]),
        &["invalid target_size", "WIDTHxHEIGHT"],
    );
    assert_fails_with(
        &generate(&["--model", xl, "--crop-top-left", "a,b"]),
        &["invalid crop_top_left", "TOP,LEFT"],
    );
    assert_fails_with(
        &generate(&["--model", xl, "--original-size", "0x512"]),
        &["invalid original_size"],
    );
}

#[test]
fn a_vae_override_without_a_config_names_what_is_missing() {
    let empty = std::env::temp_dir().join(format!("jhakaas-empty-vae-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    assert_fails_with(
        &generate(&["--vae", empty.to_str().unwrap()]),
        &["config.json", &empty.display().to_string()],
    );
    assert_fails_with(&generate(&["--vae", "not a source"]), &["invalid vae"]);
}

#[test]
fn sdxl_unets_without_text_time_conditioning_are_refused() {
    let dir = std::env::temp_dir().join(format!("jhakaas-xl-no-add-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_recursively(&fixture("sdxl-tiny"), &dir);
    let cfg_path = dir.join("unet/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["addition_embed_type"] = serde_json::Value::Null;
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    assert_fails_with(
        &generate(&["--model", dir.to_str().unwrap()]),
        &["unet/config.json", "addition_embed_type", "text_time"],
    );
    cfg["addition_embed_type"] = "image".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    assert_fails_with(
        &generate(&["--model", dir.to_str().unwrap()]),
        &["addition_embed_type", "image"],
    );
}

#[test]
fn a_unet_attending_to_another_width_than_the_text_encoders_is_named() {
    let dir = std::env::temp_dir().join(format!("jhakaas-xl-width-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_recursively(&fixture("sdxl-tiny"), &dir);
    let cfg_path = dir.join("unet/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["cross_attention_dim"] = 48.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    assert_fails_with(
        &generate(&["--model", dir.to_str().unwrap()]),
        &["unet/config.json", "cross_attention_dim", "48", "64-wide"],
    );
}
