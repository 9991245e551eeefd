//! LoRA adapters over gRPC: `--lora-dir`, `ListLoras`, `GenerateRequest.loras` giving the
//! same pixels as `generate --lora`, a cached variant costing no reload, and refusals naming
//! the field (unknown name NOT_FOUND, paths, weights and ill-fitting adapters
//! INVALID_ARGUMENT).

use jhakaas_proto::v1 as pb;
use jhakaas_tests::server::{fixture_model, TestServer};
use jhakaas_tests::{fixtures, run_worker, scratch_dir};
use pb::job_event::Event;
use tokio_stream::StreamExt;
use tonic::Code;

fn lora_fixture(name: &str) -> std::path::PathBuf {
    fixtures()
        .join("reference/lora-sd1-tiny")
        .join(format!("{name}.safetensors"))
}

fn request(loras: &[(&str, f32)]) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: "a lighthouse".into(),
        steps: 3,
        seed: Some(42),
        loras: loras
            .iter()
            .map(|(name, weight)| pb::LoraAdapter {
                name: name.to_string(),
                weight: *weight,
            })
            .collect(),
        ..Default::default()
    }
}

/// Runs a Generate call; returns its events' kinds and the first image.
async fn generate(
    client: &mut pb::worker_client::WorkerClient<tonic::transport::Channel>,
    req: pb::GenerateRequest,
) -> (Vec<&'static str>, image::RgbImage) {
    let mut stream = client.generate(req).await.unwrap().into_inner();
    let mut kinds = Vec::new();
    let mut image = None;
    while let Some(e) = stream.next().await {
        match e.unwrap().event.unwrap() {
            Event::ModelLoading(_) => kinds.push("loading"),
            Event::Completed(c) => {
                kinds.push("completed");
                image = Some(
                    image::load_from_memory(&c.images[0].data)
                        .unwrap()
                        .to_rgb8(),
                );
            }
            Event::Failed(f) => panic!("failed: {}", f.reason),
            _ => {}
        }
    }
    (kinds, image.expect("an image"))
}

#[tokio::test(flavor = "multi_thread")]
async fn adapters_by_name_match_the_cli_and_are_cached() {
    let dir = scratch_dir("server-loras");
    for name in ["peft", "kohya"] {
        std::fs::copy(lora_fixture(name), dir.join(format!("{name}.safetensors"))).unwrap();
    }
    let model = fixture_model("tiny", "sd1-tiny");
    let server = TestServer::start(&["--model", &model, "--lora-dir", dir.to_str().unwrap()]);
    server.wait_ready().await;
    let mut client = server.client().await;

    let listed = client
        .list_loras(pb::ListLorasRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = listed.loras.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["kohya", "peft"]);
    assert!(listed.loras.iter().all(|l| l.bytes > 0));

    // Two adapters at chosen weights: the same pixels as the CLI with the same files.
    let set = [("kohya", 0.8), ("peft", 0.6)];
    let (kinds, ours) = generate(&mut client, request(&set)).await;
    assert!(kinds.contains(&"loading"), "{kinds:?}");
    let out = scratch_dir("server-loras-cli").join("cli.png");
    let o = run_worker([
        "generate",
        "--model",
        fixtures().join("models/sd1-tiny").to_str().unwrap(),
        "--prompt",
        "a lighthouse",
        "--steps",
        "3",
        "--seed",
        "42",
        "--device",
        "cpu",
        "--lora",
        &format!("{}:0.8", lora_fixture("kohya").display()),
        "--lora",
        &format!("{}:0.6", lora_fixture("peft").display()),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(ours, image::open(&out).unwrap().to_rgb8());

    // The same set again is served from the cache: no model loading.
    let (kinds, again) = generate(&mut client, request(&set)).await;
    assert!(!kinds.contains(&"loading"), "{kinds:?}");
    assert_eq!(again, ours);
    // The base model is another entry, and differs.
    let (_, base) = generate(&mut client, request(&[])).await;
    assert_ne!(base, ours);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_adapters_are_refused_naming_the_field() {
    let dir = scratch_dir("server-loras-bad");
    std::fs::copy(lora_fixture("peft"), dir.join("peft.safetensors")).unwrap();
    // An adapter for another family: keys that place nowhere on this model.
    std::fs::copy(
        fixtures().join("models/sd1-tiny/vae/diffusion_pytorch_model.safetensors"),
        dir.join("not-a-lora.safetensors"),
    )
    .unwrap();
    let model = fixture_model("tiny", "sd1-tiny");
    let server = TestServer::start(&["--model", &model, "--lora-dir", dir.to_str().unwrap()]);
    server.wait_ready().await;
    let mut client = server.client().await;
    for (loras, code, needle) in [
        (vec![("missing", 1.0)], Code::NotFound, "loras[0].name"),
        (
            vec![("../peft", 1.0)],
            Code::InvalidArgument,
            "loras[0].name",
        ),
        (
            vec![("peft", f32::NAN)],
            Code::InvalidArgument,
            "loras[0].weight",
        ),
        (vec![("not-a-lora", 1.0)], Code::InvalidArgument, "loras"),
        (vec![("peft", 1.0); 9], Code::InvalidArgument, "at most 8"),
    ] {
        let err = client.submit_job(request(&loras)).await.unwrap_err();
        assert_eq!(err.code(), code, "{loras:?}: {err:?}");
        assert!(
            err.message().contains(needle),
            "{loras:?}: {}",
            err.message()
        );
        assert!(
            !err.message().contains(dir.to_str().unwrap()),
            "leaks the path"
        );
    }
    assert_eq!(server.health("jhakaas.worker.v1.Worker").await.unwrap(), 1);
}
