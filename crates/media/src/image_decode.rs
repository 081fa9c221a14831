//! Image bytes -> decoded image, with the format taken from the bytes' magic (never from a
//! declared type) and the pixel count checked from the header before any pixel is decoded.
//! JPEGs go through libjpeg-turbo (as in Pillow); an EXIF orientation is applied, as
//! transformers' `load_image` does with `ImageOps.exif_transpose`.

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};
use std::io::Cursor;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("unsupported or unrecognised image format (PNG, JPEG, WebP, GIF and BMP are accepted)")]
    UnknownFormat,
    #[error("declared type {declared} does not match the bytes, which are {actual}")]
    TypeMismatch { declared: String, actual: String },
    #[error("the image is {width}x{height} = {pixels} pixels, more than the limit of {limit}")]
    TooManyPixels { width: u32, height: u32, pixels: u64, limit: u64 },
    #[error("the image cannot be decoded: {0}")]
    Decode(String),
}

const ACCEPTED: [ImageFormat; 5] =
    [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP, ImageFormat::Gif, ImageFormat::Bmp];

/// Decodes `bytes`; `declared` is a media type such as `image/png` (checked when given).
pub fn decode(bytes: &[u8], declared: Option<&str>, max_pixels: u64) -> Result<DynamicImage, ImageError> {
    let format = image::guess_format(bytes).map_err(|_| ImageError::UnknownFormat)?;
    if !ACCEPTED.contains(&format) {
        return Err(ImageError::UnknownFormat);
    }
    if let Some(declared) = declared.filter(|d| !d.is_empty() && *d != "application/octet-stream") {
        let actual = format.to_mime_type();
        let same = declared == actual || (declared == "image/jpg" && format == ImageFormat::Jpeg);
        if !same {
            return Err(ImageError::TypeMismatch { declared: declared.to_string(), actual: actual.to_string() });
        }
    }
    let decode_err = |e: image::ImageError| ImageError::Decode(e.to_string());
    let mut decoder = ImageReader::with_format(Cursor::new(bytes), format).into_decoder().map_err(decode_err)?;
    let (width, height) = decoder.dimensions();
    let pixels = width as u64 * height as u64;
    if pixels > max_pixels {
        return Err(ImageError::TooManyPixels { width, height, pixels, limit: max_pixels });
    }
    // A broken EXIF block is not worth refusing the picture for: Pillow ignores it too.
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = if format == ImageFormat::Jpeg {
        crate::jpeg::decode(bytes).map_err(ImageError::Decode)?
    } else {
        let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
        reader.no_limits();
        reader.decode().map_err(decode_err)?
    };
    image.apply_orientation(orientation);
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut out = Vec::new();
        image::RgbImage::new(w, h).write_to(&mut Cursor::new(&mut out), ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn decodes_and_checks_type_and_size() {
        let bytes = png(4, 3);
        assert_eq!(decode(&bytes, Some("image/png"), 100).unwrap().width(), 4);
        assert!(matches!(decode(&bytes, Some("image/jpeg"), 100), Err(ImageError::TypeMismatch { .. })));
        assert!(matches!(decode(&bytes, None, 11), Err(ImageError::TooManyPixels { pixels: 12, .. })));
        assert_eq!(decode(b"hello", None, 100), Err(ImageError::UnknownFormat));
        assert!(matches!(decode(&bytes[..bytes.len() - 8], None, 100), Err(ImageError::Decode(_))));
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    fn chunk(kind: &[u8], data: &[u8]) -> Vec<u8> {
        let body = [kind, data].concat();
        [(data.len() as u32).to_be_bytes().to_vec(), body.clone(), crc32(&body).to_be_bytes().to_vec()].concat()
    }

    /// A decompression bomb: a header claiming 100000 x 100000 pixels.
    #[test]
    fn bomb_headers_are_refused_before_decoding() {
        let ihdr = [100_000u32.to_be_bytes(), 100_000u32.to_be_bytes()].concat();
        let ihdr = [ihdr, vec![8, 2, 0, 0, 0]].concat();
        let png = [
            b"\x89PNG\r\n\x1a\n".to_vec(),
            chunk(b"IHDR", &ihdr),
            chunk(b"IDAT", &[0x78, 0x9c, 3, 0, 0, 0, 0, 1]),
            chunk(b"IEND", &[]),
        ]
        .concat();
        let err = decode(&png, Some("image/png"), 40_000_000).unwrap_err();
        assert!(matches!(err, ImageError::TooManyPixels { width: 100_000, height: 100_000, .. }), "{err}");
    }
}
