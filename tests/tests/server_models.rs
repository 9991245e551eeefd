//! Serving several model families at once: SDXL next to SD 1.x with the same images as the
//! CLI, size conditioning only where it means something, defaults known before the first load
//! (turbo checkpoints included), VAE overrides, and a memory budget that evicts by bytes.

use jhakaas_proto::v1 as pb;
use jhakaas_tests::server::{fixture_model, TestServer};
use jhakaas_tests::{fixtures, lay_out_hf_cache, run_worker, scratch_dir};
use pb::job_event::Event;
use tokio_stream::StreamExt;
use tonic::Code;

type Client = pb::worker_client::WorkerClient<tonic::transport::Channel>;

fn request(model: &str, prompt: &str, steps: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model: model.into(),
        prompt: prompt.into(),
        steps,
        seed: Some(7),
        ..Default::default()
    }
}

/// Runs a Generate call to its end: the completed images, or the failure/status text.
async fn generate(client: &mut Client, req: pb::GenerateRequest) -> Result<pb::Completed, String> {
    let mut stream = client
        .generate(req)
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    let mut last = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(e) => last = e.event,
            Err(s) => return Err(format!("{:?}: {}", s.code(), s.message())),
        }
    }
    match last {
        Some(Event::Completed(c)) => Ok(c),
        Some(Event::Failed(f)) => Err(f.reason),
        other => Err(format!("ended with {other:?}")),
    }
}

async fn models(client: &mut Client) -> Vec<pb::ModelInfo> {
    client
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models
}

fn info<'a>(list: &'a [pb::ModelInfo], name: &str) -> &'a pb::ModelInfo {
    list.iter().find(|m| m.name == name).expect("model listed")
}

fn decode(c: &pb::Completed) -> image::RgbImage {
    image::load_from_memory(&c.images[0].data)
        .unwrap()
        .to_rgb8()
}

