//! torch's CUDA generator, computed on the host: `torch.randn(..., device="cuda",
//! generator=torch.Generator("cuda").manual_seed(seed))` as torch 2.x draws it.
//!
//! torch's `normal_` kernel (`distribution_nullary_kernel` with `curand_normal4`) launches
//! blocks of 256 threads, at most `multiprocessors × max_threads_per_multiprocessor / 256` of
//! them. Thread `idx` seeds curand's Philox4x32-10 with `curand_init(seed, idx, offset)` and, per
//! pass over the tensor, draws one `curand_normal4` (Box–Muller on four 32-bit words) for the
//! elements `idx + stride · (4·pass + i)`, `i < 4`, `stride = 256 · blocks`. The generator's
//! offset then advances by 4 per pass. Which element a value lands in therefore depends on the
//! GPU's size once a draw holds more values than the GPU has resident threads ([`CudaGrid`]).
//!
//! The one part we cannot reproduce bit for bit is the device's `__sincosf`, a hardware
//! approximation (absolute error ~2⁻²¹·⁴); we compute sine and cosine exactly. How close the
//! values come is measured on a GPU by `benches/gpu/torch_cuda_randn.py`.

/// Philox4x32-10's round multipliers and Weyl key increments (Salmon et al. 2011).
const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;
/// torch's block size for random kernels.
const BLOCK: u64 = 256;
/// `curand4_engine_calls`: values per `curand_normal4`, and Philox counter steps per pass.
const PER_CALL: u64 = 4;

/// The launch bound of torch's random kernels on one GPU model: the number of multiprocessors
/// and the resident threads each can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaGrid {
    /// `multiProcessorCount`.
    pub multiprocessors: u32,
    /// `maxThreadsPerMultiProcessor`.
    pub max_threads_per_multiprocessor: u32,
}

impl CudaGrid {
    /// NVIDIA H100 SXM and H200: 132 multiprocessors of 2,048 threads (draws of up to 270,336
    /// values are laid out alike on every GPU at least this large).
    pub const H100: CudaGrid = CudaGrid {
        multiprocessors: 132,
        max_threads_per_multiprocessor: 2048,
    };
    /// NVIDIA A100: 108 × 2,048.
    pub const A100: CudaGrid = CudaGrid {
        multiprocessors: 108,
        max_threads_per_multiprocessor: 2048,
    };
    /// NVIDIA L4: 58 × 1,536 (draws above 89,088 values differ from an H100's layout).
    pub const L4: CudaGrid = CudaGrid {
        multiprocessors: 58,
        max_threads_per_multiprocessor: 1536,
    };
    /// NVIDIA A10G: 80 × 1,536.
    pub const A10G: CudaGrid = CudaGrid {
        multiprocessors: 80,
        max_threads_per_multiprocessor: 1536,
    };
    /// NVIDIA T4: 40 × 1,024.
    pub const T4: CudaGrid = CudaGrid {
        multiprocessors: 40,
        max_threads_per_multiprocessor: 1024,
    };
    /// The names [`CudaGrid::from_str`] knows, with their grids.
    pub const NAMED: [(&'static str, CudaGrid); 6] = [
        ("h100", CudaGrid::H100),
        ("h200", CudaGrid::H100),
        ("a100", CudaGrid::A100),
        ("l4", CudaGrid::L4),
        ("a10g", CudaGrid::A10G),
        ("t4", CudaGrid::T4),
    ];

    /// The most blocks torch launches.
    fn max_blocks(self) -> u64 {
        let per_sm = (self.max_threads_per_multiprocessor as u64 / BLOCK).max(1);
        self.multiprocessors.max(1) as u64 * per_sm
    }
}

impl Default for CudaGrid {
    /// An H100's (the GPUs this worker is deployed on).
    fn default() -> Self {
        CudaGrid::H100
    }
}

impl std::str::FromStr for CudaGrid {
    type Err = crate::error::Error;

