//! The doors to the math shared by the UNet, the VAE and the text encoders — [`attention`],
//! [`GroupNorm`], [`Conv2d`], [`Linear`] and [`geglu`] — and the blocks built from them
//! ([`blocks`]). Each door runs one of our kernels ([`crate::kernels`]) where one applies and
//! keeps the plain candle math next to it as the reference the kernels are tested against
//! (exact erf GELU, f32 softmax, diffusers' padding rules).

mod blocks;

pub use crate::kernels::conv2d::Addend as ConvAddend;
use crate::kernels::profile::{timed, Op};
use crate::kernels::{self, attention::FusedAttention, conv2d::FusedConv2d, Path};
pub use blocks::{timestep_embedding, Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

/// A linear layer `x · Wᵀ + b` over the last dimension. The weight is held transposed,
/// `[in, out]`, so the CPU gemm reads it without repacking it on every call, and on the CPU in
/// f16 when that is lossless ([`kernels::held`]); or, built by [`linear_laid_out`], as the
/// checkpoint stores it.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    layout: WeightLayout,
    bias: Option<Tensor>,
    /// Where the weights are in the checkpoint (the layer's prefix), for [`crate::sharing`].
    path: String,
}

/// How a [`Linear`] holds its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightLayout {
    /// `[in, out]`: transposed at load into a buffer of its own, which the CPU gemm reads
    /// without repacking.
    #[default]
    Transposed,
    /// `[out, in]` as the checkpoint stores it, f32, on the CPU: lent out of the mapped file,
    /// so `--weights-residency stage` can drop it between uses. Each call transposes it into
    /// a scratch buffer first, so the gemm and its result are exactly [`Self::Transposed`]'s
    /// (CLIP ViT-L's encode of a CFG pair: 0.17 s instead of 0.08 s on 2 cores).
    AsStored,
}

/// A linear layer, with or without bias (checkpoint keys `weight` `[out, in]`, `bias`).
/// A LoRA variant takes it from its base when no adapter changes it ([`crate::sharing`]).
pub fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    linear_laid_out(WeightLayout::Transposed, in_dim, out_dim, bias, vb)
}

/// [`linear`] holding its weight as `layout` says. [`WeightLayout::AsStored`] keeps an f32
/// weight on the CPU as the file stores it, in the file's mapped pages
/// ([`crate::weights::WeightsIo::Map`]) rather than a transposed copy: the text encoders'
/// layout under [`crate::weights::WeightResidency::Stage`], where their weights then leave the
/// resident set outside the text stage. Elsewhere (a GPU, a weight held in f16) it is
/// [`WeightLayout::Transposed`].
pub fn linear_laid_out(
    layout: WeightLayout,
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: VarBuilder,
) -> Result<Linear> {
    let as_stored =
        layout == WeightLayout::AsStored && vb.device().is_cpu() && vb.dtype() == DType::F32;
    let layout = if as_stored {
        WeightLayout::AsStored
    } else {
        WeightLayout::Transposed
    };
    let path = vb.prefix();
    let tensors = crate::sharing::layer(&path, || {
        let weight = kernels::held::get_weight(&vb, (out_dim, in_dim), "weight")?;
        let held = match layout {
            WeightLayout::Transposed => kernels::held::hold(kernels::layout::transpose(&weight)?)?,
            WeightLayout::AsStored => weight.to_dtype(DType::F32)?,
        };
        let mut tensors = vec![held];
        if bias {
            tensors.push(vb.get(out_dim, "bias")?);
        }
        Ok(tensors)
    })?;
    let mut tensors = tensors.into_iter();
    Ok(Linear {
        weight: tensors.next().expect("a linear layer has a weight"),
        layout,
        bias: tensors.next(),
        path,
    })
}

impl Linear {
    /// One linear layer computing `parts` side by side (their outputs concatenated along the
    /// last dimension), e.g. attention's q, k and v projections of one input as one gemm.
    pub fn concat(parts: &[Linear]) -> Result<Linear> {
        let paths: Vec<&str> = parts.iter().map(|p| p.path.as_str()).collect();
        let tensors = crate::sharing::fused(&paths, || {
            let fused = Self::concat_weights(parts)?;
            Ok(std::iter::once(fused.weight).chain(fused.bias).collect())
        })?;
        let mut tensors = tensors.into_iter();
        Ok(Linear {
            weight: tensors.next().expect("a linear layer has a weight"),
            layout: WeightLayout::Transposed,
            bias: tensors.next(),
            path: format!("fused({})", paths.join(",")),
        })
    }

