//! Inpainting, outpainting and ControlNets over gRPC: `mask` and `outpaint` beside
//! `init_image`, and `controlnets`, give diffusers' images (the committed cases, from their
//! seeds), registered nets are listed and budgeted, and every bad combination is
//! INVALID_ARGUMENT naming the field before anything is queued.

use jhakaas_proto::v1 as pb;
use jhakaas_tests::cases::{load_inpaint_cases, FixtureCase};
use jhakaas_tests::server::{fixture_model, TestServer};
use jhakaas_tests::{fixtures, image_diff};
use pb::job_event::Event;
use tokio_stream::StreamExt;
use tonic::Code;

fn read(pipeline: &str, file: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("reference").join(pipeline).join(file)).unwrap()
}

/// What every case's request shares: the prompts, steps, guidance, scheduler, batch and the
/// seed with torch's CPU generator (`--rng torch-cpu --seed S`), for model `model`.
fn base_request(case: &FixtureCase, model: &str) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model: model.into(),
        prompt: case.prompt.clone(),
        negative_prompt: case.negative_prompt.clone().unwrap_or_default(),
        steps: case.steps as u32,
        guidance_scale: case.guidance_scale as f32,
        seed: Some(case.seed),
        rng: "torch-cpu".into(),
        scheduler: case.scheduler.clone().unwrap_or_default(),
        num_images: case.num_images as u32,
        ..Default::default()
    }
}

/// The request the CLI makes of `case` (`--rng torch-cpu --seed S`), for model `model`.
fn request_of(case: &FixtureCase, model: &str) -> pb::GenerateRequest {
    let outpaint = case.outpaint.as_ref().map(|s| {
        let v: Vec<u32> = s.split(',').map(|x| x.parse().unwrap()).collect();
        pb::Outpaint {
            left: v[0],
            top: v[1],
            right: v[2],
            bottom: v[3],
        }
    });
    pb::GenerateRequest {
        init_image: read(&case.pipeline, case.init_image.as_ref().unwrap()),
        strength: case.strength.unwrap() as f32,
        mask: case
            .mask
            .as_ref()
            .map(|m| read(&case.pipeline, m))
            .unwrap_or_default(),
        outpaint,
        ..base_request(case, model)
    }
}

async fn completed(
    client: &mut pb::worker_client::WorkerClient<tonic::transport::Channel>,
    req: pb::GenerateRequest,
) -> pb::Completed {
    let mut stream = client.generate(req).await.unwrap().into_inner();
    while let Some(event) = stream.next().await {
        match event.unwrap().event {
            Some(Event::Completed(done)) => return done,
            Some(Event::Failed(f)) => panic!("job failed: {f:?}"),
            _ => {}
        }
    }
    panic!("stream ended without a terminal event")
}

