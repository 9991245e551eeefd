//! A linear layer on the CPU: `x · Wᵀ + bias (+ residual)` as one gemm on the weight held
//! transposed (`[in, out]`, which the gemm reads without repacking; f32, or f16 widened in
//! blocks), accumulating into an output
//! that starts as the bias (and the residual, fused). The reference is the candle matmul plus
//! the adds ([`crate::layers::Linear`]).

use super::cpu::{cpu_f32, uninit_vec, with_values};
use super::cpu_gemm::{parallelism, Mat, MatMut};
use super::held::{gemm_weight_rhs, weight};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `x · Wᵀ + bias + residual` over the last dimension of `x`; the op's second input is `Wᵀ`.
#[derive(Debug, Clone)]
pub struct FusedLinear {
    /// `[out]`, optional.
    pub bias: Option<Tensor>,
    /// A tensor of the output's shape added to it, optional.
    pub residual: Option<Tensor>,
}

impl CustomOp2 for FusedLinear {
    fn name(&self) -> &'static str {
        "jhakaas-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (in_dim, out_dim) = wl.shape().dims2()?;
        let dims = xl.shape().dims();
        if dims.last() != Some(&in_dim) {
            candle_core::bail!("linear: input {:?} does not end in {in_dim}", xl.shape());
        }
        let x = cpu_f32(xs, xl, "linear input")?;
        let w = weight(ws, wl, "linear weight")?;
        let rows = x.len() / in_dim.max(1);
        let mut shape = dims.to_vec();
        *shape.last_mut().unwrap() = out_dim;
        // Every element is written below before the gemm accumulates into it.
        let mut out = uninit_vec(rows * out_dim);
        let fill = |bias: Option<&[f32]>, out: &mut [f32]| -> Result<()> {
            let init = |res: Option<&[f32]>, out: &mut [f32]| {
                out.par_chunks_mut(out_dim)
                    .enumerate()
                    .for_each(|(r, dst)| match (bias, res) {
                        (Some(b), Some(res)) => {
                            let res = &res[r * out_dim..(r + 1) * out_dim];
                            for ((d, b), s) in dst.iter_mut().zip(b).zip(res) {
                                *d = b + s;
                            }
                        }
                        (Some(b), None) => dst.copy_from_slice(b),
                        (None, Some(res)) => {
                            dst.copy_from_slice(&res[r * out_dim..(r + 1) * out_dim])
                        }
                        (None, None) => dst.fill(0.0),
                    });
            };
            match &self.residual {
                Some(t) => {
                    with_values(t, "linear residual", rows * out_dim, |r| init(Some(r), out))?
                }
                None => init(None, out),
            }
            Ok(())
        };
        match &self.bias {
            Some(t) => with_values(t, "linear bias", out_dim, |b| fill(Some(b), &mut out))??,
            None => fill(None, &mut out)?,
        }
        // SAFETY: `x` is rows×in, `w` in×out, `out` rows×out and initialised.
        unsafe {
            gemm_weight_rhs(
                rows,
                out_dim,
                in_dim,
                MatMut {
                    ptr: out.as_mut_ptr(),
                    rs: out_dim as isize,
                    cs: 1,
                },
                true,
                Mat {
                    ptr: x.as_ptr(),
                    rs: in_dim as isize,
                    cs: 1,
                },
                w,
                parallelism(),
            );
        }
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}
