//! 2D convolution on the CPU (f32, NCHW, square kernel, no dilation or groups): the weights are
//! used in their OIHW layout as the left matrix of one gemm per tile of output rows, the im2col
//! tile is filled from contiguous row copies, and the gemm accumulates straight into the NCHW
//! output, which starts as the bias — plus, fused, a per-(batch, channel) term (the resnet's
//! time embedding) or a whole residual. A 1×1 convolution is a plain gemm on the input.
//! The reference is candle's `conv2d` plus the broadcast adds ([`crate::layers::Conv2d`]).

use super::cpu::{cpu_f32, uninit_vec, with_values, SendPtr};
use super::cpu_gemm::{parallelism, Mat, MatMut};
use super::held::{gemm_weight_lhs, weight, Weight};
use super::winograd;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements of one im2col tile (16 MiB): large enough for efficient gemms, small enough to
/// stay out of the way of the activations.
const TILE_ELEMS: usize = 4 << 20;

/// Below this many output pixels over the batch, the batch is folded into one gemm, so the
/// weights stream through once per call instead of once per image.
const FOLD_COLUMNS: usize = 2048;

/// What the output starts from before the convolution is accumulated into it.
#[derive(Debug, Clone)]
pub enum Addend {
    /// `[B, O]`: one value per batch item and output channel (broadcast over space).
    PerChannel(Tensor),
    /// `[B, O, Ho, Wo]`: a residual the size of the output.
    Full(Tensor),
}

/// `conv2d(x, w) + bias + addend`.
#[derive(Debug, Clone)]
pub struct FusedConv2d {
    /// Stride along both axes.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
    /// `[O]`, optional.
    pub bias: Option<Tensor>,
    /// Optional term added to the output.
    pub addend: Option<Addend>,
    /// Use Winograd F(2×2, 3×3) for 3×3 stride-1 convolutions where it pays.
    pub winograd: bool,
}

/// Shapes of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
    ho: usize,
    wo: usize,
    stride: usize,
    pad: usize,
}

impl Geometry {
    fn n(&self) -> usize {
        self.ho * self.wo
    }
    fn kdim(&self) -> usize {
        self.c * self.k * self.k
    }
}

impl FusedConv2d {
    fn geometry(&self, x: &Layout, w: &Layout) -> Result<Geometry> {
        let (b, c, h, wd) = x.shape().dims4()?;
        let (o, ci, kh, kw) = w.shape().dims4()?;
        if ci != c || kh != kw || self.stride == 0 {
            candle_core::bail!(
                "conv2d: input {:?} and weight {:?} (stride {}) do not fit",
                x.shape(),
                w.shape(),
                self.stride
            );
        }
        let (hp, wp) = (h + 2 * self.padding, wd + 2 * self.padding);
        if hp < kh || wp < kw {
            candle_core::bail!("conv2d: kernel {kh} larger than the padded input {hp}×{wp}");
        }
        Ok(Geometry {
            b,
            c,
            h,
            w: wd,
            o,
            k: kh,
            ho: (hp - kh) / self.stride + 1,
            wo: (wp - kw) / self.stride + 1,
            stride: self.stride,
            pad: self.padding,
        })
    }
}

