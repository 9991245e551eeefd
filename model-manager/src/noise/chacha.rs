//! The `chacha` generator: each image owns one ChaCha20 stream seeded with its own seed, so its
//! pixels do not depend on batch size, concurrency or device; normals come from Box–Muller.

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

/// A stream of standard normal samples for one image.
#[derive(Debug, Clone)]
pub struct NormalStream {
    rng: ChaCha20Rng,
    spare: Option<f32>,
}

impl NormalStream {
    /// A stream for `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha20Rng::seed_from_u64(seed),
            spare: None,
        }
    }

    /// Uniform in (0, 1], never 0 so the logarithm stays finite.
    fn uniform(&mut self) -> f64 {
        ((self.rng.next_u64() >> 11) as f64 + 1.0) * (1.0 / (1u64 << 53) as f64)
    }

    /// The next standard normal sample.
    pub fn sample(&mut self) -> f32 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let (u1, u2) = (self.uniform(), self.uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some((r * theta.sin()) as f32);
        (r * theta.cos()) as f32
    }

    /// `n` samples.
    pub fn fill(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.sample()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_roughly_standard() {
        let a = NormalStream::new(42).fill(20_000);
        let b = NormalStream::new(42).fill(20_000);
        assert_eq!(a, b);
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
        assert_ne!(NormalStream::new(43).fill(4), a[..4].to_vec());
    }
}
