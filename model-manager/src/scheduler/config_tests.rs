//! Config parsing, per-class defaults, refusals and the kind parser.

use super::{build, SchedulerConfig, SchedulerKind, FALLBACK};
use crate::error::Error;

const SD15_PNDM: &str = r#"{"_class_name":"PNDMScheduler","_diffusers_version":"0.6.0",
  "beta_end":0.012,"beta_schedule":"scaled_linear","beta_start":0.00085,
  "num_train_timesteps":1000,"set_alpha_to_one":false,"skip_prk_steps":true,"steps_offset":1,
  "trained_betas":null,"clip_sample":false}"#;

fn parse(json: &str) -> SchedulerConfig {
    SchedulerConfig::from_json_str(json, "scheduler_config.json").unwrap()
}

/// The `field` of an `Unsupported` error from building `kind` with `json`.
fn unsupported_field(kind: SchedulerKind, json: &str) -> String {
    match build(kind, &parse(json), 10, "scheduler/scheduler_config.json") {
        Err(Error::Unsupported {
            field, value, file, ..
        }) => {
            assert_eq!(file, "scheduler/scheduler_config.json");
            assert!(!value.is_empty());
            field
        }
        Err(e) => panic!("{kind} {json}: expected Unsupported, got {e}"),
        Ok(_) => panic!("{kind} {json}: expected Unsupported, built fine"),
    }
}

#[test]
fn kind_names_round_trip() {
    for kind in SchedulerKind::ALL {
        assert_eq!(kind.as_str().parse::<SchedulerKind>().unwrap(), kind);
        assert_eq!(kind.to_string(), kind.as_str());
    }
    assert_eq!(
        " Euler-A ".parse::<SchedulerKind>().unwrap(),
        SchedulerKind::EulerAncestral
    );
    assert_eq!(
        "dpmpp-2m-karras".parse::<SchedulerKind>().unwrap(),
        SchedulerKind::DpmPp2mKarras
    );
}