#[tokio::test(flavor = "multi_thread")]
async fn masks_and_outpainting_over_grpc_give_diffusers_images() {
    let plain = fixture_model("sd1", "sd1-tiny");
    let inpainting = fixture_model("sd1-inpaint", "sd1-inpaint-tiny");
    let server = TestServer::start(&["--model", &plain, "--model", &inpainting]);
    server.wait_ready().await;
    let mut client = server.client().await;
    for (pipeline, model, name) in [
        ("sd1-inpaint-tiny", "sd1-inpaint", "strength-075"),
        ("sd1-tiny", "sd1", "inpaint-default"),
        ("sd1-tiny", "sd1", "outpaint"),
    ] {
        let case = load_inpaint_cases(pipeline)
            .into_iter()
            .find(|c| c.name == name)
            .unwrap();
        let done = completed(&mut client, request_of(&case, model)).await;
        let ours = image::load_from_memory(&done.images[0].data)
            .unwrap()
            .to_rgb8();
        let theirs = image::load_from_memory(&read(pipeline, case.image.as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        let (mean, max) = image_diff(&ours, &theirs);
        assert!(
            mean <= 0.5 && max <= 6,
            "{pipeline}/{name}: mean {mean}, max {max}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_masks_and_outpaints_name_the_field() {
    let plain = fixture_model("sd1", "sd1-tiny");
    let inpainting = fixture_model("sd1-inpaint", "sd1-inpaint-tiny");
    let server = TestServer::start(&[
        "--model",
        &plain,
        "--model",
        &inpainting,
        "--max-pixels",
        "16384",
        "--max-init-image-bytes",
        "65536",
    ]);
    server.wait_ready().await;
    let mut client = server.client().await;
    let init = read("sd1-tiny", "../init.png");
    let mask = read("sd1-tiny", "../mask.png");
    let ok = pb::GenerateRequest {
        model: "sd1".into(),
        prompt: "a cat".into(),
        steps: 2,
        init_image: init.clone(),
        mask: mask.clone(),
        ..Default::default()
    };
    let sides = |left, top, right, bottom| {
        Some(pb::Outpaint {
            left,
            top,
            right,
            bottom,
        })
    };
    let cases = [
        (
            "mask",
            pb::GenerateRequest {
                init_image: vec![],
                ..ok.clone()
            },
        ),
        (
            "mask",
            pb::GenerateRequest {
                mask: b"not an image".to_vec(),
                ..ok.clone()
            },
        ),
        (
            "mask",
            pb::GenerateRequest {
                mask: vec![0; 70_000],
                ..ok.clone()
            },
        ),
        (
            "outpaint",
            pb::GenerateRequest {
                outpaint: sides(8, 0, 0, 0),
                ..ok.clone()
            },
        ),
        (
            "outpaint",
            pb::GenerateRequest {
                mask: vec![],
                outpaint: sides(4, 0, 0, 0),
                ..ok.clone()
            },
        ),
        (
            "outpaint",
            pb::GenerateRequest {
                mask: vec![],
                outpaint: sides(0, 0, 0, 0),
                ..ok.clone()
            },
        ),
        // 64×64 grown to 128×136 = 17,408 pixels > 16,384.
        (
            "outpaint",
            pb::GenerateRequest {
                mask: vec![],
                outpaint: sides(32, 40, 32, 32),
                ..ok.clone()
            },
        ),
        (
            "outpaint",
            pb::GenerateRequest {
                init_image: vec![],
                mask: vec![],
                outpaint: sides(8, 0, 0, 0),
                ..ok.clone()
            },
        ),
        // An inpainting checkpoint needs a mask.
        (
            "mask",
            pb::GenerateRequest {
                model: "sd1-inpaint".into(),
                mask: vec![],
                strength: 0.5,
                ..ok.clone()
            },
        ),
        (
            "strength",
            pb::GenerateRequest {
                strength: 1.5,
                ..ok.clone()
            },
        ),
        (
            "mask_crop_padding",
            pb::GenerateRequest {
                mask: vec![],
                mask_crop_padding: Some(4),
                ..ok.clone()
            },
        ),
        // Cropping around a mask of another size than the image.
        (
            "mask",
            pb::GenerateRequest {
                mask: read("sd1-tiny", "../outpaint-mask.png"),
                mask_crop_padding: Some(4),
                ..ok.clone()
            },
        ),
    ];
    jhakaas_tests::server::assert_refused_naming(&mut client, cases).await;
    // A valid inpainting request still runs.
    let done = completed(&mut client, ok).await;
    assert_eq!(done.images.len(), 1);
}

/// The request of ControlNet case `name` of `pipeline` for the server's model `model`, the
/// nets named as the server registered them (`--controlnet NAME=fixture folder`).
fn controlnet_request(
    pipeline: &str,
    name: &str,
    model: &str,
) -> (pb::GenerateRequest, FixtureCase) {
    let case = jhakaas_tests::cases::load_controlnet_cases(pipeline)
        .into_iter()
        .find(|c| c.name == name)
        .unwrap();
    let req = pb::GenerateRequest {
        controlnets: case
            .controlnets
            .iter()
            .map(|c| pb::ControlNetInput {
                name: c.net.clone(),
                image: read(pipeline, &c.image),
                scale: c.scale as f32,
                start: c.start as f32,
                end: c.end as f32,
            })
            .collect(),
        ..base_request(&case, model)
    };
    (req, case)
}

#[tokio::test(flavor = "multi_thread")]
async fn controlnets_over_grpc_give_diffusers_images_and_are_listed() {
    let sd1 = fixture_model("sd1", "sd1-tiny");
    let nets = fixtures().join("models");
    let net = |n: &str| format!("{n}={}", nets.join(n).display());
    let server = TestServer::start(&[
        "--model",
        &sd1,
        "--controlnet",
        &net("controlnet-sd1-tiny"),
        "--controlnet",
        &net("controlnet-sd1-tiny-bgr"),
        "--controlnet",
        &net("controlnet-sdxl-tiny"),
    ]);
    server.wait_ready().await;
    let mut client = server.client().await;
    let listed = client
        .list_models(pb::ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.controlnets.len(), 3);
    assert!(listed
        .controlnets
        .iter()
        .all(|c| !c.loaded && c.error.is_empty()));
    for name in ["scale-1", "two-nets"] {
        let (req, case) = controlnet_request("sd1-tiny", name, "sd1");
        let done = completed(&mut client, req).await;
        let ours = image::load_from_memory(&done.images[0].data)
            .unwrap()
            .to_rgb8();
        let want = read("sd1-tiny", case.image.as_str().unwrap());
        let theirs = image::load_from_memory(&want).unwrap().to_rgb8();
        let (mean, max) = image_diff(&ours, &theirs);
        assert!(mean <= 0.5 && max <= 6, "{name}: mean {mean}, max {max}");
    }
    let listed = client
        .list_models(pb::ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let loaded: Vec<_> = listed.controlnets.iter().filter(|c| c.loaded).collect();
    assert_eq!(loaded.len(), 2, "{listed:?}");
    assert!(loaded.iter().all(|c| c.loaded_bytes > 0));

    // Bad ControlNet inputs, refused naming the field before anything is queued.
    let (ok, _) = controlnet_request("sd1-tiny", "scale-1", "sd1");
    let with = |f: &dyn Fn(&mut pb::ControlNetInput)| {
        let mut r = ok.clone();
        f(&mut r.controlnets[0]);
        r
    };
    let cases = [
        ("controlnets", with(&|c| c.name = "nope".into())),
        (
            "controlnet",
            with(&|c| c.name = "controlnet-sdxl-tiny".into()),
        ),
        ("controlnets", with(&|c| c.image.clear())),
        (
            "control_image",
            with(&|c| c.image = b"not an image".to_vec()),
        ),
        ("controlnets", with(&|c| c.scale = f32::NAN)),
        ("controlnets", with(&|c| (c.start, c.end) = (0.8, 0.4))),
        ("controlnets", {
            let mut r = ok.clone();
            r.controlnets = vec![r.controlnets[0].clone(); 5];
            r
        }),
    ];
    for (field, req) in cases {
        let err = client.generate(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
}
