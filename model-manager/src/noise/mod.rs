//! Host-side seeded noise, drawn for each request by the generator it names ([`RngKind`]):
//! our per-image ChaCha20 streams, or torch's CPU or CUDA generator in diffusers' order, so
//! that a seed gives the image the Python worker gave for it.

mod chacha;
mod mt19937;
mod torch_cpu;
mod torch_cuda;

pub use chacha::NormalStream;
pub use mt19937::Mt19937;
pub use torch_cpu::TorchCpuGenerator;
pub use torch_cuda::{CudaGrid, TorchCudaGenerator};

use crate::error::{Error, Result};
use candle_core::DType;
use std::fmt;
use std::str::FromStr;

/// Which generator draws a request's noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RngKind {
    /// `chacha`: image `i` draws from its own ChaCha20 stream seeded with `seed + i`, so its
    /// pixels do not depend on how many images ran with it, on concurrency or on the device.
    #[default]
    ChaCha,
    /// `torch-cpu`: one `torch.Generator("cpu").manual_seed(seed)` for the whole request,
    /// drawn where and in the order diffusers draws (initial latents of all images at once, an
    /// init image's posterior sample, each stochastic step's noise), so the seed reproduces
    /// diffusers' image. Every image of the request reports the request's seed.
    TorchCpu,
    /// `torch-cuda`: the same with `torch.Generator("cuda")` (Philox4x32-10, computed on the
    /// host), for Python workers that drew on the GPU; laid out as on the GPU the request's
    /// [`CudaGrid`] describes (an H100 by default). Not yet compared with a GPU's draws.
    TorchCuda,
}

impl RngKind {
    /// Every kind, in the order they are listed to users.
    pub const ALL: [RngKind; 3] = [RngKind::ChaCha, RngKind::TorchCpu, RngKind::TorchCuda];

    /// The name requests use (`chacha`, `torch-cpu`, `torch-cuda`).
    pub fn as_str(self) -> &'static str {
        match self {
            RngKind::ChaCha => "chacha",
            RngKind::TorchCpu => "torch-cpu",
            RngKind::TorchCuda => "torch-cuda",
        }
    }

    /// The seed image `index` of a request seeded `seed` reports: its own stream's seed
    /// (`seed + index`) with `chacha`; the request's (one generator for all) with torch's.
    pub fn image_seed(self, seed: u64, index: usize) -> u64 {
        match self {
            RngKind::ChaCha => seed.wrapping_add(index as u64),
            RngKind::TorchCpu | RngKind::TorchCuda => seed,
        }
    }
}

impl fmt::Display for RngKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RngKind {
    type Err = Error;

    /// Parses a request's generator name (ASCII case-insensitive, surrounding spaces ignored).
    fn from_str(s: &str) -> Result<Self> {
        RngKind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                let valid: Vec<&str> = RngKind::ALL.iter().map(|k| k.as_str()).collect();
                Error::invalid(
                    "rng",
                    format!("unknown generator `{s}`; valid names: {}", valid.join(", ")),
                )
            })
    }
}

/// The noise of one request, drawn by its [`RngKind`].
#[derive(Debug, Clone)]
pub enum RequestNoise {
    /// One stream per image.
    PerImage(Vec<NormalStream>),
    /// One torch CPU generator for the request.
    TorchCpu(TorchCpuGenerator),
    /// One torch CUDA generator for the request.
    TorchCuda(TorchCudaGenerator),
}

impl RequestNoise {
    /// The generator(s) of a request seeded `seed` with `images` images; `grid` is the GPU
    /// `torch-cuda` lays its draws out for.
    pub fn new(kind: RngKind, seed: u64, images: usize, grid: CudaGrid) -> Self {
        match kind {
            RngKind::ChaCha => RequestNoise::PerImage(
                (0..images)
                    .map(|i| NormalStream::new(kind.image_seed(seed, i)))
                    .collect(),
            ),
            RngKind::TorchCpu => RequestNoise::TorchCpu(TorchCpuGenerator::new(seed)),
            RngKind::TorchCuda => RequestNoise::TorchCuda(TorchCudaGenerator::new(seed, grid)),
        }
    }

    /// Noise for `images` images of `per_image` values each, batch-major (initial latents, a
    /// step's noise): each image from its own stream, or the whole batch as one torch draw of
    /// a `dtype` tensor (torch's CPU generator lays out half-precision draws differently; the
    /// values come back in f32 for the caller to round).
    pub fn batch(&mut self, images: usize, per_image: usize, dtype: DType) -> Vec<f32> {
        let n = images * per_image;
        match self {
            RequestNoise::PerImage(streams) => {
                debug_assert_eq!(streams.len(), images);
                streams.iter_mut().flat_map(|s| s.fill(per_image)).collect()
            }
            RequestNoise::TorchCpu(g) if is_half(dtype) => g.randn_half(n),
            RequestNoise::TorchCpu(g) => g.randn(n),
            RequestNoise::TorchCuda(g) => g.randn(n),
        }
    }

    /// The VAE posterior noise of one init image used by `images` images: each image its own
    /// sample from its stream; or, as diffusers samples the posterior of the one encoded image
    /// before repeating it for the batch, one torch draw repeated.
    pub fn posterior(&mut self, images: usize, per_image: usize, dtype: DType) -> Vec<f32> {
        match self {
            RequestNoise::PerImage(_) => self.batch(images, per_image, dtype),
            _ => self.batch(1, per_image, dtype).repeat(images),
        }
    }
}

/// Whether `dtype` is a 16-bit float (torch's CPU generator has its own path for those).
fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_name_the_field() {
        for k in RngKind::ALL {
            assert_eq!(k.as_str().parse::<RngKind>().unwrap(), k);
        }
        assert_eq!(" Torch-CPU ".parse::<RngKind>().unwrap(), RngKind::TorchCpu);
        let err = "mt".parse::<RngKind>().unwrap_err().to_string();
        assert!(
            err.contains("rng") && err.contains("chacha, torch-cpu, torch-cuda"),
            "{err}"
        );
    }

    #[test]
    fn per_image_streams_do_not_depend_on_the_batch_but_torch_draws_do() {
        let mut two = RequestNoise::new(RngKind::ChaCha, 7, 2, CudaGrid::H100);
        let mut one = RequestNoise::new(RngKind::ChaCha, 8, 1, CudaGrid::H100);
        assert_eq!(
            two.batch(2, 32, DType::F32)[32..],
            one.batch(1, 32, DType::F32)[..]
        );

        let mut torch = RequestNoise::new(RngKind::TorchCpu, 7, 2, CudaGrid::H100);
        assert_eq!(
            torch.batch(2, 32, DType::F32),
            TorchCpuGenerator::new(7).randn(64)
        );
        let mut torch = RequestNoise::new(RngKind::TorchCpu, 7, 2, CudaGrid::H100);
        assert_eq!(
            torch.batch(2, 81, DType::F16),
            TorchCpuGenerator::new(7).randn_half(162)
        );
        let mut torch = RequestNoise::new(RngKind::TorchCpu, 7, 3, CudaGrid::H100);
        let posterior = torch.posterior(3, 20, DType::F32);
        assert_eq!(posterior[..20], posterior[40..]);
        assert_eq!(RngKind::TorchCpu.image_seed(7, 2), 7);
        assert_eq!(RngKind::ChaCha.image_seed(7, 2), 9);
    }
}
