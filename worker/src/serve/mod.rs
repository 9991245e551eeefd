//! `jhakaas-worker serve`: the gRPC server. One engine thread per device runs jobs from a
//! bounded queue; tonic serves the Worker API, health and reflection; Prometheus metrics are
//! served on their own port; SIGTERM/SIGINT drain the worker before it exits.

mod api;
mod engine;
mod http;
mod job;
mod postgres;

use anyhow::{bail, Context, Result};
use api::convert::Limits;
use api::service::WorkerService;
use clap::Args;
use engine::loras;
use engine::models::{self, ControlNetSpec, ModelSpec, ModelTable};
use jhakaas_model_manager::{DeviceChoice, ModelSource};
use jhakaas_proto::v1::worker_server::WorkerServer;
use job::store as jobs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;

/// The gRPC service name health reports readiness for.
const WORKER_SERVICE: &str = "jhakaas.worker.v1.Worker";

/// Arguments of `serve`; every flag also reads a `JHAKAAS_*` variable.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// gRPC listen address.
    #[arg(long, env = "JHAKAAS_LISTEN", default_value = "0.0.0.0:50051")]
    listen: SocketAddr,
    /// Prometheus `/metrics` listen address.
    #[arg(long, env = "JHAKAAS_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    metrics_listen: SocketAddr,
    /// Also serve OpenAI's images API over HTTP here (`POST /v1/images/generations`,
    /// `GET /v1/models`, `/healthz`, `/readyz`); off unless set.
    #[arg(long, env = "JHAKAAS_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// A model to serve as NAME=SOURCE (folder, hub id or alias); repeat for more.
    #[arg(
        long = "model",
        env = "JHAKAAS_MODELS",
        value_delimiter = ',',
        required = true
    )]
    models: Vec<String>,
    /// Model used when a request names none; loaded and warmed before the worker reports
    /// ready (default: the first --model).
    #[arg(long, env = "JHAKAAS_DEFAULT_MODEL")]
    default_model: Option<String>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, env = "JHAKAAS_DEVICE", default_value = "auto")]
    device: String,
    /// Most jobs waiting in the queue; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "JHAKAAS_MAX_QUEUE", default_value_t = 32)]
    max_queue: usize,
    /// A VAE to use instead of a model's own, as NAME=SOURCE (NAME from --model); e.g.
    /// `sdxl=madebyollin/sdxl-vae-fp16-fix` decodes SDXL in f16 instead of f32.
    #[arg(long = "model-vae", env = "JHAKAAS_MODEL_VAES", value_delimiter = ',')]
    model_vaes: Vec<String>,
    /// Defaults for a model's unset request fields, replacing its own, as
    /// NAME=KEY=VALUE,… with keys size (WxH), steps, guidance, scheduler; e.g.
    /// `turbo=steps=1,guidance=0` for a turbo checkpoint copied to a plain folder. Repeat the
    /// flag per model; in the variable, separate models with `;`.
    #[arg(
        long = "model-defaults",
        env = "JHAKAAS_MODEL_DEFAULTS",
        value_delimiter = ';'
    )]
    model_defaults: Vec<String>,
    /// Most models loaded at once (least recently used are evicted).
    #[arg(long, env = "JHAKAAS_MAX_LOADED_MODELS", default_value_t = 2)]
    max_loaded_models: usize,
    /// Most bytes of model weights loaded at once (e.g. 20GiB); the least recently used models
    /// are evicted to make room, and a model larger than the budget fails its jobs. Unset: no
    /// byte limit.
    #[arg(long, env = "JHAKAAS_MEMORY_BUDGET", value_parser = models::parse_bytes)]
    memory_budget: Option<u64>,
    /// How long finished jobs stay retrievable (e.g. 10m).
    #[arg(long, env = "JHAKAAS_RESULT_TTL", default_value = "10m", value_parser = humantime::parse_duration)]
    result_ttl: Duration,
    /// Most finished jobs kept for GetJob/WatchJob (the oldest are forgotten first, before
    /// their TTL if need be).
    #[arg(long, env = "JHAKAAS_MAX_RETAINED_JOBS", default_value_t = 1000)]
    max_retained_jobs: usize,
    /// Most bytes of finished jobs' results kept (encoded images and decoded init images).
    #[arg(long, env = "JHAKAAS_MAX_RETAINED_BYTES", default_value = "1GiB", value_parser = models::parse_bytes)]
    max_retained_bytes: u64,
    /// Where jobs live: `memory` (this process only; nothing to set up) or a PostgreSQL URL
    /// (`postgres://user:pass@host/db`), one durable queue that every replica claims from and
    /// answers for, so accepted jobs survive the pod that ran them.
    #[arg(long, env = "JHAKAAS_JOB_STORE", default_value = "memory")]
    job_store: String,
    /// With PostgreSQL: a running job's lease. The pod renews it while the job runs; a job
    /// whose lease expires (its pod died) goes back to the queue.
    #[arg(long, env = "JHAKAAS_JOB_LEASE", default_value = "30s", value_parser = humantime::parse_duration)]
    job_lease: Duration,
    /// With PostgreSQL: lost leases after which a job fails instead of running again.
    #[arg(long, env = "JHAKAAS_JOB_MAX_ATTEMPTS", default_value_t = 3)]
    job_max_attempts: u32,
    /// With PostgreSQL: how often an idle engine looks for work and a watcher for events.
    /// (A `NOTIFY` wakes both at once; the poll is the fallback.)
    #[arg(long, env = "JHAKAAS_JOB_POLL", default_value = "250ms", value_parser = humantime::parse_duration)]
    job_poll: Duration,
    /// Closes client connections after this age (they reconnect at once), so long-lived
    /// clients spread onto replicas added since they connected. Unset: connections live on.
    #[arg(long, env = "JHAKAAS_MAX_CONNECTION_AGE", value_parser = humantime::parse_duration)]
    max_connection_age: Option<Duration>,
    /// How long a shutdown waits for in-flight jobs before cancelling them (with PostgreSQL:
    /// before handing the running job back to the queue; queued jobs are never cancelled).
    #[arg(long, env = "JHAKAAS_DRAIN_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// File holding the bearer token clients must send (`authorization: Bearer …`).
    #[arg(long, env = "JHAKAAS_AUTH_TOKEN_FILE")]
    auth_token_file: Option<PathBuf>,
    /// TLS certificate chain (PEM).
    #[arg(long, env = "JHAKAAS_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "JHAKAAS_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Largest width × height a request may ask for.
    #[arg(long, env = "JHAKAAS_MAX_PIXELS", default_value_t = 1024 * 1024)]
    max_pixels: u64,
    /// Most denoising steps a request may ask for.
    #[arg(long, env = "JHAKAAS_MAX_STEPS", default_value_t = 150)]
    max_steps: u32,
    /// Most images per request.
    #[arg(long, env = "JHAKAAS_MAX_IMAGES", default_value_t = 4)]
    max_images: u32,
    /// Folder of LoRA adapters (`NAME.safetensors`, kohya or diffusers/PEFT) that requests may
    /// name in `loras`; a model + adapter set is merged once and cached like a model.
    #[arg(long, env = "JHAKAAS_LORA_DIR")]
    lora_dir: Option<PathBuf>,
    /// A ControlNet requests may name, as NAME=SOURCE (a diffusers ControlNetModel folder or
    /// hub id); repeat for more. Loaded on first use and cached with the models, within
    /// --memory-budget.
    #[arg(
        long = "controlnet",
        env = "JHAKAAS_CONTROLNETS",
        value_delimiter = ',',
        value_name = "NAME=SOURCE"
    )]
    controlnets: Vec<String>,
    /// The GPU the Python worker's `torch.Generator("cuda")` drew on, for `rng torch-cuda`:
    /// h100, h200, a100, l4, a10g, t4, or MULTIPROCESSORS:THREADS_PER_MULTIPROCESSOR.
    #[arg(long, env = "JHAKAAS_TORCH_CUDA_GPU", default_value = "h100")]
    torch_cuda_gpu: String,
    /// On the CPU, how long a model's mapped weights stay in the resident set: `resident`
    /// (from load on; no job faults them back in) or `stage` (only while a stage of a job
    /// reads them: the peak is the largest stage's weights, for minor faults every job).
    #[arg(long, env = "JHAKAAS_WEIGHTS_RESIDENCY", default_value = "resident", value_parser = ["resident", "stage"])]
    weights_residency: String,
    /// Largest encoded init image (and mask, and control image), in bytes.
    #[arg(long, env = "JHAKAAS_MAX_INIT_IMAGE_BYTES", default_value_t = 8 * 1024 * 1024)]
    max_init_image_bytes: usize,
}

