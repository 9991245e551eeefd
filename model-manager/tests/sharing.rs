//! LoRA variants hold only the layers their adapters change and take the rest from their base,
//! under both `--cpu-weights` choices. (Its own test binary: the choice is process-wide.)

use candle_core::Device;
use jhakaas_model_manager::kernels::held::{set_cpu_weights, CpuWeights};
use jhakaas_model_manager::pipeline::LoadOptions;
use jhakaas_model_manager::{GenerateParams, ModelSource, SchedulerKind, StableDiffusionPipeline};
use std::ops::ControlFlow;
use std::path::Path;

fn image(p: &StableDiffusionPipeline) -> image::RgbImage {
    let params = GenerateParams {
        prompt: "a lighthouse at dusk".into(),
        negative_prompt: Some("fog".into()),
        steps: Some(3),
        seed: Some(3),
        num_images: 1,
        scheduler: Some(SchedulerKind::Ddim),
        ..Default::default()
    };
    p.generate(&params, &mut |_| ControlFlow::Continue(()))
        .unwrap()
        .images
        .remove(0)
        .image
}

/// Bytes of one load of `model` with `lora` under `choice`: the base's, then a shared
/// variant's own and shared bytes, then an unshared merge's.
struct Bytes {
    base: u64,
    own: u64,
    shared: u64,
    copy: u64,
}

fn check_sharing(model: &str, lora: &str, choice: CpuWeights) -> Bytes {
    set_cpu_weights(choice);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let source = ModelSource::Local(dir.join("models").join(model));
    let adapter = jhakaas_model_manager::lora::LoraAdapter::parse(
        dir.join("reference").join(lora).to_str().unwrap(),
    )
    .unwrap();
    let base = StableDiffusionPipeline::load(&source, &Device::Cpu).unwrap();
    assert_eq!(base.bytes_shared_with_base(), 0);
    let with = |share: bool| {
        let options = LoadOptions {
            loras: vec![adapter.clone()],
            share_with: share.then(|| base.shared_weights()),
            ..Default::default()
        };
        StableDiffusionPipeline::load_with(&source, &Device::Cpu, &options).unwrap()
    };
    let (shared, copy) = (with(true), with(false));
    assert_eq!(copy.bytes_shared_with_base(), 0);
    assert_eq!(
        shared.weight_bytes() + shared.bytes_shared_with_base(),
        copy.weight_bytes(),
        "{model} {choice:?}: own + shared bytes must add up to the whole merged model"
    );
    let (a, b) = (image(&shared), image(&copy));
    assert_eq!(
        a, b,
        "{model} {choice:?}: sharing layers must not change a pixel"
    );
    let max_diff = a
        .as_raw()
        .iter()
        .zip(image(&base).as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap();
    assert!(max_diff > 2, "{model} {choice:?}: the adapter must show");
    Bytes {
        base: base.weight_bytes(),
        own: shared.weight_bytes(),
        shared: shared.bytes_shared_with_base(),
        copy: copy.weight_bytes(),
    }
}

#[test]
fn lora_variants_share_the_layers_their_adapters_leave_untouched() {
    // SD1 with a PEFT file; SDXL (two text encoders) with an SGM-named kohya file.
    for (model, lora) in [
        ("sd1-tiny", "lora-sd1-tiny/peft.safetensors"),
        ("sdxl-tiny", "lora-sdxl-tiny/kohya-sgm.safetensors"),
    ] {
        let f32 = check_sharing(model, lora, CpuWeights::F32);
        let f16 = check_sharing(model, lora, CpuWeights::F16);
        // Upcast, a merge holds what its base holds; the VAE and every layer the adapter does
        // not touch come from the base.
        assert_eq!(f32.copy, f32.base, "{model}");
        assert!(
            f32.shared > f32.base / 3,
            "{model}: shared {} of {}",
            f32.shared,
            f32.base
        );
        // Held in f16, the merged layers are f32 (more than the base holds them in) and the
        // same layers are shared, at half the width at most.
        assert!(f16.copy > f16.base, "{model}: merged layers are f32");
        assert!(f16.base < f32.base && f16.own <= f32.own, "{model}");
        assert!(
            f16.shared >= f32.shared / 2,
            "{model}: shared {} held in f16, {} upcast",
            f16.shared,
            f32.shared
        );
    }
}
