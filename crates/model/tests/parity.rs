//! Parity with transformers on the committed tiny checkpoints (hub layout in bf16 with tied
//! embeddings; transformers-5 layout in f32 with GQA and a separate lm_head; a sharded hub
//! checkpoint whose layers are all 256 wide for q4k): prompt token ids, preprocessed pixels,
//! greedy tokens and logprobs, alone and in a ragged batch, for every weight format.

use candle_core::{DType, Device, Tensor};
use image::DynamicImage;
use serde_json::Value;
use std::path::{Path, PathBuf};
use weft_model::preprocess::ImageProcessor;
use weft_model::prompt::{render_builtin, Message, Part};
use weft_model::tokenizer::PromptTokenizer;
use weft_model::{KvPool, LinearFormat, LlavaModel, LoadOptions, SeqInput};

/// How close a weight format must stay to transformers (which runs the checkpoint in f32).
#[derive(Clone, Copy)]
struct Tolerance {
    logprob: f64,
    /// Steps whose reference top-2 margin is below this are too close to call.
    tie_margin: f64,
}

/// f32 weights: float rounding only.
const EXACT: Tolerance = Tolerance { logprob: 1e-3, tie_margin: 1e-3 };
/// bf16 weights (8 mantissa bits) with the KV cache in f16, as they run by default: the issue's
/// bound (largest differences seen: 0.0419 with the AVX2 kernels, 0.0438 with AVX-512 BF16 and
/// with AMX; 0.0395, 0.0314 and 0.0425 with an f32 cache); greedy compared where the margin
/// exceeds twice it.
const BF16: Tolerance = Tolerance { logprob: 0.05, tie_margin: 0.1 };
/// q8_0 weights and activations (one scale per 32 values): the documented bound. The tiny
/// fixtures, 64 wide, are the worst case for per-block scales (largest difference seen: 0.25
/// with f32 activations, 0.32 with activations quantized too, as on AVX-512 VNNI, and still
/// 0.32 with the KV cache in bf16, as the 8-bit formats keep it).
const Q8_0: Tolerance = Tolerance { logprob: 0.35, tie_margin: 0.7 };
/// q4k weights (4-bit values in 32-value blocks, 6-bit scales, 256-value super-blocks; about
/// 8% RMS weight error, pinned by a unit test in `linear.rs`), f32 activations, on tiny-wide:
/// the documented bound (largest difference seen: 2.93; 3.09 with the KV cache in bf16). Random networks amplify weight error
/// far more than trained ones, so no greedy step here has a margin above it.
const Q4K: Tolerance = Tolerance { logprob: 3.5, tie_margin: 7.0 };
/// An f16 run (weights and activations, 11 significant bits; attention in f32), as the CUDA
/// build runs (largest difference seen: 0.022; transformers' own f16 run: 0.021).
const F16: Tolerance = Tolerance { logprob: 0.03, tie_margin: 0.06 };

/// A bf16 run (weights and activations, 8 significant bits; attention scores and softmax in
/// f32), the CUDA build's default, run here on candle's CPU backend (largest difference seen:
/// 0.19, on the 256-wide tiny-wide).
const BF16_RUN: Tolerance = Tolerance { logprob: 0.25, tie_margin: 0.5 };

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

struct Fixture {
    dir: PathBuf,
    model: LlavaModel,
    tokenizer: PromptTokenizer,
    processor: ImageProcessor,
    cases: Vec<Value>,
    tol: Tolerance,
    /// Largest logprob difference seen, in units of 1e-9.
    worst: std::sync::atomic::AtomicU64,
    /// Attention gathers the blocks with candle operations (the device path) instead of reading
    /// them in place.
    gather: bool,
}

fn load(name: &str) -> Fixture {
    load_as(name, LinearFormat::Dense, EXACT)
}

fn load_as(name: &str, linear: LinearFormat, tol: Tolerance) -> Fixture {
    load_with(name, LoadOptions { linear, ..LoadOptions::default() }, tol)
}

