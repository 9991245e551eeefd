//! The one place where wire types meet domain types: validation of `GenerateRequest` into a
//! [`JobRequest`] (every field checked before anything is queued, errors naming the field) and
//! conversion of jobs and events back to protobuf.

use crate::serve::engine::loras::{LoraInfo, MAX_LORAS_PER_REQUEST};
use crate::serve::engine::models::ModelTable;
use crate::serve::job::backend::Accepted;
use crate::serve::job::error::RequestError;
use crate::serve::job::store::JobRequest;
use jhakaas_model_manager::image_io::decode_image_for;
use jhakaas_model_manager::inpaint::{to_pil_gray, Outpaint};
use jhakaas_model_manager::lora::{LoraAdapter, LoraPlan};
use jhakaas_model_manager::params::ControlNetRequest;
use jhakaas_model_manager::pipeline::{random_seed, RequestLimits, MAX_CONTROLNETS};
use jhakaas_model_manager::{
    GenerateParams, ImageFormat, InitImage, RngKind, SchedulerKind, SizeConditioning,
};
use jhakaas_proto::v1 as pb;
use prost::Message;
use std::time::Instant;

/// Request limits of this server: the wire's own and, through [`Limits::request_limits`], the
/// bounds the engine's rules check on resolved requests.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest width × height.
    pub max_pixels: u64,
    /// Most denoising steps.
    pub max_steps: u32,
    /// Most images per request.
    pub max_images: u32,
    /// Largest encoded init image.
    pub max_init_image_bytes: usize,
}

impl Limits {
    /// The limits the engine's rules enforce on a resolved request.
    pub fn request_limits(&self) -> RequestLimits {
        RequestLimits {
            max_pixels: Some(self.max_pixels),
            max_steps: Some(self.max_steps as usize),
            max_images: Some(self.max_images as usize),
        }
    }
}

const MAX_PROMPT_CHARS: usize = 8192;
const MAX_REQUEST_ID_CHARS: usize = 128;

/// A LoRA adapter as `ListLoras` reports it.
pub fn lora_info(l: LoraInfo) -> pb::LoraInfo {
    pb::LoraInfo {
        name: l.name,
        bytes: l.bytes,
    }
}

fn invalid(field: &str, reason: impl std::fmt::Display) -> RequestError {
    RequestError::invalid(field, reason)
}

/// The engine's refusal of a request, naming the field as the wire spells it.
fn refused(e: jhakaas_model_manager::Error) -> RequestError {
    match e {
        jhakaas_model_manager::Error::InvalidParam { field, reason } => {
            let wire = match field {
                "original_size" => "size_conditioning.original_width",
                "target_size" => "size_conditioning.target_width",
                "crop_top_left" => "size_conditioning.crop_top",
                "lora" => "loras",
                other => other,
            };
            invalid(wire, reason)
        }
        other => RequestError::Refused(other.to_string()),
    }
}

/// A validated request ready for a job store: [`job_request`], with the seed it fixed written
/// back into the wire form the store keeps (so any replica runs the same job). Decodes the
/// init image: call it off the async threads.
pub fn accept(
    mut wire: pb::GenerateRequest,
    models: &ModelTable,
    limits: &Limits,
    deadline: Option<Instant>,
) -> Result<Accepted, RequestError> {
    let request = job_request(&wire, models, limits, deadline)?;
    wire.seed = request.params.seed;
    Ok(Accepted {
        request,
        wire: wire.encode_to_vec(),
    })
}

