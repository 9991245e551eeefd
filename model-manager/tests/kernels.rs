//! Every kernel against its reference, the plain candle math behind the same door: on the CPU
//! (f32, always run) and on CUDA (f16/bf16, run when a GPU is there — the one-call device
//! script runs them — and skipped with a message otherwise).

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use jhakaas_model_manager::kernels::conv2d::FusedConv2d;
use jhakaas_model_manager::kernels::held::{set_cpu_weights, CpuWeights};
use jhakaas_model_manager::kernels::{set_kernels, KernelChoice};
use jhakaas_model_manager::layers::{
    self, attention, attention_reference, geglu, geglu_reference, Activation, AttentionPrecision,
    ConvAddend,
};
use std::collections::HashMap;

/// A seeded tensor of standard normal values (host-generated, so every device sees the same).
fn randn(seed: u64, shape: &[usize]) -> Tensor {
    let mut stream = jhakaas_model_manager::noise::NormalStream::new(seed);
    let n: usize = shape.iter().product();
    Tensor::from_vec(stream.fill(n), shape, &Device::Cpu).unwrap()
}

/// Largest |a - b| relative to the largest |b| (at least 1).
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let b = b
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let max = |t: Tensor| {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    max((&a - &b).unwrap()) / max(b).max(1.0)
}

