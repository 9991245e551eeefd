//! Which files a Stable Diffusion pipeline needs, fetching exactly those into the HF cache,
//! and checking — offline — that a cache (or a folder) holds a complete, intact copy.
//!
//! The same check runs in `jhakaas-worker fetch --check` and when the server starts, so an
//! image whose weights were baked in at build time can prove it before it takes traffic.

use crate::config::PipelineKind;
use crate::error::{Error, Result};
use crate::source::ModelSource;
use std::path::{Path, PathBuf};

/// What a repository must hold: a whole pipeline (SD or SDXL), or a lone `AutoencoderKL` (a VAE
/// override such as `madebyollin/sdxl-vae-fp16-fix`, with `config.json` at its root).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layout {
    /// JSON files that must be present.
    configs: Vec<String>,
    /// Tokenizer folders: `vocab.json` + `merges.txt`, or `tokenizer.json`.
    tokenizers: Vec<&'static str>,
    /// Weights as (folder, file stem); `""` is the root.
    weights: Vec<(&'static str, &'static str)>,
}

impl Layout {
    /// A diffusers pipeline of `kind`: its family's configs, tokenizers and weights.
    fn pipeline(kind: PipelineKind) -> Self {
        Layout {
            configs: kind.config_files(),
            tokenizers: kind.text_encoders().iter().map(|t| t.tokenizer).collect(),
            weights: kind.weight_files(),
        }
    }

    /// A lone VAE.
    fn vae() -> Self {
        Layout {
            configs: vec!["config.json".into()],
            tokenizers: vec![],
            weights: vec![("", "diffusion_pytorch_model")],
        }
    }
}

/// Optional tokenizer files, fetched when present.
const TOKENIZER_OPTIONAL: &[&str] = &["special_tokens_map.json", "tokenizer_config.json"];

fn tokenizer_missing(folder: &str) -> String {
    format!("{folder}/vocab.json + {folder}/merges.txt (or {folder}/tokenizer.json)")
}

/// Which weights to prefer when a repository has both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Variant {
    /// `*.fp16.safetensors` where present (half the bytes; the CPU upcasts to f32).
    #[default]
    Fp16,
    /// Full-precision `*.safetensors` where present.
    Fp32,
}

impl std::str::FromStr for Variant {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fp16" => Ok(Variant::Fp16),
            "fp32" => Ok(Variant::Fp32),
            other => Err(Error::invalid(
                "variant",
                format!("`{other}` is not fp16 or fp32"),
            )),
        }
    }
}

fn weight_candidates(folder: &str, stem: &str, variant: Variant) -> [String; 2] {
    let prefix = if folder.is_empty() {
        String::new()
    } else {
        format!("{folder}/")
    };
    let plain = format!("{prefix}{stem}.safetensors");
    let fp16 = format!("{prefix}{stem}.fp16.safetensors");
    match variant {
        Variant::Fp16 => [fp16, plain],
        Variant::Fp32 => [plain, fp16],
    }
}

/// The files to fetch from a repository listing `available` (paths relative to its root): a
/// pipeline's (SDXL's when it has `text_encoder_2/`), or a lone VAE's.
pub fn plan(available: &[String], variant: Variant, source_name: &str) -> Result<Vec<String>> {
    let has = |f: &str| available.iter().any(|a| a == f);
    let missing = |file: String| Error::MissingFile {
        source_name: source_name.to_string(),
        file,
    };
    let layout = if has("model_index.json") {
        Layout::pipeline(PipelineKind::from_listing(has(
            "text_encoder_2/config.json",
        )))
    } else if has("config.json") {
        Layout::vae()
    } else {
        return Err(missing(
            "model_index.json (a pipeline) or config.json (a VAE)".into(),
        ));
    };
    let mut files = Vec::new();
    for f in &layout.configs {
        if !has(f) {
            return Err(missing(f.clone()));
        }
        files.push(f.clone());
    }
    for folder in &layout.tokenizers {
        let bpe = [
            format!("{folder}/vocab.json"),
            format!("{folder}/merges.txt"),
        ];
        let json = format!("{folder}/tokenizer.json");
        if bpe.iter().all(|f| has(f)) {
            files.extend(bpe);
        } else if has(&json) {
            files.push(json);
        } else {
            return Err(missing(tokenizer_missing(folder)));
        }
        files.extend(
            TOKENIZER_OPTIONAL
                .iter()
                .map(|f| format!("{folder}/{f}"))
                .filter(|f| has(f)),
        );
    }
    for (folder, stem) in &layout.weights {
        let candidates = weight_candidates(folder, stem, variant);
        match candidates.iter().find(|c| has(c)) {
            Some(c) => files.push(c.clone()),
            None => return Err(missing(candidates.join(" or "))),
        }
    }
    Ok(files)
}

