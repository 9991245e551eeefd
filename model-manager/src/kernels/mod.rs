//! Our own kernels, each a candle custom op behind one door in [`crate::layers`]
//! (`attention`, `group_norm`, `conv2d`, `linear`, `geglu`), whose reference is the plain candle
//! math kept next to the door. CPU kernels are f32 and dispatch SIMD at run time
//! ([`simd::isa`]); CUDA kernels (`cuda/*.cu`, built with the `cuda` feature) take f16, bf16
//! and f32.
//!
//! Which implementation runs is one process-wide choice ([`set_kernels`]): `auto` runs every
//! kernel that has been checked on its device against its reference, `fused` also the CUDA
//! kernels that have not been (yet), `reference` only the plain candle math.

// Kernels index several buffers with one loop counter; iterator chains would hide the math.
#![allow(clippy::needless_range_loop)]

pub mod activation;
pub mod attention;
pub mod conv2d;
pub(crate) mod cpu;
mod cpu_gemm;
#[cfg(feature = "cuda")]
mod cuda;
pub mod geglu;
pub mod group_norm;
pub mod held;
pub mod launch;
pub mod layout;
pub mod linear;
mod microkernel;
pub mod profile;
pub mod simd;
mod winograd;

use candle_core::{DType, Device};
pub use cpu::{retain_freed_memory, return_freed_memory};
use std::sync::atomic::{AtomicU8, Ordering};

/// Which implementation of the layer math runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KernelChoice {
    /// Our CPU kernels; on CUDA, the f16 attention without upcast and candle's other ops.
    #[default]
    Auto,
    /// Every fused kernel, the CUDA ones included.
    Fused,
    /// The plain candle math everywhere (the reference the kernels are tested against).
    Reference,
}

impl std::str::FromStr for KernelChoice {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "fused" => Ok(Self::Fused),
            "reference" => Ok(Self::Reference),
            other => Err(crate::Error::invalid(
                "kernels",
                format!("`{other}` is not one of auto, fused, reference"),
            )),
        }
    }
}

static CHOICE: AtomicU8 = AtomicU8::new(0);

/// Sets the process-wide kernel choice (the CLI's `--kernels`).
pub fn set_kernels(choice: KernelChoice) {
    CHOICE.store(choice as u8, Ordering::Relaxed);
}

/// The process-wide kernel choice.
pub fn kernels() -> KernelChoice {
    match CHOICE.load(Ordering::Relaxed) {
        1 => KernelChoice::Fused,
        2 => KernelChoice::Reference,
        _ => KernelChoice::Auto,
    }
}

/// Where a layer's math runs for a tensor on `device` in `dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Our f32 CPU kernel.
    Cpu,
    /// Our CUDA kernel.
    Cuda,
    /// The plain candle math.
    Reference,
}

/// The path for a layer: CPU kernels run on f32 CPU tensors unless the reference is chosen;
/// CUDA kernels only when asked for with [`KernelChoice::Fused`] and built in.
pub fn path(device: &Device, dtype: DType) -> Path {
    path_for(kernels(), device, dtype)
}

/// [`path`] for an explicit choice (tests compare the paths side by side).
pub fn path_for(choice: KernelChoice, device: &Device, dtype: DType) -> Path {
    match choice {
        KernelChoice::Reference => Path::Reference,
        _ if device.is_cpu() && dtype == DType::F32 => Path::Cpu,
        KernelChoice::Fused if device.is_cuda() && cfg!(feature = "cuda") => Path::Cuda,
        _ => Path::Reference,
    }
}