    /// `parts` as one layer with a fresh `[in, Σ out]` weight: what [`Linear::concat`] holds
    /// (and, built at each call from as-stored parts, what the text encoders' q/k/v run).
    pub(crate) fn concat_weights(parts: &[Linear]) -> Result<Linear> {
        let dtype = parts.first().map(|p| p.weight.dtype());
        let weights = if parts.iter().all(|p| Some(p.weight.dtype()) == dtype) {
            parts
                .iter()
                .map(Linear::weight_t)
                .collect::<Result<Vec<_>>>()?
        } else {
            // Held in different dtypes (one part merged with a LoRA): all in f32.
            parts
                .iter()
                .map(|p| p.weight_t()?.to_dtype(DType::F32))
                .collect::<Result<Vec<_>>>()?
        };
        let weights: Vec<&Tensor> = weights.iter().collect();
        let weight_t = kernels::layout::concat_columns(&weights)?;
        let bias = if parts.iter().all(|p| p.bias.is_some()) {
            let biases: Vec<&Tensor> = parts.iter().filter_map(|p| p.bias.as_ref()).collect();
            Some(Tensor::cat(&biases, 0)?)
        } else if parts.iter().all(|p| p.bias.is_none()) {
            None
        } else {
            // Mixed: zeros (in the biases' dtype) where a part has none.
            let dtype = parts
                .iter()
                .find_map(|p| p.bias.as_ref())
                .map(Tensor::dtype);
            let biases = parts
                .iter()
                .map(|p| match &p.bias {
                    Some(b) => Ok(b.clone()),
                    None => {
                        Tensor::zeros(p.out_dim()?, dtype.unwrap_or(DType::F32), p.weight.device())
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&biases, 0)?)
        };
        Ok(Linear {
            weight: weight_t,
            layout: WeightLayout::Transposed,
            bias,
            path: String::new(),
        })
    }

    /// Width of the output.
    pub fn out_dim(&self) -> Result<usize> {
        match self.layout {
            WeightLayout::Transposed => self.weight.dim(1),
            WeightLayout::AsStored => self.weight.dim(0),
        }
    }

    /// The weight as `[in, out]`, contiguous (an as-stored weight transposed now).
    fn weight_t(&self) -> Result<Tensor> {
        match self.layout {
            WeightLayout::Transposed => Ok(self.weight.clone()),
            WeightLayout::AsStored => kernels::layout::transpose(&self.weight),
        }
    }

    /// `x · Wᵀ + b + residual`, the add fused into the gemm on the CPU.
    pub fn forward_residual(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        timed(Op::Linear, x.device(), || self.forward_fused(x, residual))
    }

    fn forward_fused(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        match kernels::path(x.device(), x.dtype()) {
            Path::Cpu => x.contiguous()?.apply_op2_no_bwd(
                &self.weight_t()?,
                &kernels::linear::FusedLinear {
                    bias: self.bias.clone(),
                    residual: residual.map(Tensor::contiguous).transpose()?,
                },
            ),
            _ => self.forward_reference(x, residual),
        }
    }

    /// The reference: `x · Wᵀ` as a candle matmul, then the bias and the residual.
    pub fn forward_reference(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let y = x.broadcast_matmul(&self.weight_t()?.to_dtype(x.dtype())?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        match residual {
            Some(r) => y + r,
            None => Ok(y),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_residual(x, None)
    }
}

/// A 2D convolution with a square kernel (no dilation, no groups); on the CPU the weight is
/// held in f16 when that is lossless ([`kernels::held`]).
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
}

/// A 2D convolution with a square kernel. A LoRA variant takes it from its base when no
/// adapter changes it ([`crate::sharing`]).
pub fn conv2d(
    in_c: usize,
    out_c: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        stride,
        padding,
        ..Default::default()
    };
    let tensors = crate::sharing::layer(&vb.prefix(), || {
        let weight = kernels::held::get_weight(&vb, (out_c, in_c, kernel, kernel), "weight")?;
        Ok(vec![kernels::held::hold(weight)?, vb.get(out_c, "bias")?])
    })?;
    let mut tensors = tensors.into_iter();
    let weight = tensors.next().expect("a conv layer has a weight");
    Ok(Conv2d {
        inner: candle_nn::Conv2d::new(weight, tensors.next(), cfg),
    })
}

impl Conv2d {
    /// The weight `[O, C, k, k]`, as held (f16 on the CPU when lossless).
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// The bias `[O]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    /// `conv(x) + b + addend`, the adds fused into the convolution on the CPU.
    pub fn forward_add(&self, x: &Tensor, addend: Option<ConvAddend>) -> Result<Tensor> {
        timed(Op::Conv, x.device(), || self.forward_fused(x, addend))
    }

