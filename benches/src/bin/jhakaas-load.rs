//! `jhakaas-load`: drives a worker on this machine with N concurrent gRPC clients for M jobs
//! and reports throughput, latency percentiles and queue wait, checking that every accepted
//! job completed. Bounded in job count and wall time; refuses non-loopback addresses.
//!
//! With `--http ADDR` the clients call the HTTP face (`POST /v1/images/generations`, one
//! keep-alive connection each) instead; with `--engine MODEL_DIR` the same job runs through
//! the engine in-process, so the medians give each face's serving overhead.

use anyhow::{bail, Context, Result};
use clap::Parser;
use jhakaas_benches::stats::percentile;
use jhakaas_proto::v1 as pb;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

#[derive(Debug, Parser)]
#[command(about = "Load generator and latency probe for the Jhakaas worker (loopback only)")]
struct Args {
    /// Worker address, e.g. 127.0.0.1:50051 (loopback only).
    #[arg(long, default_value = "127.0.0.1:50051")]
    addr: String,
    /// Run the job through the engine in-process from this model folder instead of gRPC.
    #[arg(long)]
    engine: Option<std::path::PathBuf>,
    /// Drive the HTTP face at this address (`serve --http-listen`) instead of gRPC.
    #[arg(long)]
    http: Option<String>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Total jobs.
    #[arg(long, default_value_t = 64)]
    jobs: usize,
    /// Stop issuing jobs after this many seconds.
    #[arg(long, default_value_t = 300)]
    max_seconds: u64,
    /// Model name on the server (empty = its default).
    #[arg(long, default_value = "")]
    model: String,
    /// Steps per job.
    #[arg(long, default_value_t = 4)]
    steps: u32,
    /// Image side in pixels.
    #[arg(long, default_value_t = 64)]
    side: u32,
}

fn loopback_only(addr: &str) -> Result<()> {
    let host = addr
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(addr)
        .trim_matches(['[', ']']);
    let ok = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false);
    if !ok {
        bail!("refusing to load {addr}: this tool only targets loopback addresses");
    }
    Ok(())
}

/// Per-job samples of a run.
#[derive(Default)]
struct Samples {
    /// Call to terminal event.
    latency: Vec<Duration>,
    /// The server's reported queue wait (accepted to claimed by the engine).
    queue: Vec<Duration>,
    /// Call to the `Started` event, as the client sees it.
    to_started: Vec<Duration>,
    failed: usize,
    refused: usize,
}

fn report(label: &str, s: &Samples, wall: Duration) {
    let (latencies, failed) = (&s.latency, s.failed);
    let n = latencies.len();
    println!(
        "{label}: {n} jobs ok, {failed} failed, {:.2} jobs/s over {:.2?}",
        n as f64 / wall.as_secs_f64(),
        wall
    );
    println!(
        "  latency p50 {:.1?}  p95 {:.1?}  p99 {:.1?}",
        percentile(latencies, 50.0),
        percentile(latencies, 95.0),
        percentile(latencies, 99.0)
    );
    for (name, v) in [
        ("queue wait", &s.queue),
        ("submit to started", &s.to_started),
    ] {
        if !v.is_empty() {
            println!(
                "  {name} p50 {:.2?}  p95 {:.2?}  p99 {:.2?}",
                percentile(v, 50.0),
                percentile(v, 95.0),
                percentile(v, 99.0)
            );
        }
    }
}

fn engine_mode(args: &Args, dir: &std::path::Path) -> Result<()> {
    use jhakaas_model_manager::{GenerateParams, ModelSource, StableDiffusionPipeline};
    let p = StableDiffusionPipeline::load(
        &ModelSource::Local(dir.to_path_buf()),
        &jhakaas_model_manager::Device::Cpu,
    )?;
    let params = GenerateParams {
        prompt: "a load test".into(),
        steps: Some(args.steps as usize),
        width: Some(args.side as usize),
        height: Some(args.side as usize),
        seed: Some(1),
        ..Default::default()
    };
    p.generate(&params, &mut |_| std::ops::ControlFlow::Continue(()))?; // warm-up
    let started = Instant::now();
    let mut latencies = Vec::new();
    for _ in 0..args.jobs {
        let t = Instant::now();
        let g = p.generate(&params, &mut |_| std::ops::ControlFlow::Continue(()))?;
        for img in &g.images {
            jhakaas_model_manager::image_io::encode_image(
                &img.image,
                jhakaas_model_manager::ImageFormat::Png,
                "",
            )?;
        }
        latencies.push(t.elapsed());
    }
    let samples = Samples {
        latency: latencies,
        ..Default::default()
    };
    report(
        "engine (in-process, sequential)",
        &samples,
        started.elapsed(),
    );
    Ok(())
}

