//! `--weights-residency stage` ([`WeightResidency::Stage`]): a pipeline's mapped weights
//! (and a job's ControlNets') leave the process's resident set outside the stages that read
//! them, come back when read, and no image changes — txt2img, 4-channel inpainting (the VAE
//! encodes, then decodes) and ControlNet, each run twice so the second job reads weights
//! mapped back in.

use candle_core::{DType, Device};
use jhakaas_model_manager::controlnet::ControlNetModel;
use jhakaas_model_manager::params::ControlNetRequest;
use jhakaas_model_manager::pipeline::RequestLimits;
use jhakaas_model_manager::weights::WeightResidency;
use jhakaas_model_manager::{
    GenerateParams, InitImage, LoadOptions, ModelSource, SchedulerKind, StableDiffusionPipeline,
};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;

mod common;
use common::fixtures;

fn model(name: &str) -> ModelSource {
    ModelSource::Local(fixtures().join("models").join(name))
}

fn pipeline(residency: WeightResidency) -> StableDiffusionPipeline {
    let options = LoadOptions {
        residency,
        ..Default::default()
    };
    StableDiffusionPipeline::load_with(&model("sd1-tiny"), &Device::Cpu, &options).unwrap()
}

fn net() -> Arc<ControlNetModel> {
    let net = ControlNetModel::load(&model("controlnet-sd1-tiny"), &Device::Cpu, DType::F32);
    Arc::new(net.unwrap())
}

fn reference_image(name: &str) -> PathBuf {
    fixtures().join("reference").join(name)
}

/// The three requests: txt2img, inpainting, ControlNet (which takes a net).
fn requests() -> Vec<(&'static str, GenerateParams, bool)> {
    let base = GenerateParams {
        prompt: "a lighthouse at dusk".into(),
        negative_prompt: Some("fog".into()),
        steps: Some(3),
        seed: Some(11),
        num_images: 1,
        scheduler: Some(SchedulerKind::Ddim),
        ..Default::default()
    };
    let mut inpaint = base.clone();
    inpaint.init_image = Some(InitImage {
        image: image::open(reference_image("init.png")).unwrap().to_rgb8(),
        strength: 0.75,
        mask: Some(image::open(reference_image("mask.png")).unwrap().to_luma8()),
        mask_crop_padding: None,
    });
    let mut control = base.clone();
    control.controlnets = vec![ControlNetRequest {
        name: "edges".into(),
        image: image::open(reference_image("control-edges.png"))
            .unwrap()
            .to_rgb8(),
        scale: 0.8,
        start: 0.0,
        end: 1.0,
    }];
    vec![
        ("txt2img", base, false),
        ("inpaint", inpaint, false),
        ("controlnet", control, true),
    ]
}

#[test]
fn stage_residency_drops_mapped_weights_between_stages_and_changes_no_image() {
    let resident = pipeline(WeightResidency::Resident);
    let staged = pipeline(WeightResidency::Stage);
    assert!(
        resident.resident_mapped_bytes() > 0,
        "the fixture maps weights"
    );
    assert_eq!(staged.resident_mapped_bytes(), 0, "dropped once loaded");
    let (resident_net, staged_net) = (net(), net());
    // A net loads resident; the first job it steers drops it outside the denoising.
    assert!(
        staged_net.pages().resident_bytes() > 0,
        "a net loads resident"
    );
    for (case, request, steered) in requests() {
        let nets = |n: &Arc<ControlNetModel>| if steered { vec![n.clone()] } else { vec![] };
        let limits = RequestLimits::default();
        let want = resident
            .generate_with_nets(&request, &limits, &nets(&resident_net), &mut |_| {
                ControlFlow::Continue(())
            })
            .unwrap();
        for run in 0..2 {
            let mut denoising = Vec::new();
            let got = staged
                .generate_with_nets(&request, &limits, &nets(&staged_net), &mut |_| {
                    denoising.push((
                        staged.resident_mapped_bytes(),
                        staged.text_conditioner().pages().resident_bytes(),
                        staged_net.pages().resident_bytes(),
                    ));
                    ControlFlow::Continue(())
                })
                .unwrap();
            assert_eq!(
                got.images[0].image.as_raw(),
                want.images[0].image.as_raw(),
                "{case}, run {run}: the same image as with resident weights"
            );
            for &(mapped, text, net) in &denoising {
                assert!(mapped > 0, "{case}: the UNet is read while denoising");
                assert_eq!(text, 0, "{case}: no text encoder page while denoising");
                if steered {
                    assert!(net > 0, "{case}: the net is resident while it steers");
                }
            }
            assert_eq!(
                staged.resident_mapped_bytes(),
                0,
                "{case}: none after the job"
            );
            if steered {
                assert_eq!(
                    staged_net.pages().resident_bytes(),
                    0,
                    "{case}: nor of its net"
                );
            }
        }
    }
    assert!(
        resident.resident_mapped_bytes() > 0,
        "resident weights stay"
    );
    assert!(resident_net.pages().resident_bytes() > 0);
}
