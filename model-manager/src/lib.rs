//! # jhakaas-model-manager
//!
//! Everything with tensors: resolving a model's files ([`source`]), parsing its diffusers
//! configs ([`config`]), the text encoder ([`clip`]), UNet ([`unet`]), VAE ([`vae`]),
//! schedulers ([`scheduler`]), seeded noise ([`noise`]), the denoising pipeline ([`pipeline`])
//! and image encoding ([`image_io`]). No gRPC and no async runtime here: callers hand it
//! [`GenerateParams`] and get [`Generation`]s and [`Progress`] events back.

pub mod clip;
pub mod config;
pub mod controlnet;
pub mod device;
pub mod error;
pub mod family;
pub mod fetch;
pub mod image_io;
pub mod inpaint;
pub mod kernels;
pub mod layers;
pub mod lora;
pub mod mapped;
pub mod noise;
pub mod params;
pub mod pipeline;
mod replay;
pub mod scheduler;
pub mod sharing;
pub mod source;
pub mod text;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

/// The device type callers hold to choose where models run.
pub use candle_core::Device;
pub use device::DeviceChoice;
pub use error::{Error, Result};
pub use noise::RngKind;
pub use params::{
    GenerateParams, GeneratedImage, Generation, HostTensor, ImageFormat, InitImage, ModelDefaults,
    NoiseReplay, Progress, ResolvedParams, ResolvedSizeConditioning, SizeConditioning,
    StageTimings,
};
pub use pipeline::{LoadOptions, StableDiffusionPipeline};
pub use scheduler::SchedulerKind;
pub use source::ModelSource;
