//! `jhakaas-bench-engine`: the in-process side of the diffusers comparison. Loads a model,
//! replays the given initial noise, and prints one JSON line with the same fields as
//! `benches/compare/reference.py`: cold start (process start → first image), model load, per-run job,
//! text encode, UNet step (denoise ÷ steps) and VAE decode times, and peak RSS.
//!
//! Usage: jhakaas-bench-engine MODEL_DIR LATENTS PROMPT STEPS SIZE RUNS OUT_PNG START_EPOCH [DEVICE]
//!        [--seed S] [--rng chacha|torch-cpu] [--scheduler NAME]
//!        [--init-image PNG [--mask PNG [--mask-crop-padding PX]] [--strength F]]
//!        [--controlnet DIR --control-image PNG [--controlnet-scale F]]
//!        [--weights-residency resident|stage]
//! LATENTS `-` draws the noise from `--seed` (default 0) with `--rng` instead of replaying a
//! file; the options mean what they mean to `jhakaas-worker generate` (inpainting: strength 1
//! by default; the ControlNet is loaded once, in the model load's time, and passed to
//! `generate_with_nets` on every run). The JSON adds `controlnet_load_s`.
//! (`JHAKAAS_KERNELS=auto|fused|reference` picks the kernels, as the worker's `--kernels`;
//! `JHAKAAS_CPU_WEIGHTS=f32|f16` how f16 files are held, as `--cpu-weights`;
//! `JHAKAAS_WEIGHTS_IO=map|read` how weights files are read, as `--weights-io`;
//! `JHAKAAS_NO_RETAIN=1` keeps glibc's default of unmapping freed blocks, for A/B runs)

use anyhow::{Context, Result};
use jhakaas_model_manager::controlnet::ControlNetModel;
use jhakaas_model_manager::image_io::{decode_image, decode_image_for, encode_image};
use jhakaas_model_manager::params::ControlNetRequest;
use jhakaas_model_manager::pipeline::RequestLimits;
use jhakaas_model_manager::{
    DeviceChoice, GenerateParams, ImageFormat, InitImage, ModelSource, NoiseReplay, RngKind,
    SchedulerKind, StableDiffusionPipeline,
};
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;
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

/// Largest init, mask or control image accepted, in pixels (as `generate`).
const MAX_PIXELS: u64 = 4096 * 4096;

/// Splits `--name value` options from the positional arguments.
fn split_args() -> Result<(Vec<String>, HashMap<String, String>)> {
    let mut positional = Vec::new();
    let mut options = HashMap::new();
    let mut it = std::env::args();
    while let Some(arg) = it.next() {
        match arg.strip_prefix("--") {
            Some(name) => {
                let value = it
                    .next()
                    .with_context(|| format!("--{name} needs a value"))?;
                options.insert(name.to_owned(), value);
            }
            None => positional.push(arg),
        }
    }
    for name in options.keys() {
        anyhow::ensure!(
            [
                "seed",
                "rng",
                "scheduler",
                "init-image",
                "mask",
                "mask-crop-padding",
                "strength",
                "controlnet",
                "control-image",
                "controlnet-scale",
                "weights-residency"
            ]
            .contains(&name.as_str()),
            "unknown option --{name}"
        );
    }
    Ok((positional, options))
}

fn read(path: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {path}"))
}

fn main() -> Result<()> {
    let (a, opt) = split_args()?;
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
    let options = jhakaas_model_manager::LoadOptions {
        residency: match opt.get("weights-residency") {
            Some(r) => r.parse()?,
            None => Default::default(),
        },
        ..Default::default()
    };
    let pipeline = StableDiffusionPipeline::load_with(
        &ModelSource::Local(a[1].clone().into()),
        &device,
        &options,
    )?;
    let load_s = load_started.elapsed().as_secs_f64();
    let init_image = match opt.get("init-image") {
        Some(path) => {
            let image = decode_image(&read(path)?, MAX_PIXELS)?;
            let mask = match opt.get("mask") {
                Some(m) => Some(jhakaas_model_manager::inpaint::decode_mask(
                    &read(m)?,
                    MAX_PIXELS,
                )?),
                None => None,
            };
            let strength = match (opt.get("strength"), &mask) {
                (Some(s), _) => s.parse()?,
                (None, Some(_)) => 1.0,
                (None, None) => anyhow::bail!("img2img needs --strength"),
            };
            Some(InitImage {
                image,
                strength,
                mask,
                mask_crop_padding: opt
                    .get("mask-crop-padding")
                    .map(|p| p.parse())
                    .transpose()?,
            })
        }
        None => None,
    };
    let controlnet_started = Instant::now();
    let (nets, controlnets) = match opt.get("controlnet") {
        Some(dir) => {
            let source = ModelSource::Local(dir.into());
            let net = ControlNetModel::load(&source, &device, pipeline.dtype())
                .with_context(|| format!("loading ControlNet {dir}"))?;
            let image_path = opt
                .get("control-image")
                .context("--controlnet needs --control-image")?;
            let image = decode_image_for(&read(image_path)?, MAX_PIXELS, "control_image")?;
            let request = ControlNetRequest {
                name: dir.clone(),
                image,
                scale: opt.get("controlnet-scale").map_or(Ok(1.0), |s| s.parse())?,
                start: 0.0,
                end: 1.0,
            };
            (vec![Arc::new(net)], vec![request])
        }
        None => (Vec::new(), Vec::new()),
    };
    let controlnet_load_s = controlnet_started.elapsed().as_secs_f64();
    let noise = match a[2].as_str() {
        "-" => None,
        path => Some(NoiseReplay::load(std::path::Path::new(path)).context("latents")?),
    };
    let params = GenerateParams {
        prompt: a[3].clone(),
        width: Some(size),
        height: Some(size),
        steps: Some(steps),
        guidance_scale: Some(7.5),
        scheduler: Some(
            opt.get("scheduler")
                .map_or(Ok(SchedulerKind::Ddim), |s| s.parse())?,
        ),
        seed: Some(opt.get("seed").map_or(Ok(0), |s| s.parse())?),
        rng: opt.get("rng").map(|r| r.parse::<RngKind>()).transpose()?,
        noise,
        init_image,
        controlnets,
        ..Default::default()
    };
    let limits = RequestLimits::default();
    let run = || -> Result<(Vec<u8>, f64, jhakaas_model_manager::StageTimings)> {
        let t = Instant::now();
        let g = pipeline
            .generate_with_nets(&params, &limits, &nets, &mut |_| ControlFlow::Continue(()))?;
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
            r#"{{"job_s": {job}, "text_encode_s": {}, "unet_step_s": {}, "denoise_s": {}, "vae_decode_s": {}}}"#,
            t.text_encode.as_secs_f64(),
            t.denoise.as_secs_f64() / steps as f64,
            t.denoise.as_secs_f64(),
            t.decode.as_secs_f64()
        ));
    }
    std::fs::write(&a[7], png)?;
    println!(
        r#"{{"cold_start_s": {cold_start}, "load_s": {load_s}, "controlnet_load_s": {controlnet_load_s}, "isa": "{:?}", "runs": [{}], "peak_rss_mb": {}}}"#,
        jhakaas_model_manager::kernels::simd::isa(),
        results.join(", "),
        peak_rss_mb()
    );
    Ok(())
}
