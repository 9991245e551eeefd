//! Our CUDA kernels (`cuda/*.cu`) run on the CPU. Each case is launched exactly as
//! `kernels::launch` plans it (grid, block, argument packing, views' offsets and strides)
//! through the emulation in `cuda/emu/`, and its output is compared with the kernel's Rust
//! reference (`attention_reference`, `GroupNorm::forward_reference`, `geglu_reference`).
//! Every case runs in three builds of the emulation: plain, in three thread orders whose
//! outputs must agree bit for bit (a difference is a race); AddressSanitizer (bad global or
//! shared accesses); ThreadSanitizer (races between the barriers).
//!
//! `JHAKAAS_CUDA_EMU` names the folder `cuda/emu/build.sh` built (`.ci/cuda-emu` sets it);
//! without it these tests say so and pass. `JHAKAAS_CUDA_EMU_FAIL_FAST=1` stops at the first
//! failing case (the mutation check, `cuda/emu/mutants.py`).

#[path = "cuda_emu/harness.rs"]
mod harness;

use candle_core::{DType, Device};
use harness::{
    check_all, max_abs, random, rounded, Buffer, Case, Fill, Mode, Result, ALL_MODES, NO_TSAN,
};
use jhakaas_model_manager::kernels::attention::FusedAttention;
use jhakaas_model_manager::kernels::group_norm::FusedGroupNorm;
use jhakaas_model_manager::kernels::launch;
use jhakaas_model_manager::layers::{self, AttentionPrecision};
use std::collections::HashMap;

/// How q, k and v lie in memory.
#[derive(Debug, Clone, Copy)]
enum Views {
    /// Three tensors.
    Separate,
    /// Views into one `[B, L, 3·H·D]` projection (self-attention).
    FusedQkv,
    /// q alone, k and v views into one `[B, Lk, 2·H·D]` projection (cross-attention).
    FusedKv,
}

#[allow(clippy::too_many_arguments)]
fn attention_case(
    dtype: DType,
    b: usize,
    lq: usize,
    lk: usize,
    heads: usize,
    d: usize,
    views: Views,
    modes: &'static [Mode],
) -> Result<Case> {
    let inner = heads * d;
    let seed = (b * 7 + lq * 13 + lk * 17 + heads * 19 + d * 23) as u64;
    let scale = 1.0 / (d as f32).sqrt();
    let (q, k, v, buffers, bind) = match views {
        Views::Separate => {
            let q = rounded(&random(&[b, lq, inner], seed, -2.0, 2.0)?, dtype)?;
            let k = rounded(&random(&[b, lk, inner], seed + 1, -2.0, 2.0)?, dtype)?;
            let v = rounded(&random(&[b, lk, inner], seed + 2, -1.0, 1.0)?, dtype)?;
            let buffers = vec![
                Buffer::input("q", &q, dtype)?,
                Buffer::input("k", &k, dtype)?,
                Buffer::input("v", &v, dtype)?,
            ];
            (q, k, v, buffers, vec!["q", "k", "v", "out"])
        }
        Views::FusedQkv => {
            assert_eq!(lq, lk);
            let qkv = rounded(&random(&[b, lq, 3 * inner], seed, -2.0, 2.0)?, dtype)?;
            let buffers = vec![Buffer::input("qkv", &qkv, dtype)?];
            let (q, k, v) = (
                qkv.narrow(2, 0, inner)?,
                qkv.narrow(2, inner, inner)?,
                qkv.narrow(2, 2 * inner, inner)?,
            );
            (q, k, v, buffers, vec!["qkv", "qkv", "qkv", "out"])
        }
        Views::FusedKv => {
            let q = rounded(&random(&[b, lq, inner], seed, -2.0, 2.0)?, dtype)?;
            let kv = rounded(&random(&[b, lk, 2 * inner], seed + 1, -2.0, 2.0)?, dtype)?;
            let buffers = vec![
                Buffer::input("q", &q, dtype)?,
                Buffer::input("kv", &kv, dtype)?,
            ];
            let (k, v) = (kv.narrow(2, 0, inner)?, kv.narrow(2, inner, inner)?);
            (q, k, v, buffers, vec!["q", "kv", "kv", "out"])
        }
    };
    let op = FusedAttention {
        heads,
        scale,
        causal: false,
    };
    let dims = op.dims(q.layout(), k.layout(), v.layout())?;
    let plan = launch::attention(&dims, dtype, scale)?;
    let reference = layers::attention_reference(&q, &k, &v, heads, false, AttentionPrecision::F32)?;
    // f16 keeps 11 significant bits, bf16 8: the probabilities and the output are rounded to
    // them, so the bound is a fraction of the largest |v| (see README.md for the measured worst).
    let tolerance = max_abs(&v)? * if dtype == DType::F16 { 1e-3 } else { 8e-3 };
    let mut buffers = buffers;
    buffers.push(Buffer {
        name: "out",
        dtype,
        len: b * lq * inner,
        fill: Fill::Poison,
    });
    Ok(Case {
        name: format!("attention-{dtype:?}-b{b}-q{lq}-k{lk}-h{heads}-d{d}-{views:?}")
            .to_lowercase(),
        buffers,
        bind,
        launches: vec![plan],
        output: "out",
        reference: reference.flatten_all()?.to_vec1()?,
        tolerance,
        modes,
    })
}

