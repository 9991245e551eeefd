//! A bounded fuzz of the real server over gRPC: random hostile requests (and random bytes that
//! are no protobuf at all) never get INTERNAL or UNKNOWN, and the server is healthy and serving
//! afterwards. `JHAKAAS_GRPC_FUZZ_CASES` sets the number of requests.

use jhakaas_proto::v1 as pb;
use jhakaas_tests::hostile::{request, Rng};
use jhakaas_tests::server::{fixture_model, TestServer};
use tonic::Code;

/// Any message body: random bytes behind the `GenerateRequest` path.
#[derive(Clone, PartialEq, prost::Message)]
struct Junk {
    #[prost(bytes = "vec", tag = "1")]
    a: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    prompt: Vec<u8>,
    #[prost(bytes = "vec", tag = "5")]
    width: Vec<u8>,
    #[prost(bytes = "vec", tag = "15")]
    size_conditioning: Vec<u8>,
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_requests_over_grpc_get_no_internal_error_and_the_server_keeps_serving() {
    let cases: u64 = std::env::var("JHAKAAS_GRPC_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let model = fixture_model("tiny", "sd1-tiny");
    let server = TestServer::start(&[
        "--model",
        model.as_str(),
        "--max-pixels",
        "16384",
        "--max-steps",
        "4",
        "--max-images",
        "2",
        "--max-queue",
        "8",
    ]);
    server.wait_ready().await;
    let mut client = server.client().await;
    let png = std::fs::read(jhakaas_tests::fixtures().join("reference/init.png")).unwrap();
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut codes = std::collections::BTreeMap::new();
    for case in 0..cases {
        let req = request(&mut rng, &png);
        let shown = format!(
            "{:?}",
            pb::GenerateRequest {
                init_image: Vec::new(),
                ..req.clone()
            }
        );
        let code = match client.submit_job(req).await {
            Ok(job) => {
                // Keep the queue short: cancel what was accepted.
                let _ = client
                    .cancel_job(pb::CancelJobRequest {
                        job_id: job.into_inner().job_id,
                    })
                    .await;
                Code::Ok
            }
            Err(s) => {
                assert!(
                    !matches!(s.code(), Code::Internal | Code::Unknown | Code::Unavailable),
                    "case {case}: {s:?} for {shown}"
                );
                s.code()
            }
        };
        *codes.entry(format!("{code:?}")).or_insert(0u64) += 1;
    }
    // Bytes that are not a GenerateRequest at all.
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    for case in 0..cases / 3 {
        let mut bytes = |n: u64| {
            (0..rng.below(n))
                .map(|_| rng.bits() as u8)
                .collect::<Vec<u8>>()
        };
        let junk = Junk {
            a: bytes(40),
            prompt: bytes(40),
            width: bytes(12),
            size_conditioning: bytes(24),
        };
        grpc.ready().await.unwrap();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(
            "/jhakaas.worker.v1.Worker/SubmitJob",
        );
        let codec = tonic_prost::ProstCodec::<Junk, pb::Job>::default();
        if let Err(s) = grpc.unary(tonic::Request::new(junk), path, codec).await {
            assert!(
                !matches!(s.code(), Code::Internal | Code::Unknown | Code::Unavailable),
                "junk case {case}: {s:?}"
            );
            *codes.entry(format!("junk {:?}", s.code())).or_insert(0u64) += 1;
        }
    }
    eprintln!("gRPC fuzz: {codes:?}");
    assert_eq!(server.health("jhakaas.worker.v1.Worker").await.unwrap(), 1);
    let mut ok = request(&mut Rng(1), &png);
    ok = pb::GenerateRequest {
        prompt: "a red cube".into(),
        model: "tiny".into(),
        width: 0,
        height: 0,
        steps: 2,
        num_images: 1,
        init_image: Vec::new(),
        strength: 0.0,
        size_conditioning: None,
        guidance_scale: 0.0,
        scheduler: String::new(),
        output_format: 0,
        request_id: String::new(),
        negative_prompt: String::new(),
        ..ok
    };
    let events: Vec<_> =
        tokio_stream::StreamExt::collect::<Vec<_>>(client.generate(ok).await.unwrap().into_inner())
            .await;
    assert!(
        matches!(
            events.last(),
            Some(Ok(pb::JobEvent {
                event: Some(pb::job_event::Event::Completed(_)),
                ..
            }))
        ),
        "{events:?}"
    );
}
