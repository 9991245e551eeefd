//! 3×3 stride-1 convolution by Winograd's minimal filtering F(2×2, 3×3) on the CPU: each
//! 4×4 input tile and 3×3 filter are transformed so that a 2×2 output tile takes 16 products
//! instead of 36, done as 16 gemms `U[ξ] (O×C) · V[ξ] (C×tiles)` with the batch folded into the
//! tiles. The transforms use only ±1 and ½, so the result stays within f32 rounding of the
//! direct convolution (checked against candle's conv2d in `tests/kernels.rs`). The transforms
//! run a whole channel's tile rows per call, so their inner loops vectorise.

use super::cpu::{uninit_vec, SendPtr};
use super::cpu_gemm::{gemm, parallelism, Mat, MatMut};
use super::held::Weight;
use super::simd;
use rayon::prelude::*;

/// Bytes of transformed input and products held at once (tiles are processed in chunks).
const CHUNK_BYTES: usize = 32 << 20;
/// Filters transformed per rayon task.
const FILTERS_PER_TASK: usize = 4096;

/// Shapes of one convolution, as [`super::conv2d`] checked them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub ho: usize,
    pub wo: usize,
    pub pad: usize,
}

impl Shape {
    fn tiles_y(&self) -> usize {
        self.ho.div_ceil(2)
    }
    fn tiles_x(&self) -> usize {
        self.wo.div_ceil(2)
    }
    /// Tiles of the whole batch.
    pub fn tiles(&self) -> usize {
        self.b * self.tiles_y() * self.tiles_x()
    }
}

/// Whether Winograd pays for this convolution: enough output tiles for efficient gemms and
/// enough channels for the transforms to be cheap next to them.
pub(crate) fn worth_it(s: &Shape) -> bool {
    s.tiles() >= 128 && s.c >= 32 && s.o >= 32
}

/// `U[ξ][i] = (G g Gᵀ)[ξ]` for every filter `g = w[i]` (`i` over O·C, 3×3 each).
pub(crate) fn transform_filters(w: Weight, filters: usize) -> Vec<f32> {
    // Every element is written: each task fills its range of filters in all 16 planes.
    let mut u = uninit_vec::<f32>(16 * filters);
    let ptr = SendPtr(u.as_mut_ptr());
    (0..filters.div_ceil(FILTERS_PER_TASK))
        .into_par_iter()
        .for_each(|task| {
            let i0 = task * FILTERS_PER_TASK;
            let n = FILTERS_PER_TASK.min(filters - i0);
            // Taps as 9 contiguous planes, then the 16 transformed planes.
            let mut taps = vec![0f32; 9 * n];
            let mut wide = vec![0f32; 9 * n];
            w.widen_into(i0 * 9, &mut wide);
            for (i, g) in wide.chunks_exact(9).enumerate() {
                for (k, &v) in g.iter().enumerate() {
                    taps[k * n + i] = v;
                }
            }
            // SAFETY: elements `i0..i0+n` of every plane belong to this task alone.
            let planes: [&mut [f32]; 16] = std::array::from_fn(|xi| unsafe {
                std::slice::from_raw_parts_mut(ptr.get().add(xi * filters + i0), n)
            });
            filter_planes(&taps, planes);
        });
    u
}

simd::dispatched! {
    /// The 16 planes of `G g Gᵀ` from the 9 tap planes of `n` filters.
    pub fn filter_planes(taps: &[f32], planes: [&mut [f32]; 16]) {
        let out = planes;
        let n = out[0].len();
        let g = |k: usize| &taps[k * n..(k + 1) * n];
        for i in 0..n {
            // t = G g: rows (g0, ½(g0+g1+g2), ½(g0−g1+g2), g2) per column of g.
            let mut t = [[0f32; 3]; 4];
            for j in 0..3 {
                let (a, b, c) = (g(j)[i], g(3 + j)[i], g(6 + j)[i]);
                t[0][j] = a;
                t[1][j] = 0.5 * (a + b + c);
                t[2][j] = 0.5 * (a - b + c);
                t[3][j] = c;
            }
            for (r, [a, b, c]) in t.into_iter().enumerate() {
                out[4 * r][i] = a;
                out[4 * r + 1][i] = 0.5 * (a + b + c);
                out[4 * r + 2][i] = 0.5 * (a - b + c);
                out[4 * r + 3][i] = c;
            }
        }
    }
}

