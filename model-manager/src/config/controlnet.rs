//! `config.json` of a diffusers `ControlNetModel` (`controlnet/config.json` in a pipeline).
//!
//! A ControlNet is a UNet's encoder half (conv_in, time and added embeddings, down blocks, mid
//! block) plus a conditioning-image embedding and one 1×1 conv per output. The encoder fields
//! carry the UNet's names and defaults, so they are read with the UNet's parser
//! ([`UNetConfig`]); this module owns the ControlNet's own fields and what a ControlNet must
//! share with the UNet it steers.

use super::{require, UNetConfig, UNetPlan};
use crate::config::BlockKind;
use crate::error::{Error, Result};
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// How errors name a ControlNet's config file.
pub const CONTROLNET_CONFIG: &str = "controlnet/config.json";

/// The encoder fields `ControlNetModel.__init__` takes with the UNet's meaning. Others that a
/// UNet config may carry (`time_embedding_dim`, `conv_in_kernel`, `center_input_sample`, …)
/// are not read by diffusers' ControlNet, so they are dropped before parsing.
const ENCODER_FIELDS: &[&str] = &[
    "in_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "mid_block_type",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "encoder_hid_dim",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "class_embed_type",
    "addition_embed_type",
    "addition_time_embed_dim",
    "upcast_attention",
    "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim",
];

/// A diffusers `ControlNetModel` config.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "Value")]
pub struct ControlNetConfig {
    /// The encoder half, as a UNet config (its up blocks mirror the down blocks and are
    /// never built).
    pub encoder: UNetConfig,
    /// Channels of the control image (3: RGB).
    pub conditioning_channels: usize,
    /// `rgb`, or `bgr` (the image's channels are reversed first).
    pub controlnet_conditioning_channel_order: String,
    /// Channels of the conditioning embedding's convs; each step after the first halves the
    /// image size, so there are log2(VAE scale factor) + 1 of them.
    pub conditioning_embedding_out_channels: Option<Vec<usize>>,
    /// Outputs averaged over space (shuffle ControlNets).
    pub global_pool_conditions: bool,
    /// Class-embedding table size (not supported unless null).
    pub num_class_embeds: Option<usize>,
    /// Text projection before the encoder (not supported unless null).
    pub encoder_hid_dim_type: Option<String>,
}

/// The ControlNet's own fields, with diffusers' defaults.
#[derive(Deserialize)]
struct OwnFields {
    #[serde(default = "three")]
    conditioning_channels: usize,
    #[serde(default = "rgb")]
    controlnet_conditioning_channel_order: String,
    #[serde(default = "default_embedding_channels")]
    conditioning_embedding_out_channels: Option<Vec<usize>>,
    #[serde(default)]
    global_pool_conditions: bool,
    #[serde(default)]
    num_class_embeds: Option<usize>,
    #[serde(default)]
    encoder_hid_dim_type: Option<String>,
}

fn three() -> usize {
    3
}
fn rgb() -> String {
    "rgb".into()
}
fn default_embedding_channels() -> Option<Vec<usize>> {
    Some(vec![16, 32, 96, 256])
}

/// `CrossAttnDownBlock2D` → `CrossAttnUpBlock2D`, `DownBlock2D` → `UpBlock2D`, reversed: the
/// up half the UNet parser wants (unknown names pass through; the down list reports them).
fn mirrored_up_blocks(down: &Value) -> Value {
    let names = down.as_array().cloned().unwrap_or_default();
    Value::Array(
        names
            .iter()
            .rev()
            .map(|n| match n.as_str() {
                Some(s) => Value::String(s.replace("Down", "Up")),
                None => n.clone(),
            })
            .collect(),
    )
}

impl TryFrom<Value> for ControlNetConfig {
    type Error = String;

