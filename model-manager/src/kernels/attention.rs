//! Fused scaled dot-product attention over `[B, L, H·D]` projections (rows may be strided, so
//! q, k and v can be views into one fused projection): on the CPU a tiled kernel with an
//! online softmax in f32 and register-blocked inner products (no `Lq × Lk` score matrix), on
//! CUDA the flash kernel in `cuda/attention.cu`. Optionally causal (the CLIP text encoders).
//! The reference is [`crate::layers::attention_reference`].

use super::cpu::{uninit_vec, SendPtr};
use super::microkernel::{rank1_block, ROWS};
use super::simd;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;

/// Query rows per CPU task.
const BLOCK_Q: usize = 64;
/// Keys per inner step of the CPU kernel (one block of scores stays in L1/L2).
const BLOCK_K: usize = 256;
/// Rows of the register-blocked inner products.
const R: usize = ROWS;

/// `softmax(q·kᵀ·scale [+ causal mask])·v` per head.
#[derive(Debug, Clone, Copy)]
pub struct FusedAttention {
    /// Number of heads packed in the last dimension.
    pub heads: usize,
    /// Scale of the scores (1/√D).
    pub scale: f32,
    /// Query `i` attends to keys `0..=i` only.
    pub causal: bool,
}

/// Sizes and strides of one attention call, checked once.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    /// Batch.
    pub b: usize,
    /// Query rows.
    pub lq: usize,
    /// Key (and value) rows.
    pub lk: usize,
    /// Heads packed in the last dimension.
    pub heads: usize,
    /// Head width.
    pub d: usize,
    /// (batch stride, row stride, start offset) of q, k and v, in elements.
    pub q: (usize, usize, usize),
    pub k: (usize, usize, usize),
    pub v: (usize, usize, usize),
}

/// Batch and row strides of a `[B, L, W]` layout whose rows are contiguous.
fn row_strides(name: &str, l: &Layout) -> Result<(usize, usize, usize)> {
    let s = l.stride();
    let (_, rows, w) = l.shape().dims3()?;
    if s[2] != 1 && w > 1 {
        candle_core::bail!("attention: {name} needs contiguous rows, got strides {s:?}");
    }
    let rs = if rows > 1 { s[1] } else { w };
    Ok((s[0], rs, l.start_offset()))
}

impl FusedAttention {
    /// Checks q, k and v's layouts and returns the call's sizes and strides.
    pub fn dims(&self, q: &Layout, k: &Layout, v: &Layout) -> Result<Dims> {
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
        if self.heads == 0 || !inner.is_multiple_of(self.heads) {
            candle_core::bail!(
                "attention: width {inner} is not divisible by {} heads",
                self.heads
            );
        }
        if self.causal && lq != lk {
            candle_core::bail!("attention: a causal mask needs as many queries as keys");
        }
        Ok(Dims {
            b,
            lq,
            lk,
            heads: self.heads,
            d: inner / self.heads,
            q: row_strides("q", q)?,
            k: row_strides("k", k)?,
            v: row_strides("v", v)?,
        })
    }
}

fn f32_storage<'a>(s: &'a CpuStorage, name: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        other => candle_core::bail!("attention: {name} must be f32, got {:?}", other.dtype()),
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
            f32_storage(qs, "q")?,
            f32_storage(ks, "k")?,
            f32_storage(vs, "v")?,
        );
        let out = attention_cpu(q, k, v, dims, self.scale, self.causal);
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
        if self.causal {
            candle_core::bail!("attention: the CUDA kernel has no causal mask");
        }
        let dims = self.dims(ql, kl, vl)?;
        super::cuda::attention(qs, ks, vs, ql.shape(), dims, self.scale)
    }
}

/// Width `n` rounded up to whole 16-lane vectors (scores: keys).
fn padded(n: usize) -> usize {
    n.div_ceil(16) * 16
}

/// Head width rounded up to whole 8-lane vectors (values and the running output).
fn padded_head(d: usize) -> usize {
    d.div_ceil(8) * 8
}

