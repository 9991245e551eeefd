//! torch's CPU generator, bit for bit: `torch.Generator("cpu").manual_seed(seed)` followed by
//! `torch.randn(n, generator=g)` (float32) gives the values [`TorchCpuGenerator::randn`] gives.
//!
//! What torch does (ATen `normal_kernel` on the CPU, torch 2.x; checked against torch 2.15):
//! - the engine is MT19937 seeded with the seed's low 32 bits ([`Mt19937`]);
//! - a float uniform is the low 24 bits of one 32-bit draw times 2⁻²⁴, a double uniform the low
//!   53 bits of two draws (first draw high) times 2⁻⁵³;
//! - **16 or more values**: all the float uniforms first, then Box–Muller on each block of 16
//!   (lanes `j` and `j + 8` make a pair: `u1 = 1 − data[j]`, `u2 = data[j + 8]`), computed
//!   with avx_mathfun's `log256_ps` and `sincos256_ps` (Cephes polynomials in float32, with the
//!   multiply-adds GCC fuses when it builds them for AVX2+FMA). A count that is not a multiple
//!   of 16 draws 16 fresh uniforms for the last 16 values and transforms them again;
//! - **fewer than 16 values**: one double Box–Muller pair per two values, the second kept in
//!   the generator for its next scalar draw (`sqrt(−2·log1p(−u2))`, `2π·u1`, glibc's `log1p`,
//!   `sin` and `cos`), each rounded to float.
//!
//! The float maths below is written operation by operation in avx_mathfun's order; `mul_add`
//! marks the fused multiply-adds. Tests compare with values torch produced.

use super::mt19937::Mt19937;

/// One torch CPU generator.
#[derive(Debug, Clone)]
pub struct TorchCpuGenerator {
    engine: Mt19937,
    /// The second value of the last scalar Box–Muller pair (torch's `next_double_normal_sample`).
    next_normal: Option<f64>,
}

impl TorchCpuGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`.
    pub fn new(seed: u64) -> Self {
        TorchCpuGenerator {
            engine: Mt19937::new(seed),
            next_normal: None,
        }
    }

    /// A float uniform in [0, 1): 24 random bits.
    fn uniform_f32(&mut self) -> f32 {
        (self.engine.next_u32() & 0x00ff_ffff) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// A double uniform in [0, 1): 53 random bits from two draws, the first the high half.
    fn uniform_f64(&mut self) -> f64 {
        let hi = self.engine.next_u32() as u64;
        let lo = self.engine.next_u32() as u64;
        (((hi << 32) | lo) & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// torch's scalar normal sample (double Box–Muller with the cached second value).
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(n, generator=self)` in float32, as one draw (a tensor of any shape with
    /// `n` elements draws the same values in row-major order).
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            box_muller_16(block);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        data
    }
}

impl TorchCpuGenerator {
    /// `torch.randn(n, dtype=torch.float16, generator=self)` (and bfloat16) before rounding:
    /// the scalar path below 16 values, as for float32; from 16 on, only the whole blocks of 16
    /// draw uniforms before the 16 fresh ones of a tail (float32 draws one per value first), so
    /// a count that is not a multiple of 16 lays out differently from a float32 draw.
    pub fn randn_half(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return self.randn(n);
        }
        let whole = n / 16 * 16;
        let mut data: Vec<f32> = (0..whole).map(|_| self.uniform_f32()).collect();
        data.resize(n, 0.0);
        for block in data[..whole].chunks_exact_mut(16) {
            box_muller_16(block);
        }
        if whole != n {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        data
    }
}

/// Box–Muller on one block of 16 uniforms, in place (torch's `NormalFill16` for AVX2, mean 0
/// and standard deviation 1).
fn box_muller_16(block: &mut [f32]) {
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0 - block[j];
        let u2 = block[j + 8];
        let radius = (-2.0 * log_ps(u1)).sqrt();
        let (sin, cos) = sincos_ps(two_pi * u2);
        block[j] = radius * cos;
        block[j + 8] = radius * sin;
    }
}

