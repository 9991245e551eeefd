//! `jhakaas-bench-engine`: the in-process side of the diffusers comparison. Loads a model,
//! replays the given initial noise, and prints one JSON line with the same fields as
//! `benches/compare/reference.py`: cold start (process start → first image), model load, per-run job,
//! text encode, UNet step (denoise ÷ steps) and VAE decode times, and peak RSS.
//!
//! Usage: jhakaas-bench-engine MODEL_DIR LATENTS PROMPT STEPS SIZE RUNS OUT_PNG START_EPOCH [DEVICE]
//! (`JHAKAAS_KERNELS=auto|fused|reference` picks the kernels, as the worker's `--kernels`;
//! `JHAKAAS_CPU_WEIGHTS=f32|f16` how f16 files are held, as `--cpu-weights`;
//! `JHAKAAS_WEIGHTS_IO=map|read` how weights files are read, as `--weights-io`;
//! `JHAKAAS_NO_RETAIN=1` keeps glibc's default of unmapping freed blocks, for A/B runs)

use anyhow::{Context, Result};
use jhakaas_model_manager::image_io::encode_image;
use jhakaas_model_manager::{
    DeviceChoice, GenerateParams, ImageFormat, ModelSource, NoiseReplay, SchedulerKind,
    StableDiffusionPipeline,
};
use std::ops::ControlFlow;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_owned)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        a.len() >= 9,
        "usage: MODEL_DIR LATENTS PROMPT STEPS SIZE RUNS OUT_PNG START_EPOCH [DEVICE]"
    );
    let (steps, size, runs): (usize, usize, usize) = (a[4].parse()?, a[5].parse()?, a[6].parse()?);
    let start: f64 = a[8].parse()?;
    if std::env::var_os("JHAKAAS_NO_RETAIN").is_none() {
        jhakaas_model_manager::kernels::retain_freed_memory();
    }
    if let Ok(k) = std::env::var("JHAKAAS_KERNELS") {
        jhakaas_model_manager::kernels::set_kernels(k.parse()?);
    }
    if let Ok(w) = std::env::var("JHAKAAS_CPU_WEIGHTS") {
        jhakaas_model_manager::kernels::held::set_cpu_weights(w.parse()?);
    }
    if let Ok(io) = std::env::var("JHAKAAS_WEIGHTS_IO") {
        jhakaas_model_manager::weights::set_weights_io(io.parse()?);
    }
    let device = a
        .get(9)
        .map(String::as_str)
        .unwrap_or("cpu")
        .parse::<DeviceChoice>()?
        .open()?;
    let load_started = Instant::now();
    let pipeline =
        StableDiffusionPipeline::load(&ModelSource::Local(a[1].clone().into()), &device)?;
    let load_s = load_started.elapsed().as_secs_f64();
    let params = GenerateParams {
        prompt: a[3].clone(),
        width: Some(size),
        height: Some(size),
        steps: Some(steps),
        guidance_scale: Some(7.5),
        scheduler: Some(SchedulerKind::Ddim),
        seed: Some(0),
        noise: Some(NoiseReplay::load(std::path::Path::new(&a[2])).context("latents")?),
        ..Default::default()
    };
    let run = || -> Result<(Vec<u8>, f64, jhakaas_model_manager::StageTimings)> {
        let t = Instant::now();
        let g = pipeline.generate(&params, &mut |_| ControlFlow::Continue(()))?;
        let png = encode_image(&g.images[0].image, ImageFormat::Png, "")?;
        Ok((png, t.elapsed().as_secs_f64(), g.timings))
    };
    let (mut png, _, _) = run()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
    let cold_start = now - start;
    let mut results = Vec::new();
    for _ in 0..runs {
        let (p, job, t) = run()?;
        png = p;
        results.push(format!(
            r#"{{"job_s": {job}, "text_encode_s": {}, "unet_step_s": {}, "vae_decode_s": {}}}"#,
            t.text_encode.as_secs_f64(),
            t.denoise.as_secs_f64() / steps as f64,
            t.decode.as_secs_f64()
        ));
    }
    std::fs::write(&a[7], png)?;
    println!(
        r#"{{"cold_start_s": {cold_start}, "load_s": {load_s}, "isa": "{:?}", "runs": [{}], "peak_rss_mb": {}}}"#,
        jhakaas_model_manager::kernels::simd::isa(),
        results.join(", "),
        peak_rss_mb()
    );
    Ok(())
}