/// Accumulates the convolution of `x` with the transformed filters `u` into `out` (NCHW,
/// initialised).
///
/// # Safety
/// `x`, `u` (16·O·C) and `out` hold the elements `s` describes.
pub(crate) unsafe fn conv3x3(x: &[f32], u: &[f32], out: &mut [f32], s: Shape) {
    // Chunks of whole tile rows (over the batch) whose transforms fit in CHUNK_BYTES.
    let tile_rows = s.b * s.tiles_y();
    let rows_per_chunk = (CHUNK_BYTES / (64 * (s.c + s.o) * s.tiles_x())).clamp(1, tile_rows);
    let chunk = rows_per_chunk * s.tiles_x();
    // Both buffers are fully written (transform_input, then the gemms) before being read.
    let mut v = uninit_vec(16 * s.c * chunk);
    let mut m = uninit_vec::<f32>(16 * s.o * chunk);
    let mut r0 = 0;
    while r0 < tile_rows {
        let rows = rows_per_chunk.min(tile_rows - r0);
        let nt = rows * s.tiles_x();
        transform_input(x, &mut v, s, r0, rows);
        for xi in 0..16 {
            gemm(
                s.o,
                nt,
                s.c,
                MatMut {
                    ptr: m.as_mut_ptr().add(xi * s.o * nt),
                    rs: nt as isize,
                    cs: 1,
                },
                false,
                Mat {
                    ptr: u.as_ptr().add(xi * s.o * s.c),
                    rs: s.c as isize,
                    cs: 1,
                },
                Mat {
                    ptr: v.as_ptr().add(xi * s.c * nt),
                    rs: nt as isize,
                    cs: 1,
                },
                1.0,
                parallelism(),
            );
        }
        transform_output(&m, out, s, r0, rows);
        r0 += rows;
    }
}

/// The tile rows `r0..r0+rows` (over the batch) split by image: (image, first tile row in the
/// image, tile rows, offset of the first one within the chunk).
fn spans(s: &Shape, r0: usize, rows: usize) -> Vec<(usize, usize, usize, usize)> {
    let ty = s.tiles_y();
    let mut out = Vec::new();
    let mut r = r0;
    while r < r0 + rows {
        let (b, y) = (r / ty, r % ty);
        let n = (ty - y).min(r0 + rows - r);
        out.push((b, y, n, r - r0));
        r += n;
    }
    out
}

/// `V[ξ][c][t] = (Bᵀ d B)[ξ]` for the 4×4 input patch `d` of every tile in the chunk.
fn transform_input(x: &[f32], v: &mut [f32], s: Shape, r0: usize, rows: usize) {
    let (tx, nt) = (s.tiles_x(), rows * s.tiles_x());
    let ptr = SendPtr(v.as_mut_ptr());
    let spans = spans(&s, r0, rows);
    let plane = s.c * nt;
    (0..s.c).into_par_iter().for_each_init(
        || (vec![0f32; 0], vec![0f32; 0], vec![0f32; 0]),
        |(padded, even, odd), c| {
            for &(b, y0, n, at) in &spans {
                let src = &x[(b * s.c + c) * s.h * s.w..(b * s.c + c + 1) * s.h * s.w];
                // Input rows 2·y0 − pad .. 2·(y0+n) + 2 − pad, zero outside, split into even and
                // odd columns (column 2j − pad is even[j], 2j + 1 − pad is odd[j]).
                let in_rows = 2 * n + 2;
                let width = 2 * tx + 2;
                padded.resize(width, 0.0);
                even.resize(in_rows * (tx + 1), 0.0);
                odd.resize(in_rows * (tx + 1), 0.0);
                for q in 0..in_rows {
                    let iy = (2 * y0 + q) as isize - s.pad as isize;
                    padded.fill(0.0);
                    if iy >= 0 && iy < s.h as isize {
                        let row = &src[iy as usize * s.w..(iy as usize + 1) * s.w];
                        let lo = s.pad.min(width);
                        let len = s.w.min(width - lo);
                        padded[lo..lo + len].copy_from_slice(&row[..len]);
                    }
                    let (e, o) = (
                        &mut even[q * (tx + 1)..(q + 1) * (tx + 1)],
                        &mut odd[q * (tx + 1)..(q + 1) * (tx + 1)],
                    );
                    for j in 0..=tx {
                        e[j] = padded[2 * j];
                        o[j] = padded[2 * j + 1];
                    }
                }
                // SAFETY: row `c` of every plane belongs to this task alone.
                let planes: [&mut [f32]; 16] = std::array::from_fn(|xi| unsafe {
                    std::slice::from_raw_parts_mut(
                        ptr.get().add(xi * plane + c * nt + at * tx),
                        n * tx,
                    )
                });
                input_tiles(even, odd, tx, planes);
            }
        },
    );
}

