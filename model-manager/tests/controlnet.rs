//! ControlNet parity with diffusers on the committed tiny ControlNets
//! (`tests/fixtures/models/controlnet-*`, made by
//! `tests/fixtures/generate_controlnet_fixtures.py` from the tiny pipelines' UNets): the
//! residuals of `ControlNetModel.forward` (plain, guess mode, `global_pool_conditions`), the
//! UNet steered by them, the MultiControlNet sum, and the refusal of ControlNets that do not
//! fit a UNet.
//!
//! Tolerances, as in `parity.rs`: both sides compute in f32 from identical f16-representable
//! weights, so only summation order differs. The UNet-with-residuals outputs are compared
//! with OUR residuals fed in (the whole chain), so they carry the ControlNet's error too.
//! Each bound is about 10× the worst error measured on these fixtures; a wrong residual order,
//! scale, activation or channel order moves outputs by 1e-2 or more.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use jhakaas_model_manager::config::{read_json, ControlNetConfig, UNetConfig};
use jhakaas_model_manager::controlnet::{ControlInput, ControlNetModel, ControlResiduals};
use jhakaas_model_manager::unet::AddedConditioning;
use jhakaas_model_manager::{Error, ModelSource, StableDiffusionPipeline};
use std::collections::HashMap;
use std::path::PathBuf;

mod common;
use common::*;

/// Residuals: the encoder half plus the embedding and the 1×1 convs (worst measured 2.0e-6).
const RESIDUAL_TOL: f32 = 2e-5;
/// The UNet fed our residuals (worst measured 1.7e-6).
const STEERED_TOL: f32 = 2e-5;
const SCALE: f64 = 0.7;
const SCALE_2: f64 = 0.4;

fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

fn pipeline(name: &str) -> StableDiffusionPipeline {
    StableDiffusionPipeline::load(&ModelSource::Local(model_dir(name)), &Device::Cpu)
        .expect("fixture pipeline loads")
}

fn controlnet(name: &str) -> ControlNetModel {
    ControlNetModel::load(
        &ModelSource::Local(model_dir(name)),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn reference(case: &str) -> HashMap<String, Tensor> {
    load(
        &fixtures()
            .join("reference/controlnet")
            .join(format!("{case}.safetensors")),
    )
}

fn added(r: &HashMap<String, Tensor>) -> Option<AddedConditioning> {
    Some(AddedConditioning {
        text_embeds: r.get("text_embeds")?.clone(),
        time_ids: r.get("time_ids")?.clone(),
    })
}

fn run(
    net: &ControlNetModel,
    r: &HashMap<String, Tensor>,
    image: &str,
    scale: f64,
    guess_mode: bool,
) -> ControlResiduals {
    let control = ControlInput {
        image: &r[image],
        scale,
        guess_mode,
    };
    net.forward(
        &r["sample"],
        &r["timestep"],
        &r["encoder_hidden_states"],
        added(r).as_ref(),
        &control,
    )
    .unwrap()
}

fn assert_residuals(
    what: &str,
    ours: &ControlResiduals,
    r: &HashMap<String, Tensor>,
    prefix: &str,
) {
    let n = (0..)
        .take_while(|i| r.contains_key(&format!("{prefix}down_{i}")))
        .count();
    assert_eq!(ours.down.len(), n, "{what}: number of down residuals");
    for (i, d) in ours.down.iter().enumerate() {
        let theirs = &r[&format!("{prefix}down_{i}")];
        assert_close(&format!("{what} down {i}"), d, theirs, RESIDUAL_TOL);
    }
    assert_close(
        &format!("{what} mid"),
        &ours.mid,
        &r[&format!("{prefix}mid")],
        RESIDUAL_TOL,
    );
}

fn assert_steered(
    what: &str,
    p: &StableDiffusionPipeline,
    res: &ControlResiduals,
    r: &HashMap<String, Tensor>,
) {
    let out = p
        .unet()
        .forward_with_residuals(
            &r["sample"],
            &r["timestep"],
            &r["encoder_hidden_states"],
            added(r).as_ref(),
            Some(res),
        )
        .unwrap();
    assert_close(
        &format!("{what} unet with residuals"),
        &out,
        &r["unet_out"],
        STEERED_TOL,
    );
}

#[test]
fn sd1_controlnet_and_steered_unet_match_diffusers() {
    let p = pipeline("sd1-tiny");
    let net = controlnet("controlnet-sd1-tiny");
    net.check_compatible(p.unet().config(), p.vae_scale_factor())
        .unwrap();
    for case in ["sd1", "sd1-nonsquare"] {
        let r = reference(case);
        let res = run(&net, &r, "controlnet_cond", SCALE, false);
        assert_eq!(res.down.len(), p.unet().skip_count());
        assert_residuals(case, &res, &r, "");
        assert_steered(case, &p, &res, &r);
    }
    let r = reference("sd1");
    let guess = run(&net, &r, "controlnet_cond", SCALE, true);
    assert_residuals("sd1 guess mode", &guess, &r, "guess_");
}

#[test]
fn global_pool_conditions_average_the_residuals_over_space() {
    let dir = model_dir("controlnet-sd1-tiny");
    let mut cfg: ControlNetConfig = read_json(&dir.join("config.json"), "config.json").unwrap();
    cfg.global_pool_conditions = true;
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &Device::Cpu) }
        .unwrap();
    let net = ControlNetModel::new(&cfg, vb).unwrap();
    let r = reference("sd1");
    // diffusers ignores guess mode's scales when pooling.
    for guess_mode in [false, true] {
        let res = run(&net, &r, "controlnet_cond", SCALE, guess_mode);
        assert_residuals("sd1 global pool", &res, &r, "pool_");
    }
    // Pooled residuals broadcast over the skip connections.
    let res = run(&net, &r, "controlnet_cond", SCALE, false);
    p_unet_runs_with(&res, &r);
}

