//! Fused scaled dot-product attention over `[B, L, H·D]` projections: on the CPU a tiled
//! kernel with an online softmax in f32 (no `Lq × Lk` score matrix), on CUDA the flash
//! kernel in `cuda/attention.cu`. The reference is [`crate::layers::attention_reference`].

use super::cpu::{cpu_f32, uninit_vec, SendPtr};
use super::cpu_gemm::{gemm, Mat, MatMut};
use super::simd;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};
use gemm::Parallelism;
use rayon::prelude::*;

/// Query rows per CPU task.
const BLOCK_Q: usize = 64;
/// Keys per inner step of the CPU kernel (scores for one block stay in L2).
const BLOCK_K: usize = 256;

/// `softmax(q·kᵀ·scale)·v` per head, no mask.
#[derive(Debug, Clone, Copy)]
pub struct FusedAttention {
    /// Number of heads packed in the last dimension.
    pub heads: usize,
    /// Scale of the scores (1/√D).
    pub scale: f32,
}

/// Sizes of one attention call, checked once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub b: usize,
    pub lq: usize,
    pub lk: usize,
    pub heads: usize,
    pub d: usize,
}

impl FusedAttention {
    pub(crate) fn dims(&self, q: &Layout, k: &Layout, v: &Layout) -> Result<Dims> {
        let (b, lq, inner) = q.shape().dims3()?;
        let (bk, lk, ik) = k.shape().dims3()?;
        let (bv, lv, iv) = v.shape().dims3()?;
        if bk != b || bv != b || lv != lk || ik != inner || iv != inner {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} do not match",
                q.shape(),
                k.shape(),
                v.shape()
            );
        }
        if self.heads == 0 || inner % self.heads != 0 {
            candle_core::bail!(
                "attention: width {inner} is not divisible by {} heads",
                self.heads
            );
        }
        for (name, l) in [("q", q), ("k", k), ("v", v)] {
            if !l.is_contiguous() {
                candle_core::bail!("attention: {name} must be contiguous");
            }
        }
        Ok(Dims {
            b,
            lq,
            lk,
            heads: self.heads,
            d: inner / self.heads,
        })
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "jhakaas-fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims(ql, kl, vl)?;
        let (q, k, v) = (
            cpu_f32(qs, ql, "q")?,
            cpu_f32(ks, kl, "k")?,
            cpu_f32(vs, vl, "v")?,
        );
        let out = attention_cpu(q, k, v, dims, self.scale);
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = self.dims(ql, kl, vl)?;
        super::cuda::attention(qs, ql, ks, kl, vs, vl, dims, self.scale)
    }
}

/// The CPU kernel on contiguous `[B, L, H·D]` f32 slices.
pub(crate) fn attention_cpu(q: &[f32], k: &[f32], v: &[f32], dims: Dims, scale: f32) -> Vec<f32> {
    let Dims {
        b,
        lq,
        lk,
        heads,
        d,
    } = dims;
    let inner = heads * d;
    // Every element is written exactly once below (each task owns a row block of one head).
    let mut out = uninit_vec(b * lq * inner);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let q_blocks = lq.div_ceil(BLOCK_Q);
    (0..b * heads * q_blocks).into_par_iter().for_each_init(
        || Scratch::new(d),
        |scratch, task| {
            let (bh, qb) = (task / q_blocks, task % q_blocks);
            let (bi, h) = (bh / heads, bh % heads);
            let i0 = qb * BLOCK_Q;
            let rows = BLOCK_Q.min(lq - i0);
            let q_at = &q[(bi * lq + i0) * inner + h * d..];
            let k_at = &k[bi * lk * inner + h * d..];
            let v_at = &v[bi * lk * inner + h * d..];
            // SAFETY: rows `i0..i0+rows`, columns `h·D..(h+1)·D` of batch `bi` belong to this
            // task alone.
            let dst = unsafe { out_ptr.get().add((bi * lq + i0) * inner + h * d) };
            unsafe { scratch.run(q_at, k_at, v_at, dst, rows, lk, inner, d, scale) };
        },
    );
    out
}

/// Per-task buffers: one block of scores, the running output, row maxima and sums.
struct Scratch {
    scores: Vec<f32>,
    acc: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
}

impl Scratch {
    fn new(d: usize) -> Self {
        Self {
            scores: vec![0.0; BLOCK_Q * BLOCK_K],
            acc: vec![0.0; BLOCK_Q * d],
            max: vec![0.0; BLOCK_Q],
            sum: vec![0.0; BLOCK_Q],
        }
    }

    /// Online softmax over key blocks for `rows` query rows of one head.
    ///
    /// # Safety
    /// `q`, `k`, `v` hold the rows the strides reach; `dst` is this task's output block.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run(
        &mut self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dst: *mut f32,
        rows: usize,
        lk: usize,
        inner: usize,
        d: usize,
        scale: f32,
    ) {
        let stride = inner as isize;
        self.max[..rows].fill(f32::NEG_INFINITY);
        self.sum[..rows].fill(0.0);
        self.acc[..rows * d].fill(0.0);
        let mut j0 = 0;
        while j0 < lk {
            let cols = BLOCK_K.min(lk - j0);
            let scores = MatMut {
                ptr: self.scores.as_mut_ptr(),
                rs: cols as isize,
                cs: 1,
            };
            // scores = scale · Q_blk · K_blkᵀ
            gemm(
                rows,
                cols,
                d,
                scores,
                false,
                Mat {
                    ptr: q.as_ptr(),
                    rs: stride,
                    cs: 1,
                },
                Mat {
                    ptr: k.as_ptr().add(j0 * inner),
                    rs: 1,
                    cs: stride,
                },
                scale,
                Parallelism::None,
            );
            for r in 0..rows {
                let row = &mut self.scores[r * cols..(r + 1) * cols];
                let mut m = self.max[r];
                simd::max_into(row, &mut m);
                let correction = simd::exp(self.max[r] - m);
                let mut s = 0.0;
                simd::exp_shifted_sum_in_place(row, m, &mut s);
                self.sum[r] = self.sum[r] * correction + s;
                self.max[r] = m;
                if correction != 1.0 {
                    simd::scale_in_place(&mut self.acc[r * d..(r + 1) * d], correction);
                }
            }
            // acc += P · V_blk
            gemm(
                rows,
                d,
                cols,
                MatMut {
                    ptr: self.acc.as_mut_ptr(),
                    rs: d as isize,
                    cs: 1,
                },
                true,
                Mat {
                    ptr: self.scores.as_ptr(),
                    rs: cols as isize,
                    cs: 1,
                },
                Mat {
                    ptr: v.as_ptr().add(j0 * inner),
                    rs: stride,
                    cs: 1,
                },
                1.0,
                Parallelism::None,
            );
            j0 += cols;
        }
        for r in 0..rows {
            let inv = 1.0 / self.sum[r];
            let out = std::slice::from_raw_parts_mut(dst.add(r * inner), d);
            for (o, a) in out.iter_mut().zip(&self.acc[r * d..(r + 1) * d]) {
                *o = a * inv;
            }
        }
    }
}
