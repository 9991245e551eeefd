//! Inpainting and outpainting inputs, as diffusers' inpainting pipelines prepare them: the mask
//! (grayscale as PIL's `convert("L")`, resized like the init image, binarised at 0.5, white =
//! repaint), the masked image (the init image in [-1, 1] with repainted pixels set to 0), the
//! latent-grid mask (nearest neighbour: latent cell `(i, j)` is pixel `(8i, 8j)`), and the
//! outpainting canvas (the image extended by edge pixels, the new area masked).

use candle_core::{Device, Tensor};
use image::{GrayImage, Luma, RgbImage};

use crate::error::{Error, Result};
use crate::image_io::{decode_image_for, resized};

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
    let mask = resized(mask, width as u32, height as u32);
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

/// The rectangle (`x1..x2`, `y1..y2` in pixels) diffusers' `padding_mask_crop` inpaints: the
/// mask's bounding box grown by the padding, then to the output's aspect ratio, inside the
/// image (`VaeImageProcessor.get_crop_region`, integer for integer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropRegion {
    /// Left edge.
    pub x1: u32,
    /// Top edge.
    pub y1: u32,
    /// Right edge (exclusive).
    pub x2: u32,
    /// Bottom edge (exclusive).
    pub y2: u32,
}

impl CropRegion {
    /// The region of `mask` (any non-zero pixel counts) padded by `pad` for an output of
    /// `width × height`; a mask without a single non-zero pixel is an invalid `mask`.
    pub fn of(mask: &GrayImage, width: usize, height: usize, pad: u32) -> Result<Self> {
        let (w, h) = (mask.width() as i64, mask.height() as i64);
        let col = |x: u32| (0..mask.height()).any(|y| mask.get_pixel(x, y).0[0] != 0);
        let row = |y: u32| (0..mask.width()).any(|x| mask.get_pixel(x, y).0[0] != 0);
        let (Some(left), Some(top)) = (
            (0..mask.width()).find(|&x| col(x)),
            (0..mask.height()).find(|&y| row(y)),
        ) else {
            return Err(Error::invalid("mask", "has no pixel to repaint"));
        };
        let right = (0..mask.width()).rev().find(|&x| col(x)).unwrap_or(left) as i64 + 1;
        let bottom = (0..mask.height()).rev().find(|&y| row(y)).unwrap_or(top) as i64 + 1;
        let pad = pad as i64;
        let (mut x1, mut y1) = ((left as i64 - pad).max(0), (top as i64 - pad).max(0));
        let (mut x2, mut y2) = ((right + pad).min(w), (bottom + pad).min(h));
        let ratio_crop = (x2 - x1) as f64 / (y2 - y1) as f64;
        let ratio = width as f64 / height as f64;
        // Grow the short side to the output's aspect ratio, centred, shifted back inside.
        let grow = |lo: &mut i64, hi: &mut i64, diff: i64, limit: i64| {
            *lo -= diff.div_euclid(2);
            *hi += diff - diff.div_euclid(2);
            if *hi >= limit {
                let over = *hi - limit;
                *hi -= over;
                *lo -= over;
            }
            if *lo < 0 {
                *hi -= *lo;
                *lo = 0;
            }
            if *hi >= limit {
                *hi = limit;
            }
        };
        if ratio_crop > ratio {
            let diff = ((x2 - x1) as f64 / ratio - (y2 - y1) as f64) as i64;
            grow(&mut y1, &mut y2, diff, h);
        } else {
            let diff = ((y2 - y1) as f64 * ratio - (x2 - x1) as f64) as i64;
            grow(&mut x1, &mut x2, diff, w);
        }
        Ok(CropRegion {
            x1: x1 as u32,
            y1: y1 as u32,
            x2: x2 as u32,
            y2: y2 as u32,
        })
    }

    /// The region's pixels of `image`.
    pub fn crop<P: image::Pixel + 'static>(
        &self,
        image: &image::ImageBuffer<P, Vec<P::Subpixel>>,
    ) -> image::ImageBuffer<P, Vec<P::Subpixel>> {
        image::imageops::crop_imm(
            image,
            self.x1,
            self.y1,
            self.x2 - self.x1,
            self.y2 - self.y1,
        )
        .to_image()
    }

    /// diffusers' `apply_overlay`: `generated` resized (Lanczos3) into the region of
    /// `original`, then `original` laid over it where `mask` keeps (alpha `255 − mask`, so gray
    /// mask pixels blend): the image outside what was repainted is the original's.
    pub fn paste_back(
        &self,
        generated: &RgbImage,
        original: &RgbImage,
        mask: &GrayImage,
    ) -> RgbImage {
        let (cw, ch) = (self.x2 - self.x1, self.y2 - self.y1);
        let generated = resized(generated, cw, ch);
        RgbImage::from_fn(original.width(), original.height(), |x, y| {
            let inside = x >= self.x1 && x < self.x2 && y >= self.y1 && y < self.y2;
            let under = match inside {
                true => generated.get_pixel(x - self.x1, y - self.y1).0,
                false => [0, 0, 0],
            };
            let keep = 255 - mask.get_pixel(x, y).0[0] as u32;
            let top = original.get_pixel(x, y).0;
            image::Rgb(std::array::from_fn(|c| {
                ((top[c] as u32 * keep + under[c] as u32 * (255 - keep) + 127) / 255) as u8
            }))
        })
    }
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

    /// Values diffusers' `get_crop_region` gives for the same masks.
    #[test]
    fn crop_regions_are_diffusers() {
        let mask = |w, h, x0: u32, y0: u32, x1: u32, y1: u32| {
            GrayImage::from_fn(w, h, |x, y| {
                Luma([if x >= x0 && x < x1 && y >= y0 && y < y1 {
                    255
                } else {
                    0
                }])
            })
        };
        let r = CropRegion::of(&mask(64, 64, 20, 30, 30, 34), 32, 32, 4).unwrap();
        assert_eq!((r.x1, r.y1, r.x2, r.y2), (16, 23, 34, 41));
        let r = CropRegion::of(&mask(64, 48, 0, 40, 10, 48), 64, 32, 0).unwrap();
        assert_eq!((r.x1, r.y1, r.x2, r.y2), (0, 40, 16, 48));
        assert!(CropRegion::of(&mask(8, 8, 0, 0, 0, 0), 8, 8, 2).is_err());
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
