//! The gRPC face: the Worker service over the job store seam (`job::backend`), every protobuf
//! conversion and status mapping, and the request fuzzers. Nothing below this folder sees a
//! proto or tonic type.

pub mod convert;
#[cfg(test)]
mod convert_fuzz;
pub mod job_wire;
pub mod service;
