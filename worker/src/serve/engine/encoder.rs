//! The image encoder thread: encodes a job's images (PNG/JPEG/WebP with their parameters)
//! and completes the job, while the engine thread already runs the next one, so the device
//! never waits on an encoder.

use super::thread::finish;
use crate::serve::job::source::JobSource;
use crate::serve::job::store::{EncodedImage, Job, JobEvent, JobTimings};
use jhakaas_model_manager::image_io::{encode_image, parameters_text};
use jhakaas_model_manager::{Error, Generation};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

type Work = (Arc<Job>, Generation, JobTimings);

/// The encoder thread and the one-slot channel to it.
pub struct Encoder {
    tx: mpsc::SyncSender<Work>,
    thread: std::thread::JoinHandle<()>,
    source: Arc<dyn JobSource>,
}

impl Encoder {
    /// Starts the thread; it ends each job it encodes and tells `source` it is done.
    pub fn spawn(source: Arc<dyn JobSource>) -> std::io::Result<Encoder> {
        let (tx, rx) = mpsc::sync_channel::<Work>(1);
        let done = source.clone();
        let thread = std::thread::Builder::new()
            .name("jhakaas-encode".into())
            .spawn(move || {
                for (job, generation, timings) in rx {
                    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        encode(&job, &generation, timings)
                    }));
                    if run.is_err() {
                        tracing::error!(job_id = %job.id, "the image encoder panicked");
                        let reason = "internal error: encoding the images panicked".to_string();
                        let timings = job.timings_so_far(timings.queue);
                        finish(&job, JobEvent::Failed { reason, timings }, "failed");
                    }
                    done.done(&job);
                }
            })?;
        Ok(Encoder { tx, thread, source })
    }

    /// Hands a generated job over; blocks while the previous one is still waiting.
    pub fn submit(&self, job: Arc<Job>, generation: Generation, timings: JobTimings) {
        if let Err(mpsc::SendError((job, generation, timings))) =
            self.tx.send((job, generation, timings))
        {
            // The thread is gone (it only ends with the channel): encode here instead.
            encode(&job, &generation, timings);
            self.source.done(&job);
        }
    }

    /// Encodes what is left, then stops the thread.
    pub fn finish(self) {
        drop(self.tx);
        let _ = self.thread.join();
    }
}

/// Encodes the images in the requested format (with their parameters) and completes the job.
fn encode(job: &Job, generation: &Generation, mut timings: JobTimings) {
    let encode_started = Instant::now();
    let request = &job.request;
    let (prompt, negative) = (
        &request.params.prompt,
        request.params.negative_prompt.as_deref(),
    );
    let images: Result<Vec<EncodedImage>, Error> = generation
        .images
        .iter()
        .map(|img| {
            let mut text = parameters_text(
                prompt,
                negative,
                &generation.params,
                img.seed,
                &request.model,
            );
            if !request.loras.is_empty() {
                let loras: Vec<String> = request
                    .loras
                    .iter()
                    .map(|l| format!("{}:{}", l.name(), l.weight))
                    .collect();
                text.push_str(&format!(", Lora: {}", loras.join(" ")));
            }
            Ok(EncodedImage {
                data: encode_image(&img.image, request.format, &text)?,
                mime_type: request.format.mime_type(),
                width: img.image.width(),
                height: img.image.height(),
                seed: img.seed,
            })
        })
        .collect();
    timings.image_encode = encode_started.elapsed();
    timings.total = job.submitted.elapsed();
    match images {
        Ok(images) => {
            tracing::info!(total = ?timings.total, "job succeeded");
            let images = Arc::new(images);
            finish(job, JobEvent::Completed { images, timings }, "succeeded");
        }
        Err(e) => {
            let reason = e.to_string();
            finish(job, JobEvent::Failed { reason, timings }, "failed");
        }
    }
}