simd::dispatched! {
    /// The 16 planes of `Bᵀ d B` for `planes[0].len() / tx` tile rows, from the even and odd
    /// columns (rows of `tx + 1`) of the padded input rows.
    pub fn input_tiles(even: &[f32], odd: &[f32], tx: usize, planes: [&mut [f32]; 16]) {
        let [p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15] = planes;
        let w = tx + 1;
        let n = p0.len() / tx;
        for ty in 0..n {
            fn row(v: &[f32], ty: usize, q: usize, w: usize) -> (&[f32], &[f32]) {
                let r = &v[(2 * ty + q) * w..(2 * ty + q + 1) * w];
                (&r[..w - 1], &r[1..])
            }
            // Tile j's columns: c0 = even[j], c1 = odd[j], c2 = even[j+1], c3 = odd[j+1].
            let ((e0, f0), (e1, f1), (e2, f2), (e3, f3)) =
                (row(even, ty, 0, w), row(even, ty, 1, w), row(even, ty, 2, w), row(even, ty, 3, w));
            let ((o0, g0), (o1, g1), (o2, g2), (o3, g3)) =
                (row(odd, ty, 0, w), row(odd, ty, 1, w), row(odd, ty, 2, w), row(odd, ty, 3, w));
            let r = ty * tx..(ty + 1) * tx;
            let (q0, q1, q2, q3) = (&mut p0[r.clone()], &mut p1[r.clone()], &mut p2[r.clone()], &mut p3[r.clone()]);
            let (q4, q5, q6, q7) = (&mut p4[r.clone()], &mut p5[r.clone()], &mut p6[r.clone()], &mut p7[r.clone()]);
            let (q8, q9, q10, q11) = (&mut p8[r.clone()], &mut p9[r.clone()], &mut p10[r.clone()], &mut p11[r.clone()]);
            let (q12, q13, q14, q15) = (&mut p12[r.clone()], &mut p13[r.clone()], &mut p14[r.clone()], &mut p15[r]);
            for j in 0..tx {
                // d[q][k]: row q, column k of the 4×4 patch.
                let d = [
                    [e0[j], o0[j], f0[j], g0[j]],
                    [e1[j], o1[j], f1[j], g1[j]],
                    [e2[j], o2[j], f2[j], g2[j]],
                    [e3[j], o3[j], f3[j], g3[j]],
                ];
                // t = Bᵀ d: rows d0 − d2, d1 + d2, d2 − d1, d1 − d3.
                let t: [[f32; 4]; 4] = std::array::from_fn(|k| {
                    let c = [d[0][k], d[1][k], d[2][k], d[3][k]];
                    [c[0] - c[2], c[1] + c[2], c[2] - c[1], c[1] - c[3]]
                });
                // V = t B, with t[k][r] = row r, column k of t.
                let v = |r: usize| [t[0][r] - t[2][r], t[1][r] + t[2][r], t[2][r] - t[1][r], t[1][r] - t[3][r]];
                let (v0, v1, v2, v3) = (v(0), v(1), v(2), v(3));
                q0[j] = v0[0]; q1[j] = v0[1]; q2[j] = v0[2]; q3[j] = v0[3];
                q4[j] = v1[0]; q5[j] = v1[1]; q6[j] = v1[2]; q7[j] = v1[3];
                q8[j] = v2[0]; q9[j] = v2[1]; q10[j] = v2[2]; q11[j] = v2[3];
                q12[j] = v3[0]; q13[j] = v3[1]; q14[j] = v3[2]; q15[j] = v3[3];
            }
        }
    }
}

