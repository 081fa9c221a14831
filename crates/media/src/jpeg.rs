//! JPEG decoding with libjpeg-turbo, the decoder Pillow uses, so that the pixels match the
//! reference byte for byte: its integer IDCT, "fancy" chroma upsampling and YCbCr conversion
//! each round differently from image-rs' decoder (up to 4 levels on a quarter of the pixels
//! of a 4:2:0 photo). CMYK pictures are converted to RGB with Pillow's own formula.

use image::{DynamicImage, GrayImage, RgbImage};
use turbojpeg::{Colorspace, Decompressor, Image, PixelFormat};

/// Decodes a JPEG the way `PIL.Image.open(..).convert("RGB")` sees it (greyscale stays grey).
pub fn decode(bytes: &[u8]) -> Result<DynamicImage, String> {
    let mut decompressor = Decompressor::new().map_err(|e| e.to_string())?;
    let header = decompressor.read_header(bytes).map_err(|e| e.to_string())?;
    let format = match header.colorspace {
        Colorspace::Gray => PixelFormat::GRAY,
        Colorspace::CMYK | Colorspace::YCCK => PixelFormat::CMYK,
        _ => PixelFormat::RGB,
    };
    let (width, height) = (header.width, header.height);
    let pitch = width * format.size();
    let mut pixels = vec![0u8; pitch * height];
    let image = Image { pixels: pixels.as_mut_slice(), width, pitch, height, format };
    decompressor.decompress(bytes, image).map_err(|e| e.to_string())?;
    let (w, h) = (width as u32, height as u32);
    let image = match format {
        PixelFormat::GRAY => DynamicImage::ImageLuma8(GrayImage::from_raw(w, h, pixels).expect("sizes match")),
        PixelFormat::CMYK => {
            DynamicImage::ImageRgb8(RgbImage::from_raw(w, h, cmyk_to_rgb(&pixels)).expect("sizes match"))
        }
        _ => DynamicImage::ImageRgb8(RgbImage::from_raw(w, h, pixels).expect("sizes match")),
    };
    Ok(image)
}

/// Pillow reads JPEG CMYK as Adobe writes it (inverted, its raw mode `CMYK;I`), then converts
/// each pixel with `cmyk2rgb`: `255 - k` scaled, in its integer arithmetic.
fn cmyk_to_rgb(stored: &[u8]) -> Vec<u8> {
    let muldiv255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let mut rgb = Vec::with_capacity(stored.len() / 4 * 3);
    for px in stored.chunks_exact(4) {
        let [c, m, y, k] = [0, 1, 2, 3].map(|i| 255 - px[i] as i32);
        let nk = 255 - k;
        rgb.extend([c, m, y].map(|v| (nk - muldiv255(v, nk)).clamp(0, 255) as u8));
    }
    rgb
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmyk_follows_pillow() {
        // Stored inverted: 255 means no ink.
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 255]), vec![255, 255, 255]);
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 0]), vec![0, 0, 0]);
        assert_eq!(cmyk_to_rgb(&[0, 128, 255, 255]), vec![0, 128, 255]);
        assert_eq!(cmyk_to_rgb(&[0, 200, 255, 128]), vec![0, 100, 128]);
    }

    #[test]
    fn refuses_garbage() {
        assert!(decode(b"\xFF\xD8\xFF\xE0 not really").is_err());
    }
}