impl CustomOp2 for FusedConv2d {
    fn name(&self) -> &'static str {
        "jhakaas-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry(xl, wl)?;
        let x = cpu_f32(xs, xl, "input")?;
        let w = weight(ws, wl, "weight")?;
        let out_len = g.b * g.o * g.n();
        // Every element is written by `init_output` before the gemms accumulate into it.
        let mut out = uninit_vec(out_len);
        let init = |bias: Option<&[f32]>, out: &mut [f32]| -> Result<()> {
            match &self.addend {
                None => init_output(out, g, bias, None),
                Some(Addend::PerChannel(t)) => with_values(t, "addend", g.b * g.o, |a| {
                    init_output(out, g, bias, Some((a, false)))
                })?,
                Some(Addend::Full(t)) => with_values(t, "residual", out_len, |a| {
                    init_output(out, g, bias, Some((a, true)))
                })?,
            }
            Ok(())
        };
        match &self.bias {
            Some(t) => with_values(t, "bias", g.o, |b| init(Some(b), &mut out))??,
            None => init(None, &mut out)?,
        }
        // SAFETY: `out` holds B·O·N initialised values; `x` and `w` match the geometry.
        unsafe {
            let wino = winograd::Shape {
                b: g.b,
                c: g.c,
                h: g.h,
                w: g.w,
                o: g.o,
                ho: g.ho,
                wo: g.wo,
                pad: g.pad,
            };
            if g.b > 1 && g.b * g.n() <= FOLD_COLUMNS && g.kdim() * g.b * g.n() <= TILE_ELEMS {
                batch_folded(x, w, &mut out, g)
            } else if g.k == 1 && g.stride == 1 && g.pad == 0 {
                pointwise(x, w, &mut out, g)
            } else if g.k == 3 && g.stride == 1 && self.winograd && winograd::worth_it(&wino) {
                let u = winograd::transform_filters(w, g.o * g.c);
                winograd::conv3x3(x, &u, &mut out, wino)
            } else {
                im2col_gemm(x, w, &mut out, g)
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.o, g.ho, g.wo))))
    }
}

/// Writes bias (+ addend) into every output row `[b, o, :]`.
fn init_output(out: &mut [f32], g: Geometry, bias: Option<&[f32]>, addend: Option<(&[f32], bool)>) {
    let n = g.n();
    out.par_chunks_mut(n).enumerate().for_each(|(row, dst)| {
        let o = row % g.o;
        let b0 = bias.map_or(0.0, |b| b[o]);
        match addend {
            None => dst.fill(b0),
            Some((a, false)) => dst.fill(b0 + a[row]),
            Some((a, true)) => {
                for (d, s) in dst.iter_mut().zip(&a[row * n..(row + 1) * n]) {
                    *d = s + b0;
                }
            }
        }
    });
}

/// Small outputs: one im2col matrix `[C·k·k, B·N]` for the whole batch, one gemm into
/// `[O, B·N]`, then added into the NCHW output.
unsafe fn batch_folded(x: &[f32], w: Weight, out: &mut [f32], g: Geometry) {
    let (n, kdim, cols) = (g.n(), g.kdim(), g.b * g.n());
    let plane = g.c * g.h * g.w;
    // Every column block is written by `fill_tile` (one per image) before the gemm reads it.
    let mut col = uninit_vec(kdim * cols);
    for b in 0..g.b {
        fill_tile(
            &x[b * plane..(b + 1) * plane],
            &mut col,
            g,
            0,
            g.ho,
            cols,
            b * n,
        );
    }
    // Written by the gemm (no accumulation) before it is read.
    let mut prod = uninit_vec(g.o * cols);
    gemm_weight_lhs(
        g.o,
        cols,
        kdim,
        MatMut {
            ptr: prod.as_mut_ptr(),
            rs: cols as isize,
            cs: 1,
        },
        false,
        w,
        Mat {
            ptr: col.as_ptr(),
            rs: cols as isize,
            cs: 1,
        },
        parallelism(),
    );
    out.par_chunks_mut(n).enumerate().for_each(|(row, dst)| {
        let (b, o) = (row / g.o, row % g.o);
        for (d, p) in dst
            .iter_mut()
            .zip(&prod[o * cols + b * n..o * cols + (b + 1) * n])
        {
            *d += p;
        }
    });
}

/// 1×1, stride 1: `out[b] += W (O×C) · x[b] (C×N)`.
unsafe fn pointwise(x: &[f32], w: Weight, out: &mut [f32], g: Geometry) {
    let n = g.n();
    for b in 0..g.b {
        gemm_weight_lhs(
            g.o,
            n,
            g.c,
            MatMut {
                ptr: out.as_mut_ptr().add(b * g.o * n),
                rs: n as isize,
                cs: 1,
            },
            true,
            w,
            Mat {
                ptr: x.as_ptr().add(b * g.c * n),
                rs: n as isize,
                cs: 1,
            },
            parallelism(),
        );
    }
}