    /// A GPU name (`h100`, `h200`, `a100`, `l4`, `a10g`, `t4`; case-insensitive) or
    /// `MULTIPROCESSORS:THREADS_PER_MULTIPROCESSOR` as `torch.cuda.get_device_properties` gives
    /// them; errors name the field `torch_cuda_gpu`.
    fn from_str(s: &str) -> crate::error::Result<Self> {
        let wanted = s.trim().to_ascii_lowercase();
        if let Some((_, grid)) = CudaGrid::NAMED.iter().find(|(n, _)| *n == wanted) {
            return Ok(*grid);
        }
        let parsed = wanted.split_once(':').and_then(|(sms, threads)| {
            Some(CudaGrid {
                multiprocessors: sms.parse().ok().filter(|&v: &u32| v > 0)?,
                max_threads_per_multiprocessor: threads.parse().ok().filter(|&v: &u32| v >= 256)?,
            })
        });
        parsed.ok_or_else(|| {
            let names: Vec<&str> = CudaGrid::NAMED.iter().map(|(n, _)| *n).collect();
            crate::error::Error::invalid(
                "torch_cuda_gpu",
                format!(
                    "`{s}` is neither a GPU ({}) nor MULTIPROCESSORS:THREADS (threads ≥ 256)",
                    names.join(", ")
                ),
            )
        })
    }
}

/// `torch.Generator("cuda").manual_seed(seed)`: the full 64-bit seed and the Philox offset.
#[derive(Debug, Clone)]
pub struct TorchCudaGenerator {
    seed: u64,
    offset: u64,
    grid: CudaGrid,
}

impl TorchCudaGenerator {
    /// A generator seeded like `manual_seed(seed)` on a GPU of `grid`'s size.
    pub fn new(seed: u64, grid: CudaGrid) -> Self {
        TorchCudaGenerator {
            seed,
            offset: 0,
            grid,
        }
    }

    /// `torch.randn(n, device="cuda", generator=self)` in float32 (half-precision draws are these
    /// values rounded).
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n];
        if n == 0 {
            return out;
        }
        let numel = n as u64;
        let blocks = numel.div_ceil(BLOCK).min(self.grid.max_blocks());
        let stride = BLOCK * blocks;
        let passes = (numel - 1) / (stride * PER_CALL) + 1;
        let offset = self.offset;
        // `philox_cuda_state(counter_offset)`: the offset advances in multiples of 4.
        self.offset += (passes * PER_CALL).div_ceil(4) * 4;
        for idx in 0..stride {
            let mut state = PhiloxState::new(self.seed, idx, offset);
            for pass in 0..passes {
                let values = normal4(state.next4());
                for (i, v) in values.into_iter().enumerate() {
                    let li = idx + stride * (PER_CALL * pass + i as u64);
                    if li < numel {
                        out[li as usize] = v;
                    }
                }
            }
        }
        out
    }
}

/// curand's `curandStatePhilox4_32_10_t` for offsets that are multiples of 4 (torch's only).
struct PhiloxState {
    ctr: [u32; 4],
    key: [u32; 2],
}

impl PhiloxState {
    /// `curand_init(seed, subsequence, offset)`.
    fn new(seed: u64, subsequence: u64, offset: u64) -> Self {
        let mut s = PhiloxState {
            ctr: [0, 0, subsequence as u32, (subsequence >> 32) as u32],
            key: [seed as u32, (seed >> 32) as u32],
        };
        s.advance(offset / 4);
        s
    }

    /// curand's `Philox_State_Incr(s, n)`: adds `n` to the low 64 counter bits (its carry into
    /// the high half only when the second word wraps).
    fn advance(&mut self, n: u64) {
        let (lo, mut hi) = (n as u32, (n >> 32) as u32);
        self.ctr[0] = self.ctr[0].wrapping_add(lo);
        if self.ctr[0] < lo {
            hi = hi.wrapping_add(1);
        }
        self.ctr[1] = self.ctr[1].wrapping_add(hi);
        if hi <= self.ctr[1] {
            return;
        }
        self.ctr[2] = self.ctr[2].wrapping_add(1);
        if self.ctr[2] == 0 {
            self.ctr[3] = self.ctr[3].wrapping_add(1);
        }
    }

    /// `curand4`: the block at the current counter, then the counter moves on by one.
    fn next4(&mut self) -> [u32; 4] {
        let out = philox4x32_10(self.ctr, self.key);
        self.advance(1);
        out
    }
}

/// Philox4x32 with 10 rounds.
pub(crate) fn philox4x32_10(mut ctr: [u32; 4], mut key: [u32; 2]) -> [u32; 4] {
    for round in 0..10 {
        if round > 0 {
            key[0] = key[0].wrapping_add(W0);
            key[1] = key[1].wrapping_add(W1);
        }
        let p0 = M0 as u64 * ctr[0] as u64;
        let p1 = M1 as u64 * ctr[2] as u64;
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        ctr = [hi1 ^ ctr[1] ^ key[0], lo1, hi0 ^ ctr[3] ^ key[1], lo0];
    }
    ctr
}

