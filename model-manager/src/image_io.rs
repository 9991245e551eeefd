//! Pixels in and out: decoded VAE output to RGB8 exactly as diffusers' `numpy_to_pil` does,
//! init images to VAE input, and PNG/JPEG/WebP encoding with the generation parameters embedded.

use crate::error::{Error, Result};
use crate::params::ImageFormat;
use candle_core::{DType, Device, Tensor};
use image::RgbImage;

/// VAE output `[N, 3, H, W]` in about [-1, 1] → RGB8 images: `round(clamp(x/2 + 0.5, 0, 1) · 255)`
/// with numpy's round-half-to-even.
pub fn tensor_to_images(decoded: &Tensor) -> Result<Vec<RgbImage>> {
    let (n, c, h, w) = decoded.dims4()?;
    if c != 3 {
        return Err(Error::Image(format!(
            "the VAE produced {c} channels, expected 3"
        )));
    }
    let pixels = ((decoded.to_dtype(DType::F32)? / 2.0)? + 0.5)?
        .clamp(0f32, 1f32)?
        .permute((0, 2, 3, 1))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let per = h * w * 3;
    (0..n)
        .map(|i| {
            let bytes: Vec<u8> = pixels[i * per..(i + 1) * per]
                .iter()
                .map(|&v| (v * 255.0).round_ties_even() as u8)
                .collect();
            RgbImage::from_raw(w as u32, h as u32, bytes)
                .ok_or_else(|| Error::Image("decoded buffer has the wrong size".into()))
        })
        .collect()
}

/// RGB8 image → `[1, 3, H, W]` in [-1, 1] (diffusers' `VaeImageProcessor.preprocess`), resized
/// with Lanczos3 first if it is not already `width × height`.
pub fn image_to_tensor(
    img: &RgbImage,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor> {
    rgb_tensor(img, width, height, device, |b| b as f32 / 255.0 * 2.0 - 1.0)
}

/// RGB8 image → `[1, 3, H, W]` in [0, 1], resized like [`image_to_tensor`]: a control image as
/// diffusers' control image processor (`do_normalize=False`) gives it.
pub fn image_to_unit_tensor(
    img: &RgbImage,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor> {
    rgb_tensor(img, width, height, device, |b| b as f32 / 255.0)
}

/// `img` resized (Lanczos3) to `width × height` when it is not that size, each byte mapped
/// by `value`, as a `[1, 3, H, W]` tensor.
fn rgb_tensor(
    img: &RgbImage,
    width: usize,
    height: usize,
    device: &Device,
    value: impl Fn(u8) -> f32,
) -> Result<Tensor> {
    let img = resized(img, width as u32, height as u32);
    let data: Vec<f32> = img.as_raw().iter().map(|&b| value(b)).collect();
    Ok(Tensor::from_vec(data, (1, height, width, 3), device)?
        .permute((0, 3, 1, 2))?
        .contiguous()?)
}

/// `img` at `width × height`: itself when it already is, else resized with Lanczos3 (the one
/// resize every input image, mask and control image goes through).
pub fn resized<P: image::Pixel + 'static>(
    img: &image::ImageBuffer<P, Vec<P::Subpixel>>,
    width: u32,
    height: u32,
) -> std::borrow::Cow<'_, image::ImageBuffer<P, Vec<P::Subpixel>>> {
    if img.dimensions() == (width, height) {
        std::borrow::Cow::Borrowed(img)
    } else {
        let filter = image::imageops::FilterType::Lanczos3;
        std::borrow::Cow::Owned(image::imageops::resize(img, width, height, filter))
    }
}

/// Decodes an init image from encoded bytes (PNG, JPEG, WebP, …), refusing more than
/// `max_pixels` before allocating the pixel buffer (no decompression bombs).
pub fn decode_image(bytes: &[u8], max_pixels: u64) -> Result<RgbImage> {
    decode_image_for(bytes, max_pixels, "init_image")
}

/// [`decode_image`] for the request field `field` (`init_image`, `mask`, a control image),
/// which its errors name.
pub fn decode_image_for(bytes: &[u8], max_pixels: u64, field: &'static str) -> Result<RgbImage> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::invalid(field, e.to_string()))?;
    let mut reader = reader;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(16));
    reader.limits(limits);
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| Error::invalid(field, format!("cannot read the image: {e}")))?;
    if w as u64 * h as u64 > max_pixels {
        return Err(Error::invalid(
            field,
            format!("{w}×{h} exceeds the limit of {max_pixels} pixels"),
        ));
    }
    let img = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::invalid(field, e.to_string()))?
        .decode()
        .map_err(|e| Error::invalid(field, format!("cannot decode the image: {e}")))?;
    Ok(img.to_rgb8())
}

