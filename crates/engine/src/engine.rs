//! The engine thread: owns the model, the queues, the caches and every sequence, and runs one
//! batched step after another: drop cancelled work, plan, preempt, admit, encode images, one
//! ragged forward pass, sample, stream. The only way in is a command over a channel; a step
//! that fails or panics fails only its own requests (see `recovery.rs`).

use crate::config::EngineConfig;
use crate::handle::{Bounds, EngineHandle};
use crate::prefix_cache::{image_key, text_key, PrefixCache, TokenKey};
use crate::request::{Event, GenerateRequest, Health};
use crate::scheduler::{self, Limits, RunningView, WaitingView};
use crate::sequence::Sequence;
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
use weft_model::{grown_capacity, LlavaModel};

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
    /// Seconds of vision-tower calls that encoded this request's images (a call shared with
    /// other requests counts whole for each).
    pub vision_s: f64,
    /// Choices still running or waiting.
    pub live_choices: usize,
    pub choices_spawned: bool,
}

pub struct Engine {
    pub(crate) model: LlavaModel,
    pub(crate) tokenizer: Arc<PromptTokenizer>,
    pub(crate) config: Arc<EngineConfig>,
    pub(crate) stats: Arc<EngineStats>,
    pub(crate) limits: Limits,
    /// Tokens of storage the prefix cache may keep at most.
    prefix_limit: usize,
    pub(crate) requests: HashMap<u64, Request>,
    pub(crate) seqs: HashMap<u64, Sequence>,
    /// Seq ids in arrival order.
    pub(crate) running: Vec<u64>,
    pub(crate) waiting: VecDeque<u64>,
    pub(crate) vision: VisionCache,
    pub(crate) prefix: PrefixCache,
    next_id: u64,
    commands: Receiver<Command>,
    /// Sequences the current step feeds: the ones a fault in it fails.
    pub(crate) in_step: Vec<u64>,
    /// Steps in a row that failed; the engine gives up after a few.
    pub(crate) consecutive_faults: usize,
    pub(crate) health: tokio::sync::watch::Sender<Health>,
    /// Plain greedy rows are decided where the logits are (see `EngineConfig::sample_on_device`).
    pub(crate) sample_on_device: bool,
}

impl Engine {
    /// Builds the engine without starting its thread: [`Engine::start`] runs it, and the
    /// simulation tests drive it step by step with [`Engine::tick`].
    pub fn new(model: LlavaModel, tokenizer: Arc<PromptTokenizer>, config: EngineConfig) -> (Engine, EngineHandle) {
        let cfg = model.config().clone();
        let bytes_per_token = model.new_cache().bytes_per_token();
        let kv_tokens = (config.kv_cache_memory / bytes_per_token).max(1);
        let bounds = Bounds { context: cfg.text.max_position_embeddings, kv_tokens };
        let stats = Arc::new(EngineStats::default());
        stats.kv_budget_bytes.store(kv_tokens * bytes_per_token, Relaxed);
        let sample_on_device = config.sample_on_device.unwrap_or(!model.device().is_cpu());
        let config = Arc::new(config);
        let (tx, rx) = std::sync::mpsc::channel();
        let (health, health_rx) = tokio::sync::watch::channel(Health::Serving);
        let engine = Engine {
            model,
            tokenizer,
            limits: Limits {
                max_batched_tokens: config.max_num_batched_tokens.max(1),
                max_seqs: config.max_num_seqs.max(1),
                kv_tokens,
            },
            prefix_limit: (config.prefix_cache_memory / bytes_per_token).min(kv_tokens),
            vision: VisionCache::new(config.vision_cache_memory),
            config: config.clone(),
            stats: stats.clone(),
            requests: HashMap::new(),
            seqs: HashMap::new(),
            running: Vec::new(),
            waiting: VecDeque::new(),
            prefix: PrefixCache::new(),
            next_id: 0,
            commands: rx,
            in_step: Vec::new(),
            consecutive_faults: 0,
            health,
            sample_on_device,
        };
        let handle = EngineHandle { commands: tx, stats, config, bounds: Arc::new(bounds), health: health_rx };
        (engine, handle)
    }

    /// Starts the engine thread and returns the handle to it.
    pub fn start(model: LlavaModel, tokenizer: Arc<PromptTokenizer>, config: EngineConfig) -> EngineHandle {
        let (engine, handle) = Engine::new(model, tokenizer, config);
        std::thread::Builder::new()
            .name("weft-engine".into())
            .spawn(move || engine.run())
            .expect("spawn the engine thread");
        handle
    }

