//! The device side: the engine thread that runs jobs, the encoder thread that turns images into
//! bytes, the model table and cache, and the LoRA library.

pub mod encoder;
pub mod loras;
pub mod models;
pub mod thread;
