//! Helpers for the end-to-end tests: where the fixtures are, how to run the real
//! `jhakaas-worker` binary, and how to compare images the way the parity criterion is stated
//! (mean and max absolute difference on 0–255).

pub mod cases;
pub mod hostile;
pub mod postgres;
pub mod server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The python of `JHAKAAS_PYTHON` (a venv with the clients the cross-language tests run:
/// grpcio-tools, openai), or `None` with a note that the test is skipped. Under CI (`CI` set)
/// it must be there: `.ci/run` installs it.
pub fn python_or_skip(what: &str) -> Option<std::ffi::OsString> {
    let python = std::env::var_os("JHAKAAS_PYTHON");
    if python.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must set JHAKAAS_PYTHON (see .ci/run)"
        );
        eprintln!("skipped: set JHAKAAS_PYTHON to a python with {what} to run this test");
    }
    python
}

/// `tests/fixtures` of this repository.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Path of the `jhakaas-worker` binary of this build. `cargo test --workspace` builds it next
/// to the test executables; when it is missing, or older than any source it is built from
/// (`cargo test -p jhakaas-tests` alone does not rebuild it), it is built first with the same
/// cargo and profile, so the tests never exercise a stale binary. `JHAKAAS_WORKER_BIN` names
/// another binary to test instead.
pub fn worker_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("JHAKAAS_WORKER_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>/deps");
        let bin = profile_dir.join(format!("jhakaas-worker{}", std::env::consts::EXE_SUFFIX));
        let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
        if built.is_none_or(|t| t < newest_worker_source()) {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "-p", "jhakaas-worker", "--bin", "jhakaas-worker"]);
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("running cargo build");
            assert!(status.success(), "building jhakaas-worker failed");
        }
        bin
    })
    .clone()
}

/// Modification time of the newest file the worker binary is built from.
fn newest_worker_source() -> std::time::SystemTime {
    fn walk(dir: &Path, newest: &mut std::time::SystemTime) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, newest);
            } else if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                *newest = (*newest).max(t);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    for crate_dir in ["worker", "model-manager", "proto"] {
        for part in ["src", "Cargo.toml", "build.rs", "jhakaas", "migrations"] {
            let p = root.join(crate_dir).join(part);
            if p.is_dir() {
                walk(&p, &mut newest);
            } else if let Ok(t) = std::fs::metadata(&p).and_then(|m| m.modified()) {
                newest = newest.max(t);
            }
        }
    }
    for f in ["Cargo.toml", "Cargo.lock"] {
        if let Ok(t) = std::fs::metadata(root.join(f)).and_then(|m| m.modified()) {
            newest = newest.max(t);
        }
    }
    newest
}

/// Runs the worker binary with `args`, returning its output.
pub fn run_worker<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(worker_binary())
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("spawning jhakaas-worker")
}

/// Mean and max absolute per-channel difference of two RGB8 images of equal size.
pub fn image_diff(a: &image::RgbImage, b: &image::RgbImage) -> (f64, u8) {
    assert_eq!(a.dimensions(), b.dimensions(), "image sizes differ");
    let mut sum = 0u64;
    let mut max = 0u8;
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        sum += d as u64;
        max = max.max(d);
    }
    (sum as f64 / a.as_raw().len() as f64, max)
}

/// A fresh, empty directory under the system temp dir for one test.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("jhakaas-tests-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating scratch dir");
    dir
}

/// The commit the fake HF cache entries are recorded at.
pub const FAKE_COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Lays a fixture pipeline out under `hub` exactly as huggingface_hub caches `repo`
/// (`models--org--name/{refs/main, snapshots/<commit>/…, blobs/…}` with symlinks).
pub fn lay_out_hf_cache(hub: &Path, repo: &str, fixture: &str) {
    let repo_dir = hub.join(format!("models--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), FAKE_COMMIT).unwrap();
    let blobs = repo_dir.join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    link_tree(
        &fixtures().join("models").join(fixture),
        &repo_dir.join("snapshots").join(FAKE_COMMIT),
        &blobs,
        &mut 0,
    );
}

fn link_tree(from: &Path, to: &Path, blobs: &Path, n: &mut usize) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let path = e.path();
        if path.is_dir() {
            link_tree(&path, &to.join(e.file_name()), blobs, n);
        } else {
            *n += 1;
            let blob = blobs.join(format!("blob{n:04}"));
            std::fs::copy(&path, &blob).unwrap();
            std::os::unix::fs::symlink(&blob, to.join(e.file_name())).unwrap();
        }
    }
}