/// `t` rounded to f16 values (kept in f32): what a model shipped in f16 holds once upcast.
fn f16_exact(t: Tensor) -> Tensor {
    t.to_dtype(DType::F16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// The dtype a layer holds its weight in: f16 exactly when the f32 weight is f16-exact.
fn held_dtype(half: bool) -> DType {
    if half {
        DType::F16
    } else {
        DType::F32
    }
}

fn check(what: &str, ours: &Tensor, reference: &Tensor, tol: f32) {
    let d = rel_diff(ours, reference);
    eprintln!("{what}: relative max |diff| {d:.2e} (tolerance {tol:.0e})");
    assert!(d <= tol, "{what}: {d} > {tol}");
}

fn vb(tensors: Vec<(&str, Tensor)>, dtype: DType, dev: &Device) -> VarBuilder<'static> {
    let map: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    VarBuilder::from_tensors(map, dtype, dev)
}

/// (batch, query tokens, key tokens, heads, head width): SD 1.x (40/80/160), SD 2.x / SDXL
/// (64), text cross-attention (77 keys), the VAE's single 512-wide head, odd sizes.
const ATTENTION_CASES: &[(usize, usize, usize, usize, usize)] = &[
    (2, 256, 256, 8, 40),
    (2, 300, 77, 8, 80),
    (1, 64, 77, 8, 160),
    (2, 333, 333, 5, 64),
    (1, 1024, 1024, 10, 64),
    (1, 256, 256, 1, 512),
];

fn attention_inputs(b: usize, lq: usize, lk: usize, h: usize, d: usize) -> [Tensor; 3] {
    let s = (b * 1000 + lq * 7 + lk * 3 + h * d) as u64;
    [
        randn(s, &[b, lq, h * d]),
        randn(s + 1, &[b, lk, h * d]),
        randn(s + 2, &[b, lk, h * d]),
    ]
}

#[test]
fn cpu_attention_matches_the_reference() {
    for &(b, lq, lk, h, d) in ATTENTION_CASES {
        let [q, k, v] = attention_inputs(b, lq, lk, h, d);
        let ours = attention(&q, &k, &v, h, false, AttentionPrecision::Native).unwrap();
        let reference = attention_reference(&q, &k, &v, h, false, AttentionPrecision::F32).unwrap();
        check(
            &format!("cpu attention b{b} lq{lq} lk{lk} h{h} d{d}"),
            &ours,
            &reference,
            2e-6,
        );
    }
}

#[test]
fn cpu_attention_takes_views_into_one_fused_projection() {
    let (b, l, h, d) = (2, 150, 4, 24);
    let qkv = randn(90, &[b, l, 3 * h * d]);
    let w = h * d;
    let (q, k, v) = (
        qkv.narrow(2, 0, w).unwrap(),
        qkv.narrow(2, w, w).unwrap(),
        qkv.narrow(2, 2 * w, w).unwrap(),
    );
    let ours = attention(&q, &k, &v, h, false, AttentionPrecision::Native).unwrap();
    let reference = attention_reference(&q, &k, &v, h, false, AttentionPrecision::F32).unwrap();
    check("strided q/k/v", &ours, &reference, 2e-6);
}

#[test]
fn cpu_causal_attention_matches_the_masked_reference() {
    // CLIP's shape (77 tokens, 64-wide heads) and block-crossing lengths.
    for &(b, l, h, d) in &[(2, 77, 12, 64), (1, 300, 2, 40), (1, 1, 1, 16)] {
        let [q, k, v] = attention_inputs(b, l, l, h, d);
        let ours = attention(&q, &k, &v, h, true, AttentionPrecision::F32).unwrap();
        let reference = attention_reference(&q, &k, &v, h, true, AttentionPrecision::F32).unwrap();
        check(
            &format!("causal attention b{b} l{l} h{h} d{d}"),
            &ours,
            &reference,
            2e-6,
        );
    }
}

/// (in, out, kernel, stride, padding, height, width, batch)
type ConvCase = (usize, usize, usize, usize, usize, usize, usize, usize);
const CONV_CASES: &[ConvCase] = &[
    (8, 16, 3, 1, 1, 17, 13, 2),
    (32, 32, 3, 2, 1, 16, 16, 1),
    (16, 16, 3, 2, 0, 9, 9, 2),
    (24, 40, 1, 1, 0, 7, 11, 2),
    (4, 320, 3, 1, 1, 32, 32, 2),
    (320, 4, 3, 1, 1, 8, 8, 1),
    (64, 64, 3, 1, 1, 96, 96, 1),
    (320, 320, 3, 1, 1, 16, 16, 2),
    (128, 64, 3, 1, 1, 33, 31, 1),
];

#[test]
fn cpu_conv2d_matches_candle_with_fused_bias_and_addends() {
    // f16-exact weights are held in f16; the others stay f32.
    set_cpu_weights(CpuWeights::F16);
    let cases = CONV_CASES.iter().enumerate();
    for ((i, &(c, o, k, s, p, h, w, b)), half) in cases.flat_map(|c| [(c, false), (c, true)]) {
        eprintln!("weights held in {:?}", held_dtype(half));
        let seed = 100 + i as u64 * 10;
        let scale = 1.0 / ((c * k * k) as f64).sqrt();
        let mut weight = (randn(seed, &[o, c, k, k]) * scale).unwrap();
        if half {
            weight = f16_exact(weight);
        }
        let weights = vb(
            vec![("weight", weight), ("bias", randn(seed + 1, &[o]))],
            DType::F32,
            &Device::Cpu,
        );
        let conv = layers::conv2d(c, o, k, s, p, weights).unwrap();
        assert_eq!(conv.weight().dtype(), held_dtype(half));
        let x = randn(seed + 2, &[b, c, h, w]);
        let ours = conv.forward(&x).unwrap();
        let reference = conv.forward_reference(&x, None).unwrap();
        check(
            &format!("conv {c}->{o} k{k} s{s} p{p} {h}x{w} b{b}"),
            &ours,
            &reference,
            2e-6,
        );
        // The im2col path also where the door picks Winograd.
        let direct = x
            .apply_op2_no_bwd(
                conv.weight(),
                &FusedConv2d {
                    stride: s,
                    padding: p,
                    bias: conv.bias().cloned(),
                    addend: None,
                    winograd: false,
                },
            )
            .unwrap();
        check("  im2col", &direct, &reference, 2e-6);
        let (_, _, ho, wo) = reference.dims4().unwrap();
        let per_channel = randn(seed + 3, &[b, o]);
        let ours = conv
            .forward_add(&x, Some(ConvAddend::PerChannel(per_channel.clone())))
            .unwrap();
        let reference = conv
            .forward_reference(&x, Some(ConvAddend::PerChannel(per_channel)))
            .unwrap();
        check("  + per-channel addend", &ours, &reference, 2e-6);
        let residual = randn(seed + 4, &[b, o, ho, wo]);
        let ours = conv
            .forward_add(&x, Some(ConvAddend::Full(residual.clone())))
            .unwrap();
        let reference = conv
            .forward_reference(&x, Some(ConvAddend::Full(residual)))
            .unwrap();
        check("  + residual", &ours, &reference, 2e-6);
        // A strided (non-contiguous) input goes through the same door.
        let xt = x.transpose(2, 3).unwrap();
        check(
            "  transposed input",
            &conv.forward(&xt).unwrap(),
            &conv.forward_reference(&xt, None).unwrap(),
            2e-6,
        );
    }
}

#[test]
fn cpu_linear_matches_candle_nn_with_fused_bias_and_residual() {
    set_cpu_weights(CpuWeights::F16);
    for ((i, &(rows, inp, out, bias)), half) in [
        (154, 768, 3072, true),
        (2 * 1024, 320, 320, false),
        (3, 5, 7, true),
    ]
    .iter()
    .enumerate()
    .flat_map(|c| [(c, false), (c, true)])
    {
        eprintln!("weights held in {:?}", held_dtype(half));
        let seed = 300 + i as u64 * 10;
        let mut weight = (randn(seed, &[out, inp]) * (1.0 / (inp as f64).sqrt())).unwrap();
        if half {
            weight = f16_exact(weight);
        }
        let mut t = vec![("weight", weight)];
        if bias {
            t.push(("bias", randn(seed + 1, &[out])));
        }
        let lin = layers::linear(inp, out, bias, vb(t.clone(), DType::F32, &Device::Cpu)).unwrap();
        // The same layer holding its weight as the file stores it, `[out, in]` (text encoders).
        let stored = layers::linear_laid_out(
            layers::WeightLayout::AsStored,
            inp,
            out,
            bias,
            vb(t, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let x = randn(seed + 2, &[2, rows / 2 + rows % 2, inp]);
        let shape = [2, rows / 2 + rows % 2, out];
        let res = randn(seed + 3, &shape);
        for (layout, lin) in [("transposed", &lin), ("as stored", &stored)] {
            check(
                &format!("linear {inp}->{out}, weight {layout}"),
                &lin.forward(&x).unwrap(),
                &lin.forward_reference(&x, None).unwrap(),
                2e-6,
            );
            check(
                "  + residual",
                &lin.forward_residual(&x, Some(&res)).unwrap(),
                &lin.forward_reference(&x, Some(&res)).unwrap(),
                2e-6,
            );
        }
        // Transposed at use, so the gemm is the same and the result bit for bit the same.
        let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            flat(stored.forward(&x).unwrap()) == flat(lin.forward(&x).unwrap()),
            "linear {inp}->{out}: as stored differs from transposed"
        );
    }
}

fn group_norm_layer(
    groups: usize,
    channels: usize,
    seed: u64,
    dtype: DType,
    dev: &Device,
) -> layers::GroupNorm {
    let weights = vb(
        vec![
            ("weight", randn(seed, &[channels])),
            ("bias", randn(seed + 1, &[channels])),
        ],
        dtype,
        dev,
    );
    layers::group_norm(groups, channels, 1e-6, weights).unwrap()
}

/// (batch, channels, groups, height, width); the offset tests a mean far from 0.
const NORM_CASES: &[(usize, usize, usize, usize, usize, f64)] = &[
    (2, 320, 32, 16, 16, 0.0),
    (1, 64, 32, 33, 7, 5.0),
    (2, 1280, 32, 4, 4, -3.0),
    (1, 12, 3, 5, 1, 0.0),
];

#[test]
fn cpu_group_norm_and_silu_match_candle_nn() {
    for (i, &(b, c, g, h, w, offset)) in NORM_CASES.iter().enumerate() {
        let seed = 500 + i as u64 * 10;
        let norm = group_norm_layer(g, c, seed, DType::F32, &Device::Cpu);
        let x = randn(seed + 2, &[b, c, h, w]).affine(3.0, offset).unwrap();
        check(
            &format!("group norm {b}x{c}x{h}x{w} /{g}"),
            &norm.forward(&x).unwrap(),
            &norm.forward_reference(&x, false).unwrap(),
            2e-6,
        );
        check(
            "  + silu",
            &norm.forward_silu(&x).unwrap(),
            &norm.forward_reference(&x, true).unwrap(),
            2e-6,
        );
    }
}

#[test]
fn cpu_text_encoder_activations_match_candle() {
    let x = randn(710, &[2, 77, 3072]).affine(3.0, 0.0).unwrap();
    for act in [Activation::QuickGelu, Activation::Gelu] {
        check(
            &format!("{act:?}"),
            &act.apply(&x).unwrap(),
            &act.apply_reference(&x).unwrap(),
            2e-6,
        );
    }
}

#[test]
fn cpu_geglu_matches_chunk_gelu_multiply() {
    let h = (randn(700, &[2, 77, 2 * 1280]) * 2.0).unwrap();
    check(
        "geglu",
        &geglu(&h).unwrap(),
        &geglu_reference(&h).unwrap(),
        2e-6,
    );
}

/// The CUDA device, or `None` (with a message) when this build or machine has none.
fn cuda() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => {
            // The CUDA kernels run only when asked for; CPU tests are unaffected by this.
            set_kernels(KernelChoice::Fused);
            Some(d)
        }
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

#[test]
fn cuda_flash_attention_matches_the_f32_reference() {
    let Some(dev) = cuda() else { return };
    for dtype in [DType::F16, DType::BF16] {
        let tol = if dtype == DType::F16 { 4e-3 } else { 2.5e-2 };
        for &(b, lq, lk, h, d) in ATTENTION_CASES
            .iter()
            .filter(|c| layers::CUDA_FLASH_HEAD_DIMS.contains(&c.4))
        {
            let inputs = attention_inputs(b, lq, lk, h, d).map(|t| t.to_dtype(dtype).unwrap());
            let [q, k, v] = inputs.clone().map(|t| t.to_device(&dev).unwrap());
            let ours = attention(&q, &k, &v, h, false, AttentionPrecision::Native).unwrap();
            let [q, k, v] = inputs.map(|t| t.to_dtype(DType::F32).unwrap());
            let reference =
                attention_reference(&q, &k, &v, h, false, AttentionPrecision::F32).unwrap();
            check(
                &format!("cuda {dtype:?} attention b{b} lq{lq} lk{lk} h{h} d{d}"),
                &ours,
                &reference,
                tol,
            );
        }
    }
}

#[test]
fn cuda_group_norm_and_geglu_match_the_f32_reference() {
    let Some(dev) = cuda() else { return };
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let tol = match dtype {
            DType::F32 => 1e-5,
            DType::F16 => 4e-3,
            _ => 2.5e-2,
        };
        for (i, &(b, c, g, h, w, offset)) in NORM_CASES.iter().enumerate() {
            let seed = 500 + i as u64 * 10;
            let x = randn(seed + 2, &[b, c, h, w])
                .affine(3.0, offset)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let reference = group_norm_layer(g, c, seed, DType::F32, &Device::Cpu);
            let x32 = x.to_dtype(DType::F32).unwrap();
            let norm = group_norm_layer(g, c, seed, dtype, &dev);
            let xd = x.to_device(&dev).unwrap();
            check(
                &format!("cuda {dtype:?} group norm {b}x{c}x{h}x{w}"),
                &norm.forward(&xd).unwrap(),
                &reference.forward_reference(&x32, false).unwrap(),
                tol,
            );
            check(
                "  + silu",
                &norm.forward_silu(&xd).unwrap(),
                &reference.forward_reference(&x32, true).unwrap(),
                tol,
            );
        }
        let hx = (randn(700, &[2, 77, 2 * 1280]) * 2.0)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let ours = geglu(&hx.to_device(&dev).unwrap()).unwrap();
        check(
            &format!("cuda {dtype:?} geglu"),
            &ours,
            &geglu_reference(&hx.to_dtype(DType::F32).unwrap()).unwrap(),
            tol,
        );
    }
}
