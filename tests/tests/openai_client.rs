//! The official `openai` Python client drives the HTTP face of the real server
//! (`tests/python/openai_client.py`). `.ci/run` installs `openai` into its venv and points
//! `JHAKAAS_PYTHON` at it; without it the test says so and skips (it fails under CI, where it
//! must run).

use jhakaas_tests::server::{fixture_model, TestServer};
use std::path::Path;
use std::process::Command;

#[tokio::test(flavor = "multi_thread")]
async fn the_openai_python_client_uses_the_http_face() {
    let Some(python) = jhakaas_tests::python_or_skip("openai") else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = jhakaas_tests::scratch_dir("openai-client");
    let token = dir.join("token");
    std::fs::write(&token, "s3cret").unwrap();
    let model = fixture_model("tiny", "sd1-tiny");
    let mut server = TestServer::start(&[
        "--model",
        &model,
        "--http-listen",
        "127.0.0.1:0",
        "--max-images",
        "2",
        "--max-queue",
        "2",
        "--auth-token-file",
        token.to_str().unwrap(),
    ]);
    server.wait_ready().await;
    let base = format!("http://{}/v1", server.http_addr.as_ref().unwrap());
    let out = Command::new(&python)
        .arg(root.join("tests/python/openai_client.py"))
        .args([&base, "s3cret"])
        .output()
        .expect("running the openai client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("openai client OK"),
        "openai client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.terminate();
    assert_eq!(
        server.wait_exit(std::time::Duration::from_secs(30)),
        Some(0)
    );
}
