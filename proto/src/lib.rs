//! The Jhakaas worker gRPC contract, package `jhakaas.worker.v1`, generated from
//! `proto/jhakaas/worker/v1/worker.proto` at build time without a system `protoc`.

#![allow(clippy::all, missing_docs)]

pub mod codec;

/// Generated messages, client and server for `jhakaas.worker.v1`.
pub mod v1 {
    tonic::include_proto!("jhakaas.worker.v1");
}

/// Encoded `FileDescriptorSet` of the worker API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/worker_descriptor.bin"));

#[cfg(test)]
mod tests {
    use prost::Message;

    /// The codec treats exactly the RPC input types as requests.
    #[test]
    fn the_codec_knows_every_request_type() {
        let fds = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).unwrap();
        let mut inputs: Vec<String> = fds
            .file
            .iter()
            .flat_map(|f| &f.service)
            .flat_map(|s| &s.method)
            .map(|m| m.input_type().rsplit('.').next().unwrap().to_string())
            .collect();
        inputs.sort();
        inputs.dedup();
        let mut known: Vec<String> = super::codec::REQUEST_TYPES
            .iter()
            .map(|s| s.to_string())
            .collect();
        known.sort();
        assert_eq!(inputs, known);
    }

    /// The compiled contract has exactly the service and methods DESIGN.md names, with the
    /// streaming shape each one promises.
    #[test]
    fn descriptor_matches_the_api_contract() {
        let fds = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).unwrap();
        let file = fds
            .file
            .iter()
            .find(|f| f.package() == "jhakaas.worker.v1")
            .expect("package jhakaas.worker.v1");
        let service = file
            .service
            .iter()
            .find(|s| s.name() == "Worker")
            .expect("service Worker");
        let methods: Vec<(&str, bool)> = service
            .method
            .iter()
            .map(|m| (m.name(), m.server_streaming()))
            .collect();
        assert_eq!(
            methods,
            vec![
                ("Generate", true),
                ("SubmitJob", false),
                ("GetJob", false),
                ("WatchJob", true),
                ("CancelJob", false),
                ("ListModels", false),
                ("ListLoras", false),
            ]
        );
        let request = file
            .message_type
            .iter()
            .find(|m| m.name() == "GenerateRequest")
            .unwrap();
        let fields: Vec<&str> = request.field.iter().map(|f| f.name()).collect();
        for name in [
            "request_id",
            "model",
            "prompt",
            "negative_prompt",
            "width",
            "height",
            "steps",
            "guidance_scale",
            "seed",
            "num_images",
            "scheduler",
            "output_format",
            "init_image",
            "strength",
            "loras",
        ] {
            assert!(fields.contains(&name), "GenerateRequest lacks {name}");
        }
    }
}
