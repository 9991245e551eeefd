//! Weights as the CPU kernels hold them. By default ([`CpuWeights::F16`], the CLI's
//! `--cpu-weights f16`) a linear or conv weight whose values are all exactly f16 (a model
//! shipped as `*.fp16.safetensors`, which `fetch` prefers) stays in f16, read from the file
//! straight into the buffer it is held in; `--cpu-weights f32` upcasts it at load. The math
//! stays f32: an f16 weight is widened block by block right before the gemm reads it, so the
//! images are those of the upcast weights while the resident weights (and the bytes a load
//! writes) are halved; the widening pass costs compute-bound gemms ~5% and the
//! weight-streaming ones nothing (they read half the bytes;
//! `benches/results/2026-12-01-cpu-fp16-files/`). Weights f16 cannot hold exactly (an f32
//! checkpoint, a LoRA merge) stay f32 either way.

use super::cpu::uninit_vec;
use super::cpu_gemm::{gemm, Mat, MatMut};
use super::{path, Path};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, Tensor};
use gemm::Parallelism;
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// Elements of one widened f16 block (16 MiB of f32). Smaller blocks that stay in L2 were
/// slower: the gemm's per-call cost outweighed the cache misses (`jhakaas-kernels`).
const BLOCK_ELEMS: usize = 4 << 20;

/// The widest block of columns a right-hand weight is widened in.
const MAX_BLOCK_COLS: usize = 1024;

/// How the CPU kernels hold weights that a model file stores in f16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuWeights {
    /// Upcast to f32 at load.
    F32,
    /// Kept in f16 where lossless and widened as used (half the memory and load; the default).
    #[default]
    F16,
}

impl std::str::FromStr for CpuWeights {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            other => Err(crate::Error::invalid(
                "cpu-weights",
                format!("`{other}` is not one of f32, f16"),
            )),
        }
    }
}

/// Whether [`CpuWeights::F16`] is chosen (the default).
static HALF: AtomicBool = AtomicBool::new(true);

/// Sets how the CPU kernels hold f16 weights, process-wide (the CLI's `--cpu-weights`); models
/// loaded afterwards follow it.
pub fn set_cpu_weights(choice: CpuWeights) {
    HALF.store(choice == CpuWeights::F16, Ordering::Relaxed);
}

/// The process-wide [`CpuWeights`].
pub fn cpu_weights() -> CpuWeights {
    if HALF.load(Ordering::Relaxed) {
        CpuWeights::F16
    } else {
        CpuWeights::F32
    }
}

thread_local! {
    /// Set while [`in_f32`] builds a model on this thread.
    static FORCE_F32: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `build` with every weight it holds in f32, whatever [`cpu_weights`] says (a model
/// whose layers are faster in f32 than the memory is worth).
pub fn in_f32<R>(build: impl FnOnce() -> R) -> R {
    /// Restores the flag even if `build` panics.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCE_F32.with(|f| f.set(self.0));
        }
    }
    let _restore = Restore(FORCE_F32.with(|f| f.replace(true)));
    build()
}

/// Whether weights built now on this thread for `device` are held in f16 where lossless: the
/// one owner of that rule ([`hold`], [`get_weight`] and the cache's byte estimate ask it).
pub fn holds_f16(device: &candle_core::Device) -> bool {
    !FORCE_F32.with(|f| f.get())
        && cpu_weights() == CpuWeights::F16
        && path(device, DType::F32) == Path::Cpu
}

/// `t` as the CPU kernels keep it: with [`CpuWeights::F16`] (outside [`in_f32`]), in f16 when
/// that loses nothing and our CPU kernels run on it; otherwise unchanged.
pub fn hold(t: Tensor) -> Result<Tensor> {
    if !holds_f16(t.device()) {
        return Ok(t);
    }
    hold_as(CpuWeights::F16, t)
}

