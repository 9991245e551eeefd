//! Prompts to UNet conditioning, as diffusers' `encode_prompt` computes it: one CLIP text
//! encoder's last hidden state (SD 1.x/2.x), or SDXL's two encoders' penultimate hidden states
//! concatenated along the feature axis plus the second encoder's pooled, projected embedding.

use crate::clip::{ClipTextModel, HiddenLayer};
use crate::config::{read_json, ClipTextConfig, ModelIndex, PipelineKind};
use crate::error::{Error, Result};
use crate::source::ModelSource;
use crate::tokenizer::ClipTokenizer;
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// One tokenizer + text encoder pair (`tokenizer`/`text_encoder` or `…_2`).
#[derive(Debug)]
pub struct TextEncoder {
    folder: &'static str,
    tokenizer: ClipTokenizer,
    model: ClipTextModel,
}

impl TextEncoder {
    /// The encoder's folder in the checkpoint (`text_encoder` or `text_encoder_2`).
    pub fn folder(&self) -> &'static str {
        self.folder
    }

    /// Its tokenizer.
    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    /// Its model.
    pub fn model(&self) -> &ClipTextModel {
        &self.model
    }

    /// Token ids for `text`, warning when the prompt is cut at the model's length.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let full = self.tokenizer.untruncated_len(text)?;
        let max = self.model.max_positions();
        if full > max {
            tracing::warn!(
                encoder = self.folder,
                tokens = full,
                max,
                "prompt is longer than the text encoder accepts; the end is ignored"
            );
        }
        self.tokenizer.encode(text)
    }

    /// `[B, L]` token ids of `prompts` on `device`.
    pub fn token_tensor(&self, prompts: &[&str], device: &Device) -> Result<Tensor> {
        let ids = prompts
            .iter()
            .map(|p| self.tokenize(p))
            .collect::<Result<Vec<_>>>()?;
        let len = ids[0].len();
        let flat: Vec<u32> = ids.into_iter().flatten().collect();
        Ok(Tensor::from_vec(flat, (prompts.len(), len), device)?)
    }
}

/// The conditioning of a batch of prompts.
#[derive(Debug, Clone)]
pub struct PromptEmbeddings {
    /// Cross-attention context `[B, L, D]`.
    pub context: Tensor,
    /// SDXL: pooled, projected embedding of the second encoder `[B, P]`.
    pub pooled: Option<Tensor>,
}

/// Every text encoder of a pipeline and how their outputs combine.
#[derive(Debug)]
pub struct TextConditioner {
    encoders: Vec<TextEncoder>,
    layer: HiddenLayer,
    zeros_for_absent_negative: bool,
    pages: crate::mapped::WeightPages,
}

/// Where a checkpoint's tokenizer files are (vocab.json + merges.txt, or tokenizer.json).
fn tokenizer_dir(source: &ModelSource, folder: &str) -> Result<std::path::PathBuf> {
    let vocab = source.optional_file(&format!("{folder}/vocab.json"))?;
    let tokenizer_json = source.optional_file(&format!("{folder}/tokenizer.json"))?;
    let dir = match (&vocab, &tokenizer_json) {
        (Some(v), _) => {
            source.file(&format!("{folder}/merges.txt"))?;
            v.parent().map(Path::to_path_buf)
        }
        (None, Some(t)) => t.parent().map(Path::to_path_buf),
        (None, None) => None,
    }
    .ok_or_else(|| Error::MissingFile {
        source_name: source.to_string(),
        file: format!("{folder}/vocab.json (+ merges.txt) or {folder}/tokenizer.json"),
    })?;
    // Fetch the optional files too, so they sit next to the others in the HF cache.
    for optional in ["special_tokens_map.json", "tokenizer_config.json"] {
        source.optional_file(&format!("{folder}/{optional}"))?;
    }
    Ok(dir)
}

/// Runs `f` (loading a text encoder, or counting its bytes) with its weights held in f32
/// whatever `--cpu-weights` says: their 77-token gemms are compute-bound and the widening pass
/// made text encoding 1.2× slower for 0.17 GB (SD 1.5).
pub(crate) fn weights_scope<R>(f: impl FnOnce() -> R) -> R {
    crate::kernels::held::in_f32(f)
}

