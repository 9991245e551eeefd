//! Fused GEGLU: `[…, 2·N] → […, N]`, the first half times the exact (erf) GELU of the second,
//! in one pass instead of chunk, GELU and multiply. CPU kernel here, CUDA kernel in
//! `cuda/geglu.cu`; the reference is [`crate::layers::geglu_reference`].

use super::cpu::{cpu_f32, uninit_vec, SendPtr};
use super::simd;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};
use rayon::prelude::*;

/// `value · gelu_erf(gate)` where `[value, gate]` are the halves of the last dimension.
#[derive(Debug, Clone, Copy)]
pub struct FusedGeglu;

/// Rows and output width of one call, checked once.
pub(crate) fn dims(l: &Layout) -> Result<(usize, usize, Shape)> {
    let dims = l.shape().dims();
    let last = *dims.last().unwrap_or(&0);
    if !last.is_multiple_of(2) || !l.is_contiguous() {
        candle_core::bail!(
            "geglu: needs a contiguous input with an even last dimension, got {dims:?}"
        );
    }
    let mut out = dims.to_vec();
    *out.last_mut().unwrap() = last / 2;
    Ok((
        l.shape().elem_count() / last.max(1),
        last / 2,
        Shape::from(out),
    ))
}

impl CustomOp1 for FusedGeglu {
    fn name(&self) -> &'static str {
        "jhakaas-fused-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, n, shape) = dims(l)?;
        let x = cpu_f32(s, l, "geglu input")?;
        // Every element is written once: each task owns whole output rows.
        let mut out = uninit_vec::<f32>(rows * n);
        let ptr = SendPtr(out.as_mut_ptr());
        let rows_per_task = (16384 / n.max(1)).max(1);
        (0..rows.div_ceil(rows_per_task))
            .into_par_iter()
            .for_each(|t| {
                let r0 = t * rows_per_task;
                for r in r0..(r0 + rows_per_task).min(rows) {
                    let row = &x[r * 2 * n..(r + 1) * 2 * n];
                    // SAFETY: output row `r` belongs to this task alone.
                    let dst = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(r * n), n) };
                    simd::geglu(&row[..n], &row[n..], dst);
                }
            });
        Ok((CpuStorage::F32(out), shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, n, shape) = dims(l)?;
        super::cuda::geglu(s, l, rows, n, shape)
    }
}
