//! The engine thread: the one OS thread that owns the device and the loaded models. It warms
//! the default models, then takes jobs from the store in order and runs them, turning engine
//! progress into job events and checking for cancellation and deadlines between steps. It
//! does device work only: images are encoded on the encoder thread (`encoder.rs`).

use super::encoder;
use super::models::{LoadedModels, ModelTable};
use crate::serve::job::source::JobSource;
use crate::serve::job::store::{Job, JobEvent, JobTimings};
use jhakaas_model_manager::controlnet::ControlNetModel;
use jhakaas_model_manager::{Error, Generation, StableDiffusionPipeline};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Exit code when the engine cannot go on (an unrecoverable device error, or a panic): the
/// pod restarts.
pub const EXIT_DEVICE_FAILURE: i32 = 70;

/// Test-only hook: a job whose prompt is this variable's value panics inside the engine, so the
/// end-to-end tests can check the supervision below. Unset in every deployment.
const PANIC_HOOK_ENV: &str = "JHAKAAS_TEST_PANIC_PROMPT";

/// What the engine thread needs besides the store and the model table.
pub struct EngineConfig {
    /// The device every model runs on.
    pub device: jhakaas_model_manager::Device,
    /// Most models loaded at once.
    pub max_loaded: usize,
    /// Most bytes of weights loaded at once.
    pub memory_budget: Option<u64>,
    /// Models loaded and warmed before the worker reports ready.
    pub warm: Vec<String>,
    /// Called once every model in `warm` is warmed (never, if one fails).
    pub on_ready: Box<dyn FnOnce() + Send>,
    /// Called when the engine is about to exit the process (health turns NOT_SERVING).
    pub on_fatal: Box<dyn Fn() + Send>,
}

/// Starts the engine thread: it warms `config.warm`, then runs the store's jobs in order. A
/// panic inside a job fails that job with the reason, reports the engine unhealthy and exits
/// the process with [`EXIT_DEVICE_FAILURE`], so no job is left hanging behind a dead engine.
pub fn spawn(
    store: Arc<dyn JobSource>,
    table: Arc<ModelTable>,
    config: EngineConfig,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("jhakaas-engine".into()).spawn(move || {
        let EngineConfig {
            device,
            max_loaded,
            memory_budget,
            warm,
            on_ready,
            on_fatal,
        } = config;
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
        let panic_prompt = std::env::var(PANIC_HOOK_ENV).ok();
        // Images are encoded on their own thread while the engine runs the next job; the
        // one-slot channel holds the engine back when encoding falls behind.
        let encoder = match encoder::Encoder::spawn(store.clone()) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the image encoder thread");
                on_fatal();
                std::process::exit(EXIT_DEVICE_FAILURE);
            }
        };
        while let Some(job) = store.next() {
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if panic_prompt.as_deref() == Some(job.request.params.prompt.as_str()) {
                    panic!("{PANIC_HOOK_ENV} matched the prompt");
                }
                run_job(&mut models, &job)
            }));
            let fatal = match run {
                Ok(Outcome::Generated(generation, timings)) => {
                    encoder.submit(job, *generation, timings);
                    continue;
                }
                Ok(Outcome::Ended { fatal }) => fatal,
                Err(payload) => {
                    let what = panic_message(payload.as_ref());
                    tracing::error!(job_id = %job.id, panic = %what, "the engine panicked");
                    job.emit(JobEvent::Failed {
                        reason: format!("internal error: the engine panicked ({what})"),
                        timings: job.timings_so_far(job.submitted.elapsed()),
                    });
                    metrics::counter!("jhakaas_jobs_total", "outcome" => "failed").increment(1);
                    true
                }
            };
            store.done(&job);
            if fatal {
                tracing::error!("the engine cannot go on; exiting so the pod restarts");
                on_fatal();
                store.close();
                std::thread::sleep(Duration::from_millis(200));
                std::process::exit(EXIT_DEVICE_FAILURE);
            }
        }
        // Every generated job is encoded and ended before the engine reports stopped.
        encoder.finish();
        tracing::info!("engine thread stopped");
    })
}

/// The text of a panic payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "no message".into())
}