#[tokio::test(flavor = "multi_thread")]
async fn sdxl_is_served_next_to_sd_with_the_same_pixels_as_the_cli() {
    let sd = fixture_model("sd", "sd1-tiny");
    let xl = fixture_model("xl", "sdxl-tiny");
    let server = TestServer::start(&["--model", &sd, "--model", &xl]);
    server.wait_ready().await;
    let mut client = server.client().await;

    // Families and defaults are known from the configs before the SDXL model is loaded.
    let list = models(&mut client).await;
    let x = info(&list, "xl");
    assert_eq!((x.family.as_str(), x.loaded), ("sdxl", false));
    assert_eq!((x.default_width, x.default_steps), (64, 50));
    assert_eq!(x.default_guidance_scale, 5.0);
    assert_eq!(x.default_scheduler, "euler");
    assert_eq!(info(&list, "sd").default_guidance_scale, 7.5);
    // SD 1.x's own scheduler is PNDM; the generator defaults to chacha.
    assert_eq!(info(&list, "sd").default_scheduler, "pndm");
    assert_eq!(x.default_rng, "chacha");

    let mut req = request("xl", "a lighthouse at dusk", 3);
    req.scheduler = "euler-a".into();
    req.negative_prompt = "blurry".into();
    req.width = 96;
    req.size_conditioning = Some(pb::SizeConditioning {
        original_width: 256,
        original_height: 192,
        crop_top: 8,
        crop_left: 16,
        ..Default::default()
    });
    let done = generate(&mut client, req)
        .await
        .expect("SDXL job completes");
    let grpc = decode(&done);
    assert_eq!(grpc.dimensions(), (96, 64));

    let out = scratch_dir("xl-grpc-vs-cli").join("cli.png");
    let model = fixtures().join("models/sdxl-tiny");
    let o = run_worker([
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a lighthouse at dusk",
        "--negative-prompt",
        "blurry",
        "--steps",
        "3",
        "--scheduler",
        "euler-a",
        "--width",
        "96",
        "--original-size",
        "256x192",
        "--crop-top-left",
        "8,16",
        "--seed",
        "7",
        "--device",
        "cpu",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(grpc, image::open(&out).unwrap().to_rgb8());

    // The SD model still answers, and both are loaded side by side.
    generate(&mut client, request("sd", "a red cube", 2))
        .await
        .expect("SD job completes");
    let list = models(&mut client).await;
    assert!(info(&list, "xl").loaded && info(&list, "sd").loaded);
    assert!(info(&list, "xl").loaded_bytes > 0);

    // Size conditioning means nothing to SD 1.x: refused at submit time, naming the field.
    let mut bad = request("sd", "a red cube", 2);
    bad.size_conditioning = Some(pb::SizeConditioning {
        target_width: 512,
        target_height: 512,
        ..Default::default()
    });
    let err = client.submit_job(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("size_conditioning"),
        "{}",
        err.message()
    );
    let mut half = request("xl", "a red cube", 2);
    half.size_conditioning = Some(pb::SizeConditioning {
        original_width: 512,
        ..Default::default()
    });
    let err = client.submit_job(half).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("original_width"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn turbo_checkpoints_default_to_one_step_without_guidance() {
    let hub = scratch_dir("turbo-hub");
    lay_out_hf_cache(&hub, "stabilityai/sd-turbo", "sd-turbo-tiny");
    let server = TestServer::start_with_env(
        &["--model", "turbo=sd-turbo"],
        &[("HF_HUB_CACHE", hub.as_path())],
    );
    server.wait_ready().await;
    let mut client = server.client().await;
    let list = models(&mut client).await;
    let t = info(&list, "turbo");
    assert_eq!(t.source, "stabilityai/sd-turbo");
    assert_eq!((t.default_steps, t.default_guidance_scale), (1, 0.0));
    assert_eq!(t.default_scheduler, "euler");

    // steps and guidance left unset: one step, no unconditional pass.
    let mut stream = client
        .generate(request("turbo", "a lighthouse", 0))
        .await
        .unwrap()
        .into_inner();
    let mut steps = Vec::new();
    while let Some(e) = stream.next().await {
        if let Some(Event::Progress(p)) = e.unwrap().event {
            steps.push((p.step, p.total_steps));
        }
    }
    assert_eq!(steps, vec![(1, 1)]);
    // Guidance 1 turns CFG off on any model (0 is "the model's default").
    let mut one = request("turbo", "a lighthouse", 2);
    one.guidance_scale = 1.0;
    generate(&mut client, one).await.expect("guidance 1 runs");
}

#[tokio::test(flavor = "multi_thread")]
async fn operators_can_give_a_plain_folder_turbo_defaults() {
    // A turbo checkpoint copied to a plain folder is not known to be turbo; the operator says so.
    let turbo = fixture_model("turbo", "sd-turbo-tiny");
    let server = TestServer::start(&[
        "--model",
        &turbo,
        "--model-defaults",
        "turbo=steps=1,guidance=0,scheduler=euler-a,size=64x96",
    ]);
    server.wait_ready().await;
    let mut client = server.client().await;
    let t = models(&mut client).await.remove(0);
    assert_eq!((t.default_steps, t.default_guidance_scale), (1, 0.0));
    assert_eq!((t.default_width, t.default_height), (64, 96));
    assert_eq!(t.default_scheduler, "euler-a");
    let done = generate(&mut client, request("turbo", "a lighthouse", 0))
        .await
        .unwrap();
    assert_eq!(decode(&done).dimensions(), (64, 96));

    // A bad override stops start-up with the flag named.
    let out = run_worker([
        "serve",
        "--model",
        turbo.as_str(),
        "--model-defaults",
        "turbo=steps=0",
        "--device",
        "cpu",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--model-defaults") && err.contains("steps"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vae_override_is_used_and_listed() {
    // The checkpoint's own VAE given as a standalone AutoencoderKL folder must give identical
    // pixels; ListModels names the override.
    let xl = fixture_model("xl", "sdxl-tiny");
    let vae = fixtures().join("models/sdxl-tiny/vae");
    let over = format!("xl={}", vae.display());
    let server = TestServer::start(&["--model", &xl, "--model-vae", &over]);
    server.wait_ready().await;
    let mut client = server.client().await;
    assert_eq!(
        info(&models(&mut client).await, "xl").vae,
        vae.display().to_string()
    );
    let with_override = decode(
        &generate(&mut client, request("xl", "a cat", 2))
            .await
            .unwrap(),
    );

    let plain = TestServer::start(&["--model", &xl]);
    plain.wait_ready().await;
    let mut c2 = plain.client().await;
    let without = decode(&generate(&mut c2, request("xl", "a cat", 2)).await.unwrap());
    assert_eq!(with_override, without);

    // A VAE from another checkpoint changes the image.
    let other = format!("xl={}", fixtures().join("models/sdxl-turbo-tiny").display());
    let swapped = TestServer::start(&["--model", &xl, "--model-vae", &other]);
    swapped.wait_ready().await;
    let mut c3 = swapped.client().await;
    let different = decode(&generate(&mut c3, request("xl", "a cat", 2)).await.unwrap());
    assert_ne!(different, without);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_memory_budget_evicts_by_bytes_and_refuses_a_model_larger_than_it() {
    let sd = fixture_model("sd", "sd1-tiny");
    let xl = fixture_model("xl", "sdxl-tiny");
    // Both fit the count limit (2) but not the 8 MiB budget together (as loaded by default:
    // their UNet/VAE matrices held in f16, their token tables left in the file, about 4.2 and
    // 6.0 MiB).
    let server = TestServer::start(&["--model", &sd, "--model", &xl, "--memory-budget", "8MiB"]);
    server.wait_ready().await;
    let mut client = server.client().await;
    let sd_bytes = info(&models(&mut client).await, "sd").loaded_bytes;
    generate(&mut client, request("xl", "a cat", 2))
        .await
        .unwrap();
    let list = models(&mut client).await;
    let xl_bytes = info(&list, "xl").loaded_bytes;
    assert!(
        sd_bytes > 0 && xl_bytes > 0 && sd_bytes + xl_bytes > 8 << 20,
        "precondition: {sd_bytes} + {xl_bytes} must exceed the budget"
    );
    assert!(sd_bytes <= 8 << 20 && xl_bytes <= 8 << 20);
    assert!(info(&list, "xl").loaded);
    let evicted = info(&list, "sd");
    assert!(!evicted.loaded && evicted.loaded_bytes == 0, "{evicted:?}");
    assert!(server.logs().contains("evicting least recently used model"));

    // A budget smaller than a model: its jobs fail with a message naming the budget, and
    // the server does not report ready for a default model it cannot hold.
    let tight = TestServer::start(&["--model", &sd, "--model", &xl, "--memory-budget", "1MiB"]);
    let mut c = tight.client().await;
    let reason = generate(&mut c, request("xl", "a cat", 2))
        .await
        .unwrap_err();
    assert!(
        reason.contains("memory budget") && reason.contains("1.0 MiB"),
        "{reason}"
    );
    assert_ne!(tight.health("jhakaas.worker.v1.Worker").await.ok(), Some(1));
}

/// A model's default generator (`--model-defaults NAME=rng=torch-cpu`) applies to requests that
/// name none: the served image is the CLI's `--rng torch-cpu` image for the same seed, every
/// image of the request reports the request's seed, and ListModels lists the names a request
/// may use.
#[tokio::test(flavor = "multi_thread")]
async fn a_model_default_generator_applies_to_requests_that_name_none() {
    let sd = fixture_model("sd", "sd1-tiny");
    let server = TestServer::start(&["--model", &sd, "--model-defaults", "sd=rng=torch-cpu"]);
    server.wait_ready().await;
    let mut client = server.client().await;
    let listed = client
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info(&listed.models, "sd").default_rng, "torch-cpu");
    assert!(
        listed.rngs.iter().any(|r| r == "chacha") && listed.rngs.iter().any(|r| r == "torch-cpu")
    );
    assert!(
        listed.schedulers.iter().any(|s| s == "pndm"),
        "{:?}",
        listed.schedulers
    );

    let mut req = request("sd", "a red cube", 3);
    req.seed = Some(1234);
    req.num_images = 2;
    let done = generate(&mut client, req).await.expect("job completes");
    assert_eq!(
        done.images.iter().map(|i| i.seed).collect::<Vec<_>>(),
        vec![1234, 1234]
    );
    let out = scratch_dir("rng-default").join("cli.png");
    let model = fixtures().join("models/sd1-tiny");
    let o = run_worker([
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a red cube",
        "--steps",
        "3",
        "--num-images",
        "2",
        "--rng",
        "torch-cpu",
        "--seed",
        "1234",
        "--device",
        "cpu",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (i, image) in done.images.iter().enumerate() {
        let cli = image::open(out.with_file_name(format!("cli-{i}.png")))
            .unwrap()
            .to_rgb8();
        let served = image::load_from_memory(&image.data).unwrap().to_rgb8();
        assert_eq!(served, cli, "image {i}");
    }

    // An explicit generator overrides the model's default; an unknown one is named.
    let mut req = request("sd", "a red cube", 2);
    req.rng = "mt19937".into();
    let err = client.submit_job(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("rng") && err.message().contains("torch-cpu"),
        "{}",
        err.message()
    );
}