/// Checks that a safetensors file is whole: its header parses and the file is exactly as long
/// as the header says (a truncated or interrupted download fails here).
pub fn verify_safetensors(path: &Path) -> std::result::Result<(), String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| "shorter than a safetensors header".to_string())?;
    let header_len = u64::from_le_bytes(n);
    if header_len > 100 << 20 || 8 + header_len > len {
        return Err(format!(
            "header length {header_len} does not fit a {len}-byte file"
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(|e| e.to_string())?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| format!("header is not JSON: {e}"))?;
    let tensors = header.as_object().ok_or("header is not a JSON object")?;
    let mut end = 0u64;
    for (name, t) in tensors.iter().filter(|(k, _)| k.as_str() != "__metadata__") {
        let offsets = t
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .filter(|o| o.len() == 2)
            .ok_or_else(|| format!("tensor `{name}` has no data_offsets"))?;
        end = end.max(
            offsets[1]
                .as_u64()
                .ok_or_else(|| format!("tensor `{name}` has a bad offset"))?,
        );
    }
    let expected = 8 + header_len + end;
    if expected != len {
        return Err(format!(
            "file is {len} bytes, its header describes {expected}"
        ));
    }
    Ok(())
}

/// Outcome of an offline completeness check.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CheckReport {
    /// Files found and intact.
    pub present: Vec<PathBuf>,
    /// Required files that are absent.
    pub missing: Vec<String>,
    /// Files present but damaged, with why.
    pub corrupt: Vec<(String, String)>,
}

impl CheckReport {
    /// Whether the model can be loaded offline.
    pub fn is_complete(&self) -> bool {
        self.missing.is_empty() && self.corrupt.is_empty()
    }

    /// One line per problem, for error messages.
    pub fn problems(&self) -> String {
        let mut lines: Vec<String> = self
            .missing
            .iter()
            .map(|m| format!("missing {m}"))
            .collect();
        lines.extend(
            self.corrupt
                .iter()
                .map(|(f, why)| format!("corrupt {f}: {why}")),
        );
        lines.join("; ")
    }
}

/// Checks, without any network access, that `source` has every file a pipeline (or a lone
/// VAE) needs and that its weights are intact. Either weights variant counts.
pub fn check(source: &ModelSource) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    let layout = match source.cached_file("model_index.json")? {
        Some(index) => {
            let xl = std::fs::read(&index)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v.get("text_encoder_2").cloned())
                .is_some_and(|te2| {
                    te2.as_array()
                        .is_some_and(|a| a.iter().any(|x| !x.is_null()))
                });
            Layout::pipeline(PipelineKind::from_listing(xl))
        }
        None if source.cached_file("config.json")?.is_some() => Layout::vae(),
        None => Layout::pipeline(PipelineKind::StableDiffusion),
    };
    for f in &layout.configs {
        match source.cached_file(f)? {
            None => report.missing.push(f.clone()),
            Some(p) => {
                match std::fs::read(&p).map_err(|e| e.to_string()).and_then(|b| {
                    serde_json::from_slice::<serde_json::Value>(&b)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }) {
                    Ok(()) => report.present.push(p),
                    Err(e) => report.corrupt.push((f.clone(), e)),
                }
            }
        }
    }
    for folder in &layout.tokenizers {
        let bpe: Vec<Option<PathBuf>> = ["vocab.json", "merges.txt"]
            .iter()
            .map(|f| source.cached_file(&format!("{folder}/{f}")))
            .collect::<Result<_>>()?;
        if bpe.iter().all(Option::is_some) {
            report.present.extend(bpe.into_iter().flatten());
        } else if let Some(p) = source.cached_file(&format!("{folder}/tokenizer.json"))? {
            report.present.push(p);
        } else {
            report.missing.push(tokenizer_missing(folder));
        }
    }
    for (folder, stem) in &layout.weights {
        let candidates = weight_candidates(folder, stem, Variant::Fp32);
        let mut found = None;
        for c in &candidates {
            if let Some(p) = source.cached_file(c)? {
                found = Some((c.clone(), p));
                break;
            }
        }
        match found {
            Some((name, p)) => match verify_safetensors(&p) {
                Ok(()) => report.present.push(p),
                Err(why) => report.corrupt.push((name, why)),
            },
            None => report.missing.push(candidates.join(" or ")),
        }
    }
    Ok(report)
}