/// Loads `name` and runs the engine's warm-up (one step of the smallest image, every stage).
fn warm_up(models: &mut LoadedModels, name: &str) -> Result<(), String> {
    let started = Instant::now();
    let pipeline = models.get(name, &[])?;
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

/// How a job left the engine.
enum Outcome {
    /// Images were generated; encoding them ends the job.
    Generated(Box<Generation>, JobTimings),
    /// The job ended (cancelled, failed); `fatal` when the device is beyond recovery.
    Ended { fatal: bool },
}

/// Ends `job` with its terminal `event`, counting it by `outcome`.
pub(super) fn finish(job: &Job, event: JobEvent, outcome: &'static str) {
    metrics::counter!("jhakaas_jobs_total", "outcome" => outcome).increment(1);
    metrics::histogram!("jhakaas_job_duration_seconds")
        .record(job.submitted.elapsed().as_secs_f64());
    job.emit(event);
}

/// Runs one job up to its images, or to its terminal event if it ends sooner.
fn run_job(models: &mut LoadedModels, job: &Arc<Job>) -> Outcome {
    const ENDED: Outcome = Outcome::Ended { fatal: false };
    let queue_wait = job.submitted.elapsed();
    metrics::histogram!("jhakaas_queue_wait_seconds").record(queue_wait.as_secs_f64());
    let span = tracing::info_span!("job", job_id = %job.id, model = %job.request.model);
    let _enter = span.enter();
    if let Some(reason) = cancelled_reason(job) {
        let timings = job.timings_so_far(queue_wait);
        finish(job, JobEvent::Cancelled { reason, timings }, "cancelled");
        return ENDED;
    }
    let name = &job.request.model;
    let loras = &job.request.loras;
    if !models.is_loaded(name, loras) {
        job.emit(JobEvent::ModelLoading {
            model: name.clone(),
        });
    }
    let pipeline = match models.get(name, loras) {
        Ok(p) => p,
        Err(reason) => {
            let timings = job.timings_so_far(queue_wait);
            finish(job, JobEvent::Failed { reason, timings }, "failed");
            return ENDED;
        }
    };
    let names: Vec<String> = job
        .request
        .params
        .controlnets
        .iter()
        .map(|c| c.name.clone())
        .collect();
    let nets = match models.get_controlnets(&names, name, loras, &pipeline) {
        Ok(nets) => nets,
        Err(reason) => {
            let timings = job.timings_so_far(queue_wait);
            finish(job, JobEvent::Failed { reason, timings }, "failed");
            return ENDED;
        }
    };
    job.emit(JobEvent::Started);
    tracing::info!("job started");
    let mut timings = JobTimings {
        queue: queue_wait,
        ..Default::default()
    };
    match denoise(job, &pipeline, &nets) {
        Ok(generation) => {
            timings.text_encode = generation.timings.text_encode;
            timings.denoise = generation.timings.denoise;
            timings.decode = generation.timings.decode;
            Outcome::Generated(Box::new(generation), timings)
        }
        Err(Error::Cancelled) => {
            timings.total = job.submitted.elapsed();
            let reason = cancelled_reason(job).unwrap_or_else(|| "cancelled".into());
            tracing::info!(%reason, "job cancelled");
            finish(job, JobEvent::Cancelled { reason, timings }, "cancelled");
            ENDED
        }
        Err(e) => {
            timings.total = job.submitted.elapsed();
            let fatal = e.is_device_fatal();
            tracing::error!(error = %e, fatal, "job failed");
            let reason = e.to_string();
            finish(job, JobEvent::Failed { reason, timings }, "failed");
            Outcome::Ended { fatal }
        }
    }
}

/// The generation itself, streaming one progress event per step and stopping at the next step
/// once the job is cancelled or its deadline passes.
fn denoise(
    job: &Job,
    pipeline: &StableDiffusionPipeline,
    nets: &[Arc<ControlNetModel>],
) -> jhakaas_model_manager::Result<Generation> {
    let request = &job.request;
    let mut last_step = Instant::now();
    let limits = &request.limits;
    pipeline.generate_with_nets(&request.params, limits, nets, &mut |p| {
        metrics::histogram!("jhakaas_step_duration_seconds")
            .record(last_step.elapsed().as_secs_f64());
        last_step = Instant::now();
        job.emit(JobEvent::Progress(*p));
        if cancelled_reason(job).is_some() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
}
