//! The CLIP tokenizer, read from `tokenizer.json` when the checkpoint has one, otherwise built
//! from `vocab.json` + `merges.txt` the way transformers converts a slow `CLIPTokenizer`
//! (NFC, whitespace collapse, lowercase, CLIP's word regex, byte-level BPE with `</w>`).
//! Sequences are truncated to the model's length (BOS and EOS included) and padded with the
//! checkpoint's own pad token (`<|endoftext|>` for SD 1.x, `!` for SD 2.x).

use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::path::Path;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationParams,
};

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
const CLIP_WORD_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A CLIP tokenizer producing fixed-length id sequences.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    /// `inner` without truncation and padding, to count a prompt's tokens (built once: a
    /// clone per prompt copied the whole vocabulary, ~5 ms).
    untruncated: Tokenizer,
    max_length: usize,
    pad_id: u32,
}

impl ClipTokenizer {
    /// Loads the tokenizer in `dir` (a pipeline's `tokenizer/` folder), producing `max_length`
    /// ids per prompt.
    pub fn from_dir(dir: &Path, max_length: usize) -> Result<Self> {
        let name = |f: &str| format!("tokenizer/{f}");
        let tokenizer_json = dir.join("tokenizer.json");
        let mut inner = if tokenizer_json.is_file() {
            Tokenizer::from_file(&tokenizer_json).map_err(|e| Error::Config {
                file: name("tokenizer.json"),
                reason: e.to_string(),
            })?
        } else {
            let vocab_path = dir.join("vocab.json");
            let merges_path = dir.join("merges.txt");
            let vocab: Value = crate::config::read_json(&vocab_path, &name("vocab.json"))?;
            let merges = std::fs::read_to_string(&merges_path).map_err(|e| Error::Config {
                file: name("merges.txt"),
                reason: e.to_string(),
            })?;
            let spec = clip_tokenizer_json(vocab, &merges)?;
            Tokenizer::from_bytes(spec.to_string().as_bytes()).map_err(|e| Error::Config {
                file: name("vocab.json"),
                reason: e.to_string(),
            })?
        };
        let pad_token = read_pad_token(dir)?.unwrap_or_else(|| EOS.to_string());
        // transformers treats every declared special token as unsplittable, so SD 2.x's pad
        // token `!` always encodes to its own id, even inside `!!!`.
        inner.add_special_tokens(&[AddedToken::from(pad_token.clone(), true)]);
        let pad_id = inner.token_to_id(&pad_token).ok_or_else(|| {
            Error::unsupported(
                name("special_tokens_map.json"),
                "pad_token",
                &pad_token,
                "the pad token is not in the vocabulary",
            )
        })?;
        let mut untruncated = inner.clone();
        untruncated
            .with_truncation(None)
            .map_err(|e| Error::Config {
                file: name("tokenizer"),
                reason: e.to_string(),
            })?;
        untruncated.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length,
                ..Default::default()
            }))
            .map_err(|e| Error::Config {
                file: name("tokenizer"),
                reason: e.to_string(),
            })?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token,
        }));
        Ok(Self {
            inner,
            untruncated,
            max_length,
            pad_id,
        })
    }

    /// Token ids of `text`: BOS, up to `max_length − 2` tokens, EOS, then padding.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::invalid("prompt", e.to_string()))?;
        let ids = enc.get_ids().to_vec();
        debug_assert_eq!(ids.len(), self.max_length);
        Ok(ids)
    }

    /// Number of tokens `text` has before truncation (BOS/EOS included), to warn about cuts.
    pub fn untruncated_len(&self, text: &str) -> Result<usize> {
        Ok(self
            .untruncated
            .encode(text, true)
            .map_err(|e| Error::invalid("prompt", e.to_string()))?
            .len())
    }

    /// The id sequences are padded with this id.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
}

/// The pad token from `special_tokens_map.json` or `tokenizer_config.json`, if declared.
fn read_pad_token(dir: &Path) -> Result<Option<String>> {
    for file in ["special_tokens_map.json", "tokenizer_config.json"] {
        let path = dir.join(file);
        if !path.is_file() {
            continue;
        }
        let v: Value = crate::config::read_json(&path, &format!("tokenizer/{file}"))?;
        match v.get("pad_token") {
            Some(Value::String(s)) => return Ok(Some(s.clone())),
            Some(Value::Object(o)) => {
                if let Some(Value::String(s)) = o.get("content") {
                    return Ok(Some(s.clone()));
                }
            }
            _ => {}
        }
    }
    Ok(None)
}

/// A `tokenizer.json` document equivalent to transformers' conversion of a slow CLIP tokenizer.
fn clip_tokenizer_json(vocab: Value, merges: &str) -> Result<Value> {
    let id = |tok: &str| -> Result<u64> {
        vocab.get(tok).and_then(Value::as_u64).ok_or_else(|| {
            Error::unsupported(
                "tokenizer/vocab.json",
                "vocab",
                tok,
                "a CLIP vocabulary must contain its BOS/EOS tokens",
            )
        })
    };
    let (bos, eos) = (id(BOS)?, id(EOS)?);
    let merges: Vec<&str> = merges
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            {"id": bos, "content": BOS, "single_word": false, "lstrip": false, "rstrip": false, "normalized": true, "special": true},
            {"id": eos, "content": EOS, "single_word": false, "lstrip": false, "rstrip": false, "normalized": true, "special": true}
        ],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
            {"type": "Lowercase"}
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": CLIP_WORD_REGEX}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": {"type": "RobertaProcessing", "sep": [EOS, eos], "cls": [BOS, bos], "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": EOS, "continuing_subword_prefix": "",
            "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false,
            "vocab": vocab, "merges": merges
        }
    }))
}
