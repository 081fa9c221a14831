//! The engine on the tiny fixture: batch invariance, preemption, cancellation, seeds, stop
//! strings across tokens, n > 1, and prefix-cache reuse.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use weft_engine::{
    Engine, EngineConfig, EngineHandle, Event, FinishReason, GenerateRequest, PromptBuilder, PromptError, Usage,
};
use weft_model::preprocess::ImageProcessor;
use weft_model::prompt::{Message, Part, PromptRenderer};
use weft_model::tokenizer::{stop_token_ids, PromptTokenizer};
use weft_model::{LlavaModel, LoadOptions};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-v5")
}

struct Setup {
    handle: EngineHandle,
    tokenizer: Arc<PromptTokenizer>,
    prompts: PromptBuilder,
}

fn start(config: EngineConfig) -> Setup {
    let dir = fixture();
    let model = LlavaModel::load(&dir, &LoadOptions::default()).unwrap();
    let cfg = model.config().clone();
    let tokenizer = Arc::new(PromptTokenizer::from_dir(&dir, cfg.image_token_id, cfg.tokens_per_image()).unwrap());
    let processor = ImageProcessor::from_dir(&dir, cfg.vision.image_size).unwrap();
    let config = EngineConfig { eos_token_ids: stop_token_ids(&dir, &tokenizer).unwrap(), ..config };
    let prompts = PromptBuilder::new(tokenizer.clone(), PromptRenderer::BuiltIn, processor, &cfg);
    Setup { handle: Engine::start(model, tokenizer.clone(), config).unwrap(), tokenizer, prompts }
}

fn picture(name: &str) -> image::DynamicImage {
    image::open(fixture().join("../images").join(name)).unwrap()
}

fn nz(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap()
}

fn request(s: &Setup, messages: &[Message], images: &[&str], max_tokens: usize) -> GenerateRequest {
    let pictures: Vec<_> = images.iter().map(|n| picture(n)).collect();
    let mut r = GenerateRequest::new(s.prompts.chat(messages, &pictures, true).unwrap(), nz(max_tokens));
    r.sampling.temperature = 0.0;
    r.ignore_eos = true;
    r
}

fn ask(s: &Setup, question: &str, images: &[&str], max_tokens: usize) -> GenerateRequest {
    let mut parts: Vec<Part> = images.iter().map(|_| Part::Image).collect();
    parts.push(Part::Text(question.into()));
    request(s, &[Message { role: "user".into(), parts }], images, max_tokens)
}

/// Everything one choice produced.
#[derive(Debug, Clone, PartialEq, Default)]
struct Outcome {
    ids: Vec<u32>,
    text: String,
    reason: Option<FinishReason>,
    usage: Usage,
}

/// Collects every choice of a stream (blocking: the engine runs on its own thread).
fn collect(mut stream: weft_engine::EventStream, n: usize) -> Vec<Outcome> {
    let mut out = vec![Outcome::default(); n];
    while let Some(event) = stream.blocking_next() {
        match event {
            Event::Token { index, id, text, .. } => {
                out[index].ids.push(id);
                out[index].text.push_str(&text);
            }
            Event::Finished { index, reason, text, usage, .. } => {
                out[index].text.push_str(&text);
                out[index].reason = Some(reason);
                out[index].usage = usage;
            }
            Event::Error(e) => panic!("engine error: {e}"),
        }
    }
    out
}

fn run_one(s: &Setup, r: GenerateRequest) -> Outcome {
    collect(s.handle.submit(r).unwrap(), 1).remove(0)
}

fn mixed_requests(s: &Setup, count: usize) -> Vec<GenerateRequest> {
    let questions = ["What is this?", "Describe the scene.", "Write a poem about the sea.", "Count to ten."];
    let images: [&[&str]; 4] = [&["square.png"], &[], &["wide.png", "grey.png"], &[]];
    (0..count).map(|i| ask(s, questions[i % 4], images[i % 4], 8 + i % 5)).collect()
}

