//! Element-wise CPU math that the compiler vectorises, compiled three times (AVX-512, AVX2+FMA,
//! baseline) and picked at run time from what the host CPU has. Polynomials use `mul_add`,
//! which is one FMA instruction in the AVX variants (and on aarch64); an x86-64 host without
//! AVX2/FMA still computes them correctly, through libm, slowly. The approximations are the ones
//! PyTorch's vectorised CPU kernels use: Cephes' `expf` polynomial (about 1 ulp) and Abramowitz &
//! Stegun 7.1.26 for `erf` (absolute error below 1.5e-7, 4e-7 once rounded in f32).

use std::sync::OnceLock;

/// The widest instruction set this host supports, detected once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F (16 f32 lanes).
    Avx512,
    /// AVX2 with FMA (8 lanes).
    Avx2,
    /// Whatever the build target guarantees (SSE2 on x86-64, NEON on aarch64).
    Baseline,
}

/// The host's instruction set, detected on first use.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Baseline
    })
}

/// Defines `pub fn $name($args)` that runs `$body` compiled for the host's widest ISA.
macro_rules! dispatched {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$m])*
        pub fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) { body($($arg),*) }
                match $crate::kernels::simd::isa() {
                    // SAFETY: `isa()` detected these features on this CPU.
                    $crate::kernels::simd::Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    $crate::kernels::simd::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::kernels::simd::Isa::Baseline => {}
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use dispatched;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// `e^x` (Cephes `expf`): inputs are clamped to about ±88, so very negative inputs give a
/// tiny positive number instead of 0; NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // `max`/`min` (not `clamp`) turn NaN into a finite number, so the conversion below is
    // defined; the NaN comes back at the end.
    #[allow(clippy::manual_clamp)] // clamp keeps NaN, which must not reach the conversion
    let xc = x.max(-87.336_55).min(88.722_83);
    let n = xc.mul_add(LOG2E, 0.5).floor();
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, xc));
    let r2 = r * r;
    let mut p = 1.987_569_1e-4_f32;
    p = p.mul_add(r, 1.398_2e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 0.166_666_65);
    p = p.mul_add(r, 0.5);
    let y = p.mul_add(r2, r) + 1.0;
    // 2^n through the exponent bits (`as i32` saturates, which keeps the loop scalar).
    // SAFETY: n is a finite integer within [-126, 128] (xc is finite and clamped).
    let ni: i32 = unsafe { n.to_int_unchecked() };
    let scale = f32::from_bits(((ni + 127).clamp(1, 254) as u32) << 23);
    // n = 128 only at the very top of the range: split the scale so it does not overflow.
    let y = if n > 127.0 {
        y * 2.0 * f32::from_bits(127 << 23)
    } else {
        y * scale
    };
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// The error function (Abramowitz & Stegun 7.1.26).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / 0.327_591_1f32.mul_add(a, 1.0);
    let mut p = 1.061_405_4_f32;
    p = p.mul_add(t, -1.453_152_1);
    p = p.mul_add(t, 1.421_413_8);
    p = p.mul_add(t, -0.284_496_72);
    p = p.mul_add(t, 0.254_829_6);
    let y = (-p * t).mul_add(exp(-a * a), 1.0);
    if x < 0.0 {
        -y
    } else {
        y
    }
}

/// `x · sigmoid(x)`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// The exact (erf) GELU, `x/2 · (1 + erf(x/√2))`.
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

dispatched! {
    /// `xs[i] = e^(xs[i] - shift)` and returns their sum (the softmax numerator in place).
    pub fn exp_shifted_sum_in_place(xs: &mut [f32], shift: f32, sum: &mut f32) {
        // Sixteen partial sums keep the reduction vectorisable.
        let mut acc = [0f32; 16];
        let mut chunks = xs.chunks_exact_mut(16);
        for c in &mut chunks {
            for (a, x) in acc.iter_mut().zip(c.iter_mut()) {
                *x = exp(*x - shift);
                *a += *x;
            }
        }
        let mut tail = 0f32;
        for x in chunks.into_remainder() {
            *x = exp(*x - shift);
            tail += *x;
        }
        *sum = acc.iter().sum::<f32>() + tail;
    }
}

dispatched! {
    /// `xs[i] *= s`.
    pub fn scale_in_place(xs: &mut [f32], s: f32) {
        for x in xs {
            *x *= s;
        }
    }
}

dispatched! {
    /// `out[i] = quick_gelu(xs[i])` (`x · sigmoid(1.702·x)`) or, without `quick`, `gelu_erf`.
    pub fn activation(xs: &[f32], quick: bool, out: &mut [f32]) {
        if quick {
            for (o, &x) in out.iter_mut().zip(xs) {
                *o = x / (1.0 + exp(-1.702 * x));
            }
        } else {
            for (o, &x) in out.iter_mut().zip(xs) {
                *o = gelu_erf(x);
            }
        }
    }
}

