//! The plumbing of `cuda_emu.rs`: a case (device buffers, the planned launches, the buffer to
//! check and its reference) written for the emulation's harness, run in every build and order
//! with a time limit, and compared with its reference.

use candle_core::{DType, Device, Tensor};
use jhakaas_model_manager::kernels::launch::{Arg, Launch};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// One build of the emulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Three thread orders that must agree, `__shared__` memory and outputs poisoned.
    Plain,
    /// AddressSanitizer.
    Asan,
    /// ThreadSanitizer, happens-before only at barriers.
    Tsan,
}

impl Mode {
    /// The build's folder under `JHAKAAS_CUDA_EMU`.
    pub fn dir(self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::Asan => "asan",
            Mode::Tsan => "tsan",
        }
    }
}

pub const ALL_MODES: &[Mode] = &[Mode::Plain, Mode::Asan, Mode::Tsan];
/// For the largest cases: TSan's fibers cost ~10× and their barriers are covered by the
/// smaller cases of the same kernel.
pub const NO_TSAN: &[Mode] = &[Mode::Plain, Mode::Asan];
/// One emulated process may run this long (a mutant that never leaves a loop is a failure).
pub const PROCESS_LIMIT: Duration = Duration::from_secs(60);
/// How a run past [`PROCESS_LIMIT`] is reported.
pub const HANG: &str = "still running";

/// Device memory of one case: what the harness allocates (exactly this size) and fills.
pub enum Fill {
    Data(Vec<u8>),
    Zero,
    Poison,
}

pub struct Buffer {
    pub name: &'static str,
    pub dtype: DType,
    pub len: usize,
    pub fill: Fill,
}

impl Buffer {
    /// A device buffer holding `t`'s values in `dtype`.
    pub fn input(name: &'static str, t: &Tensor, dtype: DType) -> Result<Self> {
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
pub struct Case {
    pub name: String,
    pub buffers: Vec<Buffer>,
    pub bind: Vec<&'static str>,
    pub launches: Vec<Launch>,
    pub output: &'static str,
    pub reference: Vec<f32>,
    /// The largest absolute difference allowed from the reference.
    pub tolerance: f32,
    pub modes: &'static [Mode],
}

pub fn elem_bytes(dtype: DType) -> usize {
    match dtype {
        DType::F32 => 4,
        _ => 2,
    }
}

/// The tensor's values in `dtype`, as the device would hold them.
pub fn bytes(t: &Tensor, dtype: DType) -> Result<Vec<u8>> {
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

pub fn values(raw: &[u8], dtype: DType) -> Vec<f32> {
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
pub fn random(shape: &[usize], seed: u64, lo: f32, hi: f32) -> Result<Tensor> {
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
pub fn rounded(t: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(t.to_dtype(dtype)?.to_dtype(DType::F32)?)
}

pub fn max_abs(t: &Tensor) -> Result<f32> {
    Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Writes the case's files into `dir` and returns the harness's case text.
pub fn write_case(case: &Case, dir: &Path) -> Result<String> {
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
pub fn run_harness(
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
            return Err(format!("{HANG} after {PROCESS_LIMIT:?} (a hang?)"));
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
pub fn check(emu: &Path, case: &Case, scratch: &Path) -> std::result::Result<f32, String> {
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
pub fn check_all(kernel: &str, cases: impl Iterator<Item = Result<Case>>) {
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
                // A kernel that never ends would cost the time limit on every case: one is enough.
                let hang = e.contains(HANG);
                failures.push(format!("{}: {e}", case.name));
                if fail_fast || hang {
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