#[test]
fn greedy_outputs_do_not_depend_on_batching() {
    let s = start(EngineConfig { prefix_caching: false, ..Default::default() });
    let requests = mixed_requests(&s, 16);
    let alone: Vec<Outcome> = requests.iter().map(|r| run_one(&s, r.clone())).collect();
    let streams: Vec<_> = requests.into_iter().map(|r| s.handle.submit(r).unwrap()).collect();
    let together: Vec<Outcome> = streams.into_iter().map(|st| collect(st, 1).remove(0)).collect();
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.ids, t.ids, "request {i}: alone vs 16 concurrent");
        assert_eq!(a.reason, Some(FinishReason::Length));
    }
    assert!(s.handle.stats().steps_total > 0);
}

#[test]
fn greedy_tokens_chosen_where_the_logits_are_equal_the_host_sampler() {
    // Plain greedy rows, rows with logprobs or a penalty (copied whole), a sampled one and n = 2
    // in one batch: the path a GPU takes (forced here on the CPU) against the host path.
    let outcomes = |on_device: bool| {
        let s = start(EngineConfig { sample_on_device: Some(on_device), ..Default::default() });
        let mut requests = mixed_requests(&s, 8);
        requests[1].sampling.top_logprobs = Some(2);
        requests[2].sampling.repetition_penalty = 1.3;
        requests[3].sampling.temperature = 0.7;
        requests[3].sampling.seed = Some(11);
        requests[5].n = nz(2);
        let counts: Vec<usize> = requests.iter().map(|r| r.n.get()).collect();
        let streams: Vec<_> = requests.into_iter().map(|r| s.handle.submit(r).unwrap()).collect();
        streams.into_iter().zip(counts).flat_map(|(st, n)| collect(st, n)).collect::<Vec<Outcome>>()
    };
    let (device, host) = (outcomes(true), outcomes(false));
    assert_eq!(device.len(), 9);
    for (i, (d, h)) in device.iter().zip(&host).enumerate() {
        assert_eq!(d.ids, h.ids, "choice {i}");
        assert!(!d.ids.is_empty());
    }
}

#[test]
fn preemption_under_a_tiny_kv_budget_keeps_outputs() {
    let roomy = start(EngineConfig { prefix_caching: false, ..Default::default() });
    let questions = ["One", "Two words", "Three more words", "Four", "Five five", "Six and six"];
    let requests: Vec<GenerateRequest> = questions.iter().map(|q| ask(&roomy, q, &[], 24)).collect();
    let expected: Vec<Outcome> = requests.iter().map(|r| run_one(&roomy, r.clone())).collect();
    // Every prompt fits at admission, but not the answers: sequences must be preempted and
    // recomputed as they grow.
    let prompts: usize = requests.iter().map(|r| r.prompt.len()).sum();
    let bytes_per_token = 2 * 2 * 2 * 16 * 4; // layers * (k, v) * kv_heads * head_dim * f32
    let tight = start(EngineConfig {
        prefix_caching: false,
        kv_cache_memory: (prompts + 12) * bytes_per_token,
        ..Default::default()
    });
    let streams: Vec<_> = requests.into_iter().map(|r| tight.handle.submit(r).unwrap()).collect();
    for (i, (st, want)) in streams.into_iter().zip(&expected).enumerate() {
        assert_eq!(collect(st, 1)[0].ids, want.ids, "request {i}");
    }
    let stats = tight.handle.stats();
    assert!(stats.preemptions_total > 0, "the budget was meant to force preemption: {stats:?}");
    assert_eq!(stats.kv_used_tokens, 0);
}