fn load_with(name: &str, options: LoadOptions, tol: Tolerance) -> Fixture {
    let dir = fixtures().join(name);
    let model = LlavaModel::load(&dir, &options).unwrap();
    let cfg = model.config();
    let tokenizer = PromptTokenizer::from_dir(&dir, cfg.image_token_id, cfg.tokens_per_image()).unwrap();
    let processor = ImageProcessor::from_dir(&dir, cfg.vision.image_size).unwrap();
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let cases = reference["cases"].as_array().unwrap().clone();
    Fixture { dir, model, tokenizer, processor, cases, tol, worst: Default::default(), gather: false }
}

/// Tokens a pool block holds here (the engine's default).
const BLOCK_SIZE: usize = 16;

/// Sequences in a KV pool, driving the model directly: blocks are handed out from the top of
/// the pool down as sequences grow, so that the tables of a batch interleave and run backwards.
struct Pool {
    pool: KvPool,
    next: u32,
}

#[derive(Default)]
struct PooledSeq {
    blocks: Vec<u32>,
    len: usize,
}

impl Pool {
    /// Room for every case of `f` at once.
    fn for_cases(f: &Fixture) -> Self {
        let tokens = |c: &Value| ids_of(&c["prompt_ids"]).len() + ids_of(&c["greedy_ids"]).len();
        let blocks: usize = f.cases.iter().map(|c| tokens(c).div_ceil(BLOCK_SIZE)).sum::<usize>() + 2;
        let pool = f.model.new_kv_pool(blocks, BLOCK_SIZE).unwrap();
        let pool = if f.gather { pool.gathering_with_candle() } else { pool };
        Pool { pool, next: blocks as u32 }
    }

    /// One forward pass of `embeds[i]` appended to `seqs[i]`; the logits of those that want them.
    fn forward(
        &mut self,
        model: &LlavaModel,
        seqs: &mut [PooledSeq],
        embeds: Vec<Tensor>,
        want: bool,
    ) -> Option<Tensor> {
        for (seq, e) in seqs.iter_mut().zip(&embeds) {
            while seq.blocks.len() * BLOCK_SIZE < seq.len + e.dim(0).unwrap() {
                self.next -= 1;
                seq.blocks.push(self.next);
            }
        }
        let inputs: Vec<SeqInput> = seqs
            .iter()
            .zip(&embeds)
            .map(|(s, e)| SeqInput { embeds: e.clone(), past: s.len, blocks: &s.blocks, want_logits: want })
            .collect();
        let logits = model.forward(&mut self.pool, &inputs).unwrap();
        for (seq, e) in seqs.iter_mut().zip(&embeds) {
            seq.len += e.dim(0).unwrap();
        }
        logits
    }
}

fn messages(case: &Value) -> Vec<Message> {
    case["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| Message {
            role: m["role"].as_str().unwrap().to_string(),
            parts: m["content"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| match p["type"].as_str().unwrap() {
                    "text" => Part::Text(p["text"].as_str().unwrap().to_string()),
                    _ => Part::Image,
                })
                .collect(),
        })
        .collect()
}

