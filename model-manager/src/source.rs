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
    ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0"),
    ("sdxl-turbo", "stabilityai/sdxl-turbo"),
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

    /// Path of `file` if it is already on disk (folder or HF cache), never downloading.
    pub fn cached_file(&self, file: &str) -> Result<Option<PathBuf>> {
        match self {
            ModelSource::Local(dir) => {
                let p = dir.join(file);
                Ok(p.is_file().then_some(p))
            }
            ModelSource::Hub { repo, revision } => {
                Ok(cache_lookup(&hub_cache_dir(), repo, revision, file))
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

/// `file` of `repo` at `revision` in the HF cache at `cache_dir`, if present.
fn cache_lookup(cache_dir: &Path, repo: &str, revision: &str, file: &str) -> Option<PathBuf> {
    let hub_repo = hf_hub::Repo::with_revision(
        repo.to_string(),
        hf_hub::RepoType::Model,
        revision.to_string(),
    );
    if let Some(p) = hf_hub::Cache::new(cache_dir.to_path_buf())
        .repo(hub_repo)
        .get(file)
    {
        return Some(p);
    }
    if is_commit_hash(revision) {
        let p = repo_cache_dir(cache_dir, repo)
            .join("snapshots")
            .join(revision)
            .join(file);
        if p.is_file() {
            return Some(p);
        }
    }
    None
}

fn repo_cache_dir(cache_dir: &Path, repo: &str) -> PathBuf {
    cache_dir.join(format!("models--{}", repo.replace('/', "--")))
}

/// A hub client writing into the HF cache; honours `HF_ENDPOINT` and `HF_TOKEN`.
fn hub_api(progress: bool) -> std::result::Result<hf_hub::api::sync::Api, String> {
    let cache = hf_hub::Cache::new(hub_cache_dir());
    let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(cache).with_progress(progress);
    if let Ok(token) = std::env::var("HF_TOKEN") {
        builder = builder.with_token(Some(token));
    }
    if let Some(endpoint) = std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()) {
        builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
    }
    builder.build().map_err(|e| e.to_string())
}

fn hub_repo(repo: &str, revision: &str) -> hf_hub::Repo {
    hf_hub::Repo::with_revision(
        repo.to_string(),
        hf_hub::RepoType::Model,
        revision.to_string(),
    )
}

/// Every file of a hub repository at `revision`, with its size where the hub reports it.
pub fn hub_listing(
    repo: &str,
    revision: &str,
) -> std::result::Result<Vec<(String, Option<u64>)>, String> {
    if hub_offline() {
        return Err("HF_HUB_OFFLINE is set: cannot list the repository on the hub".into());
    }
    let api = hub_api(false)?;
    let body = api
        .repo(hub_repo(repo, revision))
        .info_request()
        .query("blobs", "true")
        .call()
        .map_err(|e| format!("listing the repository failed: {e}"))?
        .into_string()
        .map_err(|e| e.to_string())?;
    let info: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("bad listing: {e}"))?;
    let siblings = info["siblings"]
        .as_array()
        .ok_or("the listing has no files")?;
    Ok(siblings
        .iter()
        .filter_map(|s| {
            let name = s["rfilename"].as_str()?.to_string();
            let size = s["lfs"]["size"].as_u64().or_else(|| s["size"].as_u64());
            Some((name, size))
        })
        .collect())
}

/// Downloads `file` into the HF cache (resuming a partial download), or returns the cached copy.
pub fn hub_download(
    repo: &str,
    revision: &str,
    file: &str,
    progress: bool,
) -> std::result::Result<PathBuf, String> {
    if let Some(p) = cache_lookup(&hub_cache_dir(), repo, revision, file) {
        return Ok(p);
    }
    if hub_offline() {
        return Err(format!("`{file}` is not cached and HF_HUB_OFFLINE is set"));
    }
    hub_api(progress)?
        .repo(hub_repo(repo, revision))
        .download(file)
        .map_err(|e| format!("downloading `{file}` failed: {e}"))
}

/// Finds `file` in the cache, else downloads it unless offline. `Ok(None)` = the repo has no
/// such file (cache: not present offline; hub: 404).
fn hub_file(
    repo: &str,
    revision: &str,
    file: &str,
) -> std::result::Result<Option<PathBuf>, String> {
    let cache_dir = hub_cache_dir();
    if let Some(p) = cache_lookup(&cache_dir, repo, revision, file) {
        return Ok(Some(p));
    }
    if hub_offline() {
        let repo_dir = repo_cache_dir(&cache_dir, repo);
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
    match hub_api(false)?.repo(hub_repo(repo, revision)).get(file) {
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