/// Validates a request: an unknown model or adapter is [`RequestError::Unknown`], anything
/// else [`RequestError::Invalid`] (or `Refused` by the engine), each naming the field as the
/// wire spells it. Borrows the request, so a caller keeping the wire form copies no init image.
pub fn job_request(
    req: &pb::GenerateRequest,
    models: &ModelTable,
    limits: &Limits,
    deadline: Option<Instant>,
) -> Result<JobRequest, RequestError> {
    if req.request_id.chars().count() > MAX_REQUEST_ID_CHARS {
        return Err(invalid(
            "request_id",
            format!("longer than {MAX_REQUEST_ID_CHARS} characters"),
        ));
    }
    let model = model_name(&req.model, models)?;
    check_prompts(&req.prompt, &req.negative_prompt)?;
    let size_conditioning = size_conditioning(req.size_conditioning.as_ref())?;
    let scheduler = if req.scheduler.is_empty() {
        None
    } else {
        Some(req.scheduler.parse::<SchedulerKind>().map_err(refused)?)
    };
    let rng = if req.rng.is_empty() {
        None
    } else {
        Some(req.rng.parse::<RngKind>().map_err(refused)?)
    };
    let format = output_format(req.output_format)?;
    let loras = loras(&req.loras, models)?;
    let init_image = init_image(req, limits)?;
    let non_zero = |v: u32| (v != 0).then_some(v as usize);
    let g = req.guidance_scale;
    let mut params = GenerateParams {
        prompt: req.prompt.clone(),
        negative_prompt: (!req.negative_prompt.is_empty()).then(|| req.negative_prompt.clone()),
        width: non_zero(req.width),
        height: non_zero(req.height),
        steps: non_zero(req.steps),
        guidance_scale: (g != 0.0).then_some(g as f64),
        scheduler,
        seed: req.seed,
        rng,
        num_images: req.num_images.max(1) as usize,
        init_image,
        noise: None,
        size_conditioning,
        controlnets: controlnets(&req.controlnets, models, &model, limits)?,
    };
    // The engine's rules (sizes after defaults, steps, guidance, strength, size conditioning,
    // and this server's limits on the resolved values) run before the job is queued when the
    // model's config files were read at start-up; the engine applies the same rules again
    // before it runs the job (the only check for a model whose files were not on disk).
    let seed = match models.description(&model) {
        Some(description) => {
            let seed = description
                .resolve(&params, &limits.request_limits())
                .map_err(refused)?
                .seed;
            // The adapters' keys and shapes against this model's weights, from the headers.
            if !loras.is_empty() {
                let targets = models
                    .lora_targets(&model, description.family.kind())
                    .map_err(refused)?;
                LoraPlan::check(&loras, &targets).map_err(refused)?;
            }
            seed
        }
        None => params.seed.unwrap_or_else(random_seed),
    };
    // Fixed at acceptance, so the job reports it from the start and a rerun gives the same image.
    params.seed = Some(seed);
    Ok(JobRequest {
        request_id: req.request_id.clone(),
        model,
        params,
        limits: limits.request_limits(),
        loras,
        format,
        deadline,
    })
}

/// The adapters a request names, found in the worker's LoRA folder.
fn loras(wire: &[pb::LoraAdapter], models: &ModelTable) -> Result<Vec<LoraAdapter>, RequestError> {
    if wire.len() > MAX_LORAS_PER_REQUEST {
        return Err(invalid(
            "loras",
            format!("{} adapters; at most {MAX_LORAS_PER_REQUEST}", wire.len()),
        ));
    }
    wire.iter()
        .enumerate()
        .map(|(i, l)| {
            let path = models.loras().find(&l.name, &format!("loras[{i}].name"))?;
            let weight = if l.weight == 0.0 {
                1.0
            } else {
                l.weight as f64
            };
            if !weight.is_finite() || weight.abs() > 100.0 {
                return Err(invalid(
                    &format!("loras[{i}].weight"),
                    format!("{} is not a finite number within ±100", l.weight),
                ));
            }
            Ok(LoraAdapter { path, weight })
        })
        .collect()
}

/// The model a request names (empty: the default), if this server serves it.
fn model_name(requested: &str, models: &ModelTable) -> Result<String, RequestError> {
    let model = if requested.is_empty() {
        models.default_model().to_string()
    } else {
        requested.to_string()
    };
    if models.spec(&model).is_none() {
        let names: Vec<&str> = models.specs().iter().map(|s| s.name.as_str()).collect();
        return Err(RequestError::unknown(
            "model",
            format!(
                "`{model}` is not served here (models: {})",
                names.join(", ")
            ),
        ));
    }
    Ok(model)
}

fn check_prompts(prompt: &str, negative: &str) -> Result<(), RequestError> {
    if prompt.trim().is_empty() {
        return Err(invalid("prompt", "must not be empty"));
    }
    if prompt.chars().count() > MAX_PROMPT_CHARS || negative.chars().count() > MAX_PROMPT_CHARS {
        return Err(invalid(
            "prompt",
            format!("longer than {MAX_PROMPT_CHARS} characters"),
        ));
    }
    Ok(())
}

fn output_format(value: i32) -> Result<ImageFormat, RequestError> {
    match pb::OutputFormat::try_from(value) {
        Ok(pb::OutputFormat::Unspecified | pb::OutputFormat::Png) => Ok(ImageFormat::Png),
        Ok(pb::OutputFormat::Jpeg) => Ok(ImageFormat::Jpeg),
        Ok(pb::OutputFormat::Webp) => Ok(ImageFormat::Webp),
        Err(_) => Err(invalid("output_format", format!("unknown value {value}"))),
    }
}