/// General case: per batch item and tile of output rows, fill the im2col tile
/// `[C·k·k, rows·Wo]` and accumulate `W (O × C·k·k) · tile` into the output rows.
unsafe fn im2col_gemm(x: &[f32], w: Weight, out: &mut [f32], g: Geometry) {
    let (n, kdim) = (g.n(), g.kdim());
    let rows_per_tile = (TILE_ELEMS / (kdim * g.wo)).clamp(1, g.ho);
    // Each tile is fully written by `fill_tile` before the gemm reads it.
    let mut col = uninit_vec(kdim * rows_per_tile * g.wo);
    for b in 0..g.b {
        let xb = &x[b * g.c * g.h * g.w..(b + 1) * g.c * g.h * g.w];
        let mut oy0 = 0;
        while oy0 < g.ho {
            let rows = rows_per_tile.min(g.ho - oy0);
            let tile_n = rows * g.wo;
            fill_tile(xb, &mut col[..kdim * tile_n], g, oy0, rows, tile_n, 0);
            gemm_weight_lhs(
                g.o,
                tile_n,
                kdim,
                MatMut {
                    ptr: out.as_mut_ptr().add(b * g.o * n + oy0 * g.wo),
                    rs: n as isize,
                    cs: 1,
                },
                true,
                w,
                Mat {
                    ptr: col.as_ptr(),
                    rs: tile_n as isize,
                    cs: 1,
                },
                parallelism(),
            );
            oy0 += rows;
        }
    }
}

/// im2col for output rows `oy0..oy0+rows`: row `(c, ki, kj)` of the tile holds, for each
/// output pixel, the input value under kernel tap `(ki, kj)` (0 in the padding). Tile rows are
/// `stride` long; this image's pixels start at column `offset`.
fn fill_tile(
    xb: &[f32],
    col: &mut [f32],
    g: Geometry,
    oy0: usize,
    rows: usize,
    stride: usize,
    offset: usize,
) {
    let tile_n = rows * g.wo;
    let (k, s, p) = (g.k, g.stride, g.pad as isize);
    let ptr = SendPtr(col.as_mut_ptr());
    (0..g.kdim())
        .into_par_iter()
        .with_min_len(8)
        .for_each(|kk| {
            let (c, ki, kj) = (kk / (k * k), (kk / k) % k, kk % k);
            let plane = &xb[c * g.h * g.w..(c + 1) * g.h * g.w];
            // SAFETY: tile row `kk` belongs to this task alone.
            let dst_row = unsafe {
                std::slice::from_raw_parts_mut(ptr.get().add(kk * stride + offset), tile_n)
            };
            for r in 0..rows {
                let iy = ((oy0 + r) * s) as isize + ki as isize - p;
                let dst = &mut dst_row[r * g.wo..(r + 1) * g.wo];
                if iy < 0 || iy >= g.h as isize {
                    dst.fill(0.0);
                    continue;
                }
                let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                let shift = kj as isize - p;
                if s == 1 {
                    // ix = ox + shift: zeros where it falls outside, one copy for the rest.
                    let lo = (-shift).clamp(0, g.wo as isize) as usize;
                    let hi = (g.w as isize - shift).clamp(lo as isize, g.wo as isize) as usize;
                    dst[..lo].fill(0.0);
                    dst[lo..hi].copy_from_slice(
                        &src[(lo as isize + shift) as usize..(hi as isize + shift) as usize],
                    );
                    dst[hi..].fill(0.0);
                } else {
                    for (ox, d) in dst.iter_mut().enumerate() {
                        let ix = (ox * s) as isize + shift;
                        *d = if ix >= 0 && ix < g.w as isize {
                            src[ix as usize]
                        } else {
                            0.0
                        };
                    }
                }
            }
        });
}
