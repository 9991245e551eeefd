//! A Python client generated from the proto with grpcio-tools drives the real server.
//! `.ci/run` installs grpcio-tools into a venv and points `JHAKAAS_PYTHON` at its python;
//! without it the test says so and skips (it fails under CI, where it must run).

use jhakaas_tests::server::{fixture_model, TestServer};
use std::path::Path;
use std::process::Command;

#[tokio::test(flavor = "multi_thread")]
async fn a_python_grpcio_client_can_use_every_part_of_the_api() {
    let Some(python) = jhakaas_tests::python_or_skip("grpcio-tools") else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let stubs = jhakaas_tests::scratch_dir("python-stubs");
    let status = Command::new(&python)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(root.join("proto"))
        .arg(format!("--python_out={}", stubs.display()))
        .arg(format!("--grpc_python_out={}", stubs.display()))
        .arg(root.join("proto/jhakaas/worker/v1/worker.proto"))
        .status()
        .expect("running grpc_tools.protoc");
    assert!(status.success(), "protoc failed");

    let model = fixture_model("tiny", "sd1-tiny");
    let xl = fixture_model("xl", "sdxl-tiny");
    let server = TestServer::start(&["--model", &model, "--model", &xl]);
    server.wait_ready().await;
    let out = Command::new(&python)
        .arg(root.join("tests/python/worker_client.py"))
        .arg(&stubs)
        .arg(&server.addr)
        .output()
        .expect("running the python client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("python client OK"),
        "python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