    fn forward_fused(&self, x: &Tensor, addend: Option<ConvAddend>) -> Result<Tensor> {
        match kernels::path(x.device(), x.dtype()) {
            Path::Cpu => {
                let addend = match addend {
                    Some(ConvAddend::Full(t)) => Some(ConvAddend::Full(t.contiguous()?)),
                    Some(ConvAddend::PerChannel(t)) => {
                        Some(ConvAddend::PerChannel(t.contiguous()?))
                    }
                    None => None,
                };
                let cfg = self.inner.config();
                x.contiguous()?.apply_op2_no_bwd(
                    self.inner.weight(),
                    &FusedConv2d {
                        stride: cfg.stride,
                        padding: cfg.padding,
                        bias: self.inner.bias().cloned(),
                        addend,
                        winograd: true,
                    },
                )
            }
            _ => self.forward_reference(x, addend),
        }
    }

    /// The reference: candle's `conv2d` and bias (candle-nn's `Conv2d`), then the add.
    pub fn forward_reference(&self, x: &Tensor, addend: Option<ConvAddend>) -> Result<Tensor> {
        let y = if self.inner.weight().dtype() == x.dtype() {
            self.inner.forward(x)?
        } else {
            let weight = self.inner.weight().to_dtype(x.dtype())?;
            candle_nn::Conv2d::new(weight, self.inner.bias().cloned(), *self.inner.config())
                .forward(x)?
        };
        match addend {
            None => Ok(y),
            Some(ConvAddend::Full(t)) => y + t,
            Some(ConvAddend::PerChannel(t)) => {
                let (b, o) = t.dims2()?;
                y.broadcast_add(&t.reshape((b, o, 1, 1))?)
            }
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_add(x, None)
    }
}

/// GroupNorm with affine parameters, optionally followed by SiLU in the same kernel.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

/// A GroupNorm with affine parameters (`weight`, `bias`).
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let weight = vb.get(channels, "weight")?;
    let bias = vb.get(channels, "bias")?;
    Ok(GroupNorm {
        inner: candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?,
        weight,
        bias,
        groups,
        eps,
    })
}

impl GroupNorm {
    /// `silu(groupnorm(x))`.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, true)
    }

    fn run(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        timed(Op::Norm, x.device(), || self.run_fused(x, silu))
    }

    fn run_fused(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        match kernels::path(x.device(), x.dtype()) {
            Path::Cpu | Path::Cuda => x.contiguous()?.apply_op3_no_bwd(
                &self.weight,
                &self.bias,
                &kernels::group_norm::FusedGroupNorm {
                    groups: self.groups,
                    eps: self.eps,
                    silu,
                },
            ),
            Path::Reference => self.forward_reference(x, silu),
        }
    }

    /// The reference: candle-nn's `GroupNorm`, then `silu`.
    pub fn forward_reference(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let y = self.inner.forward(x)?;
        if silu {
            y.silu()
        } else {
            Ok(y)
        }
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false)
    }
}

/// The precision attention scores and softmax run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionPrecision {
    /// Always f32 (diffusers' `upcast_attention`; the CLIP text encoders).
    F32,
    /// The input dtype, with f32 accumulation in the matmuls and the softmax (what PyTorch's
    /// fused SDPA does in f16).
    Native,
}

/// Head widths the CUDA flash kernel is built for (SD 1.x: 40/80/160, SD 2.x/SDXL: 64).
pub const CUDA_FLASH_HEAD_DIMS: &[usize] = &[40, 64, 80, 128, 160];

/// Multi-head scaled dot-product attention over `[B, L, H·D]` projections (whose rows may be
/// views into one fused projection), optionally causal (query `i` sees keys `0..=i`).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    causal: bool,
    precision: AttentionPrecision,
) -> Result<Tensor> {
    timed(Op::Attention, q.device(), || {
        attention_fused(q, k, v, heads, causal, precision)
    })
}

