//! `jhakaas-worker fetch` against a local stand-in for the Hugging Face hub (loopback only):
//! it lists the repository, downloads exactly the files a pipeline needs into the HF cache
//! layout, verifies them, and `fetch --check` then passes offline.

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use jhakaas_tests::{fixtures, scratch_dir, worker_binary, FAKE_COMMIT};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
struct Hub {
    files: Arc<BTreeMap<String, Vec<u8>>>,
    requested: Arc<Mutex<Vec<String>>>,
}

fn collect(dir: &std::path::Path, prefix: &str, out: &mut BTreeMap<String, Vec<u8>>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = format!("{prefix}{}", e.file_name().to_string_lossy());
        if e.path().is_dir() {
            collect(&e.path(), &format!("{name}/"), out);
        } else {
            out.insert(name, std::fs::read(e.path()).unwrap());
        }
    }
}

async fn listing(State(hub): State<Hub>) -> impl IntoResponse {
    let siblings: Vec<_> = hub
        .files
        .iter()
        .map(|(name, data)| serde_json::json!({"rfilename": name, "size": data.len()}))
        .collect();
    let body = serde_json::json!({"sha": FAKE_COMMIT, "siblings": siblings}).to_string();
    ([("content-type", "application/json")], body)
}

async fn resolve(
    State(hub): State<Hub>,
    UrlPath(path): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let Some(data) = hub.files.get(&path) else {
        return (StatusCode::NOT_FOUND, "no such file").into_response();
    };
    let total = data.len();
    let (start, end) = headers
        .get("range")
        .and_then(|r| r.to_str().ok())
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .map(|(a, b)| {
            (
                a.parse().unwrap_or(0),
                b.parse().unwrap_or(total - 1).min(total - 1),
            )
        })
        .unwrap_or((0, total - 1));
    if start == 0 && end > 0 {
        hub.requested.lock().unwrap().push(path.clone());
    }
    let mut h = HeaderMap::new();
    h.insert(
        "etag",
        format!("\"etag-{}\"", path.replace('/', "-"))
            .parse()
            .unwrap(),
    );
    h.insert("x-repo-commit", FAKE_COMMIT.parse().unwrap());
    h.insert(
        "content-range",
        format!("bytes {start}-{end}/{total}").parse().unwrap(),
    );
    (StatusCode::PARTIAL_CONTENT, h, data[start..=end].to_vec()).into_response()
}

/// Starts the stand-in hub serving the sd1-tiny fixture (plus files a pipeline never needs)
/// as `jhakaas/mock`; returns its state and endpoint.
async fn start_hub() -> (Hub, String) {
    let mut files = BTreeMap::new();
    collect(&fixtures().join("models/sd1-tiny"), "", &mut files);
    // Things a real repository also holds that a pipeline does not need.
    files.insert("README.md".into(), b"# model card".to_vec());
    files.insert("v1-5-pruned.ckpt".into(), vec![0u8; 4096]);
    files.insert("unet/diffusion_pytorch_model.bin".into(), vec![0u8; 4096]);
    serve_repo("jhakaas/mock", files).await
}

