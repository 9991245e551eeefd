//! Our CUDA kernels (`cuda/*.cu`) run on the CPU. Each case is launched exactly as
//! `kernels::launch` plans it (grid, block, argument packing, views' offsets and strides)
//! through the emulation in `cuda/emu/`, and its output is compared with the kernel's Rust
//! reference (`attention_reference`, `GroupNorm::forward_reference`, `geglu_reference`).
//! Every case runs in three builds of the emulation: plain, in three thread orders whose
//! outputs must agree bit for bit (a difference is a race); AddressSanitizer (bad global or
//! shared accesses); ThreadSanitizer (races between the barriers).
//!
//! `JHAKAAS_CUDA_EMU` names the folder `cuda/emu/build.sh` built (`.ci/cuda-emu` sets it);
//! without it these tests say so and pass. `JHAKAAS_CUDA_EMU_FAIL_FAST=1` stops at the first
//! failing case (the mutation check, `cuda/emu/mutants.py`).

use candle_core::{DType, Device, Tensor};
use jhakaas_model_manager::kernels::attention::FusedAttention;
use jhakaas_model_manager::kernels::group_norm::FusedGroupNorm;
use jhakaas_model_manager::kernels::launch::{self, Arg, Launch};
use jhakaas_model_manager::layers::{self, AttentionPrecision};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// One build of the emulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    Asan,
    Tsan,
}

impl Mode {
    fn dir(self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::Asan => "asan",
            Mode::Tsan => "tsan",
        }
    }
}

const ALL_MODES: &[Mode] = &[Mode::Plain, Mode::Asan, Mode::Tsan];
/// For the largest cases: TSan's fibers cost ~10× and their barriers are covered by the
/// smaller cases of the same kernel.
const NO_TSAN: &[Mode] = &[Mode::Plain, Mode::Asan];
/// One emulated process may run this long (a mutant that never leaves a loop is a failure).
const PROCESS_LIMIT: Duration = Duration::from_secs(60);

/// Device memory of one case: what the harness allocates (exactly this size) and fills.
enum Fill {
    Data(Vec<u8>),
    Zero,
    Poison,
}

struct Buffer {
    name: &'static str,
    dtype: DType,
    len: usize,
    fill: Fill,
}

impl Buffer {
    /// A device buffer holding `t`'s values in `dtype`.
    fn input(name: &'static str, t: &Tensor, dtype: DType) -> Result<Self> {
        Ok(Self {
            name,
            dtype,
            len: t.elem_count(),
            fill: Fill::Data(bytes(t, dtype)?),
        })
    }
}

/// One case: buffers, the launches (whose buffer number `i` is `bind[i]`), the buffer to
/// check and what it must hold.
struct Case {
    name: String,
    buffers: Vec<Buffer>,
    bind: Vec<&'static str>,
    launches: Vec<Launch>,
    output: &'static str,
    reference: Vec<f32>,
    /// The largest absolute difference allowed from the reference.
    tolerance: f32,
    modes: &'static [Mode],
}

fn elem_bytes(dtype: DType) -> usize {
    match dtype {
        DType::F32 => 4,
        _ => 2,
    }
}

/// The tensor's values in `dtype`, as the device would hold them.
fn bytes(t: &Tensor, dtype: DType) -> Result<Vec<u8>> {
    let t = t.flatten_all()?.to_dtype(dtype)?;
    Ok(match dtype {
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect(),
        other => return Err(format!("no buffers of {other:?}").into()),
    })
}

fn values(raw: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => raw
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        _ => raw
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
    }
}

