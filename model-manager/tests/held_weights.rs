//! `--cpu-weights f16`: a model whose files store f16 weights gives the same images whether the
//! CPU upcasts them at load or keeps them in f16 and widens them as used. (Its own test binary:
//! the choice is process-wide.)

mod common;

use candle_core::{DType, Device};
use common::{lighthouse, tiny_sd1_copy};
use jhakaas_model_manager::kernels::held::{self, set_cpu_weights, CpuWeights};
use jhakaas_model_manager::pipeline::estimate_loaded_bytes;
use jhakaas_model_manager::weights;
use jhakaas_model_manager::{LoadOptions, ModelSource, StableDiffusionPipeline};
use std::path::Path;
use std::sync::Mutex;

/// Serialises the tests: the choice they set is process-wide.
static CHOICE: Mutex<()> = Mutex::new(());

fn image(dir: &Path, weights: CpuWeights) -> image::RgbImage {
    set_cpu_weights(weights);
    let p = StableDiffusionPipeline::load(&ModelSource::Local(dir.to_path_buf()), &Device::Cpu)
        .unwrap();
    lighthouse(&p)
}

#[test]
fn f16_files_give_the_same_image_held_in_f16_or_upcast() {
    let _choice = CHOICE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tiny_sd1_copy("fp16", DType::F16);
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

/// Reads `name` of `dir/unet/diffusion_pytorch_model.safetensors` as a held weight.
fn held_weight(dir: &Path, name: &str, shape: &[usize]) -> candle_core::Tensor {
    let w = weights::load(
        &ModelSource::Local(dir.to_path_buf()),
        "unet",
        "diffusion_pytorch_model",
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let t = held::get_weight(&w.vb, shape, name).unwrap();
    held::hold(t).unwrap()
}

#[test]
fn f16_weights_are_read_as_stored_and_counted_at_their_width() {
    let _choice = CHOICE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tiny_sd1_copy("fp16", DType::F16);
    let source = ModelSource::Local(dir.clone());
    let shape = [32, 4, 3, 3];
    let read = |choice| {
        set_cpu_weights(choice);
        let t = held_weight(&dir, "conv_in.weight", &shape);
        let in_f32 = held::in_f32(|| held_weight(&dir, "conv_in.weight", &shape));
        let p = StableDiffusionPipeline::load(&source, &Device::Cpu).unwrap();
        let estimate =
            estimate_loaded_bytes(&source, &Device::Cpu, &LoadOptions::default()).unwrap();
        (t, in_f32, p.weight_bytes(), estimate)
    };
    let (upcast, _, upcast_bytes, upcast_estimate) = read(CpuWeights::F32);
    let (held, forced, held_bytes, held_estimate) = read(CpuWeights::F16);
    set_cpu_weights(CpuWeights::F32);
    let _ = std::fs::remove_dir_all(&dir);

    assert_eq!(upcast.dtype(), DType::F32);
    assert_eq!(
        held.dtype(),
        DType::F16,
        "an f16-stored conv weight stays f16"
    );
    assert_eq!(forced.dtype(), DType::F32, "`in_f32` upcasts");
    let values = |t: &candle_core::Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(values(&held), values(&upcast), "the same values either way");
    // The budget's estimate is what the load then reports, and the held UNet/VAE matrices
    // count 2 bytes each (the text encoders, norms and biases stay f32).
    assert_eq!(upcast_estimate, upcast_bytes);
    assert_eq!(held_estimate, held_bytes);
    assert!(
        held_bytes < upcast_bytes * 3 / 4 && held_bytes > upcast_bytes / 2,
        "held {held_bytes} vs upcast {upcast_bytes}"
    );
}

#[test]
fn f32_stored_weights_stay_f32_unless_exactly_f16() {
    let _choice = CHOICE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("jhakaas-held-f32-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("unet")).unwrap();
    let exact = candle_core::Tensor::new(&[[0.5f32, -2.0], [1.0, 0.25]], &Device::Cpu).unwrap();
    let inexact = candle_core::Tensor::new(&[[0.1f32, -2.0], [1.0, 0.3]], &Device::Cpu).unwrap();
    let tensors: std::collections::HashMap<String, candle_core::Tensor> = [
        ("exact.weight".to_string(), exact),
        ("inexact.weight".to_string(), inexact),
    ]
    .into();
    candle_core::safetensors::save(
        &tensors,
        dir.join("unet/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    set_cpu_weights(CpuWeights::F16);
    let exact = held_weight(&dir, "exact.weight", &[2, 2]);
    let inexact = held_weight(&dir, "inexact.weight", &[2, 2]);
    set_cpu_weights(CpuWeights::F32);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        exact.dtype(),
        DType::F16,
        "f16-exact f32 values are held in f16"
    );
    assert_eq!(
        inexact.dtype(),
        DType::F32,
        "values f16 cannot hold stay f32"
    );
    assert_eq!(
        inexact.to_vec2::<f32>().unwrap(),
        vec![vec![0.1f32, -2.0], vec![1.0, 0.3]]
    );
}