/// The case's images as the model sees them (GIF frames sampled like the reference).
fn images(case: &Value) -> Vec<DynamicImage> {
    let names: Vec<&str> = case["images"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let dir = fixtures().join("images");
    match case["video_frames"].as_u64() {
        Some(n) => {
            let bytes = std::fs::read(dir.join(names[0])).unwrap();
            let (indices, frames) = weft_media::video::sample_gif(&bytes, n as usize).unwrap();
            let expected: Vec<usize> =
                case["frame_indices"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            assert_eq!(indices, expected, "frame indices");
            frames
        }
        None => names.iter().map(|n| image::open(dir.join(n)).unwrap()).collect(),
    }
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Prompt embeddings for a case: vision features merged into the `<image>` slots.
fn prompt_embeddings(f: &Fixture, case: &Value, ids: &[u32]) -> Tensor {
    let imgs = images(case);
    if imgs.is_empty() {
        return f.model.embed(ids, None).unwrap();
    }
    let pixels = f.processor.batch(&imgs, &Device::Cpu).unwrap();
    let features = f.model.encode_images(&pixels).unwrap();
    let (n, t, h) = features.dims3().unwrap();
    f.model.embed(ids, Some(&features.reshape((n * t, h)).unwrap())).unwrap()
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    logits.iter().map(|&x| x as f64 - max - sum.ln()).collect()
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Compares one step's logits with the reference; returns false once margins get too small to
/// compare the greedy choice (logprobs are still compared).
fn check_step(f: &Fixture, fixture: &str, case: &Value, step: usize, logits: &[f32]) -> bool {
    let name = case["name"].as_str().unwrap();
    let reference = &case["steps"][step];
    let logprobs = log_softmax(logits);
    for (id, want) in reference["top_ids"].as_array().unwrap().iter().zip(reference["top_logprobs"].as_array().unwrap())
    {
        let (id, want) = (id.as_u64().unwrap() as usize, want.as_f64().unwrap());
        let diff = (logprobs[id] - want).abs();
        f.worst.fetch_max((diff * 1e9) as u64, std::sync::atomic::Ordering::Relaxed);
        assert!(diff < f.tol.logprob, "{fixture}/{name} step {step}: logprob of {id} is {} vs {want}", logprobs[id]);
    }
    if reference["margin"].as_f64().unwrap() < f.tol.tie_margin {
        return false;
    }
    let want = case["greedy_ids"][step].as_u64().unwrap() as u32;
    assert_eq!(argmax(logits), want, "{fixture}/{name} step {step}: greedy token");
    true
}

fn check_prompt_and_pixels(f: &Fixture, fixture: &str) {
    for case in &f.cases {
        let name = case["name"].as_str().unwrap();
        let prompt = render_builtin(&messages(case), true);
        assert_eq!(prompt, case["prompt"].as_str().unwrap(), "{fixture}/{name}: rendered prompt");
        let encoded = f.tokenizer.encode_prompt(&prompt).unwrap();
        assert_eq!(encoded.ids, ids_of(&case["prompt_ids"]), "{fixture}/{name}: prompt token ids");
        let imgs = images(case);
        assert_eq!(encoded.num_images, imgs.len());
        for (img, file) in imgs.iter().zip(case["pixel_files"].as_array().unwrap()) {
            let reference = image::open(f.dir.join("reference_pixels").join(file.as_str().unwrap())).unwrap().to_rgb8();
            let ours = f.processor.pixel_values(img);
            let plane = reference.width() as usize * reference.height() as usize;
            let mut worst = 0.0f32;
            for (i, px) in reference.pixels().enumerate() {
                for c in 0..3 {
                    let level = (ours[c * plane + i] * 0.5 + 0.5) * 255.0;
                    worst = worst.max((level - px.0[c] as f32).abs());
                }
            }
            // Identical 8-bit levels; the tolerance only absorbs the f32 normalisation round trip.
            assert!(worst < 0.01, "{fixture}/{name}: pixels differ by {worst} levels from transformers");
        }
    }
}

fn check_generation_alone(f: &Fixture, fixture: &str) {
    for case in &f.cases {
        let ids = ids_of(&case["prompt_ids"]);
        let greedy = ids_of(&case["greedy_ids"]);
        let mut pool = Pool::for_cases(f);
        let mut seq = [PooledSeq::default()];
        let mut embeds = prompt_embeddings(f, case, &ids);
        let mut comparing = true;
        for step in 0..greedy.len() {
            let logits = pool.forward(&f.model, &mut seq, vec![embeds], true).unwrap();
            let logits = logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap();
            if comparing {
                comparing = check_step(f, fixture, case, step, &logits);
            }
            // Teacher forcing keeps later steps comparable even after a near-tie.
            embeds = f.model.embed(&greedy[step..step + 1], None).unwrap();
        }
        assert_eq!(seq[0].len, ids.len() + greedy.len() - 1);
    }
}

/// All cases prefilled together in one ragged call, the prompts split into two chunks, then
/// decoded together: the answers must not change.
fn check_generation_batched(f: &Fixture, fixture: &str) {
    let cases: Vec<&Value> = f.cases.iter().collect();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids_of(&c["prompt_ids"])).collect();
    let greedy: Vec<Vec<u32>> = cases.iter().map(|c| ids_of(&c["greedy_ids"])).collect();
    let embeds: Vec<Tensor> = cases.iter().zip(&prompts).map(|(c, ids)| prompt_embeddings(f, c, ids)).collect();
    let mut pool = Pool::for_cases(f);
    let mut seqs: Vec<PooledSeq> = cases.iter().map(|_| PooledSeq::default()).collect();
    // First chunk: the first half of each prompt, no logits wanted.
    let halves = embeds.iter().map(|e| e.narrow(0, 0, e.dim(0).unwrap() / 2).unwrap()).collect();
    assert!(pool.forward(&f.model, &mut seqs, halves, false).is_none());
    let mut inputs: Vec<Tensor> = embeds
        .iter()
        .map(|e| {
            let (t, half) = (e.dim(0).unwrap(), e.dim(0).unwrap() / 2);
            e.narrow(0, half, t - half).unwrap()
        })
        .collect();
    let mut comparing = vec![true; cases.len()];
    for step in 0..greedy[0].len() {
        let logits = pool.forward(&f.model, &mut seqs, inputs, true).unwrap().to_vec2::<f32>().unwrap();
        for (i, case) in cases.iter().enumerate() {
            if comparing[i] {
                comparing[i] = check_step(f, &format!("{fixture} (batched)"), case, step, &logits[i]);
            }
        }
        inputs = greedy.iter().map(|g| f.model.embed(&g[step..step + 1], None).unwrap()).collect();
    }
}

#[test]
fn hub_layout_bf16_tied() {
    let f = load("tiny-hub");
    assert_eq!(f.model.layout().kind, weft_model::weights::LayoutKind::Hub);
    assert_eq!(f.model.layout().vision_tower, "vision_tower.vision_model");
    check_prompt_and_pixels(&f, "tiny-hub");
    check_generation_alone(&f, "tiny-hub");
    check_generation_batched(&f, "tiny-hub");
    report(&f, "tiny-hub");
}

fn report(f: &Fixture, name: &str) {
    let worst = f.worst.load(std::sync::atomic::Ordering::Relaxed) as f64 * 1e-9;
    let (format, dtype) = (f.model.linear_format().name(), f.model.dtype());
    eprintln!("{name} ({format}, {dtype:?}): largest logprob difference from transformers {worst:.2e}");
}

#[test]
fn transformers5_layout_f32_gqa() {
    let f = load("tiny-v5");
    assert_eq!(f.model.layout().kind, weft_model::weights::LayoutKind::Transformers5);
    assert_ne!(f.model.config().text.num_key_value_heads, f.model.config().text.num_attention_heads);
    check_prompt_and_pixels(&f, "tiny-v5");
    check_generation_alone(&f, "tiny-v5");
    check_generation_batched(&f, "tiny-v5");
    report(&f, "tiny-v5");
}

/// Greedy tokens compared only where the reference margin clears the format's error, so that
/// the check can count how many steps it really compared.
fn greedy_steps_compared(f: &Fixture) -> usize {
    f.cases
        .iter()
        .map(|c| {
            c["steps"]
                .as_array()
                .unwrap()
                .iter()
                .take_while(|s| s["margin"].as_f64().unwrap() >= f.tol.tie_margin)
                .count()
        })
        .sum()
}

#[test]
fn bf16_weights_stay_within_the_bound() {
    for name in ["tiny-hub", "tiny-v5"] {
        let f = load_as(name, LinearFormat::Bf16, BF16);
        check_generation_alone(&f, name);
        check_generation_batched(&f, name);
        report(&f, name);
        let compared = greedy_steps_compared(&f);
        eprintln!("{name} (bf16): greedy compared on {compared} steps");
        // The references have 77 (tiny-hub) and 40 (tiny-v5) steps whose margin is above the
        // tie margin: a test that compares none would pass whatever Weft generates.
        assert!(compared >= 30, "{name}: greedy compared on only {compared} steps");
    }
}

/// The device path: attention gathers each sequence's blocks with candle operations, then
/// runs candle's attention, as it does on a GPU; on the CPU's f32 it is exact too.
#[test]
fn gathering_blocks_with_candle_is_exact_too() {
    let mut f = load("tiny-v5");
    f.gather = true;
    check_generation_alone(&f, "tiny-v5 (gathered)");
    check_generation_batched(&f, "tiny-v5 (gathered)");
    report(&f, "tiny-v5 (gathered)");
}

/// On the CPU the KV pool stores bf16 for 8-bit weights, f16 for bf16 weights, f32 for f32
/// weights, and what it is told where it is told; a token costs half the bytes in 16 bits.
#[test]
fn kv_cache_dtype_follows_the_weights_unless_set() {
    let dir = fixtures().join("tiny-v5");
    let cache_of = |linear: LinearFormat, kv_cache_dtype: Option<DType>| {
        let options = LoadOptions { linear, kv_cache_dtype, ..LoadOptions::default() };
        LlavaModel::load(&dir, &options).unwrap().new_kv_pool(4, BLOCK_SIZE).unwrap()
    };
    assert_eq!(cache_of(LinearFormat::Q8_0, None).dtype(), DType::BF16);
    assert_eq!(cache_of(LinearFormat::Dense, None).dtype(), DType::F32);
    assert_eq!(cache_of(LinearFormat::Bf16, None).dtype(), DType::F16);
    let told = cache_of(LinearFormat::Q8_0, Some(DType::F32));
    assert_eq!(told.dtype(), DType::F32);
    assert_eq!(told.bytes_per_token(), 2 * cache_of(LinearFormat::Q8_0, None).bytes_per_token());
}

#[test]
fn q8_0_weights_stay_within_the_documented_bound() {
    for name in ["tiny-hub", "tiny-v5"] {
        let f = load_as(name, LinearFormat::Q8_0, Q8_0);
        check_generation_alone(&f, name);
        report(&f, name);
        let compared = greedy_steps_compared(&f);
        eprintln!("{name} (q8_0): greedy compared on {compared} steps");
        // tiny-hub's references have 51 steps above q8_0's tie margin of 0.7; tiny-v5's have
        // none (its logprob bound still holds), so only tiny-hub can check greedy tokens here.
        if name == "tiny-hub" {
            assert!(compared >= 40, "{name}: greedy compared on only {compared} steps");
        }
    }
}

#[test]
fn sharded_hub_checkpoint_256_wide() {
    let f = load("tiny-wide");
    assert!(f.dir.join("model.safetensors.index.json").exists() && !f.dir.join("model.safetensors").exists());
    assert_eq!(f.model.layout().kind, weft_model::weights::LayoutKind::Hub);
    check_prompt_and_pixels(&f, "tiny-wide");
    check_generation_alone(&f, "tiny-wide");
    check_generation_batched(&f, "tiny-wide");
    report(&f, "tiny-wide");
}

/// Every linear layer of tiny-wide reads a multiple of 256 inputs, so all of them run q4k
/// (other widths fall back to q8_0).
#[test]
fn q4k_weights_stay_within_the_documented_bound() {
    let f = load_as("tiny-wide", LinearFormat::Q4K, Q4K);
    check_generation_alone(&f, "tiny-wide");
    check_generation_batched(&f, "tiny-wide");
    report(&f, "tiny-wide");
}

/// Every fixture run in `dtype` (weights and activations) stays within `tol`, with greedy
/// compared on at least `min_compared` steps of each.
fn check_run_dtype(dtype: DType, tol: Tolerance, min_compared: usize) {
    for name in ["tiny-hub", "tiny-v5", "tiny-wide"] {
        let f = load_with(name, LoadOptions { dtype, ..LoadOptions::default() }, tol);
        check_generation_alone(&f, name);
        check_generation_batched(&f, name);
        report(&f, name);
        let compared = greedy_steps_compared(&f);
        eprintln!("{name} ({dtype:?} run): greedy compared on {compared} steps");
        assert!(compared >= min_compared, "{name}: greedy compared on only {compared} steps");
    }
}

#[test]
fn f16_run_stays_within_the_bound() {
    check_run_dtype(DType::F16, F16, 30);
}

#[test]
fn bf16_run_stays_within_the_bound() {
    // Few reference margins of the random tiny-v5 exceed 0.5 (3 steps; tiny-hub has 51).
    check_run_dtype(DType::BF16, BF16_RUN, 3);
}