/// Row stride of the transposed keys: `lk` padded, plus one vector so that rows are not a
/// power of two apart (which would map every row to the same L1 set).
fn key_stride(lk: usize) -> usize {
    padded(lk) + 16
}

/// Every head's keys transposed (`[B·H][D][key_stride(Lk)]`) and values padded (`[B·H][Lk][D
/// padded]`), zero in the padding, so the inner products read whole vectors.
fn pack_keys_values(k: &[f32], v: &[f32], dims: Dims) -> (Vec<f32>, Vec<f32>) {
    let Dims {
        b, lk, heads, d, ..
    } = dims;
    let (lkp, dp) = (key_stride(lk), padded_head(d));
    let mut kt = vec![0f32; b * heads * d * lkp];
    let mut vp = vec![0f32; b * heads * lk * dp];
    kt.par_chunks_mut(d * lkp)
        .zip(vp.par_chunks_mut(lk * dp))
        .enumerate()
        .for_each(|(bh, (kt, vp))| {
            let (bi, h) = (bh / heads, bh % heads);
            for j in 0..lk {
                let krow = &k[dims.k.2 + bi * dims.k.0 + j * dims.k.1 + h * d..][..d];
                for (c, &x) in krow.iter().enumerate() {
                    kt[c * lkp + j] = x;
                }
                let vrow = &v[dims.v.2 + bi * dims.v.0 + j * dims.v.1 + h * d..][..d];
                vp[j * dp..j * dp + d].copy_from_slice(vrow);
            }
        });
    (kt, vp)
}

/// The CPU kernel; returns a contiguous `[B, Lq, H·D]`.
pub(crate) fn attention_cpu(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: Dims,
    scale: f32,
    causal: bool,
) -> Vec<f32> {
    let Dims {
        b,
        lq,
        lk,
        heads,
        d,
        ..
    } = dims;
    let inner = heads * d;
    let (kt, vp) = pack_keys_values(k, v, dims);
    // Every element is written exactly once below (each task owns a row block of one head).
    let mut out = uninit_vec::<f32>(b * lq * inner);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let q_blocks = lq.div_ceil(BLOCK_Q);
    (0..b * heads * q_blocks).into_par_iter().for_each_init(
        || Scratch::new(d),
        |scratch, task| {
            let (bh, qb) = (task / q_blocks, task % q_blocks);
            let (bi, h) = (bh / heads, bh % heads);
            let i0 = qb * BLOCK_Q;
            let rows = BLOCK_Q.min(lq - i0);
            let head = Head {
                kt: &kt[bh * d * key_stride(lk)..(bh + 1) * d * key_stride(lk)],
                vp: &vp[bh * lk * padded_head(d)..(bh + 1) * lk * padded_head(d)],
                lk,
                d,
            };
            scratch.load_queries(q, dims, bi, h, i0, rows, scale);
            scratch.run(&head, rows, i0, causal);
            // SAFETY: rows `i0..i0+rows`, columns `h·D..(h+1)·D` of batch `bi` belong to this
            // task alone.
            unsafe {
                scratch.store(
                    out_ptr.get().add((bi * lq + i0) * inner + h * d),
                    inner,
                    rows,
                )
            };
        },
    );
    out
}

/// One head's packed keys and values.
struct Head<'a> {
    kt: &'a [f32],
    vp: &'a [f32],
    lk: usize,
    d: usize,
}

/// Per-task buffers: the query block, one block of scores, the running output, row maxima
/// and sums.
struct Scratch {
    d: usize,
    q: Vec<f32>,
    scores: Vec<f32>,
    acc: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
}

impl Scratch {
    fn new(d: usize) -> Self {
        Self {
            d,
            q: vec![0.0; BLOCK_Q.next_multiple_of(R) * d],
            scores: vec![0.0; BLOCK_Q.next_multiple_of(R) * BLOCK_K],
            acc: vec![0.0; BLOCK_Q.next_multiple_of(R) * padded_head(d)],
            max: vec![0.0; BLOCK_Q],
            sum: vec![0.0; BLOCK_Q],
        }
    }

