//! Launching our CUDA kernels (`cuda/*.cu`, compiled to PTX by `build.rs`) on candle's stream,
//! as [`super::launch`] plans them. Each function takes candle's storages and layouts as the
//! custom ops receive them.

use super::attention::Dims as AttentionDims;
use super::group_norm::{Dims as GroupNormDims, FusedGroupNorm};
use super::launch::{self, Arg, Launch, Module};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape};

const ATTENTION_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
const GROUP_NORM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/group_norm.ptx"));
const GEGLU_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/geglu.ptx"));

/// Binds `$func` to `$plan`'s kernel (candle loads its module once per device).
macro_rules! load_kernel {
    ($dev:expr, $plan:expr, $func:ident) => {
        let $func =
            $dev.get_or_load_custom_func(&$plan.kernel, $plan.module.name(), ptx($plan.module))?;
    };
}

/// Launches `plan` on candle's stream with `b` (a builder for its kernel): the scalars as the
/// plan lists them, buffer number `i` through `buffer(args, i)` (a view that starts at the
/// plan's offset for it, [`Launch::offset`]).
fn issue<'a>(
    mut b: LaunchArgs<'a>,
    plan: &'a Launch,
    buffer: impl Fn(&mut LaunchArgs<'a>, usize),
) -> Result<()> {
    for arg in &plan.args {
        match arg {
            Arg::Buffer { index, .. } => buffer(&mut b, *index),
            Arg::I32(v) => {
                b.arg(v);
            }
            Arg::I64(v) => {
                b.arg(v);
            }
            Arg::Usize(v) => {
                b.arg(v);
            }
            Arg::F32(v) => {
                b.arg(v);
            }
        }
    }
    let cfg = LaunchConfig {
        grid_dim: plan.grid,
        block_dim: plan.block,
        shared_mem_bytes: plan.shared_mem_bytes,
    };
    // SAFETY: the plan's arguments match the kernel's signature (checked against the kernels'
    // C signatures by the CPU emulation's tests) and the op checked the sizes.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

fn ptx(module: Module) -> &'static str {
    match module {
        Module::Attention => ATTENTION_PTX,
        Module::GroupNorm => GROUP_NORM_PTX,
        Module::Geglu => GEGLU_PTX,
    }
}

/// The contiguous part of `s` that `l` describes.
fn view<'a, T>(s: &'a CudaSlice<T>, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.slice(a..b)),
        None => candle_core::bail!("{what} must be contiguous"),
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
    fn run<T: DeviceRepr + CudaDType>(
        dev: &CudaDevice,
        [q, k, v]: [&CudaSlice<T>; 3],
        plan: &Launch,
        elems: usize,
    ) -> Result<CudaStorage> {
        // SAFETY: every element is written by the kernel (each block writes its rows).
        let out = unsafe { dev.alloc::<T>(elems)? };
        let inputs = [
            q.slice(plan.offset(0)..),
            k.slice(plan.offset(1)..),
            v.slice(plan.offset(2)..),
        ];
        load_kernel!(dev, plan, func);
        issue(func.builder(), plan, |b, i| {
            match i {
                0..=2 => b.arg(&inputs[i]),
                _ => b.arg(&out),
            };
        })?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let elems = dims.b * dims.lq * dims.heads * dims.d;
    let out = match (&qs.slice, &ks.slice, &vs.slice) {
        (CudaStorageSlice::F16(q), CudaStorageSlice::F16(k), CudaStorageSlice::F16(v)) => run(
            &dev,
            [q, k, v],
            &launch::attention(&dims, DType::F16, scale)?,
            elems,
        )?,
        (CudaStorageSlice::BF16(q), CudaStorageSlice::BF16(k), CudaStorageSlice::BF16(v)) => run(
            &dev,
            [q, k, v],
            &launch::attention(&dims, DType::BF16, scale)?,
            elems,
        )?,
        _ => candle_core::bail!("flash attention takes f16 or bf16 q, k and v of one dtype"),
    };
    Ok((out, shape.clone()))
}

/// GroupNorm (+ SiLU): statistics over chunks of each group, then the apply pass.
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
        [x, g, b]: [(&CudaSlice<T>, &Layout); 3],
        dims: GroupNormDims,
        op: FusedGroupNorm,
        dtype: DType,
    ) -> Result<CudaStorage> {
        let plan = launch::group_norm(&dims, &op, dtype)?;
        let inputs = [
            view(x.0, x.1, "x")?,
            view(g.0, g.1, "gamma")?,
            view(b.0, b.1, "beta")?,
        ];
        let partial = dev.alloc_zeros::<f32>(plan.partial_len)?;
        // SAFETY: every element is written by `gn_apply`.
        let out = unsafe { dev.alloc::<T>(plan.out_len)? };
        load_kernel!(dev, plan.stats, stats);
        load_kernel!(dev, plan.apply, apply);
        for (func, launch) in [(&stats, &plan.stats), (&apply, &plan.apply)] {
            issue(func.builder(), launch, |l, i| {
                match i {
                    0..=2 => l.arg(&inputs[i]),
                    3 => l.arg(&partial),
                    _ => l.arg(&out),
                };
            })?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let out = match (&xs.slice, &gs.slice, &bs.slice) {
        (CudaStorageSlice::F32(x), CudaStorageSlice::F32(g), CudaStorageSlice::F32(b)) => {
            run(&dev, [(x, xl), (g, gl), (b, bl)], dims, op, DType::F32)?
        }
        (CudaStorageSlice::F16(x), CudaStorageSlice::F16(g), CudaStorageSlice::F16(b)) => {
            run(&dev, [(x, xl), (g, gl), (b, bl)], dims, op, DType::F16)?
        }
        (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(g), CudaStorageSlice::BF16(b)) => {
            run(&dev, [(x, xl), (g, gl), (b, bl)], dims, op, DType::BF16)?
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
        plan: &Launch,
        elems: usize,
    ) -> Result<CudaStorage> {
        let x = view(x, l, "geglu input")?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(elems)? };
        load_kernel!(dev, plan, func);
        issue(func.builder(), plan, |b, i| {
            match i {
                0 => b.arg(&x),
                _ => b.arg(&out),
            };
        })?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let out = match &s.slice {
        CudaStorageSlice::F32(x) => {
            run(&dev, x, l, &launch::geglu(rows, n, DType::F32)?, rows * n)?
        }
        CudaStorageSlice::F16(x) => {
            run(&dev, x, l, &launch::geglu(rows, n, DType::F16)?, rows * n)?
        }
        CudaStorageSlice::BF16(x) => {
            run(&dev, x, l, &launch::geglu(rows, n, DType::BF16)?, rows * n)?
        }
        _ => candle_core::bail!("geglu: takes f32, f16 or bf16"),
    };
    Ok((out, shape))
}
