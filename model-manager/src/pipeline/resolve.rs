//! The one owner of the request rules: applying a model's defaults to a request and checking
//! every field — and the operator's limits on the resolved values — before anything runs. The
//! CLI, the server (before it queues a job) and the engine (before it runs one) all call
//! [`ModelDescription::resolve`], so the same mistake gets the same message everywhere.

use super::{random_seed, ModelDescription, StableDiffusionPipeline};
use crate::error::{Error, Result};
use crate::params::*;

/// Most pixels along one side of an image, whatever the operator allows.
pub const MAX_SIDE: usize = 8192;
/// Most denoising steps, whatever the operator allows.
pub const MAX_STEPS: usize = 10_000;
/// Most images in one request, whatever the operator allows.
pub const MAX_IMAGES: usize = 64;

/// An operator's limits on what one request may resolve to (`None`: only the built-in bounds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestLimits {
    /// Largest width × height of each image.
    pub max_pixels: Option<u64>,
    /// Most denoising steps.
    pub max_steps: Option<usize>,
    /// Most images per request.
    pub max_images: Option<usize>,
}

impl StableDiffusionPipeline {
    /// Applies defaults and checks every field, naming the first bad one (no operator limits).
    pub fn resolve(&self, p: &GenerateParams) -> Result<ResolvedParams> {
        self.description.resolve(p, &RequestLimits::default())
    }

    /// [`StableDiffusionPipeline::resolve`] within an operator's limits.
    pub fn resolve_within(
        &self,
        p: &GenerateParams,
        limits: &RequestLimits,
    ) -> Result<ResolvedParams> {
        self.description.resolve(p, limits)
    }
}

impl ModelDescription {
    /// Applies this model's defaults to `p` and checks every field and `limits` on the
    /// resolved values, naming the first bad field. An unset seed is drawn here: callers that
    /// must report it (the server, at acceptance) store the resolved one.
    pub fn resolve(&self, p: &GenerateParams, limits: &RequestLimits) -> Result<ResolvedParams> {
        let scale = self.vae_scale_factor;
        let from_latents = |axis: usize| p.noise.as_ref().map(|n| n.latents.shape[axis] * scale);
        let (default_w, default_h) = match &p.init_image {
            // Inpainting a crop renders it at the model's size, as diffusers does.
            Some(init) if init.mask_crop_padding.is_some() => {
                (self.defaults.width, self.defaults.height)
            }
            Some(init) => (
                init.image.width() as usize / scale * scale,
                init.image.height() as usize / scale * scale,
            ),
            None => (
                from_latents(3).unwrap_or(self.defaults.width),
                from_latents(2).unwrap_or(self.defaults.height),
            ),
        };
        let width = p.width.unwrap_or(default_w);
        let height = p.height.unwrap_or(default_h);
        for (field, v) in [("width", width), ("height", height)] {
            if v == 0 || v % 8 != 0 || v % scale != 0 {
                return Err(Error::invalid(
                    field,
                    format!("{v} is not a positive multiple of {}", scale.max(8)),
                ));
            }
            if v > MAX_SIDE {
                return Err(Error::invalid(
                    field,
                    format!("{v} exceeds the largest side of {MAX_SIDE} pixels"),
                ));
            }
        }
        if let Some(max) = limits.max_pixels {
            let pixels = width as u64 * height as u64;
            if pixels > max {
                return Err(Error::invalid(
                    "width",
                    format!(
                        "{width}×{height} exceeds this server's limit of {max} pixels per image"
                    ),
                ));
            }
        }
        let steps = p.steps.unwrap_or(self.defaults.steps);
        if steps == 0 {
            return Err(Error::invalid("steps", "must be at least 1"));
        }
        let max_steps = limits.max_steps.unwrap_or(MAX_STEPS).min(MAX_STEPS);
        if steps > max_steps {
            return Err(Error::invalid(
                "steps",
                format!("{steps} exceeds this server's limit of {max_steps}"),
            ));
        }
        let guidance_scale = p.guidance_scale.unwrap_or(self.defaults.guidance_scale);
        if !guidance_scale.is_finite() || !(0.0..=100.0).contains(&guidance_scale) {
            return Err(Error::invalid(
                "guidance_scale",
                format!("{guidance_scale} is not a finite number in [0, 100]"),
            ));
        }
        let num_images = p.num_images.max(1);
        let max_images = limits.max_images.unwrap_or(MAX_IMAGES).min(MAX_IMAGES);
        if num_images > max_images {
            return Err(Error::invalid(
                "num_images",
                format!("{num_images} exceeds this server's limit of {max_images}"),
            ));
        }
        super::control::check_requests(&p.controlnets)?;
        let masked = p.init_image.as_ref().is_some_and(|i| i.mask.is_some());
        if self.inpainting_unet && !masked {
            return Err(Error::invalid(
                "mask",
                "this is an inpainting model: it needs an init_image and a mask",
            ));
        }
        if let Some(init) = &p.init_image {
            if let (Some(mask), Some(_)) = (&init.mask, init.mask_crop_padding) {
                if mask.dimensions() != init.image.dimensions() {
                    return Err(Error::invalid(
                        "mask",
                        "must be the init image's size to crop around it (mask_crop_padding)",
                    ));
                }
                if mask.as_raw().iter().all(|&v| v == 0) {
                    return Err(Error::invalid(
                        "mask",
                        "has no pixel to repaint, nothing to crop around",
                    ));
                }
            }
        }
        if masked && p.noise.is_some() {
            return Err(Error::invalid(
                "latents",
                "noise replay files are not supported with a mask; use rng torch-cpu and a seed",
            ));
        }
        let strength = match &p.init_image {
            Some(init) => {
                let s = init.strength;
                if !(s > 0.0 && s <= 1.0) {
                    return Err(Error::invalid("strength", format!("{s} is not in (0, 1]")));
                }
                if (steps as f64 * s) as usize == 0 {
                    return Err(Error::invalid(
                        "strength",
                        format!("steps × strength = {steps} × {s} < 1: nothing would be denoised"),
                    ));
                }
                Some(s)
            }
            None => None,
        };
        let seed = p.seed.unwrap_or_else(random_seed);
        if let Some(noise) = &p.noise {
            let expect = [
                num_images,
                self.latent_channels,
                height / scale,
                width / scale,
            ];
            check_shape("latents", &noise.latents.shape, &expect)?;
            if let Some(e) = &noise.encoder_noise {
                let one = [1, expect[1], expect[2], expect[3]];
                if e.shape != one {
                    check_shape("latents", &e.shape, &expect)?;
                }
            }
            if let Some(s) = &noise.step_noise {
                if s.shape.len() != 5 || s.shape[1..] != expect {
                    return Err(Error::invalid(
                        "latents",
                        format!(
                            "`step_noise` has shape {:?}, expected [steps, {}, {}, {}, {}]",
                            s.shape, expect[0], expect[1], expect[2], expect[3]
                        ),
                    ));
                }
            }
        }
        let size_conditioning =
            self.resolve_size_conditioning(&p.size_conditioning, width, height)?;
        Ok(ResolvedParams {
            width,
            height,
            steps,
            guidance_scale,
            scheduler: p.scheduler.unwrap_or(self.defaults.scheduler),
            seed,
            rng: p.rng.unwrap_or(self.defaults.rng),
            num_images,
            strength,
            size_conditioning,
        })
    }