/// The request's ControlNets: registered names, decoded images within the limits, proto3's
/// zero defaults (scale 0 and end 0 mean 1), and — when both configs were read — each net
/// checked against the model's UNet.
fn controlnets(
    wire: &[pb::ControlNetInput],
    models: &ModelTable,
    model: &str,
    limits: &Limits,
) -> Result<Vec<ControlNetRequest>, RequestError> {
    if wire.len() > MAX_CONTROLNETS {
        return Err(invalid(
            "controlnets",
            format!("{} given; at most {MAX_CONTROLNETS}", wire.len()),
        ));
    }
    let description = models.description(model);
    wire.iter()
        .map(|c| {
            let Some(spec) = models.controlnet(&c.name) else {
                let names: Vec<&str> = models
                    .controlnets()
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect();
                return Err(invalid(
                    "controlnets",
                    format!(
                        "unknown ControlNet `{}`; registered: [{}]",
                        c.name,
                        names.join(", ")
                    ),
                ));
            };
            if let (Some(d), Ok(config)) = (&description, &spec.config) {
                d.check_controlnet(&c.name, config).map_err(refused)?;
            }
            if c.image.is_empty() {
                return Err(invalid("controlnets", format!("`{}` has no image", c.name)));
            }
            let image = decode_bounded(&c.image, "control_image", limits)?;
            Ok(ControlNetRequest {
                name: c.name.clone(),
                image,
                scale: if c.scale == 0.0 { 1.0 } else { c.scale as f64 },
                start: c.start as f64,
                end: if c.end == 0.0 { 1.0 } else { c.end as f64 },
            })
        })
        .collect()
}

/// The decoded init image with its mask (`mask`, or the canvas and mask `outpaint` makes) and
/// strength (0 = unset: 1 when inpainting; the engine's rules check the range).
fn init_image(
    req: &pb::GenerateRequest,
    limits: &Limits,
) -> Result<Option<InitImage>, RequestError> {
    let outpaint = req.outpaint.as_ref().map(|o| Outpaint {
        left: o.left,
        top: o.top,
        right: o.right,
        bottom: o.bottom,
    });
    if req.init_image.is_empty() {
        for (given, field) in [
            (req.strength != 0.0, "strength"),
            (!req.mask.is_empty(), "mask"),
            (outpaint.is_some(), "outpaint"),
        ] {
            if given {
                return Err(invalid(field, "given without an init_image"));
            }
        }
        return Ok(None);
    }
    let image = decode_bounded(&req.init_image, "init_image", limits)?;
    let (image, mask) = match (req.mask.is_empty(), outpaint) {
        (false, Some(_)) => return Err(invalid("outpaint", "cannot be combined with a mask")),
        (false, None) => {
            let mask = decode_bounded(&req.mask, "mask", limits)?;
            (image, Some(to_pil_gray(&mask)))
        }
        (true, Some(o)) => {
            let (canvas, mask) = o.apply(&image, limits.max_pixels).map_err(refused)?;
            (canvas, Some(mask))
        }
        (true, None) => (image, None),
    };
    let strength = match req.strength == 0.0 && mask.is_some() {
        true => 1.0,
        false => req.strength as f64,
    };
    if req.mask_crop_padding.is_some() && req.mask.is_empty() {
        return Err(invalid("mask_crop_padding", "needs a mask"));
    }
    Ok(Some(InitImage {
        image,
        strength,
        mask,
        mask_crop_padding: req.mask_crop_padding,
    }))
}

/// An encoded image of the request field `field`, within the server's byte and pixel limits.
fn decode_bounded(
    bytes: &[u8],
    field: &'static str,
    limits: &Limits,
) -> Result<image::RgbImage, RequestError> {
    if bytes.len() > limits.max_init_image_bytes {
        return Err(invalid(
            field,
            format!(
                "{} bytes exceed this server's limit of {}",
                bytes.len(),
                limits.max_init_image_bytes
            ),
        ));
    }
    decode_image_for(bytes, limits.max_pixels, field).map_err(refused)
}

/// Zero fields are unset; a size needs both sides or neither.
fn size_conditioning(sc: Option<&pb::SizeConditioning>) -> Result<SizeConditioning, RequestError> {
    let Some(sc) = sc else {
        return Ok(SizeConditioning::default());
    };
    // Only the wire's shape here (a size is both sides or neither); the engine's rules bound
    // the values.
    let size = |field: &str, w: u32, h: u32| -> Result<Option<(usize, usize)>, RequestError> {
        match (w, h) {
            (0, 0) => Ok(None),
            (w, h) if w == 0 || h == 0 => Err(invalid(
                field,
                format!("{w}x{h}: give both sides or neither"),
            )),
            (w, h) => Ok(Some((w as usize, h as usize))),
        }
    };
    Ok(SizeConditioning {
        original_size: size(
            "size_conditioning.original_width",
            sc.original_width,
            sc.original_height,
        )?,
        crop_top_left: (sc.crop_top != 0 || sc.crop_left != 0)
            .then_some((sc.crop_top as usize, sc.crop_left as usize)),
        target_size: size(
            "size_conditioning.target_width",
            sc.target_width,
            sc.target_height,
        )?,
    })
}
