//! Image preprocessing exactly as transformers' PIL-backed SigLIP processor does it: RGB
//! conversion (alpha composited onto white), PIL's fixed-point resampling, rescale, normalize.
//! Pure functions over decoded images.

use crate::error::{ModelError, Result};
use candle_core::{Device, Tensor};
use image::{DynamicImage, RgbImage};
use serde_json::Value;
use std::path::Path;

/// Resampling filters of PIL that the processor may name (`resample` in the processor config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Bilinear,
    Bicubic,
}

impl Filter {
    /// PIL's numbering: 2 = BILINEAR, 3 = BICUBIC.
    pub fn from_pil(code: u64) -> Option<Self> {
        match code {
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            _ => None,
        }
    }
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }
    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => (1.0 - x).max(0.0),
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// The processor settings that matter (`preprocessor_config.json`), with SigLIP's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    /// Output side in pixels (square); taken from the vision config.
    pub size: usize,
    pub filter: Filter,
    pub rescale_factor: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl ImageProcessor {
    pub fn new(size: usize) -> Self {
        ImageProcessor { size, filter: Filter::Bicubic, rescale_factor: 1.0 / 255.0, mean: [0.5; 3], std: [0.5; 3] }
    }

    /// Reads `preprocessor_config.json` if present; the output size always comes from the vision tower.
    pub fn from_dir(dir: &Path, size: usize) -> Result<Self> {
        let mut p = ImageProcessor::new(size);
        let path = dir.join("preprocessor_config.json");
        let Ok(text) = std::fs::read_to_string(&path) else { return Ok(p) };
        let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::file(&path, e))?;
        let bad = |field: &str, msg: &str| ModelError::Config {
            file: "preprocessor_config.json",
            field: field.to_string(),
            message: msg.to_string(),
        };
        if let Some(code) = v.get("resample").filter(|x| !x.is_null()) {
            let code = code.as_u64().ok_or_else(|| bad("resample", "expected an integer"))?;
            p.filter = Filter::from_pil(code)
                .ok_or_else(|| bad("resample", "only 2 (bilinear) and 3 (bicubic) are supported"))?;
        }
        if let Some(f) = v.get("rescale_factor").and_then(Value::as_f64) {
            p.rescale_factor = f as f32;
        }
        if v.get("do_rescale").and_then(Value::as_bool) == Some(false) {
            p.rescale_factor = 1.0;
        }
        for (field, target) in [("image_mean", &mut p.mean), ("image_std", &mut p.std)] {
            if let Some(list) = v.get(field).filter(|x| !x.is_null()) {
                let vals: Vec<f32> = list
                    .as_array()
                    .ok_or_else(|| bad(field, "expected a list of 3 numbers"))?
                    .iter()
                    .filter_map(|x| x.as_f64().map(|f| f as f32))
                    .collect();
                *target = vals.try_into().map_err(|_| bad(field, "expected a list of 3 numbers"))?;
            }
        }
        if v.get("do_normalize").and_then(Value::as_bool) == Some(false) {
            p.mean = [0.0; 3];
            p.std = [1.0; 3];
        }
        Ok(p)
    }

    /// Decoded image -> normalized `[3, size, size]` f32 values (channel-first).
    pub fn pixel_values(&self, image: &DynamicImage) -> Vec<f32> {
        let rgb = to_rgb8(image);
        let resized = resize(&rgb, self.size as u32, self.size as u32, self.filter);
        normalize(&resized, self.rescale_factor, self.mean, self.std)
    }

    /// Many images as one `[n, 3, size, size]` tensor.
    pub fn batch(&self, images: &[DynamicImage], device: &Device) -> Result<Tensor> {
        let mut data = Vec::with_capacity(images.len() * 3 * self.size * self.size);
        for image in images {
            data.extend(self.pixel_values(image));
        }
        Ok(Tensor::from_vec(data, (images.len(), 3, self.size, self.size), device)?)
    }
}

/// A content hash of a decoded picture: SHA-256 over the geometry, layout and samples, cut to
/// 128 bits, so that the same picture sent twice, in any encoding that decodes identically, is
/// recognised, and no client can craft a different picture with the same hash (the vision and
/// prefix caches trust it as the picture's identity).
pub fn picture_hash(image: &DynamicImage) -> u128 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(image.width().to_le_bytes());
    h.update(image.height().to_le_bytes());
    h.update(format!("{:?}", image.color()).as_bytes());
    h.update(image.as_bytes());
    let digest = h.finalize();
    u128::from_le_bytes(digest[..16].try_into().expect("32-byte digest"))
}

