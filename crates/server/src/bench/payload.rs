//! Synthetic request bodies: word-salad prompts and images or videos drawn locally, each request
//! different so that no server cache turns the benchmark into a cache benchmark.

use super::BenchArgs;
use base64::Engine;
use image::{codecs::gif::GifEncoder, Delay, Frame, ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::io::Cursor;

/// Common English words, most of them one token in any modern vocabulary.
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not", "he",
    "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "had", "they", "you", "were", "their",
    "one", "all", "we", "can", "her", "has", "there", "been", "if", "more", "when", "will", "would", "who", "so", "no",
    "time", "people", "water", "light", "house", "river", "city", "music", "green", "small", "large", "day",
];

/// One body per request, drawn from `seed`.
pub fn build(args: &BenchArgs, model: &str, seed: u64) -> anyhow::Result<Vec<Value>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let schema: Option<Value> = match &args.json_schema {
        Some(path) => Some(serde_json::from_str(&std::fs::read_to_string(path)?)?),
        None => None,
    };
    (0..args.num_requests).map(|_| body(args, model, schema.as_ref(), &mut rng)).collect()
}

fn body(args: &BenchArgs, model: &str, schema: Option<&Value>, rng: &mut StdRng) -> anyhow::Result<Value> {
    let mut content = Vec::new();
    for _ in 0..args.images {
        let url = data_uri("image/png", &png(args.image_size, rng)?);
        content.push(json!({"type": "image_url", "image_url": {"url": url}}));
    }
    if args.video_frames > 0 {
        let url = data_uri("image/gif", &gif(args.image_size, args.video_frames, rng)?);
        content.push(json!({"type": "video_url", "video_url": {"url": url, "num_frames": args.video_frames}}));
    }
    let words: Vec<&str> = (0..args.prompt_tokens.max(1)).map(|_| WORDS[rng.random_range(0..WORDS.len())]).collect();
    content.push(json!({"type": "text", "text": words.join(" ")}));
    let mut body = json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": args.max_tokens,
        "temperature": 0.0,
        "stream": args.stream,
    });
    if args.stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    if args.logprobs {
        body["logprobs"] = json!(true);
    }
    if !args.no_ignore_eos {
        body["ignore_eos"] = json!(true);
    }
    if let Some(schema) = schema {
        body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}});
    }
    Ok(body)
}

fn data_uri(mime: &str, bytes: &[u8]) -> String {
    format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// A random two-colour gradient with a few rectangles: distinct per request, small as a PNG.
fn picture(size: u32, rng: &mut StdRng) -> RgbImage {
    let (a, b): ([u8; 3], [u8; 3]) = (rng.random(), rng.random());
    let mut img = RgbImage::from_fn(size, size, |x, y| {
        let t = (x + y) as f32 / (2 * size.max(1)) as f32;
        Rgb(std::array::from_fn(|c| (a[c] as f32 * (1.0 - t) + b[c] as f32 * t) as u8))
    });
    for _ in 0..4 {
        let colour: [u8; 3] = rng.random();
        let (x0, y0) = (rng.random_range(0..size), rng.random_range(0..size));
        let (w, h) = (rng.random_range(1..=size / 3 + 1), rng.random_range(1..=size / 3 + 1));
        for y in y0..(y0 + h).min(size) {
            for x in x0..(x0 + w).min(size) {
                img.put_pixel(x, y, Rgb(colour));
            }
        }
    }
    img
}

fn png(size: u32, rng: &mut StdRng) -> anyhow::Result<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    picture(size, rng).write_to(&mut out, ImageFormat::Png)?;
    Ok(out.into_inner())
}

fn gif(size: u32, frames: usize, rng: &mut StdRng) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut encoder = GifEncoder::new(&mut out);
        for _ in 0..frames {
            let rgb = picture(size, rng);
            let rgba = RgbaImage::from_fn(size, size, |x, y| {
                let p = rgb.get_pixel(x, y).0;
                Rgba([p[0], p[1], p[2], 255])
            });
            encoder.encode_frame(Frame::from_parts(rgba, 0, 0, Delay::from_numer_denom_ms(100, 1)))?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: BenchArgs,
    }

    #[test]
    fn bodies_carry_the_requested_media_and_differ() {
        let args = Wrapper::parse_from([
            "x",
            "--num-requests",
            "2",
            "--images",
            "2",
            "--video-frames",
            "3",
            "--image-size",
            "32",
        ])
        .args;
        let bodies = build(&args, "m", 0).unwrap();
        let other_level = build(&args, "m", 1).unwrap();
        assert_ne!(bodies[0]["messages"], other_level[0]["messages"]);
        assert_eq!(bodies.len(), 2);
        let content = bodies[0]["messages"][0]["content"].as_array().unwrap();
        let kinds: Vec<&str> = content.iter().map(|p| p["type"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["image_url", "image_url", "video_url", "text"]);
        assert!(content[2]["video_url"]["url"].as_str().unwrap().starts_with("data:image/gif;base64,"));
        assert_eq!(bodies[0]["ignore_eos"], true);
        assert_eq!(bodies[0]["stream_options"]["include_usage"], true);
        assert_ne!(bodies[0]["messages"][0]["content"][0], bodies[1]["messages"][0]["content"][0]);
    }
}
