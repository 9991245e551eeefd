//! `POST /v1/images/edits` (multipart): OpenAI's image edit as our inpainting. `image` is the
//! picture; `mask` says where to paint in OpenAI's convention, transparent pixels (alpha below
//! one half) are repainted, which becomes the engine's white-is-repaint mask. A mask without an
//! alpha channel is taken as the engine's own (white = repaint). Without a mask, an image with
//! transparent pixels is its own mask (as OpenAI does), and an opaque one is img2img at
//! `strength`. The output is the image's size (down to a multiple of 8) unless `size` says
//! otherwise. The other fields are those of generations, as form fields.

use super::body::{fields, form_value};
use super::HttpError;
use axum::extract::Multipart;
use jhakaas_proto::v1 as pb;
use serde_json::{Map, Value};
use std::io::Cursor;

/// The files and fields of an edit request.
#[derive(Default)]
struct Form {
    image: Option<Vec<u8>>,
    mask: Option<Vec<u8>>,
    fields: Map<String, Value>,
}

async fn read_form(mut multipart: Multipart, max_body: usize) -> Result<Form, HttpError> {
    let mut form = Form::default();
    let bad = |field: &str, e: axum::extract::multipart::MultipartError| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            HttpError::too_large(max_body)
        } else {
            HttpError::invalid(
                field,
                format!("invalid {field}: the form does not read: {}", e.body_text()),
            )
        }
    };
    while let Some(part) = multipart.next_field().await.map_err(|e| bad("body", e))? {
        let name = part.name().unwrap_or_default().to_string();
        match name.as_str() {
            "image" | "image[]" => {
                if form.image.is_some() {
                    return Err(HttpError::invalid(
                        "image",
                        "invalid image: one image per edit",
                    ));
                }
                form.image = Some(part.bytes().await.map_err(|e| bad("image", e))?.to_vec());
            }
            "mask" => form.mask = Some(part.bytes().await.map_err(|e| bad("mask", e))?.to_vec()),
            _ => {
                let text = part.text().await.map_err(|e| bad(&name, e))?;
                form.fields.insert(name.clone(), form_value(&name, &text));
            }
        }
    }
    Ok(form)
}

/// Decodes `bytes` (PNG/JPEG/WebP) with bounded allocations; `field` names it in errors.
fn decode(bytes: &[u8], field: &str) -> Result<image::DynamicImage, HttpError> {
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| HttpError::invalid(field, format!("invalid {field}: {e}")))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(16384);
    limits.max_image_height = Some(16384);
    limits.max_alloc = Some(512 << 20);
    reader.limits(limits);
    reader
        .decode()
        .map_err(|e| HttpError::invalid(field, format!("invalid {field}: cannot decode it: {e}")))
}

/// PNG bytes of the engine's mask (white = repaint) from an image's alpha: transparent is white.
fn mask_from_alpha(image: &image::DynamicImage) -> Vec<u8> {
    let rgba = image.to_rgba8();
    let mask = image::GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        image::Luma([if rgba.get_pixel(x, y)[3] < 128 {
            255
        } else {
            0
        }])
    });
    let mut png = Vec::new();
    mask.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .expect("encoding a PNG in memory cannot fail");
    png
}

/// Whether any pixel is transparent (alpha below one half).
fn has_transparency(image: &image::DynamicImage) -> bool {
    image.color().has_alpha() && image.to_rgba8().pixels().any(|p| p[3] < 128)
}

