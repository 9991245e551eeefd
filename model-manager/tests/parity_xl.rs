//! Component parity of the SDXL-family fixtures (`tests/fixtures/generate_sdxl_fixtures.py`)
//! with diffusers/transformers: both tokenizers, both text encoders (penultimate hidden states,
//! last hidden state, pooled and projected `text_embeds`), the UNet with `text_time`
//! conditioning, and the VAE. Tolerances as in `parity.rs`.

mod common;
use common::*;

use candle_core::{DType, Device, Tensor};
use jhakaas_model_manager::clip::HiddenLayer;
use jhakaas_model_manager::config::read_json;
use jhakaas_model_manager::unet::AddedConditioning;
use jhakaas_model_manager::{ModelSource, StableDiffusionPipeline};

const XL: [&str; 2] = ["sdxl-tiny", "sdxl-turbo-tiny"];

fn pipeline(name: &str) -> StableDiffusionPipeline {
    let dir = fixtures().join("models").join(name);
    StableDiffusionPipeline::load(&ModelSource::Local(dir), &Device::Cpu)
        .expect("fixture pipeline loads")
}

fn token_rows(name: &str, file: &str) -> Vec<(String, Vec<u32>)> {
    let cases: serde_json::Value =
        read_json(&fixtures().join("reference").join(name).join(file), file).unwrap();
    cases
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["prompt"].as_str().unwrap().to_string(),
                c["input_ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn both_sdxl_tokenizers_match_transformers() {
    for name in XL {
        let p = pipeline(name);
        let encoders = p.text_conditioner().encoders();
        assert_eq!(encoders.len(), 2, "{name}: two text encoders");
        for (enc, file) in encoders.iter().zip(["tokens.json", "tokens_2.json"]) {
            for (prompt, want) in token_rows(name, file) {
                assert_eq!(
                    enc.tokenizer().encode(&prompt).unwrap(),
                    want,
                    "{name}/{file}: {prompt:?}"
                );
            }
        }
    }
}

#[test]
fn sdxl_text_encoders_give_penultimate_states_and_the_projected_pooled_output() {
    for name in XL {
        let p = pipeline(name);
        let encoders = p.text_conditioner().encoders();
        for (i, enc) in encoders.iter().enumerate() {
            let suffix = if i == 0 { "" } else { "_2" };
            let r = load(
                &fixtures()
                    .join("reference")
                    .join(name)
                    .join(format!("text_encoder{suffix}.safetensors")),
            );
            let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
            let pen = enc.model().encode(&ids, HiddenLayer::Penultimate).unwrap();
            assert_close(
                &format!("{name} {} hidden_states[-2]", enc.folder()),
                &pen.hidden,
                &r["hidden_states_m2"],
                TEXT_TOL,
            );
            if i == 0 {
                assert!(pen.text_embeds.is_none());
                let last = enc.model().encode(&ids, HiddenLayer::Last).unwrap();
                assert_close(
                    &format!("{name} text_encoder last_hidden_state"),
                    &last.hidden,
                    &r["last_hidden_state"],
                    TEXT_TOL,
                );
            } else {
                assert_close(
                    &format!("{name} text_encoder_2 text_embeds"),
                    pen.text_embeds.as_ref().expect("text_embeds"),
                    &r["text_embeds"],
                    TEXT_TOL,
                );
            }
        }
        // The pipeline's context is both penultimate states side by side.
        let r1 = load(
            &fixtures()
                .join("reference")
                .join(name)
                .join("text_encoder.safetensors"),
        );
        let r2 = load(
            &fixtures()
                .join("reference")
                .join(name)
                .join("text_encoder_2.safetensors"),
        );
        let prompts: Vec<String> = token_rows(name, "tokens.json")
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let full = p.encode_prompts_full(&refs).unwrap();
        let want = Tensor::cat(&[&r1["hidden_states_m2"], &r2["hidden_states_m2"]], 2).unwrap();
        assert_close(&format!("{name} context"), &full.context, &want, TEXT_TOL);
        assert_close(
            &format!("{name} pooled"),
            full.pooled.as_ref().unwrap(),
            &r2["text_embeds"],
            TEXT_TOL,
        );
    }
}

#[test]
fn sdxl_unet_with_text_time_conditioning_matches_diffusers() {
    for name in XL {
        let p = pipeline(name);
        for case in ["t999", "nonsquare"] {
            let r = load(
                &fixtures()
                    .join("reference")
                    .join(name)
                    .join(format!("unet-{case}.safetensors")),
            );
            let added = AddedConditioning {
                text_embeds: r["text_embeds"].clone(),
                time_ids: r["time_ids"].clone(),
            };
            let out = p
                .unet()
                .forward_with(
                    &r["sample"],
                    &r["timestep"],
                    &r["encoder_hidden_states"],
                    Some(&added),
                )
                .unwrap();
            assert_close(&format!("{name} unet {case}"), &out, &r["out"], UNET_TOL);
            let missing =
                p.unet()
                    .forward(&r["sample"], &r["timestep"], &r["encoder_hidden_states"]);
            assert!(
                missing.unwrap_err().to_string().contains("text_embeds"),
                "{name}: a text_time UNet must refuse to run without its conditioning"
            );
        }
    }
}

#[test]
fn sdxl_vae_matches_diffusers_and_keeps_its_scaling_factor() {
    for name in XL {
        let p = pipeline(name);
        assert_eq!(p.vae().config().scaling_factor, 0.13025, "{name}");
        assert!(p.vae().config().force_upcast, "{name}");
        let r = load(
            &fixtures()
                .join("reference")
                .join(name)
                .join("vae.safetensors"),
        );
        check_vae(name, p.vae(), &r);
    }
}

#[test]
fn families_and_defaults_follow_the_checkpoint() {
    let xl = pipeline("sdxl-tiny");
    assert_eq!(xl.family().name(), "sdxl");
    let d = xl.defaults();
    // diffusers' SDXL defaults: sample_size × 8, 50 steps, guidance 5, the checkpoint's Euler.
    assert_eq!((d.width, d.height, d.steps), (64, 64, 50));
    assert_eq!(d.guidance_scale, 5.0);
    assert_eq!(d.scheduler.to_string(), "euler");
    let turbo = pipeline("sdxl-turbo-tiny");
    assert_eq!(turbo.defaults().scheduler.to_string(), "euler-a");
    let sd_turbo = pipeline("sd-turbo-tiny");
    assert_eq!(sd_turbo.family().name(), "sd2");
    assert_eq!(
        sd_turbo.defaults().guidance_scale,
        7.5,
        "a local folder is not known to be turbo"
    );
}
