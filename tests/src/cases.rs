//! The committed pipeline cases (`tests/fixtures/reference/<pipeline>/cases.json`) and the
//! `jhakaas-worker generate` arguments that run one: with diffusers' recorded noise, or from
//! its seed alone with torch's CPU generator.

use crate::fixtures;
use serde::Deserialize;
use std::path::Path;

/// One case diffusers ran (see the fixture scripts for the fields' meaning).
#[derive(Debug, Deserialize)]
pub struct FixtureCase {
    pub name: String,
    pub pipeline: String,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    /// A request's scheduler name; `None`: the checkpoint's own.
    pub scheduler: Option<String>,
    pub num_images: usize,
    pub strength: Option<f64>,
    pub init_image: Option<String>,
    /// Inpainting: the mask, relative to the pipeline's reference folder.
    #[serde(default)]
    pub mask: Option<String>,
    /// Inpainting only the mask's box grown by this many pixels (`padding_mask_crop`).
    #[serde(default)]
    pub mask_crop_padding: Option<u32>,
    /// Outpainting: `LEFT,TOP,RIGHT,BOTTOM` pixels added to the init image.
    #[serde(default)]
    pub outpaint: Option<String>,
    /// ControlNets steering the case, in order.
    #[serde(default)]
    pub controlnets: Vec<CaseControlNet>,
    /// SDXL size conditioning, `[height, width]` / `[top, left]` as diffusers takes them.
    #[serde(default)]
    pub original_size: Option<[usize; 2]>,
    #[serde(default)]
    pub crops_coords_top_left: Option<[usize; 2]>,
    #[serde(default)]
    pub target_size: Option<[usize; 2]>,
    /// diffusers' recorded draws; `None` for cases checked from the seed alone.
    pub noise: Option<String>,
    pub image: serde_json::Value,
    /// The `torch.Generator("cpu").manual_seed` diffusers ran with (its draws are `noise`).
    pub seed: u64,
}

/// One ControlNet of a case.
#[derive(Debug, Deserialize)]
pub struct CaseControlNet {
    /// The fixture folder under `tests/fixtures/models/`.
    pub net: String,
    /// The control image, relative to the pipeline's reference folder.
    pub image: String,
    pub scale: f64,
    pub start: f64,
    pub end: f64,
}

/// Where a case's noise comes from when we run it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaseNoise {
    /// diffusers' recorded draws, replayed from the case's noise file (`--latents`).
    Replayed,
    /// Drawn by `--rng torch-cpu --seed SEED`, with no noise file.
    FromSeed,
}

/// Every case of `pipeline`.
pub fn load(pipeline: &str) -> Vec<FixtureCase> {
    let path = fixtures()
        .join("reference")
        .join(pipeline)
        .join("cases.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The cases of `pipeline` checked from the seed alone (`seed_cases.json`, written by
/// `tests/fixtures/generate_seed_cases.py`); none when the pipeline has no such file.
pub fn load_seed_cases(pipeline: &str) -> Vec<FixtureCase> {
    load_case_file(pipeline, "seed_cases.json")
}

/// The inpainting and outpainting cases of `pipeline` (`inpaint_cases.json`, written by
/// `tests/fixtures/generate_inpaint_fixtures.py`, checked from the seed alone); none when the
/// pipeline has no such file.
pub fn load_inpaint_cases(pipeline: &str) -> Vec<FixtureCase> {
    load_case_file(pipeline, "inpaint_cases.json")
}

/// The ControlNet cases of `pipeline` (`controlnet_cases.json`, written by
/// `tests/fixtures/generate_controlnet_cases.py`, checked from the seed alone).
pub fn load_controlnet_cases(pipeline: &str) -> Vec<FixtureCase> {
    load_case_file(pipeline, "controlnet_cases.json")
}

/// The `cases` of a `{versions, cases}` file in `pipeline`'s reference folder, if it exists.
fn load_case_file(pipeline: &str, file: &str) -> Vec<FixtureCase> {
    #[derive(Deserialize)]
    struct File {
        cases: Vec<FixtureCase>,
    }
    let path = fixtures().join("reference").join(pipeline).join(file);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            serde_json::from_str::<File>(&text)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .cases
        }
        Err(_) => Vec::new(),
    }
}