/// The files [`fetch`] takes from `source` (paths relative to its root, in [`plan`]'s order):
/// planned from the hub's listing of the repository, or from the files of a folder (hidden
/// entries such as `.git` left out). Image builds copy exactly these into a baked cache.
pub fn files(source: &ModelSource, variant: Variant) -> Result<Vec<String>> {
    let available = match source {
        ModelSource::Local(dir) => folder_listing(dir).map_err(|e| Error::Source {
            source_name: source.to_string(),
            reason: format!("listing the folder failed: {e}"),
        })?,
        ModelSource::Hub { repo, revision } => crate::source::hub_listing(repo, revision)
            .map_err(|reason| Error::Source {
                source_name: source.to_string(),
                reason,
            })?
            .into_iter()
            .map(|(name, _)| name)
            .collect(),
    };
    plan(&available, variant, &source.to_string())
}

/// Every file under `dir` (following symbolic links, as an HF snapshot's are), as `/`-separated
/// paths relative to it, without hidden files or folders.
fn folder_listing(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut found = Vec::new();
    let mut pending = vec![(dir.to_path_buf(), String::new())];
    while let Some((path, rel)) = pending.pop() {
        for entry in std::fs::read_dir(&path)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let meta = std::fs::metadata(entry.path())?;
            if meta.is_dir() {
                pending.push((entry.path(), rel));
            } else if meta.is_file() {
                found.push(rel);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Downloads the files `source` (a hub id) needs into the HF cache, resuming partial
/// downloads, with progress bars when `progress`; then verifies sizes and safetensors
/// headers. Local folders are only checked.
pub fn fetch(source: &ModelSource, variant: Variant, progress: bool) -> Result<Vec<PathBuf>> {
    let ModelSource::Hub { repo, revision } = source else {
        let report = check(source)?;
        return if report.is_complete() {
            Ok(report.present)
        } else {
            Err(Error::Source {
                source_name: source.to_string(),
                reason: report.problems(),
            })
        };
    };
    let fail = |reason: String| Error::Source {
        source_name: source.to_string(),
        reason,
    };
    let listing = crate::source::hub_listing(repo, revision).map_err(fail)?;
    let names: Vec<String> = listing.iter().map(|(n, _)| n.clone()).collect();
    let files = plan(&names, variant, &source.to_string())?;
    let mut paths = Vec::new();
    for file in &files {
        let path = crate::source::hub_download(repo, revision, file, progress).map_err(fail)?;
        let expected = listing
            .iter()
            .find(|(n, _)| n == file)
            .and_then(|(_, size)| *size);
        let actual = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if let Some(expected) = expected {
            if expected != actual {
                return Err(fail(format!(
                    "{file}: downloaded {actual} bytes, the hub lists {expected}"
                )));
            }
        }
        if file.ends_with(".safetensors") {
            verify_safetensors(&path).map_err(|why| fail(format!("{file}: {why}")))?;
        }
        paths.push(path);
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(files: &[&str]) -> Vec<String> {
        files.iter().map(|s| s.to_string()).collect()
    }

    const BASE: &[&str] = &[
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "unet/config.json",
        "vae/config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "README.md",
        "v1-5-pruned.ckpt",
        "text_encoder/model.safetensors",
        "text_encoder/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "vae/diffusion_pytorch_model.safetensors",
    ];

    #[test]
    fn plan_takes_only_what_a_pipeline_needs_in_the_preferred_variant() {
        let files = plan(&listing(BASE), Variant::Fp16, "x").unwrap();
        assert!(files.contains(&"unet/diffusion_pytorch_model.fp16.safetensors".to_string()));
        assert!(files.contains(&"text_encoder/model.fp16.safetensors".to_string()));
        // No fp16 VAE in the repo: the plain one.
        assert!(files.contains(&"vae/diffusion_pytorch_model.safetensors".to_string()));
        assert!(!files
            .iter()
            .any(|f| f.ends_with(".ckpt") || f.ends_with(".bin") || f == "README.md"));
        assert!(!files.contains(&"unet/diffusion_pytorch_model.safetensors".to_string()));
        let fp32 = plan(&listing(BASE), Variant::Fp32, "x").unwrap();
        assert!(fp32.contains(&"unet/diffusion_pytorch_model.safetensors".to_string()));
    }

    #[test]
    fn a_folder_lists_the_files_fetch_would_take_without_hidden_entries() {
        let dir = std::env::temp_dir().join(format!("jhakaas-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for f in BASE
            .iter()
            .chain(&[".git/config", "unet/.cache/x.safetensors"])
        {
            let p = dir.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"{}").unwrap();
        }
        let source = ModelSource::Local(dir.clone());
        let fp16 = files(&source, Variant::Fp16).unwrap();
        assert_eq!(fp16, plan(&listing(BASE), Variant::Fp16, "x").unwrap());
        assert!(fp16.contains(&"unet/diffusion_pytorch_model.fp16.safetensors".to_string()));
        let fp32 = files(&source, Variant::Fp32).unwrap();
        assert!(fp32.contains(&"unet/diffusion_pytorch_model.safetensors".to_string()));
        std::fs::remove_file(dir.join("model_index.json")).unwrap();
        let err = files(&source, Variant::Fp16).unwrap_err().to_string();
        assert!(err.contains("model_index.json"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn plan_names_what_the_repository_lacks() {
        let without_unet: Vec<&str> = BASE
            .iter()
            .copied()
            .filter(|f| !f.starts_with("unet/diffusion"))
            .collect();
        let err = plan(&listing(&without_unet), Variant::Fp16, "org/name")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unet/diffusion_pytorch_model") && err.contains("org/name"),
            "{err}"
        );
    }

    #[test]
    fn plan_adds_sdxl_second_encoder_and_handles_a_lone_vae() {
        let mut xl: Vec<&str> = BASE.to_vec();
        xl.extend([
            "text_encoder_2/config.json",
            "text_encoder_2/model.safetensors",
            "text_encoder_2/model.fp16.safetensors",
            "tokenizer_2/vocab.json",
            "tokenizer_2/merges.txt",
            "tokenizer_2/special_tokens_map.json",
            "sd_xl_base_1.0.safetensors",
        ]);
        let files = plan(&listing(&xl), Variant::Fp16, "x").unwrap();
        for f in [
            "text_encoder_2/config.json",
            "text_encoder_2/model.fp16.safetensors",
            "tokenizer_2/merges.txt",
            "tokenizer_2/special_tokens_map.json",
        ] {
            assert!(files.contains(&f.to_string()), "{f} missing from {files:?}");
        }
        assert!(!files.iter().any(|f| f.starts_with("sd_xl_base")));
        let no_tok2: Vec<&str> = xl
            .iter()
            .copied()
            .filter(|f| !f.starts_with("tokenizer_2/"))
            .collect();
        let err = plan(&listing(&no_tok2), Variant::Fp16, "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("tokenizer_2/vocab.json"), "{err}");

        let vae = listing(&[
            "config.json",
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.bin",
            "README.md",
        ]);
        assert_eq!(
            plan(&vae, Variant::Fp16, "v").unwrap(),
            ["config.json", "diffusion_pytorch_model.safetensors"]
        );
    }

    #[test]
    fn truncated_safetensors_are_detected() {
        let dir = std::env::temp_dir().join(format!("jhakaas-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        let t =
            candle_core::Tensor::zeros((4, 4), candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap();
        candle_core::safetensors::save(
            &std::collections::HashMap::from([("w".to_string(), t)]),
            &path,
        )
        .unwrap();
        assert_eq!(verify_safetensors(&path), Ok(()));
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        assert!(verify_safetensors(&path).unwrap_err().contains("bytes"));
        std::fs::write(&path, b"garbage").unwrap();
        assert!(verify_safetensors(&path).is_err());
    }
}
