//! Fused GroupNorm (+ optional SiLU): one pass for each group's statistics (f64 sums), one for
//! the normalised, affine, activated output. CPU kernel here, CUDA kernel in
//! `cuda/group_norm.cu`; the reference is candle-nn's `GroupNorm` followed by `silu`.

use super::cpu::{cpu_f32, uninit_vec, SendPtr};
use super::simd;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;

/// `silu?(groupnorm(x) · γ + β)` over `[B, C, …]`.
#[derive(Debug, Clone, Copy)]
pub struct FusedGroupNorm {
    /// Number of groups (divides C).
    pub groups: usize,
    /// Added to the variance.
    pub eps: f64,
    /// Apply SiLU to the output.
    pub silu: bool,
}

/// Sizes of one call: `b` batches of `channels` channels of `spatial` elements each.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    /// Batch.
    pub b: usize,
    /// Channels.
    pub channels: usize,
    /// Elements per channel.
    pub spatial: usize,
}

impl FusedGroupNorm {
    /// Checks x, gamma and beta's layouts and returns the call's sizes.
    pub fn dims(&self, x: &Layout, gamma: &Layout, beta: &Layout) -> Result<Dims> {
        let dims = x.shape().dims();
        if dims.len() < 3 {
            candle_core::bail!("group_norm: input rank must be at least 3, got {:?}", dims);
        }
        let (b, channels) = (dims[0], dims[1]);
        if self.groups == 0 || channels % self.groups != 0 {
            candle_core::bail!("group_norm: {channels} channels in {} groups", self.groups);
        }
        for (name, l) in [("gamma", gamma), ("beta", beta)] {
            if l.shape().elem_count() != channels || !l.is_contiguous() {
                candle_core::bail!("group_norm: {name} must be {channels} contiguous values");
            }
        }
        if !x.is_contiguous() {
            candle_core::bail!("group_norm: input must be contiguous");
        }
        Ok(Dims {
            b,
            channels,
            spatial: dims[2..].iter().product(),
        })
    }
}

impl CustomOp3 for FusedGroupNorm {
    fn name(&self) -> &'static str {
        "jhakaas-fused-group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims(xl, gl, bl)?;
        let (x, gamma, beta) = (
            cpu_f32(xs, xl, "x")?,
            cpu_f32(gs, gl, "gamma")?,
            cpu_f32(bs, bl, "beta")?,
        );
        Ok((
            CpuStorage::F32(group_norm_cpu(x, gamma, beta, dims, *self)),
            xl.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = self.dims(xl, gl, bl)?;
        super::cuda::group_norm(xs, xl, gs, gl, bs, bl, dims, *self)
    }
}

/// The CPU kernel: one rayon task per (batch, group).
pub(crate) fn group_norm_cpu(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    dims: Dims,
    op: FusedGroupNorm,
) -> Vec<f32> {
    let Dims {
        b,
        channels,
        spatial,
    } = dims;
    let per_group = channels / op.groups;
    let group_len = per_group * spatial;
    // Every element is written once: each task owns one group's contiguous range.
    let mut out = uninit_vec::<f32>(x.len());
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..b * op.groups).into_par_iter().for_each(|task| {
        let g = task % op.groups;
        let start = task * group_len;
        let xs = &x[start..start + group_len];
        let (mean, var) = simd::mean_var(xs);
        let rstd = (1.0 / (var + op.eps).sqrt()) as f32;
        let mean = mean as f32;
        // SAFETY: `start..start + group_len` belongs to this task alone.
        let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(start), group_len) };
        for c in 0..per_group {
            let ch = g * per_group + c;
            let range = c * spatial..(c + 1) * spatial;
            simd::affine(
                &xs[range.clone()],
                mean,
                gamma[ch] * rstd,
                beta[ch],
                op.silu,
                &mut dst[range],
            );
        }
    });
    out
}