/// Serves `files` as hub repository `repo` on a loopback port.
async fn serve_repo(repo: &str, files: BTreeMap<String, Vec<u8>>) -> (Hub, String) {
    let hub = Hub {
        files: Arc::new(files),
        requested: Arc::default(),
    };
    let app = axum::Router::new()
        .route(&format!("/api/models/{repo}/revision/main"), get(listing))
        .route(&format!("/{repo}/resolve/main/{{*path}}"), get(resolve))
        .with_state(hub.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (hub, endpoint)
}

#[tokio::test(flavor = "multi_thread")]
async fn fetch_downloads_exactly_what_the_pipeline_needs_and_check_then_passes() {
    let (hub, endpoint) = start_hub().await;

    let cache = scratch_dir("fetch-download");
    let out = tokio::task::spawn_blocking({
        let (cache, endpoint) = (cache.clone(), endpoint.clone());
        move || {
            std::process::Command::new(worker_binary())
                .args(["fetch", "--no-progress", "jhakaas/mock"])
                .env("HF_HUB_CACHE", &cache)
                .env("HF_ENDPOINT", &endpoint)
                .env_remove("HF_HUB_OFFLINE")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("fetched jhakaas/mock"), "{stdout}");

    let mut requested = hub.requested.lock().unwrap().clone();
    requested.sort();
    assert!(
        !requested
            .iter()
            .any(|f| f.ends_with(".ckpt") || f.ends_with(".bin") || f == "README.md"),
        "{requested:?}"
    );
    for needed in [
        "model_index.json",
        "text_encoder/model.safetensors",
        "tokenizer/merges.txt",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ] {
        assert!(
            requested.iter().any(|f| f == needed),
            "{needed} not fetched: {requested:?}"
        );
    }

    let check = std::process::Command::new(worker_binary())
        .args(["fetch", "--check", "jhakaas/mock"])
        .env("HF_HUB_CACHE", &cache)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    // And the model runs from that cache, offline.
    let img = cache.join("x.png");
    let run = std::process::Command::new(worker_binary())
        .args([
            "generate",
            "--model",
            "jhakaas/mock",
            "--prompt",
            "fetched",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--output",
        ])
        .arg(&img)
        .env("HF_HUB_CACHE", &cache)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

/// README's main job: `generate --model <hub id>` with nothing cached downloads what it needs
/// on the way (optional files the repository lacks are skipped, not fatal).
#[tokio::test(flavor = "multi_thread")]
async fn generate_on_an_uncached_hub_id_downloads_lazily() {
    let (hub, endpoint) = start_hub().await;
    let cache = scratch_dir("generate-download");
    let img = cache.join("lazy.png");
    let out = tokio::task::spawn_blocking({
        let (cache, img) = (cache.clone(), img.clone());
        move || {
            std::process::Command::new(worker_binary())
                .args([
                    "generate",
                    "--model",
                    "jhakaas/mock",
                    "--prompt",
                    "downloaded",
                    "--steps",
                    "2",
                    "--device",
                    "cpu",
                    "--output",
                ])
                .arg(&img)
                .env("HF_HUB_CACHE", &cache)
                .env("HF_ENDPOINT", &endpoint)
                .env_remove("HF_HUB_OFFLINE")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(img.is_file());
    let requested = hub.requested.lock().unwrap().clone();
    assert!(
        requested
            .iter()
            .any(|f| f == "unet/diffusion_pytorch_model.safetensors"),
        "{requested:?}"
    );
    assert!(
        !requested.iter().any(|f| f.ends_with(".ckpt")),
        "{requested:?}"
    );
}

/// `fetch sdxl-turbo` resolves the alias, takes both text encoders and both tokenizers in the
/// fp16 variant where the repository has one, and the model then runs offline with the turbo
/// defaults (one step, no guidance).
#[tokio::test(flavor = "multi_thread")]
async fn fetch_an_sdxl_alias_takes_both_encoders_in_fp16_and_runs_with_turbo_defaults() {
    let mut files = BTreeMap::new();
    collect(&fixtures().join("models/sdxl-turbo-tiny"), "", &mut files);
    // Like the real repository: fp16 variants next to the full-precision weights.
    let weights: Vec<String> = files
        .keys()
        .filter(|k| k.ends_with(".safetensors"))
        .cloned()
        .collect();
    for w in weights {
        let data = files[&w].clone();
        files.insert(w.replace(".safetensors", ".fp16.safetensors"), data);
    }
    files.insert("sd_xl_turbo_1.0.safetensors".into(), vec![0u8; 4096]);
    let (hub, endpoint) = serve_repo("stabilityai/sdxl-turbo", files).await;
    let cache = scratch_dir("fetch-sdxl-turbo");
    let run = |args: Vec<String>, offline: bool| {
        let (cache, endpoint) = (cache.clone(), endpoint.clone());
        tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new(worker_binary());
            cmd.args(args).env("HF_HUB_CACHE", &cache);
            if offline {
                cmd.env("HF_HUB_OFFLINE", "1");
            } else {
                cmd.env("HF_ENDPOINT", &endpoint)
                    .env_remove("HF_HUB_OFFLINE");
            }
            cmd.output().unwrap()
        })
    };
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let out = run(args(&["fetch", "--no-progress", "sdxl-turbo"]), false)
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let requested = hub.requested.lock().unwrap().clone();
    for needed in [
        "text_encoder/model.fp16.safetensors",
        "text_encoder_2/model.fp16.safetensors",
        "text_encoder_2/config.json",
        "tokenizer_2/vocab.json",
        "tokenizer_2/merges.txt",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ] {
        assert!(
            requested.iter().any(|f| f == needed),
            "{needed} not fetched: {requested:?}"
        );
    }
    assert!(
        !requested
            .iter()
            .any(|f| f.starts_with("sd_xl") || f == "unet/diffusion_pytorch_model.safetensors"),
        "{requested:?}"
    );
    let png = cache.join("turbo.png");
    let mut generate = args(&["generate", "--model", "sdxl-turbo", "--prompt", "a cat"]);
    generate.extend(args(&[
        "--device",
        "cpu",
        "--output",
        png.to_str().unwrap(),
    ]));
    let out = run(generate, true).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // The turbo defaults: one step of the checkpoint's Euler ancestral, no guidance, 64 px
    // (sample_size 8 x 8).
    assert!(stderr.contains("(1 steps, euler-a)"), "{stderr}");
    let text = String::from_utf8_lossy(&std::fs::read(&png).unwrap()).into_owned();
    assert!(
        text.contains("CFG scale: 0,") && text.contains("Size: 64x64"),
        "{text:.300}"
    );
}
