//! Where a model's files come from: a local diffusers folder, or a Hugging Face hub id
//! `org/name[@revision]` resolved through the HF cache (`HF_HUB_CACHE`, else `$HF_HOME/hub`,
//! else `~/.cache/huggingface/hub`). With `HF_HUB_OFFLINE=1` only the cache is consulted.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Short names for well-known checkpoints.
pub const ALIASES: &[(&str, &str)] = &[
    ("sd-1.5", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    ("sd-2.1", "stabilityai/stable-diffusion-2-1"),
    ("sd-turbo", "stabilityai/sd-turbo"),
];

/// A resolved model source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A diffusers pipeline folder on disk.
    Local(PathBuf),
    /// A hub repository at a revision (branch, tag or commit).
    Hub {
        /// `org/name`.
        repo: String,
        /// Revision, `main` by default.
        revision: String,
    },
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSource::Local(p) => write!(f, "{}", p.display()),
            ModelSource::Hub { repo, revision } if revision == "main" => write!(f, "{repo}"),
            ModelSource::Hub { repo, revision } => write!(f, "{repo}@{revision}"),
        }
    }
}

impl ModelSource {
    /// Parses a source: an alias, an existing directory, or `org/name[@revision]`.
    pub fn parse(spec: &str) -> Result<Self> {
        let spec = spec.trim();
        if spec.is_empty() {
            return Err(Error::invalid("model", "empty model source"));
        }
        let spec = ALIASES
            .iter()
            .find(|(alias, _)| *alias == spec)
            .map(|(_, id)| *id)
            .unwrap_or(spec);
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(ModelSource::Local(path.to_path_buf()));
        }
        let (repo, revision) = match spec.split_once('@') {
            Some((r, rev)) if !rev.is_empty() => (r, rev),
            Some(_) => {
                return Err(Error::invalid(
                    "model",
                    format!("`{spec}` has an empty revision after `@`"),
                ))
            }
            None => (spec, "main"),
        };
        let valid_part = |p: &str| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        match repo.split_once('/') {
            Some((org, name)) if valid_part(org) && valid_part(name) => Ok(ModelSource::Hub {
                repo: repo.to_string(),
                revision: revision.to_string(),
            }),
            _ => Err(Error::invalid(
                "model",
                format!(
                    "`{spec}` is neither a directory nor a hub id `org/name[@revision]` (aliases: {})",
                    ALIASES.iter().map(|(a, _)| *a).collect::<Vec<_>>().join(", ")
                ),
            )),
        }
    }

    /// Path of `file` (relative, e.g. `unet/config.json`), downloading it into the HF cache
    /// if needed and allowed. A missing file is [`Error::MissingFile`] naming file and source.
    pub fn file(&self, file: &str) -> Result<PathBuf> {
        self.optional_file(file)?.ok_or_else(|| Error::MissingFile {
            source_name: self.to_string(),
            file: file.to_string(),
        })
    }

    /// Like [`ModelSource::file`], but `Ok(None)` when the source has no such file.
    pub fn optional_file(&self, file: &str) -> Result<Option<PathBuf>> {
        match self {
            ModelSource::Local(dir) => {
                let p = dir.join(file);
                Ok(p.is_file().then_some(p))
            }
            ModelSource::Hub { repo, revision } => {
                hub_file(repo, revision, file).map_err(|reason| Error::Source {
                    source_name: self.to_string(),
                    reason,
                })
            }
        }
    }

    /// The first of `candidates` the source has (e.g. a weights file and its fp16 variant).
    pub fn first_of(&self, candidates: &[&str]) -> Result<PathBuf> {
        for c in candidates {
            if let Some(p) = self.optional_file(c)? {
                return Ok(p);
            }
        }
        Err(Error::MissingFile {
            source_name: self.to_string(),
            file: candidates.join(" or "),
        })
    }
}

/// The HF hub cache directory, honouring `HF_HUB_CACHE` and `HF_HOME` like huggingface_hub.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(p).join("hub");
    }
    let cache_home = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/"))
                .join(".cache")
        });
    cache_home.join("huggingface").join("hub")
}

/// Whether `HF_HUB_OFFLINE` asks for cache-only resolution.
pub fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

fn is_commit_hash(rev: &str) -> bool {
    rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit())
}

/// Finds `file` in the cache, else downloads it unless offline. `Ok(None)` = the repo has no
/// such file (cache: not present offline; hub: 404).
fn hub_file(
    repo: &str,
    revision: &str,
    file: &str,
) -> std::result::Result<Option<PathBuf>, String> {
    let cache_dir = hub_cache_dir();
    let hub_repo = hf_hub::Repo::with_revision(
        repo.to_string(),
        hf_hub::RepoType::Model,
        revision.to_string(),
    );
    let cache = hf_hub::Cache::new(cache_dir.clone());
    if let Some(p) = cache.repo(hub_repo.clone()).get(file) {
        return Ok(Some(p));
    }
    if is_commit_hash(revision) {
        let p = cache_dir
            .join(format!("models--{}", repo.replace('/', "--")))
            .join("snapshots")
            .join(revision)
            .join(file);
        if p.is_file() {
            return Ok(Some(p));
        }
    }
    if hub_offline() {
        let repo_dir = cache_dir.join(format!("models--{}", repo.replace('/', "--")));
        let snapshot = if is_commit_hash(revision) {
            Some(revision.to_string())
        } else {
            std::fs::read_to_string(repo_dir.join("refs").join(revision)).ok()
        };
        return match snapshot {
            Some(commit) if repo_dir.join("snapshots").join(commit.trim()).is_dir() => Ok(None),
            _ => Err(format!(
                "revision `{revision}` is not in the HF cache at {} and HF_HUB_OFFLINE is set, so nothing is downloaded",
                cache_dir.display()
            )),
        };
    }
    let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(cache).with_progress(false);
    if let Ok(token) = std::env::var("HF_TOKEN") {
        builder = builder.with_token(Some(token));
    }
    let api = builder.build().map_err(|e| e.to_string())?;
    match api.repo(hub_repo).get(file) {
        Ok(p) => Ok(Some(p)),
        Err(e) => {
            let msg = e.to_string();
            if msg.contains("404") {
                Ok(None)
            } else {
                Err(format!("downloading `{file}` failed: {msg}"))
            }
        }
    }
}
