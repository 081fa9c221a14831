//! The engine thread: owns the model, the queues, the caches and every sequence, and runs one
//! batched step after another: plan, preempt, admit, encode images, one ragged forward pass,
//! sample, stream. The only way in is a command over a channel.

use crate::config::EngineConfig;
use crate::handle::{Bounds, EngineHandle};
use crate::prefix_cache::{image_key, text_key, PrefixCache, TokenKey};
use crate::request::{EngineError, Event, FinishReason, GenerateRequest, Timing, Usage};
use crate::scheduler::{self, Limits, RunningView, WaitingView};
use crate::sequence::{Emitted, Sequence};
use crate::stats::EngineStats;
use crate::vision_cache::VisionCache;
use candle_core::Tensor;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;
use weft_model::tokenizer::PromptTokenizer;
use weft_model::{KvCache, LlavaModel, SeqInput};

pub(crate) enum Command {
    Submit(Box<Submission>),
}

pub(crate) struct Submission {
    pub request: GenerateRequest,
    pub events: UnboundedSender<Event>,
    pub submitted: Instant,
}

/// What the choices of one request share.
pub(crate) struct Request {
    pub prompt: Vec<u32>,
    /// Prefix-matching identity of every prompt token.
    pub keys: Vec<TokenKey>,
    pub images: Vec<crate::request::ImageInput>,
    /// Prompt position of each image's first slot.
    pub image_starts: Vec<usize>,
    /// Projected features per image, filled when a chunk needs them.
    pub features: Vec<Option<Tensor>>,
    pub spec: GenerateRequest,
    pub events: UnboundedSender<Event>,
    pub submitted: Instant,
    /// Choices still running or waiting.
    pub live_choices: usize,
    pub choices_spawned: bool,
}

pub struct Engine {
    model: LlavaModel,
    tokenizer: Arc<PromptTokenizer>,
    config: Arc<EngineConfig>,
    stats: Arc<EngineStats>,
    limits: Limits,
    requests: HashMap<u64, Request>,
    seqs: HashMap<u64, Sequence>,
    /// Seq ids in arrival order.
    running: Vec<u64>,
    waiting: VecDeque<u64>,
    vision: VisionCache,
    prefix: PrefixCache,
    next_id: u64,
}

impl Engine {
    /// Starts the engine thread and returns the handle to it.
    pub fn start(model: LlavaModel, tokenizer: Arc<PromptTokenizer>, config: EngineConfig) -> EngineHandle {
        let cfg = model.config().clone();
        let bytes_per_token = model.new_cache().bytes_per_token();
        let kv_tokens = (config.kv_cache_memory / bytes_per_token).max(1);
        let bounds = Bounds {
            context: cfg.text.max_position_embeddings,
            kv_tokens,
            image_token_id: cfg.image_token_id,
            tokens_per_image: cfg.tokens_per_image(),
            vocab_size: cfg.text.vocab_size,
            image_size: cfg.vision.image_size,
        };
        let stats = Arc::new(EngineStats::default());
        stats.kv_capacity_tokens.store(kv_tokens, Relaxed);
        let config = Arc::new(config);
        let (tx, rx) = std::sync::mpsc::channel();
        let engine = Engine {
            model,
            tokenizer,
            limits: Limits {
                max_batched_tokens: config.max_num_batched_tokens.max(1),
                max_seqs: config.max_num_seqs.max(1),
                kv_tokens,
            },
            vision: VisionCache::new(config.vision_cache_memory),
            config: config.clone(),
            stats: stats.clone(),
            requests: HashMap::new(),
            seqs: HashMap::new(),
            running: Vec::new(),
            waiting: VecDeque::new(),
            prefix: PrefixCache::new(),
            next_id: 0,
        };
        std::thread::Builder::new()
            .name("weft-engine".into())
            .spawn(move || engine.run(rx))
            .expect("spawn the engine thread");
        EngineHandle { commands: tx, stats, config, bounds: Arc::new(bounds) }
    }

