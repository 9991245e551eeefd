//! Fuzzing the request path in-process: random wire requests (edge values, garbage strings,
//! odd sizes, NaNs, broken images) through [`super::convert::job_request`] and the engine's
//! rules, asserting that nothing panics, that every refusal is INVALID_ARGUMENT or NOT_FOUND
//! naming a field, and that every accepted request resolves within the server's limits.
//! `JHAKAAS_FUZZ_CASES` sets the number of cases (CI runs the default; the benchmark-style run
//! in benches/results used 1,000,000).

use super::convert::{job_request, Limits};
use crate::serve::engine::models::{ModelSpec, ModelTable};
use jhakaas_model_manager::ModelSource;
use jhakaas_proto::v1 as pb;
use jhakaas_tests::hostile::{request, Rng, FIELDS};
use std::path::PathBuf;
use tonic::Code;

fn table() -> ModelTable {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/sd1-tiny");
    let table = ModelTable::new(
        vec![ModelSpec {
            name: "tiny".into(),
            source: ModelSource::Local(dir),
            vae: None,
            defaults: Default::default(),
        }],
        "tiny".into(),
    )
    .with_loras(crate::serve::engine::loras::LoraLibrary::new(Some(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/reference/lora-sd1-tiny"),
    )));
    table.describe_available();
    assert!(
        table.description("tiny").is_some(),
        "the fixture's configs read"
    );
    table
}

#[test]
fn random_requests_never_panic_never_escape_a_limit_and_every_refusal_names_a_field() {
    let cases: u64 = std::env::var("JHAKAAS_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let limits = Limits {
        max_pixels: 262_144,
        max_steps: 50,
        max_images: 2,
        max_init_image_bytes: 4096,
    };
    let table = table();
    let description = table.description("tiny").unwrap();
    let png = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/reference/init.png"),
    )
    .unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut accepted, mut refused) = (0u64, 0u64);
    let started = std::time::Instant::now();
    for case in 0..cases {
        let req = request(&mut rng, &png);
        let shown = format!(
            "{:?}",
            pb::GenerateRequest {
                init_image: Vec::new(),
                ..req.clone()
            }
        );
        let outcome = std::panic::catch_unwind(|| job_request(&req, &table, &limits, None));
        let result = outcome.unwrap_or_else(|_| panic!("case {case} panicked: {shown}"));
        match result {
            Ok(job) => {
                accepted += 1;
                let r = description
                    .resolve(&job.params, &job.limits)
                    .unwrap_or_else(|e| {
                        panic!("case {case}: accepted, then refused ({e}): {shown}")
                    });
                assert!(
                    r.width as u64 * r.height as u64 <= limits.max_pixels
                        && r.steps <= limits.max_steps as usize
                        && r.num_images <= limits.max_images as usize,
                    "case {case} escaped a limit ({}x{}, {} steps, {} images): {shown}",
                    r.width,
                    r.height,
                    r.steps,
                    r.num_images
                );
                assert_eq!(
                    job.params.seed,
                    Some(r.seed),
                    "the seed is fixed at acceptance"
                );
            }
            Err(e) => {
                let status = super::job_wire::status(e.into());
                refused += 1;
                assert!(
                    matches!(status.code(), Code::InvalidArgument | Code::NotFound),
                    "case {case}: {status:?}"
                );
                let m = status.message();
                assert!(
                    m.starts_with("invalid ") && FIELDS.iter().any(|f| m.contains(f)),
                    "case {case}: the refusal names no field: {m:?} for {shown}"
                );
            }
        }
    }
    eprintln!(
        "fuzzed {cases} requests in {:.2?}: {accepted} accepted, {refused} refused, 0 panics, 0 limit escapes",
        started.elapsed()
    );
    assert!(
        accepted > cases / 100,
        "the generator should reach acceptance too"
    );
}
