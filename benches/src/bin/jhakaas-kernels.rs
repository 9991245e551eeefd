//! `jhakaas-kernels`: times every layer door (conv2d, linear, attention, GroupNorm+SiLU) on the
//! shapes in `benches/kernels/cases.json`, our kernel against its reference (the plain candle
//! math), one JSON line per case; `benches/kernels/torch_kernels.py` times PyTorch on the same
//! shapes and `compare_kernels.py` joins both into a table.
//!
//! Conv and linear cases are also timed with the weights rounded to f16 values, which the
//! layers hold in f16 and widen in blocks (`ours_f16_ms`: a model shipped in fp16).
//!
//! Usage: jhakaas-kernels [CASES_JSON] [REPEATS] [ours] (`ours`: skip the references, for
//! profiling our kernels alone)

use anyhow::{Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use jhakaas_model_manager::layers::{self, attention, attention_reference, AttentionPrecision};
use std::collections::HashMap;
use std::time::Instant;

/// Median wall time of `f` over `repeats` runs after one warm-up, in milliseconds.
fn time_ms(repeats: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<f64> {
    if repeats == 0 {
        return Ok(f64::NAN);
    }
    f()?;
    let mut t: Vec<f64> = (0..repeats)
        .map(|_| {
            let s = Instant::now();
            f().map(|_| s.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_>>()?;
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

fn randn(shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, 1f32, shape, &Device::Cpu)?)
}

fn vb(t: Vec<(&str, Tensor)>) -> VarBuilder<'static> {
    let map: HashMap<String, Tensor> = t.into_iter().map(|(k, v)| (k.into(), v)).collect();
    VarBuilder::from_tensors(map, DType::F32, &Device::Cpu)
}

/// `t` rounded to f16 values (still f32): what an fp16 model file holds once upcast.
fn f16_exact(t: Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F16)?.to_dtype(DType::F32)?)
}

fn report(kind: &str, case: &[usize], ours: f64, reference: f64, ours_f16: Option<f64>) {
    let ms = |v: f64| {
        if v.is_nan() {
            "null".to_string()
        } else {
            format!("{v:.3}")
        }
    };
    let f16 = ours_f16.map_or(String::new(), |v| format!(r#", "ours_f16_ms": {}"#, ms(v)));
    println!(
        r#"{{"kind": "{kind}", "case": {case:?}, "ours_ms": {ours:.3}, "reference_ms": {}{f16}}}"#,
        ms(reference)
    );
}

fn main() -> Result<()> {
    // As the worker does.
    jhakaas_model_manager::kernels::retain_freed_memory();
    // f16-exact weights (the `ours_f16_ms` timings) are held in f16, the others stay f32.
    jhakaas_model_manager::kernels::held::set_cpu_weights(
        jhakaas_model_manager::kernels::held::CpuWeights::F16,
    );
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .map(String::as_str)
        .unwrap_or("benches/kernels/cases.json");
    let repeats: usize = args.get(2).map(|r| r.parse()).transpose()?.unwrap_or(5);
    let reference_repeats = if args.get(3).map(String::as_str) == Some("ours") {
        0
    } else {
        repeats
    };
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).with_context(|| path.to_string())?)?;
    let list = |k: &str| -> Vec<Vec<usize>> {
        cases[k]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| {
                        c.as_array()
                            .unwrap()
                            .iter()
                            .map(|v| v.as_u64().unwrap() as usize)
                            .collect()
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    for c in list("conv") {
        let &[b, i, o, k, s, p, h, w] = c.as_slice() else {
            anyhow::bail!("conv case {c:?}")
        };
        let weight = randn(&[o, i, k, k])?;
        let bias = randn(&[o])?;
        let build = |weight: Tensor| {
            layers::conv2d(
                i,
                o,
                k,
                s,
                p,
                vb(vec![("weight", weight), ("bias", bias.clone())]),
            )
        };
        let conv = build(weight.clone())?;
        let conv16 = build(f16_exact(weight)?)?;
        let x = randn(&[b, i, h, w])?;
        let ours = time_ms(repeats, || Ok(conv.forward(&x)?))?;
        let ours_f16 = time_ms(repeats, || Ok(conv16.forward(&x)?))?;
        let reference = time_ms(reference_repeats, || Ok(conv.forward_reference(&x, None)?))?;
        report("conv", &c, ours, reference, Some(ours_f16));
    }
    for c in list("linear") {
        let &[rows, i, o] = c.as_slice() else {
            anyhow::bail!("linear case {c:?}")
        };
        let weight = randn(&[o, i])?;
        let bias = randn(&[o])?;
        let build = |weight: Tensor| {
            layers::linear(
                i,
                o,
                true,
                vb(vec![("weight", weight), ("bias", bias.clone())]),
            )
        };
        let lin = build(weight.clone())?;
        let lin16 = build(f16_exact(weight)?)?;
        let x = randn(&[rows, i])?;
        let ours = time_ms(repeats, || Ok(lin.forward(&x)?))?;
        let ours_f16 = time_ms(repeats, || Ok(lin16.forward(&x)?))?;
        let reference = time_ms(reference_repeats, || Ok(lin.forward_reference(&x, None)?))?;
        report("linear", &c, ours, reference, Some(ours_f16));
    }
    for c in list("attention") {
        let &[b, h, lq, lk, d] = c.as_slice() else {
            anyhow::bail!("attention case {c:?}")
        };
        let (q, k, v) = (
            randn(&[b, lq, h * d])?,
            randn(&[b, lk, h * d])?,
            randn(&[b, lk, h * d])?,
        );
        let ours = time_ms(repeats, || {
            Ok(attention(&q, &k, &v, h, false, AttentionPrecision::Native)?)
        })?;
        let reference = time_ms(reference_repeats, || {
            Ok(attention_reference(
                &q,
                &k,
                &v,
                h,
                false,
                AttentionPrecision::F32,
            )?)
        })?;
        report("attention", &c, ours, reference, None);
    }
    for c in list("group_norm") {
        let &[b, ch, g, h, w] = c.as_slice() else {
            anyhow::bail!("group_norm case {c:?}")
        };
        let norm = layers::group_norm(
            g,
            ch,
            1e-6,
            vb(vec![("weight", randn(&[ch])?), ("bias", randn(&[ch])?)]),
        )?;
        let x = randn(&[b, ch, h, w])?;
        let ours = time_ms(repeats, || Ok(norm.forward_silu(&x)?))?;
        let reference = time_ms(reference_repeats, || Ok(norm.forward_reference(&x, true)?))?;
        report("group_norm_silu", &c, ours, reference, None);
    }
    Ok(())
}
