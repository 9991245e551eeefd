//! OpenAI's images request bodies read into the gRPC wire request, field by field, so that a
//! wrong type or value is refused naming the field as this API spells it. Our own fields ride
//! in the same body (the SDKs' `extra_body`). Fields this worker has no use for (`quality`,
//! `style`, `user`, …) are accepted and ignored, as OpenAI-compatible servers do.

use super::HttpError;
use jhakaas_proto::v1 as pb;
use serde_json::{Map, Value};

/// The JSON object of a request body.
fn object(body: &[u8]) -> Result<Map<String, Value>, HttpError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(HttpError::invalid("body", "the body must be a JSON object")),
        Err(e) => Err(HttpError::invalid(
            "body",
            format!("the body is not JSON: {e}"),
        )),
    }
}

fn string(m: &Map<String, Value>, field: &str) -> Result<Option<String>, HttpError> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(HttpError::invalid(
            field,
            format!("invalid {field}: expected a string"),
        )),
    }
}

fn unsigned(m: &Map<String, Value>, field: &str, max: u64) -> Result<Option<u64>, HttpError> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= max => Ok(Some(n)),
            _ => Err(HttpError::invalid(
                field,
                format!("invalid {field}: expected a whole number from 0 to {max}"),
            )),
        },
    }
}

fn number(m: &Map<String, Value>, field: &str) -> Result<Option<f32>, HttpError> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() && x.abs() <= f32::MAX as f64 => Ok(Some(x as f32)),
            _ => Err(HttpError::invalid(
                field,
                format!("invalid {field}: expected a number"),
            )),
        },
    }
}

/// `"WxH"` (e.g. `"512x512"`), or `"auto"`: the model's default.
fn size(m: &Map<String, Value>) -> Result<(u32, u32), HttpError> {
    let Some(s) = string(m, "size")? else {
        return Ok((0, 0));
    };
    if s == "auto" {
        return Ok((0, 0));
    }
    let bad = || HttpError::invalid("size", format!("invalid size: `{s}` is not WIDTHxHEIGHT"));
    let (w, h) = s.split_once('x').ok_or_else(bad)?;
    let parse = |v: &str| -> Result<u32, HttpError> {
        if v.is_empty() || v.len() > 5 || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        v.parse::<u32>().ok().filter(|&n| n > 0).ok_or_else(bad)
    };
    Ok((parse(w)?, parse(h)?))
}

fn output_format(m: &Map<String, Value>) -> Result<i32, HttpError> {
    Ok(match string(m, "output_format")?.as_deref() {
        None | Some("png") => pb::OutputFormat::Png as i32,
        Some("jpeg") | Some("jpg") => pb::OutputFormat::Jpeg as i32,
        Some("webp") => pb::OutputFormat::Webp as i32,
        Some(other) => {
            return Err(HttpError::invalid(
                "output_format",
                format!("invalid output_format: `{other}` is not png, jpeg or webp"),
            ))
        }
    })
}

