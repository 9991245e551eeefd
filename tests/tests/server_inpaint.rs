//! Inpainting and outpainting over gRPC: `mask` and `outpaint` beside `init_image` give
//! diffusers' images (the committed inpainting cases, from their seeds), and every bad
//! combination is INVALID_ARGUMENT naming the field before anything is queued.

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
        model: model.into(),
        prompt: case.prompt.clone(),
        negative_prompt: case.negative_prompt.clone().unwrap_or_default(),
        steps: case.steps as u32,
        guidance_scale: case.guidance_scale as f32,
        seed: Some(case.seed),
        rng: "torch-cpu".into(),
        scheduler: case.scheduler.clone().unwrap_or_default(),
        num_images: case.num_images as u32,
        init_image: read(&case.pipeline, case.init_image.as_ref().unwrap()),
        strength: case.strength.unwrap() as f32,
        mask: case
            .mask
            .as_ref()
            .map(|m| read(&case.pipeline, m))
            .unwrap_or_default(),
        outpaint,
        ..Default::default()
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
    ];
    for (field, req) in cases {
        for via_submit in [false, true] {
            let err = if via_submit {
                client.submit_job(req.clone()).await.unwrap_err()
            } else {
                client.generate(req.clone()).await.unwrap_err()
            };
            assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
            assert!(err.message().contains(field), "{field}: {}", err.message());
        }
    }
    // A valid inpainting request still runs.
    let done = completed(&mut client, ok).await;
    assert_eq!(done.images.len(), 1);
}