    /// Copies query rows `i0..i0+rows` of head `h`, times `scale` (so the scores come out
    /// scaled), zero rows up to a multiple of `R`.
    #[allow(clippy::too_many_arguments)]
    fn load_queries(
        &mut self,
        q: &[f32],
        dims: Dims,
        bi: usize,
        h: usize,
        i0: usize,
        rows: usize,
        scale: f32,
    ) {
        let d = dims.d;
        for r in 0..rows.next_multiple_of(R) {
            let dst = &mut self.q[r * d..(r + 1) * d];
            if r < rows {
                let at = dims.q.2 + bi * dims.q.0 + (i0 + r) * dims.q.1 + h * d;
                for (o, x) in dst.iter_mut().zip(&q[at..at + d]) {
                    *o = x * scale;
                }
            } else {
                dst.fill(0.0);
            }
        }
    }

    /// Online softmax over the key blocks for `rows` query rows (global index `i0 + r`).
    fn run(&mut self, head: &Head, rows: usize, i0: usize, causal: bool) {
        let (d, dp, lkp) = (head.d, padded_head(head.d), key_stride(head.lk));
        let rows_r = rows.next_multiple_of(R);
        self.max[..rows].fill(f32::NEG_INFINITY);
        self.sum[..rows].fill(0.0);
        self.acc[..rows_r * dp].fill(0.0);
        // Causal: no key beyond the block's last query.
        let lk = if causal {
            head.lk.min(i0 + rows)
        } else {
            head.lk
        };
        let mut j0 = 0;
        while j0 < lk {
            let cols = BLOCK_K.min(lk - j0);
            let cols_p = padded(cols);
            // scores = Q_blk · Kᵀ_blk
            rank1_block(
                &self.q,
                d,
                &head.kt[j0..],
                lkp,
                d,
                rows_r,
                cols_p,
                &mut self.scores,
                cols_p,
                false,
            );
            for r in 0..rows {
                let row = &mut self.scores[r * cols_p..r * cols_p + cols];
                // Keys past the query (causal) take no weight.
                let valid = if causal {
                    (i0 + r + 1).saturating_sub(j0).min(cols)
                } else {
                    cols
                };
                let mut m = self.max[r];
                simd::max_into(&row[..valid], &mut m);
                let correction = simd::exp(self.max[r] - m);
                let mut s = 0.0;
                simd::exp_shifted_sum_in_place(&mut row[..valid], m, &mut s);
                row[valid..].fill(0.0);
                self.sum[r] = self.sum[r] * correction + s;
                self.max[r] = m;
                if correction != 1.0 {
                    simd::scale_in_place(&mut self.acc[r * dp..(r + 1) * dp], correction);
                }
            }
            // Padding columns and rows of the block contribute nothing.
            for r in 0..rows_r {
                let start = if r < rows {
                    r * cols_p + cols
                } else {
                    r * cols_p
                };
                self.scores[start..(r + 1) * cols_p].fill(0.0);
            }
            // acc += P · V_blk
            rank1_block(
                &self.scores,
                cols_p,
                &head.vp[j0 * dp..],
                dp,
                cols,
                rows_r,
                dp,
                &mut self.acc,
                dp,
                true,
            );
            j0 += cols;
        }
    }

    /// Writes the normalised rows to `dst` (row stride `inner`).
    ///
    /// # Safety
    /// `dst` points at this task's output block: `rows` rows of `d` values, `inner` apart.
    unsafe fn store(&self, dst: *mut f32, inner: usize, rows: usize) {
        let (d, dp) = (self.d, padded_head(self.d));
        for r in 0..rows {
            let inv = 1.0 / self.sum[r];
            let out = std::slice::from_raw_parts_mut(dst.add(r * inner), d);
            for (o, a) in out.iter_mut().zip(&self.acc[r * dp..r * dp + d]) {
                *o = a * inv;
            }
        }
    }
}
