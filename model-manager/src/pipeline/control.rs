//! ControlNets in a run, as diffusers' ControlNet pipelines drive them: the control image in
//! [0, 1] at the output's size, repeated for the batch and for classifier-free guidance; each
//! net run on the UNet's own latent input (the 4 latent channels, before inpainting's extra
//! ones), timestep and text (SDXL: and added conditioning), only on the steps inside its
//! `[start, end]` window; the scaled residuals of several nets summed.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::controlnet::{ControlInput, ControlNetModel, ControlResiduals};
use crate::error::{Error, Result};
use crate::image_io::image_to_unit_tensor;
use crate::params::ControlNetRequest;
use crate::unet::AddedConditioning;

/// Most ControlNets one request may combine.
pub const MAX_CONTROLNETS: usize = 4;

/// One ControlNet of a run, its image prepared.
pub(super) struct ActiveControl {
    net: Arc<ControlNetModel>,
    /// `[N, 3, H, W]` (guess mode) or `[N × CFG halves, 3, H, W]`, in [0, 1].
    image: Tensor,
    scale: f64,
    start: f64,
    end: f64,
    /// diffusers' guess mode (forced by `global_pool_conditions`): with guidance the net sees
    /// only the conditional half; the unconditional half gets no residuals.
    guess: bool,
}

/// The UNet's text conditioning of one call, for the nets to share.
pub(super) struct CallConditioning<'a> {
    pub context: &'a Tensor,
    pub added: Option<&'a AddedConditioning>,
}

/// The rules of a request's ControlNets (part of [`super::ModelDescription::resolve`]): at
/// most [`MAX_CONTROLNETS`], scales finite in [0, 100], windows `0 ≤ start < end ≤ 1`.
pub(super) fn check_requests(requests: &[ControlNetRequest]) -> Result<()> {
    if requests.len() > MAX_CONTROLNETS {
        return Err(Error::invalid(
            "controlnets",
            format!("{} given; at most {MAX_CONTROLNETS}", requests.len()),
        ));
    }
    for r in requests {
        let name = &r.name;
        if !r.scale.is_finite() || !(0.0..=100.0).contains(&r.scale) {
            return Err(Error::invalid(
                "controlnets",
                format!("`{name}`: scale {} is not in [0, 100]", r.scale),
            ));
        }
        let in_unit = |v: f64| v.is_finite() && (0.0..=1.0).contains(&v);
        if !in_unit(r.start) || !in_unit(r.end) || r.start >= r.end {
            return Err(Error::invalid(
                "controlnets",
                format!(
                    "`{name}`: guidance window [{}, {}] must satisfy 0 ≤ start < end ≤ 1",
                    r.start, r.end
                ),
            ));
        }
    }
    Ok(())
}

impl ActiveControl {
    /// Prepares `request`'s image for `net`: resized to `width × height`, repeated for the
    /// `n` images and, unless in guess mode, for both halves of guidance (`cfg`).
    pub fn new(
        net: Arc<ControlNetModel>,
        request: &ControlNetRequest,
        (width, height, n): (usize, usize, usize),
        cfg: bool,
        dtype: candle_core::DType,
        device: &Device,
    ) -> Result<Self> {
        let guess = net.config().global_pool_conditions;
        let rows = if cfg && !guess { 2 * n } else { n };
        let image = image_to_unit_tensor(&request.image, width, height, device)?
            .repeat((rows, 1, 1, 1))?
            .to_dtype(dtype)?;
        Ok(ActiveControl {
            net,
            image,
            scale: request.scale,
            start: request.start,
            end: request.end,
            guess,
        })
    }

    /// Whether the net steers evaluation `k` of `len` (diffusers' `controlnet_keep`).
    fn keeps(&self, k: usize, len: usize) -> bool {
        let (k, len) = (k as f64, len as f64);
        !(k / len < self.start || (k + 1.0) / len > self.end)
    }
}

/// The summed residuals of every net active at evaluation `k` of `len` for the latent input
/// `x` (`[N, 4, h, w]`, scaled, not yet duplicated for guidance), or `None` when none is.
pub(super) fn residuals(
    controls: &[ActiveControl],
    x: &Tensor,
    t: &Tensor,
    cond: &CallConditioning,
    cfg: bool,
    (k, len): (usize, usize),
) -> Result<Option<ControlResiduals>> {
    let mut total: Option<ControlResiduals> = None;
    for c in controls.iter().filter(|c| c.keeps(k, len)) {
        let input = ControlInput {
            image: &c.image,
            scale: c.scale,
            guess_mode: c.guess,
        };
        let res = if cfg && c.guess {
            let n = x.dim(0)?;
            let half = |t: &Tensor| t.narrow(0, n, n);
            let added = match cond.added {
                Some(a) => Some(AddedConditioning {
                    text_embeds: half(&a.text_embeds)?,
                    time_ids: half(&a.time_ids)?,
                }),
                None => None,
            };
            let cond_t = t.narrow(0, n, n)?;
            let res = c
                .net
                .forward(x, &cond_t, &half(cond.context)?, added.as_ref(), &input)?;
            with_zero_uncond_half(res)?
        } else {
            let sample = match cfg {
                true => Tensor::cat(&[x, x], 0)?,
                false => x.clone(),
            };
            c.net
                .forward(&sample, t, cond.context, cond.added, &input)?
        };
        match &mut total {
            None => total = Some(res),
            Some(acc) => acc.accumulate(&res)?,
        }
    }
    Ok(total)
}

/// Guess mode with guidance: zeros for the unconditional half before the conditional one.
fn with_zero_uncond_half(res: ControlResiduals) -> Result<ControlResiduals> {
    let pad = |t: &Tensor| -> Result<Tensor> { Ok(Tensor::cat(&[&t.zeros_like()?, t], 0)?) };
    Ok(ControlResiduals {
        down: res.down.iter().map(pad).collect::<Result<_>>()?,
        mid: pad(&res.mid)?,
    })
}