// avx_mathfun's constants: C double literals stored into float arrays, hence `f64 as f32`.
const SQRTHF: f32 = std::f64::consts::FRAC_1_SQRT_2 as f32;
const LOG_P: [f32; 9] = [
    7.0376836292E-2_f64 as f32,
    -1.1514610310E-1_f64 as f32,
    1.1676998740E-1_f64 as f32,
    -1.2420140846E-1_f64 as f32,
    1.4249322787E-1_f64 as f32,
    -1.6668057665E-1_f64 as f32,
    2.0000714765E-1_f64 as f32,
    -2.4999993993E-1_f64 as f32,
    3.3333331174E-1_f64 as f32,
];
const LOG_Q1: f32 = -2.12194440e-4_f64 as f32;
const LOG_Q2: f32 = 0.693359375_f64 as f32;
const FOPI: f32 = 1.27323954473516_f64 as f32;
#[allow(clippy::excessive_precision)] // avx_mathfun's literals, verbatim
const DP: [f32; 3] = [
    -0.78515625_f64 as f32,
    -2.4187564849853515625e-4_f64 as f32,
    -3.77489497744594108e-8_f64 as f32,
];
const SIN_P: [f32; 3] = [
    -1.9515295891E-4_f64 as f32,
    8.3321608736E-3_f64 as f32,
    -1.6666654611E-1_f64 as f32,
];
const COS_P: [f32; 3] = [
    2.443315711809948E-005_f64 as f32,
    -1.388731625493765E-003_f64 as f32,
    4.166664568298827E-002_f64 as f32,
];

/// avx_mathfun's `log256_ps` for one lane with `x > 0` (torch only takes logs of (0, 1]).
fn log_ps(x: f32) -> f32 {
    let x = x.max(f32::from_bits(0x0080_0000));
    let bits = x.to_bits();
    let exponent = (bits >> 23) as i32 - 0x7f;
    let mut x = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    let mut e = exponent as f32 + 1.0;
    let below = x < SQRTHF;
    let tmp = if below { x } else { 0.0 };
    x -= 1.0;
    e -= if below { 1.0 } else { 0.0 };
    x += tmp;
    let z = x * x;
    let mut y = LOG_P[0];
    for &p in &LOG_P[1..] {
        y = y.mul_add(x, p);
    }
    y *= x;
    y = y.mul_add(z, e * LOG_Q1);
    y = z.mul_add(-0.5, y);
    x += y;
    e.mul_add(LOG_Q2, x)
}

/// avx_mathfun's `sincos256_ps` for one lane: `(sin x, cos x)`.
fn sincos_ps(x: f32) -> (f32, f32) {
    let sign_sin = x.to_bits() & 0x8000_0000;
    let x = x.abs();
    let mut j = (x * FOPI) as i32;
    j = (j + 1) & !1;
    let y = j as f32;
    let swap_sign_sin = ((j & 4) as u32) << 29;
    let first_polynomial = (j & 2) == 0;
    let x = y.mul_add(DP[2], y.mul_add(DP[1], y.mul_add(DP[0], x)));
    let sign_cos = ((!(j - 2) & 4) as u32) << 29;
    let sign_sin = sign_sin ^ swap_sign_sin;
    let z = x * x;
    let mut c = COS_P[0].mul_add(z, COS_P[1]);
    c = c.mul_add(z, COS_P[2]);
    c *= z;
    c = c.mul_add(z, -(z * 0.5));
    c += 1.0;
    let mut s = SIN_P[0].mul_add(z, SIN_P[1]);
    s = s.mul_add(z, SIN_P[2]);
    s *= z;
    s = s.mul_add(x, x);
    // The polynomial selection as avx_mathfun writes it (masked adds and subtractions, so
    // even the signs of zeros come out the same).
    let (from_cos, from_sin) = if first_polynomial { (0.0, s) } else { (c, 0.0) };
    let sin = from_cos + from_sin;
    let cos = (c - from_cos) + (s - from_sin);
    (
        f32::from_bits(sin.to_bits() ^ sign_sin),
        f32::from_bits(cos.to_bits() ^ sign_cos),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fused_maths_stays_within_an_ulp_or_two_of_libm() {
        // A check of the transcription itself (the bit-exact check against torch is in
        // tests/torch_generator.rs): avx_mathfun is accurate to a few ulps.
        for i in 1..=10_000 {
            let u = i as f32 / 10_000.0;
            let ulps = |a: f32, b: f32| (a.to_bits() as i64 - b.to_bits() as i64).abs();
            assert!(ulps(log_ps(u), u.ln()) <= 2, "log({u})");
            let theta = u * std::f32::consts::TAU;
            let (s, c) = sincos_ps(theta);
            assert!((s - theta.sin()).abs() <= 2e-7, "sin({theta})");
            assert!((c - theta.cos()).abs() <= 2e-7, "cos({theta})");
        }
    }

    #[test]
    fn scalar_draws_cache_the_second_value_of_a_pair() {
        let mut one = TorchCpuGenerator::new(3);
        let five = one.randn(5);
        let three = one.randn(3);
        let mut other = TorchCpuGenerator::new(3);
        let eight = other.randn(8);
        assert_eq!([five, three].concat(), eight);
    }
}
