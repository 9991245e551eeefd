//! The pipeline families the engine runs, described in one place: which components and files a
//! family has, its text encoders and the hidden state it conditions on, its default size and
//! guidance, and how a checkpoint is recognised. Fetch, check, estimate, load and resolve read
//! these; a new family is a new variant here.

use crate::clip::HiddenLayer;
use crate::config::PipelineKind;
use std::fmt;

/// diffusers' default guidance scale for SD 1.x/2.x.
pub const DEFAULT_GUIDANCE: f64 = 7.5;
/// diffusers' default guidance scale for SDXL.
pub const DEFAULT_GUIDANCE_XL: f64 = 5.0;

/// One text encoder of a pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextEncoderSlot {
    /// The encoder's folder (`text_encoder`, `text_encoder_2`).
    pub folder: &'static str,
    /// Its tokenizer's folder.
    pub tokenizer: &'static str,
    /// Whether it is a `CLIPTextModelWithProjection` (gives the pooled embedding).
    pub with_projection: bool,
    /// How kohya/A1111 LoRA files prefix its modules (`lora_te_…`, `lora_te2_…`).
    pub kohya_prefixes: &'static [&'static str],
}

const SD_TEXT: &[TextEncoderSlot] = &[TextEncoderSlot {
    folder: "text_encoder",
    tokenizer: "tokenizer",
    with_projection: false,
    kohya_prefixes: &["lora_te", "lora_te1"],
}];
const SDXL_TEXT: &[TextEncoderSlot] = &[
    TextEncoderSlot {
        kohya_prefixes: &["lora_te1", "lora_te"],
        ..SD_TEXT[0]
    },
    TextEncoderSlot {
        folder: "text_encoder_2",
        tokenizer: "tokenizer_2",
        with_projection: true,
        kohya_prefixes: &["lora_te2"],
    },
];

impl PipelineKind {
    /// The kind a repository listing holds: SDXL when it has a second text encoder.
    pub fn from_listing(has_second_text_encoder: bool) -> Self {
        if has_second_text_encoder {
            PipelineKind::StableDiffusionXl
        } else {
            PipelineKind::StableDiffusion
        }
    }

    /// The text encoders, in the order their outputs are concatenated.
    pub fn text_encoders(self) -> &'static [TextEncoderSlot] {
        match self {
            PipelineKind::StableDiffusion => SD_TEXT,
            PipelineKind::StableDiffusionXl => SDXL_TEXT,
        }
    }

    /// Which hidden state of the text encoders conditions the UNet.
    pub fn hidden_layer(self) -> HiddenLayer {
        match self {
            PipelineKind::StableDiffusion => HiddenLayer::Last,
            PipelineKind::StableDiffusionXl => HiddenLayer::Penultimate,
        }
    }

    /// The config files of a pipeline of this kind.
    pub fn config_files(self) -> Vec<String> {
        let mut files: Vec<String> = [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "unet/config.json",
            "vae/config.json",
        ]
        .map(String::from)
        .to_vec();
        files.extend(
            self.text_encoders()
                .iter()
                .map(|t| format!("{}/config.json", t.folder)),
        );
        files
    }

    /// The weight files as `(folder, stem)`: the text encoders', the UNet's and the VAE's.
    pub fn weight_files(self) -> Vec<(&'static str, &'static str)> {
        let mut files: Vec<(&'static str, &'static str)> = self
            .text_encoders()
            .iter()
            .map(|t| (t.folder, "model"))
            .collect();
        files.push(("unet", "diffusion_pytorch_model"));
        files.push(("vae", "diffusion_pytorch_model"));
        files
    }

    /// The UNet's latent side when its config names none (diffusers' defaults).
    pub fn default_sample_size(self) -> usize {
        match self {
            PipelineKind::StableDiffusion => 64,
            PipelineKind::StableDiffusionXl => 128,
        }
    }
}

/// A model family as users name it: `sd1`, `sd2` or `sdxl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelFamily {
    /// SD 1.x: OpenAI CLIP ViT-L (quick GELU).
    Sd1,
    /// SD 2.x and SD-Turbo: OpenCLIP ViT-H (exact GELU).
    Sd2,
    /// SDXL and SDXL-Turbo: two text encoders, text/time conditioning.
    Sdxl,
}

impl ModelFamily {
    /// Recognises the family from the pipeline kind and the first text encoder's activation.
    pub fn detect(kind: PipelineKind, text_encoder_hidden_act: &str) -> Self {
        match kind {
            PipelineKind::StableDiffusionXl => ModelFamily::Sdxl,
            PipelineKind::StableDiffusion if text_encoder_hidden_act == "gelu" => ModelFamily::Sd2,
            PipelineKind::StableDiffusion => ModelFamily::Sd1,
        }
    }

    /// The family's name (`sd1`, `sd2`, `sdxl`).
    pub fn name(self) -> &'static str {
        match self {
            ModelFamily::Sd1 => "sd1",
            ModelFamily::Sd2 => "sd2",
            ModelFamily::Sdxl => "sdxl",
        }
    }

    /// The diffusers pipeline kind.
    pub fn kind(self) -> PipelineKind {
        match self {
            ModelFamily::Sd1 | ModelFamily::Sd2 => PipelineKind::StableDiffusion,
            ModelFamily::Sdxl => PipelineKind::StableDiffusionXl,
        }
    }

    /// diffusers' default guidance scale (turbo checkpoints override it with 0).
    pub fn default_guidance(self) -> f64 {
        match self.kind() {
            PipelineKind::StableDiffusion => DEFAULT_GUIDANCE,
            PipelineKind::StableDiffusionXl => DEFAULT_GUIDANCE_XL,
        }
    }

    /// Whether requests may set SDXL's size micro-conditioning.
    pub fn has_size_conditioning(self) -> bool {
        self.kind() == PipelineKind::StableDiffusionXl
    }
}

impl fmt::Display for ModelFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_recognised_and_described() {
        let sd = PipelineKind::StableDiffusion;
        let xl = PipelineKind::StableDiffusionXl;
        assert_eq!(ModelFamily::detect(sd, "quick_gelu"), ModelFamily::Sd1);
        assert_eq!(ModelFamily::detect(sd, "gelu"), ModelFamily::Sd2);
        assert_eq!(ModelFamily::detect(xl, "quick_gelu"), ModelFamily::Sdxl);
        assert_eq!(PipelineKind::from_listing(true), xl);
        assert_eq!(xl.text_encoders().len(), 2);
        assert!(xl
            .config_files()
            .contains(&"text_encoder_2/config.json".into()));
        assert!(xl.weight_files().contains(&("text_encoder_2", "model")));
        assert_eq!(sd.weight_files().len(), 3);
        assert_eq!(ModelFamily::Sdxl.default_guidance(), DEFAULT_GUIDANCE_XL);
        assert!(!ModelFamily::Sd2.has_size_conditioning());
        assert_eq!(ModelFamily::Sd2.to_string(), "sd2");
    }
}
