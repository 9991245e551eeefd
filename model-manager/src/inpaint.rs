//! Inpainting and outpainting inputs, as diffusers' inpainting pipelines prepare them: the mask
//! (grayscale as PIL's `convert("L")`, resized like the init image, binarised at 0.5, white =
//! repaint), the masked image (the init image in [-1, 1] with repainted pixels set to 0), the
//! latent-grid mask (nearest neighbour: latent cell `(i, j)` is pixel `(8i, 8j)`), and the
//! outpainting canvas (the image extended by edge pixels, the new area masked).

use candle_core::{Device, Tensor};
use image::{GrayImage, Luma, RgbImage};

use crate::error::{Error, Result};
use crate::image_io::decode_image_for;

/// PIL's `convert("L")` of one RGB pixel: ITU-R 601-2 luma in 16-bit fixed point.
fn pil_luma(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}

/// An RGB image in grayscale as PIL converts it (diffusers' mask processor does).
pub fn to_pil_gray(rgb: &RgbImage) -> GrayImage {
    GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
        let p = rgb.get_pixel(x, y).0;
        Luma([pil_luma(p[0], p[1], p[2])])
    })
}

/// Decodes a mask (PNG, JPEG, WebP, …; colour is converted to gray as PIL does), refusing
/// more than `max_pixels`; errors name the field `mask`.
pub fn decode_mask(bytes: &[u8], max_pixels: u64) -> Result<GrayImage> {
    Ok(to_pil_gray(&decode_image_for(bytes, max_pixels, "mask")?))
}

/// The mask as a `[1, 1, height, width]` f32 tensor of 0s and 1s: resized with Lanczos3 when
/// it is not the output's size, then binarised (`>= 0.5` of full scale is 1), as diffusers'
/// `VaeImageProcessor(do_binarize=True, do_convert_grayscale=True)` prepares it.
pub fn mask_tensor(
    mask: &GrayImage,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor> {
    let resized;
    let mask = if mask.width() as usize != width || mask.height() as usize != height {
        resized = image::imageops::resize(
            mask,
            width as u32,
            height as u32,
            image::imageops::FilterType::Lanczos3,
        );
        &resized
    } else {
        mask
    };
    let data: Vec<f32> = mask
        .as_raw()
        .iter()
        .map(|&v| if v as f32 / 255.0 < 0.5 { 0.0 } else { 1.0 })
        .collect();
    Ok(Tensor::from_vec(data, (1, 1, height, width), device)?)
}

/// The mask on the latent grid (`torch.nn.functional.interpolate(mask, size=(h, w))`, nearest):
/// latent cell `(i, j)` takes pixel `(scale·i, scale·j)`.
pub fn latent_mask(mask: &Tensor, scale: usize) -> Result<Tensor> {
    let (_, _, h, w) = mask.dims4()?;
    let rows = Tensor::arange_step(0u32, h as u32, scale as u32, mask.device())?;
    let cols = Tensor::arange_step(0u32, w as u32, scale as u32, mask.device())?;
    Ok(mask.index_select(&rows, 2)?.index_select(&cols, 3)?)
}

/// Pixels to add on each side of an image before inpainting the new area.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Outpaint {
    /// Pixels added on the left.
    pub left: u32,
    /// Pixels added on top.
    pub top: u32,
    /// Pixels added on the right.
    pub right: u32,
    /// Pixels added at the bottom.
    pub bottom: u32,
}

