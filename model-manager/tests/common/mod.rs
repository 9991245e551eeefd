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