fn model_specs(args: &ServeArgs) -> Result<(Vec<ModelSpec>, String)> {
    let mut specs: Vec<ModelSpec> = Vec::new();
    for m in &args.models {
        let (name, source) = m
            .split_once('=')
            .with_context(|| format!("invalid --model `{m}`: expected NAME=SOURCE"))?;
        if name.is_empty() || specs.iter().any(|s| s.name == name) {
            bail!("invalid --model `{m}`: names must be non-empty and unique");
        }
        let source =
            ModelSource::parse(source).with_context(|| format!("invalid --model `{m}`"))?;
        specs.push(ModelSpec {
            name: name.to_string(),
            source,
            vae: None,
            defaults: Default::default(),
        });
    }
    for m in &args.model_vaes {
        let (name, source) = m
            .split_once('=')
            .with_context(|| format!("invalid --model-vae `{m}`: expected NAME=SOURCE"))?;
        let spec = specs.iter_mut().find(|s| s.name == name).with_context(|| {
            format!("invalid --model-vae `{m}`: `{name}` is not a --model name")
        })?;
        if spec.vae.is_some() {
            bail!("invalid --model-vae `{m}`: `{name}` already has a VAE override");
        }
        spec.vae =
            Some(ModelSource::parse(source).with_context(|| format!("invalid --model-vae `{m}`"))?);
    }
    for m in args.model_defaults.iter().filter(|m| !m.trim().is_empty()) {
        let (name, spec) = m.split_once('=').with_context(|| {
            format!("invalid --model-defaults `{m}`: expected NAME=KEY=VALUE,…")
        })?;
        let target = specs.iter_mut().find(|s| s.name == name).with_context(|| {
            format!("invalid --model-defaults `{m}`: `{name}` is not a --model name")
        })?;
        target.defaults = jhakaas_model_manager::pipeline::DefaultsOverride::parse(spec)
            .with_context(|| format!("invalid --model-defaults `{m}`"))?;
    }
    let default = match &args.default_model {
        Some(d) if specs.iter().any(|s| &s.name == d) => d.clone(),
        Some(d) => bail!("invalid --default-model `{d}`: not one of the --model names"),
        None => specs[0].name.clone(),
    };
    Ok((specs, default))
}

