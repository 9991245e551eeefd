//! Device selection and the working precision for each device.

use crate::error::{Error, Result};
use candle_core::{DType, Device};

/// Where to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The CPU, in f32.
    Cpu,
    /// CUDA device `n`, in f16.
    Cuda(usize),
    /// CUDA device 0 when this build and machine have one, else the CPU.
    #[default]
    Auto,
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "auto" => Ok(DeviceChoice::Auto),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Ok(DeviceChoice::Cuda(n)),
                _ => Err(Error::invalid(
                    "device",
                    format!("`{s}` is not one of cpu, cuda, cuda:N, auto"),
                )),
            },
        }
    }
}

impl DeviceChoice {
    /// Opens the device.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(Error::Device(
                        "this binary was built without CUDA support (build with `--features cuda`)"
                            .into(),
                    ));
                }
                let d = Device::new_cuda(n)
                    .map_err(|e| Error::Device(format!("cannot open cuda:{n}: {e}")))?;
                tune_cuda(&d).map_err(|e| Error::Device(format!("cannot set up cuda:{n}: {e}")))?;
                Ok(d)
            }
            DeviceChoice::Auto => {
                if candle_core::utils::cuda_is_available() {
                    if let Ok(d) = Device::new_cuda(0) {
                        tune_cuda(&d)
                            .map_err(|e| Error::Device(format!("cannot set up cuda:0: {e}")))?;
                        return Ok(d);
                    }
                }
                Ok(Device::Cpu)
            }
        }
    }
}

/// Host-side tuning of a CUDA device for the engine's one-thread, one-stream use:
/// * no CUDA events per allocation: every tensor lives on candle's single stream of this
///   device, used from the engine thread only, so cross-stream tracking buys nothing and costs
///   an event create/record/destroy per allocation;
/// * the stream-ordered memory pool keeps freed memory (release threshold at the maximum)
///   instead of returning it to the driver at every synchronisation, as PyTorch's caching
///   allocator does.
#[cfg(feature = "cuda")]
fn tune_cuda(device: &Device) -> candle_core::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let Device::Cuda(dev) = device else {
        return Ok(());
    };
    // SAFETY: see above — one stream per device, driven by one thread.
    unsafe { dev.disable_event_tracking() };
    let cu_device = dev.cuda_stream().context().cu_device();
    // SAFETY: `cu_device` comes from a live context; the attribute takes a u64.
    unsafe {
        let pool = result::device::get_default_mem_pool(cu_device)
            .map_err(|e| candle_core::Error::Msg(format!("default memory pool: {e}")))?;
        let mut threshold = u64::MAX;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .map_err(|e| candle_core::Error::Msg(format!("memory pool release threshold: {e}")))?;
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn tune_cuda(_: &Device) -> candle_core::Result<()> {
    Ok(())
}

/// The precision models run in on `device`: f32 on the CPU, f16 on CUDA.
pub fn working_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::F16
    }
}

/// A short human name for the device (`cpu`, `cuda:0`).
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// While alive on a CUDA device, f32 matmuls — and so candle's matmul-based convolutions — may
/// use TF32, as PyTorch's cuDNN convolutions do by default. Wraps the f32 VAE passes of
/// half-precision pipelines; the previous setting comes back on drop.
#[derive(Debug)]
pub struct Tf32Scope {
    previous: Option<bool>,
}

/// Allows TF32 for f32 work on `device` until the returned scope is dropped (a no-op on CPU).
pub fn allow_tf32(device: &Device) -> Tf32Scope {
    if !device.is_cuda() {
        return Tf32Scope { previous: None };
    }
    let previous = candle_core::cuda::gemm_reduced_precision_f32();
    candle_core::cuda::set_gemm_reduced_precision_f32(true);
    Tf32Scope {
        previous: Some(previous),
    }
}

impl Drop for Tf32Scope {
    fn drop(&mut self) {
        if let Some(p) = self.previous {
            candle_core::cuda::set_gemm_reduced_precision_f32(p);
        }
    }
}