/// `out[b, o, 2ty.., 2tx..] += (Aᵀ M A)` for every tile in the chunk (cropped at the edges).
fn transform_output(m: &[f32], out: &mut [f32], s: Shape, r0: usize, rows: usize) {
    let (tx, nt) = (s.tiles_x(), rows * s.tiles_x());
    let ptr = SendPtr(out.as_mut_ptr());
    let spans = spans(&s, r0, rows);
    let plane = s.o * nt;
    (0..s.o).into_par_iter().for_each(|o| {
        for &(b, y0, n, at) in &spans {
            let planes: [&[f32]; 16] =
                std::array::from_fn(|xi| &m[xi * plane + o * nt + at * tx..][..n * tx]);
            let base = (b * s.o + o) * s.ho * s.wo;
            let rows_out = (s.ho - 2 * y0).min(2 * n);
            // SAFETY: output channel `o` of image `b` belongs to this task alone.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(ptr.get().add(base + 2 * y0 * s.wo), rows_out * s.wo)
            };
            output_tiles(&planes, tx, s.wo, dst);
        }
    });
}

simd::dispatched! {
    /// Adds `Aᵀ M A` of every tile (16 planes, `tx` tiles per row) to the output rows `dst`
    /// (`wo` wide; the last row and column of tiles may be cropped).
    pub fn output_tiles(m: &[&[f32]; 16], tx: usize, wo: usize, dst: &mut [f32]) {
        let n = m[0].len() / tx;
        let rows_out = dst.len() / wo;
        let mut y = vec![0f32; 4 * tx];
        for ty in 0..n {
            let at = |xi: usize| &m[xi][ty * tx..(ty + 1) * tx];
            let mm: [&[f32]; 16] = std::array::from_fn(at);
            {
                let (y00, rest) = y.split_at_mut(tx);
                let (y01, rest) = rest.split_at_mut(tx);
                let (y10, y11) = rest.split_at_mut(tx);
                for j in 0..tx {
                    // sᵀ = Aᵀ M: s0[k] = m0k + m1k + m2k, s1[k] = m1k − m2k − m3k; y = s A.
                    let s0: [f32; 4] = std::array::from_fn(|k| mm[k][j] + mm[4 + k][j] + mm[8 + k][j]);
                    let s1: [f32; 4] = std::array::from_fn(|k| mm[4 + k][j] - mm[8 + k][j] - mm[12 + k][j]);
                    y00[j] = s0[0] + s0[1] + s0[2];
                    y01[j] = s0[1] - s0[2] - s0[3];
                    y10[j] = s1[0] + s1[1] + s1[2];
                    y11[j] = s1[1] - s1[2] - s1[3];
                }
            }
            for i in 0..2 {
                let oy = 2 * ty + i;
                if oy >= rows_out {
                    continue;
                }
                let row = &mut dst[oy * wo..(oy + 1) * wo];
                let (a, b) = (&y[2 * i * tx..(2 * i + 1) * tx], &y[(2 * i + 1) * tx..(2 * i + 2) * tx]);
                let pairs = wo / 2;
                for j in 0..pairs {
                    row[2 * j] += a[j];
                    row[2 * j + 1] += b[j];
                }
                if wo % 2 == 1 {
                    row[2 * pairs] += a[pairs];
                }
            }
        }
    }
}
