//! Launching our CUDA kernels (`cuda/*.cu`, compiled to PTX by `build.rs`) on candle's stream.
//! Each function takes candle's storages and layouts as the custom ops receive them.

use super::attention::Dims as AttentionDims;
use super::group_norm::{Dims as GroupNormDims, FusedGroupNorm};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Result, Shape};

const ATTENTION_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
const GROUP_NORM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/group_norm.ptx"));
const GEGLU_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/geglu.ptx"));

/// The contiguous part of `s` that `l` describes.
fn view<'a, T>(s: &'a CudaSlice<T>, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.slice(a..b)),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// Padded head width and query rows per block of the flash kernel for head width `d`.
fn flash_variant(d: usize) -> Option<(usize, usize)> {
    match d {
        1..=48 => Some((48, 64)),
        49..=64 => Some((64, 64)),
        65..=80 => Some((80, 64)),
        81..=128 => Some((128, 32)),
        129..=160 => Some((160, 32)),
        _ => None,
    }
}

/// Flash attention for f16/bf16 `[B, L, H·D]` inputs with contiguous rows (strides in `dims`).
pub(crate) fn attention(
    qs: &CudaStorage,
    ks: &CudaStorage,
    vs: &CudaStorage,
    shape: &Shape,
    dims: AttentionDims,
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    let dev = qs.device().clone();
    let Some((dp, br)) = flash_variant(dims.d) else {
        candle_core::bail!("flash attention: head width {} is not built", dims.d);
    };
    #[allow(clippy::too_many_arguments)]
    fn run<T: DeviceRepr + CudaDType>(
        dev: &CudaDevice,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        name: &str,
        dims: AttentionDims,
        br: usize,
        scale: f32,
    ) -> Result<CudaStorage> {
        let elems = dims.b * dims.lq * dims.heads * dims.d;
        // SAFETY: every element is written by the kernel (each block writes its rows).
        let out = unsafe { dev.alloc::<T>(elems)? };
        let func = dev.get_or_load_custom_func(name, "jhakaas_attention", ATTENTION_PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (dims.lq.div_ceil(br) as u32, (dims.b * dims.heads) as u32, 1),
            block_dim: (2 * br as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (q, k, v) = (
            q.slice(dims.q.2..),
            k.slice(dims.k.2..),
            v.slice(dims.v.2..),
        );
        let i = |x: usize| x as i32;
        let (lq, lk, heads, d) = (i(dims.lq), i(dims.lk), i(dims.heads), i(dims.d));
        let (qb, qr, kb, kr, vb, vr) = (
            dims.q.0 as i64,
            i(dims.q.1),
            dims.k.0 as i64,
            i(dims.k.1),
            dims.v.0 as i64,
            i(dims.v.1),
        );
        let scale_log2 = scale * std::f32::consts::LOG2_E;
        let mut b = func.builder();
        b.arg(&q).arg(&k).arg(&v).arg(&out);
        b.arg(&qb).arg(&qr).arg(&kb).arg(&kr).arg(&vb).arg(&vr);
        b.arg(&lq).arg(&lk).arg(&heads).arg(&d).arg(&scale_log2);
        // SAFETY: the arguments match the kernel's signature; sizes were checked by the op.
        unsafe { b.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let out = match (&qs.slice, &ks.slice, &vs.slice) {
        (CudaStorageSlice::F16(q), CudaStorageSlice::F16(k), CudaStorageSlice::F16(v)) => run(
            &dev,
            q,
            k,
            v,
            &format!("flash_attn_f16_d{dp}"),
            dims,
            br,
            scale,
        )?,
        (CudaStorageSlice::BF16(q), CudaStorageSlice::BF16(k), CudaStorageSlice::BF16(v)) => run(
            &dev,
            q,
            k,
            v,
            &format!("flash_attn_bf16_d{dp}"),
            dims,
            br,
            scale,
        )?,
        _ => candle_core::bail!("flash attention takes f16 or bf16 q, k and v of one dtype"),
    };
    Ok((out, shape.clone()))
}

/// GroupNorm (+ SiLU): statistics over `chunks` blocks per group, then the apply pass.
#[allow(clippy::too_many_arguments)]
pub(crate) fn group_norm(
    xs: &CudaStorage,
    xl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
    bs: &CudaStorage,
    bl: &Layout,
    dims: GroupNormDims,
    op: FusedGroupNorm,
) -> Result<(CudaStorage, Shape)> {
    let dev = xs.device().clone();
    fn run<T: DeviceRepr + CudaDType>(
        dev: &CudaDevice,
        x: &CudaSlice<T>,
        xl: &Layout,
        g: &CudaSlice<T>,
        gl: &Layout,
        b: &CudaSlice<T>,
        bl: &Layout,
        suffix: &str,
        dims: GroupNormDims,
        op: FusedGroupNorm,
    ) -> Result<CudaStorage> {
        let (x, g, b) = (
            view(x, xl, "x")?,
            view(g, gl, "gamma")?,
            view(b, bl, "beta")?,
        );
        let groups = dims.b * op.groups;
        let per_group = dims.channels / op.groups;
        let group_len = per_group * dims.spatial;
        // Enough blocks to fill the GPU: about 4096 elements per block, at most 64 per group.
        let chunks = group_len.div_ceil(4096).clamp(1, 64);
        let partial = dev.alloc_zeros::<f32>(groups * chunks * 2)?;
        // SAFETY: every element is written by `gn_apply`.
        let out = unsafe { dev.alloc::<T>(dims.b * dims.channels * dims.spatial)? };
        let cfg = LaunchConfig {
            grid_dim: (chunks as u32, groups as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (group_len, chunks_i) = (group_len, chunks as i32);
        let stats = dev.get_or_load_custom_func(
            &format!("gn_stats_{suffix}"),
            "jhakaas_group_norm",
            GROUP_NORM_PTX,
        )?;
        let mut l = stats.builder();
        l.arg(&x).arg(&partial).arg(&group_len).arg(&chunks_i);
        // SAFETY: the arguments match the kernel's signature.
        unsafe { l.launch(cfg) }.w()?;
        let apply = dev.get_or_load_custom_func(
            &format!("gn_apply_{suffix}"),
            "jhakaas_group_norm",
            GROUP_NORM_PTX,
        )?;
        let (ngroups, per_group_i, spatial) = (op.groups as i32, per_group as i32, dims.spatial);
        let (eps, silu) = (op.eps as f32, op.silu as i32);
        let mut l = apply.builder();
        l.arg(&x).arg(&g).arg(&b).arg(&partial).arg(&out);
        l.arg(&group_len)
            .arg(&chunks_i)
            .arg(&ngroups)
            .arg(&per_group_i);
        l.arg(&spatial).arg(&eps).arg(&silu);
        // SAFETY: the arguments match the kernel's signature.
        unsafe { l.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let out = match (&xs.slice, &gs.slice, &bs.slice) {
        (CudaStorageSlice::F32(x), CudaStorageSlice::F32(g), CudaStorageSlice::F32(b)) => {
            run(&dev, x, xl, g, gl, b, bl, "f32", dims, op)?
        }
        (CudaStorageSlice::F16(x), CudaStorageSlice::F16(g), CudaStorageSlice::F16(b)) => {
            run(&dev, x, xl, g, gl, b, bl, "f16", dims, op)?
        }
        (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(g), CudaStorageSlice::BF16(b)) => {
            run(&dev, x, xl, g, gl, b, bl, "bf16", dims, op)?
        }
        _ => candle_core::bail!("group_norm: x, gamma and beta must share one float dtype"),
    };
    Ok((out, xl.shape().clone()))
}

/// GEGLU over `rows` rows of `2n` values.
pub(crate) fn geglu(
    s: &CudaStorage,
    l: &Layout,
    rows: usize,
    n: usize,
    shape: Shape,
) -> Result<(CudaStorage, Shape)> {
    let dev = s.device().clone();
    fn run<T: DeviceRepr + CudaDType>(
        dev: &CudaDevice,
        x: &CudaSlice<T>,
        l: &Layout,
        suffix: &str,
        rows: usize,
        n: usize,
    ) -> Result<CudaStorage> {
        let x = view(x, l, "geglu input")?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(rows * n)? };
        let func =
            dev.get_or_load_custom_func(&format!("geglu_{suffix}"), "jhakaas_geglu", GEGLU_PTX)?;
        let total = rows * n;
        let cfg = LaunchConfig {
            grid_dim: (total.div_ceil(256).min(65535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = func.builder();
        b.arg(&x).arg(&out).arg(&rows).arg(&n);
        // SAFETY: the arguments match the kernel's signature.
        unsafe { b.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let out = match &s.slice {
        CudaStorageSlice::F32(x) => run(&dev, x, l, "f32", rows, n)?,
        CudaStorageSlice::F16(x) => run(&dev, x, l, "f16", rows, n)?,
        CudaStorageSlice::BF16(x) => run(&dev, x, l, "bf16", rows, n)?,
        _ => candle_core::bail!("geglu: takes f32, f16 or bf16"),
    };
    Ok((out, shape))
}