/// [`hold`] for an explicit choice (tests and benchmarks compare both side by side).
pub fn hold_as(choice: CpuWeights, t: Tensor) -> Result<Tensor> {
    if choice == CpuWeights::F32
        || t.dtype() != DType::F32
        || path(t.device(), DType::F32) != Path::Cpu
    {
        return Ok(t);
    }
    let half = {
        let (storage, layout) = t.storage_and_layout();
        let candle_core::Storage::Cpu(s) = &*storage else {
            return Ok(t.clone());
        };
        match weight(s, layout, "weight") {
            Ok(Weight::F32(v)) => narrow_exact(v),
            _ => None,
        }
    };
    match half {
        Some(half) => Tensor::from_vec(half, t.shape(), t.device()),
        None => Ok(t),
    }
}

thread_local! {
    /// Set while [`get_weight`] reads a weight that may stay f16 as stored.
    static STORED_F16_WANTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Reads the linear or conv weight `name` of `vb`. Where [`holds_f16`], a tensor the file
/// stores in f16 comes back in f16 as stored (read straight into the held buffer, no widening
/// and narrowing back); otherwise it comes back in `vb`'s dtype. Pass the result to [`hold`].
pub fn get_weight(
    vb: &candle_nn::VarBuilder,
    shape: impl Into<candle_core::Shape>,
    name: &str,
) -> Result<Tensor> {
    if vb.dtype() != DType::F32 || !holds_f16(vb.device()) {
        return vb.get(shape, name);
    }
    /// Clears the request even if the read panics.
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            STORED_F16_WANTED.with(|f| f.set(false));
        }
    }
    STORED_F16_WANTED.with(|f| f.set(true));
    let _clear = Clear;
    vb.get(shape, name)
}

/// For weight backends: whether the f32 tensor being read may be returned in f16 when the file
/// stores it so ([`get_weight`] is reading a weight that will be held in f16).
pub fn stored_f16_wanted() -> bool {
    STORED_F16_WANTED.with(|f| f.get())
}

/// `v` in f16 if every value survives the round trip, in parallel SIMD passes (narrow, then
/// widen back and compare bits); `None` at the first value that does not. The first block is
/// checked before anything is allocated: an f32 checkpoint's weights fail there, at no cost.
fn narrow_exact(v: &[f32]) -> Option<Vec<f16>> {
    const CHUNK: usize = 1 << 12;
    /// Narrows `src` into `dst`; whether every value came back bit for bit.
    fn narrowed_exactly(src: &[f32], dst: &mut [f16]) -> bool {
        dst.convert_from_f32_slice(src);
        let mut back = [0f32; CHUNK];
        let back = &mut back[..src.len()];
        widen_slice(dst, back);
        back.iter()
            .zip(src)
            .all(|(b, s)| b.to_bits() == s.to_bits())
    }
    let head = &v[..v.len().min(CHUNK)];
    if !narrowed_exactly(head, &mut [f16::ZERO; CHUNK][..head.len()]) {
        return None;
    }
    // Every element is written: the chunks of `half` and `v` pair up one to one.
    let mut half = uninit_vec::<f16>(v.len());
    let exact = half
        .par_chunks_mut(CHUNK)
        .zip(v.par_chunks(CHUNK))
        .all(|(dst, src)| narrowed_exactly(src, dst));
    exact.then_some(half)
}

/// `v` widened to f32 in parallel: how an f16 file is read for an f32 model on the CPU
/// (candle's own conversion runs on one core).
pub fn widen(v: &[f16]) -> Vec<f32> {
    // Every element is written: the chunks of `out` and `v` pair up one to one.
    let mut out = uninit_vec(v.len());
    out.par_chunks_mut(1 << 14)
        .zip(v.par_chunks(1 << 14))
        .for_each(|(dst, src)| widen_slice(src, dst));
    out
}

/// A contiguous weight as held: f32, or f16 widened before use.
#[derive(Debug, Clone, Copy)]
pub enum Weight<'a> {
    /// Used as it is.
    F32(&'a [f32]),
    /// Widened to f32 block by block.
    F16(&'a [f16]),
}

impl Weight<'_> {
    /// `dst[i] = self[start + i]` as f32.
    pub fn widen_into(&self, start: usize, dst: &mut [f32]) {
        match self {
            Weight::F32(w) => dst.copy_from_slice(&w[start..start + dst.len()]),
            Weight::F16(w) => widen_slice(&w[start..start + dst.len()], dst),
        }
    }
}

