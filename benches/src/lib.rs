//! Shared set-up for the benchmarks: loading a fixture pipeline and building stage inputs.
//!
//! Speed is measured here, never asserted in tests. `cargo bench -p jhakaas-benches` runs the
//! criterion micro-benchmarks of each engine stage on the tiny SD1 fixture; the side-by-side
//! comparison with diffusers lands in this crate too.

pub mod stats;

use candle_core::{Device, Tensor};
use jhakaas_model_manager::{ModelSource, StableDiffusionPipeline};
use std::path::PathBuf;

/// Folder of a committed fixture pipeline (`sd1-tiny`, `sd2-tiny`).
pub fn fixture_model(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models")
        .join(name)
}

/// Loads a fixture pipeline on the CPU.
pub fn load_fixture(name: &str) -> StableDiffusionPipeline {
    StableDiffusionPipeline::load(&ModelSource::Local(fixture_model(name)), &Device::Cpu)
        .expect("fixture pipeline loads")
}

/// A deterministic pseudo-random tensor (no RNG dependency, same values every run).
pub fn pattern(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 2.0)
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).expect("pattern tensor")
}
