//! Deterministic simulation of the engine on the tiny fixture: seeded random arrivals (text,
//! images, video frames, shared prefixes, n > 1, stops), disconnects at every stage (waiting,
//! before the vision encode, mid-prefill, mid-decode), preemption under a tiny KV budget, a
//! small vision cache, and injected faults, driven one step at a time from this thread.
//! After every step the engine's invariants hold (among them the KV pool's: every block is
//! free, cached, or held by exactly the sequences its count says; no block holds the tokens of
//! two prefixes) and every stream is well formed; at the end every block is free or cached, and
//! the seeds together have shared blocks, copied them on write, evicted cached ones and
//! preempted. A failing seed replays exactly:
//! `WEFT_SIM_SEED=<seed> cargo test -p weft-engine --test simulation`.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use weft_engine::{
    Engine, EngineConfig, Event, EventStream, Fault, FinishReason, GenerateRequest, ImageInput, PromptBuilder,
};
use weft_model::preprocess::ImageProcessor;
use weft_model::prompt::{Message, Part, PromptRenderer};
use weft_model::tokenizer::{stop_token_ids, PromptTokenizer};
use weft_model::{LlavaModel, LoadOptions};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-v5")
}

/// What every seed shares: the prompt builder and a pool of preprocessed pictures.
struct World {
    prompts: PromptBuilder,
    pictures: Vec<ImageInput>,
    eos: Vec<u32>,
}

fn world() -> World {
    // Injected faults panic on purpose (and are contained): keep their reports out of the log.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !info.to_string().contains("fault injected") {
            default_hook(info);
        }
    }));
    let dir = fixture();
    let model = LlavaModel::load(&dir, &LoadOptions::default()).unwrap();
    let cfg = model.config().clone();
    let tokenizer = Arc::new(PromptTokenizer::from_dir(&dir, cfg.image_token_id, cfg.tokens_per_image()).unwrap());
    let processor = ImageProcessor::from_dir(&dir, cfg.vision.image_size).unwrap();
    let mut images: Vec<image::DynamicImage> = ["square.png", "wide.png", "grey.png", "palette.png", "alpha.png"]
        .iter()
        .map(|n| image::open(dir.join("../images").join(n)).unwrap())
        .collect();
    let gif = std::fs::read(dir.join("../images/clip.gif")).unwrap();
    images.extend(weft_media::video::sample_gif(&gif, 4).unwrap().1);
    let eos = stop_token_ids(&dir, &tokenizer).unwrap();
    let prompts = PromptBuilder::new(tokenizer, PromptRenderer::BuiltIn, processor, &cfg);
    let pictures = images.iter().map(|i| prompts.image_input(i).unwrap()).collect();
    World { prompts, pictures, eos }
}

/// One simulated client and what it has seen of its stream.
struct Client {
    /// `None` once the client has hung up.
    stream: Option<EventStream>,
    n: usize,
    max_tokens: usize,
    tokens: Vec<usize>,
    finished: Vec<bool>,
    /// Step at which it hangs up, if it does.
    leaves_at: Option<usize>,
    /// Hang up after this many tokens, if it does.
    leaves_after_tokens: Option<usize>,
    errored: bool,
    faulty: bool,
}

const QUESTIONS: [&str; 5] =
    ["What is this?", "Describe the scene in detail.", "Count the objects.", "What changed?", "Hi"];

fn random_request(w: &World, rng: &mut StdRng) -> GenerateRequest {
    let mut parts = Vec::new();
    let mut images = Vec::new();
    // Images from a small pool, so that the vision and prefix caches both hit and miss.
    let media = rng.random_range(0..8);
    for _ in 0..[0, 0, 0, 0, 1, 1, 2, 3][media] {
        let k = rng.random_range(0..5);
        parts.push(Part::Image);
        images.push(k);
    }
    if media == 3 && rng.random_bool(0.5) {
        // A video: its frames are consecutive image slots.
        let frames = rng.random_range(2..=4);
        parts.push(Part::Video { frames });
        images.extend((5..5 + frames).collect::<Vec<_>>());
    }
    parts.push(Part::Text(QUESTIONS[rng.random_range(0..QUESTIONS.len())].into()));
    let mut messages = vec![Message { role: "user".into(), parts }];
    if rng.random_bool(0.2) {
        messages.push(Message::text("assistant", "It is a picture."));
        messages.push(Message::text("user", "And the colours?"));
    }
    let images = images.into_iter().map(|k| w.pictures[k].clone()).collect();
    let prompt = w.prompts.chat_inputs(&messages, images, true).unwrap();
    let mut r = GenerateRequest::new(prompt, NonZeroUsize::new(rng.random_range(1..=12)).unwrap());
    r.n = NonZeroUsize::new([1, 1, 1, 2, 3][rng.random_range(0..5)]).unwrap();
    r.sampling.temperature = if rng.random_bool(0.5) { 0.0 } else { 0.8 };
    r.sampling.seed = Some(rng.random());
    r.ignore_eos = rng.random_bool(0.7);
    if rng.random_bool(0.1) {
        r.stop = vec!["a".into()];
    }
    r
}