/// `curand_box_muller4`: two Box–Muller pairs `(sin, cos)` from four words.
fn normal4(x: [u32; 4]) -> [f32; 4] {
    let (a, b) = box_muller(x[0], x[1]);
    let (c, d) = box_muller(x[2], x[3]);
    [a, b, c, d]
}

/// `_curand_box_muller(x, y)` in float32, with nvcc's contraction of `a * b + c` into an FMA;
/// `logf`, `sin` and `cos` are the correctly rounded values (see the module doc).
fn box_muller(x: u32, y: u32) -> (f32, f32) {
    const INV: f32 = 2.328_306_4e-10;
    const INV_2PI: f32 = INV * 6.283_185_5;
    let u = (x as f32).mul_add(INV, INV / 2.0);
    let v = (y as f32).mul_add(INV_2PI, INV_2PI / 2.0);
    let s = (-2.0 * ((u as f64).ln() as f32)).sqrt();
    let v = v as f64;
    ((v.sin() as f32) * s, (v.cos() as f32) * s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random123's known-answer tests for Philox4x32-10.
    #[test]
    fn philox_matches_random123_known_answers() {
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    /// The element layout: thread `idx`'s first value is element `idx`; beyond the grid, a
    /// thread's second value lands one stride further; successive draws move the offset on.
    #[test]
    fn layout_and_offsets_follow_torchs_kernel() {
        let grid = CudaGrid {
            multiprocessors: 1,
            max_threads_per_multiprocessor: 256,
        };
        let first = |seed, idx, offset| normal4(PhiloxState::new(seed, idx, offset).next4());
        let mut g = TorchCudaGenerator::new(42, grid);
        let small = g.randn(300);
        // 300 values on 1 block: 2 passes are not needed (one pass covers 4 × 256).
        assert_eq!(small[5], first(42, 5, 0)[0]);
        assert_eq!(small[256 + 7], first(42, 7, 0)[1]);
        assert_eq!(g.offset, 4);
        let next = g.randn(10);
        assert_eq!(next[3], first(42, 3, 4)[0]);
        // 2,000 values on 256 threads: two passes, offset + 8.
        let mut g = TorchCudaGenerator::new(42, grid);
        let big = g.randn(2000);
        let mut second_pass = PhiloxState::new(42, 9, 0);
        second_pass.next4();
        assert_eq!(big[9 + 256 * 4], normal4(second_pass.next4())[0]);
        assert_eq!(g.offset, 8);
        // Standard normal in distribution.
        let mean = big.iter().sum::<f32>() / 2000.0;
        let var = big.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / 2000.0;
        assert!(mean.abs() < 0.1 && (var - 1.0).abs() < 0.1, "{mean} {var}");
    }

    #[test]
    fn gpus_parse_by_name_or_size_and_lay_large_draws_out_by_their_size() {
        assert_eq!("L4".parse::<CudaGrid>().unwrap(), CudaGrid::L4);
        assert_eq!("h200".parse::<CudaGrid>().unwrap(), CudaGrid::H100);
        let custom: CudaGrid = "58:1536".parse().unwrap();
        assert_eq!(custom, CudaGrid::L4);
        for bad in ["v100x", "0:1024", "58:100", "58", ""] {
            let err = bad.parse::<CudaGrid>().unwrap_err().to_string();
            assert!(err.contains("torch_cuda_gpu"), "{bad}: {err}");
        }
        // One SDXL latent (65,536 values) fits both GPUs' resident threads: the same draw.
        let n = 4 * 128 * 128;
        let (h, l) = (CudaGrid::H100, CudaGrid::L4);
        assert_eq!(
            TorchCudaGenerator::new(3, h).randn(n),
            TorchCudaGenerator::new(3, l).randn(n)
        );
        // Two of them exceed the L4's 89,088: laid out differently.
        assert_ne!(
            TorchCudaGenerator::new(3, h).randn(2 * n),
            TorchCudaGenerator::new(3, l).randn(2 * n)
        );
    }

    #[test]
    fn an_h100_draws_each_latent_value_from_its_own_thread() {
        let mut g = TorchCudaGenerator::new(7, CudaGrid::H100);
        let v = g.randn(4 * 128 * 128);
        assert_eq!(
            v[65_535],
            normal4(PhiloxState::new(7, 65_535, 0).next4())[0]
        );
    }
}
