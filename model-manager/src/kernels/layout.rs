//! Moving values without arithmetic on the CPU, in parallel and cache-blocked: transposing
//! matrices (weights at load, feature maps into tokens and back), concatenating matrices side
//! by side and nearest-neighbour upsampling (candle's strided copies and its upsampling run on one
//! core; they took a third of the load time and 8% of a 512² UNet step). f32 and f16 (weights
//! held in f16, [`super::held`]) take these paths; other devices and dtypes use the candle ops.

use super::cpu::{uninit_vec, Plain, SendPtr};
use candle_core::{Result, Tensor, WithDType};
use rayon::prelude::*;

/// Side of the square blocks the transpose moves at once.
const BLOCK: usize = 64;

/// Whether `t` is a CPU tensor in a dtype these paths handle.
fn is_cpu_plain(t: &Tensor) -> bool {
    use candle_core::DType;
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F16)
}

/// `tᵀ` of a 2D tensor, contiguous.
pub fn transpose(t: &Tensor) -> Result<Tensor> {
    t.dims2()?;
    transpose_last_two(t)
}

/// `t` with its last two dimensions swapped, contiguous: each matrix of a batch transposed
/// (e.g. a feature map `[B, C, H·W]` into tokens `[B, H·W, C]`; candle's strided copy of a
/// permuted tensor runs element by element on one core).
pub fn transpose_last_two(t: &Tensor) -> Result<Tensor> {
    if !is_cpu_plain(t) || t.rank() < 2 || t.elem_count() == 0 {
        return t
            .transpose(t.rank().saturating_sub(2), t.rank().saturating_sub(1))?
            .contiguous();
    }
    match t.dtype() {
        candle_core::DType::F16 => transposed::<half::f16>(&t.contiguous()?),
        _ => transposed::<f32>(&t.contiguous()?),
    }
}

/// [`transpose_last_two`] of a contiguous, non-empty CPU tensor of element type `T`.
fn transposed<T: Plain + WithDType>(t: &Tensor) -> Result<Tensor> {
    let dims = t.dims();
    let n = dims.len();
    let (rows, cols) = (dims[n - 2], dims[n - 1]);
    let matrix = rows * cols;
    let batch = t.elem_count() / matrix;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*storage else {
        candle_core::bail!("transpose: expected a CPU tensor");
    };
    let src = &T::cpu_storage_as_slice(s)?[layout.start_offset()..][..batch * matrix];
    // Every element is written: each task fills whole output rows `c0..c0+BLOCK` of one
    // matrix of the batch.
    let mut out = uninit_vec::<T>(batch * matrix);
    let ptr = SendPtr(out.as_mut_ptr());
    let col_blocks = cols.div_ceil(BLOCK);
    (0..batch * col_blocks).into_par_iter().for_each(|task| {
        let (m, cb) = (task / col_blocks, task % col_blocks);
        let (src, base) = (&src[m * matrix..(m + 1) * matrix], m * matrix);
        let c0 = cb * BLOCK;
        let c1 = (c0 + BLOCK).min(cols);
        for r0 in (0..rows).step_by(BLOCK) {
            let r1 = (r0 + BLOCK).min(rows);
            for c in c0..c1 {
                for r in r0..r1 {
                    // SAFETY: output row `c` of matrix `m` belongs to this task alone.
                    unsafe { *ptr.get().add(base + c * rows + r) = src[r * cols + c] };
                }
            }
        }
    });
    let mut shape = dims.to_vec();
    shape.swap(n - 2, n - 1);
    Tensor::from_vec(out, shape, t.device())
}

/// `[A | B | …]`: 2D tensors with the same number of rows, side by side.
pub fn concat_columns(parts: &[&Tensor]) -> Result<Tensor> {
    let dtype = parts.first().map(|t| t.dtype());
    if !parts
        .iter()
        .all(|t| is_cpu_plain(t) && Some(t.dtype()) == dtype)
    {
        return Tensor::cat(parts, 1);
    }
    let rows = parts.first().map(|t| t.dim(0)).transpose()?.unwrap_or(0);
    let parts: Vec<Tensor> = parts
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<_>>()?;
    if parts.iter().any(|t| t.dim(0).ok() != Some(rows)) {
        candle_core::bail!("concat_columns: parts have different numbers of rows");
    }
    match dtype {
        Some(candle_core::DType::F16) => concatenated::<half::f16>(&parts, rows),
        _ => concatenated::<f32>(&parts, rows),
    }
}

/// [`concat_columns`] of contiguous `rows`-row CPU tensors, all of element type `T`.
fn concatenated<T: Plain + WithDType>(parts: &[Tensor], rows: usize) -> Result<Tensor> {
    let widths: Vec<usize> = parts.iter().map(|t| t.dim(1)).collect::<Result<_>>()?;
    let total: usize = widths.iter().sum();
    // Every element is written: each row is filled from every part.
    let mut out = uninit_vec::<T>(rows * total);
    let mut offset = 0;
    for (t, &w) in parts.iter().zip(&widths) {
        let (storage, layout) = t.storage_and_layout();
        let candle_core::Storage::Cpu(s) = &*storage else {
            candle_core::bail!("concat_columns: expected a CPU tensor");
        };
        let src = T::cpu_storage_as_slice(s)?;
        let src = &src[layout.start_offset()..layout.start_offset() + rows * w];
        out.par_chunks_mut(total)
            .zip(src.par_chunks(w.max(1)))
            .for_each(|(dst, row)| dst[offset..offset + w].copy_from_slice(row));
        offset += w;
    }
    Tensor::from_vec(out, (rows, total), parts[0].device())
}