/// dtype, batch, query and key lengths, heads, head width, views, modes.
type AttentionSpec = (
    DType,
    usize,
    usize,
    usize,
    usize,
    usize,
    Views,
    &'static [Mode],
);

#[test]
fn attention_matches_its_reference_under_the_emulation() {
    use Views::*;
    let mut cases: Vec<AttentionSpec> = Vec::new();
    for dtype in [DType::F16, DType::BF16] {
        cases.extend([
            // SD 1.x's head width 40 (padded to 48): self-attention from one fused projection,
            // lengths no multiple of the 64-row or 32-key tiles.
            (dtype, 2, 100, 100, 2, 40, FusedQkv, ALL_MODES),
            // SD 2.x / SDXL's 64, cross-attention on CLIP's 77 tokens from a fused k/v.
            (dtype, 1, 130, 77, 2, 64, FusedKv, ALL_MODES),
            // SD 1.x's 80 and 160, then 128 (32 query rows per block above 80).
            (dtype, 1, 65, 33, 2, 80, Separate, ALL_MODES),
            (dtype, 1, 40, 50, 1, 160, Separate, ALL_MODES),
            (dtype, 1, 33, 31, 2, 128, FusedKv, ALL_MODES),
            // One query, one key; a head narrower than its tile.
            (dtype, 1, 1, 1, 3, 24, Separate, ALL_MODES),
        ]);
    }
    // SD 1.5's first cross-attention at 512²: 4096 queries on 77 tokens, 8 heads of 40.
    cases.push((DType::F16, 1, 4096, 77, 8, 40, FusedKv, NO_TSAN));
    check_all(
        "attention",
        cases
            .into_iter()
            .map(|(dtype, b, lq, lk, h, d, views, modes)| {
                attention_case(dtype, b, lq, lk, h, d, views, modes)
            }),
    );
}

#[allow(clippy::too_many_arguments)]
fn group_norm_case(
    dtype: DType,
    b: usize,
    channels: usize,
    spatial: (usize, usize),
    groups: usize,
    eps: f64,
    silu: bool,
    modes: &'static [Mode],
) -> Result<Case> {
    let shape = [b, channels, spatial.0, spatial.1];
    let seed = (b * 3 + channels * 5 + spatial.0 * 7 + spatial.1 * 11) as u64;
    // Values far from zero test the pivoted one-pass variance.
    let x = rounded(&random(&shape, seed, 2.0, 6.0)?, dtype)?;
    let gamma = rounded(&random(&[channels], seed + 1, 0.5, 1.5)?, dtype)?;
    let beta = rounded(&random(&[channels], seed + 2, -0.5, 0.5)?, dtype)?;
    let op = FusedGroupNorm { groups, eps, silu };
    let dims = op.dims(x.layout(), gamma.layout(), beta.layout())?;
    let plan = launch::group_norm(&dims, &op, dtype)?;
    let vars = HashMap::from([
        ("weight".to_string(), gamma.clone()),
        ("bias".to_string(), beta.clone()),
    ]);
    let vb = candle_nn::VarBuilder::from_tensors(vars, DType::F32, &Device::Cpu);
    let reference = layers::group_norm(groups, channels, eps, vb)?.forward_reference(&x, silu)?;
    let tolerance = max_abs(&reference)?
        * match dtype {
            DType::F32 => 2e-5,
            DType::F16 => 1e-3,
            _ => 8e-3,
        };
    Ok(Case {
        name: format!(
            "group-norm-{dtype:?}-{b}x{channels}x{}x{}-g{groups}-silu{silu}",
            spatial.0, spatial.1
        )
        .to_lowercase(),
        buffers: vec![
            Buffer::input("x", &x, dtype)?,
            Buffer::input("gamma", &gamma, dtype)?,
            Buffer::input("beta", &beta, dtype)?,
            Buffer {
                name: "partial",
                dtype: DType::F32,
                len: plan.partial_len,
                fill: Fill::Zero,
            },
            Buffer {
                name: "out",
                dtype,
                len: plan.out_len,
                fill: Fill::Poison,
            },
        ],
        bind: vec!["x", "gamma", "beta", "partial", "out"],
        launches: vec![plan.stats, plan.apply],
        output: "out",
        reference: reference.flatten_all()?.to_vec1()?,
        tolerance,
        modes,
    })
}

