//! transformers `CLIPTextModel` and `CLIPTextModelWithProjection`, built from a text encoder's
//! `config.json`.
//!
//! Accepts both spellings of the weights found in the wild: published SD checkpoints prefix
//! every key with `text_model.` (and carry a `position_ids` buffer, ignored here), while
//! transformers 5 writes them without the prefix.

use crate::config::ClipTextConfig;
use crate::layers::{
    attention, linear_laid_out, Activation, AttentionPrecision, Linear, WeightLayout,
};
use crate::weights::{FileRows, LoadedWeights};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};

/// The token embeddings: held as a tensor, or (on the CPU) rows read from the weights file
/// per prompt ([`LoadedWeights::file_rows`]). Both give the same values.
#[derive(Debug)]
enum TokenTable {
    Held(Embedding),
    /// On the CPU only; `dtype` is the one the model computes in.
    InFile {
        rows: FileRows,
        dtype: DType,
    },
}

impl TokenTable {
    /// The table `{vb}.token_embedding.weight` of `vocab × d`, left in the file where the
    /// weights say so.
    fn new(vocab: usize, d: usize, vb: VarBuilder, weights: &LoadedWeights) -> Result<Self> {
        let vb = vb.pp("token_embedding");
        let name = format!("{}.weight", vb.prefix());
        match weights.file_rows(&name) {
            Some(rows) if (rows.rows(), rows.cols()) == (vocab, d) => Ok(Self::InFile {
                rows,
                dtype: vb.dtype(),
            }),
            Some(rows) => Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: (vocab, d).into(),
                got: (rows.rows(), rows.cols()).into(),
            }),
            None => Ok(Self::Held(candle_nn::embedding(vocab, d, vb)?)),
        }
    }

    /// The embeddings of token ids `[B, L]`: `[B, L, D]`.
    fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Held(e) => e.forward(input_ids),
            Self::InFile { rows, dtype } => {
                let (b, l) = input_ids.dims2()?;
                let ids = input_ids.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
                let values = rows.gather(&ids)?;
                Tensor::from_vec(values, (b, l, rows.cols()), input_ids.device())?.to_dtype(*dtype)
            }
        }
    }
}

#[derive(Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    qkv_proj: Qkv,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// The q, k and v projections of one attention layer.
#[derive(Debug)]
enum Qkv {
    /// As one gemm (weights transposed and concatenated at load).
    Fused(Linear),
    /// Each as the file stores it ([`WeightLayout::AsStored`]): fused for each call only,
    /// so the gemm is [`Qkv::Fused`]'s.
    Separate([Linear; 3]),
}

impl Qkv {
    fn new(d: usize, layout: WeightLayout, attn: &VarBuilder) -> Result<Self> {
        let part = |name: &str| linear_laid_out(layout, d, d, true, attn.pp(name));
        let parts = [part("q_proj")?, part("k_proj")?, part("v_proj")?];
        Ok(match layout {
            WeightLayout::Transposed => Self::Fused(Linear::concat(&parts)?),
            WeightLayout::AsStored => Self::Separate(parts),
        })
    }

    /// `(q, k, v)` of `h`.
    fn forward(&self, h: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let qkv = match self {
            Self::Fused(qkv) => qkv.forward(h)?,
            Self::Separate(parts) => Linear::concat_weights(parts)?.forward(h)?,
        };
        let d = qkv.dim(2)? / 3;
        Ok((
            qkv.narrow(2, 0, d)?,
            qkv.narrow(2, d, d)?,
            qkv.narrow(2, 2 * d, d)?,
        ))
    }
}

