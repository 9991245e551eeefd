//! `jhakaas-worker fetch MODEL…`: download exactly the files each model needs into the HF
//! cache (resumable, verified); `--check` verifies offline that the cache is complete; `--list`
//! names the files a model needs (what an image build bakes).

use anyhow::{bail, Result};
use clap::Args;
use jhakaas_model_manager::fetch::{self, Variant};
use jhakaas_model_manager::ModelSource;

/// Arguments of `fetch`.
#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Models: hub ids `org/name[@revision]`, aliases or folders.
    #[arg(required = true)]
    models: Vec<String>,
    /// Only verify, offline, that every needed file is present and intact.
    #[arg(long, conflicts_with = "list")]
    check: bool,
    /// Only print the files `fetch` takes for one model, one per line: the path relative to
    /// the repository or folder, a tab, and where the file is on disk (empty while a hub
    /// file is not cached). Downloads nothing; lists a hub repository online.
    #[arg(long)]
    list: bool,
    /// Weights to download where a repository has both: fp16 (half the bytes) or fp32.
    #[arg(long, env = "JHAKAAS_FETCH_VARIANT", default_value = "fp16")]
    variant: String,
    /// No progress bars (e.g. in image builds).
    #[arg(long)]
    no_progress: bool,
}

/// Runs `fetch`; fails naming every incomplete model and what it lacks.
pub fn run(args: FetchArgs) -> Result<()> {
    let variant: Variant = args.variant.parse()?;
    if args.list {
        let [spec] = args.models.as_slice() else {
            bail!("--list takes one model, not {}", args.models.len());
        };
        let source = ModelSource::parse(spec)?;
        for file in fetch::files(&source, variant)? {
            let path = source.cached_file(&file)?;
            let path = path.as_deref().map(|p| p.display().to_string());
            println!("{file}\t{}", path.unwrap_or_default());
        }
        return Ok(());
    }
    let mut failures = Vec::new();
    for spec in &args.models {
        let source = ModelSource::parse(spec)?;
        if args.check {
            let report = fetch::check(&source)?;
            if report.is_complete() {
                println!(
                    "ok {source}: {} files present and intact",
                    report.present.len()
                );
            } else {
                println!("incomplete {source}: {}", report.problems());
                failures.push(format!("{source} ({})", report.problems()));
            }
            continue;
        }
        match fetch::fetch(&source, variant, !args.no_progress) {
            Ok(paths) => {
                let bytes: u64 = paths
                    .iter()
                    .filter_map(|p| std::fs::metadata(p).ok())
                    .map(|m| m.len())
                    .sum();
                println!(
                    "fetched {source}: {} files, {:.1} MB",
                    paths.len(),
                    bytes as f64 / 1e6
                );
            }
            Err(e) => {
                println!("failed {source}: {e}");
                failures.push(e.to_string());
            }
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} models not ready: {}",
            failures.len(),
            args.models.len(),
            failures.join("; ")
        );
    }
    Ok(())
}