/// Encodes `img` as `format`; PNG carries `parameters` (the A1111 convention read by most image
/// tools) and `Software` text chunks.
pub fn encode_image(img: &RgbImage, format: ImageFormat, parameters: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    match format {
        ImageFormat::Png => {
            let mut enc = png::Encoder::new(&mut out, img.width(), img.height());
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let text_err = |e: png::EncodingError| Error::Image(e.to_string());
            enc.add_itxt_chunk("parameters".into(), parameters.into())
                .map_err(text_err)?;
            enc.add_text_chunk(
                "Software".into(),
                concat!("jhakaas-worker ", env!("CARGO_PKG_VERSION")).into(),
            )
            .map_err(text_err)?;
            let mut writer = enc.write_header().map_err(text_err)?;
            writer.write_image_data(img.as_raw()).map_err(text_err)?;
            writer.finish().map_err(text_err)?;
        }
        ImageFormat::Jpeg => {
            let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90);
            img.write_with_encoder(enc)
                .map_err(|e| Error::Image(e.to_string()))?;
        }
        ImageFormat::Webp => {
            let enc = image::codecs::webp::WebPEncoder::new_lossless(&mut out);
            img.write_with_encoder(enc)
                .map_err(|e| Error::Image(e.to_string()))?;
        }
    }
    Ok(out)
}

/// The `parameters` text embedded in PNGs, in the AUTOMATIC1111 layout most viewers parse:
/// prompt, `Negative prompt: …`, then `Key: value` pairs.
pub fn parameters_text(
    prompt: &str,
    negative_prompt: Option<&str>,
    resolved: &crate::params::ResolvedParams,
    seed: u64,
    model: &str,
) -> String {
    let mut s = prompt.to_string();
    if let Some(neg) = negative_prompt.filter(|n| !n.is_empty()) {
        s.push_str("\nNegative prompt: ");
        s.push_str(neg);
    }
    s.push_str(&format!(
        "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, RNG: {}, Size: {}x{}, Model: {}",
        resolved.steps,
        resolved.scheduler,
        resolved.guidance_scale,
        seed,
        resolved.rng,
        resolved.width,
        resolved.height,
        model
    ));
    if let Some(strength) = resolved.strength {
        s.push_str(&format!(", Denoising strength: {strength}"));
    }
    if let Some(sc) = &resolved.size_conditioning {
        let (ow, oh) = sc.original_size;
        let (top, left) = sc.crop_top_left;
        let (tw, th) = sc.target_size;
        if (ow, oh, top, left, tw, th)
            != (
                resolved.width,
                resolved.height,
                0,
                0,
                resolved.width,
                resolved.height,
            )
        {
            s.push_str(&format!(
                ", Original size: {ow}x{oh}, Crop top-left: {top},{left}, Target size: {tw}x{th}"
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern() -> RgbImage {
        RgbImage::from_fn(16, 8, |x, y| {
            image::Rgb([(x * 15) as u8, (y * 30) as u8, 128])
        })
    }

    #[test]
    fn png_round_trips_pixels_and_carries_parameters() {
        let img = pattern();
        let bytes = encode_image(&img, ImageFormat::Png, "a cat\nSteps: 4").unwrap();
        let decoded = decode_image(&bytes, 1 << 20).unwrap();
        assert_eq!(decoded, img);
        let decoder = png::Decoder::new(std::io::Cursor::new(&bytes));
        let reader = decoder.read_info().unwrap();
        let info = reader.info();
        let text: Vec<String> = info
            .utf8_text
            .iter()
            .map(|t| t.get_text().unwrap())
            .collect();
        assert_eq!(text, vec!["a cat\nSteps: 4".to_string()]);
    }

    #[test]
    fn jpeg_and_webp_decode_back_to_the_same_size() {
        let img = pattern();
        for f in [ImageFormat::Jpeg, ImageFormat::Webp] {
            let bytes = encode_image(&img, f, "x").unwrap();
            let back = decode_image(&bytes, 1 << 20).unwrap();
            assert_eq!(back.dimensions(), img.dimensions(), "{f:?}");
        }
    }

    #[test]
    fn garbage_and_oversized_images_are_rejected_naming_the_field() {
        let err = decode_image(b"not an image", 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(err.contains("init_image"), "{err}");
        let bytes = encode_image(&pattern(), ImageFormat::Png, "").unwrap();
        let err = decode_image(&bytes, 100).unwrap_err().to_string();
        assert!(
            err.contains("init_image") && err.contains("exceeds"),
            "{err}"
        );
    }

    #[test]
    fn vae_range_maps_like_diffusers() {
        let t = Tensor::from_vec(
            vec![-1.0f32, 0.0, 1.0, 2.0, -0.5, 0.999],
            (1, 3, 1, 2),
            &Device::Cpu,
        )
        .unwrap();
        let imgs = tensor_to_images(&t).unwrap();
        assert_eq!(imgs[0].get_pixel(0, 0).0, [0, 255, 64]);
        assert_eq!(imgs[0].get_pixel(1, 0).0, [128, 255, 255]);
    }

    #[test]
    fn parameters_text_follows_the_a1111_layout() {
        let r = crate::params::ResolvedParams {
            width: 512,
            height: 768,
            steps: 20,
            guidance_scale: 7.5,
            scheduler: crate::SchedulerKind::DpmPp2mKarras,
            seed: 42,
            rng: crate::noise::RngKind::TorchCpu,
            num_images: 1,
            strength: None,
            size_conditioning: None,
        };
        let t = parameters_text("a cat", Some("dog"), &r, 43, "sd-1.5");
        assert_eq!(
            t,
            "a cat\nNegative prompt: dog\nSteps: 20, Sampler: dpmpp-2m-karras, CFG scale: 7.5, Seed: 43, RNG: torch-cpu, Size: 512x768, Model: sd-1.5"
        );
    }
}
