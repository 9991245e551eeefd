//! The HTTP face (`serve --http-listen`) through the real binary with a real HTTP client
//! (ureq): OpenAI's images API on the tiny SD 1.x fixture — models, generations (n, size,
//! seed, output format), errors in OpenAI's shape naming their `param`, auth, the body bound,
//! the job visible to gRPC, SIGTERM.

use base64::Engine as _;
use jhakaas_proto::v1 as pb;
use jhakaas_tests::server::{fixture_model, TestServer};
use serde_json::{json, Value};
use std::time::Duration;

async fn http_server(extra: &[&str]) -> TestServer {
    let model = fixture_model("tiny", "sd1-tiny");
    let mut args = vec!["--model", model.as_str(), "--http-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let server = TestServer::start(&args);
    server.wait_ready().await;
    server
}

fn url(server: &TestServer, path: &str) -> String {
    format!(
        "http://{}{path}",
        server.http_addr.as_ref().expect("--http-listen address")
    )
}

/// POSTs `body` (blocking, off the async threads); the status and the JSON answer.
async fn post(server: &TestServer, path: &str, body: Value, token: Option<&str>) -> (u16, Value) {
    let (url, token) = (url(server, path), token.map(str::to_string));
    tokio::task::spawn_blocking(move || {
        let mut req = ureq::post(&url).timeout(Duration::from_secs(120));
        if let Some(t) = token {
            req = req.set("authorization", &format!("Bearer {t}"));
        }
        let response = match req.send_json(body) {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{e}"),
        };
        let status = response.status();
        let text = response.into_string().unwrap();
        let json: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        (status, json)
    })
    .await
    .unwrap()
}

/// POSTs `body`; the status, the JSON answer and the job id / seed headers.
async fn generate(
    server: &TestServer,
    body: Value,
) -> (u16, Value, Option<String>, Option<String>) {
    let url = url(server, "/v1/images/generations");
    tokio::task::spawn_blocking(move || {
        let response = match ureq::post(&url)
            .timeout(Duration::from_secs(120))
            .send_json(body)
        {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{e}"),
        };
        let status = response.status();
        let job = response.header("x-jhakaas-job-id").map(str::to_string);
        let seed = response.header("x-jhakaas-seed").map(str::to_string);
        let json: Value = response.into_json().unwrap();
        (status, json, job, seed)
    })
    .await
    .unwrap()
}

fn images(answer: &Value) -> Vec<Vec<u8>> {
    answer["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|d| {
            base64::engine::general_purpose::STANDARD
                .decode(d["b64_json"].as_str().expect("b64_json"))
                .unwrap()
        })
        .collect()
}

