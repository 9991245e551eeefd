//! The Jhakaas worker gRPC contract, package `jhakaas.worker.v1`, generated from
//! `proto/jhakaas/worker/v1/worker.proto` at build time without a system `protoc`.

#![allow(clippy::all, missing_docs)]

/// Generated messages, client and server for `jhakaas.worker.v1`.
pub mod v1 {
    tonic::include_proto!("jhakaas.worker.v1");
}

/// Encoded `FileDescriptorSet` of the worker API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/worker_descriptor.bin"));
