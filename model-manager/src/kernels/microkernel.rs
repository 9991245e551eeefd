//! Register-blocked f32 inner products for the CPU attention kernel, with explicit FMA
//! intrinsics on x86-64 (AVX-512: 8 rows × 32 columns in 16 registers; AVX2: 4 × 16 in 8) and
//! a portable fallback the compiler vectorises without FMA.
//!
//! [`rank1_block`]: `c[i][j] (+)= Σ_k a[i·a_rs + k] · b[k·b_rs + j]` for `i < rows` (a
//! multiple of [`ROWS`]), `j < cols` (a multiple of 8), `k < n`.

use super::simd::{isa, Isa};

/// Rows per call must be a multiple of this (the widest register block).
pub const ROWS: usize = 8;

/// `c (+)= a · b` as described in the module docs. Panics if a slice is too short.
#[allow(clippy::too_many_arguments)]
pub fn rank1_block(
    a: &[f32],
    a_rs: usize,
    b: &[f32],
    b_rs: usize,
    n: usize,
    rows: usize,
    cols: usize,
    c: &mut [f32],
    c_rs: usize,
    accumulate: bool,
) {
    assert!(rows.is_multiple_of(ROWS) && cols.is_multiple_of(8));
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(n == 0 || a.len() >= (rows - 1) * a_rs + n);
    assert!(n == 0 || b.len() >= (n - 1) * b_rs + cols);
    assert!(c.len() >= (rows - 1) * c_rs + cols);
    #[cfg(target_arch = "x86_64")]
    {
        let args = x86::Args {
            a,
            a_rs,
            b,
            b_rs,
            n,
            rows,
            cols,
            c_rs,
            accumulate,
        };
        match isa() {
            // SAFETY: the features were detected; the asserts above bound every access.
            Isa::Avx512 => return unsafe { x86::block_avx512(&args, c) },
            Isa::Avx2 => return unsafe { x86::block_avx2(&args, c) },
            Isa::Baseline => {}
        }
    }
    portable(a, a_rs, b, b_rs, n, rows, cols, c, c_rs, accumulate)
}