/// PIL's `alpha_composite` of a pixel onto opaque white, in PIL's own integer arithmetic.
fn over_white(value: u8, alpha: u8) -> u8 {
    if alpha == 0 {
        return 255;
    }
    let (v, a) = (value as u32, alpha as u32);
    let t = v * (a << 7) + 255 * ((255 - a) << 7) + (0x80 << 7);
    ((((t >> 8) + t) >> 8) >> 7) as u8
}

/// RGB conversion as transformers does it for PIL images: transparency is composited onto
/// white; greyscale is replicated; 16-bit colour keeps its high byte while 16-bit greyscale
/// is clamped at 255 (Pillow's `I;16` -> `RGB` conversion).
pub fn to_rgb8(image: &DynamicImage) -> RgbImage {
    let (w, h) = (image.width(), image.height());
    let from_rgba = |px: &mut dyn Iterator<Item = [u8; 4]>| -> RgbImage {
        let mut out = Vec::with_capacity((w * h * 3) as usize);
        for [r, g, b, a] in px {
            out.extend([over_white(r, a), over_white(g, a), over_white(b, a)]);
        }
        RgbImage::from_raw(w, h, out).expect("sizes match")
    };
    let from_rgb = |px: &mut dyn Iterator<Item = [u8; 3]>| -> RgbImage {
        RgbImage::from_raw(w, h, px.flatten().collect()).expect("sizes match")
    };
    match image {
        DynamicImage::ImageRgb8(img) => img.clone(),
        DynamicImage::ImageRgba8(img) => from_rgba(&mut img.pixels().map(|p| p.0)),
        DynamicImage::ImageLuma8(img) => from_rgb(&mut img.pixels().map(|p| [p.0[0]; 3])),
        DynamicImage::ImageLumaA8(img) => from_rgba(&mut img.pixels().map(|p| [p.0[0], p.0[0], p.0[0], p.0[1]])),
        DynamicImage::ImageLuma16(img) => from_rgb(&mut img.pixels().map(|p| [p.0[0].min(255) as u8; 3])),
        DynamicImage::ImageLumaA16(img) => from_rgba(&mut img.pixels().map(|p| {
            let l = (p.0[0] >> 8) as u8;
            [l, l, l, (p.0[1] >> 8) as u8]
        })),
        DynamicImage::ImageRgb16(img) => from_rgb(&mut img.pixels().map(|p| p.0.map(|c| (c >> 8) as u8))),
        DynamicImage::ImageRgba16(img) => from_rgba(&mut img.pixels().map(|p| p.0.map(|c| (c >> 8) as u8))),
        other => from_rgba(&mut other.to_rgba8().pixels().map(|p| p.0)),
    }
}

/// Bits of fixed-point precision PIL uses for 8-bit resampling coefficients.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: the first input index and the fixed-point weights of the inputs it reads.
struct Taps {
    start: Vec<usize>,
    weights: Vec<Vec<i64>>,
}

/// PIL's `precompute_coeffs` followed by `normalize_coeffs_8bpc`.
fn taps(in_size: usize, out_size: usize, filter: Filter) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    // Pillow multiplies by the inverse rather than dividing; the last bit can differ.
    let inv_filter_scale = 1.0 / filter_scale;
    let mut start = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let raw: Vec<f64> = (xmin..xmax).map(|x| filter.weight((x as f64 - center + 0.5) * inv_filter_scale)).collect();
        let total: f64 = raw.iter().sum();
        let fixed = raw
            .iter()
            .map(|&w| {
                let w = if total != 0.0 { w / total } else { w };
                let scaled = w * (1u64 << PRECISION_BITS) as f64;
                (if scaled < 0.0 { scaled - 0.5 } else { scaled + 0.5 }) as i64
            })
            .collect();
        start.push(xmin);
        weights.push(fixed);
    }
    Taps { start, weights }
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One resampling pass along a line direction: for each of `lines` lines and each output
/// position, a fixed-point weighted sum of the input pixels the taps name. `at(line, i)` gives
/// the pixel index of position `i` of a line, in the source (`from`) and destination (`to`).
fn pass(
    src: &[u8],
    dst: &mut [u8],
    taps: &Taps,
    lines: usize,
    from: impl Fn(usize, usize) -> usize,
    to: impl Fn(usize, usize) -> usize,
) {
    for line in 0..lines {
        for (x, weights) in taps.weights.iter().enumerate() {
            for c in 0..3 {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (k, w) in weights.iter().enumerate() {
                    acc += src[from(line, taps.start[x] + k) * 3 + c] as i64 * w;
                }
                dst[to(line, x) * 3 + c] = clip8(acc);
            }
        }
    }
}