impl Outpaint {
    /// Parses `LEFT,TOP,RIGHT,BOTTOM` (each a multiple of 8).
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |reason: String| Error::invalid("outpaint", reason);
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        let [l, t, r, b] = parts.as_slice() else {
            return Err(bad(format!("`{s}` is not LEFT,TOP,RIGHT,BOTTOM")));
        };
        let num = |v: &str| {
            v.parse::<u32>()
                .map_err(|_| bad(format!("`{v}` is not a whole number of pixels")))
        };
        Ok(Outpaint {
            left: num(l)?,
            top: num(t)?,
            right: num(r)?,
            bottom: num(b)?,
        })
    }

    /// Whether nothing is added.
    pub fn is_empty(&self) -> bool {
        *self == Outpaint::default()
    }

    /// The canvas `image` grows to, checked: every side a multiple of 8, something added, and
    /// the canvas within `max_pixels` and 8192 pixels a side.
    pub fn canvas_size(&self, image: (u32, u32), max_pixels: u64) -> Result<(u32, u32)> {
        let sides = [self.left, self.top, self.right, self.bottom];
        if sides.iter().any(|v| v % 8 != 0) {
            return Err(Error::invalid(
                "outpaint",
                format!("{sides:?}: every side must be a multiple of 8 pixels"),
            ));
        }
        if self.is_empty() {
            return Err(Error::invalid("outpaint", "adds no pixels"));
        }
        let w = image.0 as u64 + self.left as u64 + self.right as u64;
        let h = image.1 as u64 + self.top as u64 + self.bottom as u64;
        let side = crate::pipeline::MAX_SIDE as u64;
        if w > side || h > side || w * h > max_pixels {
            return Err(Error::invalid(
                "outpaint",
                format!(
                    "the canvas {w}×{h} exceeds the limit of {max_pixels} pixels ({side} a side)"
                ),
            ));
        }
        Ok((w as u32, h as u32))
    }

    /// The extended canvas (new pixels copy the nearest edge pixel) and its mask (white where
    /// pixels were added): what inpainting then fills.
    pub fn apply(&self, image: &RgbImage, max_pixels: u64) -> Result<(RgbImage, GrayImage)> {
        let (w, h) = self.canvas_size(image.dimensions(), max_pixels)?;
        let (iw, ih) = image.dimensions();
        let inside = |x: u32, left: u32, len: u32| x.saturating_sub(left).min(len - 1);
        let canvas = RgbImage::from_fn(w, h, |x, y| {
            *image.get_pixel(inside(x, self.left, iw), inside(y, self.top, ih))
        });
        let mask = GrayImage::from_fn(w, h, |x, y| {
            let original =
                x >= self.left && x < self.left + iw && y >= self.top && y < self.top + ih;
            Luma([if original { 0 } else { 255 }])
        });
        Ok((canvas, mask))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gray_is_pils() {
        // Values PIL gives for Image.new("RGB", (1, 1), c).convert("L").getpixel((0, 0)).
        assert_eq!(pil_luma(200, 30, 90), 88);
        assert_eq!(pil_luma(255, 0, 0), 76);
        assert_eq!(pil_luma(77, 200, 13), 142);
        assert_eq!(pil_luma(255, 255, 255), 255);
        assert_eq!(pil_luma(0, 0, 0), 0);
    }

    #[test]
    fn mask_binarises_at_half_and_samples_the_latent_grid() {
        let mask = GrayImage::from_fn(16, 16, |x, y| {
            Luma([if x >= 8 { 128 } else { (y * 8) as u8 }])
        });
        let t = mask_tensor(&mask, 16, 16, &Device::Cpu).unwrap();
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        // 128/255 ≥ 0.5; 127/255 < 0.5 (only row 15 on the left reaches 120: below).
        assert_eq!(v[8], 1.0);
        assert_eq!(v[0], 0.0);
        let lat = latent_mask(&t, 8).unwrap();
        assert_eq!(lat.dims(), &[1, 1, 2, 2]);
        let l: Vec<f32> = lat.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(l, vec![0.0, 1.0, 0.0, 1.0]);
    }

    #[test]
    fn outpaint_extends_by_edge_pixels_and_masks_the_new_area() {
        let img = RgbImage::from_fn(8, 8, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let o = Outpaint::parse("8, 0,16,8").unwrap();
        let (canvas, mask) = o.apply(&img, 1 << 20).unwrap();
        assert_eq!(canvas.dimensions(), (32, 16));
        assert_eq!(canvas.get_pixel(0, 0).0, [0, 0, 7]);
        assert_eq!(canvas.get_pixel(9, 3).0, [1, 3, 7]);
        assert_eq!(canvas.get_pixel(31, 15).0, [7, 7, 7]);
        assert_eq!(mask.get_pixel(9, 3).0, [0]);
        assert_eq!(mask.get_pixel(3, 3).0, [255]);
        assert_eq!(mask.get_pixel(9, 8).0, [255]);
    }

    #[test]
    fn bad_outpaints_name_the_field() {
        for (s, max) in [
            ("1,0,0,0", 1 << 20),
            ("0,0,0,0", 1 << 20),
            ("8,8", 1 << 20),
            ("x,0,0,0", 1 << 20),
            ("8,0,0,0", 100),
        ] {
            let img = RgbImage::new(8, 8);
            let err = Outpaint::parse(s)
                .and_then(|o| o.apply(&img, max))
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::InvalidParam {
                        field: "outpaint",
                        ..
                    }
                ),
                "{s}: {err}"
            );
        }
    }
}