/// dtype, batch, channels, spatial size, groups, eps, SiLU, modes.
type GroupNormSpec = (
    DType,
    usize,
    usize,
    (usize, usize),
    usize,
    f64,
    bool,
    &'static [Mode],
);

#[test]
fn group_norm_matches_its_reference_under_the_emulation() {
    let (f32_, f16_, bf16_) = (DType::F32, DType::F16, DType::BF16);
    let unet = 1e-5;
    let vae = 1e-6;
    let cases: Vec<GroupNormSpec> = vec![
        // The UNets' blocks (32 groups): SD 1.x/2.x 320/640/1280 and the up blocks' skip
        // concatenations 2560/1920/960/640; SDXL's 320/640/1280 and its 1920/960.
        (f32_, 2, 320, (24, 24), 32, unet, true, ALL_MODES),
        (f16_, 1, 640, (12, 12), 32, unet, true, ALL_MODES),
        (bf16_, 1, 1280, (6, 6), 32, unet, false, ALL_MODES),
        (f32_, 1, 2560, (3, 3), 32, unet, true, ALL_MODES),
        (f16_, 1, 1920, (6, 6), 32, unet, true, ALL_MODES),
        (f32_, 1, 960, (12, 12), 32, unet, false, ALL_MODES),
        // The VAE's blocks (eps 1e-6): 128 at the full size (4 chunks per group), 256, 512.
        (f32_, 1, 128, (64, 64), 32, vae, true, ALL_MODES),
        (bf16_, 1, 256, (20, 20), 32, vae, true, ALL_MODES),
        (f16_, 1, 512, (9, 7), 32, vae, false, ALL_MODES),
        // One group larger than 64 chunks of 4096: the chunk count's cap.
        (f32_, 1, 4, (256, 260), 1, unet, true, NO_TSAN),
        // A group smaller than a block's 256 threads.
        (f16_, 1, 64, (3, 5), 32, unet, true, ALL_MODES),
    ];
    check_all(
        "group_norm",
        cases
            .into_iter()
            .map(|(dtype, b, c, s, g, eps, silu, modes)| {
                group_norm_case(dtype, b, c, s, g, eps, silu, modes)
            }),
    );
}

fn geglu_case(dtype: DType, rows: usize, n: usize, modes: &'static [Mode]) -> Result<Case> {
    let x = rounded(
        &random(&[rows, 2 * n], (rows * 31 + n) as u64, -4.0, 4.0)?,
        dtype,
    )?;
    let plan = launch::geglu(rows, n, dtype)?;
    let reference = layers::geglu_reference(&x)?;
    let tolerance = max_abs(&reference)?
        * match dtype {
            DType::F32 => 1e-6,
            DType::F16 => 1e-3,
            _ => 8e-3,
        };
    Ok(Case {
        name: format!("geglu-{dtype:?}-{rows}x{n}").to_lowercase(),
        buffers: vec![
            Buffer::input("x", &x, dtype)?,
            Buffer {
                name: "out",
                dtype,
                len: rows * n,
                fill: Fill::Poison,
            },
        ],
        bind: vec!["x", "out"],
        launches: vec![plan],
        output: "out",
        reference: reference.flatten_all()?.to_vec1()?,
        tolerance,
        modes,
    })
}

#[test]
fn geglu_matches_its_reference_under_the_emulation() {
    let cases: Vec<(DType, usize, usize, &'static [Mode])> = vec![
        // SD 1.x's feed-forward (inner 1280 at the first level), SDXL's 5120; odd sizes.
        (DType::F32, 77, 1280, ALL_MODES),
        (DType::F16, 9, 5120, ALL_MODES),
        (DType::BF16, 33, 2560, ALL_MODES),
        (DType::F32, 3, 7, ALL_MODES),
        // More than 65535 blocks of 256: the grid-stride loop.
        (DType::F16, 4097, 4096, &[Mode::Plain]),
    ];
    check_all(
        "geglu",
        cases
            .into_iter()
            .map(|(dtype, rows, n, modes)| geglu_case(dtype, rows, n, modes)),
    );
}
