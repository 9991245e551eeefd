//! `jhakaas-profile`: where one UNet step (CFG batch 2), one VAE decode and the text encoding
//! of a CFG pair spend their time, by
//! kind of layer (attention, conv, linear, norm, GEGLU; the rest is element-wise work and
//! copies), plus the host's enqueue time (the forward call returning before the device is done)
//! and the same UNet at an 8×8 latent, where launch overhead dominates. One JSON object.
//!
//! Usage: jhakaas-profile MODEL_DIR SIZE [DEVICE] [KERNELS]

use anyhow::Result;
use candle_core::{Device, Tensor};
use jhakaas_model_manager::kernels::profile::{self, OPS};
use jhakaas_model_manager::kernels::{set_kernels, KernelChoice};
use jhakaas_model_manager::{DeviceChoice, ModelSource, StableDiffusionPipeline};
use std::time::Instant;

const REPEATS: usize = 3;

/// Median of `REPEATS` runs of `f` (synchronised), and the median time `f` took to return.
fn timings(device: &Device, mut f: impl FnMut() -> Result<Tensor>) -> Result<(f64, f64)> {
    f()?;
    device.synchronize()?;
    let (mut total, mut enqueue) = (Vec::new(), Vec::new());
    for _ in 0..REPEATS {
        let t = Instant::now();
        let out = f()?;
        enqueue.push(t.elapsed().as_secs_f64());
        device.synchronize()?;
        drop(out);
        total.push(t.elapsed().as_secs_f64());
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((median(total), median(enqueue)))
}

/// Per-kind seconds of one profiled run of `f`, with the remainder as `other_s`.
fn split(device: &Device, total: f64, mut f: impl FnMut() -> Result<Tensor>) -> Result<String> {
    profile::enable(true);
    f()?;
    device.synchronize()?;
    let snap = profile::snapshot();
    profile::enable(false);
    let mut parts = Vec::new();
    let mut sum = 0.0;
    for (op, d, calls) in snap {
        sum += d.as_secs_f64();
        parts.push(format!(
            r#""{}": {{"s": {:.4}, "calls": {calls}}}"#,
            format!("{op:?}").to_lowercase(),
            d.as_secs_f64()
        ));
    }
    parts.push(format!(r#""other_s": {:.4}"#, (total - sum).max(0.0)));
    Ok(format!("{{{}}}", parts.join(", ")))
}

fn main() -> Result<()> {
    // As the worker does.
    jhakaas_model_manager::kernels::retain_freed_memory();
    let a: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        a.len() >= 3,
        "usage: jhakaas-profile MODEL_DIR SIZE [DEVICE] [KERNELS]"
    );
    let size: usize = a[2].parse()?;
    let device = a
        .get(3)
        .map(String::as_str)
        .unwrap_or("cpu")
        .parse::<DeviceChoice>()?
        .open()?;
    if let Some(k) = a.get(4) {
        set_kernels(k.parse::<KernelChoice>()?);
    }
    if let Ok(w) = std::env::var("JHAKAAS_CPU_WEIGHTS") {
        jhakaas_model_manager::kernels::held::set_cpu_weights(w.parse()?);
    }
    let p = StableDiffusionPipeline::load(&ModelSource::Local(a[1].clone().into()), &device)?;
    let dtype = jhakaas_model_manager::device::working_dtype(&device);
    let context = p
        .encode_text(&["", "a photograph of an astronaut riding a horse"])?
        .to_dtype(dtype)?;
    let unet_at = |side: usize| -> Result<(Tensor, Tensor)> {
        let latents =
            Tensor::randn(0f32, 1f32, (2, 4, side / 8, side / 8), &device)?.to_dtype(dtype)?;
        let t = Tensor::new(&[500f32, 500.0], &device)?;
        Ok((latents, t))
    };
    if p.is_xl() {
        anyhow::bail!("jhakaas-profile times SD 1.x/2.x UNets (no SDXL added conditioning yet)");
    }
    let (latents, t) = unet_at(size)?;
    let unet = || -> Result<Tensor> { Ok(p.unet().forward(&latents, &t, &context)?) };
    let (unet_s, unet_enqueue_s) = timings(&device, unet)?;
    let unet_split = split(&device, unet_s, unet)?;
    let (small, t8) = unet_at(64)?;
    let (small_s, small_enqueue_s) =
        timings(&device, || Ok(p.unet().forward(&small, &t8, &context)?))?;
    let z =
        Tensor::randn(0f32, 1f32, (1, 4, size / 8, size / 8), &device)?.to_dtype(p.vae_dtype())?;
    let vae = || -> Result<Tensor> { Ok(p.vae().decode(&z)?) };
    let (vae_s, vae_enqueue_s) = timings(&device, vae)?;
    let vae_split = split(&device, vae_s, vae)?;
    let prompts = ["", "a photograph of an astronaut riding a horse"];
    let text = || -> Result<Tensor> { Ok(p.encode_text(&prompts)?) };
    let (text_s, _) = timings(&device, text)?;
    let text_split = split(&device, text_s, text)?;
    let dtype = format!("{dtype:?}").to_lowercase();
    let kernels = format!("{:?}", jhakaas_model_manager::kernels::kernels()).to_lowercase();
    let isa = format!("{:?}", jhakaas_model_manager::kernels::simd::isa());
    let ops: Vec<String> = OPS
        .iter()
        .map(|o| format!("{o:?}").to_lowercase())
        .collect();
    println!(
        r#"{{"size": {size}, "device": "{}", "dtype": "{dtype}", "kernels": "{kernels}", "cpu_isa": "{isa}", "ops": {ops:?}, "unet_step": {{"total_s": {unet_s:.4}, "host_enqueue_s": {unet_enqueue_s:.4}, "by_op": {unet_split}}}, "unet_step_8x8_latent": {{"total_s": {small_s:.4}, "host_enqueue_s": {small_enqueue_s:.4}}}, "vae_decode": {{"total_s": {vae_s:.4}, "host_enqueue_s": {vae_enqueue_s:.4}, "by_op": {vae_split}}}, "text_encode_cfg": {{"total_s": {text_s:.4}, "by_op": {text_split}}}}}"#,
        jhakaas_model_manager::device::describe(&device),
    );
    Ok(())
}