    fn run(mut self) {
        let health = self.health.clone();
        // Faults inside a step are contained by `step`; this catches the rest (a panic while
        // handling a command, or in recovery itself), so the health watch never lies.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || loop {
            // Sleep while there is nothing to do; otherwise take whatever arrived and step.
            if self.seqs.is_empty() {
                match self.commands.recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => return,
                }
            }
            if !self.tick() {
                return;
            }
        }));
        if let Err(payload) = outcome {
            let why = crate::recovery::panic_text(payload.as_ref());
            tracing::error!(why, "the engine thread panicked outside a step");
            health.send_replace(Health::Failed(why));
        }
    }

    /// Takes every command that has arrived, then runs one step. Returns false once the engine
    /// has stopped for good (its handles are gone, or it failed).
    #[doc(hidden)]
    pub fn tick(&mut self) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(cmd) => self.handle(cmd),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) if self.seqs.is_empty() => return false,
                Err(TryRecvError::Disconnected) => break,
            }
        }
        self.step();
        !matches!(*self.health.borrow(), Health::Failed(_))
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(s) => self.enqueue(*s),
        }
    }

    fn enqueue(&mut self, s: Submission) {
        if matches!(*self.health.borrow(), Health::Failed(_)) {
            return; // dropping the sender ends the stream; the handle refuses new work
        }
        let tpi = self.model.config().tokens_per_image();
        let image_token = self.model.config().image_token_id;
        // A ValidPrompt has one image per tokens_per_image slots, so every run is whole images.
        let prompt = s.request.prompt.ids().to_vec();
        let mut keys = Vec::with_capacity(prompt.len());
        let mut image_starts = Vec::new();
        let mut i = 0;
        while i < prompt.len() {
            if prompt[i] == image_token {
                let hash = s.request.prompt.images()[image_starts.len()].hash;
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
        let n_images = s.request.prompt.images().len();
        self.requests.insert(
            req_id,
            Request {
                prompt,
                keys,
                images: s.request.prompt.images().to_vec(),
                image_starts,
                features: vec![None; n_images],
                spec: s.request,
                events: s.events,
                submitted: s.submitted,
                vision_s: 0.0,
                live_choices: 1,
                choices_spawned: false,
            },
        );
    }

    pub(crate) fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn cancelled(&self, seq: &Sequence) -> bool {
        self.requests.get(&seq.req_id).is_none_or(|r| r.events.is_closed())
    }

    /// Tokens the prefix cache could supply for a waiting sequence (at least one token is
    /// always computed, so that its logits exist).
    fn reusable_prefix(&self, seq: &Sequence) -> usize {
        if !self.config.prefix_caching || seq.computed() > 0 || self.prefix.is_empty() {
            return 0;
        }
        let keys = self.seq_keys(seq);
        self.prefix.peek(&keys, seq.tokens.len() - 1)
    }

    pub(crate) fn seq_keys(&self, seq: &Sequence) -> Vec<TokenKey> {
        let req = &self.requests[&seq.req_id];
        let mut keys = req.keys.clone();
        keys.extend(seq.tokens[req.prompt.len()..].iter().map(|&t| text_key(t)));
        keys
    }

    /// Storage the other choices of a request will fork from its prompt, while they are not
    /// spawned yet.
    fn sibling_reserve(&self, seq: &Sequence) -> usize {
        let req = &self.requests[&seq.req_id];
        if req.choices_spawned {
            0
        } else {
            (req.spec.n.get() - 1) * grown_capacity(0, req.prompt.len(), self.limits.kv_tokens)
        }
    }

    fn running_views(&self) -> Vec<RunningView> {
        self.running
            .iter()
            .map(|id| {
                let s = &self.seqs[id];
                let cache = s.cache.as_ref().expect("a running sequence holds its cache between steps");
                let reserved = cache.capacity_after(s.tokens.len()) + self.sibling_reserve(s);
                RunningView { id: *id, computed: s.computed(), pending: s.pending(), reserved }
            })
            .collect()
    }

    fn waiting_views(&self) -> Vec<WaitingView> {
        self.waiting
            .iter()
            .map(|id| {
                let s = &self.seqs[id];
                let cached = self.reusable_prefix(s);
                let max = self.limits.kv_tokens;
                let own = grown_capacity(grown_capacity(0, cached, max), s.tokens.len(), max);
                WaitingView { id: *id, to_compute: s.tokens.len() - cached, need: own + self.sibling_reserve(s) }
            })
            .collect()
    }

    /// Removes every sequence whose client has gone away, before anything is planned, so that
    /// their KV (kept by the prefix cache) is counted by this step's plan.
    fn drop_cancelled(&mut self) {
        let gone: Vec<u64> =
            self.running.iter().chain(&self.waiting).copied().filter(|id| self.cancelled(&self.seqs[id])).collect();
        for id in gone {
            self.remove_seq(id, true);
        }
    }

    /// One step: plan, preempt, admit, and one forward pass. Errors fail the step's requests.
    pub(crate) fn step_inner(&mut self) -> weft_model::Result<()> {
        self.drop_cancelled();
        let running = self.running_views();
        let mut waiting = self.waiting_views();
        // The prefix cache lives in whatever KV budget the running sequences and the head of
        // the queue leave free.
        let committed: usize = running.iter().map(|r| r.reserved).sum();
        let head = waiting.first().map_or(0, |w| w.need);
        if self.prefix.shrink_to(self.limits.kv_tokens.saturating_sub(committed + head).min(self.prefix_limit)) {
            waiting = self.waiting_views();
        }
        let limits =
            Limits { kv_tokens: self.limits.kv_tokens.saturating_sub(self.prefix.reserved_tokens()), ..self.limits };
        let plan = scheduler::plan(&running, &waiting, limits);

        for id in plan.preempted.iter().rev() {
            self.running.retain(|r| r != id);
            let seq = self.seqs.get_mut(id).expect("planned");
            seq.cache = None;
            self.waiting.push_front(*id);
            self.stats.preemptions_total.fetch_add(1, Relaxed);
        }
        let cached: HashMap<u64, usize> =
            waiting.iter().map(|w| (w.id, self.seqs[&w.id].tokens.len() - w.to_compute)).collect();
        for id in &plan.admitted {
            self.waiting.retain(|w| w != id);
            self.admit(*id, cached[id]);
        }
        self.publish_gauges();
        if plan.chunks.is_empty() {
            return Ok(());
        }
        self.stats.steps_total.fetch_add(1, Relaxed);
        self.in_step = plan.chunks.iter().map(|c| c.0).collect();
        self.run_chunks(&plan.chunks)?;
        self.in_step.clear();
        self.publish_gauges();
        Ok(())
    }

    /// Starts a waiting sequence with at most `planned_cached` tokens from the prefix cache:
    /// never more than the plan counted, so its chunk always fits what is left to compute.
    fn admit(&mut self, id: u64, planned_cached: usize) {
        let max = self.limits.kv_tokens;
        let mut cache = self.model.new_cache().with_max_capacity(max);
        let mut reused = 0;
        if self.config.prefix_caching && planned_cached > 0 {
            let keys = self.seq_keys(&self.seqs[&id]);
            if let Some((len, hit)) = self.prefix.lookup(&keys, planned_cached) {
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

    /// Forgets a sequence; its KV goes to the prefix cache when `keep_kv` (never after a
    /// fault), and the request goes when its last choice does.
    pub(crate) fn remove_seq(&mut self, id: u64, keep_kv: bool) {
        let Some(mut seq) = self.seqs.remove(&id) else { return };
        if let Some(cache) = seq.cache.take() {
            if keep_kv && self.config.prefix_caching && self.requests.contains_key(&seq.req_id) {
                let keys = self.seq_keys(&seq);
                self.prefix.insert(keys, cache);
                self.prefix.shrink_to(self.prefix_limit);
            }
        }
        if seq.admitted_at.is_none() {
            self.stats.waiting.fetch_sub(1, Relaxed);
        }
        self.running.retain(|r| *r != id);
        self.waiting.retain(|w| *w != id);
        // Gauges first, so that whoever sees the stream end also sees the memory freed.
        self.publish_gauges();
        if let Some(req) = self.requests.get_mut(&seq.req_id) {
            req.live_choices = req.live_choices.saturating_sub(1);
            if req.live_choices == 0 {
                self.requests.remove(&seq.req_id);
            }
        }
    }

    pub(crate) fn publish_gauges(&self) {
        let used: usize = self.running.iter().filter_map(|id| self.seqs.get(id)).map(|s| s.computed()).sum();
        let bpt = self.stats.kv_budget_bytes.load(Relaxed) / self.limits.kv_tokens.max(1);
        let running_reserved: usize =
            self.running.iter().filter_map(|id| self.seqs.get(id)?.cache.as_ref()).map(|c| c.capacity()).sum();
        self.stats.running.store(self.running.len(), Relaxed);
        self.stats.kv_used_tokens.store(used, Relaxed);
        self.stats.kv_used_bytes.store(used * bpt, Relaxed);
        self.stats.kv_running_reserved_bytes.store(running_reserved * bpt, Relaxed);
        self.stats.kv_reserved_bytes.store(self.model.kv_bytes_reserved(), Relaxed);
        self.stats.prefix_cache_bytes.store(self.prefix.reserved_tokens() * bpt, Relaxed);
        self.stats.vision_cache_bytes.store(self.vision.bytes(), Relaxed);
    }
}