fn attention_fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    causal: bool,
    precision: AttentionPrecision,
) -> Result<Tensor> {
    let d = q.dim(2)? / heads.max(1);
    let op = FusedAttention {
        heads,
        scale: 1.0 / (d as f32).sqrt(),
        causal,
    };
    // The kernels take rows anywhere (views into a fused projection) as long as each row is
    // contiguous.
    let rows = |t: &Tensor| -> Result<Tensor> {
        if t.stride().last() == Some(&1) {
            Ok(t.clone())
        } else {
            t.contiguous()
        }
    };
    match kernels::path(q.device(), q.dtype()) {
        Path::Cpu => rows(q)?.apply_op3_no_bwd(&rows(k)?, &rows(v)?, &op),
        Path::Cuda
            if !causal
                && precision == AttentionPrecision::Native
                && q.dtype() != DType::F32
                && CUDA_FLASH_HEAD_DIMS.contains(&d) =>
        {
            rows(q)?.apply_op3_no_bwd(&rows(k)?, &rows(v)?, &op)
        }
        _ => attention_reference(q, k, v, heads, causal, precision),
    }
}

/// `[L, L]` additive causal mask: 0 on and below the diagonal, the most negative f32 above.
fn causal_mask(len: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..len * len)
        .map(|i| if i % len > i / len { f32::MIN } else { 0.0 })
        .collect();
    Tensor::from_vec(mask, (len, len), device)
}

/// The reference attention: per-head matmuls and a softmax over materialised scores (with an
/// additive causal mask when asked). With [`AttentionPrecision::F32`] (or f32 inputs) q, k and
/// v are cast to f32 and the result back; with `Native` the query is scaled first so
/// half-precision scores stay in range.
pub fn attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    causal: bool,
    precision: AttentionPrecision,
) -> Result<Tensor> {
    let (b, lq, inner) = q.dims3()?;
    let lk = k.dim(1)?;
    let d = inner / heads;
    let dtype = q.dtype();
    let upcast = precision == AttentionPrecision::F32 || dtype == DType::F32;
    let split = |t: &Tensor, l: usize| -> Result<Tensor> {
        let t = t.reshape((b, l, heads, d))?.transpose(1, 2)?.contiguous()?;
        if upcast {
            t.to_dtype(DType::F32)
        } else {
            Ok(t)
        }
    };
    let (q, k, v) = (split(q, lq)?, split(k, lk)?, split(v, lk)?);
    let scale = 1.0 / (d as f64).sqrt();
    let scores = if upcast {
        (q.matmul(&k.t()?)? * scale)?
    } else {
        (q * scale)?.matmul(&k.t()?)?
    };
    let scores = if causal {
        let mask = causal_mask(lq, scores.device())?.to_dtype(scores.dtype())?;
        scores.broadcast_add(&mask)?
    } else {
        scores
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((b, lq, inner))?
        .to_dtype(dtype)
}

/// The activation between a text encoder's MLP layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x · sigmoid(1.702·x)` (OpenAI CLIP, `quick_gelu`).
    QuickGelu,
    /// The exact (erf) GELU (OpenCLIP, `gelu`).
    Gelu,
}

impl Activation {
    /// Applies the activation, as one parallel pass on the CPU.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match kernels::path(x.device(), x.dtype()) {
            Path::Cpu => {
                let kind = match self {
                    Activation::QuickGelu => kernels::activation::Kind::QuickGelu,
                    Activation::Gelu => kernels::activation::Kind::GeluErf,
                };
                x.contiguous()?
                    .apply_op1_no_bwd(&kernels::activation::FusedActivation(kind))
            }
            _ => self.apply_reference(x),
        }
    }

    /// The reference: candle's `sigmoid` and products, or `gelu_erf`.
    pub fn apply_reference(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Activation::Gelu => x.gelu_erf(),
        }
    }
}

/// GEGLU: the first half of the last dimension times the exact GELU of the second half.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    timed(Op::Geglu, h.device(), || {
        match kernels::path(h.device(), h.dtype()) {
            Path::Cpu | Path::Cuda => h
                .contiguous()?
                .apply_op1_no_bwd(&kernels::geglu::FusedGeglu),
            Path::Reference => geglu_reference(h),
        }
    })
}

/// The reference GEGLU: chunk, `gelu_erf`, multiply.
pub fn geglu_reference(h: &Tensor) -> Result<Tensor> {
    let halves = h.chunk(2, candle_core::D::Minus1)?;
    &halves[0] * halves[1].gelu_erf()?
}
