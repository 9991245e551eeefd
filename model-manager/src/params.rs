//! The engine's domain types: what a caller asks for and what it gets back. The worker converts
//! its wire types to and from these in one place; the engine never sees protobuf.

use crate::noise::RngKind;
use crate::scheduler::SchedulerKind;
use std::time::Duration;

/// Encoded image container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageFormat {
    /// Lossless PNG with the generation parameters in a `parameters` text chunk.
    #[default]
    Png,
    /// JPEG, quality 90.
    Jpeg,
    /// Lossless WebP.
    Webp,
}

impl ImageFormat {
    /// MIME type of the encoded bytes.
    pub fn mime_type(self) -> &'static str {
        match self {
            ImageFormat::Png => "image/png",
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::Webp => "image/webp",
        }
    }

    /// Conventional file extension.
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpg",
            ImageFormat::Webp => "webp",
        }
    }

    /// Parses `png`, `jpeg`/`jpg` or `webp` (case-insensitive).
    pub fn parse(name: &str) -> crate::Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "png" => Ok(ImageFormat::Png),
            "jpeg" | "jpg" => Ok(ImageFormat::Jpeg),
            "webp" => Ok(ImageFormat::Webp),
            other => Err(crate::Error::invalid(
                "output_format",
                format!("`{other}` is not one of png, jpeg, webp"),
            )),
        }
    }
}

/// An init image for img2img or, with a mask, inpainting; already decoded.
#[derive(Debug, Clone)]
pub struct InitImage {
    /// The pixels.
    pub image: image::RgbImage,
    /// How much to change it, in (0, 1]: 1 ignores the image's content entirely (where the
    /// mask repaints, with a mask).
    pub strength: f64,
    /// Inpainting: white (≥ 50% gray) = repaint, black = keep; resized to the output like the
    /// image (see [`crate::inpaint`]).
    pub mask: Option<image::GrayImage>,
    /// diffusers' `padding_mask_crop` (A1111's "inpaint only masked"): inpaint only the
    /// mask's bounding box grown by this many pixels, at the output size, and paste the
    /// result back into the full image.
    pub mask_crop_padding: Option<u32>,
}

/// One ControlNet steering a request (diffusers' `controlnet_conditioning_scale`,
/// `control_guidance_start` / `_end`); several are summed as diffusers' `MultiControlNetModel`.
#[derive(Debug, Clone)]
pub struct ControlNetRequest {
    /// The net: a name the server registered (`--controlnet NAME=SOURCE`), or the CLI's own.
    pub name: String,
    /// The control image (edges, depth, pose… already made), resized to the output.
    pub image: image::RgbImage,
    /// Multiplies every residual (default 1).
    pub scale: f64,
    /// The fraction of the steps where the net starts to steer (default 0).
    pub start: f64,
    /// The fraction of the steps where it stops (default 1).
    pub end: f64,
}

/// A host-side tensor: values and shape.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Row-major values.
    pub data: Vec<f32>,
    /// Shape.
    pub shape: Vec<usize>,
}

/// Noise supplied by the caller instead of drawn from the seeded RNG, so a run can be replayed
/// exactly against another implementation (diffusers' `latents=` argument and its generator).
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseReplay {
    /// Initial noise `[N, 4, H/8, W/8]` (txt2img: before `init_noise_sigma` scaling;
    /// img2img: the noise added to the encoded image).
    pub latents: HostTensor,
    /// Per-step noise `[steps, N, 4, H/8, W/8]` for ancestral schedulers.
    pub step_noise: Option<HostTensor>,
    /// VAE posterior sampling noise `[N, 4, H/8, W/8]` for img2img.
    pub encoder_noise: Option<HostTensor>,
}

/// SDXL's size micro-conditioning (diffusers' `original_size`, `crops_coords_top_left`,
/// `target_size`). `None` fields take diffusers' defaults: the output size and no crop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SizeConditioning {
    /// `(width, height)` the model is told the source image had.
    pub original_size: Option<(usize, usize)>,
    /// `(top, left)` offset of the crop the model is told was taken.
    pub crop_top_left: Option<(usize, usize)>,
    /// `(width, height)` the model is told to aim for.
    pub target_size: Option<(usize, usize)>,
}

impl SizeConditioning {
    /// Whether any field is set.
    pub fn is_set(&self) -> bool {
        *self != Self::default()
    }
}

