//! Where a forward pass spends its time, by kind of layer: when enabled, every door in
//! [`crate::layers`] synchronises its device before and after its op and adds the wall time to
//! its kind's counter. Off (the default) it costs one relaxed load per op. Used by
//! `jhakaas-profile` (benches) on the CPU and on a GPU.

use candle_core::{Device, Result};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A kind of layer the doors time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Scaled dot-product attention.
    Attention,
    /// 2D convolutions (with their fused adds).
    Conv,
    /// Linear layers (with their fused adds).
    Linear,
    /// GroupNorm (+ SiLU).
    Norm,
    /// GEGLU.
    Geglu,
}

/// Every kind, in report order.
pub const OPS: [Op; 5] = [Op::Attention, Op::Conv, Op::Linear, Op::Norm, Op::Geglu];

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];
static CALLS: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];

/// Turns timing on or off (process-wide) and clears the counters.
pub fn enable(on: bool) {
    for (n, c) in NANOS.iter().zip(&CALLS) {
        n.store(0, Ordering::Relaxed);
        c.store(0, Ordering::Relaxed);
    }
    ENABLED.store(on, Ordering::Relaxed);
}

/// Time and number of calls of each kind since [`enable`].
pub fn snapshot() -> Vec<(Op, Duration, u64)> {
    OPS.iter()
        .enumerate()
        .map(|(i, &op)| {
            (
                op,
                Duration::from_nanos(NANOS[i].load(Ordering::Relaxed)),
                CALLS[i].load(Ordering::Relaxed),
            )
        })
        .collect()
}

/// Runs `f`, timing it as `op` on `device` when profiling is on.
pub fn timed<R>(op: Op, device: &Device, f: impl FnOnce() -> Result<R>) -> Result<R> {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    device.synchronize()?;
    let start = Instant::now();
    let r = f()?;
    device.synchronize()?;
    let i = OPS.iter().position(|&o| o == op).unwrap_or(0);
    NANOS[i].fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    CALLS[i].fetch_add(1, Ordering::Relaxed);
    Ok(r)
}
