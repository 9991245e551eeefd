//! How our CUDA kernels (`cuda/*.cu`) are launched, as plain data: the kernel's name, its grid
//! and block, and its arguments in the kernel's parameter order. `cuda.rs` issues these plans
//! on candle's stream; the CPU emulation's tests (`tests/cuda_emu.rs`, `cuda/emu/`) replay the
//! same plans, so the grid, the block and the argument packing are tested without a GPU.

use super::attention::Dims as AttentionDims;
use super::group_norm::{Dims as GroupNormDims, FusedGroupNorm};
use candle_core::{DType, Result};

/// The PTX module a kernel lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Module {
    /// `cuda/attention.cu`.
    Attention,
    /// `cuda/group_norm.cu`.
    GroupNorm,
    /// `cuda/geglu.cu`.
    Geglu,
}

impl Module {
    /// The name candle caches the loaded module under.
    pub fn name(self) -> &'static str {
        match self {
            Module::Attention => "jhakaas_attention",
            Module::GroupNorm => "jhakaas_group_norm",
            Module::Geglu => "jhakaas_geglu",
        }
    }
}

/// One kernel argument, in parameter order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    /// The operation's buffer number `index` (each plan lists its buffers), from element
    /// `offset` on.
    Buffer {
        /// Which buffer.
        index: usize,
        /// Elements skipped at its start.
        offset: usize,
    },
    /// An `int`.
    I32(i32),
    /// A `long long`.
    I64(i64),
    /// A `size_t`.
    Usize(usize),
    /// A `float`.
    F32(f32),
}

/// One launch: which kernel, over which grid, with which arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    /// The module the kernel is in.
    pub module: Module,
    /// The `extern "C"` kernel's name.
    pub kernel: String,
    /// Blocks in x, y, z.
    pub grid: (u32, u32, u32),
    /// Threads per block in x, y, z.
    pub block: (u32, u32, u32),
    /// Dynamic shared memory (our kernels use static shared memory only).
    pub shared_mem_bytes: u32,
    /// The arguments, in the kernel's parameter order.
    pub args: Vec<Arg>,
}

impl Launch {
    /// The element offset the plan gives buffer number `index` (0 when it passes none).
    pub fn offset(&self, index: usize) -> usize {
        self.args
            .iter()
            .find_map(|a| match a {
                Arg::Buffer { index: i, offset } if *i == index => Some(*offset),
                _ => None,
            })
            .unwrap_or(0)
    }
}

fn buffer(index: usize) -> Arg {
    Arg::Buffer { index, offset: 0 }
}

/// The kernels' name suffix for a storage type.
fn suffix(dtype: DType, what: &str) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::F16 => Ok("f16"),
        DType::BF16 => Ok("bf16"),
        other => candle_core::bail!("{what}: the CUDA kernel does not take {other:?}"),
    }
}

/// Padded head width and query rows per block of the flash kernel for head width `d`.
fn flash_variant(d: usize) -> Option<(usize, usize)> {
    match d {
        1..=48 => Some((48, 64)),
        49..=64 => Some((64, 64)),
        65..=80 => Some((80, 64)),
        81..=128 => Some((128, 32)),
        129..=160 => Some((160, 32)),
        _ => None,
    }
}