/// [`SizeConditioning`] with its defaults applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedSizeConditioning {
    /// `(width, height)`.
    pub original_size: (usize, usize),
    /// `(top, left)`.
    pub crop_top_left: (usize, usize),
    /// `(width, height)`.
    pub target_size: (usize, usize),
}

impl ResolvedSizeConditioning {
    /// The six `add_time_ids` in diffusers' order: original (h, w), crop (top, left),
    /// target (h, w).
    pub fn time_ids(&self) -> [f32; 6] {
        let (ow, oh) = self.original_size;
        let (top, left) = self.crop_top_left;
        let (tw, th) = self.target_size;
        [oh, ow, top, left, th, tw].map(|v| v as f32)
    }
}

/// A generation request. `None` means "the model's default".
#[derive(Debug, Clone, Default)]
pub struct GenerateParams {
    /// What to draw.
    pub prompt: String,
    /// What to steer away from (empty when `None`, as diffusers does).
    pub negative_prompt: Option<String>,
    /// Image width in pixels (multiple of 8).
    pub width: Option<usize>,
    /// Image height in pixels (multiple of 8).
    pub height: Option<usize>,
    /// Denoising steps.
    pub steps: Option<usize>,
    /// Classifier-free guidance scale; ≤ 1 disables the unconditional pass.
    pub guidance_scale: Option<f64>,
    /// Scheduler; the checkpoint's own (or the documented fallback) when `None`.
    pub scheduler: Option<SchedulerKind>,
    /// The request's seed (with `chacha`, image `i` uses `seed + i`). Random when `None`.
    pub seed: Option<u64>,
    /// The generator that draws the noise; the model's default when `None`.
    pub rng: Option<RngKind>,
    /// Images to generate (0 is treated as 1).
    pub num_images: usize,
    /// img2img input.
    pub init_image: Option<InitImage>,
    /// Replay noise instead of drawing it.
    pub noise: Option<NoiseReplay>,
    /// SDXL size micro-conditioning (other families reject it).
    pub size_conditioning: SizeConditioning,
    /// ControlNets steering the request, in order (the caller supplies the loaded nets).
    pub controlnets: Vec<ControlNetRequest>,
}

/// Defaults a model applies to unset request fields.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelDefaults {
    /// Default width.
    pub width: usize,
    /// Default height.
    pub height: usize,
    /// Default steps.
    pub steps: usize,
    /// Default guidance scale.
    pub guidance_scale: f64,
    /// Default scheduler.
    pub scheduler: SchedulerKind,
    /// Default noise generator.
    pub rng: RngKind,
}

/// Values that replace a model's own defaults; `None` keeps the model's.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DefaultsOverride {
    /// `(width, height)`.
    pub size: Option<(usize, usize)>,
    /// Steps.
    pub steps: Option<usize>,
    /// Guidance scale.
    pub guidance_scale: Option<f64>,
    /// Scheduler.
    pub scheduler: Option<SchedulerKind>,
    /// Noise generator.
    pub rng: Option<RngKind>,
}

impl DefaultsOverride {
    /// Parses `steps=1,guidance=0,scheduler=euler-a,size=512x512,rng=torch-cpu` (any subset,
    /// any order).
    pub fn parse(text: &str) -> crate::Result<Self> {
        let mut o = DefaultsOverride::default();
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = item.split_once('=').ok_or_else(|| {
                crate::Error::invalid(
                    "model_defaults",
                    format!(
                        "`{item}` is not KEY=VALUE (keys: size, steps, guidance, scheduler, rng)"
                    ),
                )
            })?;
            let bad =
                |why: &str| crate::Error::invalid("model_defaults", format!("`{item}`: {why}"));
            match key.trim() {
                "size" => o.size = Some(parse_size("model_defaults", value)?),
                "steps" => {
                    o.steps = Some(
                        value
                            .trim()
                            .parse()
                            .ok()
                            .filter(|&s: &usize| s > 0)
                            .ok_or_else(|| bad("steps must be a positive whole number"))?,
                    )
                }
                "guidance" => {
                    o.guidance_scale = Some(
                        value
                            .trim()
                            .parse()
                            .ok()
                            .filter(|g: &f64| g.is_finite() && (0.0..=100.0).contains(g))
                            .ok_or_else(|| bad("guidance must be a number in [0, 100]"))?,
                    )
                }
                "scheduler" => o.scheduler = Some(value.trim().parse()?),
                "rng" => o.rng = Some(value.trim().parse()?),
                other => return Err(bad(&format!("unknown key `{other}`"))),
            }
        }
        Ok(o)
    }

    /// Replaces the fields this override sets.
    pub fn apply(&self, d: &mut ModelDefaults) {
        if let Some((w, h)) = self.size {
            d.width = w;
            d.height = h;
        }
        if let Some(s) = self.steps {
            d.steps = s;
        }
        if let Some(g) = self.guidance_scale {
            d.guidance_scale = g;
        }
        if let Some(k) = self.scheduler {
            d.scheduler = k;
        }
        if let Some(r) = self.rng {
            d.rng = r;
        }
    }
}

