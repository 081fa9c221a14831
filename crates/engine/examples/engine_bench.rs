//! Engine throughput benchmark: aggregate output tokens/s with 1, 4 and 16 concurrent requests
//! (text only, and with one distinct image each), and the time to first token of a second chat
//! turn that re-sends the first turn's image. Release build:
//!
//!     cargo run --release -p weft-engine --example engine_bench -- MODEL_DIR [TOKENS] [RUNS]

use candle_core::Device;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use weft_engine::{Engine, EngineConfig, EngineHandle, Event, GenerateRequest, ImageInput};
use weft_model::preprocess::ImageProcessor;
use weft_model::prompt::{render_builtin, Message, Part};
use weft_model::tokenizer::PromptTokenizer;
use weft_model::{LlavaModel, LoadOptions};

struct Bench {
    handle: EngineHandle,
    tokenizer: Arc<PromptTokenizer>,
    pixels: candle_core::Tensor,
}

impl Bench {
    fn request(&self, messages: &[Message], image_hash: Option<u128>, tokens: usize) -> GenerateRequest {
        let ids = self.tokenizer.encode_prompt(&render_builtin(messages, true)).unwrap().ids;
        let mut r = GenerateRequest::new(ids, tokens);
        r.sampling.temperature = 0.0;
        r.ignore_eos = true;
        r.images = image_hash.map(|hash| ImageInput { pixels: self.pixels.clone(), hash }).into_iter().collect();
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
    let img = image::open(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/images/square.png")).unwrap();
    let pixels = processor.batch(&[img], &Device::Cpu).unwrap().squeeze(0).unwrap();
    let handle = Engine::start(model, tokenizer.clone(), EngineConfig::default());
    let b = Bench { handle, tokenizer, pixels };
    let mut hash = 1000u128;

    println!("| requests | kind | aggregate output tok/s (median of {runs}) | x single stream |");
    println!("|---:|---|---:|---:|");
    for image in [false, true] {
        let mut single = 0.0;
        for c in [1usize, 4, 16] {
            let rates: Vec<f64> = (0..if image { 1 } else { runs })
                .map(|round| {
                    let requests = (0..c)
                        .map(|i| {
                            hash += 1; // distinct images: no vision-cache or prefix-cache help
                            let text = format!("Request {round}-{i}: describe what you see in detail.");
                            b.request(&[user(image, text)], image.then_some(hash), tokens)
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