    /// SDXL: applies diffusers' defaults (the output size, no crop); other families reject
    /// size conditioning instead of ignoring it.
    fn resolve_size_conditioning(
        &self,
        s: &SizeConditioning,
        width: usize,
        height: usize,
    ) -> Result<Option<ResolvedSizeConditioning>> {
        if !self.family.has_size_conditioning() {
            if let Some(field) = [
                ("original_size", s.original_size.is_some()),
                ("crop_top_left", s.crop_top_left.is_some()),
                ("target_size", s.target_size.is_some()),
            ]
            .iter()
            .find_map(|(f, set)| set.then_some(*f))
            {
                return Err(Error::invalid(
                    field,
                    format!(
                        "size conditioning is an SDXL feature; this {} model has none",
                        self.family
                    ),
                ));
            }
            return Ok(None);
        }
        const LIMIT: usize = 16384;
        for (field, (a, b)) in [
            ("original_size", s.original_size.unwrap_or((width, height))),
            ("target_size", s.target_size.unwrap_or((width, height))),
        ] {
            if a == 0 || b == 0 || a > LIMIT || b > LIMIT {
                return Err(Error::invalid(
                    field,
                    format!("{a}x{b} is not a size between 1 and {LIMIT} pixels per side"),
                ));
            }
        }
        let crop = s.crop_top_left.unwrap_or((0, 0));
        if crop.0 > LIMIT || crop.1 > LIMIT {
            return Err(Error::invalid(
                "crop_top_left",
                format!("{},{} is beyond {LIMIT} pixels", crop.0, crop.1),
            ));
        }
        Ok(Some(ResolvedSizeConditioning {
            original_size: s.original_size.unwrap_or((width, height)),
            crop_top_left: crop,
            target_size: s.target_size.unwrap_or((width, height)),
        }))
    }
}

fn check_shape(field: &'static str, got: &[usize], expect: &[usize; 4]) -> Result<()> {
    if got != expect {
        return Err(Error::invalid(field, format!("shape {got:?} does not match the request, expected {expect:?} ([num_images, channels, height/8, width/8])")));
    }
    Ok(())
}
