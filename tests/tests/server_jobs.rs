//! The gRPC server driven by a real tonic client: event order, idempotency, cancellation,
//! disconnects, deadlines, overload, validation, lazy loading and eviction, and metrics.

use jhakaas_proto::v1 as pb;
use jhakaas_tests::server::{fixture_model, TestServer};
use pb::job_event::Event;
use std::time::Duration;
use tokio_stream::StreamExt;
use tonic::Code;

fn request(prompt: &str, steps: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: prompt.into(),
        steps,
        seed: Some(42),
        ..Default::default()
    }
}

async fn ready_server(extra: &[&str]) -> TestServer {
    let model = fixture_model("tiny", "sd1-tiny");
    let mut args = vec!["--model", model.as_str()];
    args.extend_from_slice(extra);
    let server = TestServer::start(&args);
    server.wait_ready().await;
    server
}

/// Collects a Generate stream: its events, or the status it ended with.
async fn collect(
    mut stream: tonic::Streaming<pb::JobEvent>,
) -> (Vec<pb::JobEvent>, Option<tonic::Status>) {
    let mut events = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(e) => events.push(e),
            Err(s) => return (events, Some(s)),
        }
    }
    (events, None)
}

async fn wait_state(
    client: &mut pb::worker_client::WorkerClient<tonic::transport::Channel>,
    id: &str,
    want: pb::JobState,
) -> pb::Job {
    for _ in 0..600 {
        let job = client
            .get_job(pb::GetJobRequest { job_id: id.into() })
            .await
            .unwrap()
            .into_inner();
        if job.state == want as i32 {
            return job;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("job {id} never reached {want:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn generate_streams_queued_started_every_step_then_one_terminal_event() {
    let server = ready_server(&[]).await;
    let mut client = server.client().await;
    let stream = client
        .generate(request("a red cube", 4))
        .await
        .unwrap()
        .into_inner();
    let (events, status) = collect(stream).await;
    assert!(status.is_none(), "{status:?}");
    let kinds: Vec<&Event> = events.iter().map(|e| e.event.as_ref().unwrap()).collect();
    assert!(matches!(kinds[0], Event::Queued(_)), "{kinds:?}");
    let started = kinds
        .iter()
        .position(|e| matches!(e, Event::Started(_)))
        .expect("started");
    let steps: Vec<u32> = kinds
        .iter()
        .filter_map(|e| match e {
            Event::Progress(p) => Some(p.step),
            _ => None,
        })
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);
    assert!(
        kinds
            .iter()
            .position(|e| matches!(e, Event::Progress(_)))
            .unwrap()
            > started
    );
    let terminal: Vec<_> = kinds
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::Completed(_) | Event::Failed(_) | Event::Cancelled(_)
            )
        })
        .collect();
    assert_eq!(terminal.len(), 1);
    let Event::Completed(done) = kinds.last().unwrap() else {
        panic!("last event is not Completed: {kinds:?}")
    };
    assert_eq!(done.images.len(), 1);
    let img = &done.images[0];
    assert_eq!(
        (img.mime_type.as_str(), img.width, img.height, img.seed),
        ("image/png", 64, 64, 42)
    );
    let decoded = image::load_from_memory(&img.data).unwrap();
    assert_eq!(decoded.width(), 64);
    let t = done.timings.unwrap();
    assert!(
        t.total_seconds > 0.0 && t.denoise_seconds > 0.0 && t.total_seconds >= t.denoise_seconds
    );
    // Every event names the job.
    assert!(events
        .iter()
        .all(|e| e.job_id == events[0].job_id && !e.job_id.is_empty()));
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_returns_the_same_pixels_as_the_cli_for_the_same_seed() {
    let server = ready_server(&[]).await;
    let mut client = server.client().await;
    let mut req = request("a lighthouse", 3);
    req.scheduler = "euler-a".into();
    let (events, _) = collect(client.generate(req).await.unwrap().into_inner()).await;
    let Some(Event::Completed(done)) = events.last().and_then(|e| e.event.clone()) else {
        panic!("{events:?}")
    };
    let ours = image::load_from_memory(&done.images[0].data)
        .unwrap()
        .to_rgb8();
    let out = jhakaas_tests::scratch_dir("grpc-vs-cli").join("cli.png");
    let model = jhakaas_tests::fixtures().join("models/sd1-tiny");
    let o = jhakaas_tests::run_worker([
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a lighthouse",
        "--steps",
        "3",
        "--scheduler",
        "euler-a",
        "--seed",
        "42",
        "--device",
        "cpu",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    assert_eq!(ours, image::open(&out).unwrap().to_rgb8());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_request_id_returns_the_existing_job() {
    let server = ready_server(&[]).await;
    let mut client = server.client().await;
    let mut req = request("idempotent", 3);
    req.request_id = "client-key-1".into();
    let a = client.submit_job(req.clone()).await.unwrap().into_inner();
    let b = client.submit_job(req.clone()).await.unwrap().into_inner();
    assert_eq!(a.job_id, b.job_id);
    let done = wait_state(&mut client, &a.job_id, pb::JobState::Succeeded).await;
    assert_eq!(done.images.len(), 1);
    assert!(done.timings.is_some());
    // Generate with the same key attaches to the finished job: its terminal event, no rerun.
    let (events, _) = collect(client.generate(req).await.unwrap().into_inner()).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].job_id, a.job_id);
    assert!(matches!(events[0].event, Some(Event::Completed(_))));
    let m = server.metrics();
    assert!(
        m.contains("jhakaas_jobs_total{outcome=\"succeeded\"} 1"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_a_queued_job_at_once_and_a_running_one_within_a_step() {
    let server = ready_server(&[]).await;
    let mut client = server.client().await;
    let long = client
        .submit_job(request("long", 150))
        .await
        .unwrap()
        .into_inner();
    let queued = client
        .submit_job(request("queued", 150))
        .await
        .unwrap()
        .into_inner();
    wait_state(&mut client, &long.job_id, pb::JobState::Running).await;
    let q = client
        .cancel_job(pb::CancelJobRequest {
            job_id: queued.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        q.state,
        pb::JobState::Cancelled as i32,
        "a queued job is cancelled at once"
    );

    let mut watch = client
        .watch_job(pb::WatchJobRequest {
            job_id: long.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let at_cancel = client
        .cancel_job(pb::CancelJobRequest {
            job_id: long.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .progress
        .map_or(0, |p| p.step);
    let mut terminal = None;
    while let Some(Ok(e)) = watch.next().await {
        if let Some(Event::Cancelled(c)) = e.event {
            terminal = Some(c);
            break;
        }
    }
    let c = terminal.expect("cancelled event");
    assert!(c.reason.contains("cancelled"), "{}", c.reason);
    let job = wait_state(&mut client, &long.job_id, pb::JobState::Cancelled).await;
    // The flag is set before the snapshot the cancel call returns, so at most the step that
    // was already running then can still finish.
    let last = job.progress.unwrap().step;
    assert!(
        last <= at_cancel + 1,
        "cancelled at step {at_cancel}, ran until {last}"
    );
    assert!(last < 150);
    // The worker keeps serving.
    let (events, _) = collect(
        client
            .generate(request("after", 2))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert!(matches!(
        events.last().unwrap().event,
        Some(Event::Completed(_))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_generate_stream_cancels_its_job() {
    let server = ready_server(&[]).await;
    let mut client = server.client().await;
    let mut stream = client
        .generate(request("dropped", 150))
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    let id = first.job_id.clone();
    // Wait until it runs, then hang up.
    loop {
        let e = stream.next().await.unwrap().unwrap();
        if matches!(e.event, Some(Event::Progress(_))) {
            break;
        }
    }
    drop(stream);
    let job = wait_state(&mut client, &id, pb::JobState::Cancelled).await;
    assert!(job.error.contains("disconnected"), "{}", job.error);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_passed_deadline_ends_the_stream_and_cancels_the_job() {
    let server = ready_server(&[]).await;
    let mut client = server.client().await;
    let mut req = tonic::Request::new(request("deadline", 150));
    req.set_timeout(Duration::from_millis(700));
    let started = std::time::Instant::now();
    let result = client.generate(req).await;
    let (events, status) = match result {
        Ok(r) => collect(r.into_inner()).await,
        Err(s) => (Vec::new(), Some(s)),
    };
    let status = status.expect("the stream must end with an error");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    if let Some(id) = events.first().map(|e| e.job_id.clone()) {
        let job = wait_state(&mut client, &id, pb::JobState::Cancelled).await;
        assert!(job.error.contains("deadline"), "{}", job.error);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn overload_refuses_with_resource_exhausted_and_loses_no_accepted_job() {
    let server = ready_server(&["--max-queue", "2"]).await;
    let client = server.client().await;
    let mut handles = Vec::new();
    for i in 0..8 {
        let mut c = client.clone();
        handles.push(tokio::spawn(async move {
            c.submit_job(request(&format!("load {i}"), 60)).await
        }));
    }
    let mut accepted = Vec::new();
    let mut refused = 0;
    for h in handles {
        match h.await.unwrap() {
            Ok(job) => accepted.push(job.into_inner().job_id),
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                refused += 1;
            }
        }
    }
    assert_eq!(accepted.len() + refused, 8);
    assert!(refused >= 1, "a queue of 2 cannot take 8 concurrent jobs");
    assert!(!accepted.is_empty());
    let mut c = client.clone();
    for id in &accepted {
        wait_state(&mut c, id, pb::JobState::Succeeded).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_bad_field_is_invalid_argument_naming_it() {
    let server = ready_server(&[
        "--max-steps",
        "50",
        "--max-images",
        "2",
        "--max-pixels",
        "262144",
    ])
    .await;
    let mut client = server.client().await;
    let init_png = std::fs::read(jhakaas_tests::fixtures().join("reference/init.png")).unwrap();
    let ok = request("fine", 2);
    let cases: Vec<(&str, pb::GenerateRequest)> = vec![
        (
            "prompt",
            pb::GenerateRequest {
                prompt: "  ".into(),
                ..ok.clone()
            },
        ),
        (
            "width",
            pb::GenerateRequest {
                width: 100,
                ..ok.clone()
            },
        ),
        (
            "height",
            pb::GenerateRequest {
                height: 65,
                ..ok.clone()
            },
        ),
        (
            "width",
            pb::GenerateRequest {
                width: 1024,
                height: 1024,
                ..ok.clone()
            },
        ),
        (
            "steps",
            pb::GenerateRequest {
                steps: 51,
                ..ok.clone()
            },
        ),
        (
            "guidance_scale",
            pb::GenerateRequest {
                guidance_scale: f32::NAN,
                ..ok.clone()
            },
        ),
        (
            "guidance_scale",
            pb::GenerateRequest {
                guidance_scale: -1.0,
                ..ok.clone()
            },
        ),
        (
            "num_images",
            pb::GenerateRequest {
                num_images: 3,
                ..ok.clone()
            },
        ),
        (
            "scheduler",
            pb::GenerateRequest {
                scheduler: "k_lms_2".into(),
                ..ok.clone()
            },
        ),
        (
            "output_format",
            pb::GenerateRequest {
                output_format: 42,
                ..ok.clone()
            },
        ),
        (
            "strength",
            pb::GenerateRequest {
                strength: 0.5,
                ..ok.clone()
            },
        ),
        (
            "strength",
            pb::GenerateRequest {
                init_image: init_png.clone(),
                strength: 0.0,
                ..ok.clone()
            },
        ),
        (
            "strength",
            pb::GenerateRequest {
                init_image: init_png.clone(),
                strength: 1.5,
                ..ok.clone()
            },
        ),
        (
            "init_image",
            pb::GenerateRequest {
                init_image: b"not an image".to_vec(),
                strength: 0.5,
                ..ok.clone()
            },
        ),
        (
            "request_id",
            pb::GenerateRequest {
                request_id: "x".repeat(200),
                ..ok.clone()
            },
        ),
    ];
    jhakaas_tests::server::assert_refused_naming(&mut client, cases).await;
    let err = client
        .submit_job(pb::GenerateRequest {
            model: "/etc/passwd".into(),
            ..ok.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("model"));
    let err = client
        .get_job(pb::GetJobRequest {
            job_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .cancel_job(pb::CancelJobRequest {
            job_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // A bomb: a tiny PNG that claims a huge canvas is refused before decoding.
    let big = image::RgbImage::new(1024, 1024);
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(big)
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    let err = client
        .submit_job(pb::GenerateRequest {
            init_image: bytes,
            strength: 0.5,
            ..ok.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("init_image") && err.message().contains("exceeds"),
        "{}",
        err.message()
    );
    // Still serving.
    let (events, _) = collect(client.generate(ok).await.unwrap().into_inner()).await;
    assert!(matches!(
        events.last().unwrap().event,
        Some(Event::Completed(_))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn models_load_lazily_and_the_least_recently_used_is_evicted() {
    let a = fixture_model("sd1", "sd1-tiny");
    let b = fixture_model("sd2", "sd2-tiny");
    let server = TestServer::start(&["--model", &a, "--model", &b, "--max-loaded-models", "1"]);
    server.wait_ready().await;
    let mut client = server.client().await;
    let list = |m: pb::ListModelsResponse| {
        m.models
            .into_iter()
            .map(|m| (m.name.clone(), m.loaded, m.family.clone()))
            .collect::<Vec<_>>()
    };
    let before = list(
        client
            .list_models(pb::ListModelsRequest {})
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(
        before,
        vec![
            ("sd1".into(), true, "sd1".into()),
            // Family and defaults come from the config files, before any weights load.
            ("sd2".into(), false, "sd2".into())
        ]
    );

    let mut req = request("other model", 2);
    req.model = "sd2".into();
    let (events, _) = collect(client.generate(req).await.unwrap().into_inner()).await;
    assert!(
        events
            .iter()
            .any(|e| matches!(&e.event, Some(Event::ModelLoading(m)) if m.model == "sd2")),
        "{events:?}"
    );
    assert!(matches!(
        events.last().unwrap().event,
        Some(Event::Completed(_))
    ));
    let resp = client
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    let sd2 = resp.models.iter().find(|m| m.name == "sd2").unwrap();
    assert_eq!(
        (sd2.default_width, sd2.default_height, sd2.default_steps),
        (64, 64, 50)
    );
    assert_eq!(sd2.default_scheduler, "ddim");
    assert!(sd2.loaded_bytes > 0);
    assert_eq!(
        list(resp),
        vec![
            ("sd1".into(), false, "sd1".into()),
            ("sd2".into(), true, "sd2".into())
        ]
    );
    assert!(server.metrics().contains("jhakaas_models_loaded 1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_that_fails_to_load_fails_its_jobs_and_not_the_others() {
    let broken = jhakaas_tests::scratch_dir("broken-model");
    std::fs::write(
        broken.join("model_index.json"),
        r#"{"_class_name": "StableDiffusionPipeline"}"#,
    )
    .unwrap();
    let good = fixture_model("good", "sd1-tiny");
    let bad = format!("bad={}", broken.display());
    let server = TestServer::start(&["--model", &good, "--model", &bad]);
    server.wait_ready().await;
    let mut client = server.client().await;
    let mut req = request("x", 2);
    req.model = "bad".into();
    let (events, _) = collect(client.generate(req).await.unwrap().into_inner()).await;
    match &events.last().unwrap().event {
        // The first file the loader needs after model_index.json, named with its source.
        Some(Event::Failed(f)) => assert!(
            f.reason.contains("has no file `unet/config.json`")
                && f.reason.contains("broken-model"),
            "{}",
            f.reason
        ),
        other => panic!("{other:?}"),
    }
    let (events, _) = collect(client.generate(request("y", 2)).await.unwrap().into_inner()).await;
    assert!(matches!(
        events.last().unwrap().event,
        Some(Event::Completed(_))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_served_with_the_jhakaas_prefix() {
    let server = ready_server(&[]).await;
    let mut client = server.client().await;
    collect(
        client
            .generate(request("metrics", 2))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    let m = server.metrics();
    for name in [
        "jhakaas_queue_depth",
        "jhakaas_jobs_total{outcome=\"succeeded\"}",
        "jhakaas_queue_wait_seconds_bucket",
        "jhakaas_job_duration_seconds_bucket",
        "jhakaas_step_duration_seconds_bucket",
        "jhakaas_models_loaded 1",
    ] {
        assert!(m.contains(name), "missing {name} in:\n{m}");
    }
}
