//! `jhakaas-worker generate`: one request through the engine, images to files.

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use jhakaas_model_manager::controlnet::ControlNetModel;
use jhakaas_model_manager::image_io::{
    decode_image, decode_image_for, encode_image, parameters_text,
};
use jhakaas_model_manager::lora::LoraAdapter;
use jhakaas_model_manager::params::{parse_offset, parse_size, ControlNetRequest};
use jhakaas_model_manager::pipeline::RequestLimits;
use jhakaas_model_manager::{
    device, DeviceChoice, GenerateParams, ImageFormat, InitImage, LoadOptions, ModelSource,
    NoiseReplay, RngKind, SchedulerKind, SizeConditioning, StableDiffusionPipeline,
};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Largest init image accepted, in pixels (decoding is refused beyond this).
const MAX_INIT_PIXELS: u64 = 4096 * 4096;

/// Arguments of `generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model: a diffusers folder, a hub id `org/name[@revision]`, or an alias (sd-1.5, sd-2.1,
    /// sd-turbo, sdxl, sdxl-turbo).
    #[arg(long, env = "JHAKAAS_MODEL")]
    model: String,
    /// Use this VAE instead of the model's: an AutoencoderKL folder or hub id (e.g.
    /// madebyollin/sdxl-vae-fp16-fix, which decodes SDXL in f16 without the f32 upcast).
    #[arg(long, env = "JHAKAAS_VAE")]
    vae: Option<String>,
    /// What to draw.
    #[arg(long)]
    prompt: String,
    /// What to steer away from.
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Width in pixels, a multiple of 8 (default: the model's).
    #[arg(long)]
    width: Option<usize>,
    /// Height in pixels, a multiple of 8 (default: the model's).
    #[arg(long)]
    height: Option<usize>,
    /// Denoising steps (default: the model's; 50, or 1 for the turbo checkpoints).
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale; ≤ 1 skips the unconditional pass (default: the model's;
    /// 7.5 for SD, 5.0 for SDXL, 0 for the turbo checkpoints).
    #[arg(long)]
    guidance_scale: Option<f64>,
    /// The scheduler: ddim, pndm, euler, euler-karras, euler-a, lms, lms-karras, heun, dpm2,
    /// dpm2-a, dpmpp-2m, dpmpp-2m-karras, dpmpp-2m-sde, dpmpp-2m-sde-karras, unipc, deis or lcm
    /// (default: the checkpoint's own, e.g. pndm for SD 1.5).
    #[arg(long)]
    scheduler: Option<String>,
    /// The seed (default: random). With `--rng chacha` image i uses seed + i; with
    /// `torch-cpu`/`torch-cuda` it seeds the one generator, as diffusers' `manual_seed`.
    #[arg(long)]
    seed: Option<u64>,
    /// The noise generator: chacha (each image its own stream; the default), torch-cpu
    /// (torch's CPU generator drawn as diffusers draws: the seed gives the diffusers image) or
    /// torch-cuda (torch's CUDA generator, computed on the host; not yet verified on a GPU).
    #[arg(long)]
    rng: Option<String>,
    /// The GPU the Python worker's `torch.Generator("cuda")` drew on, for `--rng torch-cuda`:
    /// h100, h200, a100, l4, a10g, t4, or MULTIPROCESSORS:THREADS_PER_MULTIPROCESSOR.
    #[arg(long, env = "JHAKAAS_TORCH_CUDA_GPU", default_value = "h100")]
    torch_cuda_gpu: String,
    /// Number of images.
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// Init image for img2img (with --strength) or inpainting (with --mask or --outpaint).
    #[arg(long)]
    init_image: Option<PathBuf>,
    /// How much to change the init image, in (0, 1]; required for img2img, 1 by default when
    /// inpainting.
    #[arg(long, requires = "init_image")]
    strength: Option<f64>,
    /// Inpainting mask (white = repaint, black = keep; gray is binarised at 50%), resized to
    /// the output like the init image. The model may be an inpainting checkpoint (9-channel
    /// UNet) or any other (diffusers' latent blending).
    #[arg(long, requires = "init_image")]
    mask: Option<PathBuf>,
    /// Inpaint only the mask's bounding box grown by N pixels (diffusers' `padding_mask_crop`,
    /// A1111's "inpaint only masked"), at the output size (default: the model's), and paste
    /// the result back into the full image.
    #[arg(long, value_name = "N", requires = "mask")]
    mask_crop_padding: Option<u32>,
    /// Outpainting: pixels to add on each side, LEFT,TOP,RIGHT,BOTTOM (multiples of 8); the
    /// canvas is extended with the image's edge pixels and the new area inpainted.
    #[arg(
        long,
        value_name = "L,T,R,B",
        requires = "init_image",
        conflicts_with = "mask"
    )]
    outpaint: Option<String>,
    /// A ControlNet (a diffusers ControlNetModel folder or hub id of the model's family),
    /// steering with the --control-image at the same position; repeat for several (their
    /// residuals are summed, as diffusers' MultiControlNetModel).
    #[arg(
        long = "controlnet",
        value_name = "SOURCE",
        requires = "control_images"
    )]
    controlnets: Vec<String>,
    /// The control image (an edge, depth, pose… map, made beforehand) of the --controlnet at
    /// the same position; resized to the output.
    #[arg(long = "control-image", value_name = "PATH", requires = "controlnets")]
    control_images: Vec<PathBuf>,
    /// Each ControlNet's scale (default 1); one value applies to all.
    #[arg(long = "controlnet-scale", value_name = "F")]
    controlnet_scales: Vec<f64>,
    /// Each ControlNet's first step, as a fraction of the steps (default 0); one applies to all.
    #[arg(long = "control-guidance-start", value_name = "F")]
    control_starts: Vec<f64>,
    /// Each ControlNet's last step, as a fraction of the steps (default 1); one applies to all.
    #[arg(long = "control-guidance-end", value_name = "F")]
    control_ends: Vec<f64>,
    /// SDXL size conditioning: the source image size WIDTHxHEIGHT the model is told about
    /// (default: the output size).
    #[arg(long, value_name = "WxH")]
    original_size: Option<String>,
    /// SDXL size conditioning: the crop offset TOP,LEFT in pixels (default 0,0).
    #[arg(long, value_name = "TOP,LEFT")]
    crop_top_left: Option<String>,
    /// SDXL size conditioning: the target size WIDTHxHEIGHT (default: the output size).
    #[arg(long, value_name = "WxH")]
    target_size: Option<String>,
    /// Replay noise from a safetensors file (`latents` [N,4,H/8,W/8] f32, optional `step_noise`
    /// and `encoder_noise`) instead of drawing it from the seed.
    #[arg(long)]
    latents: Option<PathBuf>,
    /// A LoRA adapter (kohya/A1111 or diffusers/PEFT safetensors) merged into the UNet and
    /// text encoders, as PATH[:WEIGHT] (weight 1.0 when omitted); repeat for more.
    #[arg(long = "lora", value_name = "PATH[:WEIGHT]")]
    loras: Vec<String>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, env = "JHAKAAS_DEVICE", default_value = "auto")]
    device: String,
    /// On the CPU, how long the mapped weights stay in the resident set: `stage` (only while
    /// the stage that reads them runs — text encoders, then UNet and ControlNets, then VAE — so
    /// the peak is the largest stage's) or `resident` (from load to exit).
    #[arg(long, default_value = "stage", value_parser = ["resident", "stage"])]
    weights_residency: String,
    /// Output file; its extension picks the format (png, jpg/jpeg, webp). With several images,
    /// `-N` is inserted before the extension.
    #[arg(long)]
    output: Option<PathBuf>,
}

