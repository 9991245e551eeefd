//! `jhakaas-worker`: the Jhakaas Stable Diffusion worker.
//!
//! `generate` runs the engine once and writes images; `serve` runs the gRPC worker; `fetch`
//! puts models into the HF cache (and `fetch --check` proves they are complete).

mod fetch;
mod generate;
mod serve;

use clap::{Parser, Subcommand};

/// Command line of the worker binary.
#[derive(Debug, Parser)]
#[command(
    name = "jhakaas-worker",
    version,
    about = "Stable Diffusion worker in pure Rust (candle)",
    args_override_self = true
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "JHAKAAS_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Which implementation of the layer math runs: `auto` (our CPU kernels; on CUDA the
    /// kernels checked on a GPU), `fused` (every fused kernel, the CUDA ones included) or
    /// `reference` (plain candle math, for A/B runs and as an escape hatch).
    #[arg(long, global = true, env = "JHAKAAS_KERNELS", default_value = "auto", value_parser = ["auto", "fused", "reference"])]
    kernels: String,
    /// How the CPU holds weights a model file stores in f16: `f16` (kept in f16 where lossless
    /// and widened as used: the same images in about half the memory, loaded in about half the
    /// time; weight-streaming layers faster, compute-bound gemms ~5% slower) or `f32` (upcast
    /// at load). Weights f16 cannot hold exactly stay f32 either way.
    #[arg(long, global = true, env = "JHAKAAS_CPU_WEIGHTS", default_value = "f16", value_parser = ["f32", "f16"])]
    cpu_weights: String,
    /// How weights files are read on the CPU: `map` (a tensor held as the file stores it lies
    /// in the file's mapped pages: nothing copied at load, one copy in memory shared with the
    /// page cache; the file must not be rewritten in place while served) or `read` (copied
    /// into memory; for filesystems where mapped reads are slow, e.g. some network mounts).
    #[arg(long, global = true, env = "JHAKAAS_WEIGHTS_IO", default_value = "map", value_parser = ["map", "read"])]
    weights_io: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Turn a prompt (and optionally an init image) into image files.
    Generate(generate::GenerateArgs),
    /// Serve the gRPC API (jobs, streaming progress, health, reflection, metrics).
    Serve(serve::ServeArgs),
    /// Download the files models need into the HF cache, or `--check` them offline.
    Fetch(fetch::FetchArgs),
}

fn main() -> std::process::ExitCode {
    // Tensors of one denoising step reuse the memory the previous step freed (measured on the
    // CPU: model load 6.9 -> 2.3 s, a 256² 4-step job 7.2 -> 6.5 s).
    jhakaas_model_manager::kernels::retain_freed_memory();
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    match cli.kernels.parse() {
        Ok(k) => jhakaas_model_manager::kernels::set_kernels(k),
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    match cli.cpu_weights.parse() {
        Ok(w) => jhakaas_model_manager::kernels::held::set_cpu_weights(w),
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    match cli.weights_io.parse() {
        Ok(io) => jhakaas_model_manager::weights::set_weights_io(io),
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Fetch(args) => fetch::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole cause chain on one line: "context: cause: root cause".
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("JHAKAAS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
