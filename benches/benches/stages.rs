//! One benchmark per engine stage on the tiny SD1 fixture: text encode, one UNet call with
//! CFG (batch 2), VAE decode, one scheduler step, PNG encode, and a whole 4-step job.

use candle_core::Tensor;
use criterion::{criterion_group, criterion_main, Criterion};
use jhakaas_benches::{load_fixture, pattern};
use jhakaas_model_manager::image_io::{encode_image, tensor_to_images};
use jhakaas_model_manager::scheduler::{build, SchedulerConfig, SchedulerKind};
use jhakaas_model_manager::{GenerateParams, ImageFormat};
use std::ops::ControlFlow;

fn stages(c: &mut Criterion) {
    let p = load_fixture("sd1-tiny");
    // A full-size model (e.g. from benches/compare/make_model.py) gets the same stage benches.
    if let Some(dir) = std::env::var_os("JHAKAAS_BENCH_MODEL") {
        let full = jhakaas_model_manager::StableDiffusionPipeline::load(
            &jhakaas_model_manager::ModelSource::Local(dir.into()),
            &candle_core::Device::Cpu,
        )
        .expect("JHAKAAS_BENCH_MODEL loads");
        full_size(c, &full);
    }
    c.bench_function("sd1-tiny/text_encode_cfg", |b| {
        b.iter(|| {
            p.encode_text(&["", "a photograph of an astronaut riding a horse"])
                .unwrap()
        })
    });

    let context = p
        .encode_text(&["", "a photograph of an astronaut riding a horse"])
        .unwrap();
    let latents = pattern(&[2, 4, 8, 8]);
    let t = Tensor::new(&[500f32, 500.0], &candle_core::Device::Cpu).unwrap();
    c.bench_function("sd1-tiny/unet_step_cfg_64px", |b| {
        b.iter(|| p.unet().forward(&latents, &t, &context).unwrap())
    });

    let z = pattern(&[1, 4, 8, 8]);
    c.bench_function("sd1-tiny/vae_decode_64px", |b| {
        b.iter(|| p.vae().decode(&z).unwrap())
    });

    let cfg = SchedulerConfig::from_json_str(
        r#"{"_class_name":"DDIMScheduler","beta_schedule":"scaled_linear","beta_start":0.00085,"beta_end":0.012}"#,
        "bench",
    )
    .unwrap();
    let sample = pattern(&[1, 4, 64, 64]);
    let out = pattern(&[1, 4, 64, 64]);
    c.bench_function("scheduler/dpmpp2m_step_512px", |b| {
        b.iter(|| {
            let mut s = build(SchedulerKind::DpmPp2m, &cfg, 20, "bench").unwrap();
            s.step(&out, 0, &sample, &mut |_| unreachable!()).unwrap()
        })
    });

    let img = tensor_to_images(&pattern(&[1, 3, 512, 512]))
        .unwrap()
        .remove(0);
    c.bench_function("image/png_encode_512px", |b| {
        b.iter(|| encode_image(&img, ImageFormat::Png, "bench").unwrap())
    });

    let req = GenerateParams {
        prompt: "a photograph of an astronaut riding a horse".into(),
        steps: Some(4),
        seed: Some(1),
        ..Default::default()
    };
    c.bench_function("sd1-tiny/job_4_steps_64px", |b| {
        b.iter(|| {
            p.generate(&req, &mut |_| ControlFlow::Continue(()))
                .unwrap()
        })
    });
}

/// Text encode, one CFG UNet step and a VAE decode at 256×256 on a full-size model.
fn full_size(c: &mut Criterion, p: &jhakaas_model_manager::StableDiffusionPipeline) {
    let mut g = c.benchmark_group("full-size-256px");
    g.sample_size(10);
    g.bench_function("text_encode_cfg", |b| {
        b.iter(|| p.encode_text(&["", "an astronaut"]).unwrap())
    });
    let context = p.encode_text(&["", "an astronaut"]).unwrap();
    let latents = pattern(&[2, 4, 32, 32]);
    let t = Tensor::new(&[500f32, 500.0], &candle_core::Device::Cpu).unwrap();
    g.bench_function("unet_step_cfg", |b| {
        b.iter(|| p.unet().forward(&latents, &t, &context).unwrap())
    });
    let z = pattern(&[1, 4, 32, 32]);
    g.bench_function("vae_decode", |b| b.iter(|| p.vae().decode(&z).unwrap()));
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = stages
}
criterion_main!(benches);