/// Runs `generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    let params = build_params(&args)?;
    let device_choice: DeviceChoice = args.device.parse()?;
    let source = ModelSource::parse(&args.model)?;
    let options = LoadOptions {
        vae: args
            .vae
            .as_deref()
            .map(ModelSource::parse)
            .transpose()
            .map_err(|e| anyhow::anyhow!("invalid vae: {e}"))?,
        loras: args
            .loras
            .iter()
            .map(|l| LoraAdapter::parse(l))
            .collect::<Result<_, _>>()?,
        torch_cuda_grid: args.torch_cuda_gpu.parse()?,
        residency: args.weights_residency.parse()?,
        ..Default::default()
    };
    let lora_summary: Vec<String> = options
        .loras
        .iter()
        .map(|l| format!("{}:{}", l.name(), l.weight))
        .collect();

    let t0 = Instant::now();
    let device = device_choice.open()?;
    let pipeline = StableDiffusionPipeline::load_with(&source, &device, &options)
        .with_context(|| format!("loading model `{source}`"))?;
    eprintln!(
        "loaded {source} on {} in {:.2?}",
        device::describe(&device),
        t0.elapsed()
    );

    let resolved = pipeline.resolve(&params)?;
    let format = output_format(args.output.as_deref())?;
    let bar = ProgressBar::new(resolved.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} step {pos}/{len} [{bar:30}] {elapsed_precise} ({per_sec})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let params = GenerateParams {
        seed: Some(resolved.seed),
        ..params
    };
    let nets = params
        .controlnets
        .iter()
        .map(|c| {
            let source = ModelSource::parse(&c.name)?;
            let net = ControlNetModel::load(&source, &device, pipeline.dtype())
                .with_context(|| format!("loading ControlNet `{source}`"))?;
            Ok(Arc::new(net))
        })
        .collect::<Result<Vec<_>>>()?;
    let limits = RequestLimits::default();
    let generation = pipeline.generate_with_nets(&params, &limits, &nets, &mut |p| {
        bar.set_length(p.total_steps as u64);
        bar.set_position(p.step as u64);
        ControlFlow::Continue(())
    })?;
    bar.finish_and_clear();

    let many = generation.images.len() > 1;
    for (i, img) in generation.images.iter().enumerate() {
        let mut text = parameters_text(
            &params.prompt,
            params.negative_prompt.as_deref(),
            &generation.params,
            img.seed,
            pipeline.name(),
        );
        if !lora_summary.is_empty() {
            text.push_str(&format!(", Lora: {}", lora_summary.join(" ")));
        }
        let bytes = encode_image(&img.image, format, &text)?;
        let path = output_path(args.output.as_deref(), img.seed, format, many.then_some(i));
        std::fs::write(&path, bytes).map_err(|e| write_error(&path, e))?;
        println!(
            "{} ({}x{}, seed {})",
            path.display(),
            img.image.width(),
            img.image.height(),
            img.seed
        );
    }
    let t = generation.timings;
    eprintln!(
        "text encode {:.2?}, denoise {:.2?} ({} steps, {}), decode {:.2?}",
        t.text_encode, t.denoise, generation.params.steps, generation.params.scheduler, t.decode
    );
    Ok(())
}