#[test]
fn a_sampled_image_token_is_just_a_token() {
    let s = start(EngineConfig { prefix_caching: false, ..Default::default() });
    let image_token = s.tokenizer.image_token_id();
    let mut r = ask(&s, "What is this?", &["square.png"], 24);
    r.sampling.logit_bias.insert(image_token, 100.0);
    let out = run_one(&s, r.clone());
    assert_eq!(out.ids, vec![image_token; 24], "the bias makes the image token the greedy choice");
    // Recomputed after preemption too: the generated ones are embedded as text, the prompt's
    // slots from the image.
    let bytes_per_token = 2 * 2 * 2 * 16 * 4; // as in the preemption test
    let tight = start(EngineConfig {
        prefix_caching: false,
        // Both prompts fit (KV storage grows in steps of 16 tokens), their answers do not.
        kv_cache_memory: 2 * (r.prompt.len() + 1).div_ceil(16) * 16 * bytes_per_token,
        ..Default::default()
    });
    let streams: Vec<_> = (0..2).map(|_| tight.handle.submit(r.clone()).unwrap()).collect();
    for st in streams {
        assert_eq!(collect(st, 1)[0].ids, out.ids);
    }
    assert!(tight.handle.stats().preemptions_total > 0);
}

#[test]
fn dropping_the_stream_cancels_and_frees_kv() {
    let s = start(EngineConfig { prefix_caching: false, ..Default::default() });
    let mut stream = s.handle.submit(ask(&s, "What is this?", &["square.png"], 10_000)).unwrap();
    assert!(matches!(stream.blocking_next(), Some(Event::Token { .. })));
    drop(stream);
    // A request submitted afterwards finishes only after the engine has stepped past the drop.
    run_one(&s, ask(&s, "Hi", &[], 3));
    let stats = s.handle.stats();
    assert_eq!((stats.running, stats.waiting, stats.kv_used_tokens), (0, 0, 0), "{stats:?}");
}

#[test]
fn seeds_reproduce_also_when_batched() {
    let s = start(EngineConfig::default());
    let mut r = ask(&s, "Tell me a story.", &[], 16);
    r.sampling.temperature = 1.0;
    r.sampling.seed = Some(42);
    let first = run_one(&s, r.clone());
    let noise: Vec<_> = mixed_requests(&s, 5).into_iter().map(|x| s.handle.submit(x).unwrap()).collect();
    let again = run_one(&s, r.clone());
    drop(noise);
    assert_eq!(first.ids, again.ids);
    r.sampling.seed = Some(43);
    assert_ne!(run_one(&s, r).ids, first.ids, "another seed should differ");
}

#[test]
fn n_choices_share_the_prompt_and_differ() {
    let s = start(EngineConfig::default());
    let mut r = ask(&s, "Tell me a story.", &["square.png"], 12);
    r.sampling.temperature = 1.0;
    r.sampling.seed = Some(5);
    r.n = nz(3);
    let outs = collect(s.handle.submit(r).unwrap(), 3);
    assert!(outs.iter().all(|o| o.ids.len() == 12 && o.reason == Some(FinishReason::Length)));
    assert!(outs[0].ids != outs[1].ids || outs[1].ids != outs[2].ids);
    assert_eq!(s.handle.stats().images_encoded, 1);
}

#[test]
fn stop_strings_spanning_tokens_are_cut() {
    let s = start(EngineConfig::default());
    let r = ask(&s, "Write a poem about the sea.", &[], 24);
    let full = run_one(&s, r.clone());
    // Pick a stop string that straddles the boundary between the 3rd and 4th tokens' text.
    let pieces: Vec<String> = full.ids.iter().map(|&id| s.tokenizer.decode(&[id], true).unwrap()).collect();
    let before: String = pieces[..3].concat();
    assert!(!pieces[2].is_empty() && !pieces[3].is_empty(), "pieces: {pieces:?}");
    let cut = before.char_indices().last().unwrap().0;
    let stop = format!("{}{}", &before[cut..], pieces[3].chars().next().unwrap());
    let expected = &full.text[..full.text.find(&stop).unwrap()];
    let mut with_stop = r.clone();
    with_stop.stop = vec![stop.clone()];
    let out = run_one(&s, with_stop);
    assert_eq!(out.reason, Some(FinishReason::Stop));
    assert_eq!(out.text, expected, "stop {stop:?} in {:?}", full.text);
    assert!(!out.text.contains(&stop));
}

