//! The engine thread: the one OS thread that owns the device and the loaded models. It warms
//! the default models, then takes jobs from the store in order and runs them, turning engine
//! progress into job events and checking for cancellation and deadlines between steps.

use super::jobs::{EncodedImage, Job, JobEvent, JobStore, JobTimings};
use super::models::{LoadedModels, ModelTable};
use jhakaas_model_manager::image_io::{encode_image, parameters_text};
use jhakaas_model_manager::Error;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Exit code when the device fails in a way the process cannot recover from.
pub const EXIT_DEVICE_FAILURE: i32 = 70;

/// Starts the engine thread. `on_ready` is called once every model in `warm` is loaded and
/// has produced one image (or failed to: then readiness is never reported).
pub fn spawn(
    store: Arc<JobStore>,
    table: Arc<ModelTable>,
    device: jhakaas_model_manager::Device,
    max_loaded: usize,
    memory_budget: Option<u64>,
    warm: Vec<String>,
    on_ready: Box<dyn FnOnce() + Send>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("jhakaas-engine".into()).spawn(move || {
        let mut models = LoadedModels::new(table, device, max_loaded, memory_budget);
        let mut ready = true;
        for name in &warm {
            if let Err(e) = warm_up(&mut models, name) {
                tracing::error!(model = %name, error = %e, "warm-up failed; the worker will not report ready");
                ready = false;
            }
        }
        if ready {
            on_ready();
        }
        while let Some(job) = store.next() {
            run_job(&store, &mut models, &job);
            store.done(&job);
        }
        tracing::info!("engine thread stopped");
    })
}

/// Loads `name` and runs the engine's warm-up (one step of the smallest image, every stage).
fn warm_up(models: &mut LoadedModels, name: &str) -> Result<(), String> {
    let started = Instant::now();
    let pipeline = models.get(name)?;
    let loaded = started.elapsed();
    let generation = pipeline.warm_up().map_err(|e| e.to_string())?;
    tracing::info!(model = %name, ?loaded, ?generation, "model warmed up");
    Ok(())
}

fn deadline_passed(job: &Job) -> bool {
    job.request.deadline.is_some_and(|d| Instant::now() >= d)
}

fn cancelled_reason(job: &Job) -> Option<String> {
    if job.cancel_requested() {
        Some(job.cancel_reason())
    } else if deadline_passed(job) {
        Some("deadline exceeded".into())
    } else {
        None
    }
}

fn run_job(store: &JobStore, models: &mut LoadedModels, job: &Arc<Job>) {
    let queue_wait = job.submitted.elapsed();
    metrics::histogram!("jhakaas_queue_wait_seconds").record(queue_wait.as_secs_f64());
    let span = tracing::info_span!("job", job_id = %job.id, model = %job.request.model);
    let _enter = span.enter();

    let finish = |event: JobEvent, outcome: &'static str| {
        metrics::counter!("jhakaas_jobs_total", "outcome" => outcome).increment(1);
        metrics::histogram!("jhakaas_job_duration_seconds")
            .record(job.submitted.elapsed().as_secs_f64());
        job.emit(event);
    };
    if let Some(reason) = cancelled_reason(job) {
        finish(
            JobEvent::Cancelled {
                reason,
                timings: job.timings_so_far(queue_wait),
            },
            "cancelled",
        );
        return;
    }
    let name = &job.request.model;
    if !models.is_loaded(name) {
        job.emit(JobEvent::ModelLoading {
            model: name.clone(),
        });
    }
    let pipeline = match models.get(name) {
        Ok(p) => p,
        Err(reason) => {
            finish(
                JobEvent::Failed {
                    reason,
                    timings: job.timings_so_far(queue_wait),
                },
                "failed",
            );
            return;
        }
    };
    job.emit(JobEvent::Started);
    tracing::info!("job started");

    let mut last_step = Instant::now();
    let request = &job.request;
    let result = pipeline.generate_within(&request.params, &request.limits, &mut |p| {
        metrics::histogram!("jhakaas_step_duration_seconds")
            .record(last_step.elapsed().as_secs_f64());
        last_step = Instant::now();
        job.emit(JobEvent::Progress(*p));
        if cancelled_reason(job).is_some() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    let mut timings = JobTimings {
        queue: queue_wait,
        ..Default::default()
    };
    match result {
        Ok(generation) => {
            timings.text_encode = generation.timings.text_encode;
            timings.denoise = generation.timings.denoise;
            timings.decode = generation.timings.decode;
            let encode_started = Instant::now();
            let prompt = &job.request.params.prompt;
            let negative = job.request.params.negative_prompt.as_deref();
            let images: Result<Vec<EncodedImage>, Error> = generation
                .images
                .iter()
                .map(|img| {
                    let text =
                        parameters_text(prompt, negative, &generation.params, img.seed, name);
                    Ok(EncodedImage {
                        data: encode_image(&img.image, job.request.format, &text)?,
                        mime_type: job.request.format.mime_type(),
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
                    finish(
                        JobEvent::Completed {
                            images: Arc::new(images),
                            timings,
                        },
                        "succeeded",
                    );
                }
                Err(e) => finish(
                    JobEvent::Failed {
                        reason: e.to_string(),
                        timings,
                    },
                    "failed",
                ),
            }
        }
        Err(Error::Cancelled) => {
            timings.total = job.submitted.elapsed();
            let reason = cancelled_reason(job).unwrap_or_else(|| "cancelled".into());
            tracing::info!(%reason, "job cancelled");
            finish(JobEvent::Cancelled { reason, timings }, "cancelled");
        }
        Err(e) => {
            timings.total = job.submitted.elapsed();
            let fatal = is_fatal_device_error(&e);
            tracing::error!(error = %e, fatal, "job failed");
            finish(
                JobEvent::Failed {
                    reason: e.to_string(),
                    timings,
                },
                "failed",
            );
            if fatal {
                tracing::error!(
                    "the device is in an unrecoverable state; exiting so the pod restarts"
                );
                store.close();
                std::thread::sleep(Duration::from_millis(200));
                std::process::exit(EXIT_DEVICE_FAILURE);
            }
        }
    }
}

/// CUDA errors other than out-of-memory leave the context unusable.
fn is_fatal_device_error(e: &Error) -> bool {
    let msg = e.to_string();
    msg.contains("CUDA_ERROR") && !msg.contains("OUT_OF_MEMORY")
}