/// The init image with its mask (`--mask`, or the canvas and mask `--outpaint` makes) and
/// strength (required for img2img; 1 by default when inpainting).
fn init_image(path: &std::path::Path, args: &GenerateArgs) -> Result<InitImage> {
    let read = |path: &std::path::Path, field: &str| {
        std::fs::read(path)
            .with_context(|| format!("invalid {field}: cannot read {}", path.display()))
    };
    let image = decode_image(&read(path, "init_image")?, MAX_INIT_PIXELS)
        .with_context(|| format!("reading {}", path.display()))?;
    let (image, mask) = match (&args.mask, &args.outpaint) {
        (Some(mask), _) => {
            let bytes = read(mask, "mask")?;
            let mask = jhakaas_model_manager::inpaint::decode_mask(&bytes, MAX_INIT_PIXELS)
                .with_context(|| format!("reading {}", mask.display()))?;
            (image, Some(mask))
        }
        (None, Some(sides)) => {
            let outpaint = jhakaas_model_manager::inpaint::Outpaint::parse(sides)?;
            let (canvas, mask) = outpaint.apply(&image, MAX_INIT_PIXELS)?;
            (canvas, Some(mask))
        }
        (None, None) => (image, None),
    };
    let strength = match (args.strength, &mask) {
        (Some(s), _) => s,
        (None, Some(_)) => 1.0,
        (None, None) => anyhow::bail!("invalid strength: img2img needs --strength"),
    };
    Ok(InitImage {
        image,
        strength,
        mask,
        mask_crop_padding: args.mask_crop_padding,
    })
}