    fn run(mut self, commands: Receiver<Command>) {
        loop {
            // Sleep while there is nothing to do; otherwise take whatever arrived and step.
            if self.seqs.is_empty() {
                match commands.recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => return,
                }
            }
            loop {
                match commands.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) if self.seqs.is_empty() => return,
                    Err(TryRecvError::Disconnected) => break,
                }
            }
            self.step();
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(s) => self.enqueue(*s),
        }
    }

    fn enqueue(&mut self, s: Submission) {
        let tpi = self.model.config().tokens_per_image();
        let image_token = self.model.config().image_token_id;
        let prompt = s.request.prompt_ids.clone();
        let mut keys = Vec::with_capacity(prompt.len());
        let mut image_starts = Vec::new();
        let mut i = 0;
        while i < prompt.len() {
            if prompt[i] == image_token {
                let hash = s.request.images[image_starts.len()].hash;
                image_starts.push(i);
                keys.extend((0..tpi).map(|slot| image_key(hash, slot)));
                i += tpi;
            } else {
                keys.push(text_key(prompt[i]));
                i += 1;
            }
        }
        let req_id = self.new_id();
        let seq = Sequence::new(self.new_id(), req_id, 0, &s.request);
        self.waiting.push_back(seq.id);
        self.seqs.insert(seq.id, seq);
        let n_images = s.request.images.len();
        self.requests.insert(
            req_id,
            Request {
                prompt,
                keys,
                images: s.request.images.clone(),
                image_starts,
                features: vec![None; n_images],
                spec: s.request,
                events: s.events,
                submitted: s.submitted,
                live_choices: 1,
                choices_spawned: false,
            },
        );
    }

    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn cancelled(&self, seq: &Sequence) -> bool {
        self.requests.get(&seq.req_id).is_none_or(|r| r.events.is_closed())
    }

    /// Tokens the prefix cache could supply for a waiting sequence (at least one token is
    /// always computed, so that its logits exist).
    fn reusable_prefix(&self, seq: &Sequence) -> usize {
        if !self.config.prefix_caching || seq.computed() > 0 || self.prefix.tokens() == 0 {
            return 0;
        }
        let keys = self.seq_keys(seq);
        self.prefix.peek(&keys, seq.tokens.len() - 1)
    }

    fn seq_keys(&self, seq: &Sequence) -> Vec<TokenKey> {
        let req = &self.requests[&seq.req_id];
        let mut keys = req.keys.clone();
        keys.extend(seq.tokens[req.prompt.len()..].iter().map(|&t| text_key(t)));
        keys
    }

    fn step(&mut self) {
        let running: Vec<RunningView> = self
            .running
            .iter()
            .map(|id| {
                let s = &self.seqs[id];
                RunningView { id: *id, computed: s.computed(), pending: s.pending(), cancelled: self.cancelled(s) }
            })
            .collect();
        let waiting: Vec<WaitingView> = self
            .waiting
            .iter()
            .map(|id| {
                let s = &self.seqs[id];
                let cached = self.reusable_prefix(s);
                WaitingView { id: *id, to_compute: s.tokens.len() - cached, cached, cancelled: self.cancelled(s) }
            })
            .collect();
        // The prefix cache lives in whatever KV budget the running sequences and the head of
        // the queue leave free.
        let committed: usize = running.iter().filter(|r| !r.cancelled).map(|r| r.computed + r.pending).sum();
        let head = waiting.iter().find(|w| !w.cancelled).map_or(0, |w| w.to_compute);
        self.prefix.shrink_to(self.limits.kv_tokens.saturating_sub(committed + head));
        let limits = Limits { kv_tokens: self.limits.kv_tokens - self.prefix.tokens(), ..self.limits };
        let plan = scheduler::plan(&running, &waiting, limits);

        for id in &plan.dropped {
            self.waiting.retain(|w| w != id);
            self.remove_seq(*id);
        }
        for id in plan.preempted.iter().rev() {
            self.running.retain(|r| r != id);
            let seq = self.seqs.get_mut(id).expect("planned");
            seq.cache = None;
            self.waiting.push_front(*id);
            self.stats.preemptions_total.fetch_add(1, Relaxed);
        }
        for id in &plan.admitted {
            self.waiting.retain(|w| w != id);
            self.admit(*id);
        }
        self.publish_gauges();
        if plan.chunks.is_empty() {
            return;
        }
        self.stats.steps_total.fetch_add(1, Relaxed);
        if let Err(e) = self.run_chunks(&plan.chunks) {
            tracing::error!(error = %e, "forward pass failed");
            let ids: Vec<u64> = plan.chunks.iter().map(|c| c.0).collect();
            for id in ids {
                if let Some(seq) = self.seqs.get(&id) {
                    if let Some(req) = self.requests.get(&seq.req_id) {
                        let _ = req.events.send(Event::Error(EngineError::Model(e.to_string())));
                    }
                }
                self.remove_seq(id);
            }
        }
        self.publish_gauges();
    }

    fn admit(&mut self, id: u64) {
        let mut cache = self.model.new_cache();
        let mut reused = 0;
        if self.config.prefix_caching {
            let seq = &self.seqs[&id];
            let keys = self.seq_keys(seq);
            if let Some((len, hit)) = self.prefix.lookup(&keys, seq.tokens.len() - 1) {
                cache = hit;
                reused = len;
            }
        }
        let seq = self.seqs.get_mut(&id).expect("waiting");
        if seq.admitted_at.is_none() {
            // First start (not a re-admission after preemption): it leaves the waiting count.
            self.stats.waiting.fetch_sub(1, Relaxed);
            self.stats.prompt_tokens_total.fetch_add(seq.tokens.len() as u64, Relaxed);
            self.stats.cached_tokens_total.fetch_add(reused as u64, Relaxed);
        }
        seq.admit(cache, reused);
        self.running.push(id);
    }

    /// Ensures the projected features of every image overlapping `[from, to)` of the prompt
    /// are at hand: from the request, the vision cache, or one batched encode.
    fn gather_features(&mut self, wanted: &[(u64, usize, usize)]) -> weft_model::Result<()> {
        let tpi = self.model.config().tokens_per_image();
        let mut missing: Vec<(u64, usize)> = Vec::new();
        for &(req_id, from, to) in wanted {
            let req = self.requests.get_mut(&req_id).expect("live");
            for (k, &start) in req.image_starts.iter().enumerate() {
                if start < to && start + tpi > from && req.features[k].is_none() {
                    match self.vision.get(req.images[k].hash) {
                        Some(f) => req.features[k] = Some(f),
                        None => missing.push((req_id, k)),
                    }
                }
            }
        }
        for batch in missing.chunks(self.config.max_images_per_encode.max(1)) {
            let pixels: Vec<Tensor> = batch.iter().map(|(r, k)| self.requests[r].images[*k].pixels.clone()).collect();
            let started = Instant::now();
            let features = self.model.encode_images(&Tensor::stack(&pixels, 0)?)?;
            self.stats.vision_encode_us.fetch_add(started.elapsed().as_micros() as u64, Relaxed);
            self.stats.images_encoded.fetch_add(batch.len() as u64, Relaxed);
            for (i, (r, k)) in batch.iter().enumerate() {
                let f = features.get(i)?;
                let req = self.requests.get_mut(r).expect("live");
                self.vision.insert(req.images[*k].hash, f.clone());
                req.features[*k] = Some(f);
            }
        }
        self.stats.vision_cache_hits.store(self.vision.hits, Relaxed);
        self.stats.vision_cache_misses.store(self.vision.misses, Relaxed);
        Ok(())
    }

    /// Embeddings of `seq.tokens[from..to]`, image slots filled from the features.
    fn chunk_embeddings(&self, seq: &Sequence, from: usize, to: usize) -> weft_model::Result<Tensor> {
        let req = &self.requests[&seq.req_id];
        let tpi = self.model.config().tokens_per_image();
        let mut rows = Vec::new();
        for (k, &start) in req.image_starts.iter().enumerate() {
            let (a, b) = (from.max(start), to.min(start + tpi));
            if a < b {
                let f = req.features[k].as_ref().expect("gathered before embedding");
                rows.push(f.narrow(0, a - start, b - a)?);
            }
        }
        let rows = if rows.is_empty() { None } else { Some(Tensor::cat(&rows, 0)?) };
        // Only the prompt has image slots; generated tokens (recomputed after a preemption, or
        // fed back one by one) are text even when the model sampled the image token's id.
        let split = to.min(req.prompt.len()).max(from);
        let mut parts = Vec::with_capacity(2);
        if from < split {
            parts.push(self.model.embed(&seq.tokens[from..split], rows.as_ref())?);
        }
        if split < to {
            parts.push(self.model.embed_generated(&seq.tokens[split..to])?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    fn run_chunks(&mut self, chunks: &[(u64, usize)]) -> weft_model::Result<()> {
        let wanted: Vec<(u64, usize, usize)> = chunks
            .iter()
            .map(|&(id, n)| {
                let s = &self.seqs[&id];
                (s.req_id, s.computed(), s.computed() + n)
            })
            .filter(|&(req, from, _)| from < self.requests[&req].prompt.len())
            .collect();
        self.gather_features(&wanted)?;
        let mut embeds = Vec::with_capacity(chunks.len());
        for &(id, n) in chunks {
            let s = &self.seqs[&id];
            embeds.push(self.chunk_embeddings(s, s.computed(), s.computed() + n)?);
        }
        let mut caches: Vec<KvCache> =
            chunks.iter().map(|(id, _)| self.seqs.get_mut(id).unwrap().cache.take().expect("running")).collect();
        let wants: Vec<bool> =
            chunks.iter().map(|&(id, n)| self.seqs[&id].computed() + n == self.seqs[&id].tokens.len()).collect();
        let started = Instant::now();
        let result = {
            let mut inputs: Vec<SeqInput> = caches
                .iter_mut()
                .zip(embeds)
                .zip(&wants)
                .map(|((cache, embeds), &want_logits)| SeqInput { embeds, cache, want_logits })
                .collect();
            self.model.forward(&mut inputs)
        };
        for ((id, _), cache) in chunks.iter().zip(caches) {
            self.seqs.get_mut(id).unwrap().restore_cache(cache);
        }
        let logits = result?;
        let forward = started.elapsed();
        let Some(logits) = logits else { return Ok(()) };
        let rows: Vec<Vec<f32>> = logits.to_vec2()?;
        let finishing: Vec<u64> = chunks.iter().zip(&wants).filter(|(_, &w)| w).map(|(c, _)| c.0).collect();
        for (id, row) in finishing.into_iter().zip(rows) {
            self.after_logits(id, &row)?;
        }
        tracing::debug!(
            seqs = chunks.len(),
            tokens = chunks.iter().map(|c| c.1).sum::<usize>(),
            forward_ms = forward.as_secs_f64() * 1e3,
            sample_ms = (started.elapsed() - forward).as_secs_f64() * 1e3,
            "step"
        );
        Ok(())
    }

    /// Samples the next token of `id` (and, on a request's first logits, of its other choices).
    fn after_logits(&mut self, id: u64, row: &[f32]) -> weft_model::Result<()> {
        let req_id = self.seqs[&id].req_id;
        let req = self.requests.get_mut(&req_id).expect("live");
        let mut siblings = Vec::new();
        if !req.choices_spawned {
            req.choices_spawned = true;
            req.features.iter_mut().for_each(|f| *f = None); // the prompt is in the KV now
            req.live_choices = req.spec.n;
            let spec = req.spec.clone();
            for choice in 1..spec.n {
                let seq = &self.seqs[&id];
                let cache = seq.cache.as_ref().expect("running").fork(seq.computed())?;
                self.next_id += 1;
                let sibling = seq.sibling(self.next_id, choice, cache, &spec);
                siblings.push(sibling.id);
                self.seqs.insert(sibling.id, sibling);
                self.running.push(self.next_id);
            }
        }
        for sid in siblings {
            self.emit(sid, row);
        }
        self.emit(id, row);
        Ok(())
    }

    fn emit(&mut self, id: u64, row: &[f32]) {
        let context = self.model.config().text.max_position_embeddings.min(self.limits.kv_tokens);
        let seq = self.seqs.get_mut(&id).expect("running");
        let req = self.requests.get(&seq.req_id).expect("live");
        let out = seq.sample(row, &req.prompt, &req.spec, &self.config.eos_token_ids, context, &*self.tokenizer);
        self.stats.generation_tokens_total.fetch_add(1, Relaxed);
        match out {
            Emitted::Token(event) => {
                let _ = req.events.send(event);
            }
            Emitted::Finished(token_event, reason, text) => {
                if let Some(event) = token_event {
                    let _ = req.events.send(event);
                }
                self.finish(id, reason, text);
            }
        }
    }

    fn finish(&mut self, id: u64, reason: FinishReason, text: String) {
        let seq = &self.seqs[&id];
        let req = &self.requests[&seq.req_id];
        let image_tokens = req.images.len() * self.model.config().tokens_per_image();
        let usage = Usage {
            prompt_tokens: req.prompt.len(),
            completion_tokens: seq.generated(req.prompt.len()),
            cached_tokens: seq.reused,
            image_tokens,
        };
        let now = Instant::now();
        let since = |t: Option<Instant>| t.map_or(0.0, |t| (t - req.submitted).as_secs_f64());
        let timing = Timing {
            queue_s: since(seq.admitted_at),
            first_token_s: since(seq.first_token_at),
            total_s: (now - req.submitted).as_secs_f64(),
            inter_token_s: seq.inter_token.clone(),
        };
        let _ = req.events.send(Event::Finished { index: seq.choice, reason, text, usage, timing });
        self.remove_seq(id);
    }

    /// Forgets a sequence; its KV goes to the prefix cache, and the request goes when its last
    /// choice does.
    fn remove_seq(&mut self, id: u64) {
        let Some(mut seq) = self.seqs.remove(&id) else { return };
        if self.config.prefix_caching {
            if let Some(cache) = seq.cache.take() {
                let keys = self.seq_keys(&seq);
                self.prefix.insert(keys, cache);
            }
        }
        if seq.admitted_at.is_none() {
            self.stats.waiting.fetch_sub(1, Relaxed);
        }
        self.running.retain(|r| *r != id);
        // Gauges first, so that whoever sees the stream end also sees the memory freed.
        self.publish_gauges();
        if let Some(req) = self.requests.get_mut(&seq.req_id) {
            req.live_choices = req.live_choices.saturating_sub(1);
            if req.live_choices == 0 {
                self.requests.remove(&seq.req_id);
            }
        }
    }

    fn publish_gauges(&self) {
        let used: usize = self.running.iter().map(|id| self.seqs[id].computed()).sum();
        self.stats.running.store(self.running.len(), Relaxed);
        self.stats.kv_used_tokens.store(used, Relaxed);
        self.stats.prefix_cache_tokens.store(self.prefix.tokens(), Relaxed);
    }
}