fn p_unet_runs_with(res: &ControlResiduals, r: &HashMap<String, Tensor>) {
    let p = pipeline("sd1-tiny");
    let out = p
        .unet()
        .forward_with_residuals(
            &r["sample"],
            &r["timestep"],
            &r["encoder_hidden_states"],
            None,
            Some(res),
        )
        .unwrap();
    assert_eq!(out.dims(), r["sample"].dims());
}

#[test]
fn sdxl_controlnet_with_text_time_conditioning_matches_diffusers() {
    let p = pipeline("sdxl-tiny");
    let net = controlnet("controlnet-sdxl-tiny");
    net.check_compatible(p.unet().config(), p.vae_scale_factor())
        .unwrap();
    let r = reference("sdxl");
    let res = run(&net, &r, "controlnet_cond", SCALE, false);
    assert_residuals("sdxl", &res, &r, "");
    assert_steered("sdxl", &p, &res, &r);
    // A text_time ControlNet without its added conditioning is an error, not a panic.
    let control = ControlInput {
        image: &r["controlnet_cond"],
        scale: SCALE,
        guess_mode: false,
    };
    let err = net
        .forward(
            &r["sample"],
            &r["timestep"],
            &r["encoder_hidden_states"],
            None,
            &control,
        )
        .unwrap_err();
    assert!(err.to_string().contains("text_time"), "{err}");
}

#[test]
fn summed_residuals_of_two_nets_match_multicontrolnet() {
    let p = pipeline("sd1-tiny");
    let rgb = controlnet("controlnet-sd1-tiny");
    // The second net reads BGR images through a narrower conditioning embedding.
    let bgr = controlnet("controlnet-sd1-tiny-bgr");
    bgr.check_compatible(p.unet().config(), p.vae_scale_factor())
        .unwrap();
    let r = reference("sd1-multi");
    let parts = vec![
        run(&rgb, &r, "controlnet_cond", SCALE, false),
        run(&bgr, &r, "controlnet_cond_2", SCALE_2, false),
    ];
    let sum = ControlResiduals::sum(parts).unwrap().expect("two parts");
    assert_residuals("sd1 multi", &sum, &r, "");
    assert_steered("sd1 multi", &p, &sum, &r);
    assert!(ControlResiduals::sum(Vec::new()).unwrap().is_none());
}

#[test]
fn loading_reports_the_weight_bytes_the_estimate_gives() {
    let source = ModelSource::Local(model_dir("controlnet-sd1-tiny"));
    let net = ControlNetModel::load(&source, &Device::Cpu, DType::F32).unwrap();
    let estimate =
        ControlNetModel::estimate_loaded_bytes(&source, &Device::Cpu, DType::F32).unwrap();
    assert!(net.weight_bytes() > 0);
    assert_eq!(net.weight_bytes(), estimate);
    assert_eq!(net.image_scale(), 8);
    assert_eq!(net.name(), source.to_string());
}