impl EncoderLayer {
    fn new(cfg: &ClipTextConfig, layout: WeightLayout, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let ffn = cfg.intermediate_size;
        let attn = vb.pp("self_attn");
        Ok(Self {
            layer_norm1: candle_nn::layer_norm(d, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            qkv_proj: Qkv::new(d, layout, &attn)?,
            out_proj: linear_laid_out(layout, d, d, true, attn.pp("out_proj"))?,
            layer_norm2: candle_nn::layer_norm(d, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: linear_laid_out(layout, d, ffn, true, vb.pp("mlp.fc1"))?,
            fc2: linear_laid_out(layout, ffn, d, true, vb.pp("mlp.fc2"))?,
        })
    }

    /// One pre-norm layer with causal self-attention and the MLP, each with its residual.
    fn forward(&self, xs: &Tensor, heads: usize, act: Activation) -> Result<Tensor> {
        let h = self.layer_norm1.forward(xs)?;
        let (q, k, v) = self.qkv_proj.forward(&h)?;
        let attn = attention(&q, &k, &v, heads, true, AttentionPrecision::F32)?;
        let xs = self.out_proj.forward_residual(&attn, Some(xs))?;
        let h = self.layer_norm2.forward(&xs)?;
        let h = act.apply(&self.fc1.forward(&h)?)?;
        self.fc2.forward_residual(&h, Some(&xs))
    }
}

/// Which hidden state a pipeline conditions on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenLayer {
    /// The final-layer-normed last hidden state (SD 1.x/2.x).
    Last,
    /// transformers' `hidden_states[-2]`: the output of the second-to-last encoder layer,
    /// without the final layer norm (SDXL).
    Penultimate,
}

/// What one text-encoder call returns.
#[derive(Debug, Clone)]
pub struct ClipOutput {
    /// Hidden states `[B, L, D]` of the requested layer.
    pub hidden: Tensor,
    /// `text_projection` of the final-layer-normed state at each sequence's end-of-text token,
    /// `[B, projection_dim]`; only for encoders with a projection.
    pub text_embeds: Option<Tensor>,
}

/// The CLIP text transformer, optionally with its `text_projection`.
#[derive(Debug)]
pub struct ClipTextModel {
    token_embedding: TokenTable,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    heads: usize,
    activation: Activation,
    max_positions: usize,
    text_projection: Option<Linear>,
    projection_dim: Option<usize>,
    hidden_size: usize,
    eos_token_id: u32,
}

impl ClipTextModel {
    /// Builds the encoder from `weights`, finding out which key spelling the checkpoint uses,
    /// its linear layers holding their weights as `layout` says. `with_projection` also loads
    /// `text_projection` (CLIPTextModelWithProjection); `file` names the config in errors.
    pub fn new(
        cfg: &ClipTextConfig,
        weights: &LoadedWeights,
        (with_projection, layout): (bool, WeightLayout),
        file: &str,
    ) -> crate::Result<Self> {
        cfg.validate(file)?;
        let vb = weights.vb.clone();
        let text_projection = if with_projection {
            let dim = cfg.projection_dim.ok_or_else(|| {
                crate::Error::unsupported(
                    file,
                    "projection_dim",
                    "null",
                    "a CLIPTextModelWithProjection needs projection_dim",
                )
            })?;
            Some(linear_laid_out(
                layout,
                cfg.hidden_size,
                dim,
                false,
                vb.pp("text_projection"),
            )?)
        } else {
            None
        };
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let d = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(cfg, layout, vb.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            token_embedding: TokenTable::new(cfg.vocab_size, d, emb.clone(), weights)?,
            position_embedding: candle_nn::embedding(
                cfg.max_position_embeddings,
                d,
                emb.pp("position_embedding"),
            )?,
            layers,
            final_layer_norm: candle_nn::layer_norm(
                d,
                cfg.layer_norm_eps,
                vb.pp("final_layer_norm"),
            )?,
            heads: cfg.num_attention_heads,
            activation: if cfg.hidden_act == "gelu" {
                Activation::Gelu
            } else {
                Activation::QuickGelu
            },
            max_positions: cfg.max_position_embeddings,
            text_projection,
            projection_dim: if with_projection {
                cfg.projection_dim
            } else {
                None
            },
            hidden_size: cfg.hidden_size,
            eos_token_id: cfg.eos_token_id,
        })
    }

    /// Longest token sequence the model accepts.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Width of `text_embeds`, for encoders with a `text_projection`.
    pub fn projection_dim(&self) -> Option<usize> {
        self.projection_dim
    }

    /// Width of the hidden states.
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// Whether the MLP uses exact GELU (OpenCLIP, SD 2.x) rather than quick GELU (OpenAI CLIP).
    pub fn uses_exact_gelu(&self) -> bool {
        matches!(self.activation, Activation::Gelu)
    }

    /// Encodes token ids `[B, L]` (u32) to the final-layer-normed last hidden state `[B, L, D]`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        Ok(self.encode(input_ids, HiddenLayer::Last)?.hidden)
    }

    /// Encodes token ids `[B, L]` (u32) with causal attention, returning the requested hidden
    /// state and, with a projection, the pooled and projected `text_embeds`.
    pub fn encode(&self, input_ids: &Tensor, layer: HiddenLayer) -> Result<ClipOutput> {
        let (_, len) = input_ids.dims2()?;
        let device = input_ids.device();
        let positions = Tensor::arange(0u32, len as u32, device)?;
        let xs = self.token_embedding.forward(input_ids)?;
        let xs = xs.broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mut xs = xs;
        let mut penultimate = None;
        let n = self.layers.len();
        for (i, l) in self.layers.iter().enumerate() {
            if i + 1 == n {
                penultimate = Some(xs.clone());
                // The last layer only matters for `Last` and for the pooled output.
                if layer == HiddenLayer::Penultimate && self.text_projection.is_none() {
                    break;
                }
            }
            xs = l.forward(&xs, self.heads, self.activation)?;
        }
        let needs_final = layer == HiddenLayer::Last || self.text_projection.is_some();
        let last = if needs_final {
            Some(self.final_layer_norm.forward(&xs)?)
        } else {
            None
        };
        let text_embeds = match (&self.text_projection, &last) {
            (Some(proj), Some(last)) => {
                let rows = self.eos_positions(input_ids)?;
                let pooled = rows
                    .iter()
                    .enumerate()
                    .map(|(b, &pos)| last.narrow(0, b, 1)?.narrow(1, pos, 1)?.squeeze(1))
                    .collect::<Result<Vec<_>>>()?;
                Some(proj.forward(&Tensor::cat(&pooled, 0)?)?)
            }
            _ => None,
        };
        let hidden = match layer {
            HiddenLayer::Last => last.expect("final layer norm computed for Last"),
            HiddenLayer::Penultimate => match penultimate {
                Some(p) => p,
                // A one-layer encoder: hidden_states[-2] is the embeddings output.
                None => xs,
            },
        };
        Ok(ClipOutput {
            hidden,
            text_embeds,
        })
    }

    /// Where transformers pools each sequence: at `argmax(input_ids)` for configs with the stale
    /// `eos_token_id` 2, else at the first `eos_token_id` (position 0 if there is none, as transformers' argmax).
    fn eos_positions(&self, input_ids: &Tensor) -> Result<Vec<usize>> {
        let ids = input_ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        Ok(ids
            .iter()
            .map(|row| {
                if self.eos_token_id == 2 {
                    // first maximum, as torch.argmax
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&v| v == max).unwrap_or(0)
                } else {
                    row.iter()
                        .position(|&v| v == self.eos_token_id)
                        .unwrap_or(0)
                }
            })
            .collect())
    }
}