/// Case `name` of `pipeline`.
pub fn find(pipeline: &str, name: &str) -> FixtureCase {
    load(pipeline)
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case {name} for {pipeline}"))
}

impl FixtureCase {
    /// `generate` arguments replaying this case on the CPU with its recorded noise, writing
    /// `out`.
    pub fn cli_args(&self, out: &Path) -> Vec<String> {
        self.cli_args_with(out, CaseNoise::Replayed)
    }

    /// `generate` arguments running this case on the CPU with its noise from `noise`, writing
    /// `out`.
    pub fn cli_args_with(&self, out: &Path, noise: CaseNoise) -> Vec<String> {
        let ref_dir = fixtures().join("reference").join(&self.pipeline);
        let model = fixtures().join("models").join(&self.pipeline);
        let mut args: Vec<String> = [
            "generate",
            "--model",
            &model.display().to_string(),
            "--prompt",
            &self.prompt,
            "--width",
            &self.width.to_string(),
            "--height",
            &self.height.to_string(),
            "--steps",
            &self.steps.to_string(),
            "--guidance-scale",
            &self.guidance_scale.to_string(),
            "--num-images",
            &self.num_images.to_string(),
            "--device",
            "cpu",
            "--output",
            &out.display().to_string(),
        ]
        .map(String::from)
        .to_vec();
        if let Some(s) = &self.scheduler {
            args.extend(["--scheduler".into(), s.clone()]);
        }
        match noise {
            CaseNoise::Replayed => args.extend([
                "--latents".into(),
                ref_dir
                    .join(self.noise.as_ref().expect("a case with recorded noise"))
                    .display()
                    .to_string(),
                "--seed".into(),
                "0".into(),
            ]),
            CaseNoise::FromSeed => args.extend([
                "--rng".into(),
                "torch-cpu".into(),
                "--seed".into(),
                self.seed.to_string(),
            ]),
        }
        if let Some(neg) = &self.negative_prompt {
            args.extend(["--negative-prompt".into(), neg.clone()]);
        }
        if let Some([h, w]) = self.original_size {
            args.extend(["--original-size".into(), format!("{w}x{h}")]);
        }
        if let Some([top, left]) = self.crops_coords_top_left {
            args.extend(["--crop-top-left".into(), format!("{top},{left}")]);
        }
        if let Some([h, w]) = self.target_size {
            args.extend(["--target-size".into(), format!("{w}x{h}")]);
        }
        if let (Some(init), Some(strength)) = (&self.init_image, self.strength) {
            args.extend([
                "--init-image".into(),
                ref_dir.join(init).display().to_string(),
                "--strength".into(),
                strength.to_string(),
            ]);
        }
        if let Some(mask) = &self.mask {
            args.extend(["--mask".into(), ref_dir.join(mask).display().to_string()]);
        }
        if let Some(pad) = self.mask_crop_padding {
            args.extend(["--mask-crop-padding".into(), pad.to_string()]);
        }
        if let Some(sides) = &self.outpaint {
            args.extend(["--outpaint".into(), sides.clone()]);
        }
        for c in &self.controlnets {
            let net = fixtures().join("models").join(&c.net);
            args.extend([
                "--controlnet".into(),
                net.display().to_string(),
                "--control-image".into(),
                ref_dir.join(&c.image).display().to_string(),
                "--controlnet-scale".into(),
                c.scale.to_string(),
                "--control-guidance-start".into(),
                c.start.to_string(),
                "--control-guidance-end".into(),
                c.end.to_string(),
            ]);
        }
        args
    }
}