fn refusal(net: &ControlNetModel, unet: &UNetConfig, vae_scale_factor: usize) -> String {
    match net.check_compatible(unet, vae_scale_factor) {
        Err(Error::InvalidParam { field, reason }) => {
            assert_eq!(field, "controlnet");
            assert!(reason.contains(net.name()), "{reason}");
            reason
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn unet_config(pipeline: &str) -> UNetConfig {
    read_json(
        &model_dir(pipeline).join("unet/config.json"),
        "unet/config.json",
    )
    .unwrap()
}

#[test]
fn controlnets_that_do_not_fit_the_unet_are_refused() {
    let sd1 = controlnet("controlnet-sd1-tiny");
    let xl = controlnet("controlnet-sdxl-tiny");
    let (sd1_unet, xl_unet) = (unet_config("sd1-tiny"), unet_config("sdxl-tiny"));
    // Same skip channels, other text width.
    let reason = refusal(&sd1, &xl_unet, 8);
    assert!(reason.contains("cross_attention_dim"), "{reason}");
    let reason = refusal(&xl, &sd1_unet, 8);
    assert!(reason.contains("cross_attention_dim"), "{reason}");

    let mut wider = sd1_unet.clone();
    wider.block_out_channels = vec![64, 64];
    let reason = refusal(&sd1, &wider, 8);
    assert!(reason.contains("block_out_channels"), "{reason}");

    let mut deeper = sd1_unet.clone();
    deeper.layers_per_block = jhakaas_model_manager::config::PerBlock::One(3);
    let reason = refusal(&sd1, &deeper, 8);
    assert!(reason.contains("layers_per_block"), "{reason}");

    let reason = refusal(&sd1, &sd1_unet, 4);
    assert!(
        reason.contains("conditioning_embedding_out_channels"),
        "{reason}"
    );

    let mut other_pooled = xl_unet.clone();
    other_pooled.projection_class_embeddings_input_dim = Some(80);
    let reason = refusal(&xl, &other_pooled, 8);
    assert!(reason.contains("text_time"), "{reason}");

    let mut eight_latents = sd1_unet.clone();
    eight_latents.in_channels = 8;
    eight_latents.out_channels = 8;
    let reason = refusal(&sd1, &eight_latents, 8);
    assert!(reason.contains("latents"), "{reason}");

    // An inpainting UNet reads 9 channels, its ControlNet the 4 latent ones: that fits.
    let mut inpainting = sd1_unet.clone();
    inpainting.in_channels = 9;
    sd1.check_compatible(&inpainting, 8).unwrap();
    // Each tiny ControlNet fits the UNet it was made from.
    xl.check_compatible(&xl_unet, 8).unwrap();
}

#[test]
fn a_control_image_of_the_wrong_size_is_refused() {
    let net = controlnet("controlnet-sd1-tiny");
    let r = reference("sd1");
    let small = r["controlnet_cond"].narrow(2, 0, 32).unwrap();
    let control = ControlInput {
        image: &small,
        scale: SCALE,
        guess_mode: false,
    };
    let err = net
        .forward(
            &r["sample"],
            &r["timestep"],
            &r["encoder_hidden_states"],
            None,
            &control,
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidParam {
                field: "control_image",
                ..
            }
        ),
        "{err}"
    );
}

fn parse(patch: serde_json::Value) -> Result<(), Error> {
    let mut cfg: serde_json::Value = read_json(
        &model_dir("controlnet-sd1-tiny").join("config.json"),
        "config.json",
    )?;
    for (k, v) in patch.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    let cfg: ControlNetConfig = serde_json::from_value(cfg).map_err(|e| Error::Config {
        file: "config.json".into(),
        reason: e.to_string(),
    })?;
    cfg.plan().map(|_| ())
}

#[test]
fn unsupported_controlnet_configs_are_refused_naming_the_field() {
    parse(serde_json::json!({})).unwrap();
    for (patch, field) in [
        (
            serde_json::json!({"controlnet_conditioning_channel_order": "xyz"}),
            "controlnet_conditioning_channel_order",
        ),
        (
            serde_json::json!({"mid_block_type": "UNetMidBlock2D"}),
            "mid_block_type",
        ),
        (
            serde_json::json!({"mid_block_type": null}),
            "mid_block_type",
        ),
        (
            serde_json::json!({"conditioning_embedding_out_channels": null}),
            "conditioning_embedding_out_channels",
        ),
        (
            serde_json::json!({"num_class_embeds": 10}),
            "num_class_embeds",
        ),
        (
            serde_json::json!({"addition_embed_type": "text"}),
            "addition_embed_type",
        ),
        (
            serde_json::json!({"down_block_types": ["CrossAttnDownBlock2D", "FooBlock"]}),
            "down_block_types",
        ),
    ] {
        match parse(patch.clone()) {
            Err(Error::Unsupported { file, field: f, .. }) => {
                assert_eq!(file, "controlnet/config.json", "{patch}");
                assert_eq!(f, field, "{patch}");
            }
            other => panic!("{patch}: expected Unsupported {field}, got {other:?}"),
        }
    }
    // Fields a UNet config has but diffusers' ControlNet never reads are ignored.
    parse(serde_json::json!({"time_embedding_dim": 7, "conv_in_kernel": 5})).unwrap();
}