/// `dst = src` widened to f32, 16 (AVX-512) or 8 (F16C) values per instruction.
fn widen_slice(src: &[f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    {
        use super::simd::{isa, Isa};
        if isa() == Isa::Avx512 {
            // SAFETY: AVX-512F detected; equal lengths checked above.
            return unsafe { x86::widen_avx512(src, dst) };
        }
        if std::is_x86_feature_detected!("f16c") && std::is_x86_feature_detected!("avx") {
            // SAFETY: F16C and AVX detected; equal lengths checked above.
            return unsafe { x86::widen_f16c(src, dst) };
        }
    }
    src.convert_to_f32_slice(dst)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512F must be available; `src` and `dst` have the same length.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn widen_avx512(src: &[f16], dst: &mut [f32]) {
        let n = src.len();
        let mut i = 0;
        while i + 16 <= n {
            let h = _mm256_loadu_si256(src.as_ptr().add(i).cast());
            _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
            i += 16;
        }
        for j in i..n {
            dst[j] = src[j].to_f32();
        }
    }

    /// # Safety
    /// F16C and AVX must be available; `src` and `dst` have the same length.
    #[target_feature(enable = "avx,f16c")]
    pub unsafe fn widen_f16c(src: &[f16], dst: &mut [f32]) {
        let n = src.len();
        let mut i = 0;
        while i + 8 <= n {
            let h = _mm_loadu_si128(src.as_ptr().add(i).cast());
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            i += 8;
        }
        for j in i..n {
            dst[j] = src[j].to_f32();
        }
    }
}

/// The contiguous values of a weight's storage, f32 or f16.
pub fn weight<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<Weight<'a>> {
    if !l.is_contiguous() {
        candle_core::bail!("{what} must be contiguous");
    }
    let range = l.start_offset()..l.start_offset() + l.shape().elem_count();
    match s {
        CpuStorage::F32(v) => Ok(Weight::F32(&v[range])),
        CpuStorage::F16(v) => Ok(Weight::F16(&v[range])),
        other => candle_core::bail!("{what}: held in {:?}, not f32 or f16", other.dtype()),
    }
}

/// Widens rows `r0..r1`, columns `c0..c1` of the row-major `cols`-wide weight `w` into `dst`
/// (`c1 - c0` wide), rows in parallel.
fn widen_block(
    w: Weight,
    cols: usize,
    (r0, r1): (usize, usize),
    (c0, c1): (usize, usize),
    dst: &mut [f32],
    parallel: bool,
) {
    let width = c1 - c0;
    let dst = &mut dst[..(r1 - r0) * width];
    if parallel {
        dst.par_chunks_mut(width)
            .with_min_len(16)
            .enumerate()
            .for_each(|(i, row)| w.widen_into((r0 + i) * cols + c0, row));
    } else {
        for (i, row) in dst.chunks_mut(width).enumerate() {
            w.widen_into((r0 + i) * cols + c0, row);
        }
    }
}

/// How the blocks of one f16 gemm are spread over the threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spread {
    /// One block at a time, each widened in parallel, each gemm using every thread: the
    /// compute-bound shapes.
    WithinGemms,
    /// The output blocks (disjoint parts of the output) in parallel, each a chain of small
    /// single-threaded gemms on L2-sized blocks: the shapes that stream the weight once
    /// (few output rows or columns), where a per-gemm thread hand-off per block costs more
    /// than the block's arithmetic.
    AcrossBlocks,
}

/// The output's extent along the weight's non-depth side at or below which a gemm streams the
/// weight (output rows for a right-hand weight, columns for a left-hand one).
const STREAMED: usize = 256;

/// Elements of one widened block in [`Spread::AcrossBlocks`] (1 MiB of f32, in L2).
const L2_BLOCK_ELEMS: usize = 256 << 10;

/// `(output blocks, depth block)` sizes for [`Spread::AcrossBlocks`] over `outer` output
/// rows/columns of the weight and `depth` of it: at least four output blocks per thread.
fn across_blocks(outer: usize, depth: usize) -> (usize, usize) {
    let threads = rayon::current_num_threads().max(1);
    let ob = split(outer, outer.div_ceil(4 * threads).max(16));
    (ob, split(depth, (L2_BLOCK_ELEMS / ob).max(64)))
}

