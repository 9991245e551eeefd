//! Helpers shared by the model-manager tests: component parity, and fixture copies and one
//! fixed job for the tests that compare whole images across settings.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const TEXT_TOL: f32 = 2e-5;
pub const UNET_TOL: f32 = 2e-5;
pub const VAE_TOL: f32 = 5e-5;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

pub fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
    d.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn assert_close(what: &str, ours: &Tensor, theirs: &Tensor, tol: f32) {
    let d = max_abs_diff(ours, theirs);
    eprintln!("{what}: max |diff| = {d:.3e} (tolerance {tol:.0e})");
    assert!(d <= tol, "{what}: max |diff| {d} > {tol}");
}

/// Checks a VAE against a reference file with decode_in/out, decode_nonsquare_in/out,
/// encode_in/mean/logvar.
pub fn check_vae(
    name: &str,
    vae: &jhakaas_model_manager::vae::AutoencoderKL,
    r: &HashMap<String, Tensor>,
) {
    assert_close(
        &format!("{name} vae decode"),
        &vae.decode(&r["decode_in"]).unwrap(),
        &r["decode_out"],
        VAE_TOL,
    );
    assert_close(
        &format!("{name} vae decode non-square"),
        &vae.decode(&r["decode_nonsquare_in"]).unwrap(),
        &r["decode_nonsquare_out"],
        VAE_TOL,
    );
    let dist = vae.encode(&r["encode_in"]).unwrap();
    assert_close(
        &format!("{name} vae encode mean"),
        &dist.mean,
        &r["encode_mean"],
        VAE_TOL,
    );
    assert_close(
        &format!("{name} vae encode logvar"),
        &dist.logvar,
        &r["encode_logvar"],
        VAE_TOL,
    );
}

/// The tiny SD1 fixture model (`tests/fixtures/models/sd1-tiny`).
pub fn tiny_sd1() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/sd1-tiny")
}

/// A fresh copy of the tiny SD1 fixture under the temp dir (`tag` and the process id name it),
/// every f32 tensor stored as `dtype` (f16: as published fp16 checkpoints are).
pub fn tiny_sd1_copy(tag: &str, dtype: DType) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("jhakaas-sd1-tiny-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    copy_as(&tiny_sd1(), &dst, dtype);
    dst
}

fn copy_as(src: &Path, dst: &Path, dtype: DType) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let to = dst.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_as(&path, &to, dtype);
        } else if path.extension().is_some_and(|e| e == "safetensors") {
            let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
            let tensors: HashMap<String, Tensor> = tensors
                .into_iter()
                .map(|(k, t)| match t.dtype() {
                    DType::F32 => (k, t.to_dtype(dtype).unwrap()),
                    _ => (k, t),
                })
                .collect();
            candle_core::safetensors::save(&tensors, &to).unwrap();
        } else {
            std::fs::copy(&path, &to).unwrap();
        }
    }
}

/// The first image of one fixed 3-step DDIM job with a negative prompt (CFG) on `p`.
pub fn lighthouse(p: &jhakaas_model_manager::StableDiffusionPipeline) -> image::RgbImage {
    let params = jhakaas_model_manager::GenerateParams {
        prompt: "a lighthouse at dusk".into(),
        negative_prompt: Some("fog".into()),
        steps: Some(3),
        seed: Some(7),
        num_images: 1,
        scheduler: Some(jhakaas_model_manager::SchedulerKind::Ddim),
        ..Default::default()
    };
    let mut out = p
        .generate(&params, &mut |_| std::ops::ControlFlow::Continue(()))
        .unwrap();
    out.images.remove(0).image
}