/// `--controlnet`s with their images and per-net values (one value for all, or one each).
fn controlnet_requests(args: &GenerateArgs) -> Result<Vec<ControlNetRequest>> {
    let n = args.controlnets.len();
    if args.control_images.len() != n {
        anyhow::bail!(
            "invalid control_image: {} given for {n} --controlnet",
            args.control_images.len()
        );
    }
    let each = |values: &[f64], field: &str, default: f64| -> Result<Vec<f64>> {
        match values.len() {
            0 => Ok(vec![default; n]),
            1 => Ok(vec![values[0]; n]),
            k if k == n => Ok(values.to_vec()),
            k => anyhow::bail!("invalid {field}: {k} values for {n} --controlnet"),
        }
    };
    let scales = each(&args.controlnet_scales, "controlnet_scale", 1.0)?;
    let starts = each(&args.control_starts, "control_guidance_start", 0.0)?;
    let ends = each(&args.control_ends, "control_guidance_end", 1.0)?;
    let mut requests = Vec::with_capacity(n);
    for (i, (name, path)) in args
        .controlnets
        .iter()
        .zip(&args.control_images)
        .enumerate()
    {
        let bytes = std::fs::read(path)
            .with_context(|| format!("invalid control_image: cannot read {}", path.display()))?;
        let image = decode_image_for(&bytes, MAX_INIT_PIXELS, "control_image")
            .with_context(|| format!("reading {}", path.display()))?;
        requests.push(ControlNetRequest {
            name: name.clone(),
            image,
            scale: scales[i],
            start: starts[i],
            end: ends[i],
        });
    }
    Ok(requests)
}

fn build_params(args: &GenerateArgs) -> Result<GenerateParams> {
    let scheduler = args
        .scheduler
        .as_deref()
        .map(str::parse::<SchedulerKind>)
        .transpose()?;
    let rng = args.rng.as_deref().map(str::parse::<RngKind>).transpose()?;
    let init_image = match &args.init_image {
        Some(path) => Some(init_image(path, args)?),
        None => None,
    };
    let noise = args.latents.as_deref().map(NoiseReplay::load).transpose()?;
    if args.num_images == 0 {
        anyhow::bail!("invalid num_images: must be at least 1");
    }
    Ok(GenerateParams {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        width: args.width,
        height: args.height,
        steps: args.steps,
        guidance_scale: args.guidance_scale,
        scheduler,
        seed: args.seed,
        rng,
        num_images: args.num_images,
        init_image,
        noise,
        controlnets: controlnet_requests(args)?,
        size_conditioning: SizeConditioning {
            original_size: args
                .original_size
                .as_deref()
                .map(|v| parse_size("original_size", v))
                .transpose()?,
            crop_top_left: args
                .crop_top_left
                .as_deref()
                .map(|v| parse_offset("crop_top_left", v))
                .transpose()?,
            target_size: args
                .target_size
                .as_deref()
                .map(|v| parse_size("target_size", v))
                .transpose()?,
        },
    })
}

/// Why an image could not be written; a permission error names the user the process runs as
/// (in the worker image, uid 10001, which a mounted output folder must let write).
fn write_error(path: &Path, e: std::io::Error) -> anyhow::Error {
    use std::os::unix::fs::MetadataExt;
    let whom = match std::fs::metadata("/proc/self") {
        Ok(me) if e.kind() == std::io::ErrorKind::PermissionDenied => format!(
            " (this process runs as uid {}: the folder must be writable by it)",
            me.uid()
        ),
        _ => String::new(),
    };
    anyhow::Error::new(e).context(format!("writing {}{whom}", path.display()))
}

fn output_format(output: Option<&Path>) -> Result<ImageFormat> {
    match output.and_then(|p| p.extension()).and_then(|e| e.to_str()) {
        None => Ok(ImageFormat::Png),
        Some(ext) => ImageFormat::parse(ext).map_err(|_| {
            anyhow::anyhow!("invalid output: extension `.{ext}` is not png, jpg, jpeg or webp")
        }),
    }
}

fn output_path(
    output: Option<&Path>,
    seed: u64,
    format: ImageFormat,
    index: Option<usize>,
) -> PathBuf {
    let base = output
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(format!("jhakaas-{seed}.{}", format.extension())));
    match index {
        None => base,
        Some(i) => {
            let stem = base.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
            let ext = base
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or(format.extension());
            base.with_file_name(format!("{stem}-{i}.{ext}"))
        }
    }
}
