//! With the `cuda` feature, compiles our CUDA kernels (`cuda/*.cu`) to PTX with nvcc for
//! `CUDA_COMPUTE_CAP` (default 80); the engine loads them at run time. Without it, nothing.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: &[&str] = &["attention", "group_norm", "geglu"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for k in KERNELS {
        println!("cargo:rerun-if-changed=cuda/{k}.cu");
    }
    println!("cargo:rerun-if-changed=cuda/common.cuh");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        // Nothing to compile, so the CUDA variables must not rebuild the CPU crate either
        // (the image recipe sets CUDA_COMPUTE_CAP; CI builds the CPU binary without it).
        return;
    }
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_ROOT");
    println!("cargo:rerun-if-env-changed=NVCC");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap = cap.replace('.', "");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| match std::env::var("CUDA_ROOT") {
        Ok(root) if PathBuf::from(&root).join("bin/nvcc").exists() => format!("{root}/bin/nvcc"),
        _ => "nvcc".into(),
    });
    for k in KERNELS {
        let ptx = out.join(format!("{k}.ptx"));
        let status = Command::new(&nvcc)
            .args([
                "--ptx",
                "-O3",
                "-std=c++17",
                &format!("-arch=compute_{cap}"),
            ])
            .arg(format!("cuda/{k}.cu"))
            .arg("-o")
            .arg(&ptx)
            .status()
            .unwrap_or_else(|e| panic!("cannot run `{nvcc}` to build cuda/{k}.cu: {e}"));
        assert!(status.success(), "nvcc failed on cuda/{k}.cu");
    }
}
