//! Element-wise activations of the text encoders on the CPU, in one parallel SIMD pass
//! (candle runs `x · sigmoid(1.702·x)` as three single-threaded passes). The reference is
//! [`crate::layers::Activation::apply_reference`].

use super::cpu::{cpu_f32, uninit_vec};
use super::simd;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};
use rayon::prelude::*;

/// Values per rayon task.
const CHUNK: usize = 16384;

/// Which activation [`FusedActivation`] applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `x · sigmoid(1.702·x)` (OpenAI CLIP).
    QuickGelu,
    /// The exact (erf) GELU (OpenCLIP).
    GeluErf,
}

/// An element-wise activation.
#[derive(Debug, Clone, Copy)]
pub struct FusedActivation(pub Kind);

impl CustomOp1 for FusedActivation {
    fn name(&self) -> &'static str {
        "jhakaas-activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "activation input")?;
        // Every element is written: the output chunks mirror the input chunks.
        let mut out = uninit_vec(x.len());
        let kind = self.0;
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(o, x)| simd::activation(x, kind == Kind::QuickGelu, o));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}
