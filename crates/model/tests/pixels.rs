//! Pixel parity with transformers' PIL-backed SigLIP processor over a sweep of sizes, contents
//! and file formats (`tests/fixtures/make_pixels.py`): Weft's resized 8-bit pixels must hash
//! to exactly what Pillow produced.

use image::{DynamicImage, RgbImage};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use weft_model::preprocess::{resize, to_rgb8, Filter};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/pixels")
}

/// The picture `make_pixels.py::synthetic` makes, with the same integer formulas.
fn synthetic(w: u32, h: u32, content: &str) -> RgbImage {
    let (wi, hi) = (w as i64, h as i64);
    RgbImage::from_fn(w, h, |x, y| {
        let (x, y) = (x as i64, y as i64);
        let px: [i64; 3] = match content {
            "rects" => {
                let mut c = [200, 30, 60];
                if x >= wi / 8 && x < wi / 2 && y >= hi / 6 && y < hi / 2 {
                    c = [20, 180, 40];
                }
                if x >= 3 * wi / 5 && x < 9 * wi / 10 && y >= hi / 3 && y < 4 * hi / 5 {
                    c = [250, 250, 10];
                }
                if x == wi / 3 {
                    c = [0, 0, 255];
                }
                c
            }
            "noise" => [0, 1, 2].map(|c| {
                let v = (x * 73856093) ^ (y * 19349663) ^ ((c + 1) * 83492791);
                let v = v.wrapping_mul(2654435761) & 0xFFFF_FFFF;
                (v >> 13) & 0xFF
            }),
            "gradient" => [x * 255 / (wi - 1).max(1), y * 255 / (hi - 1).max(1), (x + y) * 255 / (wi + hi - 2).max(1)],
            "checker" => {
                if (x / 2 + y / 2) % 2 == 1 {
                    [255, 0, 255]
                } else {
                    [0, 255, 0]
                }
            }
            other => panic!("unknown content {other}"),
        };
        image::Rgb(px.map(|v| v as u8))
    })
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn preprocessed_pixels_match_pillow_over_the_sweep() {
    let sweep: Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("sweep.json")).unwrap()).unwrap();
    let size = sweep["size"].as_u64().unwrap() as u32;
    let cases = sweep["cases"].as_array().unwrap();
    let mut failures = Vec::new();
    for case in cases {
        let filter = Filter::from_pil(case["resample"].as_u64().unwrap()).unwrap();
        let (label, rgb) = match case["file"].as_str() {
            Some(file) => {
                let bytes = std::fs::read(fixtures().join(file)).unwrap();
                let image: DynamicImage =
                    weft_media::image_decode::decode(&bytes, None, u64::MAX).unwrap_or_else(|e| panic!("{file}: {e}"));
                (format!("{file} ({})", case["mode"].as_str().unwrap()), to_rgb8(&image))
            }
            None => {
                let (w, h) = (case["width"].as_u64().unwrap() as u32, case["height"].as_u64().unwrap() as u32);
                let content = case["content"].as_str().unwrap();
                (format!("{w}x{h} {content} {filter:?}"), synthetic(w, h, content))
            }
        };
        let resized = resize(&rgb, size, size, filter);
        if sha256_hex(resized.as_raw()) != case["sha256"].as_str().unwrap() {
            failures.push(label);
        }
    }
    println!("pixel sweep: {} cases, {} differ from Pillow", cases.len(), failures.len());
    assert!(cases.len() >= 130, "the sweep has shrunk to {} cases", cases.len());
    assert!(failures.is_empty(), "differ from Pillow: {failures:#?}");
}