/// Every `--controlnet NAME=SOURCE`, its config read now when its files are on disk.
fn controlnet_specs(args: &ServeArgs) -> Result<Vec<ControlNetSpec>> {
    let mut specs: Vec<ControlNetSpec> = Vec::new();
    for c in args.controlnets.iter().filter(|c| !c.trim().is_empty()) {
        let (name, source) = c
            .split_once('=')
            .with_context(|| format!("invalid --controlnet `{c}`: expected NAME=SOURCE"))?;
        if name.is_empty() || specs.iter().any(|s| s.name == name) {
            bail!("invalid --controlnet `{c}`: names must be non-empty and unique");
        }
        let source =
            ModelSource::parse(source).with_context(|| format!("invalid --controlnet `{c}`"))?;
        specs.push(ControlNetSpec::read(name, source));
    }
    Ok(specs)
}

/// The `fetch --check` of every model: an incomplete default model that cannot be downloaded
/// (offline, or a folder) stops start-up; any other gap is logged.
fn startup_check(specs: &[ModelSpec], default_model: &str) -> Result<()> {
    let offline = jhakaas_model_manager::source::hub_offline();
    let sources = specs.iter().flat_map(|spec| {
        std::iter::once((spec, &spec.source)).chain(spec.vae.as_ref().map(|v| (spec, v)))
    });
    for (spec, source) in sources {
        let report = jhakaas_model_manager::fetch::check(source)?;
        let downloadable = !offline && matches!(source, ModelSource::Hub { .. });
        if report.is_complete() {
            tracing::info!(model = %spec.name, source = %source, "model files present and intact");
        } else if spec.name == default_model && !downloadable {
            bail!(
                "default model `{}` ({}) is incomplete: {}",
                spec.name,
                source,
                report.problems()
            );
        } else if downloadable {
            tracing::info!(model = %spec.name, problems = %report.problems(), "model files will be downloaded on first load");
        } else {
            tracing::warn!(model = %spec.name, problems = %report.problems(), "model is incomplete; its jobs will fail");
        }
    }
    Ok(())
}