fn loras(m: &Map<String, Value>) -> Result<Vec<pb::LoraAdapter>, HttpError> {
    let Some(v) = m.get("loras").filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let Value::Array(items) = v else {
        return Err(HttpError::invalid(
            "loras",
            "invalid loras: expected a list",
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let Value::Object(l) = item else {
                return Err(HttpError::invalid(
                    &format!("loras[{i}]"),
                    format!("invalid loras[{i}]: expected {{\"name\", \"weight\"}}"),
                ));
            };
            Ok(pb::LoraAdapter {
                name: string(l, "name")
                    .map_err(|_| {
                        HttpError::invalid(&format!("loras[{i}].name"), "expected a string")
                    })?
                    .unwrap_or_default(),
                weight: number(l, "weight")
                    .map_err(|_| {
                        HttpError::invalid(&format!("loras[{i}].weight"), "expected a number")
                    })?
                    .unwrap_or(1.0),
            })
        })
        .collect()
}

/// `POST /v1/images/generations`'s body as the wire request: `model`, `prompt`, `n`, `size`,
/// `response_format` (`b64_json` only), `output_format`, and ours: `negative_prompt`, `steps`,
/// `guidance_scale`, `seed`, `scheduler`, `rng`, `loras`, `strength`.
pub fn generation(body: &[u8]) -> Result<pb::GenerateRequest, HttpError> {
    fields(&object(body)?)
}

/// The request fields shared by generations and edits, from a JSON object (an edit's form
/// fields arrive as one, see [`form_value`]).
pub fn fields(m: &Map<String, Value>) -> Result<pb::GenerateRequest, HttpError> {
    match string(m, "response_format")?.as_deref() {
        None | Some("b64_json") => {}
        Some(other) => {
            return Err(HttpError::invalid(
                "response_format",
                format!(
                    "invalid response_format: `{other}` is not served (only b64_json: this worker stores no images)"
                ),
            ))
        }
    }
    let prompt = string(m, "prompt")?
        .ok_or_else(|| HttpError::invalid("prompt", "invalid prompt: required"))?;
    let (width, height) = size(m)?;
    Ok(pb::GenerateRequest {
        model: string(m, "model")?.unwrap_or_default(),
        prompt,
        negative_prompt: string(m, "negative_prompt")?.unwrap_or_default(),
        width,
        height,
        steps: unsigned(m, "steps", u32::MAX as u64)?.unwrap_or(0) as u32,
        guidance_scale: number(m, "guidance_scale")?.unwrap_or(0.0),
        seed: unsigned(m, "seed", u64::MAX)?,
        num_images: unsigned(m, "n", u32::MAX as u64)?.unwrap_or(1) as u32,
        scheduler: string(m, "scheduler")?.unwrap_or_default(),
        rng: string(m, "rng")?.unwrap_or_default(),
        output_format: output_format(m)?,
        loras: loras(m)?,
        strength: number(m, "strength")?.unwrap_or(0.0),
        ..Default::default()
    })
}

/// A multipart text field as the JSON value it stands for: numbers for the numeric fields,
/// JSON for `loras`, a string otherwise (a bad number stays a string and is refused by name).
pub fn form_value(name: &str, text: &str) -> Value {
    match name {
        "n" | "steps" | "seed" | "guidance_scale" | "strength" | "loras" => {
            serde_json::from_str(text.trim()).unwrap_or_else(|_| Value::String(text.to_string()))
        }
        _ => Value::String(text.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jhakaas_tests::hostile::Rng;

    /// A random JSON value: each kind, edge numbers, odd strings, nesting.
    fn value(rng: &mut Rng, depth: u32) -> Value {
        match rng.below(if depth > 2 { 7 } else { 9 }) {
            0 => Value::Null,
            1 => Value::Bool(rng.chance(50)),
            2 => {
                serde_json::json!(rng.pick(&[0i64, 1, -1, 7, 64, 512, 1 << 31, i64::MAX, i64::MIN]))
            }
            3 => serde_json::json!(rng.pick(&[0.5f64, -0.0, 1e30, -1e300, 3.4e38, 7.0])),
            4 => Value::String(
                rng.pick(&[
                    "", "64x64", "512x512", "0x0", "x", "64x", "99999x1", "auto", "b64_json",
                    "url", "png", "jpeg", "webp", "gif", "tiny", "\u{0}", "ü×ß", "1e3x4",
                ])
                .to_string(),
            ),
            5 => Value::String("p".repeat(rng.below(3000) as usize)),
            6 => serde_json::json!(rng.bits()),
            7 => Value::Array((0..rng.below(4)).map(|_| value(rng, depth + 1)).collect()),
            _ => Value::Object(
                (0..rng.below(4))
                    .map(|_| {
                        (
                            rng.pick(&["name", "weight", "x"]).to_string(),
                            value(rng, depth + 1),
                        )
                    })
                    .collect(),
            ),
        }
    }

    fn valid(field: &str) -> Value {
        match field {
            "n" => serde_json::json!(2),
            "size" => serde_json::json!("64x48"),
            "response_format" => serde_json::json!("b64_json"),
            "output_format" => serde_json::json!("webp"),
            "steps" => serde_json::json!(4),
            "guidance_scale" => serde_json::json!(7.5),
            "seed" => serde_json::json!(42),
            "loras" => serde_json::json!([{"name": "l", "weight": 0.5}]),
            _ => serde_json::json!("a cat"),
        }
    }

    #[test]
    fn fuzzed_bodies_never_panic_and_every_refusal_names_a_param() {
        const FIELDS: &[&str] = &[
            "model",
            "prompt",
            "n",
            "size",
            "response_format",
            "output_format",
            "negative_prompt",
            "steps",
            "guidance_scale",
            "seed",
            "scheduler",
            "rng",
            "loras",
            "quality",
            "user",
        ];
        let mut rng = Rng(0x5eed_0fa1);
        let (mut accepted, mut refused) = (0, 0);
        for case in 0..20_000 {
            let body = if rng.chance(5) {
                (0..rng.below(64))
                    .map(|_| rng.bits() as u8)
                    .collect::<Vec<u8>>()
            } else {
                let mut m = Map::new();
                for f in FIELDS {
                    if !rng.chance(if *f == "prompt" { 95 } else { 40 }) {
                        continue;
                    }
                    // Each field valid most of the time, anything at all otherwise.
                    let v = if rng.chance(85) {
                        valid(f)
                    } else {
                        value(&mut rng, 0)
                    };
                    m.insert(f.to_string(), v);
                }
                serde_json::to_vec(&Value::Object(m)).unwrap()
            };
            match std::panic::catch_unwind(|| generation(&body)) {
                Ok(Ok(_)) => accepted += 1,
                Ok(Err(e)) => {
                    refused += 1;
                    let param = e.param.unwrap_or_else(|| panic!("case {case}: no param"));
                    assert!(
                        param == "body" || FIELDS.iter().any(|f| param.starts_with(f)),
                        "case {case}: param {param}"
                    );
                    assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
                }
                Err(_) => panic!("case {case} panicked: {}", String::from_utf8_lossy(&body)),
            }
        }
        assert!(
            accepted > 100 && refused > 100,
            "{accepted} accepted, {refused} refused"
        );
    }

    fn refused(body: &str) -> HttpError {
        generation(body.as_bytes()).expect_err(body)
    }

    #[test]
    fn a_generation_body_becomes_the_wire_request() {
        let r = generation(
            br#"{"model":"m","prompt":"a cat","n":2,"size":"512x384","output_format":"jpeg",
                 "seed":7,"steps":4,"guidance_scale":5.5,"scheduler":"euler","rng":"torch-cpu",
                 "loras":[{"name":"l","weight":0.5}],"quality":"hd","user":"u"}"#,
        )
        .unwrap();
        assert_eq!((r.model.as_str(), r.prompt.as_str()), ("m", "a cat"));
        assert_eq!((r.width, r.height, r.num_images), (512, 384, 2));
        assert_eq!(r.output_format, pb::OutputFormat::Jpeg as i32);
        assert_eq!((r.seed, r.steps, r.guidance_scale), (Some(7), 4, 5.5));
        assert_eq!(
            (r.scheduler.as_str(), r.rng.as_str()),
            ("euler", "torch-cpu")
        );
        assert_eq!(r.loras[0].name, "l");
        let d = generation(br#"{"prompt":"p"}"#).unwrap();
        assert_eq!((d.width, d.height, d.num_images, d.seed), (0, 0, 1, None));
    }

    #[test]
    fn bad_fields_are_refused_by_name() {
        for (body, param) in [
            (r#"{"prompt":"p","size":"big"}"#, "size"),
            (r#"{"prompt":"p","size":"0x512"}"#, "size"),
            (r#"{"prompt":"p","size":"512x99999999"}"#, "size"),
            (r#"{"prompt":"p","n":-1}"#, "n"),
            (r#"{"prompt":"p","n":"2"}"#, "n"),
            (r#"{"prompt":"p","seed":1.5}"#, "seed"),
            (r#"{"prompt":"p","guidance_scale":"x"}"#, "guidance_scale"),
            (
                r#"{"prompt":"p","response_format":"url"}"#,
                "response_format",
            ),
            (r#"{"prompt":"p","output_format":"gif"}"#, "output_format"),
            (r#"{"prompt":"p","loras":[1]}"#, "loras[0]"),
            (r#"{"prompt":"p","loras":{}}"#, "loras"),
            (r#"{"n":1}"#, "prompt"),
            (r#"{"prompt":3}"#, "prompt"),
            (r#"[1]"#, "body"),
            (r#"{"prompt""#, "body"),
        ] {
            let e = refused(body);
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{body}");
        }
    }
}