/// The flash attention launch. Buffers: 0 q, 1 k, 2 v (each from its layout's start offset),
/// 3 the output (`b · lq · heads · d` elements of the inputs' type).
pub fn attention(dims: &AttentionDims, dtype: DType, scale: f32) -> Result<Launch> {
    let Some((dp, br)) = flash_variant(dims.d) else {
        candle_core::bail!("flash attention: head width {} is not built", dims.d);
    };
    if dtype == DType::F32 {
        candle_core::bail!("flash attention takes f16 or bf16 q, k and v");
    }
    let ty = suffix(dtype, "flash attention")?;
    let int = |what: &str, x: usize| -> Result<i32> {
        i32::try_from(x)
            .map_err(|_| candle_core::Error::Msg(format!("attention: {what} {x} overflows")))
    };
    let blocks_y = dims.b * dims.heads;
    if blocks_y > 65535 {
        candle_core::bail!("flash attention: {blocks_y} batch × heads is beyond one grid");
    }
    let (qb, kb, vb) = (dims.q.0 as i64, dims.k.0 as i64, dims.v.0 as i64);
    Ok(Launch {
        module: Module::Attention,
        kernel: format!("flash_attn_{ty}_d{dp}"),
        grid: (dims.lq.div_ceil(br) as u32, blocks_y as u32, 1),
        block: (2 * br as u32, 1, 1),
        shared_mem_bytes: 0,
        args: vec![
            Arg::Buffer {
                index: 0,
                offset: dims.q.2,
            },
            Arg::Buffer {
                index: 1,
                offset: dims.k.2,
            },
            Arg::Buffer {
                index: 2,
                offset: dims.v.2,
            },
            buffer(3),
            Arg::I64(qb),
            Arg::I32(int("q row stride", dims.q.1)?),
            Arg::I64(kb),
            Arg::I32(int("k row stride", dims.k.1)?),
            Arg::I64(vb),
            Arg::I32(int("v row stride", dims.v.1)?),
            Arg::I32(int("query length", dims.lq)?),
            Arg::I32(int("key length", dims.lk)?),
            Arg::I32(int("heads", dims.heads)?),
            Arg::I32(int("head width", dims.d)?),
            Arg::F32(scale * std::f32::consts::LOG2_E),
        ],
    })
}

/// The two launches of a GroupNorm (+ SiLU) and the scratch they share.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupNormLaunches {
    /// f32 elements of the zeroed scratch of partial sums (buffer 3).
    pub partial_len: usize,
    /// Elements of the output (buffer 4).
    pub out_len: usize,
    /// Partial sums per chunk of each group. Buffers: 0 x, 3 partial.
    pub stats: Launch,
    /// Normalise, scale, shift (and SiLU). Buffers: 0 x, 1 gamma, 2 beta, 3 partial, 4 out.
    pub apply: Launch,
}

/// The GroupNorm launches for contiguous `x`, `gamma`, `beta` of one storage type.
pub fn group_norm(
    dims: &GroupNormDims,
    op: &FusedGroupNorm,
    dtype: DType,
) -> Result<GroupNormLaunches> {
    let ty = suffix(dtype, "group_norm")?;
    let groups = dims.b * op.groups;
    let per_group = dims.channels / op.groups;
    let group_len = per_group * dims.spatial;
    // Enough blocks to fill the GPU: about 4096 elements per block, at most 64 per group.
    let chunks = group_len.div_ceil(4096).clamp(1, 64);
    if groups > 65535 {
        candle_core::bail!("group_norm: {groups} batch × groups is beyond one grid");
    }
    let grid = (chunks as u32, groups as u32, 1);
    let block = (256, 1, 1);
    Ok(GroupNormLaunches {
        partial_len: groups * chunks * 2,
        out_len: dims.b * dims.channels * dims.spatial,
        stats: Launch {
            module: Module::GroupNorm,
            kernel: format!("gn_stats_{ty}"),
            grid,
            block,
            shared_mem_bytes: 0,
            args: vec![
                buffer(0),
                buffer(3),
                Arg::Usize(group_len),
                Arg::I32(chunks as i32),
            ],
        },
        apply: Launch {
            module: Module::GroupNorm,
            kernel: format!("gn_apply_{ty}"),
            grid,
            block,
            shared_mem_bytes: 0,
            args: vec![
                buffer(0),
                buffer(1),
                buffer(2),
                buffer(3),
                buffer(4),
                Arg::Usize(group_len),
                Arg::I32(chunks as i32),
                Arg::I32(op.groups as i32),
                Arg::I32(per_group as i32),
                Arg::Usize(dims.spatial),
                Arg::F32(op.eps as f32),
                Arg::I32(op.silu as i32),
            ],
        },
    })
}

/// The GEGLU launch over `rows` contiguous rows of `2n` values. Buffers: 0 x, 1 the output
/// (`rows · n` elements).
pub fn geglu(rows: usize, n: usize, dtype: DType) -> Result<Launch> {
    let ty = suffix(dtype, "geglu")?;
    let total = rows * n;
    Ok(Launch {
        module: Module::Geglu,
        kernel: format!("geglu_{ty}"),
        // A grid-stride loop covers whatever the 65535 blocks do not.
        grid: (total.div_ceil(256).clamp(1, 65535) as u32, 1, 1),
        block: (256, 1, 1),
        shared_mem_bytes: 0,
        args: vec![buffer(0), buffer(1), Arg::Usize(rows), Arg::Usize(n)],
    })
}