    fn try_from(value: Value) -> std::result::Result<Self, String> {
        let own: OwnFields = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
        let all = value
            .as_object()
            .ok_or("a ControlNet config is a JSON object")?;
        let mut encoder: Map<String, Value> = ENCODER_FIELDS
            .iter()
            .filter_map(|k| all.get(*k).map(|v| (k.to_string(), v.clone())))
            .collect();
        // ControlNetModel's defaults where the UNet has none.
        let defaults = [
            (
                "down_block_types",
                json!([
                    "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D",
                    "DownBlock2D"
                ]),
            ),
            ("block_out_channels", json!([320, 640, 1280, 1280])),
            ("cross_attention_dim", json!(1280)),
        ];
        for (k, v) in defaults {
            encoder.entry(k).or_insert(v);
        }
        let up = mirrored_up_blocks(&encoder["down_block_types"]);
        encoder.insert("up_block_types".into(), up);
        let encoder: UNetConfig =
            serde_json::from_value(Value::Object(encoder)).map_err(|e| e.to_string())?;
        Ok(Self {
            encoder,
            conditioning_channels: own.conditioning_channels,
            controlnet_conditioning_channel_order: own.controlnet_conditioning_channel_order,
            conditioning_embedding_out_channels: own.conditioning_embedding_out_channels,
            global_pool_conditions: own.global_pool_conditions,
            num_class_embeds: own.num_class_embeds,
            encoder_hid_dim_type: own.encoder_hid_dim_type,
        })
    }
}

/// A ControlNet config, validated and expanded.
#[derive(Debug, Clone)]
pub struct ControlNetPlan {
    /// The encoder half (its `up` list is unused).
    pub encoder: UNetPlan,
    /// Channels of the latents it reads.
    pub in_channels: usize,
    /// Channels of the control image.
    pub conditioning_channels: usize,
    /// Whether the control image is reversed to BGR first.
    pub bgr: bool,
    /// Channels of the conditioning embedding's convs (at least one).
    pub embedding_channels: Vec<usize>,
    /// Outputs averaged over space.
    pub global_pool: bool,
}

impl ControlNetPlan {
    /// How many times larger than the latents the control image is: 2^(convs − 1).
    pub fn image_scale(&self) -> usize {
        1 << (self.embedding_channels.len() - 1)
    }
}

/// One skip connection of an encoder: its channels and how many times it was downsampled.
pub type Skip = (usize, usize);

/// The skip connections of an encoder with `plan`, in diffusers' order: conv_in's output,
/// then each down block's resnets and downsampler.
pub fn skip_connections(plan: &UNetPlan) -> Vec<Skip> {
    let n = plan.down.len();
    let first = plan.down.first().map_or(0, |b| b.out_channels);
    let mut skips = vec![(first, 0)];
    for (i, block) in plan.down.iter().enumerate() {
        skips.extend(std::iter::repeat_n(
            (block.out_channels, i),
            block.num_layers,
        ));
        if i + 1 < n {
            skips.push((block.out_channels, i + 1));
        }
    }
    skips
}

/// Widths of the text states an encoder's attention layers attend to.
fn attended_dims(plan: &UNetPlan) -> Vec<usize> {
    plan.down
        .iter()
        .filter(|b| b.kind == BlockKind::CrossAttn)
        .map(|b| b.cross_attention_dim)
        .chain(plan.mid.map(|(_, _, dim)| dim))
        .collect()
}