/// Raw output and input views that may cross into rayon tasks writing disjoint output blocks.
#[derive(Clone, Copy)]
struct Views(MatMut, Mat);
// SAFETY: tasks write disjoint output blocks and only read the input.
unsafe impl Send for Views {}
unsafe impl Sync for Views {}

impl Views {
    /// The views (a method, so closures capture the whole `Views`).
    fn get(&self) -> (MatMut, Mat) {
        (self.0, self.1)
    }
}

/// Widens the row-major `rows × cols` f16 weight `w` in `rb × cb` blocks and hands each to
/// `f(block, r0, c0, rw, cw)` (the block is `cw` wide). The blocks along the gemm's depth —
/// rows when `depth_is_rows`, else columns — run innermost, so each output block sees its
/// first depth block before the others accumulate into it.
fn for_each_block(
    w: Weight,
    (rows, cols): (usize, usize),
    (rb, cb): (usize, usize),
    depth_is_rows: bool,
    spread: Spread,
    f: impl Fn(&[f32], usize, usize, usize, usize) + Sync,
) {
    let (outer, inner) = if depth_is_rows {
        ((cols, cb), (rows, rb))
    } else {
        ((rows, rb), (cols, cb))
    };
    let parallel = spread == Spread::WithinGemms;
    let chain = |o0: usize, block: &mut [f32]| {
        for i0 in (0..inner.0).step_by(inner.1) {
            let (r0, c0) = if depth_is_rows { (i0, o0) } else { (o0, i0) };
            let (rw, cw) = (rb.min(rows - r0), cb.min(cols - c0));
            widen_block(w, cols, (r0, r0 + rw), (c0, c0 + cw), block, parallel);
            f(&block[..rw * cw], r0, c0, rw, cw);
        }
    };
    match spread {
        Spread::WithinGemms => {
            // Written by `widen_block` before `f` reads it.
            let mut block = uninit_vec(rb * cb);
            for o0 in (0..outer.0).step_by(outer.1) {
                chain(o0, &mut block);
            }
        }
        Spread::AcrossBlocks => (0..outer.0.div_ceil(outer.1))
            .into_par_iter()
            .for_each(|ob| {
                // Written by `widen_block` before `f` reads it.
                let mut block = uninit_vec(rb * cb);
                chain(ob * outer.1, &mut block);
            }),
    }
}

/// `w` as a row-major f32 matrix `cols` wide, if it is held in f32.
fn as_f32(w: Weight, cols: usize) -> Option<Mat> {
    match w {
        Weight::F32(v) => Some(Mat {
            ptr: v.as_ptr(),
            rs: cols as isize,
            cs: 1,
        }),
        Weight::F16(_) => None,
    }
}

/// `dst (m×n) = [dst +] lhs (m×k) · w (k×n)` where `w` is a row-major weight.
///
/// # Safety
/// As [`gemm`]: every element the strides reach must be valid, `dst` writable and unaliased.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_weight_rhs(
    m: usize,
    n: usize,
    k: usize,
    dst: MatMut,
    accumulate: bool,
    lhs: Mat,
    w: Weight,
    par: Parallelism,
) {
    gemm_weight_rhs_in(m, n, k, dst, accumulate, lhs, w, par, None)
}

/// [`gemm_weight_rhs`]; `within` forces [`Spread::WithinGemms`] with blocks of about that many
/// elements (tests), `None` picks the spread from the shape.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_weight_rhs_in(
    m: usize,
    n: usize,
    k: usize,
    dst: MatMut,
    accumulate: bool,
    lhs: Mat,
    w: Weight,
    par: Parallelism,
    within: Option<usize>,
) {
    if let Some(rhs) = as_f32(w, n) {
        return gemm(m, n, k, dst, accumulate, lhs, rhs, 1.0, par);
    }
    let (spread, nc, kc, par) = if m <= STREAMED && within.is_none() {
        let (nc, kc) = across_blocks(n, k);
        (Spread::AcrossBlocks, nc, kc, Parallelism::None)
    } else {
        let block_elems = within.unwrap_or(BLOCK_ELEMS);
        let nc = n.min(MAX_BLOCK_COLS);
        let kc = split(k, (block_elems / nc).max(64));
        (Spread::WithinGemms, nc, kc, par)
    };
    let views = Views(dst, lhs);
    for_each_block(
        w,
        (k, n),
        (kc, nc),
        true,
        spread,
        |block, k0, n0, kw, nw| {
            let (dst, lhs) = views.get();
            let dst = MatMut {
                ptr: dst.ptr.offset(n0 as isize * dst.cs),
                ..dst
            };
            let lhs = Mat {
                ptr: lhs.ptr.offset(k0 as isize * lhs.cs),
                ..lhs
            };
            let rhs = Mat {
                ptr: block.as_ptr(),
                rs: nw as isize,
                cs: 1,
            };
            gemm(m, nw, kw, dst, accumulate || k0 > 0, lhs, rhs, 1.0, par);
        },
    );
}

