//! The gRPC face: the Worker service, the store seam it calls, every protobuf conversion and
//! status mapping, and the request fuzzers. Nothing below this folder sees a proto or tonic type.

pub mod backend;
pub mod convert;
#[cfg(test)]
mod convert_fuzz;
pub mod service;
