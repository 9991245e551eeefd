//! LoRA adapters merged into a copy of the base weights at load: W′ = W + weight · (alpha /
//! rank) · up · down (no alpha: scale 1), for the UNet and each text encoder, as diffusers'
//! `load_lora_weights` computes. Files in kohya/A1111 (`lora_unet_…`, `lora_te_…`,
//! `lora_te1_…`/`lora_te2_…`, `.lora_down/.lora_up/.alpha`), diffusers/PEFT
//! (`unet.….lora_A/lora_B`, `text_encoder.…`) and the older diffusers attention-processor
//! names (`….processor.to_q_lora.down`) are read; keys are mapped outward from the base
//! checkpoint's own parameter names, and a key that places nowhere fails the load naming it.
//! Merged weights are never unmerged: a variant is its own load.

mod keys;
mod sgm;

pub use keys::Targets as LoraTargets;

use crate::config::PipelineKind;
use crate::error::{Error, Result};
use crate::source::ModelSource;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

/// One adapter of a request: a file and the weight it is applied with.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraAdapter {
    /// A `.safetensors` LoRA file.
    pub path: PathBuf,
    /// Its weight (1.0: as trained).
    pub weight: f64,
}

impl LoraAdapter {
    /// Parses `PATH[:WEIGHT]` (weight 1.0 when omitted).
    pub fn parse(spec: &str) -> Result<Self> {
        let invalid = |reason: String| Error::invalid("lora", reason);
        // A trailing `:NUMBER` is the weight; any other colon belongs to the path.
        let (path, weight) = match spec.rsplit_once(':') {
            Some((p, w)) => match w.parse::<f64>() {
                Ok(w) => (p, w),
                Err(_) => (spec, 1.0),
            },
            None => (spec, 1.0),
        };
        if path.is_empty() {
            return Err(invalid(format!("`{spec}`: expected PATH[:WEIGHT]")));
        }
        if !weight.is_finite() || weight.abs() > 100.0 {
            return Err(invalid(format!(
                "`{spec}`: the weight must be a finite number within ±100"
            )));
        }
        Ok(Self {
            path: PathBuf::from(path),
            weight,
        })
    }

