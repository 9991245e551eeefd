//! `--cpu-weights f16`: a model whose files store f16 weights gives the same images whether the
//! CPU upcasts them at load or keeps them in f16 and widens them as used. (Its own test binary:
//! the choice is process-wide.)

use candle_core::{DType, Device};
use jhakaas_model_manager::kernels::held::{set_cpu_weights, CpuWeights};
use jhakaas_model_manager::{GenerateParams, ModelSource, SchedulerKind, StableDiffusionPipeline};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

/// A copy of the tiny SD1 fixture with every f32 tensor stored as f16, as published fp16
/// checkpoints are.
fn fp16_copy() -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/sd1-tiny");
    let dst = std::env::temp_dir().join(format!("jhakaas-sd1-tiny-fp16-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    copy_as_fp16(&src, &dst);
    dst
}

fn copy_as_fp16(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let to = dst.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_as_fp16(&path, &to);
        } else if path.extension().is_some_and(|e| e == "safetensors") {
            let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
            let tensors: std::collections::HashMap<String, candle_core::Tensor> = tensors
                .into_iter()
                .map(|(k, t)| match t.dtype() {
                    DType::F32 => (k, t.to_dtype(DType::F16).unwrap()),
                    _ => (k, t),
                })
                .collect();
            candle_core::safetensors::save(&tensors, &to).unwrap();
        } else {
            std::fs::copy(&path, &to).unwrap();
        }
    }
}

fn image(dir: &Path, weights: CpuWeights) -> image::RgbImage {
    set_cpu_weights(weights);
    let p = StableDiffusionPipeline::load(&ModelSource::Local(dir.to_path_buf()), &Device::Cpu)
        .unwrap();
    let params = GenerateParams {
        prompt: "a lighthouse at dusk".into(),
        negative_prompt: Some("fog".into()),
        steps: Some(3),
        seed: Some(7),
        num_images: 1,
        scheduler: Some(SchedulerKind::Ddim),
        ..Default::default()
    };
    let mut out = p
        .generate(&params, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    out.images.remove(0).image
}

#[test]
fn f16_files_give_the_same_image_held_in_f16_or_upcast() {
    let dir = fp16_copy();
    let upcast = image(&dir, CpuWeights::F32);
    let held = image(&dir, CpuWeights::F16);
    let _ = std::fs::remove_dir_all(&dir);
    let max = upcast
        .as_raw()
        .iter()
        .zip(held.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    // The same f32 math on the same values; only the gemm's summation order differs.
    assert!(
        max <= 1,
        "held-f16 image differs from the upcast one by {max}"
    );
}