impl TextConditioner {
    /// Loads the text encoders of a `kind` pipeline, taking the layers `lora` leaves
    /// untouched from `share`'s donor; also returns the bytes of the weights they hold on
    /// their own (in `dtype`, those shared with the donor not counted) and those shared.
    /// Under [`crate::weights::WeightResidency::Stage`] their linear weights stay in the
    /// mapped file as stored ([`crate::layers::WeightLayout::AsStored`]), so the text stage's
    /// exit drops them from the resident set.
    pub fn load(
        source: &ModelSource,
        kind: PipelineKind,
        index: &ModelIndex,
        (dtype, device, residency): (DType, &Device, crate::weights::WeightResidency),
        lora: &crate::lora::LoraPlan,
        share: &crate::sharing::Sharing,
    ) -> Result<(Self, u64, u64)> {
        // Held as stored where their pages are dropped between jobs; else transposed (faster).
        let layout = match residency {
            crate::weights::WeightResidency::Stage => crate::layers::WeightLayout::AsStored,
            crate::weights::WeightResidency::Resident => crate::layers::WeightLayout::Transposed,
        };
        let mut encoders = Vec::new();
        let mut bytes = 0;
        let mut shared_bytes = 0;
        let mut pages = crate::mapped::WeightPages::default();
        for slot in kind.text_encoders() {
            let (folder, tok_folder, with_projection) =
                (slot.folder, slot.tokenizer, slot.with_projection);
            let cfg_file = format!("{folder}/config.json");
            let cfg: ClipTextConfig = read_json(&source.file(&cfg_file)?, &cfg_file)?;
            let tokenizer = ClipTokenizer::from_dir(
                &tokenizer_dir(source, tok_folder)?,
                cfg.max_position_embeddings,
            )?;
            let w = weights_scope(|| {
                crate::weights::load_merged(
                    source,
                    folder,
                    "model",
                    dtype,
                    device,
                    lora.deltas(folder),
                )
            })?;
            let (model, shared) = share.build(folder, lora.deltas(folder), || {
                weights_scope(|| {
                    crate::weights::with_file(
                        &w.file,
                        ClipTextModel::new(&cfg, &w, (with_projection, layout), &cfg_file),
                    )
                })
            });
            let model = model?;
            pages = pages.and(w.pages());
            bytes += w.bytes.saturating_sub(shared);
            shared_bytes += shared;
            encoders.push(TextEncoder {
                folder,
                tokenizer,
                model,
            });
        }
        let layer = kind.hidden_layer();
        // Only SDXL pipelines read `force_zeros_for_empty_prompt`.
        let zeros = kind == PipelineKind::StableDiffusionXl && index.force_zeros_for_empty_prompt;
        Ok((
            Self {
                encoders,
                layer,
                zeros_for_absent_negative: zeros,
                pages,
            },
            bytes,
            shared_bytes,
        ))
    }

    /// The mapped files the encoders' weights lie in.
    pub fn pages(&self) -> &crate::mapped::WeightPages {
        &self.pages
    }

    /// The encoders, in the order their outputs are concatenated.
    pub fn encoders(&self) -> &[TextEncoder] {
        &self.encoders
    }

    /// Width of the pooled embedding (SDXL), if the pipeline has one.
    pub fn pooled_dim(&self) -> Option<usize> {
        self.encoders.iter().find_map(|e| e.model.projection_dim())
    }

    /// SDXL with `force_zeros_for_empty_prompt`: no negative prompt means all-zero negative
    /// embeddings rather than the embedding of "".
    pub fn zeros_for_absent_negative(&self) -> bool {
        self.zeros_for_absent_negative
    }

    /// Encodes a batch of prompts with every encoder and combines the outputs.
    pub fn encode(&self, prompts: &[&str], device: &Device) -> Result<PromptEmbeddings> {
        let mut hidden = Vec::with_capacity(self.encoders.len());
        let mut pooled = None;
        for enc in &self.encoders {
            let ids = enc.token_tensor(prompts, device)?;
            let out = enc.model.encode(&ids, self.layer)?;
            hidden.push(out.hidden);
            if out.text_embeds.is_some() {
                pooled = out.text_embeds;
            }
        }
        let context = if hidden.len() == 1 {
            hidden.remove(0)
        } else {
            Tensor::cat(&hidden, 2)?
        };
        Ok(PromptEmbeddings { context, pooled })
    }
}