    /// The adapter's file name, as errors show it (never the server's folders).
    fn shown(&self) -> String {
        self.path
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// The adapter's name: its file stem.
    pub fn name(&self) -> String {
        self.path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// One low-rank update of one weight.
#[derive(Debug, Clone)]
pub struct Delta {
    /// `[out, rank]` (or `[out, rank, 1, 1]` for a conv).
    up: Tensor,
    /// `[rank, in]` (or `[rank, in, kh, kw]`).
    down: Tensor,
    /// weight · alpha / rank.
    scale: f64,
}

impl Delta {
    /// `scale · up · down` in the shape of the weight it updates.
    fn dense(&self, shape: &[usize]) -> candle_core::Result<Tensor> {
        let rank = self.down.dim(0)?;
        let out = self.up.dim(0)?;
        let up = self.up.reshape((out, rank))?;
        let down = self.down.reshape((rank, ()))?;
        (up.matmul(&down)? * self.scale)?.reshape(shape)
    }
}

/// The merged updates of a set of adapters, by component folder and weight name.
#[derive(Debug, Clone, Default)]
pub struct LoraPlan {
    deltas: HashMap<&'static str, HashMap<String, Vec<Delta>>>,
    /// `name:weight` of each adapter, for the image's parameters.
    pub summary: Vec<String>,
}

impl LoraPlan {
    /// Reads `adapters` and places each of their updates on a weight of the `kind` pipeline
    /// at `source`. Fails naming the keys of an adapter that place nowhere or do not fit.
    pub fn build(
        adapters: &[LoraAdapter],
        source: &ModelSource,
        kind: PipelineKind,
    ) -> Result<Self> {
        let mut plan = LoraPlan::default();
        if adapters.is_empty() {
            return Ok(plan);
        }
        let targets = keys::Targets::of(source, kind)?;
        for adapter in adapters {
            let file = adapter.shown();
            let placed = place(&targets, adapter)?;
            let tensors =
                candle_core::safetensors::load(&adapter.path, &Device::Cpu).map_err(|e| {
                    Error::invalid(
                        "lora",
                        format!("{file}: not a readable safetensors file ({e})"),
                    )
                })?;
            let get = |k: &str| -> Result<Tensor> {
                tensors
                    .get(k)
                    .ok_or_else(|| {
                        Error::invalid(
                            "lora",
                            format!("{file}: `{k}` has a dtype candle cannot read"),
                        )
                    })?
                    .to_dtype(DType::F32)
                    .map_err(Error::Candle)
            };
            for p in placed {
                let (up, down) = (get(&p.up)?, get(&p.down)?);
                let rank = down.dim(0).map_err(Error::Candle)? as f64;
                let alpha = match &p.alpha {
                    Some(k) => get(k)?
                        .flatten_all()
                        .and_then(|a| a.to_vec1::<f32>())
                        .map_err(Error::Candle)?
                        .first()
                        .map_or(rank, |a| *a as f64),
                    None => rank,
                };
                let delta = Delta {
                    up,
                    down,
                    scale: adapter.weight * alpha / rank,
                };
                plan.deltas
                    .entry(p.folder)
                    .or_default()
                    .entry(p.weight)
                    .or_default()
                    .push(delta);
            }
            plan.summary
                .push(format!("{}:{}", adapter.name(), adapter.weight));
        }
        Ok(plan)
    }

    /// Checks, from the adapter files' headers alone, that every key of `adapters` places on
    /// one of `targets`' weights and fits it (what [`LoraPlan::build`] would refuse).
    pub fn check(adapters: &[LoraAdapter], targets: &LoraTargets) -> Result<()> {
        for adapter in adapters {
            place(targets, adapter)?;
        }
        Ok(())
    }

    /// Elements of the base weights `adapters` change, each counted once, from the adapter
    /// files' headers alone (what [`LoraPlan::build`] would merge into).
    pub fn changed_elements(adapters: &[LoraAdapter], targets: &LoraTargets) -> Result<u64> {
        let mut seen = std::collections::HashSet::new();
        let mut total = 0;
        for adapter in adapters {
            for p in place(targets, adapter)? {
                if seen.insert((p.folder, p.weight.clone())) {
                    total += targets.elements(p.folder, &p.weight);
                }
            }
        }
        Ok(total)
    }

    /// The updates of component `folder`, by weight name.
    pub fn deltas(&self, folder: &str) -> Option<&HashMap<String, Vec<Delta>>> {
        self.deltas.get(folder)
    }

    /// Whether any adapter is merged.
    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty()
    }
}

/// Where each update of `adapter` goes, from its header.
fn place(targets: &LoraTargets, adapter: &LoraAdapter) -> Result<Vec<keys::Placed>> {
    let file = adapter.shown();
    let shapes = crate::weights::file_tensor_shapes(&adapter.path).map_err(|e| {
        Error::invalid(
            "lora",
            format!("{file}: not a readable safetensors file ({e})"),
        )
    })?;
    targets.place(&shapes, &file)
}

/// `base + Σ updates`, computed in f32 on the weight's device.
pub fn merge(base: Tensor, deltas: &[Delta]) -> candle_core::Result<Tensor> {
    let dims = base.dims().to_vec();
    let mut w = base.to_dtype(DType::F32)?;
    for d in deltas {
        let dense = d.dense(&dims)?.to_device(w.device())?;
        w = (w + dense)?;
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_and_without_a_weight() {
        let a = LoraAdapter::parse("style.safetensors:0.7").unwrap();
        assert_eq!(
            (a.path, a.weight),
            (PathBuf::from("style.safetensors"), 0.7)
        );
        let b = LoraAdapter::parse("/x/c:d/style.safetensors").unwrap();
        assert_eq!(b.weight, 1.0);
        assert_eq!(b.name(), "style");
        assert!(LoraAdapter::parse(":0.5").is_err());
        assert!(LoraAdapter::parse("a:1e9").is_err());
    }

    #[test]
    fn merge_adds_the_scaled_low_rank_product() {
        let dev = Device::Cpu;
        let base = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let up = Tensor::new(&[[1f32], [2.]], &dev).unwrap();
        let down = Tensor::new(&[[1f32, 0., -1.]], &dev).unwrap();
        let d = Delta {
            up,
            down,
            scale: 0.5,
        };
        let w = merge(base, &[d]).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(w, vec![vec![0.5, 0., -0.5], vec![1., 0., -1.]]);
    }
}
