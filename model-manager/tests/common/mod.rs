//! Helpers shared by the component parity tests.
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
