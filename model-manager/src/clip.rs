//! transformers `CLIPTextModel`, built from `text_encoder/config.json`.
//!
//! Accepts both spellings of the weights found in the wild: published SD checkpoints prefix
//! every key with `text_model.` (and carry a `position_ids` buffer, ignored here), while
//! transformers 5 writes them without the prefix.

use crate::config::ClipTextConfig;
use crate::layers::{attention, linear};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};

#[derive(Debug, Clone, Copy)]
enum Activation {
    QuickGelu,
    Gelu,
}

impl Activation {
    fn apply(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Activation::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Activation::Gelu => xs.gelu_erf(),
        }
    }
}

#[derive(Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let attn = vb.pp("self_attn");
        Ok(Self {
            layer_norm1: candle_nn::layer_norm(d, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            q_proj: linear(d, d, true, attn.pp("q_proj"))?,
            k_proj: linear(d, d, true, attn.pp("k_proj"))?,
            v_proj: linear(d, d, true, attn.pp("v_proj"))?,
            out_proj: linear(d, d, true, attn.pp("out_proj"))?,
            layer_norm2: candle_nn::layer_norm(d, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: linear(d, cfg.intermediate_size, true, vb.pp("mlp.fc1"))?,
            fc2: linear(cfg.intermediate_size, d, true, vb.pp("mlp.fc2"))?,
        })
    }

    fn forward(&self, xs: &Tensor, heads: usize, mask: &Tensor, act: Activation) -> Result<Tensor> {
        let h = self.layer_norm1.forward(xs)?;
        let q = self.q_proj.forward(&h)?;
        let k = self.k_proj.forward(&h)?;
        let v = self.v_proj.forward(&h)?;
        let h = self
            .out_proj
            .forward(&attention(&q, &k, &v, heads, Some(mask))?)?;
        let xs = (xs + h)?;
        let h = self.layer_norm2.forward(&xs)?;
        let h = self.fc2.forward(&act.apply(&self.fc1.forward(&h)?)?)?;
        xs + h
    }
}

/// The CLIP text transformer, returning the final-layer-normed last hidden state.
#[derive(Debug)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    heads: usize,
    activation: Activation,
    max_positions: usize,
}

impl ClipTextModel {
    /// Builds the encoder from `vb`, finding out which key spelling the checkpoint uses.
    pub fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> crate::Result<Self> {
        cfg.validate()?;
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let d = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(cfg, vb.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            token_embedding: candle_nn::embedding(cfg.vocab_size, d, emb.pp("token_embedding"))?,
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
        })
    }

    /// Longest token sequence the model accepts.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Encodes token ids `[B, L]` (u32) to hidden states `[B, L, D]` with a causal mask.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_, len) = input_ids.dims2()?;
        let device = input_ids.device();
        let positions = Tensor::arange(0u32, len as u32, device)?;
        let xs = self.token_embedding.forward(input_ids)?;
        let xs = xs.broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(len, device)?;
        let mut xs = xs;
        for layer in &self.layers {
            xs = layer.forward(&xs, self.heads, &mask, self.activation)?;
        }
        self.final_layer_norm.forward(&xs)
    }
}

/// `[L, L]` additive mask: 0 on and below the diagonal, the most negative f32 above.
fn causal_mask(len: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j > i { f32::MIN } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (len, len), device)?.to_dtype(DType::F32)
}
