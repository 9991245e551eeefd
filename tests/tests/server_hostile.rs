//! What a hostile or careless client found in the first-wave server (issue 12), each now
//! refused with INVALID_ARGUMENT naming the field — never an escape past a limit, never
//! INTERNAL, never a panic — and the server still serving afterwards.

use jhakaas_proto::v1 as pb;
use jhakaas_tests::server::{fixture_model, TestServer};
use std::time::Duration;
use tonic::Code;

async fn ready_server(extra: &[&str]) -> TestServer {
    let model = fixture_model("tiny", "sd1-tiny");
    let mut args = vec!["--model", model.as_str()];
    args.extend_from_slice(extra);
    let server = TestServer::start(&args);
    server.wait_ready().await;
    server
}

fn request(steps: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: "a red cube".into(),
        steps,
        seed: Some(7),
        ..Default::default()
    }
}

async fn finished(
    client: &mut pb::worker_client::WorkerClient<tonic::transport::Channel>,
    id: &str,
) -> pb::Job {
    for _ in 0..1200 {
        let job = client
            .get_job(pb::GetJobRequest { job_id: id.into() })
            .await
            .unwrap()
            .into_inner();
        if job.state == pb::JobState::Succeeded as i32 || job.state == pb::JobState::Failed as i32 {
            return job;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("job {id} never finished");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_zero_side_cannot_escape_the_pixel_limit() {
    // 262144 = 512²; the fixture's default side is far smaller than 8192.
    let server = ready_server(&["--max-pixels", "262144"]).await;
    let mut client = server.client().await;
    for (w, h) in [(0, 8192), (8192, 0), (0, 4160), (4160, 0)] {
        let err = client
            .submit_job(pb::GenerateRequest {
                width: w,
                height: h,
                ..request(1)
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{w}x{h}: {err:?}");
        assert!(
            err.message().contains("width") || err.message().contains("height"),
            "{w}x{h}: {}",
            err.message()
        );
        assert!(err.message().contains("262144"), "{}", err.message());
    }
}

/// A `GenerateRequest` whose `prompt` (field 3) is raw bytes, to send invalid UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawPrompt {
    #[prost(bytes = "vec", tag = "3")]
    prompt: Vec<u8>,
}

#[tokio::test(flavor = "multi_thread")]
async fn undecodable_requests_are_invalid_argument_not_internal() {
    let server = ready_server(&[]).await;
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    for (what, body) in [
        (
            "invalid UTF-8",
            RawPrompt {
                prompt: vec![0xff, 0xfe, b'a'],
            },
        ),
        (
            "lone continuation byte",
            RawPrompt {
                prompt: vec![b'a', 0x80],
            },
        ),
    ] {
        grpc.ready().await.unwrap();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(
            "/jhakaas.worker.v1.Worker/SubmitJob",
        );
        let codec = tonic_prost::ProstCodec::<RawPrompt, pb::Job>::default();
        let err = grpc
            .unary(tonic::Request::new(body), path, codec)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(
            err.message().contains("prompt"),
            "{what}: {}",
            err.message()
        );
    }
    // Still serving.
    let mut client = server.client().await;
    client.submit_job(request(1)).await.unwrap();
    assert_eq!(server.health("jhakaas.worker.v1.Worker").await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_over_long_message_is_refused_naming_the_limit() {
    let server = ready_server(&["--max-init-image-bytes", "100000"]).await;
    let mut client = server.client().await;
    // Over the message limit (100000 + 64 KiB): refused before decoding, naming the setting.
    let mut r = request(1);
    r.init_image = vec![0u8; 400_000];
    r.strength = 0.5;
    let err = client.submit_job(r).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("limit of 165536 bytes")
            && err.message().contains("--max-init-image-bytes"),
        "{}",
        err.message()
    );
    // Within the message limit but over the init image's own: the field is named.
    let mut r = request(1);
    r.init_image = vec![0u8; 120_000];
    r.strength = 0.5;
    let err = client.submit_job(r).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("init_image"), "{}", err.message());
    assert_eq!(server.health("jhakaas.worker.v1.Worker").await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_timeout_values_are_bounded() {
    let server = ready_server(&[]).await;
    let mut client = server.client().await;
    // Generate honours the client's deadline. The largest value the spec allows (8 digits of
    // hours) is no overflow: effectively no deadline.
    let mut req = tonic::Request::new(request(1));
    req.metadata_mut()
        .insert("grpc-timeout", "99999999H".parse().unwrap());
    let mut stream = client.generate(req).await.unwrap().into_inner();
    let mut completed = false;
    while let Some(e) = tokio_stream::StreamExt::next(&mut stream).await {
        completed |= matches!(e.unwrap().event, Some(pb::job_event::Event::Completed(_)));
    }
    assert!(completed);
    // Longer than the spec's 8 digits (the first used to overflow u64 arithmetic), or no unit.
    for bad in ["18446744073709551615H", "123456789S", "5x", "S"] {
        let mut req = tonic::Request::new(request(1));
        req.metadata_mut()
            .insert("grpc-timeout", bad.parse().unwrap());
        let err = client.generate(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err:?}");
        assert!(
            err.message().contains("grpc-timeout"),
            "{bad}: {}",
            err.message()
        );
    }
    assert_eq!(server.health("jhakaas.worker.v1.Worker").await.unwrap(), 1);
    assert_eq!(server.health("").await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_and_the_server_apply_the_same_rules() {
    let server = ready_server(&[]).await;
    let mut client = server.client().await;
    // Guidance 60 is within the engine's [0, 100]: the server used to refuse it at 50.
    let job = client
        .submit_job(pb::GenerateRequest {
            guidance_scale: 60.0,
            ..request(1)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        finished(&mut client, &job.job_id).await.state,
        pb::JobState::Succeeded as i32
    );
    // 101 is refused by both with the same message.
    let err = client
        .submit_job(pb::GenerateRequest {
            guidance_scale: 101.0,
            ..request(1)
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let out = jhakaas_tests::run_worker([
        "generate",
        "--model",
        jhakaas_tests::fixtures()
            .join("models/sd1-tiny")
            .to_str()
            .unwrap(),
        "--prompt",
        "a red cube",
        "--steps",
        "1",
        "--guidance-scale",
        "101",
        "--device",
        "cpu",
        "--output",
        std::env::temp_dir()
            .join("jhakaas-unused.png")
            .to_str()
            .unwrap(),
    ]);
    assert!(!out.status.success());
    let cli = String::from_utf8_lossy(&out.stderr);
    assert!(
        cli.contains(err.message()),
        "CLI said {cli:?}, the server {:?}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unset_seed_is_fixed_at_acceptance_and_reported() {
    let server = ready_server(&[]).await;
    let mut client = server.client().await;
    let first = client
        .submit_job(pb::GenerateRequest {
            seed: None,
            ..request(2)
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(first.seed, 0, "the accepted job reports its seed");
    let done = finished(&mut client, &first.job_id).await;
    assert_eq!(done.seed, first.seed);
    assert_eq!(done.images[0].seed, first.seed);
    // The reported seed reproduces the image.
    let again = client
        .submit_job(pb::GenerateRequest {
            seed: Some(first.seed),
            ..request(2)
        })
        .await
        .unwrap()
        .into_inner();
    let again = finished(&mut client, &again.job_id).await;
    assert_eq!(again.images[0].data, done.images[0].data);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panic_in_the_engine_fails_the_job_and_restarts_the_pod() {
    let model = fixture_model("tiny", "sd1-tiny");
    let mut server = TestServer::start_with_env(
        &["--model", model.as_str()],
        &[("JHAKAAS_TEST_PANIC_PROMPT", std::path::Path::new("boom"))],
    );
    server.wait_ready().await;
    let mut client = server.client().await;
    let stream = client
        .generate(pb::GenerateRequest {
            prompt: "boom".into(),
            ..request(1)
        })
        .await
        .unwrap()
        .into_inner();
    let events: Vec<_> = tokio_stream::StreamExt::collect::<Vec<_>>(stream).await;
    let failed = events.iter().find_map(|e| match e {
        Ok(pb::JobEvent {
            event: Some(pb::job_event::Event::Failed(f)),
            ..
        }) => Some(f.reason.clone()),
        _ => None,
    });
    let reason = failed.unwrap_or_else(|| panic!("no Failed event in {events:?}"));
    assert!(reason.contains("panicked"), "{reason}");
    // Not a black hole: the process exits non-zero so Kubernetes restarts the pod.
    let code = server.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(70), "logs: {}", server.logs());
    assert!(server.logs().contains("the engine panicked"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_that_fails_to_load_backs_off_and_evicts_nothing() {
    let broken = jhakaas_tests::scratch_dir("hostile-broken-model");
    std::fs::write(
        broken.join("model_index.json"),
        r#"{"_class_name": "StableDiffusionPipeline"}"#,
    )
    .unwrap();
    let good = fixture_model("good", "sd1-tiny");
    let bad = format!("bad={}", broken.display());
    let server = TestServer::start(&[
        "--model",
        &good,
        "--model",
        &bad,
        "--max-loaded-models",
        "1",
    ]);
    server.wait_ready().await;
    let mut client = server.client().await;
    let run = |model: &str| pb::GenerateRequest {
        model: model.into(),
        ..request(1)
    };
    // Three jobs for the broken model: one load attempt, then refusals until the back-off ends.
    let mut reasons = Vec::new();
    for _ in 0..3 {
        let job = client.submit_job(run("bad")).await.unwrap().into_inner();
        let done = finished(&mut client, &job.job_id).await;
        assert_eq!(done.state, pb::JobState::Failed as i32);
        reasons.push(done.error);
    }
    assert!(reasons[0].contains("unet/config.json"), "{}", reasons[0]);
    assert!(reasons[1].contains("not retried"), "{}", reasons[1]);
    let attempts = server.logs().matches("model failed to load").count();
    assert_eq!(attempts, 1, "{}", server.logs());
    // The healthy model, loaded before, was not evicted for the failed load.
    let list = client
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    let good = list.models.iter().find(|m| m.name == "good").unwrap();
    assert!(good.loaded, "{list:?}");
    let stream = client.generate(run("good")).await.unwrap().into_inner();
    let events: Vec<_> = tokio_stream::StreamExt::collect::<Vec<_>>(stream).await;
    assert!(
        !events.iter().any(|e| matches!(
            e,
            Ok(pb::JobEvent {
                event: Some(pb::job_event::Event::ModelLoading(_)),
                ..
            })
        )),
        "the good model was reloaded: {events:?}"
    );
}