#[allow(clippy::too_many_arguments)]
fn portable(
    a: &[f32],
    a_rs: usize,
    b: &[f32],
    b_rs: usize,
    n: usize,
    rows: usize,
    cols: usize,
    c: &mut [f32],
    c_rs: usize,
    accumulate: bool,
) {
    for i0 in (0..rows).step_by(4) {
        for j0 in (0..cols).step_by(8) {
            let mut acc = [[0f32; 8]; 4];
            if accumulate {
                for (i, row) in acc.iter_mut().enumerate() {
                    row.copy_from_slice(&c[(i0 + i) * c_rs + j0..][..8]);
                }
            }
            for k in 0..n {
                let bv = &b[k * b_rs + j0..][..8];
                for (i, row) in acc.iter_mut().enumerate() {
                    let av = a[(i0 + i) * a_rs + k];
                    for (r, &x) in row.iter_mut().zip(bv) {
                        *r += av * x;
                    }
                }
            }
            for (i, row) in acc.iter().enumerate() {
                c[(i0 + i) * c_rs + j0..][..8].copy_from_slice(row);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The operands of one call (checked by `rank1_block`).
    pub struct Args<'a> {
        pub a: &'a [f32],
        pub a_rs: usize,
        pub b: &'a [f32],
        pub b_rs: usize,
        pub n: usize,
        pub rows: usize,
        pub cols: usize,
        pub c_rs: usize,
        pub accumulate: bool,
    }

    /// One register block: `$rows` rows × `$vecs` vectors of `$lanes` lanes at column `$j0`,
    /// with the given intrinsics (so AVX-512 and AVX2 share one body).
    macro_rules! block {
        ($p:expr, $ar:expr, $cr:expr, $j0:expr, $rows:expr, $vecs:expr, $lanes:expr,
         $zero:ident, $load:ident, $store:ident, $set1:ident, $fmadd:ident) => {{
            let mut acc = [[$zero(); $vecs]; $rows];
            if $p.accumulate {
                for i in 0..$rows {
                    for v in 0..$vecs {
                        acc[i][v] = $load($cr[i].add($j0 + v * $lanes));
                    }
                }
            }
            let mut bk = $p.b.as_ptr().add($j0);
            for k in 0..$p.n {
                let b: [_; $vecs] = std::array::from_fn(|v| $load(bk.add(v * $lanes)));
                for i in 0..$rows {
                    let av = $set1(*$ar[i].add(k));
                    for v in 0..$vecs {
                        acc[i][v] = $fmadd(av, b[v], acc[i][v]);
                    }
                }
                bk = bk.add($p.b_rs);
            }
            for i in 0..$rows {
                for v in 0..$vecs {
                    $store($cr[i].add($j0 + v * $lanes), acc[i][v]);
                }
            }
        }};
    }

    /// Row pointers of `a` and `c` for the register block starting at row `i0`.
    unsafe fn rows<const R: usize>(
        p: &Args,
        c: *mut f32,
        i0: usize,
    ) -> ([*const f32; R], [*mut f32; R]) {
        (
            std::array::from_fn(|i| p.a.as_ptr().add((i0 + i) * p.a_rs)),
            std::array::from_fn(|i| c.add((i0 + i) * p.c_rs)),
        )
    }

    /// 8 rows × (32, 16 or 8) columns per register block.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn block_avx512(p: &Args, c: &mut [f32]) {
        const R: usize = 8;
        for i0 in (0..p.rows).step_by(R) {
            let (ar, cr) = rows::<R>(p, c.as_mut_ptr(), i0);
            let mut j0 = 0;
            while j0 + 32 <= p.cols {
                block!(
                    p,
                    ar,
                    cr,
                    j0,
                    R,
                    2,
                    16,
                    _mm512_setzero_ps,
                    _mm512_loadu_ps,
                    _mm512_storeu_ps,
                    _mm512_set1_ps,
                    _mm512_fmadd_ps
                );
                j0 += 32;
            }
            if j0 + 16 <= p.cols {
                block!(
                    p,
                    ar,
                    cr,
                    j0,
                    R,
                    1,
                    16,
                    _mm512_setzero_ps,
                    _mm512_loadu_ps,
                    _mm512_storeu_ps,
                    _mm512_set1_ps,
                    _mm512_fmadd_ps
                );
                j0 += 16;
            }
            if j0 < p.cols {
                block!(
                    p,
                    ar,
                    cr,
                    j0,
                    R,
                    1,
                    8,
                    _mm256_setzero_ps,
                    _mm256_loadu_ps,
                    _mm256_storeu_ps,
                    _mm256_set1_ps,
                    _mm256_fmadd_ps
                );
            }
        }
    }

    /// 4 rows × (16 or 8) columns per register block.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn block_avx2(p: &Args, c: &mut [f32]) {
        const R: usize = 4;
        for i0 in (0..p.rows).step_by(R) {
            let (ar, cr) = rows::<R>(p, c.as_mut_ptr(), i0);
            let mut j0 = 0;
            while j0 + 16 <= p.cols {
                block!(
                    p,
                    ar,
                    cr,
                    j0,
                    R,
                    2,
                    8,
                    _mm256_setzero_ps,
                    _mm256_loadu_ps,
                    _mm256_storeu_ps,
                    _mm256_set1_ps,
                    _mm256_fmadd_ps
                );
                j0 += 16;
            }
            if j0 < p.cols {
                block!(
                    p,
                    ar,
                    cr,
                    j0,
                    R,
                    1,
                    8,
                    _mm256_setzero_ps,
                    _mm256_loadu_ps,
                    _mm256_storeu_ps,
                    _mm256_set1_ps,
                    _mm256_fmadd_ps
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_matches_the_plain_triple_loop() {
        let (rows, cols, n) = (16, 56, 37);
        let a: Vec<f32> = (0..rows * n).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let b: Vec<f32> = (0..n * cols).map(|i| ((i * 3) % 13) as f32 - 6.0).collect();
        let start: Vec<f32> = (0..rows * cols).map(|i| (i % 5) as f32).collect();
        let mut want = start.clone();
        for i in 0..rows {
            for j in 0..cols {
                want[i * cols + j] += (0..n).map(|k| a[i * n + k] * b[k * cols + j]).sum::<f32>();
            }
        }
        let mut c = start.clone();
        rank1_block(&a, n, &b, cols, n, rows, cols, &mut c, cols, true);
        assert_eq!(c, want, "dispatched ({:?})", isa());
        let mut c = start.clone();
        portable(&a, n, &b, cols, n, rows, cols, &mut c, cols, true);
        assert_eq!(c, want, "portable");
        let mut c = vec![1.0; rows * cols];
        rank1_block(&a, n, &b, cols, n, rows, cols, &mut c, cols, false);
        let plain: Vec<f32> = want.iter().zip(&start).map(|(w, s)| w - s).collect();
        assert_eq!(c, plain, "without accumulation");
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            let mut c = start.clone();
            let args = x86::Args {
                a: &a,
                a_rs: n,
                b: &b,
                b_rs: cols,
                n,
                rows,
                cols,
                c_rs: cols,
                accumulate: true,
            };
            // SAFETY: AVX2 and FMA were detected; the sizes match.
            unsafe { x86::block_avx2(&args, &mut c) };
            assert_eq!(c, want, "avx2");
        }
    }
}
