//! Compiles `jhakaas/worker/v1/worker.proto` with protox (pure Rust, no system `protoc`) and
//! generates the tonic client and server plus a file descriptor set for server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "jhakaas/worker/v1/worker.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("worker_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_transport(false)
        .codec_path("crate::codec::ArgumentCodec")
        .compile_fds(fds)?;
    Ok(())
}