/// `dst (m×n) = [dst +] w (m×k) · rhs (k×n)` where `w` is a row-major weight.
///
/// # Safety
/// As [`gemm`]: every element the strides reach must be valid, `dst` writable and unaliased.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_weight_lhs(
    m: usize,
    n: usize,
    k: usize,
    dst: MatMut,
    accumulate: bool,
    w: Weight,
    rhs: Mat,
    par: Parallelism,
) {
    gemm_weight_lhs_in(m, n, k, dst, accumulate, w, rhs, par, None)
}

/// [`gemm_weight_lhs`]; `within` forces [`Spread::WithinGemms`] with blocks of about that many
/// elements (tests), `None` picks the spread from the shape.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_weight_lhs_in(
    m: usize,
    n: usize,
    k: usize,
    dst: MatMut,
    accumulate: bool,
    w: Weight,
    rhs: Mat,
    par: Parallelism,
    within: Option<usize>,
) {
    if let Some(lhs) = as_f32(w, k) {
        return gemm(m, n, k, dst, accumulate, lhs, rhs, 1.0, par);
    }
    // Every row of the weight in one block where it fits, so `rhs` is packed once per k-block.
    let (spread, mc, kc, par) = if n <= STREAMED && within.is_none() {
        let (mc, kc) = across_blocks(m, k);
        (Spread::AcrossBlocks, mc, kc, Parallelism::None)
    } else {
        let block_elems = within.unwrap_or(BLOCK_ELEMS);
        let kc = split(k, (block_elems / m.max(1)).max(64));
        (
            Spread::WithinGemms,
            split(m, (block_elems / kc).max(1)),
            kc,
            par,
        )
    };
    let views = Views(dst, rhs);
    for_each_block(
        w,
        (m, k),
        (mc, kc),
        false,
        spread,
        |block, m0, k0, mw, kw| {
            let (dst, rhs) = views.get();
            let dst = MatMut {
                ptr: dst.ptr.offset(m0 as isize * dst.rs),
                ..dst
            };
            let lhs = Mat {
                ptr: block.as_ptr(),
                rs: kw as isize,
                cs: 1,
            };
            let rhs = Mat {
                ptr: rhs.ptr.offset(k0 as isize * rhs.rs),
                ..rhs
            };
            gemm(mw, n, kw, dst, accumulate || k0 > 0, lhs, rhs, 1.0, par);
        },
    );
}