#[test]
fn second_turn_reuses_the_first_turns_image_and_prefill() {
    let warm = start(EngineConfig::default());
    let cold = start(EngineConfig { prefix_caching: false, ..Default::default() });
    let first = request(
        &warm,
        &[Message { role: "user".into(), parts: vec![Part::Image, Part::Text("What is this?".into())] }],
        &["square.png"],
        6,
    );
    let answer = run_one(&warm, first.clone());
    let turn2 = [
        Message { role: "user".into(), parts: vec![Part::Image, Part::Text("What is this?".into())] },
        Message::text("assistant", &answer.text),
        Message::text("user", "And the colours?"),
    ];
    let second = request(&warm, &turn2, &["square.png"], 8);
    let encoded_before = warm.handle.stats().images_encoded;
    let reused = run_one(&warm, second.clone());
    assert_eq!(warm.handle.stats().images_encoded, encoded_before, "the image must not be encoded again");
    assert!(reused.usage.cached_tokens >= 729, "cached {}", reused.usage.cached_tokens);
    assert_eq!(reused.ids, run_one(&cold, second).ids, "a prefix-cache hit must not change the answer");
}

#[test]
fn refusals_are_precise() {
    let s = start(EngineConfig { max_waiting: 0, ..Default::default() });
    let err = s.handle.submit(ask(&s, "Hi", &[], 4)).err().unwrap();
    assert!(matches!(err, weft_engine::SubmitError::Overloaded { .. }), "{err}");
    let s = start(EngineConfig::default());
    let long = GenerateRequest::new(s.prompts.ids(vec![1; s.handle.context_len()]).unwrap(), nz(4));
    let err = s.handle.submit(long).err().unwrap();
    assert!(err.to_string().contains("context"), "{err}");
}

#[test]
fn only_proven_prompts_are_built() {
    let s = start(EngineConfig::default());
    let user = |parts| [Message { role: "user".into(), parts }];
    let with_image = user(vec![Part::Image, Part::Text("Hi".into())]);
    // Counting only (what /tokenize does): the same ids and the same proof, no pixels made.
    let proven = s.prompts.chat(&with_image, &[picture("square.png")], true).unwrap();
    assert_eq!(s.prompts.chat_ids(&with_image, 1, true).unwrap(), proven.ids());
    assert!(matches!(s.prompts.chat_ids(&with_image, 0, true), Err(PromptError::SlotCount { .. })));
    let missing_image = s.prompts.chat(&with_image, &[], true).unwrap_err();
    assert!(matches!(missing_image, PromptError::SlotCount { slots: 729, images: 0, .. }), "{missing_image}");
    let spare_image = s.prompts.chat(&user(vec![Part::Text("Hi".into())]), &[picture("square.png")], true);
    assert!(matches!(spare_image, Err(PromptError::SlotCount { slots: 0, images: 1, .. })));
    assert_eq!(s.prompts.ids(vec![]).unwrap_err(), PromptError::Empty);
    let vocab = s.tokenizer.image_token_id() + 100_000;
    assert_eq!(s.prompts.ids(vec![1, vocab]).unwrap_err(), PromptError::OutsideVocabulary(vocab));
    let image_id = s.tokenizer.image_token_id();
    assert_eq!(s.prompts.ids(vec![1, image_id]).unwrap_err(), PromptError::ImageInText);
    assert_eq!(s.prompts.text("Look: <image>").unwrap_err(), PromptError::ImageInText);
    // A video's frames are consecutive slots, one picture each.
    let frames = [picture("square.png"), picture("wide.png")];
    let video = s.prompts.chat(&user(vec![Part::Video { frames: 2 }]), &frames, true).unwrap();
    assert_eq!(video.ids().iter().filter(|&&id| id == image_id).count(), 2 * 729);
    assert_eq!(video.images().len(), 2);
    assert_ne!(video.images()[0].hash(), video.images()[1].hash());
}
