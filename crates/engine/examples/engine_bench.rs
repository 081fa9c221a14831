//! Engine throughput benchmark: aggregate output tokens/s with 1, 4 and 16 concurrent requests
//! (text only, and with one distinct image each), and the time to first token of a second chat
//! turn that re-sends the first turn's image. Release build:
//!
//!     cargo run --release -p weft-engine --example engine_bench -- MODEL_DIR [TOKENS] [RUNS]

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use weft_engine::{Engine, EngineConfig, EngineHandle, Event, GenerateRequest, PromptBuilder};
use weft_model::preprocess::ImageProcessor;
use weft_model::prompt::{Message, Part, PromptRenderer};
use weft_model::tokenizer::PromptTokenizer;
use weft_model::{LlavaModel, LoadOptions};

struct Bench {
    handle: EngineHandle,
    prompts: PromptBuilder,
    picture: image::RgbImage,
}

impl Bench {
    /// A request whose image (if `variant` is given) is the bench picture with one pixel
    /// changed: a new variant is a new image to the vision and prefix caches.
    fn request(&self, messages: &[Message], variant: Option<u32>, tokens: usize) -> GenerateRequest {
        let pictures: Vec<_> = variant
            .map(|v| {
                let mut picture = self.picture.clone();
                let [r, g, b, _] = v.to_le_bytes();
                picture.put_pixel(0, 0, image::Rgb([r, g, b]));
                image::DynamicImage::ImageRgb8(picture)
            })
            .into_iter()
            .collect();
        let prompt = self.prompts.chat(messages, &pictures, true).unwrap();
        let mut r = GenerateRequest::new(prompt, NonZeroUsize::new(tokens).unwrap());
        r.sampling.temperature = 0.0;
        r.ignore_eos = true;
        r
    }
}

fn user(image: bool, text: String) -> Message {
    let mut parts = if image { vec![Part::Image] } else { vec![] };
    parts.push(Part::Text(text));
    Message { role: "user".into(), parts }
}

/// Runs requests concurrently; returns (wall seconds, output tokens, first-token seconds of each).
fn run(b: &Bench, requests: Vec<GenerateRequest>) -> (f64, usize, Vec<f64>, Vec<String>) {
    let started = Instant::now();
    let streams: Vec<_> = requests.into_iter().map(|r| b.handle.submit(r).unwrap()).collect();
    let mut tokens = 0;
    let mut firsts = Vec::new();
    let mut texts = Vec::new();
    for mut s in streams {
        let mut first = None;
        let mut text = String::new();
        while let Some(e) = s.blocking_next() {
            match e {
                Event::Token { text: t, .. } => {
                    first.get_or_insert_with(|| started.elapsed().as_secs_f64());
                    text.push_str(&t);
                    tokens += 1;
                }
                Event::Finished { timing, .. } => firsts.push(first.unwrap_or(timing.first_token_s)),
                Event::Error(e) => panic!("{e}"),
            }
        }
        texts.push(text);
    }
    (started.elapsed().as_secs_f64(), tokens, firsts, texts)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(args.get(1).expect("usage: engine_bench MODEL_DIR [TOKENS] [RUNS]"));
    let tokens: usize = args.get(2).map_or(32, |s| s.parse().unwrap());
    let runs: usize = args.get(3).map_or(3, |s| s.parse().unwrap());
    let model = LlavaModel::load(&dir, &LoadOptions::default()).unwrap();
    let cfg = model.config().clone();
    let tokenizer = Arc::new(PromptTokenizer::from_dir(&dir, cfg.image_token_id, cfg.tokens_per_image()).unwrap());
    let processor = ImageProcessor::from_dir(&dir, cfg.vision.image_size).unwrap();
    let picture =
        image::open(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/images/square.png")).unwrap().to_rgb8();
    let prompts = PromptBuilder::new(tokenizer.clone(), PromptRenderer::BuiltIn, processor, &cfg);
    let handle = Engine::start(model, tokenizer, EngineConfig::default()).unwrap();
    let b = Bench { handle, prompts, picture };
    let mut variant = 1000u32;

    println!("| requests | kind | aggregate output tok/s (median of {runs}) | x single stream |");
    println!("|---:|---|---:|---:|");
    for image in [false, true] {
        let mut single = 0.0;
        for c in [1usize, 4, 16] {
            let rates: Vec<f64> = (0..if image { 1 } else { runs })
                .map(|round| {
                    let requests = (0..c)
                        .map(|i| {
                            variant += 1; // distinct images: no vision-cache or prefix-cache help
                            let text = format!("Request {round}-{i}: describe what you see in detail.");
                            b.request(&[user(image, text)], image.then_some(variant), tokens)
                        })
                        .collect();
                    let (wall, n, _, _) = run(&b, requests);
                    n as f64 / wall
                })
                .collect();
            let rate = median(rates);
            if c == 1 {
                single = rate;
            }
            let kind = if image { "one image each" } else { "text" };
            println!("| {c} | {kind} | {rate:.2} | {:.2}x |", rate / single);
        }
    }

    let first_turn = [user(true, "What is in this image?".into())];
    let (_, _, t1, texts) = run(&b, vec![b.request(&first_turn, Some(7), 16)]);
    let second_turn =
        [first_turn[0].clone(), Message::text("assistant", &texts[0]), user(false, "And the colours?".into())];
    let (_, _, t2, _) = run(&b, vec![b.request(&second_turn, Some(7), 16)]);
    println!(
        "\nsecond turn re-sending the image: time to first token {:.3}s vs first turn {:.3}s ({:.1}%)",
        t2[0],
        t1[0],
        100.0 * t2[0] / t1[0]
    );
    let s = b.handle.stats();
    println!(
        "engine: {} steps, {} images encoded, {} cached prompt tokens",
        s.steps_total, s.images_encoded, s.cached_tokens_total
    );
}