/// Deterministic values in `[lo, hi)` (SplitMix64), as an f32 tensor of `shape`.
fn random(shape: &[usize], seed: u64, lo: f32, hi: f32) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5851_f42d_4c95_7f2d;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            lo + (hi - lo) * ((z >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// `t` as the device would hold it in `dtype`, widened back to f32 (the reference's input).
fn rounded(t: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(t.to_dtype(dtype)?.to_dtype(DType::F32)?)
}

fn max_abs(t: &Tensor) -> Result<f32> {
    Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Writes the case's files into `dir` and returns the harness's case text.
fn write_case(case: &Case, dir: &Path) -> Result<String> {
    let mut text = String::new();
    for b in &case.buffers {
        let fill = match &b.fill {
            Fill::Zero => "zero".to_string(),
            Fill::Poison => "poison".to_string(),
            Fill::Data(data) => {
                let path = dir.join(format!("{}.bin", b.name));
                std::fs::write(&path, data)?;
                path.display().to_string()
            }
        };
        text += &format!(
            "buffer {} {} {} {fill}\n",
            b.name,
            elem_bytes(b.dtype),
            b.len
        );
    }
    for l in &case.launches {
        let (g, k) = (l.grid, l.block);
        text += &format!(
            "launch {} {} {} {} {} {} {} {}\n",
            l.kernel, g.0, g.1, g.2, k.0, k.1, k.2, l.shared_mem_bytes
        );
        for a in &l.args {
            text += &match a {
                Arg::Buffer { index, offset } => {
                    format!("arg ptr {} {offset}\n", case.bind[*index])
                }
                Arg::I32(v) => format!("arg i32 {v}\n"),
                Arg::I64(v) => format!("arg i64 {v}\n"),
                Arg::Usize(v) => format!("arg u64 {v}\n"),
                Arg::F32(v) => format!("arg f32 {:x}\n", v.to_bits()),
            };
        }
        text += "run\n";
    }
    text += &format!("save {} out.bin\n", case.output);
    Ok(text)
}

/// Runs one emulated process; returns the output buffer's values.
fn run_harness(
    exe: &Path,
    case: &Path,
    out: &Path,
    order: &str,
    seed: u64,
) -> std::result::Result<Vec<u8>, String> {
    let mut child = Command::new(exe)
        .args(["--order", order, "--seed", &seed.to_string(), "--out"])
        .arg(out)
        .arg(case)
        .env("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=0")
        .env(
            "TSAN_OPTIONS",
            "halt_on_error=1:exitcode=66:report_signal_unsafe=0",
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    let start = Instant::now();
    let mut stderr = child.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if start.elapsed() > PROCESS_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("still running after {PROCESS_LIMIT:?} (a hang?)"));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stderr = reader.join().unwrap_or_default();
    if !status.success() {
        let report: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.contains("doesn't fully support makecontext"))
            .take(12)
            .collect();
        return Err(format!(
            "exited with {status}:\n      {}",
            report.join("\n      ")
        ));
    }
    std::fs::read(out.join("out.bin")).map_err(|e| format!("no output: {e}"))
}

/// Runs `case` in its modes; returns the largest error seen, or what went wrong.
fn check(emu: &Path, case: &Case, scratch: &Path) -> std::result::Result<f32, String> {
    let dir = scratch.join(&case.name);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let text = write_case(case, &dir).map_err(|e| e.to_string())?;
    let case_path = dir.join("case.txt");
    std::fs::write(&case_path, text).map_err(|e| e.to_string())?;
    let out = case
        .buffers
        .iter()
        .find(|b| b.name == case.output)
        .expect("output buffer");
    let mut runs: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut largest = 0.0f32;
    for &mode in case.modes {
        let exe = emu.join(mode.dir()).join("jhakaas-cuda-emu");
        let orders: &[&str] = if mode == Mode::Plain {
            &["forward", "reverse", "random"]
        } else {
            &["forward"]
        };
        for &order in orders {
            let label = format!("{}/{order}", mode.dir());
            let raw = run_harness(&exe, &case_path, &dir, order, 7)
                .map_err(|e| format!("{label}: {e}"))?;
            let got = values(&raw, out.dtype);
            let mut worst = (0.0f32, 0usize);
            for (i, (g, r)) in got.iter().zip(&case.reference).enumerate() {
                let err = (g - r).abs();
                if err.is_nan() || err > worst.0 {
                    worst = (if err.is_nan() { f32::INFINITY } else { err }, i);
                }
            }
            largest = largest.max(worst.0);
            if got.len() != case.reference.len() || worst.0 > case.tolerance {
                let i = worst.1;
                return Err(format!(
                    "{label}: max |error| {:.3e} > {:.3e} at {i} (got {}, want {})",
                    worst.0,
                    case.tolerance,
                    got.get(i).copied().unwrap_or(f32::NAN),
                    case.reference.get(i).copied().unwrap_or(f32::NAN)
                ));
            }
            if mode == Mode::Plain {
                if let Some((first, raw0)) = runs.first() {
                    if *raw0 != raw {
                        return Err(format!("{label} differs from {first}: the result depends on the thread order (a race)"));
                    }
                }
                runs.push((order, raw));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(largest)
}

/// Runs every case (or stops at the first failure with `JHAKAAS_CUDA_EMU_FAIL_FAST`) and
/// fails listing what failed.
fn check_all(kernel: &str, cases: impl Iterator<Item = Result<Case>>) {
    let Some(emu) = std::env::var_os("JHAKAAS_CUDA_EMU").map(PathBuf::from) else {
        eprintln!(
            "skipped: JHAKAAS_CUDA_EMU is not set (.ci/cuda-emu builds the emulation and sets it)"
        );
        return;
    };
    let fail_fast = std::env::var_os("JHAKAAS_CUDA_EMU_FAIL_FAST").is_some();
    let scratch =
        std::env::temp_dir().join(format!("jhakaas-cuda-emu-{}-{kernel}", std::process::id()));
    let mut failures = Vec::new();
    let mut count = 0;
    for case in cases {
        let case = case.expect("a case builds");
        count += 1;
        let start = Instant::now();
        match check(&emu, &case, &scratch) {
            Ok(err) => eprintln!(
                "ok   {} (max |error| {err:.2e}, {:.0}% of the bound; {:.1} s)",
                case.name,
                100.0 * err / case.tolerance,
                start.elapsed().as_secs_f32()
            ),
            Err(e) => {
                eprintln!("FAIL {}: {e}", case.name);
                failures.push(format!("{}: {e}", case.name));
                if fail_fast {
                    break;
                }
            }
        }
    }
    if failures.is_empty() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    assert!(
        failures.is_empty(),
        "{} of {count} {kernel} cases failed (their files are in {}):\n{}",
        failures.len(),
        scratch.display(),
        failures.join("\n")
    );
}

/// How q, k and v lie in memory.
#[derive(Debug, Clone, Copy)]
enum Views {
    /// Three tensors.
    Separate,
    /// Views into one `[B, L, 3·H·D]` projection (self-attention).
    FusedQkv,
    /// q alone, k and v views into one `[B, Lk, 2·H·D]` projection (cross-attention).
    FusedKv,
}

#[allow(clippy::too_many_arguments)]
fn attention_case(
    dtype: DType,
    b: usize,
    lq: usize,
    lk: usize,
    heads: usize,
    d: usize,
    views: Views,
    modes: &'static [Mode],
) -> Result<Case> {
    let inner = heads * d;
    let seed = (b * 7 + lq * 13 + lk * 17 + heads * 19 + d * 23) as u64;
    let scale = 1.0 / (d as f32).sqrt();
    let (q, k, v, buffers, bind) = match views {
        Views::Separate => {
            let q = rounded(&random(&[b, lq, inner], seed, -2.0, 2.0)?, dtype)?;
            let k = rounded(&random(&[b, lk, inner], seed + 1, -2.0, 2.0)?, dtype)?;
            let v = rounded(&random(&[b, lk, inner], seed + 2, -1.0, 1.0)?, dtype)?;
            let buffers = vec![
                Buffer::input("q", &q, dtype)?,
                Buffer::input("k", &k, dtype)?,
                Buffer::input("v", &v, dtype)?,
            ];
            (q, k, v, buffers, vec!["q", "k", "v", "out"])
        }
        Views::FusedQkv => {
            assert_eq!(lq, lk);
            let qkv = rounded(&random(&[b, lq, 3 * inner], seed, -2.0, 2.0)?, dtype)?;
            let buffers = vec![Buffer::input("qkv", &qkv, dtype)?];
            let (q, k, v) = (
                qkv.narrow(2, 0, inner)?,
                qkv.narrow(2, inner, inner)?,
                qkv.narrow(2, 2 * inner, inner)?,
            );
            (q, k, v, buffers, vec!["qkv", "qkv", "qkv", "out"])
        }
        Views::FusedKv => {
            let q = rounded(&random(&[b, lq, inner], seed, -2.0, 2.0)?, dtype)?;
            let kv = rounded(&random(&[b, lk, 2 * inner], seed + 1, -2.0, 2.0)?, dtype)?;
            let buffers = vec![
                Buffer::input("q", &q, dtype)?,
                Buffer::input("kv", &kv, dtype)?,
            ];
            let (k, v) = (kv.narrow(2, 0, inner)?, kv.narrow(2, inner, inner)?);
            (q, k, v, buffers, vec!["q", "kv", "kv", "out"])
        }
    };
    let op = FusedAttention {
        heads,
        scale,
        causal: false,
    };
    let dims = op.dims(q.layout(), k.layout(), v.layout())?;
    let plan = launch::attention(&dims, dtype, scale)?;
    let reference = layers::attention_reference(&q, &k, &v, heads, false, AttentionPrecision::F32)?;
    // f16 keeps 11 significant bits, bf16 8: the probabilities and the output are rounded to
    // them, so the bound is a fraction of the largest |v| (see README.md for the measured worst).
    let tolerance = max_abs(&v)? * if dtype == DType::F16 { 1e-3 } else { 8e-3 };
    let mut buffers = buffers;
    buffers.push(Buffer {
        name: "out",
        dtype,
        len: b * lq * inner,
        fill: Fill::Poison,
    });
    Ok(Case {
        name: format!("attention-{dtype:?}-b{b}-q{lq}-k{lk}-h{heads}-d{d}-{views:?}")
            .to_lowercase(),
        buffers,
        bind,
        launches: vec![plan],
        output: "out",
        reference: reference.flatten_all()?.to_vec1()?,
        tolerance,
        modes,
    })
}

/// dtype, batch, query and key lengths, heads, head width, views, modes.
type AttentionSpec = (
    DType,
    usize,
    usize,
    usize,
    usize,
    usize,
    Views,
    &'static [Mode],
);

#[test]
fn attention_matches_its_reference_under_the_emulation() {
    use Views::*;
    let mut cases: Vec<AttentionSpec> = Vec::new();
    for dtype in [DType::F16, DType::BF16] {
        cases.extend([
            // SD 1.x's head width 40 (padded to 48): self-attention from one fused projection,
            // lengths no multiple of the 64-row or 32-key tiles.
            (dtype, 2, 100, 100, 2, 40, FusedQkv, ALL_MODES),
            // SD 2.x / SDXL's 64, cross-attention on CLIP's 77 tokens from a fused k/v.
            (dtype, 1, 130, 77, 2, 64, FusedKv, ALL_MODES),
            // SD 1.x's 80 and 160, then 128 (32 query rows per block above 80).
            (dtype, 1, 65, 33, 2, 80, Separate, ALL_MODES),
            (dtype, 1, 40, 50, 1, 160, Separate, ALL_MODES),
            (dtype, 1, 33, 31, 2, 128, FusedKv, ALL_MODES),
            // One query, one key; a head narrower than its tile.
            (dtype, 1, 1, 1, 3, 24, Separate, ALL_MODES),
        ]);
    }
    // SD 1.5's first cross-attention at 512²: 4096 queries on 77 tokens, 8 heads of 40.
    cases.push((DType::F16, 1, 4096, 77, 8, 40, FusedKv, NO_TSAN));
    check_all(
        "attention",
        cases
            .into_iter()
            .map(|(dtype, b, lq, lk, h, d, views, modes)| {
                attention_case(dtype, b, lq, lk, h, d, views, modes)
            }),
    );
}

#[allow(clippy::too_many_arguments)]
fn group_norm_case(
    dtype: DType,
    b: usize,
    channels: usize,
    spatial: (usize, usize),
    groups: usize,
    eps: f64,
    silu: bool,
    modes: &'static [Mode],
) -> Result<Case> {
    let shape = [b, channels, spatial.0, spatial.1];
    let seed = (b * 3 + channels * 5 + spatial.0 * 7 + spatial.1 * 11) as u64;
    // Values far from zero test the pivoted one-pass variance.
    let x = rounded(&random(&shape, seed, 2.0, 6.0)?, dtype)?;
    let gamma = rounded(&random(&[channels], seed + 1, 0.5, 1.5)?, dtype)?;
    let beta = rounded(&random(&[channels], seed + 2, -0.5, 0.5)?, dtype)?;
    let op = FusedGroupNorm { groups, eps, silu };
    let dims = op.dims(x.layout(), gamma.layout(), beta.layout())?;
    let plan = launch::group_norm(&dims, &op, dtype)?;
    let vars = HashMap::from([
        ("weight".to_string(), gamma.clone()),
        ("bias".to_string(), beta.clone()),
    ]);
    let vb = candle_nn::VarBuilder::from_tensors(vars, DType::F32, &Device::Cpu);
    let reference = layers::group_norm(groups, channels, eps, vb)?.forward_reference(&x, silu)?;
    let tolerance = max_abs(&reference)?
        * match dtype {
            DType::F32 => 2e-5,
            DType::F16 => 1e-3,
            _ => 8e-3,
        };
    Ok(Case {
        name: format!(
            "group-norm-{dtype:?}-{b}x{channels}x{}x{}-g{groups}-silu{silu}",
            spatial.0, spatial.1
        )
        .to_lowercase(),
        buffers: vec![
            Buffer::input("x", &x, dtype)?,
            Buffer::input("gamma", &gamma, dtype)?,
            Buffer::input("beta", &beta, dtype)?,
            Buffer {
                name: "partial",
                dtype: DType::F32,
                len: plan.partial_len,
                fill: Fill::Zero,
            },
            Buffer {
                name: "out",
                dtype,
                len: plan.out_len,
                fill: Fill::Poison,
            },
        ],
        bind: vec!["x", "gamma", "beta", "partial", "out"],
        launches: vec![plan.stats, plan.apply],
        output: "out",
        reference: reference.flatten_all()?.to_vec1()?,
        tolerance,
        modes,
    })
}

/// dtype, batch, channels, spatial size, groups, eps, SiLU, modes.
type GroupNormSpec = (
    DType,
    usize,
    usize,
    (usize, usize),
    usize,
    f64,
    bool,
    &'static [Mode],
);

#[test]
fn group_norm_matches_its_reference_under_the_emulation() {
    let (f32_, f16_, bf16_) = (DType::F32, DType::F16, DType::BF16);
    let unet = 1e-5;
    let vae = 1e-6;
    let cases: Vec<GroupNormSpec> = vec![
        // The UNets' blocks (32 groups): SD 1.x/2.x 320/640/1280 and the up blocks' skip
        // concatenations 2560/1920/960/640; SDXL's 320/640/1280 and its 1920/960.
        (f32_, 2, 320, (24, 24), 32, unet, true, ALL_MODES),
        (f16_, 1, 640, (12, 12), 32, unet, true, ALL_MODES),
        (bf16_, 1, 1280, (6, 6), 32, unet, false, ALL_MODES),
        (f32_, 1, 2560, (3, 3), 32, unet, true, ALL_MODES),
        (f16_, 1, 1920, (6, 6), 32, unet, true, ALL_MODES),
        (f32_, 1, 960, (12, 12), 32, unet, false, ALL_MODES),
        // The VAE's blocks (eps 1e-6): 128 at the full size (4 chunks per group), 256, 512.
        (f32_, 1, 128, (64, 64), 32, vae, true, ALL_MODES),
        (bf16_, 1, 256, (20, 20), 32, vae, true, ALL_MODES),
        (f16_, 1, 512, (9, 7), 32, vae, false, ALL_MODES),
        // One group larger than 64 chunks of 4096: the chunk count's cap.
        (f32_, 1, 4, (256, 260), 1, unet, true, NO_TSAN),
        // A group smaller than a block's 256 threads.
        (f16_, 1, 64, (3, 5), 32, unet, true, ALL_MODES),
    ];
    check_all(
        "group_norm",
        cases
            .into_iter()
            .map(|(dtype, b, c, s, g, eps, silu, modes)| {
                group_norm_case(dtype, b, c, s, g, eps, silu, modes)
            }),
    );
}

fn geglu_case(dtype: DType, rows: usize, n: usize, modes: &'static [Mode]) -> Result<Case> {
    let x = rounded(
        &random(&[rows, 2 * n], (rows * 31 + n) as u64, -4.0, 4.0)?,
        dtype,
    )?;
    let plan = launch::geglu(rows, n, dtype)?;
    let reference = layers::geglu_reference(&x)?;
    let tolerance = max_abs(&reference)?
        * match dtype {
            DType::F32 => 1e-6,
            DType::F16 => 1e-3,
            _ => 8e-3,
        };
    Ok(Case {
        name: format!("geglu-{dtype:?}-{rows}x{n}").to_lowercase(),
        buffers: vec![
            Buffer::input("x", &x, dtype)?,
            Buffer {
                name: "out",
                dtype,
                len: rows * n,
                fill: Fill::Poison,
            },
        ],
        bind: vec!["x", "out"],
        launches: vec![plan],
        output: "out",
        reference: reference.flatten_all()?.to_vec1()?,
        tolerance,
        modes,
    })
}

#[test]
fn geglu_matches_its_reference_under_the_emulation() {
    let cases: Vec<(DType, usize, usize, &'static [Mode])> = vec![
        // SD 1.x's feed-forward (inner 1280 at the first level), SDXL's 5120; odd sizes.
        (DType::F32, 77, 1280, ALL_MODES),
        (DType::F16, 9, 5120, ALL_MODES),
        (DType::BF16, 33, 2560, ALL_MODES),
        (DType::F32, 3, 7, ALL_MODES),
        // More than 65535 blocks of 256: the grid-stride loop.
        (DType::F16, 4097, 4096, &[Mode::Plain]),
    ];
    check_all(
        "geglu",
        cases
            .into_iter()
            .map(|(dtype, rows, n, modes)| geglu_case(dtype, rows, n, modes)),
    );
}