/// The request after defaults were applied: what actually ran.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedParams {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Steps requested (img2img runs `floor(steps × strength)` of them).
    pub steps: usize,
    /// Guidance scale.
    pub guidance_scale: f64,
    /// Scheduler.
    pub scheduler: SchedulerKind,
    /// The request's seed.
    pub seed: u64,
    /// The generator that drew the noise.
    pub rng: RngKind,
    /// Number of images.
    pub num_images: usize,
    /// img2img strength, if any.
    pub strength: Option<f64>,
    /// SDXL: the size conditioning that ran.
    pub size_conditioning: Option<ResolvedSizeConditioning>,
}

/// Reported after every denoising step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Steps done (1-based).
    pub step: usize,
    /// Steps this run will take.
    pub total_steps: usize,
    /// The timestep just denoised.
    pub timestep: f64,
}

/// One generated image, raw RGB8.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    /// The image.
    pub image: image::RgbImage,
    /// The seed that reproduces exactly this image.
    pub seed: u64,
}

/// Wall-clock time of each engine stage.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTimings {
    /// Tokenising and encoding the prompts.
    pub text_encode: Duration,
    /// The denoising loop (and img2img's VAE encode).
    pub denoise: Duration,
    /// VAE decode to pixels.
    pub decode: Duration,
}

/// The result of one request.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The images, in seed order.
    pub images: Vec<GeneratedImage>,
    /// What ran.
    pub params: ResolvedParams,
    /// Stage timings.
    pub timings: StageTimings,
}

/// Parses `WIDTHxHEIGHT` (e.g. `1024x768`) for the request field `field`.
pub fn parse_size(field: &'static str, text: &str) -> crate::Result<(usize, usize)> {
    parse_pair(field, text, 'x', "WIDTHxHEIGHT, e.g. 1024x768")
}

/// Parses `TOP,LEFT` (e.g. `0,0`) for the request field `field`.
pub fn parse_offset(field: &'static str, text: &str) -> crate::Result<(usize, usize)> {
    parse_pair(field, text, ',', "TOP,LEFT in pixels, e.g. 0,0")
}

fn parse_pair(
    field: &'static str,
    text: &str,
    sep: char,
    expected: &str,
) -> crate::Result<(usize, usize)> {
    let bad = || crate::Error::invalid(field, format!("`{text}` is not {expected}"));
    let (a, b) = text.trim().split_once(sep).ok_or_else(bad)?;
    let a = a.trim().parse().map_err(|_| bad())?;
    let b = b.trim().parse().map_err(|_| bad())?;
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_overrides_parse_and_apply_and_name_bad_items() {
        let o = DefaultsOverride::parse(
            "steps=1, guidance=0,scheduler=euler-a,size=768x512,rng=torch-cpu",
        )
        .unwrap();
        let mut d = ModelDefaults {
            width: 512,
            height: 512,
            steps: 50,
            guidance_scale: 7.5,
            scheduler: SchedulerKind::Ddim,
            rng: RngKind::ChaCha,
        };
        o.apply(&mut d);
        assert_eq!(
            (d.width, d.height, d.steps, d.guidance_scale),
            (768, 512, 1, 0.0)
        );
        assert_eq!(d.scheduler, SchedulerKind::EulerAncestral);
        assert_eq!(d.rng, RngKind::TorchCpu);
        assert_eq!(
            DefaultsOverride::parse("").unwrap(),
            DefaultsOverride::default()
        );
        for bad in [
            "steps=0",
            "guidance=-1",
            "size=512",
            "colour=red",
            "steps",
            "scheduler=k_lms",
            "rng=mt",
        ] {
            let e = DefaultsOverride::parse(bad).unwrap_err().to_string();
            assert!(
                e.contains("model_defaults") || e.contains("scheduler") || e.contains("rng"),
                "{bad}: {e}"
            );
        }
    }
}
