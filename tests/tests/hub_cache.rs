//! Hub ids resolve through the Hugging Face cache exactly as huggingface_hub lays it out
//! (`models--org--name/{refs,snapshots,blobs}` with symlinked snapshot files), honouring
//! `HF_HUB_CACHE`, `HF_HOME` and `HF_HUB_OFFLINE=1`. Nothing is downloaded.

use jhakaas_tests::{fixtures, scratch_dir, worker_binary};
use std::path::Path;
use std::process::Command;

use jhakaas_tests::{lay_out_hf_cache, FAKE_COMMIT as COMMIT};

fn lay_out_cache(hub: &Path) {
    lay_out_hf_cache(hub, "jhakaas/sd1-tiny", "sd1-tiny");
}

fn generate(model: &str, env: &[(&str, &Path)], out: &Path) -> std::process::Output {
    let mut cmd = Command::new(worker_binary());
    cmd.args([
        "generate",
        "--model",
        model,
        "--prompt",
        "a tiny test",
        "--steps",
        "2",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--output",
    ])
    .arg(out)
    .env_remove("HF_HOME")
    .env_remove("HF_HUB_CACHE")
    .env("HF_HUB_OFFLINE", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn hub_ids_resolve_offline_through_hf_hub_cache_and_hf_home() {
    let dir = scratch_dir("hub-cache");
    let home = dir.join("hf-home");
    lay_out_cache(&home.join("hub"));

    let a = dir.join("a.png");
    let out = generate("jhakaas/sd1-tiny", &[("HF_HOME", &home)], &a);
    assert!(
        out.status.success(),
        "HF_HOME: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let b = dir.join("b.png");
    let out = generate(
        &format!("jhakaas/sd1-tiny@{COMMIT}"),
        &[("HF_HUB_CACHE", &home.join("hub"))],
        &b,
    );
    assert!(
        out.status.success(),
        "HF_HUB_CACHE + commit: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Same model, same seed: the same pixels, whichever way it was found (the embedded
    // parameters name the source, so the files themselves differ).
    assert_eq!(
        image::open(&a).unwrap().to_rgb8(),
        image::open(&b).unwrap().to_rgb8()
    );

    // The same files as a plain folder give the same pixels too.
    let c = dir.join("c.png");
    let out = generate(
        fixtures().join("models/sd1-tiny").to_str().unwrap(),
        &[],
        &c,
    );
    assert!(out.status.success());
    assert_eq!(
        image::open(&a).unwrap().to_rgb8(),
        image::open(&c).unwrap().to_rgb8()
    );
}

#[test]
fn a_model_missing_from_the_cache_offline_is_a_clear_error() {
    let dir = scratch_dir("hub-miss");
    let out = generate(
        "jhakaas/not-cached",
        &[("HF_HUB_CACHE", &dir)],
        &dir.join("x.png"),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("jhakaas/not-cached") && stderr.contains("HF_HUB_OFFLINE"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_file_missing_from_a_cached_snapshot_names_file_and_source() {
    let dir = scratch_dir("hub-partial");
    lay_out_cache(&dir);
    let snapshot = dir.join("models--jhakaas--sd1-tiny/snapshots").join(COMMIT);
    std::fs::remove_file(snapshot.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let out = generate(
        "jhakaas/sd1-tiny",
        &[("HF_HUB_CACHE", &dir)],
        &dir.join("x.png"),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("vae/diffusion_pytorch_model.safetensors")
            && stderr.contains("jhakaas/sd1-tiny"),
        "{stderr}"
    );
}