dispatched! {
    /// `out[i] = value[i] · gelu_erf(gate[i])`: the GEGLU activation.
    pub fn geglu(value: &[f32], gate: &[f32], out: &mut [f32]) {
        for ((o, v), g) in out.iter_mut().zip(value).zip(gate) {
            *o = v * gelu_erf(*g);
        }
    }
}

dispatched! {
    /// `out[i] = (xs[i] - shift)·a + b`, then SiLU when `do_silu` (GroupNorm's affine step).
    pub fn affine(xs: &[f32], shift: f32, a: f32, b: f32, do_silu: bool, out: &mut [f32]) {
        if do_silu {
            for (o, x) in out.iter_mut().zip(xs) {
                *o = silu((x - shift) * a + b);
            }
        } else {
            for (o, x) in out.iter_mut().zip(xs) {
                *o = (x - shift) * a + b;
            }
        }
    }
}

dispatched! {
    /// Running maximum of `xs` into `max`.
    pub fn max_into(xs: &[f32], max: &mut f32) {
        let mut acc = [f32::NEG_INFINITY; 16];
        let mut chunks = xs.chunks_exact(16);
        // Plain comparisons (one vmaxps) instead of f32::max's NaN rules; a NaN score makes
        // the softmax NaN either way.
        for c in &mut chunks {
            for (a, x) in acc.iter_mut().zip(c) {
                *a = if *x > *a { *x } else { *a };
            }
        }
        let mut m = acc.iter().fold(*max, |m, &a| if a > m { a } else { m });
        for &x in chunks.remainder() {
            m = if x > m { x } else { m };
        }
        *max = m;
    }
}

/// Sum and sum of squared deviations from the mean of `xs`, in f64 (GroupNorm statistics).
pub fn mean_var(xs: &[f32]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let mut sum = 0f64;
    sum_f64(xs, &mut sum);
    let mean = sum / n;
    let mut sq = 0f64;
    sq_dev_f64(xs, mean, &mut sq);
    (mean, sq / n)
}

dispatched! {
    /// `sum += Σ xs[i]` with f64 partial sums.
    pub fn sum_f64(xs: &[f32], sum: &mut f64) {
        let mut acc = [0f64; 8];
        let mut chunks = xs.chunks_exact(8);
        for c in &mut chunks {
            for (a, x) in acc.iter_mut().zip(c) {
                *a += *x as f64;
            }
        }
        *sum += acc.iter().sum::<f64>() + chunks.remainder().iter().map(|&x| x as f64).sum::<f64>();
    }
}

dispatched! {
    /// `sum += Σ (xs[i] - mean)²` with f64 partial sums.
    pub fn sq_dev_f64(xs: &[f32], mean: f64, sum: &mut f64) {
        let mut acc = [0f64; 8];
        let mut chunks = xs.chunks_exact(8);
        for c in &mut chunks {
            for (a, x) in acc.iter_mut().zip(c) {
                let d = *x as f64 - mean;
                *a += d * d;
            }
        }
        let tail: f64 = chunks.remainder().iter().map(|&x| { let d = x as f64 - mean; d * d }).sum();
        *sum += acc.iter().sum::<f64>() + tail;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_std_over_the_softmax_range() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert!(exp(-1e30) < 1e-37 && exp(-1e30) >= 0.0);
        assert!(exp(1e30).is_finite());
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn erf_and_gelu_match_the_exact_functions() {
        for i in -800..800 {
            let x = i as f32 / 100.0;
            let exact = candle_core::cpu::erf::erf_f64(x as f64) as f32;
            // A&S 7.1.26 is within 1.5e-7 in exact arithmetic; f32 rounding adds a little.
            assert!(
                (erf(x) - exact).abs() < 4e-7,
                "erf({x}): {} vs {exact}",
                erf(x)
            );
            let g = 0.5 * x as f64 * (1.0 + candle_core::cpu::erf::erf_f64(x as f64 / 2f64.sqrt()));
            assert!(
                (gelu_erf(x) as f64 - g).abs() < 1e-6 * (1.0 + g.abs()),
                "gelu({x})"
            );
        }
    }

    #[test]
    fn dispatched_softmax_pieces_agree_with_scalar_math() {
        let xs: Vec<f32> = (0..1000)
            .map(|i| ((i * 37) % 101) as f32 / 7.0 - 5.0)
            .collect();
        let mut m = f32::NEG_INFINITY;
        max_into(&xs, &mut m);
        assert_eq!(m, xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
        let mut e = xs.clone();
        let mut s = 0f32;
        exp_shifted_sum_in_place(&mut e, m, &mut s);
        let want: f64 = xs.iter().map(|&x| ((x - m) as f64).exp()).sum();
        assert!((s as f64 - want).abs() < 1e-4 * want);
        let (mean, var) = mean_var(&xs);
        let n = xs.len() as f64;
        let mu = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
        let v = xs.iter().map(|&x| (x as f64 - mu).powi(2)).sum::<f64>() / n;
        assert!((mean - mu).abs() < 1e-12 && (var - v).abs() < 1e-9);
    }
}