/// PIL's `Image.resize` for RGB images: two passes, each rounded to 8 bits, skipping a pass
/// whose size does not change. Since Pillow 12.3 the vertical pass goes first when the height
/// shrinks and the width does not (fewer rows for the horizontal pass); the order changes the
/// rounding, so it is followed exactly.
pub fn resize(image: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    let (in_w, in_h) = (image.width() as usize, image.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    let horizontal_first = !(out_w >= in_w && out_h < in_h);
    let mut pixels = image.as_raw().clone();
    let mut w = in_w;
    let mut h = in_h;
    for horizontal in [horizontal_first, !horizontal_first] {
        if horizontal && out_w != w {
            let mut out = vec![0u8; out_w * h * 3];
            pass(&pixels, &mut out, &taps(w, out_w, filter), h, |y, i| y * w + i, |y, x| y * out_w + x);
            (pixels, w) = (out, out_w);
        } else if !horizontal && out_h != h {
            let mut out = vec![0u8; w * out_h * 3];
            pass(&pixels, &mut out, &taps(h, out_h, filter), w, |x, i| i * w + x, |x, y| y * w + x);
            (pixels, h) = (out, out_h);
        }
    }
    RgbImage::from_raw(width, height, pixels).expect("sizes match")
}

/// `(x * rescale - mean) / std`, channel-first.
pub fn normalize(image: &RgbImage, rescale: f32, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let mut out = vec![0f32; 3 * w * h];
    for (i, px) in image.pixels().enumerate() {
        for c in 0..3 {
            out[c * w * h + i] = (px.0[c] as f32 * rescale - mean[c]) / std[c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_matches_pil_corners() {
        assert_eq!(over_white(0, 0), 255);
        assert_eq!(over_white(0, 255), 0);
        assert_eq!(over_white(200, 255), 200);
        assert_eq!(over_white(0, 128), 127);
    }

    #[test]
    fn the_hash_follows_the_pixels() {
        let a = DynamicImage::ImageRgb8(RgbImage::new(2, 2));
        let mut b = RgbImage::new(2, 2);
        assert_eq!(picture_hash(&a), picture_hash(&DynamicImage::ImageRgb8(b.clone())));
        b.put_pixel(0, 0, image::Rgb([1, 0, 0]));
        assert_ne!(picture_hash(&a), picture_hash(&DynamicImage::ImageRgb8(b)));
    }

    #[test]
    fn same_size_resize_is_identity() {
        let img = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 70, 9]));
        assert_eq!(resize(&img, 5, 3, Filter::Bicubic), img);
    }

    #[test]
    fn flat_image_stays_flat() {
        let img = RgbImage::from_pixel(37, 11, image::Rgb([10, 128, 250]));
        let out = resize(&img, 16, 29, Filter::Bicubic);
        assert!(out.pixels().all(|p| p.0 == [10, 128, 250]));
    }

    #[test]
    fn grey16_clamps_like_pillow() {
        let img = image::ImageBuffer::<image::Luma<u16>, _>::from_raw(3, 1, vec![100u16, 255, 1000]).unwrap();
        let rgb = to_rgb8(&DynamicImage::ImageLuma16(img));
        assert_eq!(rgb.as_raw(), &vec![100, 100, 100, 255, 255, 255, 255, 255, 255]);
    }

    #[test]
    fn normalizes_to_minus_one_one() {
        let img = RgbImage::from_raw(1, 1, vec![0, 255, 51]).unwrap();
        let v = normalize(&img, 1.0 / 255.0, [0.5; 3], [0.5; 3]);
        assert_eq!(v[0], -1.0);
        assert_eq!(v[1], 1.0);
        assert!((v[2] + 0.6).abs() < 1e-6);
    }
}