/// Sends only the headers of a generations request announcing `length` bytes of body, and
/// returns the raw answer.
fn announce_only(server: &TestServer, length: usize, token: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(server.http_addr.as_ref().unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
}

fn get(server: &TestServer, path: &str, token: Option<&str>) -> (u16, String) {
    let mut req = ureq::get(&url(server, path));
    if let Some(t) = token {
        req = req.set("authorization", &format!("Bearer {t}"));
    }
    match req.call() {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_images_api_generates_and_refuses_by_param() {
    let server = http_server(&["--max-images", "2"]).await;
    assert_eq!(get(&server, "/healthz", None).0, 200);
    assert_eq!(get(&server, "/readyz", None).0, 200);
    let (status, models) = get(&server, "/v1/models", None);
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny");

    // n = 2 at a size, from a fixed seed: the same request gives the same images.
    let body = json!({"model": "tiny", "prompt": "a red square", "n": 2, "size": "64x48",
                      "seed": 7, "steps": 2, "response_format": "b64_json"});
    let (status, first, job_id, seed) = generate(&server, body.clone()).await;
    assert_eq!(status, 200, "{first}");
    assert!(first["created"].as_u64().unwrap() > 0);
    let imgs = images(&first);
    assert_eq!(imgs.len(), 2);
    let png = image::load_from_memory(&imgs[0]).unwrap();
    assert_eq!((png.width(), png.height()), (64, 48));
    assert_eq!(seed.as_deref(), Some("7"));
    let (_, again, _, _) = generate(&server, body).await;
    assert_eq!(images(&again), imgs, "same seed, same images");

    // The job is an ordinary job: gRPC's GetJob finds it, succeeded with the same seed.
    let mut client = server.client().await;
    let job = client
        .get_job(pb::GetJobRequest {
            job_id: job_id.expect("x-jhakaas-job-id"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.state, pb::JobState::Succeeded as i32);
    assert_eq!(job.seed, 7);

    // output_format=jpeg gives JPEG bytes.
    let (status, jpeg, _, _) = generate(
        &server,
        json!({"prompt": "p", "size": "64x64", "steps": 1, "output_format": "jpeg"}),
    )
    .await;
    assert_eq!(status, 200, "{jpeg}");
    assert_eq!(&images(&jpeg)[0][..2], &[0xFF, 0xD8]);

    // Refusals in OpenAI's shape, naming the field.
    for (body, code, param) in [
        (json!({"prompt": "p", "size": "big"}), 400, "size"),
        (json!({"prompt": "p", "n": 3}), 400, "n"),
        (json!({"prompt": "p", "steps": 100000}), 400, "steps"),
        (
            json!({"prompt": "p", "response_format": "url"}),
            400,
            "response_format",
        ),
        (json!({"prompt": ""}), 400, "prompt"),
        (json!({"prompt": "p", "model": "nope"}), 404, "model"),
    ] {
        let (status, answer, _, _) = generate(&server, body.clone()).await;
        assert_eq!(status, code, "{body} -> {answer}");
        assert_eq!(answer["error"]["param"], param, "{body} -> {answer}");
        assert!(
            answer["error"]["message"].as_str().unwrap().contains(param),
            "{answer}"
        );
        assert!(answer["error"]["type"].is_string(), "{answer}");
    }

    // SIGTERM drains and exits 0.
    let mut server = server;
    server.terminate();
    assert_eq!(server.wait_exit(Duration::from_secs(30)), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_and_the_body_bound_hold_over_http() {
    let dir = std::env::temp_dir().join(format!("jhakaas-http-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let server = http_server(&[
        "--auth-token-file",
        token_file.to_str().unwrap(),
        "--max-init-image-bytes",
        "1000",
    ])
    .await;
    // Health stays open; the API wants the token.
    assert_eq!(get(&server, "/healthz", None).0, 200);
    let (status, answer) = get(&server, "/v1/models", Some("wrong"));
    assert_eq!(status, 401, "{answer}");
    assert!(answer.contains("authentication_error"), "{answer}");
    assert_eq!(get(&server, "/v1/models", Some("s3cret")).0, 200);
    let body = json!({"prompt": "p", "size": "64x64", "steps": 1});
    let (status, answer) = post(&server, "/v1/images/generations", body.clone(), None).await;
    assert_eq!(status, 401, "{answer}");
    let (status, answer) = post(&server, "/v1/images/generations", body, Some("s3cret")).await;
    assert_eq!(status, 200, "{answer}");
    // A body past the bound (1000 + 64 KiB) is refused with 413 before it is read: the
    // request announces 200 kB and sends none of it, and the answer still comes.
    let answer = announce_only(&server, 200_000, "s3cret");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("request_too_large"), "{answer}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A multipart/form-data body: text fields, then files (name, bytes).
fn multipart(fields: &[(&str, &str)], files: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "jhakaas-test-boundary-7f3a";
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                .as_bytes(),
        );
    }
    for (name, bytes) in files {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}.png\"\r\nContent-Type: image/png\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

async fn edit(
    server: &TestServer,
    fields: &[(&str, &str)],
    files: &[(&str, &[u8])],
) -> (u16, Value) {
    let url = url(server, "/v1/images/edits");
    let (content_type, body) = multipart(fields, files);
    tokio::task::spawn_blocking(move || {
        let response = match ureq::post(&url)
            .timeout(Duration::from_secs(120))
            .set("content-type", &content_type)
            .send_bytes(&body)
        {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{e}"),
        };
        (response.status(), response.into_json().unwrap())
    })
    .await
    .unwrap()
}

fn png(image: image::DynamicImage) -> Vec<u8> {
    let mut out = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn an_edit_is_the_inpainting_of_its_transparent_pixels() {
    let server = http_server(&[]).await;
    let init = image::RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 4) as u8, 128])
    });
    // OpenAI's mask: transparent = repaint (the left half); the engine's: white = repaint.
    let rgba_mask = image::RgbaImage::from_fn(64, 64, |x, _| {
        image::Rgba([0, 0, 0, if x < 32 { 0 } else { 255 }])
    });
    let engine_mask =
        image::GrayImage::from_fn(64, 64, |x, _| image::Luma([if x < 32 { 255 } else { 0 }]));
    let (init_png, mask_png) = (png(init.clone().into()), png(rgba_mask.clone().into()));
    let fields = [
        ("prompt", "a cat"),
        ("steps", "2"),
        ("seed", "9"),
        ("model", "tiny"),
    ];
    let (status, answer) = edit(
        &server,
        &fields,
        &[("image", &init_png), ("mask", &mask_png)],
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let over_http = image::load_from_memory(&images(&answer)[0])
        .unwrap()
        .to_rgb8();
    assert_eq!(
        over_http.dimensions(),
        (64, 64),
        "the output is the image's size"
    );

    // The same inpainting over gRPC, with the engine's mask.
    let mut client = server.client().await;
    let mut stream = client
        .generate(pb::GenerateRequest {
            model: "tiny".into(),
            prompt: "a cat".into(),
            steps: 2,
            seed: Some(9),
            width: 64,
            height: 64,
            init_image: init_png.clone(),
            mask: png(engine_mask.into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut over_grpc = None;
    while let Some(event) = stream.message().await.unwrap() {
        if let Some(pb::job_event::Event::Completed(c)) = event.event {
            over_grpc = Some(
                image::load_from_memory(&c.images[0].data)
                    .unwrap()
                    .to_rgb8(),
            );
        }
    }
    assert_eq!(
        Some(over_http.clone()),
        over_grpc,
        "an edit is the inpainting of its mask"
    );

    // No mask: the image's own transparent pixels are the mask.
    let mut transparent = image::RgbaImage::from_fn(64, 64, |x, y| {
        let p = init.get_pixel(x, y);
        image::Rgba([p[0], p[1], p[2], 255])
    });
    for (x, _, p) in transparent.enumerate_pixels_mut() {
        if x < 32 {
            p[3] = 0;
        }
    }
    let (status, answer) = edit(&server, &fields, &[("image", &png(transparent.into()))]).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["data"].as_array().unwrap().len(), 1);

    // Refusals name the field.
    let (status, answer) = edit(&server, &fields, &[("mask", &mask_png)]).await;
    assert_eq!(
        (status, answer["error"]["param"].as_str()),
        (400, Some("image")),
        "{answer}"
    );
    let (status, answer) = edit(&server, &fields, &[("image", b"not an image")]).await;
    assert_eq!(
        (status, answer["error"]["param"].as_str()),
        (400, Some("image")),
        "{answer}"
    );
    let (status, answer) = edit(
        &server,
        &[("prompt", "p"), ("steps", "many")],
        &[("image", &init_png)],
    )
    .await;
    assert_eq!(
        (status, answer["error"]["param"].as_str()),
        (400, Some("steps")),
        "{answer}"
    );
}