/// The largest block size `≤ max` that splits `len` into equal-ish blocks (a last block of a
/// few elements would waste a gemm call).
fn split(len: usize, max: usize) -> usize {
    let blocks = len.div_ceil(max.max(1)).max(1);
    len.div_ceil(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    fn as_f16(v: &[f32]) -> Vec<f16> {
        v.iter().map(|&x| f16::from_f32(x)).collect()
    }

    fn reference(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c0: &[f32]) -> Vec<f32> {
        let mut c = c0.to_vec();
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    s += a[i * k + p] as f64 * b[p * n + j] as f64;
                }
                c[i * n + j] += s as f32;
            }
        }
        c
    }

    /// Both f16 gemms against the f64 product of the widened weight, as the shape picks the
    /// spread (streamed shapes: blocks across threads) and forced within gemms with small
    /// blocks, so every path takes several row, column and depth blocks (of unequal size).
    #[test]
    fn f16_weight_gemms_match_the_widened_product() {
        let shapes = [
            (3, 5, 7),
            (77, 1500, 300),
            (1300, 9, 700),
            (40, 2100, 130),
            (4, 64, 40000),
            (64, 4, 40000),
        ];
        let cases = shapes.iter().flat_map(|&s| [(s, None), (s, Some(5000))]);
        for ((m, n, k), block) in cases {
            let a = values(m * k, 1);
            let b = values(k * n, 2);
            let c0 = values(m * n, 3);
            // The weight side rounded to f16, as a held weight is.
            let b16 = as_f16(&b);
            let b_wide: Vec<f32> = b16.iter().map(|x| x.to_f32()).collect();
            let want = reference(m, n, k, &a, &b_wide, &c0);
            let mut got = c0.clone();
            unsafe {
                gemm_weight_rhs_in(
                    m,
                    n,
                    k,
                    MatMut {
                        ptr: got.as_mut_ptr(),
                        rs: n as isize,
                        cs: 1,
                    },
                    true,
                    Mat {
                        ptr: a.as_ptr(),
                        rs: k as isize,
                        cs: 1,
                    },
                    Weight::F16(&b16),
                    Parallelism::Rayon(2),
                    block,
                )
            };
            let err = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-3, "rhs {m}×{n}×{k} ({block:?}): max error {err}");

            let a16 = as_f16(&a);
            let a_wide: Vec<f32> = a16.iter().map(|x| x.to_f32()).collect();
            let want = reference(m, n, k, &a_wide, &b, &vec![0.0; m * n]);
            let mut got = vec![f32::NAN; m * n];
            unsafe {
                gemm_weight_lhs_in(
                    m,
                    n,
                    k,
                    MatMut {
                        ptr: got.as_mut_ptr(),
                        rs: n as isize,
                        cs: 1,
                    },
                    false,
                    Weight::F16(&a16),
                    Mat {
                        ptr: b.as_ptr(),
                        rs: n as isize,
                        cs: 1,
                    },
                    Parallelism::Rayon(2),
                    block,
                )
            };
            let err = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-3, "lhs {m}×{n}×{k} ({block:?}): max error {err}");
        }
    }

    #[test]
    fn only_weights_that_are_exactly_f16_are_held_in_f16() {
        let dev = Device::Cpu;
        let exact: Vec<f32> = as_f16(&values(4096, 5))
            .iter()
            .map(|x| x.to_f32())
            .collect();
        let exact_t = Tensor::from_vec(exact.clone(), (64, 64), &dev).unwrap();
        let held = hold_as(CpuWeights::F16, exact_t.clone()).unwrap();
        assert_eq!(held.dtype(), DType::F16);
        assert_eq!(
            held.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            exact
        );
        let mut lossy = exact;
        lossy[4000] += 1e-6;
        let kept = hold_as(
            CpuWeights::F16,
            Tensor::from_vec(lossy, (64, 64), &dev).unwrap(),
        );
        assert_eq!(kept.unwrap().dtype(), DType::F32);
        // `--cpu-weights f32` keeps f32.
        assert_eq!(
            hold_as(CpuWeights::F32, exact_t).unwrap().dtype(),
            DType::F32
        );
    }

    #[test]
    fn one_lossy_value_anywhere_keeps_a_weight_f32() {
        // Several check blocks and a ragged tail; the first block is checked on its own first.
        let len = 3 * 4096 + 100;
        let exact: Vec<f32> = as_f16(&values(len, 9)).iter().map(|x| x.to_f32()).collect();
        let tensor = |v: Vec<f32>| Tensor::from_vec(v, len, &Device::Cpu).unwrap();
        let held = hold_as(CpuWeights::F16, tensor(exact.clone())).unwrap();
        assert_eq!(
            held.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
            exact
        );
        for at in [0, 4095, 4096, 2 * 4096 + 17, len - 1] {
            let mut lossy = exact.clone();
            lossy[at] = f32::from_bits(lossy[at].to_bits() ^ 1);
            let kept = hold_as(CpuWeights::F16, tensor(lossy.clone())).unwrap();
            assert_eq!(kept.dtype(), DType::F32, "lossy value at {at}");
            assert_eq!(kept.to_vec1::<f32>().unwrap(), lossy);
        }
    }
}
