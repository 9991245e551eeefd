//! Shared plumbing of the CPU kernels: f32 views of candle storage, output buffers written
//! before they are read, and pointers for rayon tasks that write disjoint parts of one buffer.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Tensor};

/// A raw pointer that may cross into rayon tasks writing disjoint parts of one buffer.
#[derive(Debug)]
pub struct SendPtr<T = f32>(pub *mut T);
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
// SAFETY: users only write disjoint elements from different tasks.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the whole `SendPtr`, not its field).
    pub fn get(&self) -> *mut T {
        self.0
    }
}

/// Element types for which every bit pattern is a valid value (so a buffer may be handed out
/// before it is written).
///
/// # Safety
/// Implementors must have no invalid bit patterns and no drop glue.
pub unsafe trait Plain: Copy + Send + Sync + 'static {}
// SAFETY: IEEE floats of every width accept any bits.
unsafe impl Plain for f32 {}
// SAFETY: as above.
unsafe impl Plain for half::f16 {}

/// A `Vec` of `len` elements whose contents the caller overwrites before reading.
pub fn uninit_vec<T: Plain>(len: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: `T: Plain` has no invalid bit patterns; every caller writes each element before
    // it is read (documented at each use).
    #[allow(clippy::uninit_vec)]
    unsafe {
        v.set_len(len)
    };
    v
}

/// Runs `f` on the contiguous f32 values of a side tensor (bias, addend) without copying them.
pub fn with_values<R>(
    t: &Tensor,
    what: &str,
    elems: usize,
    f: impl FnOnce(&[f32]) -> R,
) -> Result<R> {
    if t.elem_count() != elems {
        candle_core::bail!("{what} has {} values, expected {elems}", t.elem_count());
    }
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(s) => Ok(f(cpu_f32(s, layout, what)?)),
        _ => candle_core::bail!("{what} must be on the CPU"),
    }
}

pub fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    if !l.is_contiguous() {
        candle_core::bail!("{what} must be contiguous");
    }
    match s {
        CpuStorage::F32(v) => Ok(&v[l.start_offset()..l.start_offset() + l.shape().elem_count()]),
        other => candle_core::bail!(
            "{what}: the CPU kernel runs in f32, got {:?}",
            other.dtype()
        ),
    }
}

/// Makes glibc's allocator keep freed memory for reuse instead of unmapping every large block
/// (its default past a threshold), so the tensors of a denoising step reuse the previous
/// step's pages instead of faulting in and zeroing fresh ones. Process-wide; binaries call it
/// once at start. A no-op off glibc.
pub fn retain_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before threads allocate heavily.
    unsafe {
        // Blocks up to 256 MiB come from the heap (not a fresh mmap each time) and the heap is
        // not trimmed back to the OS below 1 GiB of free space. One arena: a thread's own
        // arena cannot hold blocks past 64 MiB and would mmap them afresh (the server's engine
        // thread ran a 512² job 15% slower than the main thread before this).
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Hands the freed memory [`retain_freed_memory`] keeps back to the system (glibc's
/// `malloc_trim`): the resident set drops to the memory in use, and the next large tensors
/// fault in fresh pages. A no-op off glibc.
pub fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; any thread may call it at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
