//! The one door to the `gemm` crate for our CPU kernels: strided f32 matrices, an optional
//! accumulate-into-destination (how biases and residuals are fused), and threading that never
//! nests inside a rayon task.

use gemm::Parallelism;

/// A strided, read-only f32 matrix: element `(i, j)` is at `ptr + i·rs + j·cs`.
#[derive(Debug, Clone, Copy)]
pub struct Mat {
    /// Element `(0, 0)`.
    pub ptr: *const f32,
    /// Row stride, in elements.
    pub rs: isize,
    /// Column stride, in elements.
    pub cs: isize,
}

/// A strided, writable f32 matrix.
#[derive(Debug, Clone, Copy)]
pub struct MatMut {
    /// Element `(0, 0)`.
    pub ptr: *mut f32,
    /// Row stride, in elements.
    pub rs: isize,
    /// Column stride, in elements.
    pub cs: isize,
}

/// Threads for one gemm: every rayon thread from outside a rayon task, one inside.
pub fn parallelism() -> Parallelism {
    if rayon::current_thread_index().is_some() {
        return Parallelism::None;
    }
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// `dst (m×n) = [dst +] scale · lhs (m×k) · rhs (k×n)`.
///
/// # Safety
/// Every element the strides reach for the given sizes must be valid, `dst` writable and not
/// aliased by `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: MatMut,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m as isize {
                for j in 0..n as isize {
                    *dst.ptr.offset(i * dst.rs + j * dst.cs) = 0.0;
                }
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst.ptr,
        dst.cs,
        dst.rs,
        accumulate,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        if accumulate { 1.0 } else { 0.0 },
        scale,
        false,
        false,
        false,
        par,
    )
}