impl ControlNetConfig {
    /// Validates the config (errors name [`CONTROLNET_CONFIG`]) and expands it.
    pub fn plan(&self) -> Result<ControlNetPlan> {
        const F: &str = CONTROLNET_CONFIG;
        let encoder = self.encoder.plan_in(F)?;
        require(
            encoder.mid.is_some(),
            F,
            "mid_block_type",
            &self.encoder.mid_block_type,
            "a ControlNet needs a UNetMidBlock2DCrossAttn mid block",
        )?;
        require(
            self.num_class_embeds.is_none(),
            F,
            "num_class_embeds",
            self.num_class_embeds,
            "class-conditioned ControlNets are not supported",
        )?;
        require(
            self.encoder_hid_dim_type.is_none(),
            F,
            "encoder_hid_dim_type",
            &self.encoder_hid_dim_type,
            "not supported",
        )?;
        let order = self.controlnet_conditioning_channel_order.as_str();
        require(
            matches!(order, "rgb" | "bgr"),
            F,
            "controlnet_conditioning_channel_order",
            order,
            "supported: rgb, bgr",
        )?;
        require(
            self.conditioning_channels > 0,
            F,
            "conditioning_channels",
            self.conditioning_channels,
            "must be positive",
        )?;
        let embedding_channels = self
            .conditioning_embedding_out_channels
            .clone()
            .unwrap_or_default();
        require(
            !embedding_channels.is_empty()
                && embedding_channels.len() <= 8
                && embedding_channels.iter().all(|&c| c > 0),
            F,
            "conditioning_embedding_out_channels",
            &self.conditioning_embedding_out_channels,
            "needs 1 to 8 positive channel counts",
        )?;
        Ok(ControlNetPlan {
            encoder,
            in_channels: self.encoder.in_channels,
            conditioning_channels: self.conditioning_channels,
            bgr: order == "bgr",
            embedding_channels,
            global_pool: self.global_pool_conditions,
        })
    }
}

impl ControlNetPlan {
    /// Checks that this ControlNet can steer the UNet built from `unet` in a pipeline whose
    /// VAE scales images by `vae_scale_factor`: it must read the UNet's latents, attend to
    /// the same text states, take the same added conditioning (if it has any), produce one
    /// residual per UNet skip connection with the same channels and resolution, and map a
    /// control image of the output's size onto the latents. Its inner layout (heads,
    /// transformer depth) may differ. `name` names the ControlNet in the error
    /// ([`Error::InvalidParam`] on the field `controlnet`).
    pub fn check_compatible(
        &self,
        name: &str,
        unet: &UNetConfig,
        vae_scale_factor: usize,
    ) -> Result<()> {
        let unet_plan = unet.plan()?;
        let refuse = |reason: String| {
            Err(Error::invalid(
                "controlnet",
                format!("ControlNet `{name}` does not fit this model: {reason}"),
            ))
        };
        // An inpainting UNet reads 9 channels, but its ControlNet reads the 4 latent ones.
        let cn_in = self.in_channels;
        if cn_in != unet.out_channels {
            return refuse(format!(
                "it reads {cn_in}-channel latents, the UNet makes {}-channel ones",
                unet.out_channels
            ));
        }
        let (ours, theirs) = (
            skip_connections(&self.encoder),
            skip_connections(&unet_plan),
        );
        if ours != theirs {
            let channels = |s: &[Skip]| s.iter().map(|(c, _)| *c).collect::<Vec<_>>();
            return refuse(format!(
                "its residuals have channels {:?}, the UNet's skip connections {:?} \
                 (block_out_channels / layers_per_block differ)",
                channels(&ours),
                channels(&theirs)
            ));
        }
        let context = attended_dims(&unet_plan);
        if let Some(bad) = attended_dims(&self.encoder)
            .into_iter()
            .find(|d| !context.contains(d))
        {
            return refuse(format!(
                "it attends to {bad}-wide text states, the UNet to {context:?} \
                 (cross_attention_dim)"
            ));
        }
        if let Some(spec) = self.encoder.added {
            if unet_plan.added != Some(spec) {
                return refuse(format!(
                    "its added conditioning (addition_embed_type \"text_time\", input width \
                     {}) is not the UNet's ({:?})",
                    spec.in_dim,
                    unet_plan.added.map(|a| a.in_dim)
                ));
            }
        }
        if self.image_scale() != vae_scale_factor {
            return refuse(format!(
                "its conditioning embedding scales the image down {}× (len of \
                 conditioning_embedding_out_channels − 1 halvings), the VAE {vae_scale_factor}×",
                self.image_scale()
            ));
        }
        Ok(())
    }
}