async fn grpc_mode(args: &Args) -> Result<()> {
    loopback_only(&args.addr)?;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", args.addr))?
        .connect()
        .await
        .with_context(|| format!("connecting to {}", args.addr))?;
    let next = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(Samples::default()));
    let deadline = Instant::now() + Duration::from_secs(args.max_seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.clients {
        let mut client = pb::worker_client::WorkerClient::new(channel.clone())
            .max_decoding_message_size(256 << 20);
        let (next, results) = (next.clone(), results.clone());
        let req = pb::GenerateRequest {
            model: args.model.clone(),
            prompt: "a load test".into(),
            steps: args.steps,
            width: args.side,
            height: args.side,
            ..Default::default()
        };
        let jobs = args.jobs;
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::SeqCst) < jobs && Instant::now() < deadline {
                let t = Instant::now();
                let mut to_started = None;
                let outcome = match client.generate(req.clone()).await {
                    Ok(resp) => {
                        let mut stream = resp.into_inner();
                        let mut last = None;
                        while let Some(Ok(e)) = stream.next().await {
                            if matches!(e.event, Some(pb::job_event::Event::Started(_))) {
                                to_started.get_or_insert(t.elapsed());
                            }
                            last = e.event;
                        }
                        last
                    }
                    Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                        results.lock().unwrap().refused += 1;
                        continue;
                    }
                    Err(_) => None,
                };
                let mut r = results.lock().unwrap();
                match outcome {
                    Some(pb::job_event::Event::Completed(c)) => {
                        r.latency.push(t.elapsed());
                        let q = c.timings.map(|t| t.queue_seconds).unwrap_or(0.0);
                        r.queue.push(Duration::from_secs_f64(q));
                        r.to_started.extend(to_started);
                    }
                    _ => r.failed += 1,
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let wall = started.elapsed();
    let samples = results.lock().unwrap();
    report(&format!("grpc ({} clients)", args.clients), &samples, wall);
    println!("  refused (RESOURCE_EXHAUSTED): {}", samples.refused);
    let failed = samples.failed;
    if failed > 0 {
        bail!("{failed} accepted jobs did not complete");
    }
    Ok(())
}

/// The same jobs through `POST /v1/images/generations`, one blocking client per thread.
fn http_mode(args: &Args, addr: &str) -> Result<()> {
    loopback_only(addr)?;
    let url = format!("http://{addr}/v1/images/generations");
    let mut body = serde_json::json!({
        "prompt": "a load test",
        "steps": args.steps,
        "size": format!("{}x{}", args.side, args.side),
    });
    if !args.model.is_empty() {
        body["model"] = serde_json::json!(args.model);
    }
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Samples::default());
    let deadline = Instant::now() + Duration::from_secs(args.max_seconds);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..args.clients {
            let agent = ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(args.max_seconds.max(60)))
                .build();
            let (next, results, url, body) = (&next, &results, &url, &body);
            scope.spawn(move || {
                while next.fetch_add(1, Ordering::SeqCst) < args.jobs && Instant::now() < deadline {
                    let t = Instant::now();
                    // The whole answer is read (its images) before the clock stops.
                    let ok = match agent.post(url).send_json(body.clone()) {
                        Ok(r) => r.into_string().is_ok(),
                        Err(ureq::Error::Status(429, _)) => {
                            results.lock().unwrap().refused += 1;
                            continue;
                        }
                        Err(_) => false,
                    };
                    let mut r = results.lock().unwrap();
                    if ok {
                        r.latency.push(t.elapsed());
                    } else {
                        r.failed += 1;
                    }
                }
            });
        }
    });
    let wall = started.elapsed();
    let samples = results.into_inner().unwrap();
    report(&format!("http ({} clients)", args.clients), &samples, wall);
    println!("  refused (429): {}", samples.refused);
    if samples.failed > 0 {
        bail!("{} accepted jobs did not complete", samples.failed);
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(dir) = &args.engine {
        return engine_mode(&args, dir);
    }
    if let Some(addr) = &args.http {
        return http_mode(&args, addr);
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(grpc_mode(&args))
}