/// Configuration drawn for one seed: tight enough to preempt, evict and chunk.
fn random_config(w: &World, rng: &mut StdRng) -> EngineConfig {
    let bytes_per_token = 2 * 2 * 2 * 16 * 4; // tiny-v5: (k, v) x layers x kv heads x head dim x f32
    EngineConfig {
        max_num_batched_tokens: [64, 300, 2048][rng.random_range(0..3)],
        max_num_seqs: [2, 4, 16][rng.random_range(0..3)],
        kv_cache_memory: rng.random_range(2_000..8_000) * bytes_per_token,
        block_size: [4, 16, 32][rng.random_range(0..3)],
        vision_cache_memory: rng.random_range(1..4) * 729 * 64 * 4,
        max_waiting: 64,
        prefix_caching: rng.random_bool(0.75),
        max_images_per_encode: rng.random_range(1..4),
        eos_token_ids: w.eos.clone(),
        // Half the seeds take the GPU's way of choosing greedy tokens.
        sample_on_device: Some(rng.random_bool(0.5)),
    }
}

/// Runs one seed; returns a trace of everything observable, to compare replays.
fn simulate(w: &World, seed: u64, steps: usize) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let config = random_config(w, &mut rng);
    let model = LlavaModel::load(&fixture(), &LoadOptions::default()).unwrap();
    let (mut engine, handle) = Engine::new(model, w.prompts.tokenizer().clone(), config.clone()).unwrap();
    let mut clients: Vec<Client> = Vec::new();
    let mut trace = vec![format!("{config:?}")];
    let mut faults_in_flight = false;
    let fail = |step: usize, what: String| -> ! { panic!("seed {seed}, step {step}: {what}") };
    let mut step = 0;
    loop {
        let arriving = step < steps;
        if !arriving
            && engine.audit().requests == 0
            && clients.iter().all(|c| c.finished.iter().all(|&f| f) || c.errored)
        {
            break;
        }
        if step > steps + 20_000 {
            fail(step, "requests never drained".into());
        }
        // Arrivals, in bursts.
        if arriving && rng.random_bool(0.15) {
            for _ in 0..rng.random_range(1..=3) {
                let mut r = random_request(w, &mut rng);
                let faulty = rng.random_bool(0.01);
                if faulty {
                    r.fault = Some(Fault::Panic);
                }
                let (n, max_tokens) = (r.n.get(), r.max_tokens.get());
                match handle.submit(r) {
                    Ok(stream) => {
                        let leaves_at = rng.random_bool(0.15).then(|| step + rng.random_range(0..30));
                        let leaves_after_tokens = rng.random_bool(0.15).then(|| rng.random_range(0..6));
                        trace.push(format!("{step}: submit {} n={n} max={max_tokens}", clients.len()));
                        clients.push(Client {
                            stream: Some(stream),
                            n,
                            max_tokens,
                            tokens: vec![0; n],
                            finished: vec![false; n],
                            leaves_at,
                            leaves_after_tokens,
                            errored: false,
                            faulty,
                        });
                    }
                    Err(e) => trace.push(format!("{step}: refused {e}")),
                }
            }
        }
        // Disconnects: a dropped stream is a client that went away, whatever its stage.
        for (i, c) in clients.iter_mut().enumerate() {
            let done = c.finished.iter().all(|&f| f) || c.errored;
            let by_time = c.leaves_at.is_some_and(|t| t <= step);
            let by_tokens = c.leaves_after_tokens.is_some_and(|k| c.tokens.iter().sum::<usize>() >= k);
            if !done && (by_time || by_tokens) {
                c.stream = None;
                c.errored = true; // nothing more is expected from it
                trace.push(format!("{step}: client {i} leaves"));
            }
        }
        faults_in_flight |= clients.iter().any(|c| c.faulty && !c.errored);
        engine.tick();
        if let Err(e) = engine.check_invariants() {
            fail(step, e);
        }
        let audit = engine.audit();
        if audit.kv_blocks_held + audit.kv_blocks_available != audit.kv_blocks {
            fail(step, format!("blocks unaccounted for: {audit:?}"));
        }
        // Every stream is well formed: tokens and one finish per choice, never past max_tokens.
        for (i, c) in clients.iter_mut().enumerate() {
            let Some(stream) = c.stream.as_mut() else { continue };
            while let Some(event) = stream.try_next() {
                match event {
                    Event::Token { index, id, .. } => {
                        if index >= c.n || c.finished[index] {
                            fail(step, format!("client {i}: token for choice {index} after its end"));
                        }
                        c.tokens[index] += 1;
                        trace.push(format!("{step}: {i}.{index} token {id}"));
                    }
                    Event::Finished { index, reason, usage, .. } => {
                        if index >= c.n || c.finished[index] {
                            fail(step, format!("client {i}: second finish for choice {index}"));
                        }
                        c.finished[index] = true;
                        if usage.completion_tokens > c.max_tokens
                            || (reason == FinishReason::Length && usage.completion_tokens != c.max_tokens)
                        {
                            // Length before max_tokens only at the KV budget, which these prompts never reach.
                            fail(
                                step,
                                format!("client {i}: {reason:?} after {} of {}", usage.completion_tokens, c.max_tokens),
                            );
                        }
                        trace.push(format!("{step}: {i}.{index} finished {reason:?} {}", usage.completion_tokens));
                    }
                    Event::Error(e) => {
                        if !faults_in_flight {
                            fail(step, format!("client {i}: error without an injected fault: {e}"));
                        }
                        c.errored = true;
                        trace.push(format!("{step}: {i} error"));
                    }
                }
            }
        }
        faults_in_flight = clients.iter().any(|c| c.faulty && !c.errored);
        step += 1;
    }
    let stats = handle.stats();
    let audit = engine.audit();
    assert_eq!((stats.running, stats.waiting, audit.running, audit.waiting), (0, 0, 0, 0), "seed {seed}: {stats:?}");
    assert_eq!(audit.kv_blocks_held, 0, "seed {seed}: every block is free or cached once all requests ended");
    engine.clear_caches();
    let audit = engine.audit();
    assert_eq!((audit.kv_blocks_available, audit.kv_blocks_cached), (audit.kv_blocks, 0), "seed {seed}: {audit:?}");
    assert_eq!(audit.vision_bytes, 0, "seed {seed}: {audit:?}");
    trace.push(format!(
        "steps {step}, preemptions {}, faults {}, shared {}, copies {}, evictions {}, cached tokens {}",
        stats.preemptions_total,
        stats.faults_total,
        audit.kv_blocks_shared,
        audit.kv_block_copies,
        audit.kv_evictions,
        stats.cached_tokens_total
    ));
    trace
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[test]
fn random_interleavings_keep_every_invariant() {
    let w = world();
    let steps = env_number("WEFT_SIM_STEPS", 1500) as usize;
    let seeds: Vec<u64> = match std::env::var("WEFT_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("a seed")],
        Err(_) => (0..env_number("WEFT_SIM_SEEDS", 8)).collect(),
    };
    let mut totals = [0u64; 5];
    let names = ["preemptions", "shared", "copies", "evictions", "cached tokens"];
    for &seed in &seeds {
        let trace = simulate(&w, seed, steps);
        let last = trace.last().unwrap();
        for (total, name) in totals.iter_mut().zip(names) {
            let count = last.split(&format!("{name} ")).nth(1).and_then(|t| t.split(',').next()).unwrap();
            *total += count.parse::<u64>().unwrap();
        }
        eprintln!("seed {seed}: {last}");
    }
    eprintln!("{} seeds of {steps} steps of arrivals: {names:?} = {totals:?}", seeds.len());
    for (total, name) in totals.iter().zip(names) {
        assert!(*total > 0, "the seeds were meant to exercise {name}: {totals:?}");
    }
}

#[test]
fn the_same_seed_replays_the_same_schedule() {
    let w = world();
    for seed in [7, 1001] {
        assert_eq!(simulate(&w, seed, 300), simulate(&w, seed, 300), "seed {seed}");
    }
}
