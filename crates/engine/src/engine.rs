//! The engine thread: owns the model, the KV pool, the queues, the caches and every sequence,
//! and runs one batched step after another: drop cancelled work, plan, preempt, admit, encode
//! images, one ragged forward pass, sample, stream. The only way in is a command over a channel; a step
//! that fails or panics fails only its own requests (see `recovery.rs`).

use crate::block_pool::BlockPool;
use crate::config::EngineConfig;
use crate::handle::{Bounds, EngineHandle};
use crate::prefix_cache::{image_key, text_key, BlockHasher, TokenKey};
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
use weft_model::{KvPool, LlavaModel};

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
    /// Every sequence's keys and values, in blocks.
    pub(crate) pool: KvPool,
    /// Which block holds what (references, cached prefixes, free blocks).
    pub(crate) blocks: BlockPool,
    pub(crate) hasher: BlockHasher,
    pub(crate) requests: HashMap<u64, Request>,
    pub(crate) seqs: HashMap<u64, Sequence>,
    /// Seq ids in arrival order.
    pub(crate) running: Vec<u64>,
    pub(crate) waiting: VecDeque<u64>,
    pub(crate) vision: VisionCache,
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
    /// simulation tests drive it step by step with [`Engine::tick`]. The KV pool is allocated
    /// here: as many blocks as `kv_cache_memory` holds (at least one).
    pub fn new(
        model: LlavaModel,
        tokenizer: Arc<PromptTokenizer>,
        config: EngineConfig,
    ) -> weft_model::Result<(Engine, EngineHandle)> {
        let cfg = model.config().clone();
        let block_size = config.block_size.max(1);
        let num_blocks = (config.kv_cache_memory / (model.kv_bytes_per_token() * block_size)).max(1);
        let pool = model.new_kv_pool(num_blocks, block_size)?;
        let bounds = Bounds { context: cfg.text.max_position_embeddings, num_blocks, block_size };
        let stats = Arc::new(EngineStats::default());
        stats.kv_budget_bytes.store(pool.bytes(), Relaxed);
        stats.kv_num_blocks.store(num_blocks, Relaxed);
        stats.kv_block_size.store(block_size, Relaxed);
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
                kv_blocks: num_blocks,
            },
            pool,
            blocks: BlockPool::new(num_blocks),
            hasher: BlockHasher::new(block_size),
            vision: VisionCache::new(config.vision_cache_memory),
            config: config.clone(),
            stats: stats.clone(),
            requests: HashMap::new(),
            seqs: HashMap::new(),
            running: Vec::new(),
            waiting: VecDeque::new(),
            next_id: 0,
            commands: rx,
            in_step: Vec::new(),
            consecutive_faults: 0,
            health,
            sample_on_device,
        };
        let handle = EngineHandle { commands: tx, stats, config, bounds: Arc::new(bounds), health: health_rx };
        engine.publish_gauges();
        Ok((engine, handle))
    }

    /// Starts the engine thread and returns the handle to it.
    pub fn start(
        model: LlavaModel,
        tokenizer: Arc<PromptTokenizer>,
        config: EngineConfig,
    ) -> weft_model::Result<EngineHandle> {
        let (engine, handle) = Engine::new(model, tokenizer, config)?;
        std::thread::Builder::new()
            .name("weft-engine".into())
            .spawn(move || engine.run())
            .expect("spawn the engine thread");
        Ok(handle)
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
        let mut seq = Sequence::new(self.new_id(), req_id, 0, &s.request);
        self.hasher.extend(&mut seq.hashes, |i| keys[i], keys.len());
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

    fn running_views(&self) -> Vec<RunningView> {
        self.running
            .iter()
            .map(|id| {
                let s = &self.seqs[id];
                let frees = s.blocks.iter().filter(|&&b| self.blocks.refs(b) == 1).count();
                RunningView {
                    id: *id,
                    computed: s.computed(),
                    pending: s.pending(),
                    grow: self.blocks_to_grow(s),
                    frees,
                }
            })
            .collect()
    }

    /// Views of the waiting sequences that could start this step (no more than the free
    /// places: each looks its prompt up in the prefix cache, block by block).
    fn waiting_views(&self) -> Vec<WaitingView> {
        let places = self.limits.max_seqs.saturating_sub(self.running.len());
        self.waiting
            .iter()
            .take(places)
            .map(|id| {
                let s = &self.seqs[id];
                let hit = self.prefix_hit(s);
                let new_blocks = s.tokens.len().div_ceil(self.pool.block_size()) - hit.len();
                let need = new_blocks + self.blocks.unheld(&hit) + self.sibling_reserve(s);
                WaitingView { id: *id, to_compute: s.tokens.len() - hit.len() * self.pool.block_size(), need }
            })
            .collect()
    }

    /// Removes every sequence whose client has gone away, before anything is planned, so that
    /// their blocks are counted by this step's plan.
    fn drop_cancelled(&mut self) {
        let gone: Vec<u64> =
            self.running.iter().chain(&self.waiting).copied().filter(|id| self.cancelled(&self.seqs[id])).collect();
        for id in gone {
            self.remove_seq(id);
        }
    }

    /// One step: plan, preempt, admit, and one forward pass. Errors fail the step's requests.
    pub(crate) fn step_inner(&mut self) -> weft_model::Result<()> {
        self.drop_cancelled();
        let running = self.running_views();
        let waiting = self.waiting_views();
        let limits = Limits { kv_blocks: self.blocks.available(), ..self.limits };
        let plan = scheduler::plan(&running, &waiting, limits);

        for id in plan.preempted.iter().rev() {
            self.running.retain(|r| r != id);
            let blocks = self.seqs.get_mut(id).expect("planned").preempt();
            blocks.into_iter().for_each(|b| self.blocks.release(b));
            self.waiting.push_front(*id);
            self.stats.preemptions_total.fetch_add(1, Relaxed);
        }
        let cached: HashMap<u64, usize> =
            waiting.iter().map(|w| (w.id, self.seqs[&w.id].tokens.len() - w.to_compute)).collect();
        self.admit(&plan.admitted, &cached)?;
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

    /// Forgets a sequence and lets go of its blocks (those holding a full block of a prefix
    /// stay cached: blocks are registered only once a forward pass has written them whole, so
    /// none a failed step was writing is kept), and the request goes when its last choice does.
    pub(crate) fn remove_seq(&mut self, id: u64) {
        let Some(mut seq) = self.seqs.remove(&id) else { return };
        seq.preempt().into_iter().for_each(|b| self.blocks.release(b));
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
        let bytes_per_block = self.pool.bytes() / self.blocks.num_blocks();
        let held = self.blocks.held();
        let kept = held + self.blocks.cached_unheld();
        self.stats.running.store(self.running.len(), Relaxed);
        self.stats.kv_used_tokens.store(used, Relaxed);
        self.stats.kv_used_bytes.store(used * self.pool.bytes_per_token(), Relaxed);
        self.stats.kv_blocks_held.store(held, Relaxed);
        self.stats.kv_running_reserved_bytes.store(held * bytes_per_block, Relaxed);
        self.stats.kv_reserved_bytes.store(kept * bytes_per_block, Relaxed);
        self.stats.prefix_cache_bytes.store(self.blocks.cached_unheld() * bytes_per_block, Relaxed);
        self.stats.vision_cache_bytes.store(self.vision.bytes(), Relaxed);
    }
}