/// `t` (`[B, C, H, W]`) resized to `[B, C, th, tw]` by nearest neighbour, as diffusers'
/// `interpolate(mode="nearest")` and candle's `upsample_nearest2d`. Doubling an f32 map on the
/// CPU (every value copied into a 2×2 block, what SD's upsamplers do) runs in parallel; any
/// other size, dtype or device is candle's.
pub fn upsample_nearest(t: &Tensor, th: usize, tw: usize) -> Result<Tensor> {
    let (b, c, h, w) = t.dims4()?;
    if (th, tw) != (2 * h, 2 * w)
        || !(t.device().is_cpu() && t.dtype() == candle_core::DType::F32)
        || t.elem_count() == 0
    {
        return t.upsample_nearest2d(th, tw);
    }
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*storage else {
        candle_core::bail!("upsample: expected a CPU tensor");
    };
    let src = &f32::cpu_storage_as_slice(s)?[layout.start_offset()..][..b * c * h * w];
    // Every element is written: input row `r` of the stacked planes fills output rows 2r and
    // 2r + 1, which are the `r`-th chunk of 4W values.
    let mut out = uninit_vec::<f32>(4 * b * c * h * w);
    out.par_chunks_mut(4 * w)
        .zip(src.par_chunks(w))
        .with_min_len(16)
        .for_each(|(dst, row)| {
            let (first, second) = dst.split_at_mut(2 * w);
            for (pair, &v) in first.chunks_exact_mut(2).zip(row) {
                pair[0] = v;
                pair[1] = v;
            }
            second.copy_from_slice(first);
        });
    Tensor::from_vec(out, (b, c, 2 * h, 2 * w), t.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn transpose_and_concat_match_candle() {
        let a = Tensor::arange(0f32, (130 * 70) as f32, &Device::Cpu)
            .unwrap()
            .reshape((130, 70))
            .unwrap();
        let b = Tensor::arange(0f32, (130 * 3) as f32, &Device::Cpu)
            .unwrap()
            .reshape((130, 3))
            .unwrap();
        let t = transpose(&a).unwrap();
        let want = a.t().unwrap().contiguous().unwrap();
        assert_eq!(t.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
        let c = concat_columns(&[&a, &b]).unwrap();
        let want = Tensor::cat(&[&a, &b], 1).unwrap();
        assert_eq!(c.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn nearest_2x_upsampling_matches_candle() {
        let t = Tensor::arange(0f32, (2 * 3 * 5 * 7) as f32, &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 5, 7))
            .unwrap();
        let ours = upsample_nearest(&t, 10, 14).unwrap();
        let want = t.upsample_nearest2d(10, 14).unwrap();
        assert_eq!(ours.dims(), &[2, 3, 10, 14]);
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values(&ours), values(&want));
        // A non-contiguous view is copied first; other sizes are candle's.
        let part = t.narrow(1, 1, 2).unwrap();
        assert_eq!(
            values(&upsample_nearest(&part, 10, 14).unwrap()),
            values(&part.upsample_nearest2d(10, 14).unwrap())
        );
        assert_eq!(
            values(&upsample_nearest(&t, 9, 13).unwrap()),
            values(&t.upsample_nearest2d(9, 13).unwrap())
        );
    }

    #[test]
    fn a_batch_of_matrices_transposes_like_candle() {
        for dtype in [candle_core::DType::F32, candle_core::DType::F16] {
            let t = Tensor::arange(0f32, (2 * 3 * 70 * 130) as f32, &Device::Cpu)
                .unwrap()
                .reshape((2, 3, 70, 130))
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let ours = transpose_last_two(&t).unwrap();
            let want = t.transpose(2, 3).unwrap().contiguous().unwrap();
            assert_eq!(ours.dims(), &[2, 3, 130, 70]);
            assert_eq!(ours.dtype(), dtype);
            let values = |t: &Tensor| {
                t.to_dtype(candle_core::DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            assert_eq!(values(&ours), values(&want), "{dtype:?}");
            // A view that is not contiguous (a narrowed batch) is copied first.
            let part = t.narrow(1, 1, 2).unwrap();
            let want = part.transpose(2, 3).unwrap().contiguous().unwrap();
            assert_eq!(values(&transpose_last_two(&part).unwrap()), values(&want));
        }
    }

    #[test]
    fn f16_transpose_and_concat_match_candle_and_stay_f16() {
        let f16 = |rows: usize, cols: usize| {
            Tensor::arange(0f32, (rows * cols) as f32, &Device::Cpu)
                .unwrap()
                .reshape((rows, cols))
                .unwrap()
                .to_dtype(candle_core::DType::F16)
                .unwrap()
        };
        let (a, b) = (f16(70, 130), f16(70, 5));
        let t = transpose(&a).unwrap();
        assert_eq!(t.dtype(), candle_core::DType::F16);
        let want = a.t().unwrap().contiguous().unwrap();
        assert_eq!(
            t.to_vec2::<half::f16>().unwrap(),
            want.to_vec2::<half::f16>().unwrap()
        );
        let c = concat_columns(&[&a, &b]).unwrap();
        assert_eq!(c.dtype(), candle_core::DType::F16);
        let want = Tensor::cat(&[&a, &b], 1).unwrap();
        assert_eq!(
            c.to_vec2::<half::f16>().unwrap(),
            want.to_vec2::<half::f16>().unwrap()
        );
        // Mixed dtypes fall back to candle's concatenation, which refuses them.
        assert!(concat_columns(&[&a, &b.to_dtype(candle_core::DType::F32).unwrap()]).is_err());
    }
}
