//! Operations: health that means "ready", reflection, bearer-token auth, TLS, and a SIGTERM
//! drain that finishes (or, past the drain timeout, cancels) in-flight work and exits 0.

use jhakaas_proto::v1 as pb;
use jhakaas_tests::server::{fixture_model, TestServer};
use pb::job_event::Event;
use std::time::Duration;
use tokio_stream::StreamExt;
use tonic::Code;

fn request(prompt: &str, steps: u32, side: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: prompt.into(),
        steps,
        width: side,
        height: side,
        seed: Some(1),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn health_reports_process_alive_and_worker_ready_separately_and_reflection_lists_services() {
    let model = fixture_model("tiny", "sd1-tiny");
    let server = TestServer::start(&["--model", &model]);
    // "" is SERVING as soon as the process answers; the Worker only after warm-up.
    assert_eq!(server.health("").await.unwrap(), 1);
    server.wait_ready().await;
    assert_eq!(server.health("jhakaas.worker.v1.Worker").await.unwrap(), 1);

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut refl = ServerReflectionClient::new(server.channel().await);
    let reqs = vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "jhakaas.worker.v1.Worker".into(),
            )),
        },
    ];
    let mut responses = refl
        .server_reflection_info(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("no service list")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["jhakaas.worker.v1.Worker", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == want), "{names:?}");
    }
    let Some(MessageResponse::FileDescriptorResponse(fd)) =
        responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("no descriptor")
    };
    assert!(!fd.file_descriptor_proto.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn bearer_token_auth_guards_the_worker_but_not_health_or_reflection() {
    let dir = jhakaas_tests::scratch_dir("auth");
    let token_file = dir.join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let model = fixture_model("tiny", "sd1-tiny");
    let server = TestServer::start(&[
        "--model",
        &model,
        "--auth-token-file",
        token_file.to_str().unwrap(),
    ]);
    server.wait_ready().await; // health needs no token
    let mut client = server.client().await;
    let err = client
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut wrong = tonic::Request::new(pb::ListModelsRequest {});
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer s3cret-tokeX".parse().unwrap());
    assert_eq!(
        client.list_models(wrong).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let mut right = tonic::Request::new(request("auth", 2, 64));
    right
        .metadata_mut()
        .insert("authorization", "Bearer s3cret-token".parse().unwrap());
    let mut stream = client.generate(right).await.unwrap().into_inner();
    let mut last = None;
    while let Some(e) = stream.next().await {
        last = e.unwrap().event;
    }
    assert!(matches!(last, Some(Event::Completed(_))));
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_serves_clients_that_trust_the_certificate() {
    let dir = jhakaas_tests::scratch_dir("tls");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let model = fixture_model("tiny", "sd1-tiny");
    let server = TestServer::start(&[
        "--model",
        &model,
        "--tls-cert",
        cert_path.to_str().unwrap(),
        "--tls-key",
        key_path.to_str().unwrap(),
    ]);
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(cert.cert.pem()))
        .domain_name("localhost");
    let channel = tonic::transport::Channel::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("TLS connect");
    let mut client = pb::worker_client::WorkerClient::new(channel.clone());
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for _ in 0..600 {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "jhakaas.worker.v1.Worker".into(),
            })
            .await
            .unwrap();
        if r.into_inner().status == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let models = client
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(models.models[0].name, "tiny");
    // Plain text is refused by a TLS server.
    let plain = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = plain {
        assert!(pb::worker_client::WorkerClient::new(ch)
            .list_models(pb::ListModelsRequest {})
            .await
            .is_err());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_finishes_in_flight_work_refuses_new_work_and_exits_zero() {
    let model = fixture_model("tiny", "sd1-tiny");
    let mut server = TestServer::start(&["--model", &model, "--drain-timeout", "60s"]);
    server.wait_ready().await;
    let mut client = server.client().await;
    let job = client
        .submit_job(request("in flight", 150, 64))
        .await
        .unwrap()
        .into_inner();
    let mut watch = client
        .watch_job(pb::WatchJobRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    // Wait until it runs.
    loop {
        if matches!(
            watch.next().await.unwrap().unwrap().event,
            Some(Event::Progress(_))
        ) {
            break;
        }
    }
    server.terminate();
    let mut not_serving = false;
    for _ in 0..200 {
        if server.health("jhakaas.worker.v1.Worker").await.ok() == Some(2) {
            not_serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(not_serving, "health must turn NOT_SERVING while draining");
    let err = client
        .submit_job(request("too late", 2, 64))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let mut last = None;
    while let Some(Ok(e)) = watch.next().await {
        last = e.event;
    }
    assert!(
        matches!(last, Some(Event::Completed(_))),
        "the in-flight job must finish: {last:?}"
    );
    assert_eq!(
        server.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        server.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn past_the_drain_timeout_remaining_work_is_cancelled_and_the_worker_still_exits_zero() {
    let model = fixture_model("tiny", "sd1-tiny");
    let mut server = TestServer::start(&["--model", &model, "--drain-timeout", "300ms"]);
    server.wait_ready().await;
    let mut client = server.client().await;
    let running = client
        .submit_job(request("slow", 150, 128))
        .await
        .unwrap()
        .into_inner();
    let queued = client
        .submit_job(request("queued", 150, 128))
        .await
        .unwrap()
        .into_inner();
    let mut watch_running = client
        .watch_job(pb::WatchJobRequest {
            job_id: running.job_id,
        })
        .await
        .unwrap()
        .into_inner();
    let mut watch_queued = client
        .watch_job(pb::WatchJobRequest {
            job_id: queued.job_id,
        })
        .await
        .unwrap()
        .into_inner();
    loop {
        if matches!(
            watch_running.next().await.unwrap().unwrap().event,
            Some(Event::Progress(_))
        ) {
            break;
        }
    }
    server.terminate();
    for watch in [&mut watch_running, &mut watch_queued] {
        let mut last = None;
        while let Some(Ok(e)) = watch.next().await {
            last = e.event;
        }
        match last {
            Some(Event::Cancelled(c)) => {
                assert!(c.reason.contains("shutting down"), "{}", c.reason)
            }
            other => panic!("expected a cancellation, got {other:?}"),
        }
    }
    assert_eq!(
        server.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        server.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn finished_jobs_expire_after_the_result_ttl_and_logs_can_be_json() {
    let model = fixture_model("tiny", "sd1-tiny");
    let server = TestServer::start(&[
        "--model",
        &model,
        "--result-ttl",
        "400ms",
        "--log-format",
        "json",
    ]);
    server.wait_ready().await;
    let mut client = server.client().await;
    let mut req = request("short-lived", 2, 64);
    req.request_id = "ttl-key".into();
    let job = client.submit_job(req.clone()).await.unwrap().into_inner();
    let mut watch = client
        .watch_job(pb::WatchJobRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    while watch.next().await.is_some() {}
    let done = client
        .get_job(pb::GetJobRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.state, pb::JobState::Succeeded as i32);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let err = client
        .get_job(pb::GetJobRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // Once expired, the idempotency key is free again: a new job runs.
    let again = client.submit_job(req).await.unwrap().into_inner();
    assert_ne!(again.job_id, job.job_id);

    let logs = server.logs();
    let job_lines: Vec<&str> = logs.lines().filter(|l| l.contains(&job.job_id)).collect();
    assert!(!job_lines.is_empty(), "no log line names the job: {logs}");
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v.get("level").is_some() && v.get("timestamp").is_some(),
            "{line}"
        );
    }
}