#[test]
fn unknown_kind_names_the_field_and_lists_valid_names() {
    match "k_lms_turbo".parse::<SchedulerKind>() {
        Err(Error::InvalidParam { field, reason }) => {
            assert_eq!(field, "scheduler");
            for kind in SchedulerKind::ALL {
                assert!(reason.contains(kind.as_str()), "{reason}");
            }
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn native_kind_maps_class_names() {
    let kind = |json: &str| parse(json).native_kind();
    assert_eq!(
        kind(r#"{"_class_name":"DDIMScheduler"}"#),
        Some(SchedulerKind::Ddim)
    );
    assert_eq!(
        kind(r#"{"_class_name":"EulerDiscreteScheduler"}"#),
        Some(SchedulerKind::Euler)
    );
    assert_eq!(
        kind(r#"{"_class_name":"EulerAncestralDiscreteScheduler"}"#),
        Some(SchedulerKind::EulerAncestral)
    );
    assert_eq!(
        kind(r#"{"_class_name":"DPMSolverMultistepScheduler"}"#),
        Some(SchedulerKind::DpmPp2m)
    );
    assert_eq!(
        kind(r#"{"_class_name":"DPMSolverMultistepScheduler","use_karras_sigmas":true}"#),
        Some(SchedulerKind::DpmPp2mKarras)
    );
    assert_eq!(kind(SD15_PNDM), Some(SchedulerKind::Pndm));
    use SchedulerKind as K;
    for (class, want) in [
        (r#""LMSDiscreteScheduler""#, K::Lms),
        (
            r#""LMSDiscreteScheduler","use_karras_sigmas":true"#,
            K::LmsKarras,
        ),
        (
            r#""EulerDiscreteScheduler","use_karras_sigmas":true"#,
            K::EulerKarras,
        ),
        (r#""HeunDiscreteScheduler""#, K::Heun),
        (r#""KDPM2DiscreteScheduler""#, K::Dpm2),
        (r#""KDPM2AncestralDiscreteScheduler""#, K::Dpm2Ancestral),
        (
            r#""DPMSolverMultistepScheduler","algorithm_type":"sde-dpmsolver++""#,
            K::DpmPp2mSde,
        ),
        (
            r#""DPMSolverMultistepScheduler","algorithm_type":"sde-dpmsolver++","use_karras_sigmas":true"#,
            K::DpmPp2mSdeKarras,
        ),
        (r#""UniPCMultistepScheduler""#, K::UniPc),
        (r#""DEISMultistepScheduler""#, K::Deis),
        (r#""LCMScheduler""#, K::Lcm),
    ] {
        assert_eq!(
            kind(&format!(r#"{{"_class_name":{class}}}"#)),
            Some(want),
            "{class}"
        );
    }
    // Not implemented: DDPM, the noise-predicting DPM-Solver algorithms.
    assert_eq!(kind(r#"{"_class_name":"DDPMScheduler"}"#), None);
    let dpm = r#"{"_class_name":"DPMSolverMultistepScheduler","algorithm_type":"dpmsolver"}"#;
    assert_eq!(kind(dpm), None);
    assert_eq!(kind("{}"), None);
    assert_eq!(FALLBACK, SchedulerKind::Ddim);
}

#[test]
fn parses_python_non_finite_numbers_and_ignores_unknown_keys() {
    let c = parse(
        r#"{"_class_name":"DPMSolverMultistepScheduler","lambda_min_clipped":-Infinity,
            "sigma_max":Infinity,"note":"-Infinity stays a string","variance_type":null,
            "some_future_key":[1,2,{"x":NaN}]}"#,
    );
    assert_eq!(c.lambda_min_clipped, Some(f64::NEG_INFINITY));
    assert_eq!(c.sigma_max, Some(f64::INFINITY));
    assert_eq!(c.variance_type, None);
    build(
        SchedulerKind::DpmPp2m,
        &SchedulerConfig {
            sigma_max: None,
            ..c
        },
        20,
        "f",
    )
    .unwrap();
}

#[test]
fn use_default_values_keys_fall_back_to_each_class_default() {
    // Saved by a DDIM whose spacing was its default: Euler must use its own ("linspace").
    let c = parse(
        r#"{"_class_name":"DDIMScheduler","timestep_spacing":"leading","steps_offset":1,
        "_use_default_values":["timestep_spacing"]}"#,
    );
    assert_eq!(c.timestep_spacing, None);
    let euler = build(SchedulerKind::Euler, &c, 4, "f").unwrap();
    assert_eq!(euler.timesteps(), &[999.0, 666.0, 333.0, 0.0]);
    let ddim = build(SchedulerKind::Ddim, &c, 4, "f").unwrap();
    assert_eq!(ddim.timesteps(), &[751.0, 501.0, 251.0, 1.0]);
}

#[test]
fn malformed_configs_name_the_file() {
    for text in [
        "not json",
        "[1, 2]",
        r#"{"num_train_timesteps":"many"}"#,
        r#"{"beta_start":"big"}"#,
    ] {
        match SchedulerConfig::from_json_str(text, "x/scheduler_config.json") {
            Err(Error::Config { file, .. }) => assert_eq!(file, "x/scheduler_config.json"),
            other => panic!("{text}: {other:?}"),
        }
    }
}

#[test]
fn unsupported_values_name_the_field() {
    use SchedulerKind::*;
    let cases: &[(SchedulerKind, &str, &str)] = &[
        (Ddim, r#"{"thresholding":true}"#, "thresholding"),
        (Ddim, r#"{"beta_schedule":"sigmoid"}"#, "beta_schedule"),
        (
            Ddim,
            r#"{"prediction_type":"flow_prediction"}"#,
            "prediction_type",
        ),
        (Ddim, r#"{"timestep_spacing":"karras"}"#, "timestep_spacing"),
        (
            Ddim,
            r#"{"num_train_timesteps":20,"trained_betas":[0.1,0.2]}"#,
            "trained_betas",
        ),
        (
            Euler,
            r#"{"interpolation_type":"log_linear"}"#,
            "interpolation_type",
        ),
        (
            Euler,
            r#"{"use_exponential_sigmas":true}"#,
            "use_exponential_sigmas",
        ),
        (Euler, r#"{"use_beta_sigmas":true}"#, "use_beta_sigmas"),
        (
            Euler,
            r#"{"timestep_type":"continuous","prediction_type":"v_prediction"}"#,
            "timestep_type",
        ),
        (Euler, r#"{"final_sigmas_type":"one"}"#, "final_sigmas_type"),
        (
            EulerAncestral,
            r#"{"prediction_type":"sample"}"#,
            "prediction_type",
        ),
        (DpmPp2m, r#"{"solver_type":"heun"}"#, "solver_type"),
        (DpmPp2m, r#"{"solver_order":3}"#, "solver_order"),
        (DpmPp2mKarras, r#"{"solver_order":1}"#, "solver_order"),
        (DpmPp2m, r#"{"use_lu_lambdas":true}"#, "use_lu_lambdas"),
        (DpmPp2m, r#"{"euler_at_final":true}"#, "euler_at_final"),
        (
            DpmPp2m,
            r#"{"variance_type":"learned_range"}"#,
            "variance_type",
        ),
        (DpmPp2m, r#"{"thresholding":true}"#, "thresholding"),
        (DpmPp2m, r#"{"use_flow_sigmas":true}"#, "use_flow_sigmas"),
        (
            DpmPp2m,
            r#"{"use_dynamic_shifting":true}"#,
            "use_dynamic_shifting",
        ),
        (
            DpmPp2mKarras,
            r#"{"use_exponential_sigmas":true}"#,
            "use_exponential_sigmas",
        ),
        (
            DpmPp2m,
            r#"{"final_sigmas_type":"denoise_to_zero"}"#,
            "final_sigmas_type",
        ),
    ];
    for &(kind, json, field) in cases {
        assert_eq!(unsupported_field(kind, json), field, "{kind} {json}");
    }
}

#[test]
fn options_other_classes_own_are_ignored() {
    // Fields a class does not have never reach it (diffusers' from_config drops them).
    let c = parse(
        r#"{"_class_name":"DPMSolverMultistepScheduler","algorithm_type":"sde-dpmsolver++",
        "solver_order":3,"use_exponential_sigmas":true,"interpolation_type":"log_linear"}"#,
    );
    build(SchedulerKind::Ddim, &c, 10, "f").unwrap();
    build(SchedulerKind::EulerAncestral, &c, 10, "f").unwrap();
    // Harmless values diffusers accepts: continuous epsilon timesteps, DEIS/UniPC solver names,
    // DDPM's variance type.
    let c = parse(
        r#"{"timestep_type":"continuous","solver_type":"bh2","variance_type":"fixed_small"}"#,
    );
    build(SchedulerKind::Euler, &c, 10, "f").unwrap();
    build(SchedulerKind::DpmPp2m, &c, 10, "f").unwrap();
    // The DPM names set the algorithm, whatever the config says (diffusers'
    // `from_config(config, algorithm_type=…)`).
    let c = parse(r#"{"algorithm_type":"dpmsolver"}"#);
    build(SchedulerKind::DpmPp2m, &c, 10, "f").unwrap();
    build(SchedulerKind::DpmPp2mSde, &c, 10, "f").unwrap();
}

#[test]
fn step_counts_are_validated() {
    let c = parse(SD15_PNDM);
    for kind in SchedulerKind::ALL {
        assert!(matches!(
            build(kind, &c, 0, "f"),
            Err(Error::InvalidParam { field: "steps", .. })
        ));
        assert!(matches!(
            build(kind, &c, 1001, "f"),
            Err(Error::InvalidParam { field: "steps", .. })
        ));
        assert_eq!(
            build(kind, &c, 1000, "f").is_ok(),
            // LCM takes at most `original_inference_steps` (50).
            !matches!(
                kind,
                SchedulerKind::Ddim | SchedulerKind::Pndm | SchedulerKind::Lcm
            ),
            "{kind}"
        );
    }
    // DDIM (and PNDM) leading with steps_offset 1 and 1000 steps would index
    // alphas_cumprod[1000].
    let c = parse(r#"{"num_train_timesteps":100,"steps_offset":1}"#);
    assert!(build(SchedulerKind::Ddim, &c, 99, "f").is_ok());
    assert!(matches!(
        build(SchedulerKind::Ddim, &c, 100, "f"),
        Err(Error::InvalidParam { field: "steps", .. })
    ));
}

#[test]
fn ddim_defaults_differ_from_euler_defaults() {
    // The SD-Turbo config has no clip_sample / set_alpha_to_one: DDIM takes its own defaults
    // (true / true, leading unless given); Euler reads the config's trailing spacing.
    let c = parse(
        r#"{"_class_name":"EulerDiscreteScheduler","beta_schedule":"scaled_linear",
        "beta_start":0.00085,"beta_end":0.012,"timestep_spacing":"trailing","steps_offset":1}"#,
    );
    let ddim = build(SchedulerKind::Ddim, &c, 4, "f").unwrap();
    assert_eq!(ddim.timesteps(), &[999.0, 749.0, 499.0, 249.0]);
    assert_eq!(ddim.init_noise_sigma(), 1.0);
    let euler = build(SchedulerKind::Euler, &c, 1, "f").unwrap();
    assert_eq!(euler.timesteps(), &[999.0]);
    assert!((euler.init_noise_sigma() - 14.614646911621094).abs() < 1e-6);
}