/// The edit as the wire request (an inpainting or img2img request).
pub async fn edit(multipart: Multipart, max_body: usize) -> Result<pb::GenerateRequest, HttpError> {
    let form = read_form(multipart, max_body).await?;
    let image = form
        .image
        .ok_or_else(|| HttpError::invalid("image", "invalid image: required"))?;
    let mut wire = fields(&form.fields)?;
    let mask = form.mask;
    // Decoding is CPU work: off the async threads.
    let (wire, image, mask) = tokio::task::spawn_blocking(move || -> Result<_, HttpError> {
        let decoded = decode(&image, "image")?;
        let mask = match mask {
            Some(m) => {
                let decoded_mask = decode(&m, "mask")?;
                if decoded_mask.color().has_alpha() {
                    Some(mask_from_alpha(&decoded_mask))
                } else {
                    Some(m)
                }
            }
            None if has_transparency(&decoded) => Some(mask_from_alpha(&decoded)),
            None => None,
        };
        if wire.width == 0 && wire.height == 0 {
            wire.width = decoded.width() / 8 * 8;
            wire.height = decoded.height() / 8 * 8;
        }
        Ok((wire, image, mask))
    })
    .await
    .map_err(|e| HttpError::failed(&format!("reading the edit stopped: {e}")))??;
    let mut wire = wire;
    wire.init_image = image;
    if let Some(mask) = mask {
        wire.mask = mask;
    } else if wire.strength == 0.0 {
        wire.strength = 0.8;
    }
    Ok(wire)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jhakaas_tests::hostile::Rng;

    fn png(image: image::DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        image
            .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn an_openai_mask_becomes_the_engines() {
        let rgba = image::RgbaImage::from_fn(4, 2, |x, _| {
            image::Rgba([9, 9, 9, [0, 127, 128, 255][x as usize]])
        });
        let mask = image::load_from_memory(&mask_from_alpha(&rgba.into()))
            .unwrap()
            .to_luma8();
        assert_eq!(
            mask.as_raw(),
            &[255, 255, 0, 0, 255, 255, 0, 0],
            "alpha < 128 is repainted"
        );
        let opaque: image::DynamicImage = image::RgbImage::new(2, 2).into();
        assert!(!has_transparency(&opaque));
    }

    /// Random form fields and random or broken images through the edit's readers: nothing
    /// panics, every refusal names its field.
    #[test]
    fn fuzzed_edit_forms_never_panic_and_every_refusal_names_a_param() {
        const FIELDS: &[&str] = &[
            "prompt",
            "n",
            "size",
            "steps",
            "seed",
            "guidance_scale",
            "strength",
            "loras",
            "output_format",
            "response_format",
            "model",
            "quality",
        ];
        const TEXTS: &[&str] = &[
            "",
            "1",
            "2",
            "-1",
            "1.5",
            "NaN",
            "64x64",
            "x",
            "[]",
            "[{\"name\":1}]",
            "{}",
            "png",
            "url",
            "9999999999999999999999",
            "a cat",
            "\u{0}",
        ];
        let valid = png(image::RgbaImage::from_fn(16, 8, |x, _| {
            image::Rgba([1, 2, 3, if x < 8 { 0 } else { 255 }])
        })
        .into());
        let mut rng = Rng(0x000e_d175);
        let mut refused = 0;
        for case in 0..5_000 {
            let mut m = Map::new();
            for f in FIELDS {
                if rng.chance(50) {
                    m.insert(f.to_string(), form_value(f, rng.pick(TEXTS)));
                }
            }
            if let Err(e) = std::panic::catch_unwind(|| fields(&m))
                .unwrap_or_else(|_| panic!("case {case} panicked: {m:?}"))
            {
                refused += 1;
                let param = e.param.unwrap_or_else(|| panic!("case {case}: no param"));
                assert!(
                    FIELDS.iter().any(|f| param.starts_with(f)),
                    "case {case}: {param}"
                );
            }
            // A truncated, corrupted or random image is refused naming it, never a panic.
            let mut bytes = valid.clone();
            match rng.below(3) {
                0 => bytes.truncate(rng.below(bytes.len() as u64) as usize),
                1 => {
                    let i = rng.below(bytes.len() as u64) as usize;
                    bytes[i] ^= rng.bits() as u8 | 1;
                }
                _ => bytes = (0..rng.below(200)).map(|_| rng.bits() as u8).collect(),
            }
            if let Ok(Err(e)) = std::panic::catch_unwind(|| decode(&bytes, "mask")) {
                assert_eq!(e.param.as_deref(), Some("mask"));
            }
        }
        assert!(refused > 100, "{refused}");
        assert!(decode(&valid, "image").is_ok());
    }
}
