//! diffusers `Transformer2DModel` (continuous input) and its `BasicTransformerBlock`,
//! as used inside the cross-attention blocks of an SD UNet.

use crate::kernels::layout::transpose_last_two;
use crate::layers::{
    attention, conv2d, geglu, group_norm, linear, AttentionPrecision, Conv2d, ConvAddend,
    GroupNorm, Linear,
};
use candle_core::{Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

/// diffusers `Attention` as configured by `BasicTransformerBlock` (no q/k/v bias). Projections
/// of the same input run as one gemm: q, k and v for self-attention, k and v of the context for
/// cross-attention.
#[derive(Debug)]
struct CrossAttention {
    projections: Projections,
    to_out: Linear,
    heads: usize,
    precision: AttentionPrecision,
}

#[derive(Debug)]
enum Projections {
    /// `to_q`, `to_k`, `to_v` of the hidden states.
    SelfAttention(Linear),
    /// `to_q` of the hidden states, `to_k` and `to_v` of the context.
    Cross { q: Linear, kv: Linear },
}

impl CrossAttention {
    fn new(
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
        precision: AttentionPrecision,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let kv_dim = context_dim.unwrap_or(query_dim);
        let to_q = linear(query_dim, inner, false, vb.pp("to_q"))?;
        let to_k = linear(kv_dim, inner, false, vb.pp("to_k"))?;
        let to_v = linear(kv_dim, inner, false, vb.pp("to_v"))?;
        let projections = match context_dim {
            None => Projections::SelfAttention(Linear::concat(&[to_q, to_k, to_v])?),
            Some(_) => Projections::Cross {
                q: to_q,
                kv: Linear::concat(&[to_k, to_v])?,
            },
        };
        Ok(Self {
            projections,
            to_out: linear(inner, query_dim, true, vb.pp("to_out.0"))?,
            heads,
            precision,
        })
    }

    /// Attention of `xs` over itself or over `context`, plus `residual`.
    fn forward(&self, xs: &Tensor, context: Option<&Tensor>, residual: &Tensor) -> Result<Tensor> {
        let (q, k, v) = match (&self.projections, context) {
            (Projections::SelfAttention(qkv), _) => {
                let qkv = qkv.forward(xs)?;
                let d = qkv.dim(2)? / 3;
                (
                    qkv.narrow(2, 0, d)?,
                    qkv.narrow(2, d, d)?,
                    qkv.narrow(2, 2 * d, d)?,
                )
            }
            (Projections::Cross { q, kv }, Some(context)) => {
                let kv = kv.forward(context)?;
                let d = kv.dim(2)? / 2;
                (q.forward(xs)?, kv.narrow(2, 0, d)?, kv.narrow(2, d, d)?)
            }
            (Projections::Cross { .. }, None) => {
                candle_core::bail!("cross-attention needs a context")
            }
        };
        let out = attention(&q, &k, &v, self.heads, false, self.precision)?;
        self.to_out.forward_residual(&out, Some(residual))
    }
}

/// GEGLU feed-forward: `Linear(dim, 2·inner)`, value × GELU(gate) with the exact erf GELU,
/// then `Linear(inner, dim)`.
#[derive(Debug)]
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj_in: linear(dim, inner * 2, true, vb.pp("net.0.proj"))?,
            proj_out: linear(inner, dim, true, vb.pp("net.2"))?,
        })
    }

    /// The feed-forward of `xs`, plus `residual`.
    fn forward(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let h = geglu(&self.proj_in.forward(xs)?)?;
        self.proj_out.forward_residual(&h, Some(residual))
    }
}

/// Self-attention, cross-attention and feed-forward, each pre-normed with a residual.
#[derive(Debug)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(
        dim: usize,
        heads: usize,
        head_dim: usize,
        context_dim: usize,
        precision: AttentionPrecision,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            norm1: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: CrossAttention::new(dim, None, heads, head_dim, precision, vb.pp("attn1"))?,
            norm2: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: CrossAttention::new(
                dim,
                Some(context_dim),
                heads,
                head_dim,
                precision,
                vb.pp("attn2"),
            )?,
            norm3: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = self.attn1.forward(&self.norm1.forward(xs)?, None, xs)?;
        let xs = self
            .attn2
            .forward(&self.norm2.forward(&xs)?, Some(context), &xs)?;
        self.ff.forward(&self.norm3.forward(&xs)?, &xs)
    }
}

#[derive(Debug)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// diffusers `Transformer2DModel` over a feature map `[B, C, H, W]`.
#[derive(Debug)]
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

/// Shape of one [`Transformer2D`].
#[derive(Debug, Clone, Copy)]
pub struct Transformer2DConfig {
    /// Channels of the feature map.
    pub channels: usize,
    /// Attention heads (head width = channels / heads).
    pub heads: usize,
    /// Number of transformer blocks.
    pub depth: usize,
    /// Width of the text context.
    pub context_dim: usize,
    /// GroupNorm groups.
    pub groups: usize,
    /// Linear instead of 1×1 conv projections.
    pub use_linear_projection: bool,
    /// Attention scores in f32 whatever the working dtype (`upcast_attention`).
    pub upcast_attention: bool,
}

impl Transformer2D {
    /// Builds the transformer from `vb` (`norm`, `proj_in`, `transformer_blocks.N`, `proj_out`).
    pub fn new(cfg: Transformer2DConfig, vb: VarBuilder) -> Result<Self> {
        let c = cfg.channels;
        let head_dim = c / cfg.heads;
        let inner = cfg.heads * head_dim;
        let proj = |i: usize, o: usize, vb: VarBuilder| -> Result<Projection> {
            Ok(if cfg.use_linear_projection {
                Projection::Linear(linear(i, o, true, vb)?)
            } else {
                Projection::Conv(conv2d(i, o, 1, 1, 0, vb)?)
            })
        };
        let blocks = (0..cfg.depth)
            .map(|i| {
                BasicTransformerBlock::new(
                    inner,
                    cfg.heads,
                    head_dim,
                    cfg.context_dim,
                    if cfg.upcast_attention {
                        AttentionPrecision::F32
                    } else {
                        AttentionPrecision::Native
                    },
                    vb.pp(format!("transformer_blocks.{i}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(cfg.groups, c, 1e-6, vb.pp("norm"))?,
            proj_in: proj(c, inner, vb.pp("proj_in"))?,
            blocks,
            proj_out: proj(inner, c, vb.pp("proj_out"))?,
        })
    }

    /// Runs the transformer with the text `context` `[B, 77, D]`.
    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let residual = xs;
        let xs = self.norm.forward(xs)?;
        let to_tokens = |t: Tensor| -> Result<Tensor> {
            let inner = t.dim(1)?;
            transpose_last_two(&t.reshape((b, inner, h * w))?)
        };
        let mut xs = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv.forward(&xs)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(xs)?)?,
        };
        for block in &self.blocks {
            xs = block.forward(&xs, context)?;
        }
        let inner = xs.dim(2)?;
        let to_map = |t: Tensor, ch: usize| -> Result<Tensor> {
            transpose_last_two(&t)?.reshape((b, ch, h, w))
        };
        match &self.proj_out {
            Projection::Conv(conv) => conv.forward_add(
                &to_map(xs, inner)?,
                Some(ConvAddend::Full(residual.clone())),
            ),
            Projection::Linear(lin) => to_map(lin.forward(&xs)?, c)? + residual,
        }
    }
}
