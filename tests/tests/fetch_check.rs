//! `jhakaas-worker fetch --check` verifies offline that a cache holds every file a model needs,
//! intact; the server runs the same check before it starts serving.

use jhakaas_tests::{lay_out_hf_cache, scratch_dir, worker_binary, FAKE_COMMIT};
use std::path::Path;
use std::process::{Command, Output};

fn fetch_check(hub: &Path, models: &[&str]) -> Output {
    Command::new(worker_binary())
        .arg("fetch")
        .arg("--check")
        .args(models)
        .env("HF_HUB_CACHE", hub)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

fn snapshot(hub: &Path, repo: &str) -> std::path::PathBuf {
    hub.join(format!("models--{}", repo.replace('/', "--")))
        .join("snapshots")
        .join(FAKE_COMMIT)
}

#[test]
fn a_complete_cache_passes_and_gaps_or_damage_are_named() {
    let hub = scratch_dir("fetch-check");
    lay_out_hf_cache(&hub, "jhakaas/sd1-tiny", "sd1-tiny");
    lay_out_hf_cache(&hub, "jhakaas/sd2-tiny", "sd2-tiny");
    let ok = fetch_check(&hub, &["jhakaas/sd1-tiny", "jhakaas/sd2-tiny"]);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(stdout.matches("ok jhakaas/").count(), 2, "{stdout}");

    // A missing weights file is named, and the exit code says so.
    std::fs::remove_file(
        snapshot(&hub, "jhakaas/sd2-tiny").join("vae/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let out = fetch_check(&hub, &["jhakaas/sd1-tiny", "jhakaas/sd2-tiny"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success());
    assert!(text.contains("ok jhakaas/sd1-tiny"), "{text}");
    assert!(
        text.contains("jhakaas/sd2-tiny") && text.contains("vae/diffusion_pytorch_model"),
        "{text}"
    );

    // A truncated download is caught by its safetensors header.
    let unet = snapshot(&hub, "jhakaas/sd1-tiny").join("unet/diffusion_pytorch_model.safetensors");
    let target = std::fs::read_link(&unet).unwrap();
    let bytes = std::fs::read(&target).unwrap();
    std::fs::write(&target, &bytes[..bytes.len() / 2]).unwrap();
    let out = fetch_check(&hub, &["jhakaas/sd1-tiny"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        text.contains("corrupt unet/diffusion_pytorch_model.safetensors"),
        "{text}"
    );

    // A model the cache has never seen.
    let out = fetch_check(&hub, &["jhakaas/never-fetched"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("missing model_index.json"));
}

#[test]
fn the_server_refuses_to_start_on_an_incomplete_default_model_offline() {
    let hub = scratch_dir("serve-check");
    lay_out_hf_cache(&hub, "jhakaas/sd1-tiny", "sd1-tiny");
    std::fs::remove_file(snapshot(&hub, "jhakaas/sd1-tiny").join("text_encoder/model.safetensors"))
        .unwrap();
    let out = Command::new(worker_binary())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--device",
            "cpu",
        ])
        .args(["--model", "tiny=jhakaas/sd1-tiny"])
        .env("HF_HUB_CACHE", &hub)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("default model `tiny`") && stderr.contains("text_encoder/model"),
        "{stderr}"
    );
}

#[test]
fn sdxl_needs_its_second_encoder_and_a_lone_vae_checks_as_one() {
    let hub = scratch_dir("fetch-check-xl");
    lay_out_hf_cache(&hub, "jhakaas/sdxl-tiny", "sdxl-tiny");
    lay_out_hf_cache(&hub, "jhakaas/sdxl-vae", "sdxl-tiny/vae");
    let ok = fetch_check(&hub, &["jhakaas/sdxl-tiny", "jhakaas/sdxl-vae"]);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{stdout}");
    assert_eq!(stdout.matches("ok jhakaas/").count(), 2, "{stdout}");

    let snap = snapshot(&hub, "jhakaas/sdxl-tiny");
    std::fs::remove_file(snap.join("text_encoder_2/model.safetensors")).unwrap();
    std::fs::remove_file(snap.join("tokenizer_2/merges.txt")).unwrap();
    let out = fetch_check(&hub, &["jhakaas/sdxl-tiny"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.contains("text_encoder_2/model.safetensors"), "{text}");
    assert!(text.contains("tokenizer_2/vocab.json"), "{text}");
}

fn fetch_list(hub: &Path, model: &str) -> Output {
    Command::new(worker_binary())
        .args(["fetch", "--list", model])
        .env("HF_HUB_CACHE", hub)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

#[test]
fn list_names_the_files_an_image_bakes_and_where_they_are() {
    let folder = jhakaas_tests::fixtures().join("models/sd1-tiny");
    let out = fetch_list(&scratch_dir("fetch-list"), folder.to_str().unwrap());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<(&str, &str)> = stdout
        .lines()
        .map(|l| l.split_once('\t').expect("FILE<TAB>PATH"))
        .collect();
    let files: Vec<&str> = lines.iter().map(|(f, _)| *f).collect();
    for f in [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ] {
        assert!(files.contains(&f), "{f} missing from {files:?}");
    }
    // Each file is where the line says, and the whole folder is listed, nothing else.
    for (file, path) in &lines {
        assert_eq!(Path::new(path), folder.join(file), "{file}");
    }
    assert_eq!(lines.len(), count_files(&folder), "{stdout}");

    // A hub repository is planned from the hub's listing, even when cached: offline, the
    // command fails naming why instead of guessing from whatever the cache holds.
    let hub = scratch_dir("fetch-list-hub");
    lay_out_hf_cache(&hub, "jhakaas/sd1-tiny", "sd1-tiny");
    let out = fetch_list(&hub, "jhakaas/sd1-tiny");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HF_HUB_OFFLINE"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Not a pipeline: the folder and what it lacks are named.
    let not_a_model = scratch_dir("fetch-list-empty");
    std::fs::write(not_a_model.join("README.md"), "hello").unwrap();
    let out = fetch_list(&hub, not_a_model.to_str().unwrap());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("model_index.json") && stderr.contains("fetch-list-empty"),
        "{stderr}"
    );
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| if p.is_dir() { count_files(&p) } else { 1 })
        .sum()
}