fn install_metrics() -> Result<metrics_exporter_prometheus::PrometheusHandle> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let seconds = [
        0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)?
        .install_recorder()?;
    metrics::describe_gauge!(
        "jhakaas_queue_depth",
        "Jobs waiting in the queue (this pod's; with PostgreSQL, the whole fleet's)"
    );
    metrics::describe_counter!("jhakaas_jobs_total", "Finished jobs by outcome");
    metrics::describe_histogram!("jhakaas_queue_wait_seconds", "Time jobs spent queued");
    metrics::describe_histogram!("jhakaas_job_duration_seconds", "Submit to terminal event");
    metrics::describe_histogram!(
        "jhakaas_step_duration_seconds",
        "Duration of one denoising step"
    );
    metrics::describe_gauge!(
        "jhakaas_jobs_running",
        "Jobs running (this pod's; with PostgreSQL, the whole fleet's)"
    );
    metrics::describe_gauge!("jhakaas_models_loaded", "Models loaded on the engine");
    metrics::gauge!("jhakaas_jobs_running").set(0.0);
    metrics::gauge!("jhakaas_queue_depth").set(0.0);
    metrics::gauge!("jhakaas_models_loaded").set(0.0);
    Ok(handle)
}

async fn serve_metrics(
    listener: tokio::net::TcpListener,
    handle: metrics_exporter_prometheus::PrometheusHandle,
) {
    use axum::routing::get;
    let app =
        axum::Router::new().route("/metrics", get(move || std::future::ready(handle.render())));
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics server stopped");
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// The job store `--job-store` names.
async fn job_backend(
    args: &ServeArgs,
    table: &Arc<ModelTable>,
    limits: Limits,
) -> Result<Arc<dyn job::backend::JobBackend>> {
    if args.job_store.starts_with("postgres://") || args.job_store.starts_with("postgresql://") {
        if args.job_lease < Duration::from_secs(1) {
            bail!("invalid --job-lease: at least 1s");
        }
        let config = postgres::PgConfig {
            max_queue: args.max_queue,
            result_ttl: args.result_ttl,
            max_retained_jobs: args.max_retained_jobs,
            max_retained_bytes: args.max_retained_bytes,
            lease: args.job_lease,
            max_attempts: args.job_max_attempts.max(1),
            poll: args.job_poll.max(Duration::from_millis(5)),
        };
        let store =
            postgres::PgJobs::connect(&args.job_store, config, table.clone(), limits).await?;
        return Ok(Arc::new(store));
    }
    if args.job_store != "memory" {
        bail!(
            "invalid --job-store `{}`: expected `memory` or a postgres:// URL",
            args.job_store
        );
    }
    let store = Arc::new(jobs::JobStore::new(
        args.max_queue,
        jobs::Retention {
            ttl: args.result_ttl,
            max_jobs: args.max_retained_jobs,
            max_bytes: args.max_retained_bytes,
        },
    ));
    let sweep_every =
        (args.result_ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    Ok(Arc::new(job::memory::MemoryJobs::new(store, sweep_every)))
}

/// Runs `serve` until a signal drains and stops it.
pub fn run(args: ServeArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> Result<()> {
    let (specs, default_model) = model_specs(&args)?;
    let device = args.device.parse::<DeviceChoice>()?.open()?;
    let token = match &args.auth_token_file {
        Some(p) => {
            let t = std::fs::read_to_string(p)
                .with_context(|| format!("reading --auth-token-file {}", p.display()))?;
            let t = t.trim().to_string();
            if t.is_empty() {
                bail!(
                    "invalid --auth-token-file {}: the file is empty",
                    p.display()
                );
            }
            Some(t)
        }
        None => None,
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => {
            let cert =
                std::fs::read(c).with_context(|| format!("reading --tls-cert {}", c.display()))?;
            let key =
                std::fs::read(k).with_context(|| format!("reading --tls-key {}", k.display()))?;
            Some(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
        }
        _ => None,
    };
    let metrics = install_metrics()?;

    startup_check(&specs, &default_model)?;
    if let Some(dir) = &args.lora_dir {
        if !dir.is_dir() {
            bail!("invalid --lora-dir {}: not a folder", dir.display());
        }
    }
    let table = Arc::new(
        ModelTable::new(specs, default_model.clone())
            .with_loras(loras::LoraLibrary::new(args.lora_dir.clone()))
            .with_controlnets(controlnet_specs(&args)?)
            .with_torch_cuda_grid(args.torch_cuda_gpu.parse()?)
            .with_residency(args.weights_residency.parse()?),
    );
    table.describe_available();
    let limits = Limits {
        max_pixels: args.max_pixels,
        max_steps: args.max_steps,
        max_images: args.max_images,
        max_init_image_bytes: args.max_init_image_bytes,
    };
    let jobs = job_backend(&args, &table, limits).await?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(WORKER_SERVICE, ServingStatus::NotServing)
        .await;

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let metrics_listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("binding {}", args.metrics_listen))?;
    let http_listener = match args.http_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding --http-listen {addr}"))?,
        ),
        None => None,
    };
    // Tests and operators read the bound addresses (port 0 picks a free one).
    let http_note = match &http_listener {
        Some(l) => format!(" (http on {})", l.local_addr()?),
        None => String::new(),
    };
    println!(
        "listening on {} (metrics on {}){http_note}",
        listener.local_addr()?,
        metrics_listener.local_addr()?
    );
    tokio::spawn(serve_metrics(metrics_listener, metrics));
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let rt = tokio::runtime::Handle::current();
    let ready_health = health.clone();
    let fatal_health = health.clone();
    let (ready_flag, fatal_flag) = (ready.clone(), ready.clone());
    let fatal_rt = rt.clone();
    let engine = engine::thread::spawn(
        jobs.source(),
        table.clone(),
        engine::thread::EngineConfig {
            device,
            max_loaded: args.max_loaded_models,
            memory_budget: args.memory_budget,
            warm: vec![default_model],
            on_ready: Box::new(move || {
                ready_flag.store(true, std::sync::atomic::Ordering::SeqCst);
                rt.spawn(async move {
                    ready_health
                        .set_service_status(WORKER_SERVICE, ServingStatus::Serving)
                        .await;
                    tracing::info!("ready");
                });
            }),
            on_fatal: Box::new(move || {
                fatal_flag.store(false, std::sync::atomic::Ordering::SeqCst);
                let health = fatal_health.clone();
                fatal_rt.block_on(async move {
                    health
                        .set_service_status(WORKER_SERVICE, ServingStatus::NotServing)
                        .await;
                });
            }),
        },
    )?;

    // Our codec refuses requests over the limit naming it (RESOURCE_EXHAUSTED); tonic's own
    // bound, which answers OUT_OF_RANGE naming nothing, sits well above as the memory wall.
    let request_limit = args.max_init_image_bytes + 64 * 1024;
    let http_stop = Arc::new(tokio::sync::Notify::new());
    let http_server = http_listener.map(|listener| {
        let app = http::router(http::HttpState {
            jobs: jobs.clone(),
            models: table.clone(),
            limits,
            token: token.clone(),
            ready: ready.clone(),
            max_body: request_limit,
        });
        let stop = http_stop.clone();
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.notified().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        })
    });
    let svc = WorkerService {
        jobs: jobs.clone(),
        models: table,
        limits,
    };
    // Both reflection versions: grpcurl and older tools still ask v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(jhakaas_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    jhakaas_proto::codec::set_request_limit(
        request_limit,
        "--max-init-image-bytes plus 64 KiB for the other fields",
    );
    let worker = WorkerServer::new(svc)
        .max_decoding_message_size(request_limit.saturating_mul(4).max(4 << 20))
        .max_encoding_message_size(256 * 1024 * 1024);
    let worker =
        tonic::service::interceptor::InterceptedService::new(worker, auth::interceptor(token));

    let drain_jobs = jobs.clone();
    let drain_timeout = args.drain_timeout;
    let drain_stop = http_stop.clone();
    let shutdown = async move {
        shutdown_signal().await;
        ready.store(false, std::sync::atomic::Ordering::SeqCst);
        health
            .set_service_status(WORKER_SERVICE, ServingStatus::NotServing)
            .await;
        drain_jobs.drain(drain_timeout).await;
        // Both faces stop once the drain ended: their in-flight calls have their answers.
        drain_stop.notify_one();
    };

    let mut builder = Server::builder();
    if let Some(age) = args.max_connection_age {
        builder = builder.max_connection_age(age);
    }
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(worker)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await?;
    if let Some(server) = http_server {
        let _ = server.await;
    }
    jobs.source().close();
    let _ = tokio::task::spawn_blocking(move || engine.join()).await;
    tracing::info!("stopped");
    Ok(())
}

mod auth {
    //! Optional bearer-token auth for the Worker service (health and reflection stay open).

    use subtle::ConstantTimeEq;
    use tonic::{Request, Status};

    /// An interceptor admitting requests whose `authorization` is `Bearer <token>`; with no
    /// token configured, every request.
    pub fn interceptor(
        token: Option<String>,
    ) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
        move |req: Request<()>| {
            let Some(expected) = &token else {
                return Ok(req);
            };
            let given = req
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
                Ok(req)
            } else {
                Err(Status::unauthenticated("missing or wrong bearer token"))
            }
        }
    }
}
